//! The node's state machine: every group's applied data in one redb database.
//!
//! redb is fast only for large sorted writes (measured here: ~100K random 128 B inserts/s in 256-key transactions,
//! ~280K/s at best in sorted ones), so applies do not go to redb one by one. They land in a **memtable** — the
//! last write of every key, plus each group's applied index — and a **flush** writes the whole memtable as one new
//! sorted run of blocks (see [`crate::lsm`]) in one transaction with `Durability::Immediate`, together with the
//! applied index of every group it covers. A flush is therefore the durable checkpoint: what it wrote survives a
//! crash, what the memtable held does not. The WAL stays the source of truth: it may be compacted only below each
//! group's [`StateMachine::durable_applied`] index, and after a crash the raftstore replays the WAL from there.
//!
//! Reads merge the memtable over the runs. Keys are the users' keys: a group's range is one contiguous key range.
//!
//! Tables: `run_blocks` and `runs` (the data, see `lsm/run.rs`), `range_tombstones` (range deletions left by
//! snapshot installs), `apply_state` (group → applied index, term and how it was set, sealed), `ranges` (group →
//! encoded range descriptor, sealed, written by the raftstore). Beside this file: compaction (`compaction.rs`),
//! snapshot streaming and installation (`snapshot.rs`), errors (`error.rs`); the background flusher and compactor
//! are `../flusher.rs`, the run format `../lsm/`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use redb::{Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};
use rustc_hash::FxHashMap;

mod compaction;
pub(crate) mod error;
pub mod snapshot;

pub use error::StateMachineError;
pub(crate) use error::{guard, storage};

use crate::disk::{Disk, RedbFile};
use crate::lsm::merge::{Input, MemSource, Merge};
use crate::lsm::read_cache::ReadCache;
use crate::lsm::run::{block_key, delete_blocks, run_of_block_key, Run, RunCursor, RunWriter, RUNS, RUN_BLOCKS};
use crate::lsm::sealed::{seal, unseal};
use crate::lsm::version::{Contents, RangeTombstone, Version, RANGE_TOMBSTONES};
use snapshot::Install;

/// Applied index (u64 LE), term (u64 LE), how it was set (1 byte: 0 by applying the log, 1 by a snapshot install),
/// checksum (`lsm/sealed.rs`).
pub(crate) const APPLY_STATE: TableDefinition<u64, [u8; 21]> = TableDefinition::new(APPLY_STATE_TABLE);
const APPLY_STATE_TABLE: &str = "apply_state";
/// A range descriptor, sealed (`lsm/sealed.rs`).
pub(crate) const RANGES: TableDefinition<u64, &[u8]> = TableDefinition::new(RANGES_TABLE);
const RANGES_TABLE: &str = "ranges";

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
    /// The group's new range descriptor, if an entry of this batch changed it (a membership change): made
    /// durable by the same checkpoint as the applied index, so that after a crash the two always agree.
    pub range: Option<Vec<u8>>,
}

/// Settings of the state machine.
#[derive(Clone, Debug)]
pub struct StateMachineOptions {
    /// The memtable is flushed (as one new run) once it holds this many bytes of keys and values. Larger means
    /// fewer runs and compactions, more memory (about three times this, see `flusher.rs`) and a longer WAL replay
    /// after a crash. Default 64 MiB.
    pub memtable_bytes_max: u64,
    /// redb's page cache. Default 1 GiB (redb's own default).
    pub cache_bytes: usize,
    /// The answers of recent point reads in the runs (`lsm/read_cache.rs`), so that a key read again that is no
    /// longer in the memtable costs a hash lookup instead of a search of the runs. A flush or snapshot install
    /// makes its answers stale; filled as keys are read; 0 turns it off. Default 64 MiB.
    pub read_cache_bytes: u64,
    /// Target size of a block of a run: the unit a point read fetches and checks. Default 16 KiB.
    pub block_bytes_max: usize,
    /// Runs of one size class merged at once (at least 2): higher means fewer rewrites of each byte and more runs
    /// for reads to consult. Default 4.
    pub compaction_fanout: usize,
    /// Runs beyond which compaction merges the smallest neighbours whatever their class, and the background
    /// flusher waits for compaction before flushing again (so reads never consult more). Default 24.
    pub runs_max: usize,
    /// Verify the whole file at open: redb's own integrity check (damage it would otherwise trust, and might trip
    /// over, is reported as corruption) and every block's checksum. Costs a read of the whole file. redb checks by
    /// itself after an unclean shutdown; the `Db` turns this on for the open after its node stopped on a failure.
    /// Default false.
    pub check_integrity_on_open: bool,
}

