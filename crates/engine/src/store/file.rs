//! The file key store: a YAML or JSON file of key records (hashes only), checked for changes on an
//! interval and swapped in whole when it parses. A bad edit keeps the last good set serving.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{KeyRecord, KeyStatus, KeyStore, StoreError};
use crate::authn::apikey::{KeyHash, KeyKind};
use crate::config::{ErrorList, FieldError};
use crate::ratelimit::RateLimit;

/// The file's layout.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    #[serde(default)]
    pub keys: Vec<KeyFileEntry>,
}

/// One key as written in the file. Times are RFC 3339 (`2027-01-31T00:00:00Z`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFileEntry {
    pub id: String,
    /// `sha256:<64 hex>` of the key.
    pub hash: String,
    pub kind: KeyKind,
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub status: KeyStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_platform_tenant: Option<String>,
}

impl KeyFileEntry {
    /// The file form of a record (times as RFC 3339, UTC).
    pub fn from_record(r: &KeyRecord) -> Self {
        let time = |t: u64| {
            humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(t))
                .to_string()
        };
        KeyFileEntry {
            id: r.id.clone(),
            hash: format!("sha256:{}", r.hash.to_hex()),
            kind: r.kind,
            tenant: r.tenant.clone(),
            scopes: r.scopes.clone(),
            rate_limit: r.rate_limit,
            status: r.status,
            expires_at: r.expires_at.map(time),
            name: r.name.clone(),
            created_at: r.created_at.map(time),
            allowed_origins: r.allowed_origins.clone(),
            jwt_provider: r.jwt_provider.clone(),
            identity_platform_tenant: r.identity_platform_tenant.clone(),
        }
    }
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path}: {errors}")]
    Invalid { path: String, errors: ErrorList },
}

type Index = HashMap<KeyHash, Arc<KeyRecord>>;

pub struct FileStore {
    path: PathBuf,
    index: ArcSwap<Index>,
    stamp: std::sync::Mutex<Option<FileStamp>>,
    changed: watch::Sender<u64>,
}

/// What tells a changed file apart without reading it: ConfigMap updates swap a symlink, which
/// changes all three.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    ino: u64,
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    let m = std::fs::metadata(path)?;
    Ok(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        #[cfg(unix)]
        ino: std::os::unix::fs::MetadataExt::ino(&m),
    })
}

impl FileStore {
    /// Loads the file; refuses to start on an unreadable or invalid file.
    pub fn open(path: &Path) -> Result<Self, KeyFileError> {
        let st = stamp(path).map_err(|source| KeyFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let index = load(path)?;
        let (changed, _) = watch::channel(0);
        Ok(Self {
            path: path.to_owned(),
            index: ArcSwap::from_pointee(index),
            stamp: std::sync::Mutex::new(Some(st)),
            changed,
        })
    }

    /// A store over records built in memory (dev mode, tests); `reload` never changes it.
    pub fn from_records(records: Vec<KeyRecord>) -> Self {
        let index = records.into_iter().map(|r| (r.hash, Arc::new(r))).collect();
        let (changed, _) = watch::channel(0);
        Self {
            path: PathBuf::new(),
            index: ArcSwap::from_pointee(index),
            stamp: std::sync::Mutex::new(None),
            changed,
        }
    }

    pub fn len(&self) -> usize {
        self.index.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ticks after every successful reload, so caches in front can drop what they hold.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Reloads when the file changed. `Ok(true)`: a new set is serving.
    pub fn reload_if_changed(&self) -> Result<bool, KeyFileError> {
        if self.path.as_os_str().is_empty() {
            return Ok(false);
        }
        let now = stamp(&self.path).map_err(|source| KeyFileError::Read {
            path: self.path.display().to_string(),
            source,
        })?;
        {
            let st = self.stamp.lock().expect("stamp lock");
            if st.as_ref() == Some(&now) {
                return Ok(false);
            }
        }
        // Record the stamp before parsing so a broken file is reported once, not every tick.
        *self.stamp.lock().expect("stamp lock") = Some(now);
        let index = load(&self.path)?;
        self.index.store(Arc::new(index));
        self.changed.send_modify(|g| *g += 1);
        Ok(true)
    }

    /// Polls the file until the returned task is aborted.
    pub fn spawn_watcher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(store) = store.upgrade() else { return };
                match store.reload_if_changed() {
                    Ok(true) => {
                        tracing::info!(keys = store.len(), path = %store.path.display(), "Key file reloaded.")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "Key file reload failed; the previous keys keep serving.")
                    }
                }
            }
        })
    }
}

impl KeyStore for FileStore {
    fn lookup<'a>(
        &'a self,
        hash: &'a KeyHash,
    ) -> BoxFuture<'a, Result<Option<Arc<KeyRecord>>, StoreError>> {
        let found = self.index.load().get(hash).cloned();
        Box::pin(futures_util::future::ready(Ok(found)))
    }
}

