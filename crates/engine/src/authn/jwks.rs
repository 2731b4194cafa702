//! Signing keys for one JWT provider: fetched from a URL or file (Google's `kid` → X.509 map or a
//! JWK set), cached per `Cache-Control: max-age`, refreshed in the background before they expire,
//! refetched at most once per interval for an unknown `kid`, and never replaced by a failed fetch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::BoxFuture;
use jsonwebtoken::DecodingKey;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{JwtConfig, KeySourceConfig};
use crate::observe::Observer;
use crate::otel::{ChildSpan, JWKS_FETCH_SPAN};

/// A key document larger than this is refused (Google's is ~4 KB).
const MAX_KEYS_BYTES: usize = 1 << 20;
/// Retry delays after a failed fetch: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    #[error("fetching keys from {source_name} failed: {message}")]
    Fetch {
        source_name: String,
        message: String,
    },
    #[error("key document from {source_name} is unusable: {message}")]
    Parse {
        source_name: String,
        message: String,
    },
}

/// A fetched key document and how long its publisher says it stays valid.
pub struct Fetched {
    pub body: Vec<u8>,
    pub max_age: Option<Duration>,
}

/// Where a provider's key document comes from (an I/O seam).
pub trait KeySource: Send + Sync {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, JwksError>>;
    fn name(&self) -> String;
}

/// `client` fetches URL sources; the others need none.
pub fn source_from_config(
    cfg: &KeySourceConfig,
    client: Option<&reqwest::Client>,
) -> Arc<dyn KeySource> {
    match cfg {
        KeySourceConfig::Url { url } => Arc::new(UrlSource {
            client: client
                .expect("a URL key source is given an HTTP client")
                .clone(),
            url: url.clone(),
        }),
        KeySourceConfig::File { path } => Arc::new(FileSource { path: path.clone() }),
        KeySourceConfig::Inline { json } => Arc::new(InlineSource { json: json.clone() }),
    }
}

struct UrlSource {
    client: reqwest::Client,
    url: String,
}

impl KeySource for UrlSource {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, JwksError>> {
        Box::pin(async move {
            let fail = |message: String| JwksError::Fetch {
                source_name: self.url.clone(),
                message,
            };
            let mut resp = self
                .client
                .get(&self.url)
                .send()
                .await
                .map_err(|e| fail(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(fail(format!("HTTP {}", resp.status())));
            }
            let max_age = resp
                .headers()
                .get_all(reqwest::header::CACHE_CONTROL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(parse_max_age);
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
                if body.len() + chunk.len() > MAX_KEYS_BYTES {
                    return Err(fail(format!("larger than {MAX_KEYS_BYTES} bytes")));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Fetched { body, max_age })
        })
    }

    fn name(&self) -> String {
        self.url.clone()
    }
}

struct FileSource {
    path: PathBuf,
}

impl KeySource for FileSource {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, JwksError>> {
        Box::pin(async move {
            let body = tokio::fs::read(&self.path)
                .await
                .map_err(|e| JwksError::Fetch {
                    source_name: self.name(),
                    message: e.to_string(),
                })?;
            Ok(Fetched {
                body,
                max_age: None,
            })
        })
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

struct InlineSource {
    json: String,
}

impl KeySource for InlineSource {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, JwksError>> {
        Box::pin(futures_util::future::ready(Ok(Fetched {
            body: self.json.as_bytes().to_vec(),
            max_age: None,
        })))
    }