impl Default for StateMachineOptions {
    fn default() -> StateMachineOptions {
        StateMachineOptions {
            memtable_bytes_max: 64 << 20,
            cache_bytes: 1 << 30,
            read_cache_bytes: 64 << 20,
            block_bytes_max: 16 << 10,
            compaction_fanout: 4,
            runs_max: 24,
            check_integrity_on_open: false,
        }
    }
}

impl StateMachineOptions {
    fn validate(&self) -> Result<(), StateMachineError> {
        let invalid = |what: &str| Err(StateMachineError::Invalid(format!("state machine options: {what}")));
        if self.memtable_bytes_max == 0 || self.block_bytes_max == 0 {
            return invalid("memtable_bytes_max and block_bytes_max must be positive");
        }
        if self.compaction_fanout < 2 || self.runs_max < self.compaction_fanout {
            return invalid("compaction_fanout must be at least 2 and runs_max at least compaction_fanout");
        }
        Ok(())
    }
}

/// (applied index, applied term) of a group.
pub type AppliedState = (u64, u64);

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A memtable key: keys up to 24 bytes live inside the B-tree's nodes, so a search compares them without
/// following a pointer per key (inserting into a memtable of 200 K keys took 12 % of a 3-node write benchmark's CPU
/// with heap-allocated keys).
pub(crate) use crate::lsm::merge::MemKey;

#[derive(Default)]
pub(crate) struct Memtable {
    /// `None` is a deletion not yet flushed.
    pub(crate) data: BTreeMap<MemKey, Option<Vec<u8>>>,
    pub(crate) applied: FxHashMap<u64, AppliedState>,
    /// Range descriptors changed by applies since the last flush.
    pub(crate) ranges: FxHashMap<u64, Vec<u8>>,
    pub(crate) bytes: u64,
}

/// The memtable taking applies, and the one being flushed (if a flush is under way). Reads see active, then
/// flushing, then the runs.
#[derive(Default)]
pub(crate) struct Memtables {
    pub(crate) active: Memtable,
    pub(crate) flushing: Option<Arc<Memtable>>,
}

impl Memtables {
    fn get(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.active.data.get(key).or_else(|| self.flushing.as_ref().and_then(|f| f.data.get(key)))
    }

    fn applied(&self, group_id: u64) -> Option<AppliedState> {
        self.active
            .applied
            .get(&group_id)
            .or_else(|| self.flushing.as_ref().and_then(|f| f.applied.get(&group_id)))
            .copied()
    }

    /// Merge inputs over `[start, end)`, newest first.
    pub(crate) fn sources<'a>(&'a self, start: &[u8], end: &[u8]) -> Vec<Input<'a>> {
        let upper = if end.is_empty() { Bound::Unbounded } else { Bound::Excluded(end) };
        let bounds = (Bound::Included(start), upper);
        let mut inputs =
            vec![Input { seq: u64::MAX, source: Box::new(MemSource::new(self.active.data.range::<[u8], _>(bounds))) }];
        if let Some(flushing) = &self.flushing {
            inputs.push(Input {
                seq: u64::MAX,
                source: Box::new(MemSource::new(flushing.data.range::<[u8], _>(bounds))),
            });
        }
        inputs
    }
}

/// Runs waiting to be deleted (see `lsm/version.rs`).
#[derive(Default)]
pub(crate) struct Garbage {
    /// Replaced by a compaction; deleted once no version refers to them.
    pub(crate) runs: Vec<Arc<Run>>,
    /// Blocks of snapshot installs that were abandoned (no version ever referred to them).
    pub(crate) abandoned: Vec<u64>,
}

