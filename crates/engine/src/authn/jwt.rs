//! Firebase ID token verification: RS256 only, `kid` from the provider's live key set, issuer and
//! audience of the project, token times against the injected clock, `sub` bounds. Successful
//! verifications are cached until `exp`, so a token costs one RSA verification in its lifetime.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, Validation, errors::ErrorKind};
use moka::Expiry;
use moka::future::Cache;
use serde::Deserialize;
use siphasher::sip128::{Hasher128, SipHasher13};

use crate::authn::jwks::Jwks;
use crate::clock::Clock;
use crate::event::TokenLookup;
use crate::observe::Observer;

/// Longest `sub` accepted (Firebase's own limit).
pub const MAX_SUB_CHARS: usize = 128;

/// One configured issuer.
pub struct Provider {
    pub name: String,
    pub tenant_claim: String,
    pub jwks: Arc<Jwks>,
    validation: Validation,
}

impl Provider {
    pub fn new(name: &str, project_id: &str, tenant_claim: &str, jwks: Arc<Jwks>) -> Self {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[format!("https://securetoken.google.com/{project_id}")]);
        validation.set_audience(&[project_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Times are checked against the injected clock below, not the system time.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        Self {
            name: name.to_owned(),
            tenant_claim: tenant_claim.to_owned(),
            jwks,
            validation,
        }
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub sub: String,
    /// The provider's tenant claim (`tenant_id`), when present and a non-empty string.
    pub tenant: Option<String>,
    /// Identity Platform's `firebase.tenant`.
    pub firebase_tenant: Option<String>,
    pub exp: u64,
}

/// Why a token was refused. The client only ever sees `invalid_token`; this is for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm is not RS256")]
    Algorithm,
    #[error("token header has no kid")]
    NoKid,
    #[error("token kid is unknown")]
    UnknownKid,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token iat, nbf or auth_time is in the future")]
    NotYetValid,
    #[error("token issuer is wrong")]
    Issuer,
    #[error("token audience is wrong")]
    Audience,
    #[error("token sub is empty, too long or has control characters")]
    Subject,
    #[error("token claims have the wrong types")]
    Claims,
}

impl TokenError {
    /// Failures that the same token meets again on every try, found only after the RSA
    /// verification (the cheap header checks are not worth remembering). A token refused for one
    /// of these is remembered briefly, so repeating it costs a cache lookup, not an RSA
    /// verification. An unknown `kid` is not among them: a key rotation can make it known.
    fn is_lasting(self) -> bool {
        matches!(
            self,
            TokenError::Signature
                | TokenError::Expired
                | TokenError::Issuer
                | TokenError::Audience
                | TokenError::Subject
                | TokenError::Claims
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::Algorithm => "algorithm",
            TokenError::NoKid => "no_kid",
            TokenError::UnknownKid => "unknown_kid",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::Issuer => "issuer",
            TokenError::Audience => "audience",
            TokenError::Subject => "subject",
            TokenError::Claims => "claims",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    auth_time: Option<u64>,
    #[serde(default)]
    firebase: Option<FirebaseClaim>,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct FirebaseClaim {
    #[serde(default)]
    tenant: Option<String>,
}

/// A token's entry in the caches: its provider and a keyed 128-bit hash of the token. Keyed with a
/// random key of this verifier's own, so nobody outside the process can compute a token's hash,
/// let alone aim two tokens at one (which would let a forged token ride on a verified one); 128
/// bits make a chance collision as unlikely as SHA-256's, at a fraction of its cost on a ~1 kB
/// token hashed on every request.
type CacheKey = (usize, u128);

/// The caches' hash, its key drawn from the system CSPRNG once.
struct TokenHasher(SipHasher13);

impl TokenHasher {
    fn random() -> Self {
        let mut key = [0u8; 16];
        aws_lc_rs::rand::fill(&mut key).expect("the system CSPRNG is available");
        Self(SipHasher13::new_with_key(&key))
    }

    fn key(&self, provider: usize, token: &str) -> CacheKey {
        let mut h = self.0;
        std::hash::Hasher::write(&mut h, token.as_bytes());
        (provider, h.finish128().as_u128())
    }
}

/// How long a refused token is remembered, and how many are. Short and small: it only has to
/// absorb a repeated bad token (a flood, or a client retrying), and a `Signature` failure could in
/// principle turn good if a provider republished different key material under the same `kid`.
pub const REJECTED_TOKEN_TTL: Duration = Duration::from_secs(60);
pub const REJECTED_TOKEN_MAX_ENTRIES: u64 = 10_000;

struct UntilExp;

impl Expiry<CacheKey, Arc<VerifiedToken>> for UntilExp {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        v: &Arc<VerifiedToken>,
        _: Instant,
    ) -> Option<Duration> {
        let now = crate::clock::SystemClock.now_secs();
        // Bounded by real time too, so a token's entry cannot outlive its exp by much whatever the
        // injected clock says; hits are re-checked against the clock.
        Some(Duration::from_secs(
            v.exp.saturating_sub(now).clamp(1, 24 * 3600),
        ))
    }
}

pub struct JwtVerifier {
    providers: Vec<Provider>,
    by_name: HashMap<String, usize>,
    default: Option<usize>,
    clock: Arc<dyn Clock>,
    leeway: u64,
    hasher: TokenHasher,
    cache: Cache<CacheKey, Arc<VerifiedToken>>,
    rejected: Cache<CacheKey, TokenError>,
    observer: Arc<Observer>,
}

impl JwtVerifier {
    pub fn new(
        providers: Vec<Provider>,
        default: Option<&str>,
        clock: Arc<dyn Clock>,
        leeway_secs: u64,
        cache_entries: u64,
    ) -> Self {
        let by_name: HashMap<_, _> = providers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let default = default.and_then(|d| by_name.get(d).copied());
        Self {
            providers,
            by_name,
            default,
            clock,
            leeway: leeway_secs,
            hasher: TokenHasher::random(),
            cache: Cache::builder()
                .max_capacity(cache_entries)
                .expire_after(UntilExp)
                .build(),
            rejected: Cache::builder()
                .max_capacity(REJECTED_TOKEN_MAX_ENTRIES)
                .time_to_live(REJECTED_TOKEN_TTL)
                .build(),
            observer: Arc::default(),
        }
    }

    /// Reports cache hits and misses to `observer`.
    pub fn with_observer(mut self, observer: Arc<Observer>) -> Self {
        self.observer = observer;
        self
    }

    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// The provider for plain bearer tokens.
    pub fn default_provider(&self) -> Option<usize> {
        self.default
    }

    pub fn provider_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Verifies `token` for provider `p`. At most one RSA verification; none for a token verified
    /// (or refused for a lasting reason) recently.
    pub async fn verify(&self, p: usize, token: &str) -> Result<Arc<VerifiedToken>, TokenError> {
        let provider = self.providers.get(p).ok_or(TokenError::UnknownKid)?;
        let now = self.clock.now_secs();
        let key = self.hasher.key(p, token);
        if let Some(hit) = self.cache.get(&key).await {
            self.observer.token_lookup(TokenLookup::Hit);
            if hit.exp.saturating_add(self.leeway) <= now {
                self.cache.invalidate(&key).await;
                return Err(TokenError::Expired);
            }
            return Ok(hit);
        }
        if let Some(e) = self.rejected.get(&key).await {
            self.observer.token_lookup(TokenLookup::RejectedHit);
            return Err(e);
        }
        self.observer.token_lookup(TokenLookup::Miss);
        match self.verify_uncached(provider, token, now).await {
            Ok(verified) => {
                let verified = Arc::new(verified);
                self.cache.insert(key, verified.clone()).await;
                Ok(verified)
            }
            Err(e) => {
                if e.is_lasting() {
                    self.rejected.insert(key, e).await;
                }
                Err(e)
            }
        }
    }

    /// Every check of the contract, with one RSA verification.
    async fn verify_uncached(
        &self,
        provider: &Provider,
        token: &str,
        now: u64,
    ) -> Result<VerifiedToken, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Algorithm);
        }
        let kid = header.kid.ok_or(TokenError::NoKid)?;
        let decoding_key = provider
            .jwks
            .key(&kid)
            .await
            .ok_or(TokenError::UnknownKid)?;
        let data = jsonwebtoken::decode::<Claims>(token, &decoding_key, &provider.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::Signature,
                ErrorKind::InvalidIssuer => TokenError::Issuer,
                ErrorKind::InvalidAudience => TokenError::Audience,
                ErrorKind::InvalidAlgorithm => TokenError::Algorithm,
                ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => TokenError::Claims,
                _ => TokenError::Malformed,
            })?;
        let c = data.claims;

        if c.exp.saturating_add(self.leeway) <= now {
            return Err(TokenError::Expired);
        }
        let future = |t: Option<u64>| t.is_some_and(|t| t > now.saturating_add(self.leeway));
        if future(c.iat) || future(c.nbf) || future(c.auth_time) {
            return Err(TokenError::NotYetValid);
        }
        if c.sub.is_empty()
            || c.sub.chars().count() > MAX_SUB_CHARS
            || c.sub.contains(char::is_control)
        {
            return Err(TokenError::Subject);
        }
        let tenant = match c.rest.get(&provider.tenant_claim) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if s.is_empty() => None,
            Some(serde_json::Value::String(s)) if !s.contains(char::is_control) => Some(s.clone()),
            Some(_) => return Err(TokenError::Claims),
        };
        Ok(VerifiedToken {
            sub: c.sub,
            tenant,
            firebase_tenant: c.firebase.and_then(|f| f.tenant),
            exp: c.exp,
        })
    }

    pub fn cached_tokens(&self) -> u64 {
        self.cache.entry_count()
    }
}
