//! The file key store: a YAML or JSON file of key records (hashes only), checked for changes on an
//! interval and swapped in whole when it parses. A bad edit keeps the last good set serving. The
//! store is an in-memory table of compact `Key`s, looked up directly: nothing caches it again.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hashbrown::HashTable;
use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use tokio::sync::watch;

use super::{Found, Interner, KeyData, KeyRecord, KeyStatus, StoreKind};
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

/// The keys of a key file in blocks of 4,096, found through a table of their positions: no
/// allocation and no pointer per key. A key costs its 72 bytes, its id's bytes in its block's
/// buffer, and 4 bytes a slot of the table (plus a control byte, at a load of 44–88 %).
pub struct Table {
    keys: Blocks,
    index: HashTable<u32>,
}

/// A key hash is SHA-256 output, already uniform: its first 8 bytes are a table hash as good as
/// any, without a hasher's work on every lookup. Flooding is no concern here: the table is built
/// from the operator's file, and a request can only look up, never insert.
fn slot_hash(hash: &KeyHash) -> u64 {
    let (prefix, _) = hash.0.split_first_chunk::<8>().expect("32 bytes");
    u64::from_le_bytes(*prefix)
}

impl Table {
    /// The position of the key with this hash.
    pub fn find(&self, hash: &KeyHash) -> Option<u32> {
        self.index
            .find(slot_hash(hash), |&at| self.keys.get(at).hash() == hash)
            .copied()
    }

    pub fn key(&self, at: u32) -> &KeyData {
        self.keys.get(at)
    }

    pub fn id(&self, at: u32) -> &str {
        self.keys.id(at)
    }

    pub fn len(&self) -> usize {
        self.keys.len
    }

    pub fn is_empty(&self) -> bool {
        self.keys.len == 0
    }
}

const BLOCK_BITS: u32 = 12;
const BLOCK: usize = 1 << BLOCK_BITS;

/// Keys in blocks of `BLOCK`, filled in order: growing never copies the keys held, and a load
/// never holds room for more than one block of keys it does not keep (a single vector would
/// double, copying, or be sized by a guess). Each block holds its keys' ids in one string, each
/// key its id's place there: an id in an allocation of its own cost 64 bytes a key (the
/// pointer, the count and the allocator's rounding) for a 20-byte id.
#[derive(Default)]
struct Blocks {
    blocks: Vec<Block>,
    len: usize,
}

struct Block {
    keys: Vec<KeyData>,
    ids: String,
}

impl Blocks {
    fn get(&self, at: u32) -> &KeyData {
        &self.blocks[(at >> BLOCK_BITS) as usize].keys[at as usize & (BLOCK - 1)]
    }

    fn id(&self, at: u32) -> &str {
        let block = &self.blocks[(at >> BLOCK_BITS) as usize];
        let key = &block.keys[at as usize & (BLOCK - 1)];
        let start = key.id_at as usize;
        &block.ids[start..start + key.id_len as usize]
    }

    /// Puts `key` at `at` with its id in the block's buffer. Ids of at most 4 GiB a block: one
    /// is a file's line, a block 4,096 of them.
    fn set(&mut self, at: u32, mut key: KeyData, id: &str) {
        let block = &mut self.blocks[(at >> BLOCK_BITS) as usize];
        block.place_id(&mut key, id);
        block.keys[at as usize & (BLOCK - 1)] = key;
    }

    fn push(&mut self, mut key: KeyData, id: &str) {
        if self.blocks.last().is_none_or(|b| b.keys.len() == BLOCK) {
            // The full block's buffer gives back the room it did not fill.
            if let Some(full) = self.blocks.last_mut() {
                full.ids.shrink_to_fit();
            }
            self.blocks.push(Block {
                keys: Vec::with_capacity(BLOCK),
                ids: String::new(),
            });
        }
        let block = self.blocks.last_mut().expect("pushed above");
        block.place_id(&mut key, id);
        block.keys.push(key);
        self.len += 1;
    }
}

