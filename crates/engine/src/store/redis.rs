//! The Redis key store: records the platform's key service writes as `KeyRecord` protobufs under
//! `gybc:key:<hex sha256>`, and the `KeyEvent`s it publishes on `gybc:keys:events`, on which every
//! replica drops its cached copy at once. The layout is docs/key-store.md.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use prost::Message;

use super::{CachedStore, Interner, Key, KeyRecord, KeyStatus, KeyStore, StoreError};
use crate::authn::apikey::{KeyHash, KeyKind};
use crate::event::{RedisFailure, RedisReconnect};
use crate::proto::v1 as pb;
use crate::ratelimit::RateLimit;
use crate::redis_conn::Redis;

pub struct RedisStore {
    redis: Redis,
    /// Cached keys of one tenant share its name and scope lists, as a file store's do.
    interner: Mutex<Interner>,
}

impl RedisStore {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            interner: Mutex::default(),
        }
    }
}

impl KeyStore for RedisStore {
    fn lookup<'a>(
        &'a self,
        hash: &'a KeyHash,
    ) -> BoxFuture<'a, Result<Option<Arc<Key>>, StoreError>> {
        Box::pin(async move {
            let bytes: Option<Vec<u8>> = self
                .redis
                .run(|mut conn| async move {
                    redis::cmd("GET")
                        .arg(self.redis.names.key(hash))
                        .query_async(&mut conn)
                        .await
                })
                .await
                .map_err(|e| match e {
                    RedisFailure::BreakerOpen => StoreError::BreakerOpen,
                    e => StoreError::Unavailable(e.to_string()),
                })?;
            let Some(bytes) = bytes else { return Ok(None) };
            match decode_record(&bytes, hash) {
                Ok(r) => Ok(Some(Arc::new(
                    self.interner.lock().expect("interner lock").key(&r),
                ))),
                Err(why) => {
                    // A record we cannot trust is no key at all; the key service must fix it.
                    tracing::error!(key = %self.redis.names.key(hash), why, "Unusable key record in Redis; treating the key as unknown.");
                    Ok(None)
                }
            }
        })
    }
}

/// Decodes and checks a stored record against the hash it was found under.
pub fn decode_record(bytes: &[u8], hash: &KeyHash) -> Result<KeyRecord, &'static str> {
    let r = pb::KeyRecord::decode(bytes).map_err(|_| "not a KeyRecord protobuf")?;
    if r.hash.as_slice() != hash.0 {
        return Err("hash field does not match the Redis key");
    }
    if r.id.is_empty() {
        return Err("id is empty");
    }
    if r.tenant.is_empty() || r.tenant.contains(char::is_control) {
        return Err("tenant is empty or has control characters");
    }
    let kind = match pb::KeyKind::try_from(r.kind) {
        Ok(pb::KeyKind::Secret) => KeyKind::Secret,
        Ok(pb::KeyKind::Publishable) => KeyKind::Publishable,
        _ => return Err("kind is unspecified"),
    };
    let status = match pb::KeyStatus::try_from(r.status) {
        Ok(pb::KeyStatus::Active) => KeyStatus::Active,
        // Unspecified or unknown statuses are not active: never allow on doubt.
        _ => KeyStatus::Revoked,
    };
    let rate_limit = match (r.rate_limit_requests, r.rate_limit_window_secs) {
        (0, 0) => None,
        (n, w) if n > 0 && w > 0 => Some(RateLimit {
            requests: n,
            window: Duration::from_secs(w as u64),
        }),
        _ => return Err("rate limit needs both requests and window"),
    };
    let positive = |t: i64| (t > 0).then_some(t as u64);
    let opt = |s: String| (!s.is_empty()).then_some(s);
    Ok(KeyRecord {
        id: r.id,
        hash: *hash,
        kind,
        tenant: r.tenant,
        scopes: r.scopes,
        rate_limit,
        status,
        expires_at: positive(r.expires_at),
        name: opt(r.name),
        created_at: positive(r.created_at),
        allowed_origins: r.allowed_origins,
        jwt_provider: opt(r.jwt_provider),
        identity_platform_tenant: opt(r.identity_platform_tenant),
    })
}

/// Encodes a record as the key service would write it (the key CLI and tests use this).
pub fn encode_record(r: &KeyRecord) -> Vec<u8> {
    pb::KeyRecord {
        id: r.id.clone(),
        hash: r.hash.0.to_vec(),
        kind: match r.kind {
            KeyKind::Secret => pb::KeyKind::Secret,
            KeyKind::Publishable => pb::KeyKind::Publishable,
        } as i32,
        tenant: r.tenant.clone(),
        scopes: r.scopes.clone(),
        rate_limit_requests: r.rate_limit.map_or(0, |l| l.requests),
        rate_limit_window_secs: r.rate_limit.map_or(0, |l| l.window.as_secs() as u32),
        status: match r.status {
            KeyStatus::Active => pb::KeyStatus::Active,
            KeyStatus::Revoked => pb::KeyStatus::Revoked,
        } as i32,
        expires_at: r.expires_at.map_or(0, |t| t as i64),
        name: r.name.clone().unwrap_or_default(),
        created_at: r.created_at.map_or(0, |t| t as i64),
        allowed_origins: r.allowed_origins.clone(),
        jwt_provider: r.jwt_provider.clone().unwrap_or_default(),
        identity_platform_tenant: r.identity_platform_tenant.clone().unwrap_or_default(),
    }
    .encode_to_vec()
}

pub fn encode_event(hash: &KeyHash, kind: pb::KeyEventType) -> Vec<u8> {
    pb::KeyEvent {
        hash: hash.0.to_vec(),
        r#type: kind as i32,
    }
    .encode_to_vec()
}