fn load(path: &Path) -> Result<Index, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let invalid = |errors: Vec<FieldError>| KeyFileError::Invalid {
        path: path.display().to_string(),
        errors: ErrorList(errors),
    };
    let file = parse_file(&text).map_err(|e| invalid(vec![e]))?;
    let records = parse_entries(&file.keys).map_err(invalid)?;
    Ok(records.into_iter().map(|r| (r.hash, Arc::new(r))).collect())
}

/// The file's text as a `KeyFile`. JSON is YAML, so the YAML parser reads both, but it is the slow
/// part of loading a large file (libyaml buffers every event of the document first: most of a
/// 1M-key load). A document that opens with `{` is read as JSON first; only when it is not JSON
/// at all (a YAML flow mapping, say) does the YAML parser see it.
fn parse_file(text: &str) -> Result<KeyFile, FieldError> {
    if text.trim_start().starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(text);
        match serde_path_to_error::deserialize::<_, KeyFile>(&mut de) {
            // Trailing text after the object: not JSON, so YAML judges it below.
            Ok(file) if de.end().is_ok() => return Ok(file),
            Ok(_) => {}
            // Valid JSON with the wrong content: JSON's own error names the field.
            Err(e) if e.inner().is_data() => {
                return Err(FieldError {
                    path: e.path().to_string(),
                    message: e.into_inner().to_string(),
                });
            }
            Err(_) => {}
        }
    }
    serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text)).map_err(|e| {
        FieldError {
            path: e.path().to_string(),
            message: e.into_inner().to_string(),
        }
    })
}

/// Checks every entry, collecting every problem with its position.
pub fn parse_entries(entries: &[KeyFileEntry]) -> Result<Vec<KeyRecord>, Vec<FieldError>> {
    let mut errs = Vec::new();
    let mut out = Vec::with_capacity(entries.len());
    let mut ids = HashSet::new();
    let mut hashes = HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        let mut err = |field: &str, message: String| {
            errs.push(FieldError {
                path: format!("keys[{i}].{field}"),
                message,
            })
        };
        if e.id.trim().is_empty() {
            err("id", "must not be empty".into());
        } else if !ids.insert(e.id.as_str()) {
            err("id", format!("duplicate id `{}`", e.id));
        }
        let hash = KeyHash::parse(&e.hash);
        match hash {
            None => err("hash", "must be sha256:<64 hex digits>".into()),
            Some(h) if !hashes.insert(h) => err("hash", "duplicate hash".into()),
            Some(_) => {}
        }
        if e.tenant.trim().is_empty() || e.tenant.contains(char::is_control) {
            err(
                "tenant",
                "must be a non-empty string without control characters".into(),
            );
        }
        let expires_at = parse_time(e.expires_at.as_deref()).unwrap_or_else(|m| {
            err("expires_at", m);
            None
        });
        let created_at = parse_time(e.created_at.as_deref()).unwrap_or_else(|m| {
            err("created_at", m);
            None
        });
        if e.kind == KeyKind::Secret {
            if !e.allowed_origins.is_empty() {
                err(
                    "allowed_origins",
                    "only publishable keys have allowed origins".into(),
                );
            }
            if e.jwt_provider.is_some() {
                err(
                    "jwt_provider",
                    "only publishable keys name a JWT provider".into(),
                );
            }
            if e.identity_platform_tenant.is_some() {
                err(
                    "identity_platform_tenant",
                    "only publishable keys name an Identity Platform tenant".into(),
                );
            }
        }
        if let Some(h) = hash {
            out.push(KeyRecord {
                id: e.id.clone(),
                hash: h,
                kind: e.kind,
                tenant: e.tenant.clone(),
                scopes: e.scopes.clone(),
                rate_limit: e.rate_limit,
                status: e.status,
                expires_at,
                name: e.name.clone(),
                created_at,
                allowed_origins: e.allowed_origins.clone(),
                jwt_provider: e.jwt_provider.clone(),
                identity_platform_tenant: e.identity_platform_tenant.clone(),
            });
        }
    }
    if errs.is_empty() { Ok(out) } else { Err(errs) }
}

