//! A server's requests, routed: each goes to the group's leader — this node's store if it leads (reads served on
//! the caller's task while its grant holds, `store/local_reader.rs`), else forwarded over the transport to the
//! node believed to lead, which runs it on its own store. Answers are judged by the router's policy
//! (`router/src/route.rs`: follow not-leader hints, wait out transfers, fail typed), within the request timeout.
//! A forwarded request is never forwarded again: a node that no longer leads answers "not leader" with its hint,
//! and the node that forwarded it tries again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_engine::state_machine::{KeyValue, StateMachine};
use flotilla_raftstore::batch::Router;
use flotilla_raftstore::command::{Command, Op, Outcome};
use flotilla_raftstore::peer::{MembershipChange, PeerError};
use flotilla_raftstore::range::RangeDescriptor;
use flotilla_raftstore::store::local_reader::{LocalReader, ReadLease};
use flotilla_raftstore::store::{PeerFsm, PeerMsg, ReadRequest, ReadResult, WriteReply};
use flotilla_router::route::{Attempt, RangeTable, RouteError};
use flotilla_router::transport::wire::{
    AddLearner, ForwardOp, ForwardReply, ForwardRequest, ForwardResult, OptionalValue, Pairs, PreconditionFailed,
    Refusal, ScanRange,
};
use flotilla_router::transport::{ForwardHandler, TcpTransport};
use futures_util::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;

use crate::client::Route;
use crate::db::{Config, DbError};

/// A request the checks refused.
fn refused(error: DbError) -> RouteError {
    match error {
        DbError::InvalidArgument(what) => RouteError::InvalidArgument(what),
        other => RouteError::InvalidArgument(other.to_string()),
    }
}

/// How long a forwarded read waits before it is tried elsewhere (reads may be; writes wait for their answer).
const READ_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a group answered.
#[derive(Debug)]
pub enum Answered {
    Written(Outcome),
    Value(Option<Vec<u8>>),
    Pairs(Vec<KeyValue>),
}