/// How often a subscription that has been quiet is PINGed: a node that went away without closing
/// the connection (a network cut) is noticed within this and the command timeout.
const SUBSCRIPTION_PING_EVERY: Duration = Duration::from_secs(2);

/// Follows the events channel until aborted: each event evicts that key. The subscription is on
/// any node that takes it (`Redis::subscription_nodes`: the primary, or any node of a cluster),
/// tried in turn, so it never waits on one node coming back; after every resubscription the whole
/// cache is marked stale, since events may have been missed meanwhile.
pub fn spawn_event_listener(redis: Redis, cache: Weak<CachedStore>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let channel = redis.names.events_channel();
        let mut first = true;
        let mut delays = redis.retry_delays();
        // One warning per outage, not one per attempt.
        let mut warned = false;
        loop {
            let Some((node, ps)) = subscribe(&redis, &channel).await else {
                if !warned {
                    tracing::warn!("Cannot subscribe to key events on any Redis node; retrying.");
                    warned = true;
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(1));
                tokio::time::sleep(delay).await;
                if cache.strong_count() == 0 {
                    return;
                }
                continue;
            };
            delays = redis.retry_delays();
            warned = false;
            let Some(c) = cache.upgrade() else { return };
            if !first {
                c.revalidate_all();
                redis
                    .observer()
                    .redis_reconnected(RedisReconnect::Subscription, None, &node);
            }
            first = false;
            drop(c);
            if follow(&redis, ps, &node, &cache, &channel).await.is_break() {
                return;
            }
            tracing::warn!(node = %node, "Key event subscription lost; subscribing again.");
        }
    })
}

/// A subscription on the first node that takes one, and its address.
async fn subscribe(redis: &Redis, channel: &str) -> Option<(String, redis::aio::PubSub)> {
    for client in redis.subscription_nodes().await {
        let node = client.get_connection_info().addr().to_string();
        let subscribed = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(redis.connect_timeout() + redis.timeout, subscribed).await {
            Ok(Ok(ps)) => return Some((node, ps)),
            Ok(Err(e)) => {
                tracing::debug!(node = %node, error = %e, "Cannot subscribe to key events on this node; trying the next.")
            }
            Err(_) => {
                tracing::debug!(node = %node, "Subscribing to key events timed out on this node; trying the next.")
            }
        }
    }
    None
}

/// Applies events until the subscription ends, stops answering a PING, or (with Sentinel) the
/// primary moves away from `node`: after a graceful failover the old primary keeps the
/// subscription open but hears nothing the new one publishes. `Break` once the cache is gone.
async fn follow(
    redis: &Redis,
    ps: redis::aio::PubSub,
    node: &str,
    cache: &Weak<CachedStore>,
    channel: &str,
) -> std::ops::ControlFlow<()> {
    let (mut sink, mut messages) = ps.split();
    let mut ping = tokio::time::interval(SUBSCRIPTION_PING_EVERY);
    ping.reset();
    let mut primary = redis.primary_changes();
    if let Some(p) = primary.as_mut() {
        p.mark_unchanged();
    }
    loop {
        tokio::select! {
            Ok(()) = async { match primary.as_mut() {
                Some(p) => p.changed().await,
                None => std::future::pending().await,
            } } => {
                let moved = primary
                    .as_mut()
                    .and_then(|p| p.borrow_and_update().clone())
                    .is_some_and(|now| &*now != node);
                if moved {
                    return std::ops::ControlFlow::Continue(());
                }
            }
            msg = messages.next() => {
                let Some(msg) = msg else { return std::ops::ControlFlow::Continue(()) };
                ping.reset();
                let Some(c) = cache.upgrade() else {
                    return std::ops::ControlFlow::Break(());
                };
                match pb::KeyEvent::decode(msg.get_payload_bytes()) {
                    Ok(ev) if ev.hash.len() == 32 => {
                        let mut h = [0u8; 32];
                        h.copy_from_slice(&ev.hash);
                        c.invalidate(&KeyHash(h)).await;
                        tracing::debug!(event = ev.r#type().as_str_name(), "Key event applied.");
                    }
                    _ => tracing::warn!(channel = %channel, "Ignoring a malformed key event."),
                }
            }
            _ = ping.tick() => {
                if cache.strong_count() == 0 {
                    return std::ops::ControlFlow::Break(());
                }
                let answered = tokio::time::timeout(
                    redis.timeout * 5,
                    sink.ping::<redis::Value>(),
                )
                .await;
                if !matches!(answered, Ok(Ok(_))) {
                    return std::ops::ControlFlow::Continue(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let mut r = KeyRecord::for_test("key_1", KeyKind::Publishable, "t1");
        r.rate_limit = Some("10/60s".parse().unwrap());
        r.expires_at = Some(2_000_000_000);
        r.allowed_origins = vec!["https://a".into()];
        r.jwt_provider = Some("endusers".into());
        let bytes = encode_record(&r);
        assert_eq!(decode_record(&bytes, &r.hash).unwrap(), r);

        assert!(
            decode_record(&bytes, &KeyHash::of("other")).is_err(),
            "stored under another hash"
        );
        assert!(decode_record(b"\xff\xff", &r.hash).is_err());
        let mut unspecified = pb::KeyRecord::decode(bytes.as_slice()).unwrap();
        unspecified.status = 0;
        let rec = decode_record(&unspecified.encode_to_vec(), &r.hash).unwrap();
        assert_eq!(
            rec.status,
            KeyStatus::Revoked,
            "unspecified status is never active"
        );
        unspecified.kind = 0;
        assert!(decode_record(&unspecified.encode_to_vec(), &r.hash).is_err());
    }
}