fn parse_time(s: Option<&str>) -> Result<Option<u64>, String> {
    let Some(s) = s else { return Ok(None) };
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("`{s}` is not an RFC 3339 time: {e}"))?
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| Some(d.as_secs()))
        .map_err(|_| format!("`{s}` is before 1970"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::apikey::ApiKey;

    fn entry_yaml(id: &str, key: &str, extra: &str) -> String {
        format!(
            "  - id: {id}\n    hash: sha256:{}\n    kind: secret\n    tenant: t1\n{extra}",
            KeyHash::of(key).to_hex()
        )
    }

    #[tokio::test]
    async fn loads_yaml_and_json_and_looks_up_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let key = ApiKey::generate(KeyKind::Secret);
        let yaml = dir.path().join("keys.yaml");
        std::fs::write(
            &yaml,
            format!(
                "keys:\n{}",
                entry_yaml("k1", &key, "    scopes: [users:impersonate]\n    rate_limit: 5/1s\n    expires_at: 2030-01-01T00:00:00Z\n")
            ),
        )
        .unwrap();
        let store = FileStore::open(&yaml).unwrap();
        let rec = store.lookup(&KeyHash::of(&key)).await.unwrap().unwrap();
        assert_eq!(rec.id, "k1");
        assert_eq!(rec.tenant, "t1");
        assert!(rec.has_scope("users:impersonate"));
        assert_eq!(rec.rate_limit, Some("5/1s".parse().unwrap()));
        assert_eq!(rec.expires_at, Some(1_893_456_000));
        assert!(
            store
                .lookup(&KeyHash::of("sk_other"))
                .await
                .unwrap()
                .is_none()
        );

        let json = dir.path().join("keys.json");
        std::fs::write(
            &json,
            format!(
                r#"{{"keys":[{{"id":"k2","hash":"{}","kind":"publishable","tenant":"t2","allowed_origins":["https://app.example"]}}]}}"#,
                KeyHash::of(&key).to_hex()
            ),
        )
        .unwrap();
        let store = FileStore::open(&json).unwrap();
        let rec = store.lookup(&KeyHash::of(&key)).await.unwrap().unwrap();
        assert_eq!(rec.kind, KeyKind::Publishable);
        assert_eq!(rec.allowed_origins, vec!["https://app.example"]);
    }

    #[test]
    fn json_files_are_read_as_json_and_mean_what_they_mean_as_yaml() {
        let key = ApiKey::generate(KeyKind::Secret);
        let json = format!(
            r#"{{"keys":[{{"id":"k1","hash":"sha256:{}","kind":"secret","tenant":"t1","scopes":["a","b"],"rate_limit":"5/1s","expires_at":"2030-01-01T00:00:00Z"}}]}}"#,
            KeyHash::of(&key).to_hex()
        );
        let as_json = parse_file(&json).unwrap();
        let as_yaml: KeyFile = serde_yaml_ng::from_str(&json).unwrap();
        assert_eq!(
            parse_entries(&as_json.keys).unwrap(),
            parse_entries(&as_yaml.keys).unwrap()
        );
        // A YAML flow mapping opens with `{` too, but is not JSON.
        let flow = format!(
            "{{keys: [{{id: k1, hash: 'sha256:{}', kind: secret, tenant: t1}}]}}",
            KeyHash::of(&key).to_hex()
        );
        assert_eq!(parse_file(&flow).unwrap().keys[0].id, "k1");
        // Valid JSON with a wrong field is refused by JSON's reading, naming the field.
        let e = parse_file(r#"{"keys":[{"id":"k","colour":"red"}]}"#).unwrap_err();
        assert_eq!(e.path, "keys[0].colour");
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = parse_file(r#"{"keys":[{"id":"k","hash":"h","kind":"gold","tenant":"t"}]}"#)
            .unwrap_err();
        assert_eq!(e.path, "keys[0].kind");
    }

    #[test]
    fn invalid_files_report_every_problem_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.yaml");
        std::fs::write(
            &p,
            "keys:\n  - id: a\n    hash: nope\n    kind: secret\n    tenant: t\n    allowed_origins: [x]\n  - id: a\n    hash: sha256:00\n    kind: publishable\n    tenant: ''\n    expires_at: tomorrow\n",
        )
        .unwrap();
        let err = FileStore::open(&p).err().unwrap().to_string();
        for want in [
            "keys[0].hash",
            "keys[0].allowed_origins",
            "keys[1].id: duplicate id",
            "keys[1].hash",
            "keys[1].tenant",
            "keys[1].expires_at",
        ] {
            assert!(err.contains(want), "{want:?} missing from {err}");
        }
        std::fs::write(
            &p,
            "keys:\n  - id: a\n    hash: x\n    kind: secret\n    tenant: t\n    colour: red\n",
        )
        .unwrap();
        let err = FileStore::open(&p).err().unwrap().to_string();
        assert!(err.contains("keys[0]") && err.contains("colour"), "{err}");
    }

    #[tokio::test]
    async fn reloads_changes_and_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.yaml");
        let (a, b) = (
            ApiKey::generate(KeyKind::Secret),
            ApiKey::generate(KeyKind::Secret),
        );
        std::fs::write(&p, format!("keys:\n{}", entry_yaml("a", &a, ""))).unwrap();
        let store = FileStore::open(&p).unwrap();
        let mut changes = store.subscribe();
        assert!(!store.reload_if_changed().unwrap());

        // Written as a new file and renamed over the old one, as editors and ConfigMaps do.
        let tmp = dir.path().join("keys.tmp");
        std::fs::write(
            &tmp,
            format!(
                "keys:\n{}{}",
                entry_yaml("a", &a, ""),
                entry_yaml("b", &b, "")
            ),
        )
        .unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert!(store.reload_if_changed().unwrap());
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert!(store.lookup(&KeyHash::of(&b)).await.unwrap().is_some());

        std::fs::write(&tmp, "keys: [ {broken").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert!(store.reload_if_changed().is_err());
        assert!(!changes.has_changed().unwrap());
        assert!(
            store.lookup(&KeyHash::of(&b)).await.unwrap().is_some(),
            "last good set keeps serving"
        );
    }
}
