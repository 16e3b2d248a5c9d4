//! The node's state machine: every group's applied data in one redb database.
//!
//! redb is fast only for large sorted transactions (measured here: ~100K random 128 B inserts/s in 256-key
//! transactions, ~320K/s in sorted 32K-key ones), so applies do not go to redb one by one. They land in a
//! **memtable** — the last write of every key, plus each group's applied index — and a **flush** writes the whole
//! memtable in one sorted transaction with `Durability::Immediate`, together with the applied index of every
//! group it covers. A flush is therefore the durable checkpoint: what it wrote survives a crash, what the memtable
//! held does not. The WAL stays the source of truth: it may be compacted only below each group's
//! [`StateMachine::durable_applied`] index, and after a crash the raftstore replays the WAL from there.
//!
//! Reads merge the memtable over redb. Keys are the users' keys: a group's range is one contiguous key range.
//!
//! Tables: `data` (key → value), `apply_state` (group → applied index and term, 16 bytes), `ranges` (group →
//! encoded range descriptor, written by the raftstore).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::Path;

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::snapshot::{decode_chunk, encode_chunk, in_range, ChunkError, SnapshotChunkBody};

const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data");
const APPLY_STATE: TableDefinition<u64, [u8; 16]> = TableDefinition::new("apply_state");
const RANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("ranges");

fn staging_table_name(group_id: u64) -> String {
    format!("snapshot_staging_{group_id}")
}

/// One change to the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOp {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// The committed entries of one group applied in one go: their data changes and the index and term of the last.
#[derive(Clone, Debug, Default)]
pub struct GroupApply {
    pub group_id: u64,
    pub ops: Vec<KvOp>,
    pub applied_index: u64,
    pub applied_term: u64,
}

#[derive(Debug)]
pub enum StateMachineError {
    /// redb failed (a broken environment: the node must stop).
    Storage(String),
    /// An apply that goes backwards: a bug above the state machine.
    Invalid(String),
}

impl std::fmt::Display for StateMachineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateMachineError::Storage(what) => write!(f, "state machine storage error: {what}"),
            StateMachineError::Invalid(what) => write!(f, "invalid state machine operation: {what}"),
        }
    }
}

impl std::error::Error for StateMachineError {}

fn storage(error: impl std::fmt::Display) -> StateMachineError {
    StateMachineError::Storage(error.to_string())
}

/// Settings of the state machine.
#[derive(Clone, Debug)]
pub struct StateMachineOptions {
    /// The memtable is flushed once it holds this many bytes of keys and values. Larger means fewer, cheaper
    /// per key flushes (with random keys a flush rewrites most of the tree's leaves whatever its size) and more
    /// memory (about twice this) and longer WAL replay after a crash. Default 64 MiB.
    pub memtable_bytes_max: u64,
    /// redb's page cache. Default 1 GiB (redb's own default).
    pub cache_bytes: usize,
}

impl Default for StateMachineOptions {
    fn default() -> StateMachineOptions {
        StateMachineOptions { memtable_bytes_max: 64 << 20, cache_bytes: 1 << 30 }
    }
}

/// (applied index, applied term) of a group.
pub type AppliedState = (u64, u64);

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

#[derive(Default)]
struct Memtable {
    /// `None` is a deletion not yet flushed.
    data: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    applied: HashMap<u64, AppliedState>,
    bytes: u64,
}

/// The memtable taking applies, and the one being flushed (if a flush is under way). Reads see active, then
/// flushing, then redb.
#[derive(Default)]
struct Memtables {
    active: Memtable,
    flushing: Option<Arc<Memtable>>,
}

impl Memtables {
    fn get(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.active.data.get(key).or_else(|| self.flushing.as_ref().and_then(|f| f.data.get(key)))
    }

    fn applied(&self, group_id: u64) -> Option<AppliedState> {
        self.active.applied.get(&group_id).or_else(|| self.flushing.as_ref().and_then(|f| f.applied.get(&group_id))).copied()
    }
}

pub struct StateMachine {
    db: Database,
    options: StateMachineOptions,
    memtables: RwLock<Memtables>,
    /// One flush at a time.
    flush_lock: Mutex<()>,
    /// What the last flush made durable.
    durable: RwLock<HashMap<u64, AppliedState>>,
}

