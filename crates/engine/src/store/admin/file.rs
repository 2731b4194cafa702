//! The key file as the key commands and the key service write it: read as the daemon reads it,
//! changed under an exclusive lock on `<file>.lock`, written to a temporary file and renamed over
//! the original. Idempotency records sit beside it in `<file>.idempotency.json`, under the same
//! lock: digests and key ids only, never a secret.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::{AdminError, IdemEntry, now_secs};
use crate::store::{KeyFile, KeyFileEntry, KeyRecord, parse_entries, parse_file};

pub(super) fn read(path: &Path) -> Result<Vec<KeyRecord>, AdminError> {
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

/// `<file>` + `suffix`, beside it (`keys.yaml` → `keys.yaml.lock`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> AdminError + '_ {
    move |e| AdminError::Write(format!("{}: {e}", path.display()))
}

/// Runs `f` holding the exclusive lock on `<file>.lock`: concurrent writers (commands, key-service
/// requests, replicas sharing the volume) queue instead of losing each other's changes.
fn locked<T>(path: &Path, f: impl FnOnce() -> Result<T, AdminError>) -> Result<T, AdminError> {
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(beside(path, ".lock"))
        .map_err(write_err(path))?;
    lock.lock().map_err(write_err(path))?;
    let out = f();
    drop(lock);
    out
}

/// Writes `text` to a temporary file and renames it over `path`: a reader (the daemon) sees the
/// old file or the new, never half of one.
fn replace(path: &Path, text: &str) -> Result<(), AdminError> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    {
        use std::io::Write;
        let mut out = File::create(&tmp).map_err(write_err(path))?;
        out.write_all(text.as_bytes()).map_err(write_err(path))?;
        out.sync_all().map_err(write_err(path))?;
    }
    std::fs::rename(&tmp, path).map_err(write_err(path))
}

/// Read-modify-write of the key file under the lock.
pub(super) fn update(
    path: &Path,
    f: impl FnOnce(&mut Vec<KeyRecord>) -> Result<(), AdminError>,
) -> Result<(), AdminError> {
    locked(path, || {
        let mut records = read(path)?;
        f(&mut records)?;
        let file = KeyFile {
            keys: records.iter().map(KeyFileEntry::from_record).collect(),
        };
        let json = path.extension().is_some_and(|e| e == "json");
        let text = if json {
            serde_json::to_string_pretty(&file).map_err(|e| AdminError::Write(e.to_string()))?
                + "\n"
        } else {
            format!(
                "# Written by `gybc-authz keys` (comments are not kept): hashes only, never a key.\n{}",
                serde_yaml_ng::to_string(&file).map_err(|e| AdminError::Write(e.to_string()))?
            )
        };
        replace(path, &text)
    })
}

// === idempotency records ===

type IdemFile = BTreeMap<String, IdemEntry>;

fn read_idem(path: &Path) -> Result<IdemFile, AdminError> {
    let file = beside(path, ".idempotency.json");
    match std::fs::read(&file) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| AdminError::Invalid(format!("{}: {e}", file.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IdemFile::new()),
        Err(e) => Err(AdminError::Unavailable(format!("{}: {e}", file.display()))),
    }
}

fn write_idem(path: &Path, mut records: IdemFile) -> Result<(), AdminError> {
    let now = now_secs();
    records.retain(|_, e| e.expires_at > now);
    // Nothing held: no file, so a claim that was released leaves the store as it found it.
    if records.is_empty() {
        return match std::fs::remove_file(beside(path, ".idempotency.json")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(write_err(path)(e)),
            _ => Ok(()),
        };
    }
    let text = serde_json::to_string(&records).map_err(|e| AdminError::Write(e.to_string()))?;
    replace(&beside(path, ".idempotency.json"), &text)
}

/// Claims `slot` for a request in progress, unless it is taken: then the record that holds it.
pub(super) fn claim(
    path: &Path,
    slot: &str,
    pending: &IdemEntry,
) -> Result<Option<IdemEntry>, AdminError> {
    locked(path, || {
        let mut records = read_idem(path)?;
        let now = now_secs();
        if let Some(e) = records.get(slot).filter(|e| e.expires_at > now) {
            return Ok(Some(e.clone()));
        }
        records.insert(slot.to_owned(), pending.clone());
        write_idem(path, records)?;
        Ok(None)
    })
}

/// Sets (`Some`) or frees (`None`) the record of `slot`.
pub(super) fn put_idem(
    path: &Path,
    slot: &str,
    entry: Option<&IdemEntry>,
) -> Result<(), AdminError> {
    locked(path, || {
        let mut records = read_idem(path)?;
        match entry {
            Some(e) => records.insert(slot.to_owned(), e.clone()),
            None => records.remove(slot),
        };
        write_idem(path, records)
    })
}
