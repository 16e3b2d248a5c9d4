//! The embedded database: [`Db`]. A single node whose key space is split into groups (16 by default), each a
//! Raft group of one replica, over one shared WAL and one redb state machine in a directory. Every acknowledged
//! write is durable (it went through the WAL's fsync) and survives closing, crashing and reopening.
//!
//! ```no_run
//! let db = flotilla::Db::open("/tmp/flotilla-example")?;
//! db.put(b"hello", b"world")?;
//! assert_eq!(db.get(b"hello")?, Some(b"world".to_vec()));
//! db.close()?;
//! # Ok::<(), flotilla::DbError>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError};
use flotilla_engine::disk::StdDisk;
use flotilla_engine::flusher::BackgroundFlusher;
use flotilla_engine::log_engine::LogEngine;
use flotilla_engine::state_machine::{KeyValue, StateMachine, StateMachineOptions};
use flotilla_engine::wal::group_commit::{GroupCommitOptions, GroupCommitWal, WriteRequest};
use flotilla_engine::wal::record::LogOp;
use flotilla_engine::wal::{Wal, WalOptions};
use flotilla_raftstore::command::{Command, Op, Outcome};
use flotilla_raftstore::peer::PeerError;
use flotilla_raftstore::range::{initial_ranges, RangeDescriptor, RangeError, Replica};
use flotilla_raftstore::store::{NoTransport, PeerMsg, ReadRequest, ReadResult, Store, StoreOptions};

/// Settings of an embedded database. `Config::default()` is what [`Db::open`] uses.
#[derive(Clone, Debug)]
pub struct Config {
    /// Groups the key space is split into when the database is created (later opens keep what was created).
    /// Default 16.
    pub groups: u64,
    /// How long a request may wait (for a leader, for the log, for apply) before it fails with
    /// [`DbError::Timeout`] — whose write may or may not have happened. Default 10 s.
    pub request_timeout: Duration,
    /// Largest key accepted. Default 4 KiB.
    pub key_bytes_max: usize,
    /// Largest value accepted. Default 8 MiB.
    pub value_bytes_max: usize,
    /// Most operations in one [`WriteBatch`]. Default 10,000.
    pub batch_ops_max: usize,
    /// How often each group's log is compacted below what the state machine has made durable, and the WAL
    /// purged. Default 1 s.
    pub maintenance_interval: Duration,
    pub wal: WalOptions,
    pub state_machine: StateMachineOptions,
    pub store: StoreOptions,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            groups: 16,
            request_timeout: Duration::from_secs(10),
            key_bytes_max: 4 << 10,
            value_bytes_max: 8 << 20,
            batch_ops_max: 10_000,
            maintenance_interval: Duration::from_secs(1),
            wal: WalOptions::default(),
            state_machine: StateMachineOptions::default(),
            store: StoreOptions::default(),
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbError {
    /// The arguments are not acceptable (sizes, empty batch, inverted range): nothing happened.
    InvalidArgument(String),
    /// An atomic batch touched keys of more than one group: nothing happened. Split it by group.
    BatchSpansRanges { first_outside: Vec<u8> },
    /// The store is at a bound (uncommitted bytes, pending reads): nothing happened; retry later.
    Busy(String),
    /// No answer in time: a write may or may not have taken effect.
    Timeout,
    /// The storage failed (disk, corruption): the database must be reopened after the cause is fixed.
    Storage(String),
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbError::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            DbError::BatchSpansRanges { first_outside } => {
                write!(f, "an atomic batch must stay in one group's range; key {:?} is in another", String::from_utf8_lossy(first_outside))
            }
            DbError::Busy(why) => write!(f, "busy, retry later: {why}"),
            DbError::Timeout => write!(f, "no answer in time (a write may or may not have taken effect)"),
            DbError::Storage(what) => write!(f, "storage failure: {what}"),
        }
    }
}

impl std::error::Error for DbError {}

fn storage(error: impl std::fmt::Display) -> DbError {
    DbError::Storage(error.to_string())
}

/// Puts and deletes applied atomically (all or none); their keys must lie in one group's range.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    ops: Vec<Op>,
}

