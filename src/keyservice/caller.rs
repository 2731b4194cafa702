//! Who is calling the key service, from the identity headers gybc-authz set in front of it, and
//! whether they may manage keys at all. A pure rule over plain data: the service authenticates
//! nobody itself, which is safe only because Envoy lets no request in without gybc-authz's
//! decision and gybc-authz overwrites or removes every one of these headers.

use gybc_authz_engine::config::HeaderNames;

/// The scope a secret key needs to manage its tenant's keys.
pub const KEYS_MANAGE: &str = "keys:manage";

/// The identity headers of one request, as received (`None`: absent or empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity<'a> {
    pub tenant: Option<&'a str>,
    pub user: Option<&'a str>,
    pub auth_method: Option<&'a str>,
    pub api_key_id: Option<&'a str>,
    pub scopes: Option<&'a str>,
    pub impersonated_by: Option<&'a str>,
}

impl<'a> Identity<'a> {
    /// Reads the headers gybc-authz sets, under the names its config gives them.
    pub fn read(headers: &'a axum::http::HeaderMap, names: &HeaderNames) -> Self {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        Identity {
            tenant: get(&names.tenant_id),
            user: get(&names.user_id),
            auth_method: get(&names.auth_method),
            api_key_id: get(&names.api_key_id),
            scopes: get(&names.scopes),
            impersonated_by: get(&names.impersonated_by),
        }
    }
}

/// A caller allowed to manage its tenant's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A user of the tenant, signed in with a JWT carrying the tenant claim.
    User { tenant: String, user: String },
    /// A secret key of the tenant with `keys:manage`; it grants only scopes it holds.
    Key {
        tenant: String,
        key_id: String,
        scopes: Vec<String>,
    },
}

impl Caller {
    pub fn tenant(&self) -> &str {
        match self {
            Caller::User { tenant, .. } | Caller::Key { tenant, .. } => tenant,
        }
    }

    /// Who made a change, for the audit line: `user:<id>` or `key:<id>`.
    pub fn actor(&self) -> String {
        match self {
            Caller::User { user, .. } => format!("user:{user}"),
            Caller::Key { key_id, .. } => format!("key:{key_id}"),
        }
    }

    /// The scopes this caller may put on a key: a user any (of the allow-list); a key only its own,
    /// so no key can mint a key stronger than itself.
    pub fn may_grant(&self, scope: &str) -> bool {
        match self {
            Caller::User { .. } => true,
            Caller::Key { scopes, .. } => scopes.iter().any(|s| s == scope),
        }
    }
}

/// Why a request may not manage keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No identity headers: the request did not come through gybc-authz (401).
    NoIdentity,
    /// A publishable key (403).
    PublishableKey,
    /// A secret key acting for a user through `X-On-Behalf-Of` (403).
    Impersonated,
    /// A user token without the tenant claim (403).
    NoTenant,
    /// A secret key without `keys:manage` (403).
    MissingScope,
    /// An authentication method the service does not know (403).
    UnknownMethod,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::NoIdentity => 401,
            _ => 403,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NoIdentity => "missing_identity",
            Refusal::PublishableKey => "publishable_key",
            Refusal::Impersonated => "impersonated",
            Refusal::NoTenant => "tenant_required",
            Refusal::MissingScope => "insufficient_scope",
            Refusal::UnknownMethod => "unknown_auth_method",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::NoIdentity => {
                "No caller identity: the key service is reached only through gybc-authz."
            }
            Refusal::PublishableKey => "Publishable keys cannot manage keys.",
            Refusal::Impersonated => "Keys cannot be managed on behalf of a user.",
            Refusal::NoTenant => "This user belongs to no organization, so has no keys.",
            Refusal::MissingScope => "Managing keys with an API key needs the scope keys:manage.",
            Refusal::UnknownMethod => "This kind of credential cannot manage keys.",
        }
    }
}

