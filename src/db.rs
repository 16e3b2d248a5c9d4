//! The embedded database: [`Db`]. By default a single node whose key space is split into groups (16), each a Raft
//! group of one replica, over one shared WAL and one redb state machine in a directory. Every acknowledged write
//! is durable (it went through the WAL's fsync) and survives closing, crashing and reopening.
//!
//! With `Config::nodes` above 1, that many nodes run in the process (each in `dir/node-N` with its own WAL and
//! state machine) over an in-process transport, and every group has a replica on each: real replication, for
//! tests and benchmarks. Requests go to each group's leader, following `NotLeader` hints.
//!
//! ```no_run
//! let db = flotilla::Db::open("/tmp/flotilla-example")?;
//! db.put(b"hello", b"world")?;
//! assert_eq!(db.get(b"hello")?, Some(b"world".to_vec()));
//! db.close()?;
//! # Ok::<(), flotilla::DbError>(())
//! ```

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use flotilla_engine::disk::{Disk, StdDisk};
use flotilla_engine::state_machine::{KeyValue, StateMachine, StateMachineError, StateMachineOptions};
use flotilla_engine::wal::record::ENTRY_DATA_BYTES_MAX;
use flotilla_engine::wal::WalOptions;
use flotilla_raftstore::batch::Router;
use flotilla_raftstore::command::{Command, MergeCommand, MergeStep, Op, Outcome};
use flotilla_raftstore::meta;
use flotilla_raftstore::peer::PeerError;
use flotilla_raftstore::range::{RangeError, SplitRequest, INITIAL_GROUPS_MAX};
use flotilla_raftstore::split_trigger::{AskReason, RangeAsk, SplitOptions};
use flotilla_raftstore::store::{
    InProcessTransport, NoTransport, PeerFsm, PeerMsg, ReadRequest, ReadResult, StoreOptions, Transport,
};

use flotilla_router::route::{Answer, Attempt, RangeTable, RouteError};

use crate::db_routes::DbRoutes;
use crate::keys::KeySpace;
use crate::layout::{self, DirLock};
use crate::merge::{merge_progress, MergeProgress, GIVEN_UP};
use crate::node::Node;
use crate::splitter::Splitter;

/// Settings of an embedded database. `Config::default()` is what [`Db::open`] uses.
#[derive(Clone, Debug)]
pub struct Config {
    /// Groups the key space is split into when the database is created (later opens keep what was created), up
    /// to 2^20. Default 16.
    pub groups: u64,
    /// Nodes run in this process, each holding a replica of every group (1 to 7). Default 1: a plain embedded
    /// store. More: replication over an in-process transport, for tests and benchmarks.
    pub nodes: u64,
    /// How long a request may wait (for a leader, for the log, for apply) before it fails with
    /// [`DbError::Timeout`] — whose write may or may not have happened. Default 10 s.
    pub request_timeout: Duration,
    /// Largest key accepted. Default 4 KiB.
    pub key_bytes_max: usize,
    /// Largest value accepted. Default 8 MiB.
    pub value_bytes_max: usize,
    /// Most operations in one [`WriteBatch`]. Default 10,000.
    pub batch_ops_max: usize,
    /// Most bytes of keys and values in one [`WriteBatch`] (a batch is one log entry, and one log record holds
    /// it: see [`Config::validate`]). Default 32 MiB.
    pub batch_bytes_max: usize,
    pub wal: WalOptions,
    pub state_machine: StateMachineOptions,
    pub store: StoreOptions,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            groups: 16,
            nodes: 1,
            request_timeout: Duration::from_secs(10),
            key_bytes_max: 4 << 10,
            value_bytes_max: 8 << 20,
            batch_ops_max: 10_000,
            batch_bytes_max: 32 << 20,
            wal: WalOptions::default(),
            state_machine: StateMachineOptions::default(),
            // Splits by size (a range over 64 MiB splits near the middle of its bytes), not by load: in one
            // process the new ranges' leaders share the same cores, so a load split buys no CPU (`flotilla
            // serve` splits by load too).
            store: StoreOptions {
                split: SplitOptions { load_window_ticks: 0, ..SplitOptions::default() },
                ..StoreOptions::default()
            },
        }
    }
}

impl Config {
    /// Refuses a write batch over the limits (operations, bytes, key and value sizes); every front end checks
    /// with it (the `Db`, the server).
    pub(crate) fn check_batch(&self, ops: &[Op]) -> Result<(), DbError> {
        if ops.is_empty() || ops.len() > self.batch_ops_max {
            return Err(DbError::InvalidArgument(format!(
                "a batch holds 1..={} operations, not {}",
                self.batch_ops_max,
                ops.len()
            )));
        }
        let bytes: usize = ops.iter().map(|op| op.key.len() + op.value.len() + op.expected.len()).sum();
        if bytes > self.batch_bytes_max {
            return Err(DbError::InvalidArgument(format!(
                "a batch of {bytes} bytes of keys and values is over batch_bytes_max ({}): split it",
                self.batch_bytes_max
            )));
        }
        for op in ops {
            if op.key.len() > self.key_bytes_max || op.value.len() > self.value_bytes_max {
                return Err(DbError::InvalidArgument(format!(
                    "key of {} bytes or value of {} bytes over the limits ({} / {})",
                    op.key.len(),
                    op.value.len(),
                    self.key_bytes_max,
                    self.value_bytes_max
                )));
            }
        }
        Ok(())
    }

    /// Refuses a key over `key_bytes_max`.
    pub(crate) fn check_key(&self, key: &[u8]) -> Result<(), DbError> {
        if key.len() > self.key_bytes_max {
            return Err(DbError::InvalidArgument(format!(
                "key of {} bytes over the limit {}",
                key.len(),
                self.key_bytes_max
            )));
        }
        Ok(())
    }
}

/// How long a request waits before it asks again a node that is opening the group's replica (a split applied
/// there a moment ago: `Store::opening`).
const OPENING_RETRY_PAUSE: Duration = Duration::from_micros(200);

