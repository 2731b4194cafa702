//! The decision, top to bottom: route settings → read credentials → authenticate (401) →
//! authorize (403) → rate-limit (429). The only module that awaits lookups; every rule it applies
//! is a pure function from `credentials`, `route` or `policy`.

use std::sync::Arc;

use crate::authn::apikey::ApiKey;
use crate::authn::{JwtVerifier, VerifiedToken};
use crate::clock::Clock;
use crate::config::SecretKeyFromBrowser;
use crate::credentials::{self, Credentials};
use crate::decision::{AuthMethod, Decision, Denial, Grant, Identity, Reason};
use crate::observe::Observer;
use crate::otel::{ChildSpan, KEY_STORE_LOOKUP_SPAN};
use crate::policy::{impersonation, origin, secret_key, tenant};
use crate::ratelimit::{RateLimit, RateLimitError, RateLimiter};
use crate::request::RequestContext;
use crate::store::{CacheOutcome, Found, Keys};

pub struct Authorizer {
    pub jwt: Arc<JwtVerifier>,
    pub keys: Keys,
    pub limiter: Arc<dyn RateLimiter>,
    pub clock: Arc<dyn Clock>,
    pub default_rate_limit: RateLimit,
    pub tenantless_paths: Vec<String>,
    pub secret_key_from_browser: SecretKeyFromBrowser,
    pub observer: Arc<Observer>,
}

impl Authorizer {
    pub async fn decide(&self, req: &RequestContext) -> Decision {
        match self.decide_inner(req).await {
            Ok(grant) => Decision::Allow(grant),
            Err(denial) => Decision::Deny(denial),
        }
    }

    async fn decide_inner(&self, req: &RequestContext) -> Result<Grant, Denial> {
        if let Some(e) = &req.route_error {
            self.observer.route_config_error(e);
            return Err(Denial::because(Reason::RouteMisconfigured, e.why));
        }
        match credentials::extract(req)? {
            // A public route reached without credentials: no identity goes upstream, and every
            // client copy of an identity header is stripped.
            Credentials::None if req.route.public => Ok(Grant {
                identity: None,
                rate: None,
            }),
            Credentials::None => Err(Denial::new(Reason::MissingCredentials)),
            Credentials::Bearer {
                token,
                on_behalf_of,
            } => self.bearer(req, token, on_behalf_of).await,
            Credentials::SecretKey { key, on_behalf_of } => {
                self.secret_key(req, key, on_behalf_of).await
            }
            Credentials::PublishableKey {
                key,
                user_token,
                on_behalf_of,
            } => {
                self.publishable_key(req, key, user_token, on_behalf_of)
                    .await
            }
        }
    }

    /// A dashboard user's Firebase token.
    async fn bearer(
        &self,
        req: &RequestContext,
        token: &str,
        on_behalf_of: Option<&str>,
    ) -> Result<Grant, Denial> {
        let jwt = AuthMethod::Jwt;
        let provider = self
            .jwt
            .default_provider()
            .ok_or(Denial::because(Reason::InvalidToken, "no_provider").by(jwt, None, None))?;
        let verified = self
            .verify(provider, token)
            .await
            .map_err(|d| d.by(jwt, None, None))?;
        let refused = |d: Denial| d.by(jwt, verified.tenant.as_deref(), None);
        route_allows(req, jwt, None).map_err(refused)?;
        impersonation::authorize(jwt, &[], on_behalf_of).map_err(refused)?;
        let tenant = if req.route.tenantless && verified.tenant.is_none() {
            None
        } else {
            tenant::for_jwt(
                verified.tenant.as_deref(),
                &req.path,
                &self.tenantless_paths,
            )
            .map_err(refused)?
        };
        Ok(Grant {
            identity: Some(Identity {
                method: jwt,
                tenant,
                user: Some(verified.sub.clone()),
                key_id: None,
                scopes: None,
                impersonated_by: None,
            }),
            rate: None,
        })
    }

    /// A customer backend's secret key, possibly acting for one of its users.
    async fn secret_key(
        &self,
        req: &RequestContext,
        key: ApiKey<'_>,
        on_behalf_of: Option<&str>,
    ) -> Result<Grant, Denial> {
        let method = AuthMethod::ApiKey;
        let record = self
            .key_record(&key)
            .await
            .map_err(|d| d.by(method, None, None))?;
        let refused = |d: Denial| refused_key(d, method, &record);
        route_allows(req, method, Some(&record.scopes().names)).map_err(refused)?;
        let policy = self.secret_key_from_browser;
        if let Some(verdict) = secret_key::judge(req.origin.as_deref(), policy) {
            self.observer.secret_key_from_browser(policy);
            verdict.map_err(refused)?;
        }
        let user = impersonation::authorize(method, &record.scopes().names, on_behalf_of)
            .map_err(refused)?;
        let key_id = record.key_id();
        let identity = Identity {
            method,
            tenant: Some(record.tenant().clone()),
            user: user.map(str::to_owned),
            scopes: Some(record.scopes().clone()),
            impersonated_by: user.map(|_| key_id.clone()),
            key_id: Some(key_id),
        };
        self.rate_limited(&record, identity).await
    }