impl Block {
    /// Appends `id` to the block's buffer and tells `key` where it is.
    fn place_id(&mut self, key: &mut KeyData, id: &str) {
        key.id_at = u32::try_from(self.ids.len()).expect("ids of a block under 4 GiB");
        key.id_len = u32::try_from(id.len()).expect("an id under 4 GiB");
        self.ids.push_str(id);
    }
}

/// Builds a `Table` key by key, without a copy: the keys go straight into their blocks, and the
/// positions into the table that will serve them.
#[derive(Default)]
struct TableBuilder {
    keys: Blocks,
    index: HashTable<u32>,
}

impl TableBuilder {
    /// Where a key with this hash already is.
    fn find(&self, hash: &KeyHash) -> Option<u32> {
        self.index
            .find(slot_hash(hash), |&at| self.keys.get(at).hash() == hash)
            .copied()
    }

    /// Adds `key` with its id, or replaces the key with the same hash (its old id stays in the
    /// block's buffer, unused: only a store built from records replaces keys).
    fn put(&mut self, key: KeyData, id: &str) {
        if let Some(at) = self.find(key.hash()) {
            self.keys.set(at, key, id);
            return;
        }
        let at = u32::try_from(self.keys.len).expect("fewer than 2³² keys");
        let keys = &self.keys;
        self.index.insert_unique(slot_hash(key.hash()), at, |&a| {
            slot_hash(keys.get(a).hash())
        });
        self.keys.push(key, id);
    }

    fn build(mut self) -> Table {
        // The last block gives back the room it did not fill.
        if let Some(last) = self.keys.blocks.last_mut() {
            last.keys.shrink_to_fit();
            last.ids.shrink_to_fit();
        }
        Table {
            keys: self.keys,
            index: self.index,
        }
    }
}

