//! One group replica's logic, sans I/O (design in `docs/architecture.md`, "peers and rounds"): no clock, thread,
//! socket or file. The caller — the batch system's poll handler in production, the store simulator in tests —
//! feeds it events and carries out what [`Peer::take_output`] asks: persist a Ready's writes (then report
//! [`Peer::on_persisted`]), send messages, apply committed entries with [`Peer::apply_committed`] (then
//! report [`Peer::on_applied`]), and hand responses to the waiting clients.
//!
//! - [`storage`]: the core's `Storage` over the node's shared log;
//! - `propose.rs`: client writes (range and leadership checked, tracked until applied);
//! - `read.rs`: linearizable reads (ReadIndex), answered once the state machine has caught up;
//! - `ready.rs`: turning the core's Ready into output, and applied results into responses;
//! - `snapshot.rs`: snapshot streams to and from other replicas, installs, and their crash repair;
//! - `apply.rs`: committed entries applied in log order (commands in one state machine batch, membership changes
//!   as they come);
//! - `compaction.rs`: log compaction, decided by the replica from what its state machine made durable;
//! - `conf_change.rs`: membership changes, proposed, and applied to the core and the range descriptor;
//! - `publish.rs`: a leader publishes its range's descriptor in the meta range after it changed;
//! - `hibernate.rs`: idle groups stop ticking and heartbeating, and what wakes them;
//! - `bootstrap.rs`: where fresh groups' logs start, the repair of a log a crash left behind its state machine
//!   ([`prepare_groups`], run before opening replicas), and destroying a removed replica ([`destroy_replica`]).
//!
//! Operations that read or write the state machine take it as an argument (`&dyn KvEngine`): the peer owns no
//! engine, so the simulator hands it the same engines production does.
//!
mod apply;
mod bootstrap;
mod compaction;
mod conf_change;
mod hibernate;
pub mod merge;
mod propose;
pub mod publish;
mod read;
mod ready;
mod snapshot;
pub mod storage;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use flotilla_engine::contract::{KvEngine, LogEngine, LogOp};
use flotilla_raft::{Config, DropReason, Entry, MessageType, RawNode, StateRole};

pub use bootstrap::{
    destroy_replica, drop_log, finish_interrupted_destroys, prepare_groups, prepare_split_group, BOOTSTRAP_INDEX,
    BOOTSTRAP_TERM,
};
pub use conf_change::MembershipChange;
pub use read::LocalReadGrant;
pub use ready::PersistedNote;
pub use snapshot::SnapshotOptions;

/// Settings of a replica beyond the Raft core's.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    pub snapshot: SnapshotOptions,
    /// Ticks without a client request after which a settled leader hibernates its group (see `hibernate.rs`); 0
    /// turns hibernation off. Default 20 (2 s at the store's default 100 ms tick).
    pub hibernate_idle_ticks: u32,
    /// How many entries a leader keeps in its log, below its durable state, for a replica that lags (one further
    /// behind catches up by a snapshot stream instead; see `compaction.rs`). Default 10,000.
    pub log_lag_entries_max: u64,
    /// The key space has a meta range: as the leader, the replica publishes its descriptor there and stays awake
    /// until its node shows it (`publish.rs`). Set by the store (`StoreOptions::meta_range`). Default false.
    pub publishes: bool,
}

impl Default for PeerOptions {
    fn default() -> PeerOptions {
        PeerOptions {
            snapshot: SnapshotOptions::default(),
            hibernate_idle_ticks: 20,
            log_lag_entries_max: 10_000,
            publishes: false,
        }
    }
}
pub use storage::PeerStorage;

use crate::command::Outcome;
use crate::message::ReplicaMessage;
use crate::range::{RangeDescriptor, RangeError};
use crate::range_claims::RangeClaims;

/// The caller's name for a waiting client request (unique per peer while it waits).
pub type Token = u64;