/// The node's request router (shared by its RESP and HTTP connections, and the transport's forwarded requests).
pub struct Requests {
    node_id: u64,
    cluster_id: String,
    table: RangeTable,
    router: Router<PeerFsm>,
    reader: Arc<LocalReader>,
    /// Per range position: the group's grant on this node.
    leases: Vec<Arc<ReadLease>>,
    kv: Arc<StateMachine>,
    transport: Arc<TcpTransport>,
    /// The request checks and timeout, as the embedded `Db`'s (`Config::check_batch`, `check_key`).
    limits: Config,
    next_id: AtomicU64,
    /// Forwarded requests waiting for their answer, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<ForwardReply>>>,
}

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
    ) -> Requests {
        let table = RangeTable::new(ranges, nodes);
        let leases = table.ranges().iter().map(|range| reader.lease(range.group_id)).collect();
        Requests {
            node_id,
            cluster_id,
            table,
            router,
            reader,
            leases,
            kv,
            transport,
            limits,
            next_id: AtomicU64::new(1),
            pending: Mutex::default(),
        }
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    pub fn table(&self) -> &RangeTable {
        &self.table
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
        let stored = crate::node::stored_ranges(&self.kv).unwrap_or_default();
        stored.into_iter().map(|range| (range.group_id, range)).collect()
    }

    /// Adds a learner on node `node_id`, listening at `addr`, to the group at `position` (`join.rs`); done once
    /// applied, or if the group has exactly that replica already.
    pub async fn add_learner(&self, position: usize, node_id: u64, addr: &str) -> Result<(), RouteError> {
        let op = ForwardOp::AddLearner(AddLearner { node_id, replica_id: node_id, addr: addr.to_string() });
        match self.route(position, op).await? {
            Answered::Written(Outcome::Done) => Ok(()),
            other => Err(RouteError::Membership(format!("adding a learner on node {node_id}: {other:?}"))),
        }
    }

    /// Every range, in key order, with where its believed leader serves clients.
    pub fn routes(&self) -> Vec<Route> {
        (0..self.table.len())
            .map(|position| {
                let range = self.table.range(position);
                let leader = self.table.leader(position);
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
        let position = self.table.position_of(key);
        let range_version = self.table.range(position).epoch().version;
        (self.table.leader(position) == self.node_id && self.reader.holds(&self.leases[position], range_version))
            .then(|| self.kv.get(key).map_err(|error| RouteError::Storage(error.to_string())))
    }

    /// The value of `key`, linearizable.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RouteError> {
        self.limits.check_key(key).map_err(refused)?;
        if let Some(local) = self.get_local(key) {
            return local;
        }
        let position = self.table.position_of(key);
        match self.route(position, ForwardOp::Get(key.to_vec())).await? {
            Answered::Value(value) => Ok(value),
            other => Err(RouteError::Storage(format!("a read answered {other:?}"))),
        }
    }

    /// Applies `ops` atomically; their keys must lie in one group's range ([`RouteError::BatchSpansRanges`]).
    pub async fn write(&self, ops: Vec<Op>) -> Result<Outcome, RouteError> {
        self.limits.check_batch(&ops).map_err(refused)?;
        let position = self.table.batch_position(ops.iter().map(|op| op.key.as_slice()))?;
        let command = Command::write(Some(self.table.range(position).epoch()), ops);
        match self.route(position, ForwardOp::Write(command)).await? {
            Answered::Written(outcome) => Ok(outcome),
            other => Err(RouteError::Storage(format!("a write answered {other:?}"))),
        }
    }

    /// Up to `limit` pairs of `[start, end)` in key order; each group's part linearizable.
    pub async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, RouteError> {
        let mut out = Vec::new();
        for position in self.table.scan_positions(start, end)? {
            if out.len() >= limit {
                break;
            }
            let scan = ScanRange {
                start: start.to_vec(),
                end: end.to_vec(),
                limit: (limit - out.len()) as u64,
                epoch: Some(self.table.range(position).epoch()),
            };
            match self.route(position, ForwardOp::Scan(scan)).await? {
                Answered::Pairs(pairs) => out.extend(pairs),
                other => return Err(RouteError::Storage(format!("a scan answered {other:?}"))),
            }
        }
        Ok(out)
    }

    /// Attempts `op` on the group at `position` until the router's policy says done or failed.
    async fn route(&self, position: usize, op: ForwardOp) -> Result<Answered, RouteError> {
        let deadline = Instant::now() + self.limits.request_timeout;
        loop {
            let node = self.table.leader(position);
            let answer = if node == self.node_id {
                self.local(self.table.range(position).group_id, op.clone(), deadline).await
            } else {
                self.forward(node, self.table.range(position).group_id, op.clone(), deadline).await
            };
            match self.table.judge(position, node, answer, deadline) {
                Attempt::Done(answered) => return Ok(answered),
                Attempt::Retry(pause) => tokio::time::sleep(pause).await,
                // Nothing proposes a split on a server yet (its table is the one it started with): a group that
                // no longer holds the keys is an error here until routing follows splits on the server too.
                Attempt::Reroute => {
                    return Err(RouteError::Storage(format!(
                        "group {} no longer holds the request's keys as this node's routing table says",
                        self.table.range(position).group_id
                    )))
                }
                Attempt::Fail(error) => return Err(error),
            }
        }
    }

    /// Runs `op` on this node's replica of `group_id` (`None`: no answer by `deadline`).
    async fn local(&self, group_id: u64, op: ForwardOp, deadline: Instant) -> Option<Result<Answered, PeerError>> {
        let within = |at: Instant| at.saturating_duration_since(Instant::now());
        match op {
            ForwardOp::Write(command) => {
                self.propose(group_id, |reply| PeerMsg::Write { command, reply }, within(deadline)).await
            }
            ForwardOp::AddLearner(AddLearner { node_id, replica_id, addr }) => {
                let change = MembershipChange::AddLearner { node_id, replica_id, addr };
                self.propose(group_id, |reply| PeerMsg::ChangeMembership { change, reply }, within(deadline)).await
            }
            ForwardOp::Get(key) => self.read(group_id, ReadRequest::Get(key), within(deadline)).await,
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

    /// Sends the proposal `message` makes to this node's replica and waits for its outcome.
    async fn propose(
        &self,
        group_id: u64,
        message: impl FnOnce(WriteReply) -> PeerMsg,
        within: Duration,
    ) -> Option<Result<Answered, PeerError>> {
        let (reply, answer) = oneshot::channel();
        if self.router.send(group_id, message(reply)).is_err() {
            return Some(Err(PeerError::NotLeader { leader: 0 }));
        }
        let answer = tokio::time::timeout(within, answer).await.ok()?.ok()?;
        Some(answer.map(Answered::Written))
    }

    async fn read(&self, group_id: u64, request: ReadRequest, within: Duration) -> Option<Result<Answered, PeerError>> {
        let (reply, answer) = oneshot::channel();
        if self.router.send(group_id, PeerMsg::Read { request, reply }).is_err() {
            return Some(Err(PeerError::NotLeader { leader: 0 }));
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
            Some(ForwardResult::Value(value)) => Ok(Answered::Value(value.into_option())),
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
        let result = match request.op {
            None => ForwardResult::Refused(Refusal::from_peer_error(&PeerError::Stopped("no operation".into()))),
            Some(op) => match self.local(request.group_id, op, deadline).await {
                None => ForwardResult::Refused(Refusal::timed_out()),
                Some(Err(error)) => ForwardResult::Refused(Refusal::from_peer_error(&error)),
                Some(Ok(Answered::Written(Outcome::Done))) => ForwardResult::Done(true),
                Some(Ok(Answered::Written(Outcome::PreconditionFailed { op, current }))) => {
                    ForwardResult::PreconditionFailed(PreconditionFailed {
                        op: op as u64,
                        current: Some(OptionalValue::new(current)),
                    })
                }
                Some(Ok(Answered::Written(other))) => {
                    ForwardResult::Refused(Refusal::from_peer_error(&PeerError::Membership(format!("{other:?}"))))
                }
                Some(Ok(Answered::Value(value))) => ForwardResult::Value(OptionalValue::new(value)),
                Some(Ok(Answered::Pairs(pairs))) => {
                    let (keys, values) = pairs.into_iter().unzip();
                    ForwardResult::Pairs(Pairs { keys, values })
                }
            },
        };
        ForwardReply { id: request.id, result: Some(result) }
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