pub struct FileStore {
    kind: StoreKind,
    path: PathBuf,
    table: ArcSwap<Table>,
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
        let table = load(path)?;
        let (changed, _) = watch::channel(0);
        Ok(Self {
            kind: StoreKind::File,
            path: path.to_owned(),
            table: ArcSwap::from_pointee(table),
            stamp: std::sync::Mutex::new(Some(st)),
            changed,
        })
    }

    /// A store over records built in memory (dev mode, tests); `reload` never changes it. A later
    /// record replaces an earlier one with the same hash.
    pub fn from_records(records: Vec<KeyRecord>) -> Self {
        let (changed, _) = watch::channel(0);
        let store = Self {
            kind: StoreKind::Memory,
            path: PathBuf::new(),
            table: ArcSwap::from_pointee(TableBuilder::default().build()),
            stamp: std::sync::Mutex::new(None),
            changed,
        };
        store.replace_records(&records);
        store
    }

    /// Serves `records` from now on, in place of the whole set: how dev mode's key service
    /// changes a store built in memory.
    pub fn replace_records(&self, records: &[KeyRecord]) {
        let mut interner = Interner::default();
        let mut table = TableBuilder::default();
        for r in records {
            table.put(interner.data(r), &r.id);
        }
        self.table.store(Arc::new(table.build()));
        self.changed.send_modify(|g| *g += 1);
    }

    /// `File` when loaded from a file, `Memory` when built in memory.
    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    /// The key with this hash, shared with the table that holds it (no copy).
    pub fn get(&self, hash: &KeyHash) -> Option<Found> {
        let table = self.table.load();
        let at = table.find(hash)?;
        Some(Found::InTable(arc_swap::Guard::into_inner(table), at))
    }

    pub fn len(&self) -> usize {
        self.table.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ticks after every successful reload.
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
        let table = load(&self.path)?;
        self.table.store(Arc::new(table));
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

/// The key file's table. JSON (what large key sets are written as) is read from the file through
/// a small buffer, one entry at a time, each turned into its compact `Key` in the table's own
/// blocks before the next is read: loading never holds the file's text, nor its entries, nor a
/// second copy of the keys (what a host's allocator would keep after a load). YAML is read whole,
/// as `parse_file` reads it.
fn load(path: &Path) -> Result<Table, KeyFileError> {
    let read = |source| KeyFileError::Read {
        path: path.display().to_string(),
        source,
    };
    let invalid = |errors| KeyFileError::Invalid {
        path: path.display().to_string(),
        errors: ErrorList(errors),
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut reader = BufReader::with_capacity(64 << 10, file);
    if opens_with_brace(&mut reader).map_err(read)? {
        let mut loader = Loader::default();
        match stream_json(reader, &mut |i, e| loader.add(i, e)) {
            Ok(true) => return loader.finish().map_err(invalid),
            Ok(false) => {}
            Err(e) => return Err(invalid(vec![e])),
        }
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    load_yaml(&text).map_err(invalid)
}

/// Whether the first character after any whitespace is `{` (consuming only the whitespace).
fn opens_with_brace(reader: &mut impl BufRead) -> std::io::Result<bool> {
    loop {
        let buf = reader.fill_buf()?;
        let Some(first) = buf.iter().position(|b| !b.is_ascii_whitespace()) else {
            if buf.is_empty() {
                return Ok(false);
            }
            let n = buf.len();
            reader.consume(n);
            continue;
        };
        let brace = buf[first] == b'{';
        reader.consume(first);
        return Ok(brace);
    }
}

/// The table of a key file's text, read as `load` reads the file (tests compare it with
/// `parse_file`).
#[cfg(test)]
fn load_text(text: &str) -> Result<Table, Vec<FieldError>> {
    if text.trim_start().starts_with('{') {
        let mut loader = Loader::default();
        match stream_json(text.as_bytes(), &mut |i, e| loader.add(i, e)) {
            Ok(true) => return loader.finish(),
            Ok(false) => {}
            Err(e) => return Err(vec![e]),
        }
    }
    load_yaml(text)
}

fn load_yaml(text: &str) -> Result<Table, Vec<FieldError>> {
    let file = parse_yaml(text).map_err(|e| vec![e])?;
    let mut loader = Loader::default();
    for (i, e) in file.keys.into_iter().enumerate() {
        loader.add(i, e);
    }
    loader.finish()
}

/// Builds the table entry by entry, collecting every problem with its position in file order.
/// Duplicates are found as entries arrive: a hash in the table being built, an id in a table of
/// positions (4 bytes a key, dropped with the loader).
#[derive(Default)]
struct Loader {
    interner: Interner,
    table: TableBuilder,
    /// Ids of the keys in `table`, as positions there.
    ids: HashTable<u32>,
    /// Ids of entries that are not in `table` (their hash did not parse, or was a duplicate):
    /// they still count for duplicate ids. Only a broken file has any.
    other_ids: HashSet<String>,
    pick: foldhash::fast::RandomState,
    errs: Vec<(usize, FieldError)>,
}

impl Loader {
    fn add(&mut self, i: usize, entry: KeyFileEntry) {
        let err = |errs: &mut Vec<_>, field: &str, message: String| {
            errs.push((
                i,
                FieldError {
                    path: format!("keys[{i}].{field}"),
                    message,
                },
            ))
        };
        let record = check_entry(i, entry, &mut self.errs);
        let id = match &record {
            Ok(r) => r.id.as_str(),
            Err(id) => id.as_str(),
        };
        let keys = &self.table.keys;
        let id_hash = self.pick.hash_one(id);
        let dup_id = !id.trim().is_empty()
            && (self.ids.find(id_hash, |&at| keys.id(at) == id).is_some()
                || self.other_ids.contains(id));
        if dup_id {
            err(&mut self.errs, "id", format!("duplicate id `{id}`"));
        }
        let record = match record {
            Ok(r) if self.table.find(&r.hash).is_some() => {
                err(&mut self.errs, "hash", "duplicate hash".into());
                Err(r.id)
            }
            other => other,
        };
        match record {
            Ok(r) => {
                let at = self.table.keys.len as u32;
                self.table.put(self.interner.data(&r), &r.id);
                if !dup_id {
                    let keys = &self.table.keys;
                    let pick = &self.pick;
                    self.ids
                        .insert_unique(id_hash, at, |&a| pick.hash_one(keys.id(a)));
                }
            }
            Err(id) => {
                if !dup_id {
                    self.other_ids.insert(id);
                }
            }
        }
    }

    fn finish(self) -> Result<Table, Vec<FieldError>> {
        if !self.errs.is_empty() {
            return Err(sorted(self.errs));
        }
        Ok(self.table.build())
    }
}

/// Feeds each entry of a JSON key file to `each`. `Ok(false)`: the text is not JSON (a YAML flow
/// mapping, say), for YAML to judge; entries fed before that are to be discarded.
fn stream_json(
    reader: impl std::io::Read,
    each: &mut dyn FnMut(usize, KeyFileEntry),
) -> Result<bool, FieldError> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut track = serde_path_to_error::Track::new();
    let read =
        FileSeed(each).deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track));
    match read {
        // Trailing text after the object: not JSON.
        Ok(()) => Ok(de.end().is_ok()),
        // Valid JSON with the wrong content: JSON's own error names the field.
        Err(e) if e.is_data() => Err(FieldError {
            path: track.path().to_string(),
            message: e.to_string(),
        }),
        Err(_) => Ok(false),
    }
}

