//! [`PeerFsm`]: a [`Peer`] in the batch system, with the clients waiting on it. Thin: it matches a message and
//! calls the peer; the logic lives in `peer/`.

use std::collections::HashMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use flotilla_engine::contract::{KeyValue, KvEngine, StateMachineError};
use flotilla_raft::Entry;

use super::local_reader::ReadLease;
use super::parked::ParkedWrites;
use super::ticks::TicksSeen;
use crate::batch::Fsm;
use crate::command::{Command, MergeCommand, Outcome};
use crate::message::Envelope;
use crate::peer::{MembershipChange, Peer, PeerError, Response, Token};
use crate::range::{RangeEpoch, RangeError, SplitRequest};
use crate::split_trigger::SplitTrigger;

/// A read served once the group confirms it is current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadRequest {
    Get(Vec<u8>),
    /// Pairs with `start <= key < end` (`end` empty: to the range's end), at most `limit`, from the group's
    /// part of it — so the caller must know what that part is: routed with the range's `epoch`, the scan is refused
    /// (`StaleEpoch`) if a split or merge changed the range since (`None`: unchecked, for callers that scan the
    /// group's range whatever it is).
    Scan {
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
        epoch: Option<RangeEpoch>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadResult {
    Value(Option<Vec<u8>>),
    Pairs(Vec<KeyValue>),
}

/// Where a client waits (a oneshot parks its thread, or its task, at once: no spinning while waiting).
pub type WriteReply = oneshot::Sender<Result<Outcome, PeerError>>;
pub type ReadReply = oneshot::Sender<Result<ReadResult, PeerError>>;

/// Everything that reaches a group replica.
pub enum PeerMsg {
    /// From another replica of the group. Boxed: it is several times larger than every other variant, and
    /// mailboxes hold many.
    Replica(Box<Envelope>),
    Write {
        command: Command,
        reply: WriteReply,
    },
    /// A write of the range `decided`, which is decided for a merge into this replica's group, handed over by
    /// its replica on this node: proposed if this replica can take it behind its proposed commit
    /// (`Peer::takes_behind_commit`), else refused as `decided` refuses writes (`RangeError::Merging`).
    HandedOver {
        command: Command,
        reply: WriteReply,
        decided: Box<crate::range::RangeDescriptor>,
    },
    /// A membership change, answered like a write once applied.
    ChangeMembership {
        change: MembershipChange,
        reply: WriteReply,
    },
    /// A split of the group's range (`Peer::propose_split`), answered like a write once applied.
    Split {
        split: SplitRequest,
        reply: WriteReply,
    },
    /// A step of a merge (`Peer::propose_merge`), answered like a write once applied.
    Merge {
        merge: Box<MergeCommand>,
        reply: WriteReply,
    },
    /// A command another group asks this one to propose — a merge step (`peer/merge.rs`), a publication in the
    /// meta range (`peer/publish.rs`): proposed if this replica leads, else handed to the other members.
    Ask {
        command: Box<Command>,
    },
    Read {
        request: ReadRequest,
        reply: ReadReply,
    },
    /// The log engine made this Ready (by its number) durable.
    Persisted {
        ready_number: u64,
    },
    Tick,
    Campaign,
    /// Hand the group's leadership to this replica (if this replica leads).
    TransferLeader {
        replica_id: u64,
    },
    /// This node is down (node liveness): a follower hibernating under a leader there wakes.
    NodeDown {
        node_id: u64,
    },
    /// The replicas thread measured this group's range at `bytes` (`split_trigger.rs`).
    SizeMeasured {
        bytes: u64,
    },
    /// A snapshot of another group was refused on this node because this replica holds its keys: wake and find
    /// out whether it is still a member (`Peer::check_membership`).
    CheckMembership,
    /// This group's merge decision, the entry at `(decided_index, decided_term)`, committed: its node's left
    /// replica waits for it to apply it (`Peer::on_decision_committed`).
    DecisionCommitted {
        decided_index: u64,
        decided_term: u64,
    },
    /// The host published this range's descriptor at `epoch` in the meta range, which this node holds no replica
    /// of (`peer/publish.rs`).
    Published {
        epoch: crate::range::RangeEpoch,
    },
    /// The state machine made more of this group durable: compact the log behind it (`peer/compaction.rs`).
    CompactLog,
    /// Its node served many reads of the group locally (`LocalReader::count_read`): a leader stays awake (it
    /// is busy, though no request reaches it) and counts them toward its load at its next tick.
    LocalReads,
    /// The transport lost its connection to this node: a leader stops streaming appends to its replica there and
    /// probes instead, until it answers.
    Unreachable {
        node_id: u64,
    },
}

pub struct PeerFsm {
    pub(crate) peer: Peer,
    next_token: Token,
    writes: FxHashMap<Token, WriteReply>,
    reads: FxHashMap<Token, (ReadRequest, ReadReply)>,
    /// Committed entries taken from the peer this round, applied at the round's end.
    pub(crate) to_apply: Vec<Entry>,
    /// Whether the node's ticker visits this group (see `Peer::needs_ticks`).
    pub(crate) ticking: bool,
    /// The node's tick count this replica has taken its ticks up to (`ticks.rs`).
    pub(crate) ticks_seen: TicksSeen,
    /// Where replicas the descriptor does not list live, as their messages said (a new learner before this
    /// replica applies its addition, or this replica before a snapshot brought it the members).
    pub(crate) nodes_heard: HashMap<u64, u64>,
    /// A removed replica asked the replicas thread to unregister it.
    pub(crate) destroy_requested: bool,
    /// The descriptor's `conf_version` whose replicas' addresses the transport was last told
    /// (`Transport::node_listed`); none yet at first.
    pub(crate) addresses_told: Option<u64>,
    /// Where the host loop publishes whether reads may be served without the replica (`local_reader.rs`).
    pub(crate) read_lease: Arc<ReadLease>,
    /// When this replica, leading, asks to be split (`split_trigger.rs`).
    pub(crate) split_trigger: SplitTrigger,
    /// Ticks taken up since its merge progress last counted them (`Peer::merge_step`).
    pub(crate) merge_ticks: u64,
    /// Writes this replica, decided for a merge, hands to its node's replica of the group taking its keys (by
    /// group; the handler sends them on: [`PeerFsm::take_handed_over`]).
    handed_over: Vec<(u64, PeerMsg)>,
    /// Writes held while a merge moves on, instead of refused at once (`parked.rs`).
    parked: ParkedWrites,
}

impl Fsm for PeerFsm {
    type Message = PeerMsg;
}

impl PeerFsm {
    pub fn new(peer: Peer, read_lease: Arc<ReadLease>, split_trigger: SplitTrigger) -> PeerFsm {
        let ticking = peer.needs_ticks();
        PeerFsm {
            peer,
            next_token: 1,
            writes: FxHashMap::default(),
            reads: FxHashMap::default(),
            to_apply: Vec::new(),
            ticking,
            ticks_seen: TicksSeen::default(),
            nodes_heard: HashMap::new(),
            destroy_requested: false,
            addresses_told: None,
            read_lease,
            split_trigger,
            merge_ticks: 0,
            handed_over: Vec::new(),
            parked: ParkedWrites::default(),
        }
    }

    /// Handles again the writes held for a merge that moved on (`parked.rs`), `ticks` more having passed; refuses
    /// them all once they waited `wait_ticks_max` ticks (`StoreOptions::frozen_write_wait_ticks`).
    pub(crate) fn release_parked(&mut self, ticks: u64, wait_ticks_max: u64, kv: &dyn KvEngine) {
        for message in self.parked.release(&self.peer, ticks, wait_ticks_max) {
            self.on_message(message, kv);
        }
    }

    /// The writes handed over since the last call (see `handed_over`).
    pub(crate) fn take_handed_over(&mut self) -> Vec<(u64, PeerMsg)> {
        std::mem::take(&mut self.handed_over)
    }

    /// The replica's logic (for inspection: tests and simulators).
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Committed entries taken from the peer, not applied yet (applied at a round's end).
    pub fn pending_apply(&self) -> &[Entry] {
        &self.to_apply
    }

    /// The node of replica `replica_id`: from the descriptor, else from its messages.
    pub(crate) fn node_of(&self, replica_id: u64) -> Option<u64> {
        let listed = self.peer.descriptor().node_of(replica_id);
        listed.or_else(|| self.nodes_heard.get(&replica_id).copied())
    }

    /// The group's replica on node `node_id`, as the descriptor lists it.
    fn replica_on(&self, node_id: u64) -> Option<u64> {
        self.peer.descriptor().replicas.iter().find(|r| r.node_id == node_id).map(|r| r.replica_id)
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    /// Feeds one message to the peer (snapshot chunks are written to `kv`).
    pub(crate) fn on_message(&mut self, message: PeerMsg, kv: &dyn KvEngine) {
        match message {
            PeerMsg::Replica(envelope) => {
                let Envelope { from_node, message, .. } = *envelope;
                if self.peer.is_removed() || message.to() != self.peer.replica_id() {
                    return; // for a removed replica, or another incarnation
                }
                // Only senders the descriptor does not list are remembered (nothing to do on the common path).
                let listed = self.peer.descriptor().lists_replica(message.from());
                if !listed && (self.nodes_heard.len() < 64 || self.nodes_heard.contains_key(&message.from())) {
                    self.nodes_heard.insert(message.from(), from_node);
                }
                // An invalid message (a bug or a stray from another incarnation) is dropped; the core said why.
                let _ = self.peer.on_message(message, kv);
            }
            message @ PeerMsg::HandedOver { .. } => {
                // Not taken yet (this leader has not proposed the merge's commit): held until it is.
                let Some(PeerMsg::HandedOver { command, reply, decided }) = self.parked.park(&self.peer, message)
                else {
                    return;
                };
                if !self.peer.can_take_behind_commit(&command) {
                    let _ = reply.send(Err(PeerError::Range(crate::range::RangeError::Merging { current: decided })));
                    return;
                }
                metrics::counter!("flotilla_proposals_total").increment(1);
                let token = self.token();
                self.writes.insert(token, reply);
                self.peer.propose(token, command);
            }
            message @ PeerMsg::Write { .. } => {
                // Frozen for a merge not decided yet: held until it is (then handed over, below) or given up.
                let Some(PeerMsg::Write { command, reply }) = self.parked.park(&self.peer, message) else { return };
                if let Some(into_group_id) = self.peer.decided_into() {
                    // Its keys are that group's from the merge's commit on, and its leader proposes writes behind
                    // the commit (`Peer::propose`): handed over, not refused (the caller would wait, then route
                    // the write again).
                    let decided = Box::new(self.peer.descriptor().clone());
                    self.handed_over.push((into_group_id, PeerMsg::HandedOver { command, reply, decided }));
                    return;
                }
                metrics::counter!("flotilla_proposals_total").increment(1);
                if self.peer.is_leader() {
                    self.split_trigger.on_write(&command);
                }
                let token = self.token();
                self.writes.insert(token, reply);
                self.peer.propose(token, command);
            }
            PeerMsg::ChangeMembership { change, reply } => {
                let token = self.token();
                self.writes.insert(token, reply);
                self.peer.propose_membership(token, change);
            }
            PeerMsg::Split { split, reply } => {
                let token = self.token();
                self.writes.insert(token, reply);
                self.peer.propose_split(token, split);
            }
            PeerMsg::Merge { merge, reply } => {
                let token = self.token();
                self.writes.insert(token, reply);
                self.peer.propose_merge(token, *merge);
            }
            PeerMsg::Ask { command } => self.peer.on_asked(*command, true),
            PeerMsg::Read { request, reply } => {
                metrics::counter!("flotilla_reads_total").increment(1);
                if let (true, ReadRequest::Get(key)) = (self.peer.is_leader(), &request) {
                    self.split_trigger.on_read(key);
                }
                let token = self.token();
                self.reads.insert(token, (request, reply));
                self.peer.read(token);
            }
            PeerMsg::Persisted { ready_number } => self.peer.on_persisted(ready_number),
            PeerMsg::Tick => {} // a wake-up: the handler gave the replica the ticks it owed before its messages
            PeerMsg::Campaign => self.peer.campaign(),
            PeerMsg::TransferLeader { replica_id } => self.peer.transfer_leader(replica_id),
            PeerMsg::CompactLog => self.peer.compact_log(kv),
            PeerMsg::LocalReads => self.peer.on_local_reads(),
            PeerMsg::CheckMembership => self.peer.check_membership(),
            PeerMsg::DecisionCommitted { decided_index, decided_term } => {
                self.peer.on_decision_committed(decided_index, decided_term)
            }
            PeerMsg::Published { epoch } => self.peer.on_published(epoch),
            PeerMsg::SizeMeasured { bytes } => self.split_trigger.on_measured(bytes),
            PeerMsg::Unreachable { node_id } => {
                if let Some(replica_id) = self.replica_on(node_id) {
                    self.peer.report_unreachable(replica_id);
                }
            }
            PeerMsg::NodeDown { node_id } => {
                if let Some(replica_id) = self.replica_on(node_id) {
                    self.peer.on_node_down(replica_id);
                }
            }
        }
    }

    /// Refuses every client still waiting on this replica (the node stopped: their requests may or may not have
    /// taken effect, and nothing here will tell).
    pub(crate) fn refuse_waiting(&mut self, refusal: PeerError) {
        self.parked.refuse_all(&refusal);
        for (_, reply) in self.writes.drain() {
            let _ = reply.send(Err(refusal.clone()));
        }
        for (_, (_, reply)) in self.reads.drain() {
            let _ = reply.send(Err(refusal.clone()));
        }
    }

    /// Answers the clients the peer has responses for; reads are served from `kv`, clipped to the range. A read
    /// the state machine fails stops the node by `fail` first (so nobody who hears of it finds the node still
    /// serving), then is refused with the failure.
    pub(crate) fn answer(&mut self, responses: Vec<(Token, Response)>, kv: &dyn KvEngine, fail: &dyn Fn(String)) {
        for (token, response) in responses {
            if let Some(reply) = self.writes.remove(&token) {
                let _ = reply.send(match response {
                    Response::Written(outcome) => Ok(outcome),
                    Response::Failed(error) => Err(error),
                    Response::ReadReady => unreachable!("a write answered as a read"),
                });
            } else if let Some((request, reply)) = self.reads.remove(&token) {
                let _ = reply.send(match response {
                    Response::ReadReady => match self.refusal(&request) {
                        Some(refusal) => Err(refusal),
                        None => self.serve(&request, kv).map_err(|error| {
                            let reason = format!("reading group {}'s applied state: {error}", self.peer.group_id());
                            fail(reason.clone());
                            PeerError::Stopped(reason)
                        }),
                    },
                    Response::Failed(error) => Err(error),
                    Response::Written(_) => unreachable!("a read answered as a write"),
                });
            }
        }
    }

    /// Why a read, now current, must not be served from this group's range as it is now (checked when it is
    /// served, not when it arrived: a split may have applied in between).
    fn refusal(&self, request: &ReadRequest) -> Option<PeerError> {
        let range = self.peer.descriptor();
        let current = || Box::new(range.clone());
        match request {
            ReadRequest::Get(key) if !range.contains(key) => {
                Some(PeerError::Range(RangeError::KeyNotInRange { key: key.clone(), current: current() }))
            }
            ReadRequest::Scan { epoch: Some(sent), .. } if sent.version != range.epoch().version => {
                Some(PeerError::Range(RangeError::StaleEpoch { sent: *sent, current: current() }))
            }
            _ => None,
        }
    }

    fn serve(&self, request: &ReadRequest, kv: &dyn KvEngine) -> Result<ReadResult, StateMachineError> {
        let range = self.peer.descriptor();
        match request {
            ReadRequest::Get(key) => Ok(ReadResult::Value(kv.get(key)?)),
            ReadRequest::Scan { start, end, limit, .. } => {
                let (start, end) = range.clip(start, end);
                Ok(ReadResult::Pairs(kv.scan(&start, &end, *limit)?))
            }
        }
    }
}

/// Requests among `messages` are refused with `refusal` (the node stopped, or the replica was removed or replaced
/// before handling them); the rest is dropped.
pub(crate) fn refuse_all(messages: impl Iterator<Item = PeerMsg>, refusal: PeerError) {
    let refusal = || refusal.clone();
    for message in messages {
        match message {
            PeerMsg::Write { reply, .. }
            | PeerMsg::HandedOver { reply, .. }
            | PeerMsg::ChangeMembership { reply, .. }
            | PeerMsg::Split { reply, .. }
            | PeerMsg::Merge { reply, .. } => {
                let _ = reply.send(Err(refusal()));
            }
            PeerMsg::Read { reply, .. } => {
                let _ = reply.send(Err(refusal()));
            }
            _ => {}
        }
    }
}
