//! Micro-benchmarks of the in-process decision path with the components wired as `src/app.rs`
//! wires them: read the CheckRequest → decide → build the response (+ the decision's metrics),
//! JWT verification uncached and cached, key parsing/hashing and lookups.
//!
//! `cargo bench --bench decision` measures; under `cargo test` criterion runs each once. The
//! million-record store is built only when benchmarking.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use gybc_authz::cli::check::check_request;
use gybc_authz::dev::{SigningKey, firebase_claims};
use gybc_authz::transport::grpc;
use gybc_authz_engine::answer::Answers;
use gybc_authz_engine::authn::apikey::{ApiKey, KeyHash, KeyKind};
use gybc_authz_engine::authn::jwks::{self, Jwks, JwksTiming};
use gybc_authz_engine::authn::{JwtVerifier, Provider};
use gybc_authz_engine::authorize::Authorizer;
use gybc_authz_engine::clock::{Clock, SystemClock};
use gybc_authz_engine::config::{Config, KeySourceConfig};
use gybc_authz_engine::observe::Observer;
use gybc_authz_engine::ratelimit::LocalLimiter;
use gybc_authz_engine::store::{
    CachedStore, FileStore, Found, Key, KeyRecord, KeyStatus, KeyStore, Keys, StoreError,
};
use tokio::runtime::Runtime;

const PROJECT: &str = "gybc-bench";
const TENANT: &str = "t1";
const PATH: &str = "/api/v1/llm/gateway/list-threads";

fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn record(id: &str, key: &str, kind: KeyKind) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        hash: KeyHash::of(key),
        kind,
        tenant: TENANT.into(),
        scopes: vec!["threads:read".into()],
        rate_limit: Some("10000000/60s".parse().expect("valid limit")),
        status: KeyStatus::Active,
        expires_at: None,
        name: None,
        created_at: None,
        allowed_origins: vec![],
        jwt_provider: None,
        identity_platform_tenant: None,
    }
}

/// Everything the decision needs, built as the composition root builds it.
struct Fixture {
    cfg: Config,
    authorizer: Authorizer,
    answers: Answers,
    observer: Arc<Observer>,
    jwks: Arc<Jwks>,
    signing: SigningKey,
    secret: String,
    publishable: String,
}

impl Fixture {
    fn new(rt: &Runtime) -> Self {
        let signing = SigningKey::generate("bench-1").expect("RSA key");
        let mut cfg = Config::default();
        let observer = Arc::new(Observer::default());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let source = jwks::source_from_config(
            &KeySourceConfig::Inline {
                json: SigningKey::jwks(&[&signing]),
            },
            None,
        );
        let jwks = Jwks::new("bench", source, JwksTiming::from(&cfg.jwt));
        rt.block_on(jwks.refresh()).expect("inline keys load");
        let jwt = Arc::new(verifier(&jwks, &cfg, 100_000));
        let secret = ApiKey::generate(KeyKind::Secret);
        let publishable = ApiKey::generate(KeyKind::Publishable);
        // As the daemon runs a key file: the in-memory store, asked directly.
        let keys = Keys::Memory(Arc::new(FileStore::from_records(vec![
            record("key_secret", &secret, KeyKind::Secret),
            record("key_app", &publishable, KeyKind::Publishable),
        ])));
        cfg.rate_limit.default = "10000000/60s".parse().expect("valid limit");
        let authorizer = Authorizer {
            jwt,
            keys,
            limiter: Arc::new(LocalLimiter::new(clock.clone(), cfg.rate_limit.max_keys)),
            clock,
            default_rate_limit: cfg.rate_limit.default,
            tenantless_paths: cfg.policy.tenantless_paths.clone(),
            secret_key_from_browser: cfg.policy.secret_key_from_browser,
            observer: observer.clone(),
        };
        Self {
            answers: Answers::new(&cfg),
            cfg,
            authorizer,
            observer,
            jwks,
            signing,
            secret,
            publishable,
        }
    }

    fn token(&self, sub: &str) -> String {
        self.signing.sign(&firebase_claims(
            PROJECT,
            sub,
            Some(TENANT),
            SystemClock.now_secs(),
            3600,
        ))
    }

    /// What `AuthzService::check` does between decoding and encoding.
    async fn check(&self, req: &CheckRequest) -> usize {
        let started = Instant::now();
        let ctx = grpc::read(req, &self.cfg.limits).expect("HTTP check");
        let decision = self.authorizer.decide(&ctx).await;
        let response = grpc::write(self.answers.answer(&decision));
        self.observer.decision(&ctx, &decision, started.elapsed());
        black_box(response).http_response.is_some() as usize
    }
}

fn verifier(jwks: &Arc<Jwks>, cfg: &Config, cache: u64) -> JwtVerifier {
    JwtVerifier::new(
        vec![Provider::new("bench", PROJECT, "tenant_id", jwks.clone())],
        Some("bench"),
        Arc::new(SystemClock),
        cfg.jwt.leeway_secs,
        cache,
    )
}

fn request(headers: &[(&str, &str)]) -> CheckRequest {
    let mut h: Vec<(String, String)> = [
        ("user-agent", "bench/1"),
        ("accept", "*/*"),
        ("x-request-id", "5d1f3c1e-9b0a-4a52-8e4e-2f8f3d4c9a10"),
    ]
    .iter()
    .chain(headers)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    h.push((":path".into(), PATH.into()));
    check_request("POST", PATH, "api.example.com", &h)
}