/// Why a request was not carried out (expected conditions: the client retries or re-routes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerError {
    /// Only the leader takes writes and linearizable reads; `leader` is the replica id believed to lead (0: none
    /// known).
    NotLeader { leader: u64 },
    /// The group is at a bound (uncommitted bytes, pending reads) or mid-transfer: retry later.
    Busy(DropReason),
    /// The request does not fit this group's range or epoch.
    Range(RangeError),
    /// The write's entry was replaced by another leader's: it did not take effect.
    Dropped,
    /// The replica's log was replaced by a snapshot before the write's entry applied here: it may or may not have
    /// taken effect.
    OutcomeUnknown,
    /// A membership change that does not fit the group's members (already there, not a learner, …).
    Membership(String),
    /// A split that does not fit the range (the reason): nothing was done.
    InvalidSplit(String),
    /// A merge that does not fit the ranges (the reason): nothing was done.
    InvalidMerge(String),
    /// The node stopped because an engine failed (disk gone, corruption): the reason. A request waiting when it
    /// stopped may or may not have taken effect; later ones were not tried.
    Stopped(String),
    /// The command encodes to `bytes`, over the `max` one log entry holds: nothing was done.
    TooLarge { bytes: usize, max: usize },
}

/// What a waiting client is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The write was applied, with this outcome.
    Written(Outcome),
    /// A linearizable read may now be served from the state machine.
    ReadReady,
    Failed(PeerError),
}

/// One Ready's writes, to submit to the log engine. Once they (and every earlier write) are durable: send
/// `messages`, then report [`Peer::on_persisted`] with `ready_number` — as a message to the replica if `prompt`,
/// else by [`PersistedNote::note`], which the replica takes up when it next handles anything (a follower whose
/// answer is in `messages` need not be scheduled just for that).
#[derive(Clone, Debug, PartialEq)]
pub struct LogWrite {
    /// The Ready it persists; 0 for a log compaction alone (no Ready waits for it, and telling the replica of it
    /// changes nothing).
    pub ready_number: u64,
    /// May be empty: a write that only waits for the earlier ones, for its `messages`.
    pub ops: Vec<LogOp>,
    /// Responses that acknowledge what this write (and the earlier ones) persist.
    pub messages: Vec<ReplicaMessage>,
    pub prompt: bool,
}

/// What the caller must do for the peer.
#[derive(Debug, Default)]
pub struct PeerOutput {
    pub write: Option<LogWrite>,
    /// May be sent at once (they never depend on the unpersisted part of `write`).
    pub messages: Vec<ReplicaMessage>,
    /// Committed entries to apply, in order.
    pub committed: Vec<Entry>,
    pub responses: Vec<(Token, Response)>,
}

impl PeerOutput {
    pub fn is_empty(&self) -> bool {
        self.write.is_none() && self.messages.is_empty() && self.committed.is_empty() && self.responses.is_empty()
    }
}

/// A write waiting for its entry to apply (kept by index: see `Peer::writes`).
struct PendingWrite {
    term: u64,
    token: Token,
}

/// A read waiting for its read index, then for the state machine to reach it.
struct PendingRead {
    token: Token,
    /// `None` until the core confirms the read.
    index: Option<u64>,
}

