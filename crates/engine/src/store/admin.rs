//! Key management against the configured store (`gybc-authz keys …`): the file store written
//! atomically under a lock, or Redis written as the key service would (record, then event).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::authn::apikey::{ApiKey, KeyHash, KeyKind, random_base62};
use crate::config::{Config, KeyStoreConfig};
use crate::proto::v1::KeyEventType;
use crate::ratelimit::RateLimit;
use crate::redis_conn::Redis;
use crate::store::redis::{decode_record, encode_event, encode_record};
use crate::store::{KeyFile, KeyFileEntry, KeyRecord, KeyStatus, parse_entries, parse_file};

/// Why a key command failed; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no key with id `{0}`")]
    NotFound(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("key store unreachable: {0}")]
    Unavailable(String),
    #[error("cannot write the key store: {0}")]
    Write(String),
    #[error("no key store configured: set key_store.type to file or redis")]
    NoStore,
}

impl AdminError {
    /// sysexits-style codes, so scripts can tell the cases apart.
    pub fn exit_code(&self) -> u8 {
        match self {
            AdminError::NotFound(_) => 3,
            AdminError::Invalid(_) => 65,
            AdminError::NoStore => 64,
            AdminError::Unavailable(_) => 69,
            AdminError::Write(_) => 74,
        }
    }
}

/// What a new key gets.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub tenant: String,
    pub kind: KeyKind,
    pub scopes: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    pub expires_at: Option<u64>,
    pub name: Option<String>,
    pub allowed_origins: Vec<String>,
    pub jwt_provider: Option<String>,
    pub identity_platform_tenant: Option<String>,
}

/// A created key: the secret, shown once, and its record.
pub struct Created {
    pub key: String,
    pub record: KeyRecord,
}

pub enum AdminStore {
    File(PathBuf),
    Redis(Box<Redis>),
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AdminStore {
    pub async fn from_config(cfg: &Config) -> Result<Self, AdminError> {
        match &cfg.key_store {
            KeyStoreConfig::File { path, .. } => Ok(AdminStore::File(path.clone())),
            KeyStoreConfig::Redis => {
                let r = cfg.redis.as_ref().ok_or(AdminError::NoStore)?;
                let redis = Redis::connect(r)
                    .await
                    .map_err(|e| AdminError::Unavailable(e.to_string()))?;
                if !redis.ping().await {
                    return Err(AdminError::Unavailable(format!(
                        "no answer from {}",
                        r.urls.join(", ")
                    )));
                }
                Ok(AdminStore::Redis(Box::new(redis)))
            }
            KeyStoreConfig::None => Err(AdminError::NoStore),
        }
    }

    pub async fn list(&self) -> Result<Vec<KeyRecord>, AdminError> {
        let mut all = match self {
            AdminStore::File(path) => read_file(path)?,
            AdminStore::Redis(r) => redis_all(r).await?,
        };
        all.sort_by(|a, b| {
            (a.tenant.as_str(), a.id.as_str()).cmp(&(b.tenant.as_str(), b.id.as_str()))
        });
        Ok(all)
    }

    pub async fn get(&self, id: &str) -> Result<KeyRecord, AdminError> {
        self.list()
            .await?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| AdminError::NotFound(id.to_owned()))
    }

    pub async fn create(&self, new: NewKey) -> Result<Created, AdminError> {
        if new.tenant.trim().is_empty() || new.tenant.contains(char::is_control) {
            return Err(AdminError::Invalid(
                "--tenant must be a non-empty string".into(),
            ));
        }
        if new.kind == KeyKind::Secret
            && (!new.allowed_origins.is_empty()
                || new.jwt_provider.is_some()
                || new.identity_platform_tenant.is_some())
        {
            return Err(AdminError::Invalid(
                "--allowed-origin, --jwt-provider and --identity-platform-tenant are for publishable keys".into(),
            ));
        }
        let key = ApiKey::generate(new.kind);
        let record = KeyRecord {
            id: format!("key_{}", random_base62(16)),
            hash: KeyHash::of(&key),
            kind: new.kind,
            tenant: new.tenant,
            scopes: new.scopes,
            rate_limit: new.rate_limit,
            status: KeyStatus::Active,
            expires_at: new.expires_at,
            name: new.name,
            created_at: Some(now_secs()),
            allowed_origins: new.allowed_origins,
            jwt_provider: new.jwt_provider,
            identity_platform_tenant: new.identity_platform_tenant,
        };
        match self {
            AdminStore::File(path) => update_file(path, |records| {
                records.push(record.clone());
                Ok(())
            })?,
            AdminStore::Redis(r) => redis_put(r, &record, KeyEventType::Created, true).await?,
        }
        Ok(Created { key, record })
    }