/// Bytes a batch's encoding adds per operation at most (field tags and length prefixes), and per command.
const OP_OVERHEAD_BYTES_MAX: usize = 32;
const COMMAND_OVERHEAD_BYTES_MAX: usize = 64;

impl Config {
    /// Refuses limits that cannot hold together: a key and a value at their limits must fit a batch, and a
    /// batch at its limits must fit one log entry ([`ENTRY_DATA_BYTES_MAX`], a WAL record's payload less its
    /// framing). Checked by every open.
    pub fn validate(&self) -> Result<(), DbError> {
        let invalid = |what: String| Err(DbError::InvalidArgument(what));
        if self.groups == 0 || self.groups > INITIAL_GROUPS_MAX {
            return invalid(format!("groups must be 1..={INITIAL_GROUPS_MAX}, not {}", self.groups));
        }
        if !(1..=7).contains(&self.nodes) {
            return invalid(format!("nodes must be 1..=7, not {}", self.nodes));
        }
        if self.key_bytes_max == 0 || self.batch_ops_max == 0 {
            return invalid("key_bytes_max and batch_ops_max must be at least 1".into());
        }
        if self.key_bytes_max.saturating_add(self.value_bytes_max) > self.batch_bytes_max {
            return invalid(format!(
                "a key of key_bytes_max ({}) and a value of value_bytes_max ({}) must fit in batch_bytes_max ({})",
                self.key_bytes_max, self.value_bytes_max, self.batch_bytes_max
            ));
        }
        let entry_max = self
            .batch_bytes_max
            .saturating_add(self.batch_ops_max.saturating_mul(OP_OVERHEAD_BYTES_MAX))
            .saturating_add(COMMAND_OVERHEAD_BYTES_MAX);
        if entry_max > ENTRY_DATA_BYTES_MAX {
            return invalid(format!(
                "a batch of batch_bytes_max ({}) in batch_ops_max ({}) operations encodes to up to {entry_max} bytes, over the \
                 {ENTRY_DATA_BYTES_MAX} one log record holds: lower batch_bytes_max",
                self.batch_bytes_max, self.batch_ops_max
            ));
        }
        Ok(())
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbError {
    /// The arguments are not acceptable (sizes, empty batch, inverted range): nothing happened.
    InvalidArgument(String),
    /// An atomic batch touched keys of more than one group: nothing happened. Split it by group: `cut_at` is
    /// where the range of the batch's first key ends (the batch's keys below it may go together; empty: the key
    /// space's end), `first_outside` the first of its keys past a range's end.
    BatchSpansRanges { first_outside: Vec<u8>, cut_at: Vec<u8> },
    /// The store is at a bound (uncommitted bytes, pending reads): nothing happened; retry later.
    Busy(String),
    /// No answer in time: a write may or may not have taken effect.
    Timeout,
    /// The replica that took the write lost track of it (a newer leader's snapshot replaced its log before the
    /// write applied there): it may or may not have taken effect.
    OutcomeUnknown,
    /// The storage failed (disk, corruption): the node stopped, and the database must be reopened after the cause
    /// is fixed. A write answered with it may or may not have taken effect.
    Storage(String),
    /// The directory is held by another open database (another process, or this one): nothing was touched.
    AlreadyOpen(String),
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbError::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            DbError::BatchSpansRanges { first_outside, cut_at } => {
                write!(
                    f,
                    "an atomic batch must stay in one group's range; key {:?} is in another (the first key's range \
                     ends at {:?})",
                    String::from_utf8_lossy(first_outside),
                    String::from_utf8_lossy(cut_at)
                )
            }
            DbError::Busy(why) => write!(f, "busy, retry later: {why}"),
            DbError::Timeout => write!(f, "no answer in time (a write may or may not have taken effect)"),
            DbError::OutcomeUnknown => {
                write!(f, "the write's outcome was lost with a change of leader (it may or may not have taken effect)")
            }
            DbError::Storage(what) => write!(f, "storage failure: {what}"),
            DbError::AlreadyOpen(what) => write!(f, "already open: {what}"),
        }
    }
}

impl std::error::Error for DbError {}

pub(crate) fn storage(error: impl std::fmt::Display) -> DbError {
    DbError::Storage(error.to_string())
}

impl From<RouteError> for DbError {
    fn from(error: RouteError) -> DbError {
        match error {
            RouteError::InvalidArgument(what) => DbError::InvalidArgument(what),
            RouteError::BatchSpansRanges { first_outside, cut_at } => {
                DbError::BatchSpansRanges { first_outside, cut_at }
            }
            RouteError::Busy(why) => DbError::Busy(why),
            RouteError::Timeout => DbError::Timeout,
            RouteError::OutcomeUnknown => DbError::OutcomeUnknown,
            RouteError::Storage(what) => DbError::Storage(what),
            RouteError::Membership(why) => DbError::InvalidArgument(why),
        }
    }
}

pub(crate) fn written(outcome: Outcome) -> Result<(), DbError> {
    match outcome {
        Outcome::Done => Ok(()),
        other => Err(DbError::Storage(format!("unexpected outcome {other:?}"))),
    }
}

pub(crate) fn value(result: ReadResult) -> Result<Option<Vec<u8>>, DbError> {
    match result {
        ReadResult::Value(value) => Ok(value),
        ReadResult::Pairs(_) => Err(DbError::Storage("a get answered with pairs".into())),
    }
}

pub(crate) fn pairs(result: ReadResult) -> Result<Vec<KeyValue>, DbError> {
    match result {
        ReadResult::Pairs(pairs) => Ok(pairs),
        ReadResult::Value(_) => Err(DbError::Storage("a scan answered with a value".into())),
    }
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
    /// The routing table as it stands (`db_routes.rs`): swapped whole after a split.
    routes: RwLock<Arc<DbRoutes>>,
    /// Splits one at a time (each takes the next unused group id): by request and as the triggers ask.
    splitting: Arc<Mutex<()>>,
    /// Proposes the splits the groups' leaders ask for (`splitter.rs`); stopped first at close.
    splitter: Splitter,
    disk: Arc<dyn Disk>,
    nodes: Vec<Node>,
    /// How the users' keys are stored (`keys.rs`): below the meta range's, where the database has one.
    keys: KeySpace,
    /// The directory's lock, held until everything above has stopped (fields drop in order).
    _lock: DirLock,
}

