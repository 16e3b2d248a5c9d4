//! A server's requests, routed: each goes to the group's leader — this node's store if it leads (reads served on
//! the caller's task while its grant holds, `store/local_reader.rs`), else forwarded over the transport to the
//! node believed to lead, which runs it on its own store. Answers are judged by the router's policy
//! (`router/src/route.rs`: follow not-leader hints, wait out transfers, fail typed), within the request timeout.
//! A forwarded request is never forwarded again: a node that no longer leads answers "not leader" with its hint,
//! and the node that forwarded it tries again.
//!
//! Metrics: `flotilla_requests_forwarded_total` (requests this node sent to another to run, by `range`: `data` —
//! a client that routes to leaders keeps it near zero — or `meta`, the meta range's publications and lookups),
//! `flotilla_forwarded_reads_local_total` (reads other nodes forwarded here that were served from the state machine
//! at once, under the local read grant, without a poll round), `flotilla_routes_learned_from_meta_total`,
//! `flotilla_combined_puts` (a histogram: the plain puts of each combined write, `put_combiner.rs`) and
//! `flotilla_combined_puts_recut_total` (combined writes whose keys no longer lay in one range, written one by
//! one).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_engine::disk::Disk;
use flotilla_engine::state_machine::{KeyValue, StateMachine};
use flotilla_raftstore::batch::Router;
use flotilla_raftstore::command::{Command, MergeCommand, MergeStep, Op, Outcome};
use flotilla_raftstore::meta::{self, NodeEntry};
use flotilla_raftstore::peer::{MembershipChange, PeerError};
use flotilla_raftstore::range::{RangeDescriptor, RangeError, SplitRequest};
use flotilla_raftstore::store::local_reader::{LocalReader, ReadLease};
use flotilla_raftstore::store::{PeerFsm, PeerMsg, ReadRequest, ReadResult, WriteReply};
use flotilla_router::route::{Attempt, RangeTable, RouteError};
use flotilla_router::transport::wire::{
    AddLearner, ForwardOp, ForwardReply, ForwardRequest, ForwardResult, Keys, OptionalValue, Pairs, PreconditionFailed,
    Refusal, ScanRange, Values,
};
use flotilla_router::transport::{ForwardHandler, TcpTransport};
use futures_util::stream::{FuturesUnordered, StreamExt};
use parking_lot::{Mutex, RwLock};

use crate::client::Route;
use crate::db::{Config, DbError};
use crate::keys::KeySpace;
use crate::merge::{merge_progress, MergeProgress, GIVEN_UP};

use super::put_combiner::{Answers, Joined, PutCombiner};

/// A request the checks refused.
fn refused(error: DbError) -> RouteError {
    match error {
        DbError::InvalidArgument(what) => RouteError::InvalidArgument(what),
        other => RouteError::InvalidArgument(other.to_string()),
    }
}

/// Pieces of the meta range's table read per lookup (the one holding the key and those after it: a scan goes on
/// through them).
const META_LOOKUP_PIECES: u64 = 16;

/// The key a write is routed by (its first).
fn command_key(op: &ForwardOp) -> &[u8] {
    match op {
        ForwardOp::Write(command) => command.ops.first().map_or(&[], |op| op.key.as_slice()),
        _ => &[],
    }
}

/// The answers of requests handled in parts, in the requests' order: `answers` holds those given already, each
/// part the indexes of its requests and their answers.
fn in_order<T>(mut answers: Vec<Option<T>>, parts: Vec<(Vec<usize>, Vec<T>)>) -> Vec<T> {
    for (indexes, results) in parts {
        for (i, result) in indexes.into_iter().zip(results) {
            answers[i] = Some(result);
        }
    }
    answers.into_iter().map(|answer| answer.expect("every request answered")).collect()
}

/// A plain put's answer from its write's outcome (a put has no precondition: anything but done is a fault).
fn put_answer(written: Result<Outcome, RouteError>) -> Result<(), RouteError> {
    match written? {
        Outcome::Done => Ok(()),
        other => Err(RouteError::Storage(format!("a put answered {other:?}"))),
    }
}

/// How long one attempt of a node's registration in the meta range waits for its answer.
const REGISTER_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a forwarded read waits before it is tried elsewhere (reads may be; writes wait for their answer).
const READ_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a group answered.
#[derive(Debug)]
pub enum Answered {
    Written(Outcome),
    Value(Option<Vec<u8>>),
    /// A `Gets`' values, in its keys' order.
    Values(Vec<Option<Vec<u8>>>),
    Pairs(Vec<KeyValue>),
}

/// The routing table as it stands, with each range's grant on this node: taken whole by each attempt (so that the
/// range, the group and the grant it routes by belong together), swapped whole when the node learns of a split.
pub struct Routes {
    pub table: RangeTable,
    /// Per range position: the group's grant on this node.
    leases: Vec<Arc<ReadLease>>,
    /// `LocalReader::ranges_changed` when the table last learned this node's ranges.
    ranges_seen: AtomicU64,
}

impl Routes {
    fn new(table: RangeTable, reader: &LocalReader, ranges_seen: u64) -> Routes {
        let leases = table.ranges().iter().map(|range| reader.lease(range.group_id)).collect();
        Routes { table, leases, ranges_seen: AtomicU64::new(ranges_seen) }
    }

    /// Notes in the table the leader this node's replica of the group at `position` knows, if it holds one that
    /// knows a leader: the table's own guess is corrected only by the requests this node routed itself.
    fn learn_leader(&self, position: usize) {
        if let Some(hint) = self.leases[position].leader_hint() {
            self.table.note_leader(position, hint);
        }
    }
}

/// The node's request router (shared by its RESP and HTTP connections, and the transport's forwarded requests).
pub struct Requests {
    node_id: u64,
    cluster_id: String,
    routes: RwLock<Arc<Routes>>,
    router: Router<PeerFsm>,
    reader: Arc<LocalReader>,
    kv: Arc<StateMachine>,
    transport: Arc<TcpTransport>,
    /// The request checks and timeout, as the embedded `Db`'s (`Config::check_batch`, `check_key`).
    limits: Config,
    /// Where the ids of the groups this node's splits make are recorded (`db_routes::IDS_FILE`), one split at a
    /// time.
    split_ids: Mutex<(Arc<dyn Disk>, PathBuf)>,
    next_id: AtomicU64,
    /// Forwarded requests waiting for their answer, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<ForwardReply>>>,
    /// How the users' keys are stored (`keys.rs`): below the meta range's, where the cluster has one.
    keys: KeySpace,
    /// Plain puts per group, combined across connections (`put_combiner.rs`).
    combiner: PutCombiner,
}