    pub async fn revoke(&self, id: &str) -> Result<KeyRecord, AdminError> {
        self.change(id, KeyEventType::Revoked, |r| r.status = KeyStatus::Revoked)
            .await
    }

    /// A new key with the same metadata; the old one keeps working for `grace`, then expires.
    pub async fn rotate(
        &self,
        id: &str,
        grace: Duration,
    ) -> Result<(Created, KeyRecord), AdminError> {
        let old = self.get(id).await?;
        if old.status != KeyStatus::Active {
            return Err(AdminError::Invalid(format!(
                "key `{id}` is revoked; create a new one instead"
            )));
        }
        let created = self
            .create(NewKey {
                tenant: old.tenant.clone(),
                kind: old.kind,
                scopes: old.scopes.clone(),
                rate_limit: old.rate_limit,
                expires_at: old.expires_at,
                name: old.name.clone(),
                allowed_origins: old.allowed_origins.clone(),
                jwt_provider: old.jwt_provider.clone(),
                identity_platform_tenant: old.identity_platform_tenant.clone(),
            })
            .await?;
        let until = now_secs() + grace.as_secs();
        let old = self
            .change(id, KeyEventType::Updated, |r| {
                r.expires_at = Some(r.expires_at.map_or(until, |e| e.min(until)));
            })
            .await?;
        Ok((created, old))
    }

    async fn change(
        &self,
        id: &str,
        event: KeyEventType,
        f: impl Fn(&mut KeyRecord),
    ) -> Result<KeyRecord, AdminError> {
        match self {
            AdminStore::File(path) => {
                let mut changed = None;
                update_file(path, |records| {
                    let r = records
                        .iter_mut()
                        .find(|r| r.id == id)
                        .ok_or_else(|| AdminError::NotFound(id.to_owned()))?;
                    f(r);
                    changed = Some(r.clone());
                    Ok(())
                })?;
                Ok(changed.expect("set by the update"))
            }
            AdminStore::Redis(redis) => {
                let mut r = self.get(id).await?;
                f(&mut r);
                redis_put(redis, &r, event, false).await?;
                Ok(r)
            }
        }
    }
}

// === file store ===

fn read_file(path: &Path) -> Result<Vec<KeyRecord>, AdminError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AdminError::Unavailable(format!("{}: {e}", path.display()))),
    };
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    // Read as the daemon reads it, so both agree on what the file says.
    let file =
        parse_file(&text).map_err(|e| AdminError::Invalid(format!("{}: {e}", path.display())))?;
    parse_entries(&file.keys).map_err(|errs| {
        AdminError::Invalid(format!(
            "{}: {}",
            path.display(),
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        ))
    })
}

/// Read-modify-write under an exclusive lock on `<file>.lock`, written to a temporary file and
/// renamed over the original: a reader (the daemon) sees the old file or the new, never half, and
/// concurrent writers queue instead of losing each other's keys.
fn update_file(
    path: &Path,
    f: impl FnOnce(&mut Vec<KeyRecord>) -> Result<(), AdminError>,
) -> Result<(), AdminError> {
    let write_err = |e: std::io::Error| AdminError::Write(format!("{}: {e}", path.display()));
    let lock_path = path.with_extension(format!(
        "{}lock",
        path.extension()
            .map(|e| format!("{}.", e.to_string_lossy()))
            .unwrap_or_default()
    ));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(write_err)?;
    lock.lock().map_err(write_err)?;

    let mut records = read_file(path)?;
    f(&mut records)?;
    let file = KeyFile {
        keys: records.iter().map(KeyFileEntry::from_record).collect(),
    };
    let json = path.extension().is_some_and(|e| e == "json");
    let text = if json {
        serde_json::to_string_pretty(&file).map_err(|e| AdminError::Write(e.to_string()))? + "\n"
    } else {
        format!(
            "# Written by `gybc-authz keys` (comments are not kept): hashes only, never a key.\n{}",
            serde_yaml_ng::to_string(&file).map_err(|e| AdminError::Write(e.to_string()))?
        )
    };
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    {
        use std::io::Write;
        let mut out = File::create(&tmp).map_err(write_err)?;
        out.write_all(text.as_bytes()).map_err(write_err)?;
        out.sync_all().map_err(write_err)?;
    }
    std::fs::rename(&tmp, path).map_err(write_err)?;
    drop(lock);
    Ok(())
}