impl WriteBatch {
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut WriteBatch {
        self.ops.push(Op::put(key, value));
        self
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut WriteBatch {
        self.ops.push(Op::delete(key));
        self
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The embedded database (see the module docs).
pub struct Db {
    config: Config,
    dir: PathBuf,
    /// Sorted by start key; they cover the key space.
    ranges: Vec<RangeDescriptor>,
    store: Option<Store>,
    log: Arc<GroupCommitWal>,
    kv: Arc<StateMachine>,
    flusher: Arc<BackgroundFlusher>,
    maintenance: Option<(crossbeam_channel::Sender<()>, JoinHandle<()>)>,
}

impl Db {
    /// Opens (creating if needed) the database in `dir` with the default [`Config`].
    pub fn open(dir: impl AsRef<Path>) -> Result<Db, DbError> {
        Db::open_with(dir, Config::default())
    }

    pub fn open_with(dir: impl AsRef<Path>, config: Config) -> Result<Db, DbError> {
        let dir = dir.as_ref().to_path_buf();
        if config.groups == 0 || config.groups > 65_536 {
            return Err(DbError::InvalidArgument(format!("groups must be 1..=65536, not {}", config.groups)));
        }
        std::fs::create_dir_all(&dir).map_err(storage)?;
        let (wal, _report) = Wal::open(&dir.join("wal"), Arc::new(StdDisk), config.wal.clone()).map_err(storage)?;
        let log = Arc::new(GroupCommitWal::start(wal, GroupCommitOptions::default()));
        let kv = Arc::new(StateMachine::open(&dir.join("state.redb"), config.state_machine.clone()).map_err(storage)?);
        let flusher = Arc::new(BackgroundFlusher::start(Arc::clone(&kv)));
        let ranges = Db::load_or_create_ranges(&kv, &config)?;
        let persisted = crossbeam_channel::unbounded();
        let store = Store::start(
            config.store.clone(),
            &ranges,
            Arc::clone(&log) as Arc<dyn LogEngine>,
            Arc::clone(&kv),
            Arc::clone(&flusher),
            Arc::new(NoTransport),
            persisted,
        )
        .map_err(storage)?;
        store.campaign_all(ranges.iter().map(|r| r.group_id));
        let maintenance = Db::start_maintenance(&config, &ranges, &log, &kv);
        Ok(Db { config, dir, ranges, store: Some(store), log, kv, flusher, maintenance: Some(maintenance) })
    }

    fn load_or_create_ranges(kv: &StateMachine, config: &Config) -> Result<Vec<RangeDescriptor>, DbError> {
        let stored = kv.ranges().map_err(storage)?;
        let mut ranges: Vec<RangeDescriptor> = if stored.is_empty() {
            let replica = Replica { node_id: config.store.node_id, replica_id: 1, learner: false };
            let ranges = initial_ranges(config.groups, 1, &[replica]);
            for range in &ranges {
                kv.put_range(range.group_id, &range.encode()).map_err(storage)?;
            }
            ranges
        } else {
            let mut decoded = Vec::with_capacity(stored.len());
            for (group_id, bytes) in stored {
                decoded.push(RangeDescriptor::decode_stored(&bytes).map_err(|e| storage(format!("range of group {group_id}: {e}")))?);
            }
            decoded
        };
        ranges.sort_by(|a, b| a.start.cmp(&b.start));
        Ok(ranges)
    }

    /// Compacts each group's log below what the state machine has made durable, then purges the WAL.
    fn start_maintenance(config: &Config, ranges: &[RangeDescriptor], log: &Arc<GroupCommitWal>, kv: &Arc<StateMachine>) -> (crossbeam_channel::Sender<()>, JoinHandle<()>) {
        let (stop, stopped) = bounded::<()>(0);
        let (log, kv, interval) = (Arc::clone(log), Arc::clone(kv), config.maintenance_interval);
        let groups: Vec<u64> = ranges.iter().map(|r| r.group_id).collect();
        let purge_bytes_max = 2 * config.wal.segment_bytes_max;
        let thread = std::thread::Builder::new()
            .name("flotilla-maintenance".into())
            .spawn(move || {
                let (reply, done) = crossbeam_channel::unbounded();
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    for &group_id in &groups {
                        let (durable, _) = kv.durable_applied(group_id);
                        // Entries before `durable` go; the one at it stays as a margin (replay starts after it).
                        if durable <= log.first_index(group_id) {
                            continue;
                        }
                        let Some(base_term) = log.term(group_id, durable - 1) else { continue };
                        let ops = vec![LogOp::Compact { first_kept_index: durable, base_term }];
                        if log.submit(WriteRequest { group_id, ready_number: 0, ops, reply: reply.clone() }).is_err() {
                            return; // the log failed; the store reports it
                        }
                    }
                    done.try_iter().for_each(drop);
                    let _ = log.purge(purge_bytes_max);
                }
            })
            .expect("spawning the maintenance thread");
        (stop, thread)
    }

    /// The group whose range holds `key`.
    fn range_of(&self, key: &[u8]) -> &RangeDescriptor {
        let at = self.ranges.partition_point(|range| range.start.as_slice() <= key);
        &self.ranges[at.saturating_sub(1)]
    }

    fn check_sizes(&self, ops: &[Op]) -> Result<(), DbError> {
        if ops.is_empty() || ops.len() > self.config.batch_ops_max {
            return Err(DbError::InvalidArgument(format!("a batch holds 1..={} operations, not {}", self.config.batch_ops_max, ops.len())));
        }
        for op in ops {
            if op.key.len() > self.config.key_bytes_max || op.value.len() > self.config.value_bytes_max {
                return Err(DbError::InvalidArgument(format!(
                    "key of {} bytes or value of {} bytes over the limits ({} / {})",
                    op.key.len(),
                    op.value.len(),
                    self.config.key_bytes_max,
                    self.config.value_bytes_max
                )));
            }
        }
        Ok(())
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("open until closed")
    }

    /// Sends a request to `group_id` and waits for its answer, retrying while the group has no leader yet.
    fn call<T>(&self, group_id: u64, mut make: impl FnMut(crossbeam_channel::Sender<Result<T, PeerError>>) -> PeerMsg) -> Result<T, DbError> {
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            let (reply, answer) = bounded(1);
            if self.store().router().send(group_id, make(reply)).is_err() {
                // A full mailbox: back off, the group is busy.
                if Instant::now() >= deadline {
                    return Err(DbError::Busy(format!("group {group_id}'s mailbox is full")));
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match answer.recv_timeout(remaining) {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(PeerError::NotLeader { .. })) | Ok(Err(PeerError::Dropped)) if Instant::now() < deadline => {
                    // No leader yet (just opened, or an election): nothing happened; try again shortly.
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(Err(PeerError::Busy(reason))) => return Err(DbError::Busy(format!("{reason:?}"))),
                Ok(Err(PeerError::Range(RangeError::BatchSpansRanges { first_outside, .. }))) => {
                    return Err(DbError::BatchSpansRanges { first_outside })
                }
                Ok(Err(other)) if Instant::now() < deadline => return Err(DbError::Storage(format!("unexpected refusal: {other:?}"))),
                Ok(Err(_)) | Err(_) => return Err(DbError::Timeout),
            }
        }
    }

    /// Applies `batch` atomically. Its keys must lie in one group's range ([`DbError::BatchSpansRanges`]).
    pub fn write_batch(&self, batch: WriteBatch) -> Result<(), DbError> {
        self.check_sizes(&batch.ops)?;
        let range = self.range_of(&batch.ops[0].key);
        if let Some(outside) = batch.ops.iter().find(|op| !range.contains(&op.key)) {
            return Err(DbError::BatchSpansRanges { first_outside: outside.key.clone() });
        }
        let command = Command { request_id: 0, epoch: Some(range.epoch()), ops: batch.ops };
        match self.call(range.group_id, |reply| PeerMsg::Write { command: command.clone(), reply })? {
            Outcome::Done => Ok(()),
            other => Err(DbError::Storage(format!("unexpected outcome {other:?}"))),
        }
    }

    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        let mut batch = WriteBatch::new();
        batch.put(key, value);
        self.write_batch(batch)
    }

    pub fn delete(&self, key: &[u8]) -> Result<(), DbError> {
        let mut batch = WriteBatch::new();
        batch.delete(key);
        self.write_batch(batch)
    }

    /// The value of `key`, linearizable: it reflects every write acknowledged before the call.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        if key.len() > self.config.key_bytes_max {
            return Err(DbError::InvalidArgument(format!("key of {} bytes over the limit {}", key.len(), self.config.key_bytes_max)));
        }
        let group_id = self.range_of(key).group_id;
        match self.call(group_id, |reply| PeerMsg::Read { request: ReadRequest::Get(key.to_vec()), reply })? {
            ReadResult::Value(value) => Ok(value),
            ReadResult::Pairs(_) => unreachable!("a get answered with pairs"),
        }
    }

