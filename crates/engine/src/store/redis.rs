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
use crate::event::RedisFailure;
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

/// Follows the events channel until aborted: each event evicts that key; after every reconnect the
/// whole cache is dropped, since events may have been missed while disconnected.
pub fn spawn_event_listener(redis: Redis, cache: Weak<CachedStore>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let channel = redis.names.events_channel();
        let mut first = true;
        let mut delay = Duration::from_millis(100);
        loop {
            let subscribed = async {
                let mut ps = redis.pubsub_client.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            let mut ps = match tokio::time::timeout(Duration::from_secs(5), subscribed).await {
                Ok(Ok(ps)) => ps,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Cannot subscribe to key events; retrying.");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(_) => {
                    tracing::warn!("Subscribing to key events timed out; retrying.");
                    continue;
                }
            };
            delay = Duration::from_millis(100);
            let Some(c) = cache.upgrade() else { return };
            if !first {
                c.invalidate_all();
                tracing::info!(
                    "Resubscribed to key events; cached keys dropped in case events were missed."
                );
            }
            first = false;
            drop(c);
            let mut messages = ps.on_message();
            while let Some(msg) = messages.next().await {
                let Some(c) = cache.upgrade() else { return };
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
            tracing::warn!("Key event subscription lost; reconnecting.");
        }
    })
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
