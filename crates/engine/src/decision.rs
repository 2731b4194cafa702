//! What a check decides: an allow carrying the derived identity, or a denial carrying a bounded
//! reason. Denials are answers, not errors.

use std::sync::Arc;

use crate::ratelimit::RateStatus;
use crate::store::{KeyId, Scopes};

/// How the caller authenticated; the value of `x-auth-method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
    PublishableKey,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Jwt => "jwt",
            AuthMethod::ApiKey => "api_key",
            AuthMethod::PublishableKey => "publishable_key",
        }
    }
}

/// The identity an allow hands upstream. Every field comes from a verified token or a key record,
/// never from a client header (except the user named by an authorised `X-On-Behalf-Of`). A key's
/// values are shared with its record, not copied per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub method: AuthMethod,
    pub tenant: Option<Arc<str>>,
    pub user: Option<String>,
    pub key_id: Option<KeyId>,
    /// A key's scopes (with their `x-scopes` value); `None` for a token.
    pub scopes: Option<Arc<Scopes>>,
    pub impersonated_by: Option<KeyId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `None` on a public route reached without credentials: no identity goes upstream.
    pub identity: Option<Identity>,
    /// Set for key-authenticated requests.
    pub rate: Option<RateStatus>,
}

/// Every reason a request is refused: the `reason` field of the body and a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    MissingCredentials,
    InvalidToken,
    TenantRequired,
    ImpersonationNotAllowed,
    InvalidOnBehalfOf,
    UserTokenRequired,
    TenantMismatch,
    OriginNotAllowed,
    AmbiguousCredentials,
    MalformedCredentials,
    InvalidApiKey,
    RateLimited,
    Unavailable,
    InsufficientScope,
    MethodNotAllowed,
    RouteMisconfigured,
    SecretKeyInBrowser,
}

/// Connect-style error codes of the body's `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Unauthenticated,
    PermissionDenied,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission_denied",
            Code::InvalidArgument => "invalid_argument",
            Code::ResourceExhausted => "resource_exhausted",
            Code::Unavailable => "unavailable",
        }
    }

    /// The matching `google.rpc.Code`; never 0, since Envoy reads 0 as an allow.
    pub fn grpc(self) -> i32 {
        match self {
            Code::InvalidArgument => 3,
            Code::PermissionDenied => 7,
            Code::ResourceExhausted => 8,
            Code::Unavailable => 14,
            Code::Unauthenticated => 16,
        }
    }
}