pub struct Peer {
    raw: RawNode<PeerStorage>,
    descriptor: RangeDescriptor,
    /// Writes waiting for their entries to apply, by log index. Not a queue in proposal order: a replica that led,
    /// lost leadership and leads again may have older proposals at higher indexes than newer ones, and several
    /// proposals at one index (each judged by its own term and token when that index applies).
    writes: BTreeMap<u64, Vec<PendingWrite>>,
    /// Plain writes taken in this handling, proposed together when it ends (`propose.rs`).
    proposals: propose::ProposalBatch,
    reads: VecDeque<PendingRead>,
    responses: Vec<(Token, Response)>,
    applied_index: u64,
    role: StateRole,
    streams: snapshot::Streams,
    hibernation: hibernate::Hibernation,
    /// This replica applied its own removal (see `conf_change.rs`).
    removed: bool,
    /// The ranges splits applied here gave to new groups, for the node to open their replicas
    /// ([`Peer::take_split_off`]).
    split_off: Vec<crate::command::SplitOff>,
    /// The state machine failed under this replica (a broken environment): the node must stop.
    storage_failure: Option<String>,
    /// Messages produced outside `take_output` (snapshot chunks and acknowledgements), sent with the next output.
    outbox: Vec<ReplicaMessage>,
    /// Ready numbers made durable, noted by the thread that completed their writes (see [`LogWrite::prompt`]),
    /// and the highest one taken up.
    persisted_note: PersistedNote,
    persisted_taken: u64,
    /// See [`PeerOptions::log_lag_entries_max`].
    log_lag_entries_max: u64,
    /// A log compaction to write with the next output (`compaction.rs`).
    compaction: Option<LogOp>,
    /// The hard state as this replica last wrote it to its log (see `take_output`).
    hard_state_written: flotilla_raft::HardState,
    /// The last term this replica was seen leading in, and an index at or after that term's first entry (see
    /// [`Peer::local_read_grant`]).
    lead_start: (u64, u64),
    /// Which group holds which keys on this node (`range_claims.rs`): checked before a snapshot is taken and when
    /// a split applies.
    claims: Arc<RangeClaims>,
    /// The group whose replica here held the keys of a snapshot this replica refused (for the node to wake it:
    /// [`Peer::take_overlapped_by`]).
    overlapped_by: Option<u64>,
    /// A frozen range's progress towards its merge (`merge.rs`).
    merge: merge::MergeProgress,
    /// The groups whose replicas here merges into this group ended ([`Peer::take_merged_away`]).
    merged_away: Vec<u64>,
    /// A merge step changed the range's merge state in the apply `on_applied` reports (see `apply.rs`).
    merge_step_applied: bool,
    /// The index of the last merge lock or freeze this replica proposed (membership changes wait until it
    /// applies).
    merge_proposed_at: u64,
    /// Whether that step is a freeze (writes proposed behind it would be refused at apply: `holds_writes`).
    merge_proposed_freezes: bool,
    /// Where the range's descriptor stands in the meta range (`publish.rs`).
    publication: publish::Publication,
    /// Ticks this replica has spent without a range over a log that is not empty (`snapshot.rs`,
    /// `ask_for_snapshot_if_stranded`).
    stranded_ticks: u64,
    /// Ticks this replica, unable to campaign, has spent knowing no leader (`hibernate.rs`).
    leaderless_ticks: u64,
    /// Opened by a split applied here and not yet durable: no snapshot is installed until it is
    /// ([`Peer::refuse_installs_until_durable`]).
    installs_wait_for_durable: bool,
    /// A snapshot was refused for that since [`Peer::take_checkpoint_wanted`] last looked.
    checkpoint_wanted: bool,
}

impl Peer {
    /// Opens replica `config.id` of the group `descriptor` names, restarting from what the engines hold: the
    /// log's hard state and entries, and the state machine's applied index (the core hands out again every
    /// committed entry after it). The configuration is the descriptor's, as of that applied index (an empty
    /// descriptor: a replica created empty, which learns its members from a snapshot). Run
    /// [`prepare_groups`] first: the log must hold the state machine's applied entry. `claims` are the node's
    /// (every replica on one node shares them); the replica's range, if it has one, is claimed in them.
    pub fn open(
        mut config: Config,
        options: PeerOptions,
        descriptor: RangeDescriptor,
        log: Arc<dyn LogEngine>,
        kv: &dyn KvEngine,
        claims: Arc<RangeClaims>,
    ) -> Result<Peer, flotilla_raft::Error> {
        options.snapshot.validate().map_err(flotilla_raft::Error::Config)?;
        // A replica without a range applies nothing, so it has applied nothing. The state machine may hold a state
        // of its group all the same: a split that applied here while this replica was being created (a message
        // of the new group came first) — the split's open replaces this replica and starts from that state.
        let (applied_index, applied_term) =
            if descriptor.is_initialized() { kv.applied(descriptor.group_id) } else { (0, 0) };
        assert!(
            applied_index == 0 || log.term(descriptor.group_id, applied_index) == Some(applied_term),
            "group {}: the log lacks the applied entry {applied_index}; prepare_groups must run before opening",
            descriptor.group_id
        );
        config.applied_index = applied_index;
        // A replica whose durable term is at most the bootstrap's, with no vote, never acknowledged a leader (no
        // leader has the bootstrap term, and acknowledgements wait for their term to be durable): it made no lease
        // promise to sit out. This lets a node that opens many fresh groups elect them at once.
        let hard_state = log.hard_state(descriptor.group_id);
        if hard_state.term <= BOOTSTRAP_TERM && hard_state.vote == 0 {
            config.quiet_on_start = false;
        }
        let storage = PeerStorage::new(descriptor.group_id, log, descriptor.conf_state());
        let mut raw = RawNode::new(config, storage)?;
        let role = raw.raft.role;
        if descriptor.is_initialized() {
            claims.hold(&descriptor);
        } else {
            // A replica without a range applies nothing until a snapshot brings one. Its log is empty but where a
            // crash took the state a split wrote and left the log the split's replica started: those entries are
            // the group's (kept: they may have been acknowledged), to apply once the split applies again here and
            // its replica replaces this one — or a snapshot comes.
            raw.hold_apply(true);
        }
        let mut peer = Peer {
            raw,
            descriptor,
            writes: BTreeMap::new(),
            proposals: Default::default(),
            reads: VecDeque::new(),
            responses: Vec::new(),
            applied_index,
            role,
            streams: snapshot::Streams::new(options.snapshot),
            hibernation: hibernate::Hibernation::new(options.hibernate_idle_ticks),
            outbox: Vec::new(),
            removed: false,
            split_off: Vec::new(),
            storage_failure: None,
            persisted_note: PersistedNote::default(),
            persisted_taken: 0,
            log_lag_entries_max: options.log_lag_entries_max,
            compaction: None,
            lead_start: (0, 0),
            hard_state_written: hard_state,
            claims,
            overlapped_by: None,
            merge: merge::MergeProgress::default(),
            merge_proposed_at: 0,
            merge_proposed_freezes: false,
            merged_away: Vec::new(),
            merge_step_applied: false,
            publication: publish::Publication::new(options.publishes),
            stranded_ticks: 0,
            leaderless_ticks: 0,
            installs_wait_for_durable: false,
            checkpoint_wanted: false,
        };
        peer.hold_apply_once_decided();
        Ok(peer)
    }