impl Db {
    /// Opens (creating if needed) the database in `dir` with the default [`Config`].
    pub fn open(dir: impl AsRef<Path>) -> Result<Db, DbError> {
        Db::open_with(dir, Config::default())
    }

    /// Opens (creating if needed) the database in `dir` with `config`. A database keeps the node count and groups
    /// it was created with: an open with others is refused, saying which (see `layout.rs`).
    pub fn open_with(dir: impl AsRef<Path>, config: Config) -> Result<Db, DbError> {
        Db::open_on(Arc::new(StdDisk), dir, config)
    }

    /// [`Db::open_with`] on a given [`Disk`]: the real file system ([`StdDisk`]), or a simulated one
    /// ([`flotilla_engine::disk::SimDisk`]) for tests of crashes and power cuts.
    pub fn open_on(disk: Arc<dyn Disk>, dir: impl AsRef<Path>, mut config: Config) -> Result<Db, DbError> {
        let dir = dir.as_ref().to_path_buf();
        if config.nodes == 1 {
            // With one replica a ReadIndex needs no round trip, and a lease would only hold back the first reads
            // and elections after a restart (the core's quiet period): reads by ReadIndex.
            config.store.raft.read_mode = flotilla_raft::ReadMode::Safe;
        }
        // Every replica of every group restarts with this open (the directory's lock proves the process that ran
        // them before has let go): no leader from before lives to count on a lease its followers granted, so none
        // sits out the votes of an election timeout first, and each group elects as soon as asked.
        config.store.raft.quiet_on_start = false;
        config.validate()?;
        // Nothing in the directory is read or written before its lock is held.
        let lock = layout::lock(disk.as_ref(), &dir)?;
        let layout = layout::open(disk.as_ref(), &dir, &config)?;
        config.store.meta_range = layout.has_meta_range();
        // The groups' leaders ask the splitter to split their ranges (`split_trigger.rs`).
        let (ask, asks) = crate::splitter::asks();
        config.store.range_asks = Some(ask);
        // The layout's ranges are never merged away on their own (splits' groups have higher ids).
        config.store.split.initial_groups = config.groups;
        let in_process = Arc::new(InProcessTransport::new());
        let transport: Arc<dyn Transport> =
            if config.nodes == 1 { Arc::new(NoTransport) } else { Arc::clone(&in_process) as Arc<dyn Transport> };
        let mut nodes = Vec::new();
        let mut views = Vec::new();
        for id in 1..=config.nodes {
            let node_dir = if config.nodes == 1 { dir.clone() } else { layout::node_dir(&dir, id) };
            let (node, node_ranges) = Node::open(id, &disk, &node_dir, &config, Arc::clone(&transport), Some(&layout))?;
            in_process.add_node(id, node.store().inbox());
            nodes.push(node);
            views.push(node_ranges);
        }
        // A node that had not applied a split when the database closed applies it again from its log: the table
        // does not wait for that (every node's ranges learned: the newest of each part).
        let holders: Vec<HashSet<u64>> =
            views.iter().map(|ranges| ranges.iter().map(|range| range.group_id).collect()).collect();
        let mut views = views.into_iter();
        let first = views.next().expect("at least one node");
        let table = RangeTable::new(first, config.nodes).learned(views.flatten());
        // Leaders spread over the nodes: each group campaigns where the table first looks for its leader — or,
        // if that node holds no replica of it yet (it lagged, its replica of the group the split came from was
        // caught up by a snapshot taken after the split, and the new group's leader has yet to create and fill
        // its replica), on the first node that does.
        for (position, range) in table.ranges().iter().enumerate() {
            let holds = |node: u64| holders[node as usize - 1].contains(&range.group_id);
            if !holds(table.leader(position)) {
                if let Some(node) = (1..=config.nodes).find(|&node| holds(node)) {
                    table.note_leader(position, node);
                }
            }
            nodes[table.leader(position) as usize - 1].store().campaign_all([range.group_id]);
        }
        let routes = RwLock::new(Arc::new(DbRoutes::new(table, &nodes)));
        let splitting = Arc::new(Mutex::new(()));
        let asked = AskedSplits {
            disk: Arc::clone(&disk),
            dir: dir.clone(),
            kvs: nodes.iter().map(|node| Arc::clone(&node.kv)).collect(),
            routers: nodes.iter().map(|node| node.store().router().clone()).collect(),
            splitting: Arc::clone(&splitting),
            timeout: config.request_timeout,
        };
        let splitter = Splitter::start(asks, move |wanted| asked.propose(wanted));
        let keys = KeySpace::new(layout.has_meta_range());
        Ok(Db { config, dir, routes, splitting, splitter, disk, nodes, keys, _lock: lock })
    }

    /// Every node's state machine.
    fn kvs(&self) -> Vec<Arc<StateMachine>> {
        self.nodes.iter().map(|node| Arc::clone(&node.kv)).collect()
    }

    /// The routing table as it stands now (one per attempt of a request).
    pub(crate) fn routes(&self) -> Arc<DbRoutes> {
        Arc::clone(&self.routes.read())
    }

    /// A group refused a request routed by `used` as no longer holding its keys (a split moved them): the table is
    /// rebuilt from the ranges the nodes store — unless another request did since `used` was taken — and the
    /// request routed again: at once if the ranges moved on, else after a moment (a node may not have applied
    /// the split yet, or not opened its new group), until `deadline`.
    pub(crate) fn rerouted(&self, used: &Arc<DbRoutes>, deadline: Instant) -> Result<Duration, DbError> {
        if Instant::now() >= deadline {
            return Err(DbError::Timeout);
        }
        let moved_on = self.refresh_routes(used)?;
        Ok(if moved_on { Duration::ZERO } else { Duration::from_millis(1) })
    }

