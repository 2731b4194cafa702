//! Heap allocations per request on the inline path, counted on the calling thread by
//! `allocation-counter`'s global allocator (a test binary of its own): a cached `sk_` key, read from
//! header lines as the Envoy module hands them over into the context it keeps per worker
//! (`RequestContext::reread_bytes`), decided, answered and observed, exactly the engine's part of
//! the module's `on_request_headers`.
//!
//! The budget is what the path needs today, listed below; a change that adds an allocation per
//! request fails here and has to say why in the budget.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use gybc_authz_engine::Engine;
use gybc_authz_engine::answer::Answer;
use gybc_authz_engine::authn::apikey::{ApiKey, KeyHash, KeyKind};
use gybc_authz_engine::config::Config;
use gybc_authz_engine::decision::Decision;
use gybc_authz_engine::engine::{EngineOptions, KeySource};
use gybc_authz_engine::request::RequestContext;
use gybc_authz_engine::store::{FileStore, KeyRecord, KeyStatus};

/// Allocations per request of the cached `sk_` path: none. The request's strings (method, path,
/// host, the key's copy) are written into the buffers the kept context had for the request
/// before.
///
/// The key lookup (its hash remembered per thread), the local limiter (answered without a
/// future), the usage count, the metrics and the answer (its header lists and rate-limit numbers
/// are inline) allocate nothing.
const BUDGET: usize = 0;

/// Allocations `f` makes on this thread (the engine's background tasks, on others, are not
/// counted).
fn allocations(f: impl FnOnce()) -> usize {
    allocation_counter::measure(f).count_total as usize
}

fn record(key: &str) -> KeyRecord {
    KeyRecord {
        id: "key_secret".into(),
        hash: KeyHash::of(key),
        kind: KeyKind::Secret,
        tenant: "t1".into(),
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

/// The engine's part of one request as the module makes it inline: read, decide (polled once),
/// answer, observe. The answer's headers are looked at as a door writes them out.
fn one_request(engine: &Engine, ctx: &mut RequestContext, lines: &[(&[u8], &[u8])]) -> usize {
    ctx.reread_bytes(
        "GET",
        "/api/v1/threads?page=2",
        "api.example.com",
        lines.iter().copied(),
        engine.limits(),
    );
    let ctx = &*ctx;
    let mut decide = pin!(engine.decide(ctx));
    let Poll::Ready(decision) = decide
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    else {
        panic!("a cached key is decided without waiting");
    };
    assert!(matches!(decision, Decision::Allow(_)), "{decision:?}");
    let written = match engine.answer(&decision) {
        Answer::Allow {
            upstream,
            remove_upstream,
            downstream,
        } => upstream.len() + remove_upstream.len() + downstream.len(),
        Answer::Deny { .. } => unreachable!("allowed above"),
    };
    engine.observe(ctx, &decision, Duration::from_micros(20));
    written
}

#[test]
fn a_cached_secret_key_allocates_nothing_per_request() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = ApiKey::generate(KeyKind::Secret);
    let store = Arc::new(FileStore::from_records(vec![record(&key)]));
    let opts = EngineOptions {
        store: Some(KeySource::Memory(store)),
        ..Default::default()
    };
    let started = rt
        .block_on(Engine::start(&Config::default(), opts))
        .expect("the engine starts");
    let engine = started.engine;
    rt.block_on(async {
        while !engine.is_loaded() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let _entered = rt.enter();

    // As Envoy holds them: pseudo-headers first, a few ordinary ones, its request id, the key.
    let lines: &[(&[u8], &[u8])] = &[
        (b":authority", b"api.example.com"),
        (b":path", b"/api/v1/threads?page=2"),
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b"user-agent", b"client/1"),
        (b"accept", b"*/*"),
        // Envoy adds one to every request.
        (b"x-request-id", b"0b6e3c1e-6d8e-4b5e-9b0e-3d3f3c1e6d8e"),
        (b"x-api-key", key.as_bytes()),
    ];
    // The first requests fill what is filled once per key: limiter cell, usage slot.
    // The kept context's buffers too.
    let mut ctx = RequestContext::default();
    for _ in 0..3 {
        one_request(&engine, &mut ctx, lines);
    }
    // The counter counts: a zero below must mean no allocation, not no counting.
    assert_eq!(allocations(|| drop(std::hint::black_box(vec![1u8; 16]))), 1);
    const REQUESTS: usize = 200;
    let mut written = 0;
    let total = allocations(|| {
        for _ in 0..REQUESTS {
            written += one_request(&engine, &mut ctx, lines);
        }
    });
    assert!(written >= REQUESTS * 8, "the answers carried their headers");
    let per_request = total as f64 / REQUESTS as f64;
    assert!(
        per_request <= BUDGET as f64,
        "{per_request} allocations per request, over the budget of {BUDGET}"
    );
}