/// The rule: a JWT user of a tenant, or a secret key of a tenant with `keys:manage`; nobody else.
pub fn authorize(id: &Identity<'_>) -> Result<Caller, Refusal> {
    let Some(method) = id.auth_method else {
        return Err(Refusal::NoIdentity);
    };
    if id.impersonated_by.is_some() {
        return Err(Refusal::Impersonated);
    }
    match method {
        "jwt" => match (id.tenant, id.user) {
            (Some(tenant), Some(user)) => Ok(Caller::User {
                tenant: tenant.to_owned(),
                user: user.to_owned(),
            }),
            (None, _) => Err(Refusal::NoTenant),
            (Some(_), None) => Err(Refusal::NoIdentity),
        },
        "api_key" => {
            // A secret key with a user is a key acting for that user.
            if id.user.is_some() {
                return Err(Refusal::Impersonated);
            }
            let (Some(tenant), Some(key_id)) = (id.tenant, id.api_key_id) else {
                return Err(Refusal::NoIdentity);
            };
            let scopes: Vec<String> = id
                .scopes
                .unwrap_or("")
                .split_ascii_whitespace()
                .map(str::to_owned)
                .collect();
            if !scopes.iter().any(|s| s == KEYS_MANAGE) {
                return Err(Refusal::MissingScope);
            }
            Ok(Caller::Key {
                tenant: tenant.to_owned(),
                key_id: key_id.to_owned(),
                scopes,
            })
        }
        "publishable_key" => Err(Refusal::PublishableKey),
        _ => Err(Refusal::UnknownMethod),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id<'a>(
        method: Option<&'a str>,
        tenant: Option<&'a str>,
        user: Option<&'a str>,
        key: Option<&'a str>,
        scopes: Option<&'a str>,
    ) -> Identity<'a> {
        Identity {
            tenant,
            user,
            auth_method: method,
            api_key_id: key,
            scopes,
            impersonated_by: None,
        }
    }

    #[test]
    fn who_may_manage_keys() {
        use Refusal::*;
        let user = Ok(Caller::User {
            tenant: "a".into(),
            user: "u1".into(),
        });
        let key = Ok(Caller::Key {
            tenant: "a".into(),
            key_id: "key_1".into(),
            scopes: vec!["threads:read".into(), KEYS_MANAGE.into()],
        });
        let table: Vec<(Identity, Result<Caller, Refusal>)> = vec![
            (id(Some("jwt"), Some("a"), Some("u1"), None, None), user),
            (id(Some("jwt"), None, Some("u1"), None, None), Err(NoTenant)),
            (
                id(Some("jwt"), Some("a"), None, None, None),
                Err(NoIdentity),
            ),
            (
                id(
                    Some("api_key"),
                    Some("a"),
                    None,
                    Some("key_1"),
                    Some("threads:read keys:manage"),
                ),
                key,
            ),
            (
                id(
                    Some("api_key"),
                    Some("a"),
                    None,
                    Some("key_1"),
                    Some("threads:read"),
                ),
                Err(MissingScope),
            ),
            (
                id(Some("api_key"), Some("a"), None, Some("key_1"), None),
                Err(MissingScope),
            ),
            (
                id(
                    Some("api_key"),
                    Some("a"),
                    Some("u9"),
                    Some("key_1"),
                    Some("keys:manage"),
                ),
                Err(Impersonated),
            ),
            (
                id(
                    Some("api_key"),
                    None,
                    None,
                    Some("key_1"),
                    Some("keys:manage"),
                ),
                Err(NoIdentity),
            ),
            (
                id(
                    Some("publishable_key"),
                    Some("a"),
                    Some("u1"),
                    Some("key_2"),
                    Some("keys:manage"),
                ),
                Err(PublishableKey),
            ),
            (
                id(Some("basic"), Some("a"), Some("u1"), None, None),
                Err(UnknownMethod),
            ),
            (
                id(
                    None,
                    Some("a"),
                    Some("u1"),
                    Some("key_1"),
                    Some("keys:manage"),
                ),
                Err(NoIdentity),
            ),
            (Identity::default(), Err(NoIdentity)),
        ];
        for (identity, want) in table {
            assert_eq!(authorize(&identity), want, "{identity:?}");
        }

        let mut impersonating = id(
            Some("api_key"),
            Some("a"),
            Some("u1"),
            Some("key_1"),
            Some("keys:manage users:impersonate"),
        );
        impersonating.impersonated_by = Some("key_1");
        assert_eq!(authorize(&impersonating), Err(Impersonated));

        assert_eq!(NoIdentity.status(), 401);
        assert_eq!(MissingScope.status(), 403);
    }

    #[test]
    fn a_key_grants_only_its_own_scopes_and_a_user_any() {
        let key = Caller::Key {
            tenant: "a".into(),
            key_id: "key_1".into(),
            scopes: vec![KEYS_MANAGE.into()],
        };
        assert!(key.may_grant(KEYS_MANAGE));
        assert!(!key.may_grant("users:impersonate"));
        let user = Caller::User {
            tenant: "a".into(),
            user: "u".into(),
        };
        assert!(user.may_grant("users:impersonate"));
        assert_eq!(key.actor(), "key:key_1");
        assert_eq!(user.actor(), "user:u");
    }
}