    /// Rebuilds the routing table from the ranges the nodes store, if it is still `used`. Returns whether the
    /// table's ranges now differ from `used`'s.
    fn refresh_routes(&self, used: &Arc<DbRoutes>) -> Result<bool, DbError> {
        let mut routes = self.routes.write();
        if !Arc::ptr_eq(&routes, used) {
            return Ok(routes.table.ranges() != used.table.ranges());
        }
        let rebuilt = routes.rebuilt(&self.nodes)?;
        let moved_on = rebuilt.table.ranges() != used.table.ranges();
        if moved_on {
            *routes = Arc::new(rebuilt);
        }
        Ok(moved_on)
    }

    /// Sends one attempt of a request to the node believed to lead the range at `position`: the node and where
    /// its answer will come, or how long to wait before trying again (a full mailbox, or a replica opening there).
    pub(crate) fn send_attempt<T>(
        &self,
        routes: &DbRoutes,
        position: usize,
        make: &mut impl FnMut(oneshot::Sender<Result<T, PeerError>>) -> PeerMsg,
    ) -> Result<(u64, Answer<T>), Duration> {
        let (reply, answer) = oneshot::channel();
        let node = routes.table.leader(position);
        let store = self.nodes[node as usize - 1].store();
        if let Some(reason) = store.failure() {
            // The node stopped: answered at once, never sent.
            let _ = reply.send(Err(PeerError::Stopped(reason)));
            return Ok((node, answer));
        }
        let range = routes.table.range(position);
        match store.router().send(range.group_id, make(reply)) {
            Ok(()) => Ok((node, answer)),
            Err(flotilla_raftstore::batch::router::SendError::NotFound(_)) => {
                // The node holds no replica of the group. If a split applied there just made it, its replicas
                // thread is opening the replica: the next attempt goes to it again, a moment later — the split's
                // new group is led first where it was proposed, which is where the table looks (moving on cost the
                // writes a split caught a millisecond or two more, through a follower's hint and back).
                if store.opening(range.group_id) {
                    return Err(OPENING_RETRY_PAUSE);
                }
                // Otherwise a merge ended it (the table is stale), or the node has none yet (it has not applied the
                // split, or it lagged and its replica of the group the split came from was caught up by a
                // snapshot taken after the split). The next attempt goes to the next node.
                routes.table.note_leader(position, node % routes.table.nodes() + 1);
                let stale = RangeError::StaleEpoch { sent: range.epoch(), current: Box::new(range.clone()) };
                let (reply, answer) = oneshot::channel();
                let _ = reply.send(Err(PeerError::Range(stale)));
                Ok((node, answer))
            }
            Err(_) => Err(Duration::from_millis(1)), // the group is busy: back off
        }
    }