impl Reason {
    pub const ALL: [Reason; 17] = [
        Reason::MissingCredentials,
        Reason::InvalidToken,
        Reason::TenantRequired,
        Reason::ImpersonationNotAllowed,
        Reason::InvalidOnBehalfOf,
        Reason::UserTokenRequired,
        Reason::TenantMismatch,
        Reason::OriginNotAllowed,
        Reason::AmbiguousCredentials,
        Reason::MalformedCredentials,
        Reason::InvalidApiKey,
        Reason::RateLimited,
        Reason::Unavailable,
        Reason::InsufficientScope,
        Reason::MethodNotAllowed,
        Reason::RouteMisconfigured,
        Reason::SecretKeyInBrowser,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MissingCredentials => "missing_credentials",
            Reason::InvalidToken => "invalid_token",
            Reason::TenantRequired => "tenant_required",
            Reason::ImpersonationNotAllowed => "impersonation_not_allowed",
            Reason::InvalidOnBehalfOf => "invalid_on_behalf_of",
            Reason::UserTokenRequired => "user_token_required",
            Reason::TenantMismatch => "tenant_mismatch",
            Reason::OriginNotAllowed => "origin_not_allowed",
            Reason::AmbiguousCredentials => "ambiguous_credentials",
            Reason::MalformedCredentials => "malformed_credentials",
            Reason::InvalidApiKey => "invalid_api_key",
            Reason::RateLimited => "rate_limited",
            Reason::Unavailable => "unavailable",
            Reason::InsufficientScope => "insufficient_scope",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::RouteMisconfigured => "route_misconfigured",
            Reason::SecretKeyInBrowser => "secret_key_in_browser",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            Reason::MissingCredentials
            | Reason::InvalidToken
            | Reason::UserTokenRequired
            | Reason::InvalidApiKey => 401,
            Reason::TenantRequired
            | Reason::ImpersonationNotAllowed
            | Reason::TenantMismatch
            | Reason::OriginNotAllowed
            | Reason::InsufficientScope
            | Reason::MethodNotAllowed
            | Reason::RouteMisconfigured
            | Reason::SecretKeyInBrowser => 403,
            Reason::InvalidOnBehalfOf
            | Reason::AmbiguousCredentials
            | Reason::MalformedCredentials => 400,
            Reason::RateLimited => 429,
            Reason::Unavailable => 503,
        }
    }

    pub fn code(self) -> Code {
        match self.http_status() {
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            400 => Code::InvalidArgument,
            429 => Code::ResourceExhausted,
            _ => Code::Unavailable,
        }
    }

    /// A sentence for the body. Fixed text: it can never echo a credential.
    pub fn message(self) -> &'static str {
        match self {
            Reason::MissingCredentials => {
                "Authentication required: send a Bearer token or an X-API-Key."
            }
            Reason::InvalidToken => "The bearer token is invalid or expired.",
            Reason::TenantRequired => "This user belongs to no organization yet; create one first.",
            Reason::ImpersonationNotAllowed => {
                "X-On-Behalf-Of needs a secret API key with the users:impersonate scope."
            }
            Reason::InvalidOnBehalfOf => {
                "X-On-Behalf-Of must be a user id of 1 to 128 characters without spaces, commas or control characters."
            }
            Reason::UserTokenRequired => {
                "A publishable key must be sent with the user's bearer token."
            }
            Reason::TenantMismatch => {
                "The user's token belongs to another tenant than the publishable key."
            }
            Reason::OriginNotAllowed => "This origin may not use this publishable key.",
            Reason::AmbiguousCredentials => {
                "Send either a secret API key or a bearer token, not both."
            }
            Reason::MalformedCredentials => {
                "A credential header was sent more than once, or the request has too many headers."
            }
            Reason::InvalidApiKey => "The API key is invalid, revoked or expired.",
            Reason::RateLimited => {
                "Rate limit exceeded; retry after the time given in Retry-After."
            }
            Reason::Unavailable => "Authorization is temporarily unavailable; retry shortly.",
            Reason::InsufficientScope => "The API key lacks a scope this endpoint requires.",
            Reason::MethodNotAllowed => "This endpoint does not accept this kind of credential.",
            Reason::RouteMisconfigured => {
                "This endpoint's authorization settings are invalid; the operator has been told."
            }
            Reason::SecretKeyInBrowser => {
                "A secret API key must never be used from a browser: use a publishable key (pk_) with the user's token, and rotate this secret key."
            }
        }
    }

    /// 401s about a bearer token carry a `WWW-Authenticate: Bearer` challenge (RFC 6750 §3):
    /// `Some(None)` without an error code (no token was sent), `Some(Some(code))` with one.
    pub fn bearer_challenge(self) -> Option<Option<&'static str>> {
        match self {
            Reason::MissingCredentials | Reason::UserTokenRequired => Some(None),
            Reason::InvalidToken => Some(Some("invalid_token")),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: Reason,
    /// Set for key-authenticated 429s, so the client still sees its quota.
    pub rate: Option<RateStatus>,
    /// Why, for the log only (e.g. which token check failed). Never a credential.
    pub detail: Option<&'static str>,
    /// Who was refused, as far as it was established (for the log and the metric's method).
    pub who: Option<Box<Who>>,
}

/// The caller of a refused request, once its credential is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub method: AuthMethod,
    pub tenant: Option<String>,
    pub key_id: Option<String>,
}

impl Denial {
    pub fn new(reason: Reason) -> Self {
        Self {
            reason,
            rate: None,
            detail: None,
            who: None,
        }
    }

    pub fn because(reason: Reason, detail: &'static str) -> Self {
        Self {
            detail: Some(detail),
            ..Self::new(reason)
        }
    }

    /// Names the caller once its credential is known.
    pub fn by(mut self, method: AuthMethod, tenant: Option<&str>, key_id: Option<&str>) -> Self {
        self.who = Some(Box::new(Who {
            method,
            tenant: tenant.map(str::to_owned),
            key_id: key_id.map(str::to_owned),
        }));
        self
    }
}

impl From<Reason> for Denial {
    fn from(r: Reason) -> Self {
        Denial::new(r)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Grant),
    Deny(Denial),
}

impl Decision {
    pub fn outcome(&self) -> &'static str {
        match self {
            Decision::Allow(_) => "allow",
            Decision::Deny(_) => "deny",
        }
    }
}