    fn name(&self) -> String {
        "inline keys".into()
    }
}

/// `Cache-Control: public, max-age=19302, must-revalidate` → 19302 s.
fn parse_max_age(header: &str) -> Option<Duration> {
    header.split(',').find_map(|d| {
        let (k, v) = d.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| {
                v.trim()
                    .trim_matches('"')
                    .parse()
                    .ok()
                    .map(Duration::from_secs)
            })
            .flatten()
    })
}

/// The RSA verification keys of one provider, by `kid`.
pub struct KeySet {
    keys: HashMap<String, Arc<DecodingKey>>,
}

impl KeySet {
    pub fn get(&self, kid: &str) -> Option<&Arc<DecodingKey>> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Reads either format: `{"keys": [JWK…]}` or Google's `{"<kid>": "-----BEGIN CERTIFICATE-----…"}`.
/// Only RSA signing keys are kept; a document without one is an error, so it never replaces a
/// good set.
pub fn parse_key_set(body: &[u8], source_name: &str) -> Result<KeySet, JwksError> {
    let err = |message: String| JwksError::Parse {
        source_name: source_name.to_owned(),
        message,
    };
    let doc: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| err(format!("not a JSON object: {e}")))?;
    let mut keys = HashMap::new();
    if let Some(list) = doc.get("keys") {
        let list = list
            .as_array()
            .ok_or_else(|| err("`keys` is not an array".into()))?;
        for jwk in list {
            let field = |name: &str| jwk.get(name).and_then(|v| v.as_str());
            let usable = field("kty") == Some("RSA")
                && field("alg").is_none_or(|a| a == "RS256")
                && field("use").is_none_or(|u| u == "sig");
            let (Some(kid), Some(n), Some(e)) = (field("kid"), field("n"), field("e")) else {
                continue;
            };
            if !usable {
                continue;
            }
            match DecodingKey::from_rsa_components(n, e) {
                Ok(k) => {
                    keys.insert(kid.to_owned(), Arc::new(k));
                }
                Err(e) => {
                    tracing::warn!(kid, error = %e, source = source_name, "Skipping an unreadable JWK.")
                }
            }
        }
    } else {
        for (kid, pem) in &doc {
            let Some(pem) = pem.as_str() else { continue };
            match DecodingKey::from_rsa_pem(pem.as_bytes()) {
                Ok(k) => {
                    keys.insert(kid.clone(), Arc::new(k));
                }
                Err(e) => {
                    tracing::warn!(kid, error = %e, source = source_name, "Skipping an unreadable certificate.")
                }
            }
        }
    }
    if keys.is_empty() {
        return Err(err("no RSA signing key in it".into()));
    }
    Ok(KeySet { keys })
}

/// Timing knobs, from `JwtConfig`.
#[derive(Debug, Clone, Copy)]
pub struct JwksTiming {
    pub unknown_kid_interval: Duration,
    pub unknown_kid_wait: Duration,
    pub default_refresh: Duration,
    pub min_refresh: Duration,
}

impl From<&JwtConfig> for JwksTiming {
    fn from(c: &JwtConfig) -> Self {
        Self {
            unknown_kid_interval: Duration::from_millis(c.unknown_kid_refetch_interval_ms),
            unknown_kid_wait: Duration::from_millis(c.unknown_kid_wait_ms),
            default_refresh: Duration::from_secs(c.keys_refresh_secs),
            min_refresh: Duration::from_secs(c.keys_min_refresh_secs),
        }
    }
}

/// One provider's live key set.
pub struct Jwks {
    provider: String,
    source: Arc<dyn KeySource>,
    timing: JwksTiming,
    current: ArcSwapOption<KeySet>,
    fetch: std::sync::Mutex<FetchState>,
    /// Counts finished fetches (success or not), so waiters can tell when one is done.
    fetched: watch::Sender<u64>,
    loaded: watch::Sender<bool>,
    observer: Arc<Observer>,
}

#[derive(Default)]
struct FetchState {
    last_start: Option<Instant>,
    in_flight: bool,
}

impl Jwks {
    pub fn new(provider: &str, source: Arc<dyn KeySource>, timing: JwksTiming) -> Arc<Self> {
        Self::observed(provider, source, timing, Arc::default())
    }

    /// Like `new`, reporting fetches to `observer`.
    pub fn observed(
        provider: &str,
        source: Arc<dyn KeySource>,
        timing: JwksTiming,
        observer: Arc<Observer>,
    ) -> Arc<Self> {
        observer.metrics.register_provider(provider);
        Arc::new(Self {
            observer,
            provider: provider.to_owned(),
            source,
            timing,
            current: ArcSwapOption::empty(),
            fetch: Default::default(),
            fetched: watch::channel(0).0,
            loaded: watch::channel(false).0,
        })
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// True once a key set has loaded; it never goes back to false.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    pub fn key_count(&self) -> usize {
        self.current.load().as_ref().map_or(0, |s| s.len())
    }

    /// The key for `kid`. An unknown `kid` starts one fetch, at most once per interval (any fetch
    /// counts), and waits for it a bounded time. The fetch runs in its own task: a Check that
    /// Envoy cancels cannot cut it short.
    pub async fn key(self: &Arc<Self>, kid: &str) -> Option<Arc<DecodingKey>> {
        if let Some(k) = self.cached(kid) {
            return Some(k);
        }
        let mut span = ChildSpan::start(JWKS_FETCH_SPAN);
        let mut done = self.fetched.subscribe();
        {
            let mut st = self.fetch.lock().expect("fetch state");
            let joined = st.in_flight;
            if !st.in_flight {
                if st
                    .last_start
                    .is_some_and(|t| t.elapsed() < self.timing.unknown_kid_interval)
                {
                    span.discard();
                    return None;
                }
                self.observer.unknown_kid_fetch(&self.provider);
                self.start_fetch_locked(&mut st);
            }
            span.set("gybc_authz.provider", self.provider.clone());
            span.set("gybc_authz.joined_fetch", joined);
        }
        // The span covers this check's wait; the fetch itself goes on in its own task.
        let waited = tokio::time::timeout(self.timing.unknown_kid_wait, done.changed()).await;
        if waited.is_err() {
            span.fail("wait_timed_out");
        }
        let key = self.cached(kid);
        span.set("gybc_authz.kid_found", key.is_some());
        key
    }