fn decision_path(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let fx = Fixture::new(&rt);
    let token = fx.token("user-1");
    let bearer = format!("Bearer {token}");
    let unknown = ApiKey::generate(KeyKind::Secret);
    let cases = [
        ("sk_cached", request(&[("x-api-key", &fx.secret)])),
        ("jwt_cached", request(&[("authorization", &bearer)])),
        (
            "pk_jwt_cached",
            request(&[("x-api-key", &fx.publishable), ("authorization", &bearer)]),
        ),
        (
            "unknown_key_negative_cached",
            request(&[("x-api-key", &unknown)]),
        ),
        ("missing_credentials", request(&[])),
    ];
    let mut g = c.benchmark_group("decision");
    for (name, req) in &cases {
        rt.block_on(fx.check(req)); // warm the caches
        g.bench_function(*name, |b| b.to_async(&rt).iter(|| fx.check(req)));
    }
    // A new random key each time: cache miss, store lookup, negative entry inserted (scenario f).
    g.bench_function("unknown_key_fresh", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let fx = &fx;
            async move {
                let reqs: Vec<CheckRequest> = (0..iters)
                    .map(|_| request(&[("x-api-key", &ApiKey::generate(KeyKind::Secret))]))
                    .collect();
                let t = Instant::now();
                for r in &reqs {
                    fx.check(r).await;
                }
                t.elapsed()
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("parts");
    let req = &cases[0].1;
    g.bench_function("read_request", |b| {
        b.iter(|| grpc::read(black_box(req), &fx.cfg.limits).map(|c| c.method.len()))
    });
    let ctx = grpc::read(req, &fx.cfg.limits).expect("HTTP check");
    let decision = rt.block_on(fx.authorizer.decide(&ctx));
    g.bench_function("decide_sk_cached", |b| {
        b.to_async(&rt)
            .iter(|| fx.authorizer.decide(black_box(&ctx)))
    });
    g.bench_function("build_allow_response", |b| {
        b.iter(|| grpc::write(fx.answers.answer(black_box(&decision))))
    });
    g.bench_function("observe_decision", |b| {
        b.iter(|| {
            fx.observer
                .decision(&ctx, black_box(&decision), Duration::from_micros(20))
        })
    });
    g.finish();
}

fn jwt(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let fx = Fixture::new(&rt);
    let token = fx.token("user-1");
    let mut g = c.benchmark_group("jwt");
    // A fresh verifier (empty cache) for every verification; its set-up is not timed.
    g.bench_function("verify_uncached", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (fx, token) = (&fx, &token);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let v = verifier(&fx.jwks, &fx.cfg, 16);
                    let t = Instant::now();
                    black_box(v.verify(0, token).await.expect("valid token"));
                    total += t.elapsed();
                }
                total
            }
        })
    });
    let cached = verifier(&fx.jwks, &fx.cfg, 100_000);
    rt.block_on(cached.verify(0, &token)).expect("valid token");
    g.bench_function("verify_cached", |b| {
        b.to_async(&rt).iter(|| cached.verify(0, black_box(&token)))
    });
    // The failure path is never cached: every bad signature costs a verification (scenario h).
    let mut bad = token.clone().into_bytes();
    let n = bad.len();
    bad[n - 8..].fill(b'A');
    let bad = String::from_utf8(bad).expect("ASCII");
    g.bench_function("verify_bad_signature", |b| {
        b.to_async(&rt).iter(|| cached.verify(0, black_box(&bad)))
    });
    g.finish();
}

fn keys(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let cfg = Config::default();
    let key = ApiKey::generate(KeyKind::Secret);
    let mut g = c.benchmark_group("keys");
    g.bench_function("parse_and_hash", |b| {
        b.iter(|| ApiKey::parse(black_box(&key)).map(|k| k.hash()))
    });
    let sizes: &[usize] = if benchmarking() {
        &[1_000, 1_000_000]
    } else {
        &[1_000]
    };
    for &n in sizes {
        let keys: Vec<String> = (0..1_000)
            .map(|_| ApiKey::generate(KeyKind::Secret))
            .collect();
        let mut records: Vec<KeyRecord> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| record(&format!("k{i}"), k, KeyKind::Secret))
            .collect();
        // Fill the rest with records of random hashes (no key is needed to look them up).
        let mut filler = record("filler", "x", KeyKind::Secret);
        for i in records.len()..n {
            filler.id = format!("f{i}");
            filler.hash = KeyHash::of(&filler.id);
            records.push(filler.clone());
        }
        let store = Arc::new(FileStore::from_records(records));
        let hashes: Vec<KeyHash> = keys.iter().map(|k| KeyHash::of(k)).collect();
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("file_store_lookup", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % hashes.len();
                store.get(&hashes[i])
            })
        });
        // The key cache as it sits in front of Redis, here over the same records.
        let cached = CachedStore::new(Arc::new(AsRemote(store.clone())), &cfg.key_cache);
        for h in &hashes {
            rt.block_on(cached.lookup(h)).expect("lookup");
        }
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("cached_lookup_hit", n), &n, |b, _| {
            b.to_async(&rt).iter(|| {
                i = (i + 1) % hashes.len();
                cached.lookup_traced(&hashes[i])
            })
        });
    }
    g.finish();
}

/// The file store standing in for a remote store, to measure the key cache's own cost.
struct AsRemote(Arc<FileStore>);

impl KeyStore for AsRemote {
    fn lookup<'a>(
        &'a self,
        hash: &'a KeyHash,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<Arc<Key>>, StoreError>> {
        Box::pin(std::future::ready(Ok(self
            .0
            .get(hash)
            .map(Found::into_arc))))
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = decision_path, jwt, keys
}
criterion_main!(benches);