/// The ids of the runs that have blocks in `run_blocks` (visiting each once, jumping over its blocks).
fn stored_run_ids(blocks: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<Vec<u64>, StateMachineError> {
    let mut ids = Vec::new();
    let mut from = Vec::new();
    while let Some(row) = blocks.range::<&[u8]>(from.as_slice()..).map_err(storage)?.next() {
        let id = run_of_block_key(row.map_err(storage)?.0.value())?;
        ids.push(id);
        from = block_key(id + 1, b"");
    }
    Ok(ids)
}

/// What the state machine holds, for operators and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateMachineStats {
    /// Runs that reads consult.
    pub runs: usize,
    /// Runs with blocks in the database: `runs` plus those waiting to be deleted.
    pub stored_runs: usize,
    pub range_deletions: usize,
    /// Bytes of keys and values in the runs (overwritten and deleted entries included until compacted away).
    pub run_bytes: u64,
    pub memtable_bytes: u64,
    /// Bytes the read cache's answers take (`StateMachineOptions::read_cache_bytes` at most).
    pub read_cache_bytes: u64,
    /// Bytes of pages redb has allocated (live data and its own metadata); the file may be larger (free space).
    pub allocated_bytes: u64,
    /// Of those, bytes lost to fragmentation inside pages.
    pub fragmented_bytes: u64,
}

pub struct StateMachine {
    pub(crate) db: Database,
    options: StateMachineOptions,
    pub(crate) memtables: RwLock<Memtables>,
    /// One flush at a time (a snapshot install holds it too).
    pub(crate) flush_lock: Mutex<()>,
    /// One compaction at a time.
    pub(crate) compaction_lock: Mutex<()>,
    /// What the last flush made durable. Change it only through `make_durable`.
    durable: RwLock<HashMap<u64, AppliedState>>,
    /// The groups whose durable applied state a snapshot install set (see `durable_by_install`).
    durable_by_install: RwLock<HashSet<u64>>,
    /// Bumped after every change of `durable` (see `durable_generation`).
    durable_generation: AtomicU64,
    /// The live runs and range deletions.
    version: RwLock<Arc<Version>>,
    /// Answers of recent point reads in the runs (`lsm/read_cache.rs`).
    read_cache: ReadCache,
    /// Run ids and `seq`s (one counter for both).
    next_number: AtomicU64,
    pub(crate) garbage: Mutex<Garbage>,
    /// Snapshot installs under way, by group (`snapshot.rs`).
    pub(crate) installs: Mutex<HashMap<u64, Install>>,
}

pub(crate) fn encode_applied(group_id: u64, (index, term): AppliedState, by_install: bool) -> [u8; 21] {
    let mut bytes = index.to_le_bytes().to_vec();
    bytes.extend_from_slice(&term.to_le_bytes());
    bytes.push(u8::from(by_install));
    let sealed = seal(APPLY_STATE_TABLE, group_id, bytes);
    sealed.try_into().expect("17 bytes and a checksum")
}

/// A stored applied state, and whether a snapshot install set it (rather than applying the log).
pub(crate) fn decode_applied(group_id: u64, sealed: [u8; 21]) -> Result<(AppliedState, bool), StateMachineError> {
    let bytes = unseal(APPLY_STATE_TABLE, group_id, &sealed)?;
    let (Some((index, rest)), Some(&by_install)) = (bytes.split_first_chunk::<8>(), bytes.last()) else {
        return Err(storage(format!("corrupt state machine: table {APPLY_STATE_TABLE}, row {group_id}: too short")));
    };
    let term = rest.first_chunk::<8>().map_or(0, |term| u64::from_le_bytes(*term));
    Ok(((u64::from_le_bytes(*index), term), by_install == 1))
}

/// A range descriptor as stored in row `group_id` of `ranges`.
pub(crate) fn seal_range(group_id: u64, descriptor: &[u8]) -> Vec<u8> {
    seal(RANGES_TABLE, group_id, descriptor.to_vec())
}

/// A write transaction whose commit is durable, with redb's quick repair: each such commit saves the allocator
/// state, so the open after a crash need not walk the whole file to rebuild it (that walk took 0.8 s for a 620 MB
/// state file, growing with the file; `scripts/restart-bench`). Every durable commit must be one of these: the
/// open after a crash repairs from the last durable commit, and a full walk follows one made without.
pub(crate) fn begin_durable(db: &Database) -> Result<redb::WriteTransaction, StateMachineError> {
    let mut write = db.begin_write().map_err(storage)?;
    write.set_durability(Durability::Immediate).map_err(storage)?;
    write.set_quick_repair(true);
    Ok(write)
}