    pub fn group_id(&self) -> u64 {
        self.descriptor.group_id
    }

    /// The group whose replica on this node held the keys of a snapshot this replica refused since the last call
    /// (the node wakes that replica: [`Peer::check_membership`]).
    pub fn take_overlapped_by(&mut self) -> Option<u64> {
        self.overlapped_by.take()
    }

    pub fn descriptor(&self) -> &RangeDescriptor {
        &self.descriptor
    }

    /// Why the state machine failed under this replica, if it did (reading or installing a snapshot): a broken
    /// environment, for the node to stop on. The replica's output is not to be carried out any more.
    pub fn storage_failure(&self) -> Option<&str> {
        self.storage_failure.as_deref()
    }

    /// This replica's Raft id within its group.
    pub fn replica_id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.role == StateRole::Leader
    }

    pub fn leader(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// A one-line summary of the replica's Raft state (role, term, vote, commit, last entry, applied), for logs
    /// and failure reports.
    pub fn debug_state(&self) -> String {
        let raft = &self.raw.raft;
        let last = raft.raft_log.last_index();
        format!(
            "{:?} term={} vote={} leader={} commit={} last={}@{} persisted={} applied={} sleep={:?}",
            raft.role,
            raft.term,
            raft.vote,
            raft.leader_id,
            raft.raft_log.committed,
            last,
            raft.raft_log.term(last).unwrap_or(0),
            raft.raft_log.persisted,
            self.applied_index,
            self.hibernation.sleep
        )
    }

    /// The replica's current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Time passed that this replica's ticks did not see (its poller stalled past the ticks it catches up on at
    /// once): no timer fires for it, but no lease outlives it.
    pub fn skip_ticks(&mut self, ticks: u64) {
        self.raw.skip_ticks(ticks);
    }

    /// Time passes (ignored while hibernating: the replica needs no ticks then).
    pub fn on_tick(&mut self) {
        self.take_noted_persisted();
        if self.is_hibernating() {
            return;
        }
        self.raw.tick();
        self.tick_snapshot_streams();
        self.ask_for_snapshot_if_stranded();
        self.ask_for_news_if_leaderless();
        self.maybe_hibernate();
    }

    /// Whether a replica stuck for `ticks` (a stranded one, a leaderless one that may not campaign) asks beyond
    /// its group's own traffic now: after two election timeouts, and every two more.
    fn asks_due(&self, ticks: u64) -> bool {
        ticks.is_multiple_of(2 * self.raw.raft.config().election_timeout_ticks.max(1))
    }

    /// Whether time must reach this replica. Not while it hibernates; nor when its group's only member is this
    /// replica and it leads with nothing waiting: nothing can time out then (no election to start, no follower
    /// to keep, no lease to confirm). The node ticks only the replicas that need it.
    pub fn needs_ticks(&self) -> bool {
        let raft = &self.raw.raft;
        let alone = raft.tracker.config.is_only_member(raft.id);
        // With hibernation on, such a replica still ticks until it falls asleep as any idle leader does: the
        // merge trigger takes that as its group going cold (`split_trigger.rs`).
        let idle_alone = alone
            && self.is_leader()
            && self.reads.is_empty()
            && self.no_writes_waiting()
            && self.streams.is_idle()
            && self.hibernation.idle_ticks_max == 0;
        // A range in a merge needs time to move it on (`merge.rs`).
        self.descriptor.is_merging() || !(idle_alone || self.is_hibernating())
    }

    /// The transport cannot reach replica `replica_id`'s node: if this replica leads, it probes that replica
    /// instead of streaming appends to it.
    pub fn report_unreachable(&mut self, replica_id: u64) {
        self.raw.report_unreachable(replica_id);
    }

    /// Starts an election now (tests and leadership placement).
    pub fn campaign(&mut self) {
        self.wake();
        self.raw.campaign();
    }

    /// Leads the group's first term without an election, as the replica a split appointed, its log just begun
    /// with its vote (`prepare_split_group`; `RawNode::lead_as_appointed` says when it may). Returns whether it
    /// does.
    pub fn lead_as_appointed(&mut self) -> bool {
        self.raw.lead_as_appointed()
    }

    /// Hands leadership to replica `target` (the core catches it up, then tells it to campaign at once; while the
    /// transfer runs, proposals are refused as busy). Ignored unless this replica leads.
    pub fn transfer_leader(&mut self, target: u64) {
        if self.is_leader() && target != self.raw.raft.id {
            self.on_request();
            self.propose_batched(); // (the writes taken before it go first, not refused by it)
            self.raw.transfer_leader(target);
        }
    }

    /// A message from another replica of the group. Invalid ones are refused with the core's error. Snapshot
    /// chunks are written to `kv` as they arrive.
    pub fn on_message(&mut self, message: ReplicaMessage, kv: &dyn KvEngine) -> Result<(), flotilla_raft::Error> {
        self.take_noted_persisted();
        if self.wakes(&message) {
            self.wake();
        }
        self.notice_if_unlisted(&message);
        match message {
            // A snapshot's metadata alone is not a snapshot: it only comes as the last chunk of a stream.
            ReplicaMessage::Raft(message) if message.msg_type() == MessageType::Snapshot => {
                Err(flotilla_raft::Error::InvalidMessage("a snapshot message outside a snapshot stream"))
            }
            ReplicaMessage::Raft(message) => self.raw.step(message),
            ReplicaMessage::Chunk(chunk) => {
                self.on_snapshot_chunk(*chunk, kv);
                Ok(())
            }
            ReplicaMessage::Ack(ack) => {
                self.on_snapshot_ack(ack);
                Ok(())
            }
            ReplicaMessage::Hibernate(request) => {
                self.on_hibernate_request(request);
                Ok(())
            }
            ReplicaMessage::Removed(notice) => {
                self.on_removal_notice(notice);
                Ok(())
            }
            ReplicaMessage::MergeReady(ready) => {
                self.on_merge_ready(ready);
                Ok(())
            }
            ReplicaMessage::Decided(notice) => {
                self.on_decision_committed(notice.decided_index, notice.decided_term);
                Ok(())
            }
            ReplicaMessage::Ask(ask) => {
                // A publication is taken from anyone (each is idempotent and guarded by its epoch): a replica of
                // the meta range removed without hearing of it still hands its node's publications to the
                // members it knew (`store-sim` seed 1285: every publication of one node was lost so).
                let from_member = self.descriptor.lists_replica(ask.from);
                if let Some(command) = ask.command.filter(|command| from_member || command.publish.is_some()) {
                    self.on_asked(command, false);
                }
                Ok(())
            }
        }
    }

    fn not_leader(&self) -> PeerError {
        PeerError::NotLeader { leader: self.raw.raft.leader_id }
    }
}