    /// Sends a request to the leader of the range at `position` and waits for its answer, following leader hints
    /// and retrying while the group has no leader, until `deadline`. `None`: the group no longer holds the
    /// request's keys as `routes` says — route it again ([`Db::rerouted`]).
    fn call<T>(
        &self,
        routes: &DbRoutes,
        position: usize,
        deadline: Instant,
        mut make: impl FnMut(oneshot::Sender<Result<T, PeerError>>) -> PeerMsg,
    ) -> Result<Option<T>, DbError> {
        loop {
            let attempt = self.send_attempt(routes, position, &mut make).map(|(node, answer)| {
                (node, answer.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok())
            });
            match judged(routes, position, deadline, attempt) {
                Ok(done) => return done,
                Err(pause) => std::thread::sleep(pause),
            }
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.config.request_timeout
    }

    /// The command of a write batch, after its checks, with its keys as stored (routed per attempt:
    /// [`DbRoutes::route_write`]).
    pub(crate) fn write_command(&self, mut batch: WriteBatch) -> Result<Command, DbError> {
        self.config.check_batch(&batch.ops)?;
        for op in &mut batch.ops {
            if let Cow::Owned(stored) = self.stored(&op.key) {
                op.key = stored;
            }
        }
        Ok(Command::write(None, batch.ops))
    }

    /// The key of a get, after its checks.
    pub(crate) fn check_key(&self, key: &[u8]) -> Result<(), DbError> {
        self.config.check_key(key)
    }

    /// Where a user's key is stored (`keys.rs`).
    pub(crate) fn stored<'a>(&self, key: &'a [u8]) -> Cow<'a, [u8]> {
        self.keys.stored(key)
    }

    /// The key space's translations (`keys.rs`).
    pub(crate) fn keys(&self) -> &KeySpace {
        &self.keys
    }

    /// `error` with the users' keys.
    pub(crate) fn users_error(&self, error: DbError) -> DbError {
        match error {
            DbError::BatchSpansRanges { first_outside, cut_at } => DbError::BatchSpansRanges {
                first_outside: self.keys.user(&first_outside),
                cut_at: self.keys.user(&cut_at),
            },
            other => other,
        }
    }

    /// Applies `batch` atomically. Its keys must lie in one group's range ([`DbError::BatchSpansRanges`]).
    pub fn write_batch(&self, batch: WriteBatch) -> Result<(), DbError> {
        let command = self.write_command(batch)?;
        let deadline = self.deadline();
        loop {
            let routes = self.routes();
            let position = routes.route_write(&command).map_err(|e| self.users_error(e))?;
            let make = |reply| PeerMsg::Write { command: command.clone(), reply };
            match self.call(&routes, position, deadline, make).map_err(|e| self.users_error(e))? {
                Some(outcome) => return written(outcome),
                None => std::thread::sleep(self.rerouted(&routes, deadline)?),
            }
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
        self.check_key(key)?;
        let key = &*self.stored(key);
        let deadline = self.deadline();
        loop {
            let routes = self.routes();
            let position = routes.table.position_of(key);
            if let Some(local) = self.local_get(&routes, position, key) {
                return local;
            }
            let make = |reply| PeerMsg::Read { request: ReadRequest::Get(key.to_vec()), reply };
            match self.call(&routes, position, deadline, make)? {
                Some(result) => return value(result),
                None => std::thread::sleep(self.rerouted(&routes, deadline)?),
            }
        }
    }

    /// The **local read path**: served on the caller's thread from the state machine of the node believed to
    /// lead the group at `position`, if that replica's published grant holds now — it leads, applied its term's
    /// first entry, and is the group's only voter (one node) or holds a leader lease (see
    /// `raftstore/src/store/local_reader.rs`). Linearizable as a read through the replica is. `None`: the read
    /// must go through the replica (which also renews what it publishes).
    pub(crate) fn local_get(
        &self,
        routes: &DbRoutes,
        position: usize,
        key: &[u8],
    ) -> Option<Result<Option<Vec<u8>>, DbError>> {
        self.local_read(routes, position, key, |kv| kv.get(key), "a read")
    }

    /// The part of a scan in the group at `position`, served locally as [`Db::local_get`] is.
    pub(crate) fn local_scan(
        &self,
        routes: &DbRoutes,
        position: usize,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Option<Result<Vec<KeyValue>, DbError>> {
        let (start, end) = routes.table.range(position).clip(start, end);
        self.local_read(routes, position, &start, |kv| kv.scan(&start, &end, limit), "a scan")
    }

    /// Runs `read` (of `key`, or of a scan from it) on the state machine of the node believed to lead the group at
    /// `position` if its grant holds (`None`: it does not); a stopped node refuses, and a failed read stops it.
    /// The read counts toward the group's load where the load trigger is on (`LocalReader::count_read`).
    fn local_read<T>(
        &self,
        routes: &DbRoutes,
        position: usize,
        key: &[u8],
        read: impl FnOnce(&StateMachine) -> Result<T, StateMachineError>,
        what: &str,
    ) -> Option<Result<T, DbError>> {
        let leader = routes.table.leader(position);
        let node = &self.nodes[leader as usize - 1];
        let store = node.store();
        let range_version = routes.table.range(position).epoch().version;
        let lease = routes.lease(position, leader);
        if !store.local_reader().holds(lease, range_version) {
            return None;
        }
        if let Some(reason) = store.failure() {
            return Some(Err(DbError::Storage(reason)));
        }
        store.local_reader().count_read(lease, routes.table.range(position).group_id, key, store.router());
        Some(read(&node.kv).map_err(|error| node.fail(format!("{what}: {error}"))))
    }

    /// Up to `limit` pairs with `start <= key < end` (`end` empty: to the end of the key space), in key order.
    /// Each group's part is linearizable on its own; the scan as a whole is not a single snapshot.
    pub fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, DbError> {
        let (start, end) = self.keys.stored_bounds(start, end);
        Ok(self.keys.users_pairs(self.scan_any(&start, &end, limit)?))
    }

    /// The meta range's table as its group has it now (a linearizable read of the meta group): the pieces of
    /// the users' key space, in order, each with the descriptor of the group that serves it as published
    /// (`flotilla_raftstore::meta`). Empty in a database of format 1, which has no meta range.
    pub fn meta_range_table(&self) -> Result<Vec<flotilla_raftstore::range::RangeDescriptor>, DbError> {
        let mut pieces: Vec<flotilla_raftstore::range::RangeDescriptor> = Vec::new();
        if !self.keys.has_meta_range() {
            return Ok(pieces);
        }
        loop {
            let from = pieces.last().map_or(Vec::new(), |piece| piece.end.clone());
            let (start, end) = meta::lookup_scan(&from);
            let page = meta::pieces(&self.scan_any(&start, &end, 1024)?);
            if page.is_empty() {
                return Ok(pieces);
            }
            pieces.extend(page);
        }
    }

    /// A scan of any keys, the system's included.
    fn scan_any(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, DbError> {
        let deadline = self.deadline();
        let mut out = Vec::new();
        // Where the part still to read starts: the ranges before it are read whole (a reroute goes on from here).
        let mut from = start.to_vec();
        'routes: loop {
            let routes = self.routes();
            for position in routes.table.scan_positions(&from, end)? {
                if out.len() >= limit {
                    break;
                }
                let part = match self.local_scan(&routes, position, &from, end, limit - out.len()) {
                    Some(local) => local?,
                    None => {
                        let request = routes.scan_request(position, &from, end, limit - out.len());
                        let make = |reply| PeerMsg::Read { request: request.clone(), reply };
                        match self.call(&routes, position, deadline, make)? {
                            Some(result) => pairs(result)?,
                            None => {
                                std::thread::sleep(self.rerouted(&routes, deadline)?);
                                continue 'routes;
                            }
                        }
                    }
                };
                out.extend(part);
                from = routes.table.range(position).end.clone();
            }
            return Ok(out);
        }
    }

    /// **Stale read**, the cheaper option: the value of `key` in the applied state of one replica (on `node`,
    /// 1-based; any node holds every group), with no round trip to a leader and no lease. It never shows data
    /// that is not committed, but it may miss writes acknowledged shortly before (a follower applies a little
    /// after the leader), and successive stale reads on different nodes may go back in time. Use [`Db::get`]
    /// when a read must reflect every acknowledged write.
    pub fn get_stale(&self, node: u64, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.check_key(key)?;
        let node = self.node(node)?;
        node.kv.get(&self.stored(key)).map_err(|error| node.fail(format!("a stale read: {error}")))
    }

    /// **Stale scan** (see [`Db::get_stale`]): up to `limit` pairs of `[start, end)` from one node's applied
    /// state, as one consistent snapshot of that replica.
    pub fn scan_stale(&self, node: u64, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, DbError> {
        self.routes().table.scan_positions(start, end)?;
        let (start, end) = self.keys.stored_bounds(start, end);
        let node = self.node(node)?;
        let pairs = node.kv.scan(&start, &end, limit).map_err(|error| node.fail(format!("a stale scan: {error}")))?;
        Ok(self.keys.users_pairs(pairs))
    }

    fn node(&self, id: u64) -> Result<&Node, DbError> {
        self.nodes
            .get((id as usize).wrapping_sub(1))
            .ok_or_else(|| DbError::InvalidArgument(format!("no node {id} (1..={})", self.nodes.len())))
    }

    /// Asks the group holding `key` to move its leadership to `node` (for spreading leaders over nodes). Returns at
    /// once; the move completes within about an election timeout (requests meanwhile follow the new leader).
    pub fn transfer_leader(&self, key: &[u8], node: u64) -> Result<(), DbError> {
        self.node(node)?;
        self.check_key(key)?;
        let key = &*self.stored(key);
        let routes = self.routes();
        let position = routes.table.position_of(key);
        let leader = routes.table.leader(position);
        let store = self.nodes[leader as usize - 1].store();
        let range = routes.table.range(position);
        // The group's replica on that node (every node holds every group here).
        let Some(replica_id) = range.replicas.iter().find(|r| r.node_id == node).map(|r| r.replica_id) else {
            return Err(DbError::InvalidArgument(format!("group {} has no replica on node {node}", range.group_id)));
        };
        let _ = store.router().send(range.group_id, PeerMsg::TransferLeader { replica_id });
        Ok(())
    }

    /// Splits the range holding `key` so that `key` starts a range of its own, served by a new group on the same
    /// nodes (no data moves; see `docs/architecture.md`, "Splits"). Done at once if `key` already starts a range.
    /// Returns once the split is applied where the range's group leads; requests for the new range follow.
    pub fn split_at(&self, key: &[u8]) -> Result<(), DbError> {
        self.check_key(key)?;
        let key = &*self.stored(key);
        if key.is_empty() {
            return Ok(()); // the first range starts there
        }
        let _one_at_a_time = self.splitting.lock();
        let deadline = self.deadline();
        loop {
            let routes = self.routes();
            let position = routes.table.position_of(key);
            let range = routes.table.range(position);
            if range.start == key {
                return Ok(());
            }
            let replicas = range.replicas.len();
            let ids = crate::db_routes::take_ids(self.disk.as_ref(), &self.dir, &self.kvs(), replicas)?;
            let split = SplitRequest::new(key.to_vec(), ids, replicas).by_request().led_where_proposed();
            let make = |reply| PeerMsg::Split { split: split.clone(), reply };
            match self.call(&routes, position, deadline, make)? {
                Some(Outcome::Split { .. }) => return self.refresh_routes(&routes).map(|_| ()),
                Some(Outcome::InvalidSplit(reason)) => return Err(DbError::InvalidArgument(reason)),
                // The range changed between routing and applying (another split came first): again.
                None => std::thread::sleep(self.rerouted(&routes, deadline)?),
                Some(other) => return Err(DbError::Storage(format!("a split answered {other:?}"))),
            }
        }
    }

    /// Merges the range holding `key` into its left neighbour: one group then serves both (no data moves; see
    /// `docs/architecture.md`, "Merges"). The left range is locked for it, the right range frozen — its
    /// requests wait a moment — and the groups carry the merge on; returns once it committed.
    /// `InvalidArgument` if the range is the first, or the two are not on the same nodes; `Busy` if one of them
    /// is in another merge, or the merge was given up (a replica could not confirm in time): nothing changed.
    pub fn merge_left(&self, key: &[u8]) -> Result<(), DbError> {
        self.check_key(key)?;
        let key = &*self.stored(key);
        let _one_at_a_time = self.splitting.lock();
        let deadline = self.deadline();
        let frozen = loop {
            self.refresh_routes(&self.routes())?; // the ranges' merge states as the nodes applied them now
            let routes = self.routes();
            if routes.table.position_of(key) == 0 {
                return Err(DbError::InvalidArgument(
                    "the range holding the key is the first: nothing to merge into".into(),
                ));
            }
            let position = routes.table.position_of(key);
            let right = routes.table.range(position).clone();
            if right.is_merging() || routes.table.range(position - 1).is_merging() {
                return Err(DbError::Busy("one of the ranges is in another merge".into()));
            }
            let prepare = MergeCommand::new(MergeStep::Prepare, None, Some(right));
            let make = |reply| PeerMsg::Merge { merge: Box::new(prepare.clone()), reply };
            let locked = match self.call(&routes, position - 1, deadline, make)? {
                Some(Outcome::Merge { range }) => *range,
                Some(Outcome::InvalidMerge(reason)) => return Err(DbError::InvalidArgument(reason)),
                None => {
                    std::thread::sleep(self.rerouted(&routes, deadline)?); // the table was stale: again
                    continue;
                }
                Some(other) => return Err(DbError::Storage(format!("a merge lock answered {other:?}"))),
            };
            let freeze = MergeCommand::new(MergeStep::Freeze, Some(locked), None);
            let make = |reply| PeerMsg::Merge { merge: Box::new(freeze.clone()), reply };
            break loop {
                match self.call(&routes, position, deadline, make)? {
                    Some(Outcome::Merge { range }) => break *range,
                    // The right range changed since the lock (the left group gives the lock up: it sees that).
                    Some(Outcome::InvalidMerge(reason)) => return Err(DbError::Busy(reason)),
                    // Not there yet on the node asked (a split's new group opens a moment after the split).
                    None => std::thread::sleep(self.rerouted(&routes, deadline)?),
                    Some(other) => return Err(DbError::Storage(format!("a merge freeze answered {other:?}"))),
                }
            };
        };
        loop {
            // (The groups carry the merge on; its commit usually applies within a few milliseconds of the freeze.)
            std::thread::sleep(Duration::from_millis(1));
            self.refresh_routes(&self.routes())?;
            let routes = self.routes();
            match merge_progress(routes.table.range(routes.table.position_of(key)), &frozen) {
                MergeProgress::Committed => return Ok(()),
                MergeProgress::GivenUp => return Err(DbError::Busy(GIVEN_UP.into())),
                MergeProgress::Waiting if Instant::now() >= deadline => return Err(DbError::Timeout),
                MergeProgress::Waiting => {}
            }
        }
    }

    /// The node each group's leader is believed to be on (by range position), as clients last learned it.
    pub fn leader_nodes(&self) -> Vec<u64> {
        self.routes().table.leaders()
    }

    /// Each node's applied index of each group (`[node][range position]`): replicas converge on the same values.
    pub fn applied_indexes(&self) -> Vec<Vec<u64>> {
        self.nodes
            .iter()
            .map(|node| self.routes().table.ranges().iter().map(|range| node.kv.applied(range.group_id).0).collect())
            .collect()
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// How many groups the users' keys are split into (the splits the nodes applied included; the meta range
    /// not counted).
    pub fn groups(&self) -> usize {
        self.ranges().len()
    }

    /// The ranges of the users' keys, in key order, as the nodes applied them (the newest of each part): each
    /// one's bounds, group, epoch and replicas. (Not the meta range: [`Db::meta_range_table`].)
    pub fn ranges(&self) -> Vec<flotilla_raftstore::range::RangeDescriptor> {
        let _ = self.refresh_routes(&self.routes()); // (a state file that cannot say: the table as it stands)
        self.routes().table.ranges().iter().filter(|range| !range.is_meta()).cloned().collect()
    }

    /// Stops the groups and makes everything applied durable in the state machine (a reopen then replays
    /// nothing). Dropping the `Db` does the same, ignoring errors.
    pub fn close(mut self) -> Result<(), DbError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), DbError> {
        self.splitter.stop();
        // Every node's replicas stop first (they talk to each other), then each node's engines finish.
        let mut failure = None;
        for node in &mut self.nodes {
            if let Err(error) = node.stop() {
                failure.get_or_insert(error);
            }
        }
        for node in &self.nodes {
            if let Err(error) = node.finish(failure.is_none()) {
                failure.get_or_insert(error);
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// What the splitter needs to propose the splits the groups' leaders ask for (`splitter.rs`).
struct AskedSplits {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    kvs: Vec<Arc<StateMachine>>,
    routers: Vec<Router<PeerFsm>>,
    splitting: Arc<Mutex<()>>,
    timeout: Duration,
}

impl AskedSplits {
    /// Proposes the split on the asking leader's replica, under ids taken as [`Db::split_at`] takes them; waits
    /// for it to apply there (requests routed by the older table are refused and routed again). A merge: locks
    /// the left range and freezes the asking one, as [`Db::merge_left`] does (the groups carry it on). A failure
    /// drops the ask: the trigger asks again.
    fn propose(&self, wanted: RangeAsk) {
        if wanted.reason == AskReason::Publish {
            return self.publish(wanted.range);
        }
        let _one_at_a_time = self.splitting.lock();
        if let AskReason::Merge { .. } = wanted.reason {
            return self.merge(wanted.range.group_id);
        }
        let replicas = wanted.range.replicas.len();
        let Ok(ids) = crate::db_routes::take_ids(self.disk.as_ref(), &self.dir, &self.kvs, replicas) else { return };
        let split = SplitRequest::new(wanted.split_key, ids, replicas).led_where_proposed();
        let (reply, answer) = oneshot::channel();
        let Some(router) = self.routers.get(wanted.node_id as usize - 1) else { return };
        if router.send(wanted.range.group_id, PeerMsg::Split { split, reply }).is_ok() {
            let _ = answer.recv_timeout(self.timeout);
        }
    }

    /// Hands a publication in the meta range to the meta group's replica on the first node that has one (every
    /// node of a `Db` holds every group, so the asking node's own replica normally takes it first).
    fn publish(&self, range: flotilla_raftstore::range::RangeDescriptor) {
        let Ok(stored) = crate::node::stored_ranges(&self.kvs[0]) else { return };
        let Some(meta) = stored.iter().find(|range| range.is_meta()) else { return };
        let command = Box::new(Command::publish(range));
        for router in &self.routers {
            if router.send(meta.group_id, PeerMsg::Ask { command: command.clone() }).is_ok() {
                return;
            }
        }
    }

    /// Locks the left neighbour of group `right`'s range and freezes it, as [`Db::merge_left`] does, with both
    /// ranges as node 1 applied them now. A neighbour in a merge of its own (merges of cold ranges come in runs)
    /// is waited for, a while; the groups carry the merge on from the freeze.
    fn merge(&self, right: u64) {
        let deadline = Instant::now() + self.timeout;
        while Instant::now() < deadline {
            let Ok(stored) = crate::node::routable_ranges(&self.kvs[0]) else { return };
            let Some(range) = stored.iter().find(|range| range.group_id == right).cloned() else { return };
            let Some(left) = stored.iter().find(|left| !left.end.is_empty() && left.end == range.start) else { return };
            if !range.is_merging() && !left.is_merging() {
                let prepare = MergeCommand::new(MergeStep::Prepare, None, Some(range));
                if let Some(Outcome::Merge { range: locked }) = self.on_leader(left.group_id, prepare) {
                    let freeze = MergeCommand::new(MergeStep::Freeze, Some(*locked), None);
                    let _ = self.on_leader(right, freeze);
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Proposes a merge step to group `group_id` on whichever node's replica takes it (leads), within the
    /// timeout: the outcome.
    fn on_leader(&self, group_id: u64, merge: MergeCommand) -> Option<Outcome> {
        let deadline = Instant::now() + self.timeout;
        while Instant::now() < deadline {
            for router in &self.routers {
                let (reply, answer) = oneshot::channel();
                let message = PeerMsg::Merge { merge: Box::new(merge.clone()), reply };
                if router.send(group_id, message).is_err() {
                    continue;
                }
                match answer.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(Ok(outcome)) => return Some(outcome),
                    Ok(Err(PeerError::NotLeader { .. })) => continue,
                    _ => return None,
                }
            }
            std::thread::sleep(Duration::from_millis(10)); // no leader yet
        }
        None
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

/// One attempt of [`Db::call`] (and of its async twin) judged: `Ok` — the call is over, with this result (`None`:
/// route it again); `Err` — pause this long, then attempt again. `attempt` is the node asked and its answer
/// (`None`: none by `deadline`), or the pause [`Db::send_attempt`] asked for when it could not send.
pub(crate) fn judged<T>(
    routes: &DbRoutes,
    position: usize,
    deadline: Instant,
    attempt: Result<(u64, Option<Result<T, PeerError>>), Duration>,
) -> Result<Result<Option<T>, DbError>, Duration> {
    match attempt {
        Ok((node, got)) => match routes.table.judge(position, node, got, deadline) {
            Attempt::Done(value) => Ok(Ok(Some(value))),
            Attempt::Fail(error) => Ok(Err(error.into())),
            Attempt::Retry(pause) => Err(pause),
            Attempt::Reroute => Ok(Ok(None)),
        },
        Err(_) if Instant::now() >= deadline => {
            Ok(Err(DbError::Busy("the group's mailbox stayed full, or its replica was still opening".into())))
        }
        Err(pause) => Err(pause),
    }
}

#[cfg(test)]
mod tests {
    use super::{Config, Db, DbError, PeerMsg, SplitRequest};
    use flotilla_engine::log_engine::LogEngine;
    use std::time::{Duration, Instant};

    #[test]
    fn requests_routed_by_the_table_before_a_split_are_routed_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_with(dir.path(), Config { groups: 1, nodes: 3, ..Config::default() }).unwrap();
        for i in 0..40u32 {
            db.put(format!("k{i:02}").as_bytes(), b"v").unwrap();
        }
        // Split behind the table's back: it still says one range of the users' keys (and the meta range), group
        // 1 holds every key.
        let routes = db.routes();
        let split = SplitRequest::new(b"k20".to_vec(), (10, 11), 3);
        let make = |reply| PeerMsg::Split { split: split.clone(), reply };
        assert!(db.call(&routes, 0, db.deadline(), make).unwrap().is_some());
        assert_eq!(db.routes().table.len(), 2, "the table has not seen it");
        // A write of a key the split left in group 1 takes effect there at once: a write is checked by its keys
        // where it applies, not refused for the range version it was routed with.
        db.put(b"k05", b"w").unwrap();
        assert_eq!(db.routes().table.len(), 2, "not routed again");
        // A write, a read and a scan of the split-off keys are refused by group 1, and routed again.
        db.put(b"k30", b"w").unwrap();
        assert_eq!(db.routes().table.len(), 3, "the table was rebuilt from the stored ranges");
        assert_eq!(db.get(b"k30").unwrap().as_deref(), Some(&b"w"[..]));
        let routes_now = db.routes();
        assert_eq!(routes_now.table.range(1).group_id, 10);
        drop(routes_now);
        // A scan started with the old table (its epoch refused) goes on from where it was.
        *db.routes.write() = routes;
        assert_eq!(db.scan(b"", b"", usize::MAX).unwrap().len(), 40);
        assert_eq!(db.routes().table.len(), 3);
        db.close().unwrap();
    }

    #[test]
    fn a_node_holding_no_replica_of_a_group_sends_its_requests_to_the_next_node() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_with(dir.path(), Config { groups: 1, nodes: 3, ..Config::default() }).unwrap();
        db.put(b"k", b"v").unwrap();
        // The node the table looks to for the group's leader holds no replica of it — as a node that has not
        // applied the split that makes a group, or lagged and had the group the split came from caught up by a
        // snapshot taken after the split (a reopened database's requests went only there until their deadline).
        let routes = db.routes();
        let position = routes.table.position_of(&db.stored(b"k"));
        let (group, node) = (routes.table.range(position).group_id, routes.table.leader(position));
        assert!(db.nodes[node as usize - 1].store().router().unregister(group).is_some());
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        db.put(b"k", b"w").unwrap();
        assert_ne!(db.routes().table.leader(position), node);
        drop(routes);
        db.close().unwrap();
    }

    /// A node whose replica of the group is opening (a split applied there a moment ago) is asked again, not left
    /// for the next node: the split's new group is led first there.
    #[test]
    fn a_node_opening_the_groups_replica_is_asked_again_until_it_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { groups: 1, nodes: 3, request_timeout: Duration::from_secs(2), ..Config::default() };
        let db = Db::open_with(dir.path(), config).unwrap();
        db.put(b"k", b"v").unwrap();
        let routes = db.routes();
        let position = routes.table.position_of(&db.stored(b"k"));
        let (group, node) = (routes.table.range(position).group_id, routes.table.leader(position));
        drop(routes);
        let store = db.nodes[node as usize - 1].store();
        assert!(store.router().unregister(group).is_some());
        store.set_opening(group, true);
        // (A replica that never opens: the write waits on that node until its deadline.)
        assert!(matches!(db.put(b"k", b"w"), Err(DbError::Busy(why)) if why.contains("opening")));
        assert_eq!(db.routes().table.leader(position), node, "it stayed with the node opening the replica");
        store.set_opening(group, false);
        db.put(b"k", b"w").unwrap();
        assert_ne!(db.routes().table.leader(position), node, "then went on to the next");
        db.close().unwrap();
    }

    #[test]
    fn every_log_is_compacted_and_the_wal_purged_as_the_state_machine_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config { groups: 4, ..Config::default() };
        config.state_machine.memtable_bytes_max = 64 << 10;
        config.wal.segment_bytes_max = 256 << 10;
        config.store.log_gc_interval = Duration::from_millis(20);
        config.store.log_bytes_max = 2 * (256 << 10);
        let db = Db::open_with(dir.path(), config).unwrap();
        let value = vec![b'v'; 1024];
        for i in 0..4_000u32 {
            db.put(&i.wrapping_mul(0x9E37_79B9).to_be_bytes(), &value).unwrap();
            // spread over the groups
        }
        let log = &db.nodes[0].log;
        let groups: Vec<u64> = db.ranges().iter().map(|r| r.group_id).collect(); // (the meta range is not written)
                                                                                 // 4 MB written: the memtable checkpointed many times; every group's log is compacted behind it and the
                                                                                 // WAL purged down to about two segments (the active one cannot go).
        let deadline = Instant::now() + Duration::from_secs(20);
        let compacted = |group: &u64| log.first_index(*group) > 100;
        while !(groups.iter().all(compacted) && log.state().total_bytes() <= 4 * (256 << 10)) {
            assert!(
                Instant::now() < deadline,
                "not compacted and purged: first indexes {:?}, WAL {} bytes",
                groups.iter().map(|g| log.first_index(*g)).collect::<Vec<_>>(),
                log.state().total_bytes()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        db.close().unwrap();
    }
}