    /// A client app's publishable key together with its user's token.
    async fn publishable_key(
        &self,
        req: &RequestContext,
        key: ApiKey<'_>,
        user_token: Option<Result<&str, Denial>>,
        on_behalf_of: Option<&str>,
    ) -> Result<Grant, Denial> {
        let method = AuthMethod::PublishableKey;
        let record = self
            .key_record(&key)
            .await
            .map_err(|d| d.by(method, None, None))?;
        let refused = |d: Denial| refused_key(d, method, &record);
        let token = user_token
            .ok_or(Denial::new(Reason::UserTokenRequired))
            .and_then(|t| t)
            .map_err(refused)?;
        let extras = record.publishable();
        let provider = match extras.and_then(|p| p.jwt_provider.as_deref()) {
            Some(name) => self.jwt.provider_index(name).ok_or_else(|| {
                tracing::warn!(key_id = %record.id(), provider = %name, "Publishable key names an unknown JWT provider.");
                refused(Denial::because(Reason::InvalidApiKey, "unknown_provider"))
            })?,
            None => self
                .jwt
                .default_provider()
                .ok_or_else(|| refused(Denial::because(Reason::InvalidToken, "no_provider")))?,
        };
        let verified = self.verify(provider, token).await.map_err(refused)?;
        route_allows(req, method, Some(&record.scopes().names)).map_err(refused)?;
        let origins = extras.map_or(&[][..], |p| &p.allowed_origins);
        if !origin::allowed(origins, req.origin.as_deref()) {
            return Err(refused(Denial::new(Reason::OriginNotAllowed)));
        }
        tenant::for_publishable(
            record.tenant(),
            extras.and_then(|p| p.identity_platform_tenant.as_deref()),
            &verified,
        )
        .map_err(refused)?;
        impersonation::authorize(method, &record.scopes().names, on_behalf_of).map_err(refused)?;
        let identity = Identity {
            method,
            tenant: Some(record.tenant().clone()),
            user: Some(verified.sub.clone()),
            key_id: Some(record.key_id()),
            scopes: Some(record.scopes().clone()),
            impersonated_by: None,
        };
        self.rate_limited(&record, identity).await
    }

    async fn verify(&self, provider: usize, token: &str) -> Result<Arc<VerifiedToken>, Denial> {
        self.jwt
            .verify(provider, token)
            .await
            .map_err(|e| Denial::because(Reason::InvalidToken, e.as_str()))
    }

    /// The key's record, if it exists, matches the key's kind, and is usable now.
    async fn key_record(&self, key: &ApiKey<'_>) -> Result<Found, Denial> {
        // Only a cache miss reaches a remote store; an in-memory hit is not worth a span.
        let mut span = ChildSpan::start(KEY_STORE_LOOKUP_SPAN);
        let record = match self.keys.lookup_traced(&key.hash()).await {
            Ok((found, cache)) => {
                if cache == Some(CacheOutcome::Miss) {
                    span.set("gybc_authz.key_found", found.is_some());
                } else {
                    span.discard();
                }
                self.observer
                    .key_lookup(self.keys.kind(), cache, found.is_some());
                found.ok_or(Denial::because(Reason::InvalidApiKey, "unknown"))?
            }
            Err(e) => {
                span.fail("unavailable");
                self.observer.key_lookup_failed(self.keys.kind());
                self.observer.key_store_error("unavailable", &e);
                return Err(Denial::because(Reason::Unavailable, "key_store"));
            }
        };
        if record.kind() != key.kind() {
            return Err(Denial::because(Reason::InvalidApiKey, "kind"));
        }
        if !record.is_usable(self.clock.now_secs()) {
            return Err(Denial::because(Reason::InvalidApiKey, "revoked_or_expired"));
        }
        Ok(record)
    }

    /// Counts the request against the key's limit; the status rides on the allow or the 429.
    async fn rate_limited(&self, record: &Found, identity: Identity) -> Result<Grant, Denial> {
        let limit = record.rate_limit().unwrap_or(self.default_rate_limit);
        let checked = match self.limiter.check_in_memory(record.id(), limit) {
            Some(status) => Ok(status),
            None => self.limiter.check(record.id(), limit).await,
        };
        match checked {
            Ok(status) if status.allowed => Ok(Grant {
                identity: Some(identity),
                rate: Some(status),
            }),
            Ok(status) => Err(Denial {
                rate: Some(status),
                ..refused_key(Denial::new(Reason::RateLimited), identity.method, record)
            }),
            // The limiter has reported the failure (metric and log) itself.
            Err(RateLimitError::Unavailable(_)) => Err(refused_key(
                Denial::because(Reason::Unavailable, "rate_limiter"),
                identity.method,
                record,
            )),
        }
    }
}

/// The route's own rules, once the caller's method (and a key's scopes) are known.
fn route_allows(
    req: &RequestContext,
    method: AuthMethod,
    key_scopes: Option<&[String]>,
) -> Result<(), Denial> {
    if !req.route.allows_method(method) {
        return Err(Denial::new(Reason::MethodNotAllowed));
    }
    if let Some(scopes) = key_scopes
        && req.route.missing_scope(scopes).is_some()
    {
        return Err(Denial::new(Reason::InsufficientScope));
    }
    Ok(())
}

/// A denial of a caller whose key is known.
fn refused_key(d: Denial, method: AuthMethod, record: &Found) -> Denial {
    d.by(method, Some(record.tenant()), Some(record.id()))
}