/// The top of a key file, `{"keys": [...]}`, read as `KeyFile` reads it (`keys` optional, no
/// other field), handing each entry on as soon as it is read.
struct FileSeed<'f>(&'f mut dyn FnMut(usize, KeyFileEntry));

impl<'de> DeserializeSeed<'de> for FileSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_struct("KeyFile", &["keys"], self)
    }
}

impl<'de> Visitor<'de> for FileSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("struct KeyFile")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = false;
        while map.next_key::<KeysField>()?.is_some() {
            if seen {
                return Err(A::Error::duplicate_field("keys"));
            }
            seen = true;
            map.next_value_seed(EntriesSeed(&mut *self.0))?;
        }
        Ok(())
    }
}

/// The one field of a key file. Any other name is refused while the name is read, as a derived
/// `deny_unknown_fields` refuses it, so the error names the field the same way.
struct KeysField;

impl<'de> Deserialize<'de> for KeysField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_identifier(KeysField)
    }
}

impl Visitor<'_> for KeysField {
    type Value = KeysField;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("field identifier")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<KeysField, E> {
        match v {
            "keys" => Ok(KeysField),
            other => Err(E::unknown_field(other, &["keys"])),
        }
    }
}

struct EntriesSeed<'f>(&'f mut dyn FnMut(usize, KeyFileEntry));

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while let Some(entry) = seq.next_element::<KeyFileEntry>()? {
            (self.0)(i, entry);
            i += 1;
        }
        Ok(())
    }
}

/// The file's text as a `KeyFile`. JSON is YAML, so the YAML parser reads both, but it is the slow
/// part of loading a large file (libyaml buffers every event of the document first: most of a
/// 1M-key load). A document that opens with `{` is read as JSON first; only when it is not JSON
/// at all (a YAML flow mapping, say) does the YAML parser see it.
pub fn parse_file(text: &str) -> Result<KeyFile, FieldError> {
    if text.trim_start().starts_with('{') {
        // Read as the store reads a file (through `io::Read`), so an error names the same line
        // and column here as in the daemon's log.
        let mut de = serde_json::Deserializer::from_reader(text.as_bytes());
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
    parse_yaml(text)
}

fn parse_yaml(text: &str) -> Result<KeyFile, FieldError> {
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
    let mut at = Vec::with_capacity(entries.len());
    let mut unhashed = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match check_entry(i, e.clone(), &mut errs) {
            Ok(r) => {
                out.push(r);
                at.push(i);
            }
            Err(id) => unhashed.push((i, id)),
        }
    }
    duplicates(
        at.iter()
            .zip(&out)
            .map(|(&i, r)| (i, r.id.as_str(), &r.hash)),
        &unhashed,
        &mut errs,
    );
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(sorted(errs))
    }
}

