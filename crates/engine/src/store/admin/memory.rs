//! Keys held in memory only (dev mode): the records behind a memory `FileStore`, changed under a
//! mutex and handed to that store whole, so the data path serves a change at once. Idempotency
//! records in a map beside them. Nothing is written to disk.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{AdminError, IdemEntry, now_secs};
use crate::store::{FileStore, KeyRecord};

pub struct MemoryAdmin {
    records: Mutex<Vec<KeyRecord>>,
    idempotency: Mutex<BTreeMap<String, IdemEntry>>,
    store: Arc<FileStore>,
}

impl MemoryAdmin {
    /// `records` must be what `store` was built from.
    pub fn new(store: Arc<FileStore>, records: Vec<KeyRecord>) -> Self {
        Self {
            records: Mutex::new(records),
            idempotency: Mutex::default(),
            store,
        }
    }

    pub(super) fn read(&self) -> Vec<KeyRecord> {
        self.records.lock().expect("records lock").clone()
    }

    pub(super) fn update(
        &self,
        f: impl FnOnce(&mut Vec<KeyRecord>) -> Result<(), AdminError>,
    ) -> Result<(), AdminError> {
        let mut records = self.records.lock().expect("records lock");
        let mut changed = records.clone();
        f(&mut changed)?;
        self.store.replace_records(&changed);
        *records = changed;
        Ok(())
    }

    pub(super) fn claim(&self, slot: &str, pending: &IdemEntry) -> Option<IdemEntry> {
        let mut map = self.idempotency.lock().expect("idempotency lock");
        let now = now_secs();
        map.retain(|_, e| e.expires_at > now);
        if let Some(e) = map.get(slot) {
            return Some(e.clone());
        }
        map.insert(slot.to_owned(), pending.clone());
        None
    }

    pub(super) fn put_idem(&self, slot: &str, entry: Option<&IdemEntry>) {
        let mut map = self.idempotency.lock().expect("idempotency lock");
        match entry {
            Some(e) => map.insert(slot.to_owned(), e.clone()),
            None => map.remove(slot),
        };
    }
}