fn encode_applied((index, term): AppliedState) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&index.to_le_bytes());
    bytes[8..].copy_from_slice(&term.to_le_bytes());
    bytes
}

fn decode_applied(bytes: [u8; 16]) -> AppliedState {
    let index = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let term = u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes"));
    (index, term)
}

impl StateMachine {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path, options: StateMachineOptions) -> Result<StateMachine, StateMachineError> {
        let db = Database::builder().set_cache_size(options.cache_bytes).create(path).map_err(storage)?;
        StateMachine::from_database(db, options)
    }

    /// Opens a database on another storage backend (crash tests use [`crate::redb_sim::SimRedbBackend`]).
    pub fn open_with_backend(
        backend: impl redb::StorageBackend,
        options: StateMachineOptions,
    ) -> Result<StateMachine, StateMachineError> {
        let db = Database::builder().set_cache_size(options.cache_bytes).create_with_backend(backend).map_err(storage)?;
        StateMachine::from_database(db, options)
    }

    fn from_database(db: Database, options: StateMachineOptions) -> Result<StateMachine, StateMachineError> {
        let mut durable = HashMap::new();
        {
            let write = db.begin_write().map_err(storage)?;
            // Create the tables if this is a new database.
            write.open_table(DATA).map_err(storage)?;
            write.open_table(RANGES).map_err(storage)?;
            let table = write.open_table(APPLY_STATE).map_err(storage)?;
            for row in table.iter().map_err(storage)? {
                let (group, state) = row.map_err(storage)?;
                durable.insert(group.value(), decode_applied(state.value()));
            }
            drop(table);
            write.commit().map_err(storage)?;
        }
        Ok(StateMachine {
            db,
            options,
            memtables: RwLock::new(Memtables::default()),
            flush_lock: Mutex::new(()),
            durable: RwLock::new(durable),
        })
    }

    /// Applies many groups' committed entries. Returns whether the memtable is now over its budget (the caller
    /// should `flush`, off the apply path if it likes).
    pub fn apply(&self, batch: &[GroupApply]) -> Result<bool, StateMachineError> {
        let mut memtables = self.memtables.write();
        for group in batch {
            let current = memtables
                .applied(group.group_id)
                .or_else(|| self.durable.read().get(&group.group_id).copied())
                .unwrap_or((0, 0));
            if group.applied_index < current.0 {
                return Err(StateMachineError::Invalid(format!(
                    "group {} applied {} after {}",
                    group.group_id, group.applied_index, current.0
                )));
            }
            let memtable = &mut memtables.active;
            for op in &group.ops {
                let (key, value) = match op {
                    KvOp::Put { key, value } => (key, Some(value.clone())),
                    KvOp::Delete { key } => (key, None),
                };
                let size = |value: &Option<Vec<u8>>| key.len() as u64 + value.as_ref().map_or(0, |v| v.len() as u64);
                let added = size(&value);
                let removed = memtable.data.insert(key.clone(), value).map_or(0, |previous| size(&previous));
                memtable.bytes = (memtable.bytes + added).saturating_sub(removed);
            }
            memtable.applied.insert(group.group_id, (group.applied_index, group.applied_term));
        }
        Ok(memtables.active.bytes >= self.options.memtable_bytes_max)
    }

    /// Writes the memtable to redb in one sorted, durable transaction together with the applied state of every
    /// group it covers: the durable checkpoint. Applies and reads go on meanwhile (against a fresh memtable).
    pub fn flush(&self) -> Result<(), StateMachineError> {
        let _one_at_a_time = self.flush_lock.lock();
        let flushing = {
            let mut memtables = self.memtables.write();
            if memtables.active.applied.is_empty() {
                return Ok(());
            }
            let flushing = Arc::new(std::mem::take(&mut memtables.active));
            memtables.flushing = Some(Arc::clone(&flushing));
            flushing
        };
        let mut write = self.db.begin_write().map_err(storage)?;
        write.set_durability(Durability::Immediate).map_err(storage)?;
        write.set_quick_repair(true);
        {
            let mut table = write.open_table(DATA).map_err(storage)?;
            for (key, value) in &flushing.data {
                match value {
                    Some(value) => {
                        table.insert(key.as_slice(), value.as_slice()).map_err(storage)?;
                    }
                    None => {
                        table.remove(key.as_slice()).map_err(storage)?;
                    }
                }
            }
            let mut states = write.open_table(APPLY_STATE).map_err(storage)?;
            for (group, state) in &flushing.applied {
                states.insert(*group, encode_applied(*state)).map_err(storage)?;
            }
        }
        write.commit().map_err(storage)?;
        self.durable.write().extend(flushing.applied.iter().map(|(g, s)| (*g, *s)));
        self.memtables.write().flushing = None;
        Ok(())
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateMachineError> {
        if let Some(value) = self.memtables.read().get(key) {
            return Ok(value.clone());
        }
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(DATA).map_err(storage)?;
        Ok(table.get(key).map_err(storage)?.map(|v| v.value().to_vec()))
    }

    /// Up to `limit` key-value pairs with `start <= key < end` (`end` empty: no upper bound), in key order.
    pub fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, StateMachineError> {
        let upper = if end.is_empty() { Bound::Unbounded } else { Bound::Excluded(end) };
        let memtables = self.memtables.read();
        // The memtables' view of the range (active over flushing); bounded by the memtable budget.
        let mut merged: BTreeMap<&Vec<u8>, &Option<Vec<u8>>> = BTreeMap::new();
        if let Some(flushing) = &memtables.flushing {
            merged.extend(flushing.data.range::<[u8], _>((Bound::Included(start), upper)));
        }
        merged.extend(memtables.active.data.range::<[u8], _>((Bound::Included(start), upper)));
        let overlay: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = merged.into_iter().collect();
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(DATA).map_err(storage)?;
        let stored = table.range::<&[u8]>((Bound::Included(start), upper)).map_err(storage)?;
        let mut out = Vec::new();
        let mut overlay = overlay.into_iter().peekable();
        let mut stored = stored.peekable();
        while out.len() < limit {
            let next_stored = match stored.peek() {
                Some(Ok((key, _))) => Some(key.value().to_vec()),
                Some(Err(_)) => return Err(storage(stored.next().expect("peeked").err().expect("an error"))),
                None => None,
            };
            let take_overlay = match (overlay.peek(), &next_stored) {
                (Some((key, _)), Some(stored_key)) => key.as_slice() <= stored_key.as_slice(),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_overlay {
                let (key, value) = overlay.next().expect("peeked");
                if next_stored.as_deref() == Some(key.as_slice()) {
                    stored.next(); // shadowed by the memtable
                }
                if let Some(value) = value {
                    out.push((key.clone(), value.clone()));
                }
            } else {
                let (key, value) = stored.next().expect("peeked").map_err(storage)?;
                out.push((key.value().to_vec(), value.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// The latest applied state of a group (in memory or durable).
    pub fn applied(&self, group_id: u64) -> AppliedState {
        self.memtables.read().applied(group_id).unwrap_or_else(|| self.durable_applied(group_id))
    }

    /// The applied state the last flush made durable: after a crash the group restarts here and the WAL must hold
    /// everything after it.
    pub fn durable_applied(&self, group_id: u64) -> AppliedState {
        self.durable.read().get(&group_id).copied().unwrap_or((0, 0))
    }

    pub fn memtable_bytes(&self) -> u64 {
        self.memtables.read().active.bytes
    }

    /// Stores a group's range descriptor, durably (range changes are rare).
    pub fn put_range(&self, group_id: u64, descriptor: &[u8]) -> Result<(), StateMachineError> {
        let mut write = self.db.begin_write().map_err(storage)?;
        write.set_durability(Durability::Immediate).map_err(storage)?;
        write.open_table(RANGES).map_err(storage)?.insert(group_id, descriptor).map_err(storage)?;
        write.commit().map_err(storage)
    }

    pub fn ranges(&self) -> Result<Vec<(u64, Vec<u8>)>, StateMachineError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(RANGES).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(storage)? {
            let (group, descriptor) = row.map_err(storage)?;
            out.push((group.value(), descriptor.value().to_vec()));
        }
        Ok(out)
    }
}

/// Streams a snapshot of one group's range (see `snapshot.rs`).
pub struct SnapshotReader {
    read: redb::ReadTransaction,
    group_id: u64,
    end: Vec<u8>,
    /// The next key to read (inclusive); `None` once the range is exhausted.
    next_key: Option<Vec<u8>>,
    sequence: u64,
    total_pairs: u64,
    applied: AppliedState,
    chunk_bytes_max: usize,
}

impl SnapshotReader {
    /// The applied state the snapshot is taken at.
    pub fn applied(&self) -> AppliedState {
        self.applied
    }

    /// Whether every chunk has been handed out.
    pub fn is_exhausted(&self) -> bool {
        self.next_key.is_none()
    }

    /// The next encoded chunk, or `None` after the last one.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, StateMachineError> {
        let Some(start) = self.next_key.take() else { return Ok(None) };
        let table = self.read.open_table(DATA).map_err(storage)?;
        let upper = if self.end.is_empty() { Bound::Unbounded } else { Bound::Excluded(self.end.as_slice()) };
        let mut body = SnapshotChunkBody { group_id: self.group_id, sequence: self.sequence, ..Default::default() };
        let mut bytes = 0usize;
        for row in table.range::<&[u8]>((Bound::Included(start.as_slice()), upper)).map_err(storage)? {
            let (key, value) = row.map_err(storage)?;
            if !body.keys.is_empty() && bytes + key.value().len() + value.value().len() > self.chunk_bytes_max {
                self.next_key = Some(key.value().to_vec());
                break;
            }
            bytes += key.value().len() + value.value().len();
            body.keys.push(key.value().to_vec());
            body.values.push(value.value().to_vec());
        }
        self.total_pairs += body.keys.len() as u64;
        self.sequence += 1;
        if self.next_key.is_none() {
            body.last = true;
            body.total_pairs = self.total_pairs;
            (body.applied_index, body.applied_term) = self.applied;
        }
        Ok(Some(encode_chunk(&body)))
    }
}

/// Receives a snapshot of one group's range and installs it atomically (see `snapshot.rs`).
pub struct SnapshotInstaller<'a> {
    machine: &'a StateMachine,
    group_id: u64,
    start: Vec<u8>,
    end: Vec<u8>,
    expected_sequence: u64,
    received_pairs: u64,
    finished: Option<AppliedState>,
}

impl SnapshotInstaller<'_> {
    /// Verifies a chunk and stages it. Returns true once the last chunk has arrived.
    pub fn receive(&mut self, encoded: &[u8]) -> Result<bool, StateMachineError> {
        let chunk = decode_chunk(encoded).map_err(|e| StateMachineError::Invalid(e.to_string()))?;
        let invalid = |e: ChunkError| Err(StateMachineError::Invalid(e.to_string()));
        if chunk.group_id != self.group_id {
            return invalid(ChunkError::WrongGroup(chunk.group_id));
        }
        if chunk.sequence != self.expected_sequence || self.finished.is_some() {
            return invalid(ChunkError::OutOfOrder { expected: self.expected_sequence, found: chunk.sequence });
        }
        if chunk.keys.iter().any(|k| !in_range(k, &self.start, &self.end)) {
            return invalid(ChunkError::OutsideRange);
        }
        let mut write = self.machine.db.begin_write().map_err(storage)?;
        write.set_durability(Durability::None).map_err(storage)?;
        {
            let name = staging_table_name(self.group_id);
            let definition: TableDefinition<&[u8], &[u8]> = TableDefinition::new(&name);
            let mut staging = write.open_table(definition).map_err(storage)?;
            for (key, value) in chunk.keys.iter().zip(&chunk.values) {
                staging.insert(key.as_slice(), value.as_slice()).map_err(storage)?;
            }
        }
        write.commit().map_err(storage)?;
        self.received_pairs += chunk.keys.len() as u64;
        self.expected_sequence += 1;
        if chunk.last {
            if chunk.total_pairs != self.received_pairs {
                return invalid(ChunkError::CountMismatch { expected: chunk.total_pairs, received: self.received_pairs });
            }
            self.finished = Some((chunk.applied_index, chunk.applied_term));
        }
        Ok(chunk.last)
    }

    /// Replaces the group's range and applied state with the snapshot, in one durable transaction.
    pub fn finish(self) -> Result<AppliedState, StateMachineError> {
        let applied = self.finished.ok_or_else(|| StateMachineError::Invalid("the snapshot's last chunk has not arrived".into()))?;
        let machine = self.machine;
        // No read may see the range half replaced, and no flush may write older data over it.
        let _no_flush = machine.flush_lock.lock();
        let mut memtables = machine.memtables.write();
        let mut write = machine.db.begin_write().map_err(storage)?;
        write.set_durability(Durability::Immediate).map_err(storage)?;
        write.set_quick_repair(true);
        let staging_name = staging_table_name(self.group_id);
        {
            let upper = if self.end.is_empty() { Bound::Unbounded } else { Bound::Excluded(self.end.as_slice()) };
            let mut data = write.open_table(DATA).map_err(storage)?;
            data.retain_in::<&[u8], _>((Bound::Included(self.start.as_slice()), upper), |_, _| false).map_err(storage)?;
            let definition: TableDefinition<&[u8], &[u8]> = TableDefinition::new(&staging_name);
            let staging = write.open_table(definition).map_err(storage)?;
            for row in staging.iter().map_err(storage)? {
                let (key, value) = row.map_err(storage)?;
                data.insert(key.value(), value.value()).map_err(storage)?;
            }
            drop(staging);
            write.open_table(APPLY_STATE).map_err(storage)?.insert(self.group_id, encode_applied(applied)).map_err(storage)?;
        }
        let definition: TableDefinition<&[u8], &[u8]> = TableDefinition::new(&staging_name);
        write.delete_table(definition).map_err(storage)?;
        write.commit().map_err(storage)?;
        let range = |key: &Vec<u8>| in_range(key, &self.start, &self.end);
        memtables.active.data.retain(|key, _| !range(key));
        memtables.active.applied.remove(&self.group_id);
        memtables.active.bytes = memtables.active.data.iter().map(|(k, v)| k.len() as u64 + v.as_ref().map_or(0, |v| v.len() as u64)).sum();
        machine.durable.write().insert(self.group_id, applied);
        Ok(applied)
    }
}

impl StateMachine {
    /// Starts streaming a snapshot of `group_id`'s range `[start, end)` (`end` empty: unbounded), in chunks of at
    /// most `chunk_bytes_max` bytes of keys and values (at least one pair each).
    pub fn snapshot_reader(
        &self,
        group_id: u64,
        start: &[u8],
        end: &[u8],
        chunk_bytes_max: usize,
    ) -> Result<SnapshotReader, StateMachineError> {
        self.flush()?;
        let _no_flush = self.flush_lock.lock();
        let read = self.db.begin_read().map_err(storage)?;
        let applied = read
            .open_table(APPLY_STATE)
            .map_err(storage)?
            .get(group_id)
            .map_err(storage)?
            .map(|state| decode_applied(state.value()))
            .unwrap_or((0, 0));
        Ok(SnapshotReader {
            read,
            group_id,
            end: end.to_vec(),
            next_key: Some(start.to_vec()),
            sequence: 0,
            total_pairs: 0,
            applied,
            chunk_bytes_max,
        })
    }

    /// Starts receiving a snapshot for `group_id`'s range `[start, end)`; any earlier unfinished one is discarded.
    pub fn snapshot_installer(&self, group_id: u64, start: &[u8], end: &[u8]) -> Result<SnapshotInstaller<'_>, StateMachineError> {
        let write = self.db.begin_write().map_err(storage)?;
        let name = staging_table_name(group_id);
        let definition: TableDefinition<&[u8], &[u8]> = TableDefinition::new(&name);
        write.delete_table(definition).map_err(storage)?;
        write.commit().map_err(storage)?;
        Ok(SnapshotInstaller {
            machine: self,
            group_id,
            start: start.to_vec(),
            end: end.to_vec(),
            expected_sequence: 0,
            received_pairs: 0,
            finished: None,
        })
    }
}