// === Redis ===

async fn redis_put(
    redis: &Redis,
    r: &KeyRecord,
    event: KeyEventType,
    create: bool,
) -> Result<(), AdminError> {
    let mut conn = redis.conn.clone();
    let unavailable = |e: redis::RedisError| AdminError::Unavailable(e.to_string());
    let mut set = redis::cmd("SET");
    set.arg(redis.names.key(&r.hash)).arg(encode_record(r));
    if create {
        set.arg("NX");
    }
    let written: Option<String> = set.query_async(&mut conn).await.map_err(unavailable)?;
    if written.is_none() {
        return Err(AdminError::Write(
            "a record with this hash exists already".into(),
        ));
    }
    // After the write: a replica hearing the event reads the new record.
    let _: i64 = redis::cmd("PUBLISH")
        .arg(redis.names.events_channel())
        .arg(encode_event(&r.hash, event))
        .query_async(&mut conn)
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// Every record: SCAN over each master (every node of a cluster, found through CLUSTER SLOTS).
async fn redis_all(redis: &Redis) -> Result<Vec<KeyRecord>, AdminError> {
    let unavailable = |e: redis::RedisError| AdminError::Unavailable(e.to_string());
    let pattern = format!(
        "{}*",
        redis.names.key(&KeyHash([0; 32])).trim_end_matches('0')
    );
    let mut names = Vec::new();
    for client in masters(redis).await? {
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(unavailable)?;
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            names.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    let mut conn = redis.conn.clone();
    let mut out = Vec::new();
    for name in names {
        let Some(hash) = name.rsplit(':').next().and_then(KeyHash::parse) else {
            continue;
        };
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if let Some(rec) = bytes.and_then(|b| decode_record(&b, &hash).ok()) {
            out.push(rec);
        }
    }
    Ok(out)
}

async fn masters(redis: &Redis) -> Result<Vec<redis::Client>, AdminError> {
    let unavailable = |e: redis::RedisError| AdminError::Unavailable(e.to_string());
    match &redis.conn {
        crate::redis_conn::RedisConn::Single(_) => Ok(vec![redis.pubsub_client.clone()]),
        crate::redis_conn::RedisConn::Cluster(_) => {
            let mut conn = redis.conn.clone();
            let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let base = redis.pubsub_client.get_connection_info().clone();
            let mut clients = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            for slot in slots {
                let redis::Value::Array(parts) = slot else {
                    continue;
                };
                let Some(redis::Value::Array(master)) = parts.get(2) else {
                    continue;
                };
                let host = match master.first() {
                    Some(redis::Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                    _ => continue,
                };
                let port = match master.get(1) {
                    Some(redis::Value::Int(p)) => *p as u16,
                    _ => continue,
                };
                if seen.insert((host.clone(), port)) {
                    let addr = match base.addr() {
                        redis::ConnectionAddr::TcpTls {
                            insecure,
                            tls_params,
                            ..
                        } => redis::ConnectionAddr::TcpTls {
                            host,
                            port,
                            insecure: *insecure,
                            tls_params: tls_params.clone(),
                        },
                        _ => redis::ConnectionAddr::Tcp(host, port),
                    };
                    let info = base.clone().set_addr(addr);
                    clients.push(redis::Client::open(info).map_err(unavailable)?);
                }
            }
            Ok(clients)
        }
    }
}