/// One entry's own checks, and its record; only its id when its hash does not parse (the id
/// still takes part in the search for duplicates).
fn check_entry(
    i: usize,
    e: KeyFileEntry,
    errs: &mut Vec<(usize, FieldError)>,
) -> Result<KeyRecord, String> {
    let mut err = |field: &str, message: String| {
        errs.push((
            i,
            FieldError {
                path: format!("keys[{i}].{field}"),
                message,
            },
        ))
    };
    if e.id.trim().is_empty() {
        err("id", "must not be empty".into());
    }
    let hash = KeyHash::parse(&e.hash);
    if hash.is_none() {
        err("hash", "must be sha256:<64 hex digits>".into());
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
    let Some(hash) = hash else { return Err(e.id) };
    Ok(KeyRecord {
        id: e.id,
        hash,
        kind: e.kind,
        tenant: e.tenant,
        scopes: e.scopes,
        rate_limit: e.rate_limit,
        status: e.status,
        expires_at,
        name: e.name,
        created_at,
        allowed_origins: e.allowed_origins,
        jwt_provider: e.jwt_provider,
        identity_platform_tenant: e.identity_platform_tenant,
    })
}

/// Reports every id and hash used by an earlier entry too. `keys` and `unhashed` are each in
/// file order.
fn duplicates<'a>(
    keys: impl ExactSizeIterator<Item = (usize, &'a str, &'a KeyHash)>,
    unhashed: &'a [(usize, String)],
    errs: &mut Vec<(usize, FieldError)>,
) {
    let mut ids = HashSet::with_capacity(keys.len() + unhashed.len());
    let mut hashes = HashSet::with_capacity(keys.len());
    let mut keys = keys.peekable();
    let mut unhashed = unhashed.iter().peekable();
    // Both lists merged back into file order, so the later of two equal ids is the one reported.
    let next = std::iter::from_fn(|| match (keys.peek(), unhashed.peek()) {
        (Some(&(k, ..)), Some(&&(u, _))) if u < k => {
            unhashed.next().map(|(i, id)| (*i, id.as_str(), None))
        }
        (Some(_), _) => keys.next().map(|(i, id, h)| (i, id, Some(h))),
        (None, _) => unhashed.next().map(|(i, id)| (*i, id.as_str(), None)),
    });
    for (i, id, hash) in next {
        if !id.trim().is_empty() && !ids.insert(id) {
            errs.push((
                i,
                FieldError {
                    path: format!("keys[{i}].id"),
                    message: format!("duplicate id `{id}`"),
                },
            ));
        }
        if let Some(hash) = hash
            && !hashes.insert(hash)
        {
            errs.push((
                i,
                FieldError {
                    path: format!("keys[{i}].hash"),
                    message: "duplicate hash".into(),
                },
            ));
        }
    }
}