/// How long a request whose group refused it as routed waits before it is routed again, if the node's stored
/// ranges showed nothing new (this node has not applied the split yet).
const REROUTE_PAUSE: Duration = Duration::from_millis(20);

impl Requests {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: u64,
        cluster_id: String,
        ranges: Vec<RangeDescriptor>,
        nodes: u64,
        router: Router<PeerFsm>,
        reader: Arc<LocalReader>,
        kv: Arc<StateMachine>,
        transport: Arc<TcpTransport>,
        limits: Config,
        ids: (Arc<dyn Disk>, PathBuf),
    ) -> Requests {
        let keys = KeySpace::of(&ranges);
        let table = RangeTable::new(ranges, nodes);
        // What this node applied since it was created (a split) is learned at once.
        let seen = reader.ranges_changed();
        let table = table.learned(crate::node::routable_ranges(&kv).unwrap_or_default());
        let routes = RwLock::new(Arc::new(Routes::new(table, &reader, seen)));
        Requests {
            node_id,
            cluster_id,
            routes,
            router,
            reader,
            kv,
            transport,
            split_ids: Mutex::new(ids),
            next_id: AtomicU64::new(1),
            pending: Mutex::default(),
            keys,
            combiner: PutCombiner::new(limits.batch_ops_max, limits.batch_bytes_max),
            limits,
        }
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The routing table as it stands (swapped whole after a split), having learned the splits and merges this
    /// node applied: a request is not first sent by ranges this node knows to be gone (to be refused, and learnt
    /// from, only then).
    pub fn table(&self) -> Arc<Routes> {
        let routes = Arc::clone(&self.routes.read());
        if routes.ranges_seen.load(Ordering::Acquire) == self.reader.ranges_changed() {
            return routes;
        }
        let _ = self.relearn(&routes, None);
        Arc::clone(&self.routes.read())
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Every node of the cluster this node knows, and where it listens for the others.
    pub fn nodes(&self) -> std::collections::BTreeMap<u64, String> {
        self.transport.nodes()
    }

    /// The descriptors of the groups this node holds a replica of, as last applied here (none if the state file
    /// cannot say: status only).
    pub fn descriptors(&self) -> HashMap<u64, RangeDescriptor> {
        let stored = crate::node::routable_ranges(&self.kv).unwrap_or_default();
        stored.into_iter().map(|range| (range.group_id, range)).collect()
    }

    /// Adds a learner on node `node_id`, listening at `addr`, to the group at `position` of `routes` (`join.rs`);
    /// done once applied, or if the group has exactly that replica already.
    pub async fn add_learner(
        &self,
        routes: &Arc<Routes>,
        position: usize,
        node_id: u64,
        addr: &str,
    ) -> Result<(), RouteError> {
        let op = ForwardOp::AddLearner(AddLearner { node_id, replica_id: node_id, addr: addr.to_string() });
        let deadline = Instant::now() + self.limits.request_timeout;
        match self.route(routes, position, &op, deadline).await? {
            Some(Answered::Written(Outcome::Done)) => Ok(()),
            None => Err(RouteError::Membership("the group's range changed meanwhile".into())),
            Some(other) => Err(RouteError::Membership(format!("adding a learner on node {node_id}: {other:?}"))),
        }
    }

    /// Every range, in key order, with where its believed leader serves clients (the splits this node applied
    /// learned first).
    pub fn routes(&self) -> Vec<Route> {
        let _ = self.relearn(&self.table(), None); // (a state file that cannot say: the table as it stands)
        let routes = self.table();
        let table = &routes.table;
        (0..table.len())
            .map(|position| {
                let range = table.range(position);
                // (A client that routes by these answers sends nothing here for groups it was told lead elsewhere.)
                routes.learn_leader(position);
                let leader = table.leader(position);
                Route {
                    start: range.start.clone(),
                    end: range.end.clone(),
                    group_id: range.group_id,
                    leader,
                    leader_addr: self.transport.client_addr(leader),
                }
            })
            .collect()
    }

    /// The value of `key` from this node's state machine, if this node leads its group and may serve reads
    /// without asking (`store/local_reader.rs`); `None`: it must be routed.
    pub fn get_local(&self, key: &[u8]) -> Option<Result<Option<Vec<u8>>, RouteError>> {
        if let Err(error) = self.limits.check_key(key) {
            return Some(Err(refused(error)));
        }
        self.get_local_stored(&self.keys.stored(key))
    }

    /// [`Requests::get_local`] of a stored key.
    fn get_local_stored(&self, key: &[u8]) -> Option<Result<Option<Vec<u8>>, RouteError>> {
        let routes = self.table();
        let position = routes.table.position_of(key);
        let range = routes.table.range(position);
        let lease = &routes.leases[position];
        if routes.table.leader(position) != self.node_id || !self.reader.holds(lease, range.epoch().version) {
            return None;
        }
        self.reader.count_read(lease, range.group_id, key, &self.router);
        Some(self.kv.get(key).map_err(|error| RouteError::Storage(error.to_string())))
    }

    /// The value of `key`, linearizable.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RouteError> {
        self.limits.check_key(key).map_err(refused)?;
        self.get_stored(&self.keys.stored(key)).await
    }

    /// The values of `keys`, each read linearizable and answered on its own (a connection's pipelined `GET`s
    /// this node could not serve locally): those one range holds are read together — one route and one forward
    /// for all of them. Where the ranges changed under them, each key is read on its own.
    pub async fn get_each(&self, keys: Vec<Vec<u8>>) -> Vec<Result<Option<Vec<u8>>, RouteError>> {
        let routes = self.table();
        let mut answers: Vec<Option<Result<Option<Vec<u8>>, RouteError>>> = (0..keys.len()).map(|_| None).collect();
        // Per range position: the indexes into `keys` and the stored keys.
        let mut parts: HashMap<usize, (Vec<usize>, Vec<Vec<u8>>)> = HashMap::new();
        for (i, key) in keys.into_iter().enumerate() {
            if let Err(error) = self.limits.check_key(&key) {
                answers[i] = Some(Err(refused(error)));
                continue;
            }
            let key = match self.keys.stored(&key) {
                Cow::Owned(stored) => stored,
                Cow::Borrowed(_) => key,
            };
            let (indexes, stored) = parts.entry(routes.table.position_of(&key)).or_default();
            indexes.push(i);
            stored.push(key);
        }
        let read = parts.into_values().map(|(indexes, keys)| async move { (indexes, self.get_part(keys).await) });
        in_order(answers, futures_util::future::join_all(read).await)
    }

    /// Stored keys one range held as routed, read together; an answer per key.
    async fn get_part(&self, keys: Vec<Vec<u8>>) -> Vec<Result<Option<Vec<u8>>, RouteError>> {
        let count = keys.len();
        let one_by_one = |keys: Vec<Vec<u8>>| async move {
            let reads = keys.iter().map(|key| self.get_stored(key)).collect::<Vec<_>>();
            futures_util::future::join_all(reads).await
        };
        if count == 1 {
            return one_by_one(keys).await;
        }
        let deadline = Instant::now() + self.limits.request_timeout;
        let routes = self.table();
        let Ok(position) = routes.table.batch_position(keys.iter().map(Vec::as_slice)) else {
            return one_by_one(keys).await;
        };
        let op = ForwardOp::Gets(Keys { keys });
        match self.route(&routes, position, &op, deadline).await {
            Ok(Some(Answered::Values(values))) if values.len() == count => values.into_iter().map(Ok).collect(),
            Ok(Some(other)) => vec![Err(RouteError::Storage(format!("reads answered {other:?}"))); count],
            Ok(None) => match op {
                // The group no longer holds them all as routed: each read on its own, routed afresh.
                ForwardOp::Gets(Keys { keys }) => one_by_one(keys).await,
                _ => unreachable!("reads"),
            },
            Err(error) => vec![Err(error); count],
        }
    }

    /// [`Requests::get`] of a stored key.
    async fn get_stored(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RouteError> {
        if let Some(local) = self.get_local_stored(key) {
            return local;
        }
        let deadline = Instant::now() + self.limits.request_timeout;
        loop {
            let routes = self.table();
            let position = routes.table.position_of(key);
            match self.route(&routes, position, &ForwardOp::Get(key.to_vec()), deadline).await? {
                Some(Answered::Value(value)) => return Ok(value),
                Some(other) => return Err(RouteError::Storage(format!("a read answered {other:?}"))),
                None => self.rerouted(&routes, key, deadline).await?,
            }
        }
    }

    /// Applies `ops` atomically; their keys must lie in one group's range ([`RouteError::BatchSpansRanges`]).
    pub async fn write(&self, mut ops: Vec<Op>) -> Result<Outcome, RouteError> {
        self.limits.check_batch(&ops).map_err(refused)?;
        for op in &mut ops {
            if let Cow::Owned(stored) = self.keys.stored(&op.key) {
                op.key = stored;
            }
        }
        self.write_stored(ops, self.limits.request_timeout).await.map_err(|error| match error {
            RouteError::BatchSpansRanges { first_outside, cut_at } => RouteError::BatchSpansRanges {
                first_outside: self.keys.user(&first_outside),
                cut_at: self.keys.user(&cut_at),
            },
            other => other,
        })
    }

    /// Independent plain puts, each a request of its own with its own answer (a connection's pipelined `SET`s):
    /// those whose keys one range holds go to its group together, and with the puts for that group from the
    /// node's other connections (`put_combiner.rs`) — one route, one forward, one proposal for all of them
    /// instead of one each. Where the ranges changed under a combined write (its keys no longer lie in one
    /// range), its puts are written one by one.
    pub async fn put_each(self: &Arc<Self>, puts: Vec<(Vec<u8>, Vec<u8>)>) -> Answers {
        let routes = self.table();
        let mut answers: Vec<Option<Result<(), RouteError>>> = (0..puts.len()).map(|_| None).collect();
        // Per range position: its parts, each within the batch limits (indexes into `puts`, operations, bytes).
        let mut parts: Vec<(u64, Vec<usize>, Vec<Op>, usize)> = Vec::new();
        let mut open_part: HashMap<usize, usize> = HashMap::new();
        for (i, (key, value)) in puts.into_iter().enumerate() {
            let mut op = Op::put(key, value);
            if let Err(error) = self.limits.check_batch(std::slice::from_ref(&op)) {
                answers[i] = Some(Err(refused(error)));
                continue;
            }
            if let Cow::Owned(stored) = self.keys.stored(&op.key) {
                op.key = stored;
            }
            let bytes = op.key.len() + op.value.len();
            let position = routes.table.position_of(&op.key);
            let part = match open_part.get(&position) {
                Some(&at)
                    if parts[at].2.len() < self.limits.batch_ops_max
                        && parts[at].3 + bytes <= self.limits.batch_bytes_max =>
                {
                    at
                }
                _ => {
                    parts.push((routes.table.range(position).group_id, Vec::new(), Vec::new(), 0));
                    open_part.insert(position, parts.len() - 1);
                    parts.len() - 1
                }
            };
            let (_, indexes, ops, part_bytes) = &mut parts[part];
            indexes.push(i);
            ops.push(op);
            *part_bytes += bytes;
        }
        let deadline = Instant::now() + self.limits.request_timeout;
        let written = parts
            .into_iter()
            .map(|(group_id, indexes, ops, _)| async move { (indexes, self.put_part(group_id, ops, deadline).await) });
        in_order(answers, futures_util::future::join_all(written).await)
    }

    /// One part of [`Requests::put_each`]: puts on stored keys the range of `group_id` held as routed, written
    /// with the others queued for the group; an answer per put (`Timeout` if none came by `deadline`).
    async fn put_part(self: &Arc<Self>, group_id: u64, ops: Vec<Op>, deadline: Instant) -> Answers {
        let count = ops.len();
        match self.combiner.join(group_id, ops) {
            Joined::Alone(ops) => self.write_puts(ops, deadline).await,
            Joined::Queued { answers, start_flusher } => {
                if start_flusher {
                    let requests = Arc::clone(self);
                    self.transport.runtime().spawn(async move { requests.flush_puts(group_id).await });
                }
                match tokio::time::timeout_at(deadline.into(), answers).await {
                    Ok(Ok(answers)) => answers,
                    // (Its batch may still be written.)
                    _ => vec![Err(RouteError::Timeout); count],
                }
            }
        }
    }

    /// The flusher of `group_id`'s combined puts: writes what its queue holds, batch after batch, until it is
    /// empty.
    async fn flush_puts(&self, group_id: u64) {
        while let Some((ops, waiters)) = self.combiner.take(group_id) {
            metrics::histogram!("flotilla_combined_puts").record(ops.len() as f64);
            let deadline = Instant::now() + self.limits.request_timeout;
            waiters.answer(self.write_puts(ops, deadline).await);
        }
    }

    /// Plain puts on stored keys, as one command; an answer per put. If they lie in more than one range (the
    /// ranges changed since they were grouped), one by one.
    async fn write_puts(&self, ops: Vec<Op>, deadline: Instant) -> Answers {
        let count = ops.len();
        let within = deadline.saturating_duration_since(Instant::now());
        let answer = match self.write_stored_or_back(ops, within).await {
            Err((RouteError::BatchSpansRanges { .. }, ops)) => {
                metrics::counter!("flotilla_combined_puts_recut_total").increment(1);
                let within = deadline.saturating_duration_since(Instant::now());
                let one_by_one =
                    ops.into_iter().map(|op| async move { put_answer(self.write_stored(vec![op], within).await) });
                return futures_util::future::join_all(one_by_one).await;
            }
            written => put_answer(written.map_err(|(error, _)| error)),
        };
        vec![answer; count]
    }

    /// [`Requests::write`] of operations on stored keys (the system's too).
    async fn write_stored(&self, ops: Vec<Op>, timeout: Duration) -> Result<Outcome, RouteError> {
        self.write_stored_or_back(ops, timeout).await.map_err(|(error, _)| error)
    }

    /// [`Requests::write_stored`], giving the operations back with an error (a caller whose batch no longer lies
    /// in one range cuts it again).
    async fn write_stored_or_back(&self, ops: Vec<Op>, timeout: Duration) -> Result<Outcome, (RouteError, Vec<Op>)> {
        let deadline = Instant::now() + timeout;
        // One operation for every attempt. Without an epoch: the group checks its keys where it applies, which is
        // all a write needs (the `Db`'s `DbRoutes::route_write` says why).
        let op = ForwardOp::Write(Command::write(None, ops));
        let ForwardOp::Write(command) = &op else { unreachable!("a write") };
        let give_back = |error: RouteError, op: ForwardOp| match op {
            ForwardOp::Write(command) => (error, command.ops),
            _ => unreachable!("a write"),
        };
        loop {
            let routes = self.table();
            let position = match routes.table.batch_position(command.ops.iter().map(|op| op.key.as_slice())) {
                Ok(position) => position,
                Err(error) => return Err(give_back(error, op)),
            };
            let rerouted = match self.route(&routes, position, &op, deadline).await {
                Ok(Some(Answered::Written(outcome))) => return Ok(outcome),
                Ok(Some(other)) => Err(RouteError::Storage(format!("a write answered {other:?}"))),
                Ok(None) => self.rerouted(&routes, command_key(&op), deadline).await,
                Err(error) => Err(error),
            };
            if let Err(error) = rerouted {
                return Err(give_back(error, op));
            }
        }
    }

    /// Up to `limit` pairs of `[start, end)` in key order; each group's part linearizable. A part refused
    /// because its range changed is read again, by the table as it is then, from where the scan stood.
    pub async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, RouteError> {
        if !end.is_empty() && end < start {
            return Err(RouteError::InvalidArgument("scan end before start".into()));
        }
        let (start, end) = self.keys.stored_bounds(start, end);
        Ok(self.keys.users_pairs(self.scan_stored(&start, &end, limit).await?))
    }

    /// [`Requests::scan`] of stored keys (the system's too).
    async fn scan_stored(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, RouteError> {
        let deadline = Instant::now() + self.limits.request_timeout;
        let mut out = Vec::new();
        let mut cursor = start.to_vec();
        while out.len() < limit {
            let routes = self.table();
            let position = routes.table.position_of(&cursor);
            let range = routes.table.range(position);
            let scan = ScanRange {
                start: cursor.clone(),
                end: end.to_vec(),
                limit: (limit - out.len()) as u64,
                epoch: Some(range.epoch()),
            };
            match self.route(&routes, position, &ForwardOp::Scan(scan), deadline).await? {
                Some(Answered::Pairs(pairs)) => out.extend(pairs),
                Some(other) => return Err(RouteError::Storage(format!("a scan answered {other:?}"))),
                None => {
                    self.rerouted(&routes, &cursor, deadline).await?;
                    continue;
                }
            }
            // The next range, if the scan reaches it.
            if range.end.is_empty() || (!end.is_empty() && range.end.as_slice() >= end) {
                break;
            }
            cursor = range.end.clone();
        }
        Ok(out)
    }

    /// Splits the range holding `key` so that `key` starts a range of its own, served by a new group on the same
    /// nodes (`flotilla split`). The node that leads the group takes the new group's ids and proposes it; done
    /// once the split applied there (at once if `key` already starts a range).
    pub async fn split_at(&self, key: &[u8], by_request: bool) -> Result<(), RouteError> {
        self.limits.check_key(key).map_err(refused)?;
        self.split_at_stored(&self.keys.stored(key), by_request).await
    }

    /// [`Requests::split_at`] of a stored key (the split triggers ask for those).
    pub async fn split_at_stored(&self, key: &[u8], by_request: bool) -> Result<(), RouteError> {
        let deadline = Instant::now() + self.limits.request_timeout;
        loop {
            let routes = self.table();
            let position = routes.table.position_of(key);
            if key.is_empty() || routes.table.range(position).start == key {
                return Ok(());
            }
            let op =
                if by_request { ForwardOp::SplitAt(key.to_vec()) } else { ForwardOp::TriggeredSplitAt(key.to_vec()) };
            match self.route(&routes, position, &op, deadline).await? {
                Some(Answered::Written(Outcome::Split { right })) => {
                    // Routed by at once here (the left part as this node applies it, or as a refusal tells).
                    self.relearn(&routes, Some(*right))?;
                    return Ok(());
                }
                Some(other) => return Err(RouteError::Storage(format!("a split answered {other:?}"))),
                None => self.rerouted(&routes, key, deadline).await?,
            }
        }
    }

    /// Merges the range holding `key` into its left neighbour (`flotilla merge`): the left range is locked for it
    /// on its leader, the right range frozen on its leader, and the groups carry the merge on; done once this
    /// node's table shows it committed. `InvalidArgument` for the first range or ranges on different nodes,
    /// `Busy` if one of them is in another merge or the merge was given up.
    pub async fn merge_left(&self, key: &[u8]) -> Result<(), RouteError> {
        self.limits.check_key(key).map_err(refused)?;
        self.merge_left_stored(&self.keys.stored(key)).await
    }

    /// [`Requests::merge_left`] of a stored key (the merge trigger asks for those).
    pub async fn merge_left_stored(&self, key: &[u8]) -> Result<(), RouteError> {
        let deadline = Instant::now() + self.limits.request_timeout;
        let frozen = loop {
            self.relearn(&self.table(), None)?; // the ranges' merge states as this node applied them now
            let routes = self.table();
            let position = routes.table.position_of(key);
            if position == 0 {
                return Err(RouteError::InvalidArgument(
                    "the range holding the key is the first: nothing to merge into".into(),
                ));
            }
            let right = routes.table.range(position).clone();
            if right.is_merging() || routes.table.range(position - 1).is_merging() {
                return Err(RouteError::Busy("one of the ranges is in another merge".into()));
            }
            let prepare = ForwardOp::Merge(Box::new(MergeCommand::new(MergeStep::Prepare, None, Some(right.clone()))));
            let locked = match self.route(&routes, position - 1, &prepare, deadline).await? {
                Some(Answered::Written(Outcome::Merge { range })) => *range,
                Some(other) => return Err(RouteError::Storage(format!("a merge lock answered {other:?}"))),
                None => {
                    self.rerouted(&routes, key, deadline).await?;
                    continue;
                }
            };
            let freeze = ForwardOp::Merge(Box::new(MergeCommand::new(MergeStep::Freeze, Some(locked), None)));
            break loop {
                match self.route(&routes, position, &freeze, deadline).await {
                    Ok(Some(Answered::Written(Outcome::Merge { range }))) => break *range,
                    Ok(Some(other)) => return Err(RouteError::Storage(format!("a merge freeze answered {other:?}"))),
                    // The left group gives its lock up once it sees the right range moved on without it.
                    Err(RouteError::InvalidArgument(reason)) => return Err(RouteError::Busy(reason)),
                    Err(other) => return Err(other),
                    Ok(None) => self.rerouted(&routes, key, deadline).await?, // not there yet on the node asked
                }
            };
        };
        loop {
            tokio::time::sleep(REROUTE_PAUSE).await;
            self.relearn(&self.table(), None)?;
            let routes = self.table();
            match merge_progress(routes.table.range(routes.table.position_of(key)), &frozen) {
                MergeProgress::Committed => return Ok(()),
                MergeProgress::GivenUp => return Err(RouteError::Busy(GIVEN_UP.into())),
                MergeProgress::Waiting if Instant::now() >= deadline => return Err(RouteError::Timeout),
                MergeProgress::Waiting => {}
            }
        }
    }

    /// A group refused a request for `key` routed by `used` as no longer holding its keys (a split or merge
    /// moved them): the table is rebuilt from the ranges this node stores (it applies the splits of the groups
    /// it holds), once per stale table; if that shows nothing new (this node holds no replica of the group that
    /// has the key now, or has not applied the change yet), from the meta range's table at `key`. If neither
    /// shows anything new, the request waits a moment before it is routed again, until `deadline`.
    async fn rerouted(&self, used: &Arc<Routes>, key: &[u8], deadline: Instant) -> Result<(), RouteError> {
        if self.relearn(used, None)? || self.learn_from_meta(key, deadline).await? {
            return Ok(());
        }
        if Instant::now() + REROUTE_PAUSE >= deadline {
            return Err(RouteError::Timeout);
        }
        tokio::time::sleep(REROUTE_PAUSE).await;
        Ok(())
    }

    /// Learns the meta range's pieces from the one holding `key` on (a linearizable read of the meta group);
    /// whether the table changed. Nothing without a meta range.
    async fn learn_from_meta(&self, key: &[u8], deadline: Instant) -> Result<bool, RouteError> {
        if !self.keys.has_meta_range() || meta::is_system_key(key) {
            return Ok(false);
        }
        let used = self.table();
        let position = used.table.position_of(meta::SYSTEM_KEYS_START);
        let (start, end) = meta::lookup_scan(key);
        let scan = ScanRange { start, end, limit: META_LOOKUP_PIECES, epoch: Some(used.table.range(position).epoch()) };
        let Some(Answered::Pairs(pairs)) = self.route(&used, position, &ForwardOp::Scan(scan), deadline).await? else {
            return Ok(false); // (the meta range itself moved: the next attempt learns it from this node's ranges)
        };
        let pieces = meta::pieces(&pairs);
        let mut current = self.routes.write();
        let table = current.table.learned(pieces);
        if table.ranges() == current.table.ranges() {
            return Ok(false);
        }
        metrics::counter!("flotilla_routes_learned_from_meta_total").increment(1);
        let seen = current.ranges_seen.load(Ordering::Acquire); // (what the meta range told is not this node's)
        *current = Arc::new(Routes::new(table, &self.reader, seen));
        Ok(true)
    }

    /// Publishes `range` in the meta range's table, routed to the meta group like a write (for a leader on this
    /// node, which holds no replica of the meta range: `peer/publish.rs`). Advisory: the leader asks again
    /// until its node sees it.
    pub async fn publish(&self, range: RangeDescriptor) -> Result<(), RouteError> {
        if !self.keys.has_meta_range() {
            return Ok(());
        }
        let deadline = Instant::now() + self.limits.request_timeout;
        let routes = self.table();
        let position = routes.table.position_of(meta::SYSTEM_KEYS_START);
        let epoch = Some(routes.table.range(position).epoch());
        let (group_id, published) = (range.group_id, range.epoch());
        let op = ForwardOp::Write(Command { epoch, ..Command::publish(range) });
        if let Some(Answered::Written(Outcome::Done)) = self.route(&routes, position, &op, deadline).await? {
            // The leader here stops asking (its node has no replica of the meta range to show it).
            let _ = self.router.send(group_id, PeerMsg::Published { epoch: published });
        }
        Ok(())
    }

    /// This node's entry in the meta range's node registry, written until it is there (a node that starts
    /// registers itself: where it listens for the other nodes and for clients). Nothing without a meta range.
    pub async fn register(&self, entry: NodeEntry) {
        if !self.keys.has_meta_range() {
            return;
        }
        let (key, value) = meta::register_op(&entry);
        for attempt in 0.. {
            // Short attempts: a put of the same entry again is harmless, and a node that just started may have
            // sent the first into a link not up yet.
            match self.write_stored(vec![Op::put(key.clone(), value.clone())], REGISTER_ATTEMPT_TIMEOUT).await {
                Ok(_) => return,
                Err(error) if attempt == 0 => {
                    eprintln!("flotilla: node {}: registering in the meta range: {error:?}; trying again", self.node_id)
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The meta range's node registry (a linearizable read of the meta group; empty without a meta range).
    pub async fn registry(&self) -> Result<Vec<NodeEntry>, RouteError> {
        if !self.keys.has_meta_range() {
            return Ok(Vec::new());
        }
        let (start, end) = meta::registry_scan();
        Ok(meta::nodes(&self.scan_stored(&start, &end, usize::MAX).await?))
    }

    /// The node registry as this node's replica of the meta range last applied it (a stale read, for status).
    pub fn local_registry(&self) -> Vec<NodeEntry> {
        let (start, end) = meta::registry_scan();
        meta::nodes(&self.kv.scan(&start, &end, usize::MAX).unwrap_or_default())
    }

    /// Swaps in a table that learned the ranges this node stores, and `also`, unless another request already
    /// swapped `used` out. Whether the table changed.
    fn relearn(&self, used: &Arc<Routes>, also: Option<RangeDescriptor>) -> Result<bool, RouteError> {
        let seen = self.reader.ranges_changed(); // (before reading: a change meanwhile is learned next time)
        let stored = crate::node::routable_ranges(&self.kv).map_err(|error| RouteError::Storage(error.to_string()))?;
        let mut current = self.routes.write();
        if !Arc::ptr_eq(&current, used) {
            return Ok(true); // another request rebuilt it meanwhile
        }
        let table = used.table.learned(stored.into_iter().chain(also));
        if table.ranges() == used.table.ranges() {
            used.ranges_seen.store(seen, Ordering::Release);
            return Ok(false);
        }
        *current = Arc::new(Routes::new(table, &self.reader, seen));
        Ok(true)
    }

    /// Attempts `op` on the group at `position` of `routes` until the router's policy says done or failed;
    /// `None`: the group no longer holds the request's keys as `routes` says — route it again.
    async fn route(
        &self,
        routes: &Routes,
        position: usize,
        op: &ForwardOp,
        deadline: Instant,
    ) -> Result<Option<Answered>, RouteError> {
        let table = &routes.table;
        let group_id = table.range(position).group_id;
        // (The meta range's own traffic — publications, lookups — counted apart from the users' requests.)
        let kind = if table.range(position).is_meta() { "meta" } else { "data" };
        routes.learn_leader(position); // (once: the answers below correct it from there)
        loop {
            let node = table.leader(position);
            let answer = if node == self.node_id {
                self.local(group_id, op.clone(), deadline).await
            } else {
                metrics::counter!("flotilla_requests_forwarded_total", "range" => kind).increment(1);
                self.forward(node, group_id, op.clone(), deadline).await
            };
            match table.judge(position, node, answer, deadline) {
                Attempt::Done(answered) => return Ok(Some(answered)),
                Attempt::Retry(pause) => tokio::time::sleep(pause).await,
                Attempt::Reroute => return Ok(None),
                Attempt::Fail(error) => return Err(error),
            }
        }
    }

    /// A split at `split_key` this node proposes, of a range with `replicas` replicas: its new group id and
    /// replica ids in this node's own part of the id space (node id × 2³²; the initial groups and a joined node's
    /// replicas have small ids), recorded durably before use, so that no two nodes, and no two splits, ever share
    /// one.
    fn split_request(&self, split_key: Vec<u8>, replicas: usize) -> Result<SplitRequest, DbError> {
        let ids = self.split_ids.lock();
        let floor = (self.node_id << 32) + 1;
        let taken = crate::db_routes::take_ids_above(ids.0.as_ref(), &ids.1, (floor, floor), replicas)?;
        Ok(SplitRequest::new(split_key, taken, replicas))
    }

    /// Runs `op` on this node's replica of `group_id` (`None`: no answer by `deadline`).
    async fn local(&self, group_id: u64, op: ForwardOp, deadline: Instant) -> Option<Result<Answered, PeerError>> {
        let within = |at: Instant| at.saturating_duration_since(Instant::now());
        let by_request = matches!(op, ForwardOp::SplitAt(_)); // a split by request is sticky; a triggered one not
        match op {
            ForwardOp::Write(command) => {
                self.propose(group_id, |reply| PeerMsg::Write { command, reply }, within(deadline)).await
            }
            ForwardOp::AddLearner(AddLearner { node_id, replica_id, addr }) => {
                let change = MembershipChange::AddLearner { node_id, replica_id, addr };
                self.propose(group_id, |reply| PeerMsg::ChangeMembership { change, reply }, within(deadline)).await
            }
            ForwardOp::SplitAt(split_key) | ForwardOp::TriggeredSplitAt(split_key) => {
                // The group's members as this node applied them (the proposal is refused if they changed since).
                let replicas = self.descriptors().get(&group_id).map_or(0, |range| range.replicas.len());
                let split = match self.split_request(split_key, replicas) {
                    Ok(split) if by_request => split.by_request(),
                    Ok(split) => split,
                    Err(error) => return Some(Err(PeerError::Stopped(error.to_string()))),
                };
                self.propose(group_id, |reply| PeerMsg::Split { split, reply }, within(deadline)).await
            }
            ForwardOp::Merge(merge) => {
                self.propose(group_id, |reply| PeerMsg::Merge { merge, reply }, within(deadline)).await
            }
            ForwardOp::Get(key) => self.read(group_id, ReadRequest::Get(key), within(deadline)).await,
            ForwardOp::Gets(Keys { keys }) => {
                let reads = keys.into_iter().map(|key| self.read(group_id, ReadRequest::Get(key), within(deadline)));
                let mut values = Vec::new();
                for answer in futures_util::future::join_all(reads).await {
                    match answer? {
                        Ok(Answered::Value(value)) => values.push(value),
                        Ok(other) => return Some(Err(PeerError::Stopped(format!("a read answered {other:?}")))),
                        Err(error) => return Some(Err(error)),
                    }
                }
                Some(Ok(Answered::Values(values)))
            }
            ForwardOp::Scan(scan) => {
                let request = ReadRequest::Scan {
                    start: scan.start,
                    end: scan.end,
                    limit: scan.limit as usize,
                    epoch: scan.epoch,
                };
                self.read(group_id, request, within(deadline)).await
            }
        }
    }

    /// Why this node's replica of `group_id` took no request (none runs, or its mailbox is full): a merge ended it
    /// here — the caller's table is stale, and routes again — or, as far as this node knows, it does not lead.
    fn not_here(&self, group_id: u64) -> PeerError {
        match flotilla_raftstore::command::stored_range(self.kv.as_ref(), group_id) {
            Some(record) if record.merged_into != 0 => {
                PeerError::Range(RangeError::StaleEpoch { sent: record.epoch(), current: Box::new(record) })
            }
            _ => PeerError::NotLeader { leader: 0 },
        }
    }

    /// Sends the proposal `message` makes to this node's replica and waits for its outcome.
    async fn propose(
        &self,
        group_id: u64,
        message: impl FnOnce(WriteReply) -> PeerMsg,
        within: Duration,
    ) -> Option<Result<Answered, PeerError>> {
        let (reply, answer) = oneshot::channel();
        if self.router.send(group_id, message(reply)).is_err() {
            return Some(Err(self.not_here(group_id)));
        }
        let answer = tokio::time::timeout(within, answer).await.ok()?.ok()?;
        Some(answer.map(Answered::Written))
    }

    async fn read(&self, group_id: u64, request: ReadRequest, within: Duration) -> Option<Result<Answered, PeerError>> {
        let (reply, answer) = oneshot::channel();
        if self.router.send(group_id, PeerMsg::Read { request, reply }).is_err() {
            return Some(Err(self.not_here(group_id)));
        }
        let answer = tokio::time::timeout(within, answer).await.ok()?.ok()?;
        Some(answer.map(|result| match result {
            ReadResult::Value(value) => Answered::Value(value),
            ReadResult::Pairs(pairs) => Answered::Pairs(pairs),
        }))
    }

    /// Sends `op` to `node` and waits for its answer (`None`: none by `deadline`).
    async fn forward(
        &self,
        node: u64,
        group_id: u64,
        op: ForwardOp,
        deadline: Instant,
    ) -> Option<Result<Answered, PeerError>> {
        if !self.transport.is_alive(node) {
            // Silent lately (down, stopped, cut off): as if it did not lead — nothing was sent.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Some(Err(PeerError::NotLeader { leader: 0 }));
        }
        // A read may be tried again elsewhere if its node goes silent meanwhile; a write waits for its answer
        // until the deadline (sent again elsewhere, it might take effect twice).
        let is_read = !matches!(op, ForwardOp::Write(_));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.pending.lock().insert(id, reply);
        if !self.transport.forward(node, ForwardRequest { id, group_id, op: Some(op) }) {
            self.pending.lock().remove(&id);
            // Unreachable, or its queue is full: as if it did not lead (the policy tries the next node).
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Some(Err(PeerError::NotLeader { leader: 0 }));
        }
        let within = deadline.saturating_duration_since(Instant::now());
        let attempt = if is_read { within.min(READ_ATTEMPT_TIMEOUT) } else { within };
        let reply = match tokio::time::timeout(attempt, answer).await {
            Ok(Ok(reply)) => reply,
            _ => {
                self.pending.lock().remove(&id);
                if is_read && Instant::now() < deadline {
                    return Some(Err(PeerError::NotLeader { leader: 0 }));
                }
                return None;
            }
        };
        Some(match reply.result {
            Some(ForwardResult::Done(_)) => Ok(Answered::Written(Outcome::Done)),
            Some(ForwardResult::PreconditionFailed(failed)) => Ok(Answered::Written(Outcome::PreconditionFailed {
                op: failed.op as usize,
                current: failed.current.and_then(OptionalValue::into_option),
            })),
            Some(ForwardResult::Split(right)) => Ok(Answered::Written(Outcome::Split { right: Box::new(right) })),
            Some(ForwardResult::Merge(range)) => Ok(Answered::Written(Outcome::Merge { range: Box::new(range) })),
            Some(ForwardResult::Value(value)) => Ok(Answered::Value(value.into_option())),
            Some(ForwardResult::Values(values)) => {
                Ok(Answered::Values(values.values.into_iter().map(OptionalValue::into_option).collect()))
            }
            Some(ForwardResult::Pairs(pairs)) => {
                Ok(Answered::Pairs(pairs.keys.into_iter().zip(pairs.values).collect()))
            }
            // The other node's replica gave no answer in time: as if none came here (a write may have happened).
            Some(ForwardResult::Refused(refusal)) if refusal.is_timeout() => return None,
            Some(ForwardResult::Refused(refusal)) => Err(refusal.into_peer_error()),
            None => Err(PeerError::Stopped("an empty answer from another node".into())),
        })
    }

    /// The answer to a request another node forwarded here, run on this node's replica only.
    async fn serve_forwarded(&self, request: ForwardRequest) -> ForwardReply {
        let deadline = Instant::now() + self.limits.request_timeout;
        // Reads served here and now while this node may read locally, as its own clients' GETs are: no poll round.
        let answered = match self.read_forwarded_locally(request.op.as_ref()) {
            Some(answered) => Some(answered),
            None => match request.op {
                None => Some(Err(PeerError::Stopped("no operation".into()))),
                Some(op) => self.local(request.group_id, op, deadline).await,
            },
        };
        let result = match answered {
            None => ForwardResult::Refused(Refusal::timed_out()),
            Some(Err(error)) => ForwardResult::Refused(Refusal::from_peer_error(&error)),
            Some(Ok(Answered::Written(Outcome::Done))) => ForwardResult::Done(true),
            Some(Ok(Answered::Written(Outcome::PreconditionFailed { op, current }))) => {
                ForwardResult::PreconditionFailed(PreconditionFailed {
                    op: op as u64,
                    current: Some(OptionalValue::new(current)),
                })
            }
            Some(Ok(Answered::Written(Outcome::Split { right }))) => ForwardResult::Split(*right),
            Some(Ok(Answered::Written(Outcome::InvalidSplit(reason)))) => {
                ForwardResult::Refused(Refusal::from_peer_error(&PeerError::InvalidSplit(reason)))
            }
            Some(Ok(Answered::Written(Outcome::Merge { range }))) => ForwardResult::Merge(*range),
            Some(Ok(Answered::Written(Outcome::InvalidMerge(reason)))) => {
                ForwardResult::Refused(Refusal::from_peer_error(&PeerError::InvalidMerge(reason)))
            }
            Some(Ok(Answered::Written(other))) => {
                ForwardResult::Refused(Refusal::from_peer_error(&PeerError::Membership(format!("{other:?}"))))
            }
            Some(Ok(Answered::Value(value))) => ForwardResult::Value(OptionalValue::new(value)),
            Some(Ok(Answered::Values(values))) => {
                ForwardResult::Values(Values { values: values.into_iter().map(OptionalValue::new).collect() })
            }
            Some(Ok(Answered::Pairs(pairs))) => {
                let (keys, values) = pairs.into_iter().unzip();
                ForwardResult::Pairs(Pairs { keys, values })
            }
        };
        ForwardReply { id: request.id, result: Some(result) }
    }

    /// A forwarded `Get` or `Gets` answered from the state machine at once, if this node may read all its keys
    /// locally (`get_local_stored`); `None` for anything else.
    fn read_forwarded_locally(&self, op: Option<&ForwardOp>) -> Option<Result<Answered, PeerError>> {
        let keys = match op? {
            ForwardOp::Get(key) => std::slice::from_ref(key),
            ForwardOp::Gets(Keys { keys }) => keys.as_slice(),
            _ => return None,
        };
        let read: Vec<Result<Option<Vec<u8>>, RouteError>> =
            keys.iter().map(|key| self.get_local_stored(key)).collect::<Option<_>>()?;
        metrics::counter!("flotilla_forwarded_reads_local_total").increment(keys.len() as u64);
        let values = match read.into_iter().collect::<Result<Vec<_>, _>>() {
            Ok(values) => values,
            Err(RouteError::Storage(reason)) => return Some(Err(PeerError::Stopped(reason))),
            Err(other) => return Some(Err(PeerError::Stopped(format!("{other:?}")))),
        };
        Some(Ok(match op {
            Some(ForwardOp::Get(_)) => Answered::Value(values.into_iter().next().flatten()),
            _ => Answered::Values(values),
        }))
    }
}
/// The transport's side: the requests of one frame another node forwarded here run together on one task, each
/// answered as soon as it is done; answers to this node's forwarded requests wake their waiters.
pub struct Forwarded(pub Arc<Requests>);

impl ForwardHandler for Forwarded {
    fn on_requests(&self, from_node: u64, forwarded: Vec<ForwardRequest>) {
        let requests = Arc::clone(&self.0);
        requests.transport.runtime().clone().spawn(async move {
            let mut running: FuturesUnordered<_> =
                forwarded.into_iter().map(|request| requests.serve_forwarded(request)).collect();
            while let Some(reply) = running.next().await {
                requests.transport.reply(from_node, reply);
            }
        });
    }

    fn on_reply(&self, _from_node: u64, reply: ForwardReply) {
        if let Some(waiter) = self.0.pending.lock().remove(&reply.id) {
            let _ = waiter.send(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{ServeOptions, Server};

    /// A one-node server of two ranges (keys below `7f…` and above) in `dir`, ports chosen by the system.
    fn two_range_server(dir: &std::path::Path) -> Server {
        let cluster = [(1, "127.0.0.1:0".to_string())].into_iter().collect();
        let mut options = ServeOptions::new(1, dir.to_path_buf(), cluster, "127.0.0.1:0".into());
        options.groups = 2;
        Server::start(options).unwrap()
    }

    fn read(server: &Server, key: &[u8]) -> Option<Vec<u8>> {
        server.runtime.as_ref().unwrap().block_on(server.requests.get(key)).unwrap()
    }

    #[test]
    fn puts_of_one_pipeline_are_answered_each_in_its_place_across_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let server = two_range_server(dir.path());
        let (low, high) = (b"\x10low".to_vec(), b"\xa0high".to_vec());
        let too_long = vec![b'k'; 5000];
        let puts = vec![
            (low.clone(), b"1".to_vec()),
            (high.clone(), b"2".to_vec()),
            (too_long, b"x".to_vec()),
            (low.clone(), b"3".to_vec()), // after the first put of its key: the last word
        ];
        let answers = server.runtime.as_ref().unwrap().block_on(server.requests.put_each(puts));
        assert_eq!(answers.len(), 4);
        assert!(answers[0].is_ok() && answers[1].is_ok() && answers[3].is_ok(), "{answers:?}");
        assert!(matches!(&answers[2], Err(RouteError::InvalidArgument(_))), "{answers:?}");
        assert_eq!(read(&server, &low), Some(b"3".to_vec()));
        assert_eq!(read(&server, &high), Some(b"2".to_vec()));
        server.shutdown().unwrap();
    }

    #[test]
    fn puts_from_many_connections_at_once_are_each_answered_and_written() {
        let dir = tempfile::tempdir().unwrap();
        let server = two_range_server(dir.path());
        let runtime = server.runtime.as_ref().unwrap();
        // 40 callers at once, each with puts in both ranges (combined with the others' for each group).
        let callers: Vec<_> = (0..40u32)
            .map(|caller| {
                let requests = Arc::clone(&server.requests);
                runtime.spawn(async move {
                    let puts = (0..5u32)
                        .flat_map(|i| {
                            let value = format!("{caller}-{i}").into_bytes();
                            [
                                (format!("\x10{caller}-{i}").into_bytes(), value.clone()),
                                (format!("\u{a0}{caller}-{i}").into_bytes(), value),
                            ]
                        })
                        .collect();
                    requests.put_each(puts).await
                })
            })
            .collect();
        for caller in callers {
            let answers = runtime.block_on(caller).unwrap();
            assert_eq!(answers, vec![Ok(()); 10]);
        }
        for caller in 0..40u32 {
            for i in 0..5u32 {
                let value = Some(format!("{caller}-{i}").into_bytes());
                assert_eq!(read(&server, format!("\x10{caller}-{i}").as_bytes()), value);
                assert_eq!(read(&server, format!("\u{a0}{caller}-{i}").as_bytes()), value);
            }
        }
        server.shutdown().unwrap();
    }

    #[test]
    fn reads_of_one_pipeline_are_answered_each_in_its_place_and_across_ranges_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let server = two_range_server(dir.path());
        let runtime = server.runtime.as_ref().unwrap();
        let keys: Vec<Vec<u8>> = (0..6u8).map(|i| vec![if i % 2 == 0 { 0x10 } else { 0xa0 }, i]).collect();
        let puts = keys.iter().map(|key| (key.clone(), key.repeat(3))).collect();
        assert!(runtime.block_on(server.requests.put_each(puts)).iter().all(Result::is_ok));
        let mut asked = keys.clone();
        asked.insert(2, b"\x10absent".to_vec());
        asked.insert(4, vec![b'k'; 5000]);
        let answers = runtime.block_on(server.requests.get_each(asked.clone()));
        assert_eq!(answers.len(), asked.len());
        for (key, answer) in asked.iter().zip(&answers) {
            match key.len() {
                2 => assert_eq!(answer, &Ok(Some(key.repeat(3)))),
                5000 => assert!(matches!(answer, Err(RouteError::InvalidArgument(_))), "{answer:?}"),
                _ => assert_eq!(answer, &Ok(None)),
            }
        }
        // Keys of two ranges read as one part (as when the ranges split after the grouping): one by one.
        let answers = runtime.block_on(server.requests.get_part(vec![keys[0].clone(), keys[1].clone()]));
        assert_eq!(answers, vec![Ok(Some(keys[0].repeat(3))), Ok(Some(keys[1].repeat(3)))]);
        server.shutdown().unwrap();
    }

    #[test]
    fn a_combined_put_whose_keys_lie_in_two_ranges_is_written_one_by_one() {
        // As when the ranges split between the grouping and the write: the batch no longer lies in one range.
        let dir = tempfile::tempdir().unwrap();
        let server = two_range_server(dir.path());
        let (low, high) = (b"\x10low".to_vec(), b"\xa0high".to_vec());
        let ops = vec![Op::put(low.clone(), b"1".to_vec()), Op::put(high.clone(), b"2".to_vec())];
        let deadline = Instant::now() + Duration::from_secs(10);
        let answers = server.runtime.as_ref().unwrap().block_on(server.requests.write_puts(ops, deadline));
        assert_eq!(answers, vec![Ok(()), Ok(())]);
        assert_eq!(read(&server, &low), Some(b"1".to_vec()));
        assert_eq!(read(&server, &high), Some(b"2".to_vec()));
        server.shutdown().unwrap();
    }
}