impl StateMachine {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path, options: StateMachineOptions) -> Result<StateMachine, StateMachineError> {
        options.validate()?;
        let db = Database::builder().set_cache_size(options.cache_bytes).create(path).map_err(storage)?;
        StateMachine::from_database(db, options)
    }

    /// Opens (or creates) the database file at `path` on `disk` (the real file system, or a simulated one for
    /// crash tests).
    pub fn open_on(
        disk: &dyn Disk,
        path: &Path,
        options: StateMachineOptions,
    ) -> Result<StateMachine, StateMachineError> {
        match disk.open_redb(path).map_err(|e| storage(format!("opening {}: {e}", path.display())))? {
            RedbFile::Std(file) => StateMachine::open_with_backend(file, options),
            RedbFile::Sim(file) => StateMachine::open_with_backend(file, options),
        }
    }

    /// Opens a database on another storage backend (crash tests use [`crate::redb_sim::SimRedbBackend`]).
    pub fn open_with_backend(
        backend: impl redb::StorageBackend,
        options: StateMachineOptions,
    ) -> Result<StateMachine, StateMachineError> {
        options.validate()?;
        guard("opening the state file", || {
            let check = options.check_integrity_on_open;
            let db = Database::builder()
                .set_cache_size(options.cache_bytes)
                .set_check_integrity_on_open(check)
                .create_with_backend(backend)
                .map_err(storage)?;
            let machine = StateMachine::from_database(db, options)?;
            if check {
                machine.verify_blocks()?;
            }
            Ok(machine)
        })
    }

    /// Loads the runs, range deletions and applied states, and deletes garbage runs (unfinished compactions and
    /// snapshot installs).
    fn from_database(db: Database, options: StateMachineOptions) -> Result<StateMachine, StateMachineError> {
        let mut durable = HashMap::new();
        let mut durable_by_install = HashSet::new();
        let mut version = Version::default();
        let mut highest_number = 0;
        {
            let write = begin_durable(&db)?;
            write.open_table(RANGES).map_err(storage)?;
            for row in write.open_table(APPLY_STATE).map_err(storage)?.iter().map_err(storage)? {
                let (group, state) = row.map_err(storage)?;
                let (applied, by_install) = decode_applied(group.value(), state.value())?;
                durable.insert(group.value(), applied);
                if by_install {
                    durable_by_install.insert(group.value());
                }
            }
            for row in write.open_table(RUNS).map_err(storage)?.iter().map_err(storage)? {
                let (id, record) = row.map_err(storage)?;
                version.runs.push(Arc::new(Run::decode(id.value(), record.value())?));
            }
            for row in write.open_table(RANGE_TOMBSTONES).map_err(storage)?.iter().map_err(storage)? {
                let (seq, record) = row.map_err(storage)?;
                version.tombstones.push(RangeTombstone::decode(seq.value(), record.value())?);
            }
            version.runs.sort_by_key(|run| std::cmp::Reverse(run.seq));
            let live: HashSet<u64> = version.runs.iter().map(|run| run.id).collect();
            let mut blocks = write.open_table(RUN_BLOCKS).map_err(storage)?;
            let stored = stored_run_ids(&blocks)?;
            for &id in &stored {
                highest_number = highest_number.max(id);
                if !live.contains(&id) {
                    delete_blocks(&mut blocks, id)?;
                }
            }
            // A recorded run without blocks would read as "no such key": corruption, not an empty run.
            if let Some(run) = version.runs.iter().find(|run| !stored.contains(&run.id)) {
                return Err(storage(format!(
                    "corrupt state machine: run {} ({} entries) has a record but no blocks",
                    run.id, run.entries
                )));
            }
            drop(blocks);
            write.commit().map_err(storage)?;
        }
        for run in &version.runs {
            highest_number = highest_number.max(run.id).max(run.seq);
        }
        for tombstone in &version.tombstones {
            highest_number = highest_number.max(tombstone.seq);
        }
        let read_cache = ReadCache::new(options.read_cache_bytes);
        Ok(StateMachine {
            db,
            options,
            memtables: RwLock::new(Memtables::default()),
            flush_lock: Mutex::new(()),
            compaction_lock: Mutex::new(()),
            durable: RwLock::new(durable),
            durable_by_install: RwLock::new(durable_by_install),
            durable_generation: AtomicU64::new(0),
            version: RwLock::new(Arc::new(version)),
            read_cache,
            next_number: AtomicU64::new(highest_number + 1),
            garbage: Mutex::new(Garbage::default()),
            installs: Mutex::new(HashMap::new()),
        })
    }

    /// Reads every block of every stored run and verifies its checksum and layout.
    fn verify_blocks(&self) -> Result<(), StateMachineError> {
        let read = self.db.begin_read().map_err(storage)?;
        let blocks = read.open_table(RUN_BLOCKS).map_err(storage)?;
        for row in blocks.iter().map_err(storage)? {
            let (key, block) = row.map_err(storage)?;
            crate::lsm::run::parse_located(key.value(), block.value())?;
        }
        Ok(())
    }

    pub fn options(&self) -> &StateMachineOptions {
        &self.options
    }

    /// A fresh run id or `seq`.
    pub(crate) fn allocate_number(&self) -> u64 {
        self.next_number.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn current_version(&self) -> Arc<Version> {
        Arc::clone(&self.version.read())
    }

    /// Replaces the current version with `change(current)`; call after the change is committed to redb.
    /// `contents`: whether the runs answer differently now (new data), or only hold the same data differently.
    pub(crate) fn publish(&self, contents: Contents, change: impl FnOnce(&Version) -> Version) {
        let mut version = self.version.write();
        let mut next = change(&version);
        if contents == Contents::New {
            // Every cached answer is stale now: no read of this version takes it (each is replaced when its key is
            // read again, or evicted). Not cleared here: freeing them all would hold up readers.
            next.contents_generation = version.contents_generation + 1;
        }
        *version = Arc::new(next);
        metrics::gauge!("flotilla_state_machine_runs").set(version.runs.len() as f64);
        metrics::gauge!("flotilla_state_machine_run_bytes").set(version.run_bytes() as f64);
        metrics::gauge!("flotilla_state_machine_filter_bytes")
            .set(version.runs.iter().map(|r| r.filter_bytes()).sum::<usize>() as f64);
    }

    /// The current version and a read transaction that holds every run in it.
    pub(crate) fn read_view(&self) -> Result<(Arc<Version>, ReadTransaction), StateMachineError> {
        // The version first: runs leave redb only once no version refers to them, so the transaction begun after
        // still holds all of this version's runs (and possibly newer ones, which the version does not consult).
        let version = self.current_version();
        let read = self.db.begin_read().map_err(storage)?;
        Ok((version, read))
    }

    /// How many runs reads may consult now.
    pub fn run_count(&self) -> usize {
        self.version.read().runs.len()
    }

    pub fn stats(&self) -> Result<StateMachineStats, StateMachineError> {
        let (version, read) = self.read_view()?;
        let stored_runs = stored_run_ids(&read.open_table(RUN_BLOCKS).map_err(storage)?)?.len();
        let write = self.db.begin_write().map_err(storage)?;
        let redb_stats = write.stats().map_err(storage)?;
        write.abort().map_err(storage)?;
        Ok(StateMachineStats {
            allocated_bytes: redb_stats.allocated_pages() * redb_stats.page_size() as u64,
            fragmented_bytes: redb_stats.fragmented_bytes(),
            runs: version.runs.len(),
            stored_runs,
            range_deletions: version.tombstones.len(),
            run_bytes: version.run_bytes(),
            memtable_bytes: self.memtable_bytes(),
            read_cache_bytes: self.read_cache.bytes(),
        })
    }

    /// Applies many groups' committed entries. Returns whether the memtable is now over its budget (the caller
    /// should `flush`, off the apply path if it likes).
    pub fn apply(&self, batch: Vec<GroupApply>) -> Result<bool, StateMachineError> {
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
            // The ops are moved in: applying copies no key or value.
            for op in group.ops {
                let (key, value) = match op {
                    KvOp::Put { key, value } => (key, Some(value)),
                    KvOp::Delete { key } => (key, None),
                };
                let size = |key: &[u8], value: &Option<Vec<u8>>| {
                    key.len() as u64 + value.as_ref().map_or(0, |v| v.len() as u64)
                };
                let added = size(&key, &value);
                let key_len = key.len();
                let removed = memtable
                    .data
                    .insert(MemKey::from_vec(key), value)
                    .map_or(0, |previous| key_len as u64 + previous.map_or(0, |v| v.len() as u64));
                memtable.bytes = (memtable.bytes + added).saturating_sub(removed);
            }
            memtable.applied.insert(group.group_id, (group.applied_index, group.applied_term));
            if let Some(range) = group.range {
                memtable.ranges.insert(group.group_id, range);
            }
        }
        Ok(memtables.active.bytes >= self.options.memtable_bytes_max)
    }

    /// Writes the memtable as one new run, in one durable transaction together with the applied state of every
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
        let number = self.allocate_number();
        let mut writer = RunWriter::new(number, self.options.block_bytes_max, Some(flushing.data.len()));
        let write = begin_durable(&self.db)?;
        let run = {
            let mut blocks = write.open_table(RUN_BLOCKS).map_err(storage)?;
            for (key, value) in &flushing.data {
                writer.add(key, value.as_deref());
                if writer.ready_bytes() >= 1 << 20 {
                    writer.write_ready(&mut blocks)?;
                }
            }
            let run = writer.finish(&mut blocks, number)?;
            if let Some(run) = &run {
                write.open_table(RUNS).map_err(storage)?.insert(run.id, run.encode().as_slice()).map_err(storage)?;
            }
            let mut states = write.open_table(APPLY_STATE).map_err(storage)?;
            for (group, state) in &flushing.applied {
                states.insert(*group, encode_applied(*group, *state, false)).map_err(storage)?;
            }
            let mut ranges = write.open_table(RANGES).map_err(storage)?;
            for (group, range) in &flushing.ranges {
                ranges.insert(*group, seal_range(*group, range).as_slice()).map_err(storage)?;
            }
            run
        };
        write.commit().map_err(storage)?;
        if let Some(run) = run {
            self.publish(Contents::New, |current| current.with_run(Arc::new(run)));
        }
        self.make_durable(flushing.applied.iter().map(|(g, s)| (*g, *s)), false);
        self.memtables.write().flushing = None;
        metrics::counter!("flotilla_state_machine_flushes_total").increment(1);
        Ok(())
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateMachineError> {
        if let Some(value) = self.memtables.read().get(key) {
            return Ok(value.clone());
        }
        let generation = self.current_version().contents_generation;
        if let Some(cached) = self.read_cache.get(generation, key) {
            return Ok(cached);
        }
        guard("a read of the state file", || {
            let (version, read) = self.read_view()?;
            self.get_in_cached(&version, &read, key)
        })
    }

    /// [`StateMachine::get_in`], its answer remembered for later reads of the same contents.
    fn get_in_cached(
        &self,
        version: &Version,
        read: &ReadTransaction,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateMachineError> {
        let value = self.get_in(version, read, key)?;
        self.read_cache.missed(version.contents_generation, key, &value);
        Ok(value)
    }

    /// A point read in the runs of `version` through `read` (memtables not consulted).
    pub(crate) fn get_in(
        &self,
        version: &Version,
        read: &ReadTransaction,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateMachineError> {
        let hidden_below = version.hidden_below(key);
        let blocks = read.open_table(RUN_BLOCKS).map_err(storage)?;
        for run in &version.runs {
            if run.seq < hidden_below {
                return Ok(None);
            }
            if let Some(value) = run.get(&blocks, key)? {
                return Ok(value);
            }
        }
        Ok(None)
    }

    /// Up to `limit` key-value pairs with `start <= key < end` (`end` empty: no upper bound), in key order.
    pub fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, StateMachineError> {
        guard("a scan of the state file", || self.scan_unguarded(start, end, limit))
    }

    fn scan_unguarded(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, StateMachineError> {
        let memtables = self.memtables.read();
        let (version, read) = self.read_view()?;
        let mut merge = self.merge_view(memtables.sources(start, end), &version, &read, start, end)?;
        let mut out = Vec::new();
        while out.len() < limit {
            let Some((key, value)) = merge.current() else { break };
            out.push((key.to_vec(), value.expect("a merge without deletions").to_vec()));
            merge.advance()?;
        }
        Ok(out)
    }

    /// A merge of `inputs` (memtables, newest first) over `version`'s runs in `[start, end)`, without deletions.
    pub(crate) fn merge_view<'a>(
        &self,
        mut inputs: Vec<Input<'a>>,
        version: &Version,
        read: &ReadTransaction,
        start: &[u8],
        end: &[u8],
    ) -> Result<Merge<'a>, StateMachineError> {
        let blocks = read.open_table(RUN_BLOCKS).map_err(storage)?;
        for run in version.runs.iter().filter(|run| run.overlaps(start, end)) {
            inputs.push(Input { seq: run.seq, source: Box::new(RunCursor::open(&blocks, run.id, start, end)?) });
        }
        Merge::new(inputs, version.tombstones.clone(), false)
    }

    /// The latest applied state of a group (in memory or durable).
    pub fn applied(&self, group_id: u64) -> AppliedState {
        self.memtables.read().applied(group_id).unwrap_or_else(|| self.durable_applied(group_id))
    }

    /// Records groups' applied states as durable, then bumps the generation (in that order: a reader that sees
    /// the new generation sees the new states).
    pub(crate) fn make_durable(&self, states: impl IntoIterator<Item = (u64, AppliedState)>, by_install: bool) {
        {
            let (mut durable, mut installs) = (self.durable.write(), self.durable_by_install.write());
            for (group, state) in states {
                durable.insert(group, state);
                if by_install {
                    installs.insert(group);
                } else {
                    installs.remove(&group);
                }
            }
        }
        self.durable_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a snapshot install set the group's durable applied state (rather than applying its log): then,
    /// after a crash, the log may end below it (the install came first, the log's record of it was lost with the
    /// crash). Otherwise the log holds the applied entry, or lost it.
    pub fn durable_by_install(&self, group_id: u64) -> bool {
        self.durable_by_install.read().contains(&group_id)
    }

    /// Changes whenever any group's durable applied state changes: a caller that read it, then the states it
    /// wanted, need not read them again until it changes (the `Db`'s maintenance pass skips idle nodes so).
    pub fn durable_generation(&self) -> u64 {
        self.durable_generation.load(Ordering::SeqCst)
    }

    /// The applied state the last flush made durable: after a crash the group restarts here and the WAL must hold
    /// everything after it.
    pub fn durable_applied(&self, group_id: u64) -> AppliedState {
        self.durable.read().get(&group_id).copied().unwrap_or((0, 0))
    }

    pub fn memtable_bytes_max(&self) -> u64 {
        self.options.memtable_bytes_max
    }

    /// Bytes of keys and values in the memtable taking applies.
    pub fn memtable_bytes(&self) -> u64 {
        self.memtables.read().active.bytes
    }

    /// Stores a group's range descriptor, durably (range changes are rare).
    pub fn put_range(&self, group_id: u64, descriptor: &[u8]) -> Result<(), StateMachineError> {
        self.put_ranges(&[(group_id, descriptor.to_vec())])
    }

    /// Stores many groups' range descriptors in one durable transaction (a new store's initial layout). Each
    /// replaces what applies not yet checkpointed left for its group (a merged group's record over the decision
    /// it last applied): no flush is under way meanwhile, and the memtable forgets those.
    pub fn put_ranges(&self, ranges: &[(u64, Vec<u8>)]) -> Result<(), StateMachineError> {
        let _no_flush = self.flush_lock.lock();
        let write = begin_durable(&self.db)?;
        {
            let mut table = write.open_table(RANGES).map_err(storage)?;
            for (group_id, descriptor) in ranges {
                table.insert(*group_id, seal_range(*group_id, descriptor).as_slice()).map_err(storage)?;
            }
        }
        write.commit().map_err(storage)?;
        let mut memtables = self.memtables.write();
        for (group_id, _) in ranges {
            memtables.active.ranges.remove(group_id);
        }
        Ok(())
    }

    /// Every group's range descriptor: the stored ones, overlaid with those applies changed since (by group).
    pub fn ranges(&self) -> Result<Vec<(u64, Vec<u8>)>, StateMachineError> {
        let memtables = self.memtables.read();
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(RANGES).map_err(storage)?;
        let mut out = BTreeMap::new();
        for row in table.iter().map_err(storage)? {
            let (group, descriptor) = row.map_err(storage)?;
            out.insert(group.value(), unseal(RANGES_TABLE, group.value(), descriptor.value())?.to_vec());
        }
        let changed = memtables.flushing.iter().map(|f| &f.ranges).chain([&memtables.active.ranges]);
        for ranges in changed {
            out.extend(ranges.iter().map(|(group, range)| (*group, range.clone())));
        }
        Ok(out.into_iter().collect())
    }

    /// One group's range descriptor, as [`StateMachine::ranges`] would give it.
    pub fn range(&self, group_id: u64) -> Result<Option<Vec<u8>>, StateMachineError> {
        let memtables = self.memtables.read();
        let changed = memtables.flushing.iter().map(|f| &f.ranges).chain([&memtables.active.ranges]);
        if let Some(range) = changed.rev().find_map(|ranges| ranges.get(&group_id)) {
            return Ok(Some(range.clone()));
        }
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(RANGES).map_err(storage)?;
        let stored = table.get(group_id).map_err(storage)?;
        stored.map(|row| unseal(RANGES_TABLE, group_id, row.value()).map(<[u8]>::to_vec)).transpose()
    }
}

#[cfg(test)]
mod read_cache_tests {
    use super::*;
    use crate::redb_sim::SimRedbBackend;

    fn write(machine: &StateMachine, index: u64, ops: &[(&str, Option<&str>)]) {
        let ops = ops
            .iter()
            .map(|(key, value)| match value {
                Some(value) => KvOp::Put { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec() },
                None => KvOp::Delete { key: key.as_bytes().to_vec() },
            })
            .collect();
        machine
            .apply(vec![GroupApply { group_id: 1, ops, applied_index: index, applied_term: 1, range: None }])
            .unwrap();
    }

    fn get(machine: &StateMachine, key: &str) -> Option<String> {
        machine.get(key.as_bytes()).unwrap().map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn a_point_read_never_answers_from_before_a_flush_and_a_compaction_keeps_the_answers() {
        let options = StateMachineOptions { compaction_fanout: 2, runs_max: 2, ..StateMachineOptions::default() };
        let machine = StateMachine::open_with_backend(SimRedbBackend::new(), options).unwrap();
        write(&machine, 1, &[("a", Some("a1")), ("b", Some("b1"))]);
        machine.flush().unwrap();
        // Read from the runs, twice: the answers (an absence too) are cached.
        for _ in 0..2 {
            assert_eq!(
                (get(&machine, "a"), get(&machine, "b"), get(&machine, "c")),
                (Some("a1".into()), Some("b1".into()), None)
            );
        }
        assert!(machine.stats().unwrap().read_cache_bytes > 0);
        // New values, a deletion and a new key reach the runs by a flush: the runs answer differently now.
        write(&machine, 2, &[("a", Some("a2")), ("b", None), ("c", Some("c2"))]);
        machine.flush().unwrap();
        assert_eq!(
            (get(&machine, "a"), get(&machine, "b"), get(&machine, "c")),
            (Some("a2".into()), None, Some("c2".into()))
        );
        // A compaction merges the two runs into one that answers the same: the cached answers stay.
        let cached = machine.stats().unwrap().read_cache_bytes;
        assert!(machine.compact().unwrap());
        assert_eq!(machine.run_count(), 1);
        assert_eq!(machine.stats().unwrap().read_cache_bytes, cached, "a compaction does not cool the cache");
        assert_eq!(
            (get(&machine, "a"), get(&machine, "b"), get(&machine, "c")),
            (Some("a2".into()), None, Some("c2".into()))
        );
    }

    #[test]
    fn a_reader_of_an_older_version_cannot_leave_its_answer_for_newer_reads() {
        let machine = StateMachine::open_with_backend(SimRedbBackend::new(), StateMachineOptions::default()).unwrap();
        write(&machine, 1, &[("k", Some("old"))]);
        machine.flush().unwrap();
        // A reader takes its view, then a flush gives the runs a new value before the reader reads...
        let (version, read) = machine.read_view().unwrap();
        write(&machine, 2, &[("k", Some("new"))]);
        machine.flush().unwrap();
        // ...so it reads (and, at its second miss, caches) what its view holds...
        for _ in 0..2 {
            assert_eq!(machine.get_in_cached(&version, &read, b"k").unwrap(), Some(b"old".to_vec()));
        }
        // ...which no read of the new version is answered with.
        assert_eq!(get(&machine, "k"), Some("new".into()));
    }

    #[test]
    fn without_a_read_cache_reads_are_the_same() {
        let options = StateMachineOptions { read_cache_bytes: 0, ..StateMachineOptions::default() };
        let machine = StateMachine::open_with_backend(SimRedbBackend::new(), options).unwrap();
        write(&machine, 1, &[("k", Some("v1"))]);
        machine.flush().unwrap();
        assert_eq!(get(&machine, "k"), Some("v1".into()));
        assert_eq!(get(&machine, "k"), Some("v1".into()));
        write(&machine, 2, &[("k", Some("v2"))]);
        machine.flush().unwrap();
        assert_eq!(get(&machine, "k"), Some("v2".into()));
        assert_eq!(machine.stats().unwrap().read_cache_bytes, 0);
    }
}