    fn cached(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        self.current
            .load()
            .as_ref()
            .and_then(|s| s.get(kid).cloned())
    }

    fn start_fetch_locked(
        self: &Arc<Self>,
        st: &mut FetchState,
    ) -> tokio::task::JoinHandle<Result<Duration, JwksError>> {
        st.in_flight = true;
        st.last_start = Some(Instant::now());
        let me = self.clone();
        tokio::spawn(async move {
            let result = me.fetch_and_store().await;
            match &result {
                Ok(_) => me.observer.jwks_loaded(&me.provider, me.key_count()),
                Err(e) => me.observer.jwks_failed(&me.provider, me.key_count(), e),
            }
            me.fetch.lock().expect("fetch state").in_flight = false;
            me.fetched.send_modify(|n| *n += 1);
            result
        })
    }

    /// Fetches now (or joins the fetch in flight); on success returns when the next refresh is due.
    pub async fn refresh(self: &Arc<Self>) -> Result<Duration, JwksError> {
        let mut done = self.fetched.subscribe();
        let handle = {
            let mut st = self.fetch.lock().expect("fetch state");
            (!st.in_flight).then(|| self.start_fetch_locked(&mut st))
        };
        match handle {
            Some(h) => h.await.unwrap_or_else(|e| {
                Err(JwksError::Fetch {
                    source_name: self.source.name(),
                    message: e.to_string(),
                })
            }),
            None => {
                let _ = done.changed().await;
                if self.key_count() > 0 {
                    Ok(self.timing.default_refresh)
                } else {
                    Err(JwksError::Fetch {
                        source_name: self.source.name(),
                        message: "the concurrent fetch failed".into(),
                    })
                }
            }
        }
    }

    async fn fetch_and_store(&self) -> Result<Duration, JwksError> {
        let fetched = self.source.fetch().await?;
        let set = parse_key_set(&fetched.body, &self.source.name())?;
        self.current.store(Some(Arc::new(set)));
        self.loaded.send_replace(true);
        // Refresh before expiry: at 3/4 of max-age, so a slow or failing fetch has time to retry.
        let next = fetched
            .max_age
            .map(|a| a.mul_f64(0.75))
            .unwrap_or(self.timing.default_refresh)
            .max(self.timing.min_refresh);
        Ok(next)
    }

    /// Loads now and keeps the set fresh until the task is aborted. Failures keep the last good set
    /// and retry with backoff.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let jwks = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut retry = RETRY_FIRST;
            loop {
                let Some(j) = jwks.upgrade() else { return };
                let wait = match j.refresh().await {
                    Ok(next) => {
                        retry = RETRY_FIRST;
                        next
                    }
                    Err(_) => {
                        let w = retry;
                        retry = (retry * 2).min(RETRY_MAX);
                        w
                    }
                };
                drop(j);
                tokio::time::sleep(wait).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(
            parse_max_age("public, max-age=19302, must-revalidate, no-transform"),
            Some(Duration::from_secs(19302))
        );
        assert_eq!(parse_max_age("no-cache"), None);
        assert_eq!(parse_max_age("max-age=abc"), None);
    }

    #[test]
    fn documents_without_rsa_keys_are_refused() {
        assert!(parse_key_set(b"{}", "t").is_err());
        assert!(parse_key_set(b"[]", "t").is_err());
        assert!(
            parse_key_set(br#"{"keys":[{"kty":"EC","kid":"a","x":"1","y":"2"}]}"#, "t").is_err()
        );
        assert!(parse_key_set(br#"{"a":"not a pem"}"#, "t").is_err());
        // An RS256 JWK marked for encryption or another algorithm is not a signing key.
        let n = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";
        let jwk = |extra: &str| {
            format!(r#"{{"keys":[{{"kty":"RSA","kid":"k","n":"{n}","e":"AQAB"{extra}}}]}}"#)
        };
        assert_eq!(parse_key_set(jwk("").as_bytes(), "t").unwrap().len(), 1);
        assert!(parse_key_set(jwk(r#","use":"enc""#).as_bytes(), "t").is_err());
        assert!(parse_key_set(jwk(r#","alg":"RS512""#).as_bytes(), "t").is_err());
    }
}