    /// Up to `limit` pairs with `start <= key < end` (`end` empty: to the end of the key space), in key order.
    /// Each group's part is linearizable on its own; the scan as a whole is not a single snapshot.
    pub fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, DbError> {
        if !end.is_empty() && end < start {
            return Err(DbError::InvalidArgument("scan end before start".into()));
        }
        let mut out = Vec::new();
        let first = self.ranges.partition_point(|range| range.start.as_slice() <= start).saturating_sub(1);
        for range in &self.ranges[first..] {
            if out.len() >= limit || (!end.is_empty() && range.start.as_slice() >= end) {
                break;
            }
            let request = ReadRequest::Scan { start: start.to_vec(), end: end.to_vec(), limit: limit - out.len() };
            match self.call(range.group_id, |reply| PeerMsg::Read { request: request.clone(), reply })? {
                ReadResult::Pairs(pairs) => out.extend(pairs),
                ReadResult::Value(_) => unreachable!("a scan answered with a value"),
            }
        }
        Ok(out)
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// How many groups the key space is split into.
    pub fn groups(&self) -> usize {
        self.ranges.len()
    }

    /// Stops the groups and makes everything applied durable in the state machine (a reopen then replays
    /// nothing). Dropping the `Db` does the same, ignoring errors.
    pub fn close(mut self) -> Result<(), DbError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), DbError> {
        if let Some((stop, thread)) = self.maintenance.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
        drop(self.store.take());
        self.flusher.flush_now().map_err(storage)?;
        if let Some(failure) = self.log.failure() {
            return Err(DbError::Storage(failure));
        }
        let _ = &self.kv;
        Ok(())
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}