/// Errors in file order (a stable sort keeps each entry's own order).
fn sorted(mut errs: Vec<(usize, FieldError)>) -> Vec<FieldError> {
    errs.sort_by_key(|(i, _)| *i);
    errs.into_iter().map(|(_, e)| e).collect()
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
        let rec = store.get(&KeyHash::of(&key)).unwrap();
        assert_eq!(rec.id(), "k1");
        assert_eq!(&**rec.tenant(), "t1");
        assert!(rec.scopes().contains("users:impersonate"));
        assert_eq!(rec.rate_limit(), Some("5/1s".parse().unwrap()));
        assert_eq!(rec.expires_at(), Some(1_893_456_000));
        assert!(store.get(&KeyHash::of("sk_other")).is_none());

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
        let rec = store.get(&KeyHash::of(&key)).unwrap();
        assert_eq!(rec.kind(), KeyKind::Publishable);
        assert_eq!(
            &*rec.publishable().unwrap().allowed_origins,
            ["https://app.example".to_owned()]
        );
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

    /// The store reads JSON one entry at a time; it must mean what `parse_file` + `parse_entries`
    /// (the key commands' reading) mean, errors included.
    #[test]
    fn streamed_loading_agrees_with_reading_the_whole_file() {
        let (a, b) = (KeyHash::of("sk_a").to_hex(), KeyHash::of("sk_b").to_hex());
        let entry = |id: &str, hash: &str, extra: &str| {
            format!(
                r#"{{"id":"{id}","hash":"sha256:{hash}","kind":"secret","tenant":"t1"{extra}}}"#
            )
        };
        let texts = [
            format!(
                r#"{{"keys":[{},{}]}}"#,
                entry(
                    "k1",
                    &a,
                    r#","scopes":["x","y"],"rate_limit":"5/1s","name":"n""#
                ),
                entry(
                    "k2",
                    &b,
                    r#","status":"revoked","expires_at":"2030-01-01T00:00:00Z""#
                )
            ),
            "{}".to_owned(),
            r#"{"keys":[]}"#.to_owned(),
            // Not JSON: a YAML flow mapping, and JSON with trailing text.
            format!("{{keys: [{{id: k1, hash: 'sha256:{a}', kind: secret, tenant: t1}}]}}"),
            format!(r#"{{"keys":[{}]}} trailing"#, entry("k1", &a, "")),
            // Refused, each naming the place.
            r#"{"keys":null}"#.to_owned(),
            r#"{"keys":[],"colour":"red"}"#.to_owned(),
            r#"{"keys":[],"keys":[]}"#.to_owned(),
            format!(
                r#"{{"keys":[{},{{"id":"k","colour":"red"}}]}}"#,
                entry("k1", &a, "")
            ),
            format!(
                r#"{{"keys":[{},{}]}}"#,
                entry("k1", &a, ""),
                entry("k1", &a, "")
            ),
            format!(
                r#"{{"keys":[{},{}]}}"#,
                entry("", &a, r#","allowed_origins":["x"]"#),
                entry("k2", "00", r#","expires_at":"soon""#)
            ),
        ];
        for text in &texts {
            let whole = parse_file(text)
                .map_err(|e| vec![e])
                .and_then(|f| parse_entries(&f.keys));
            let streamed = load_text(text);
            match (whole, streamed) {
                (Ok(records), Ok(table)) => {
                    assert_eq!(records.len(), table.len(), "{text}");
                    let mut interner = Interner::default();
                    for r in &records {
                        let got = table.find(&r.hash).expect("every record in the table");
                        // Where the table put the id is its own business; the id is compared
                        // below.
                        let mut key = table.key(got).clone();
                        (key.id_at, key.id_len) = (0, 0);
                        assert_eq!(key, interner.data(r), "{text}");
                        assert_eq!(table.id(got), r.id, "{text}");
                    }
                }
                (Err(want), Err(got)) => {
                    let show =
                        |e: &[FieldError]| e.iter().map(|e| e.to_string()).collect::<Vec<_>>();
                    assert_eq!(show(&want), show(&got), "{text}");
                }
                (w, g) => panic!("{text}: whole {:?}, streamed {:?}", w.is_ok(), g.is_ok()),
            }
        }
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
        assert!(store.get(&KeyHash::of(&b)).is_some());

        std::fs::write(&tmp, "keys: [ {broken").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert!(store.reload_if_changed().is_err());
        assert!(!changes.has_changed().unwrap());
        assert!(
            store.get(&KeyHash::of(&b)).is_some(),
            "last good set keeps serving"
        );
    }
}
