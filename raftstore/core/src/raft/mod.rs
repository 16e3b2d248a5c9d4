//! The Raft state machine of one replica. `mod.rs` holds the state, role changes, `tick` and the term rules of
//! `step`; each feature lives in its own file as more `impl Raft` blocks:
//!
//! - `election.rs`: pre-vote, campaigns, vote requests and responses;
//! - `replication.rs`: the leader's appends, heartbeats, flow control, commit and proposals;
//! - `follower.rs`: a follower's handling of appends, heartbeats and snapshots;
//! - `reads.rs`: ReadIndex and leader leases;
//! - `membership.rs`: configuration changes and leadership transfer.

mod election;
mod follower;
mod membership;
mod reads;
mod replication;

use std::collections::VecDeque;

use crate::config::{Config, ReadMode};
use crate::error::{Error, Result, StorageError};
use crate::message::{Message, MessageType};
use crate::progress::{Progress, ProgressState};
use crate::raft_log::RaftLog;
use crate::read_only::ReadOnly;
use crate::rng::SeededRng;
use crate::storage::Storage;
use crate::tracker::{Configuration, ProgressTracker};

pub use reads::ReadState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateRole {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

pub struct Raft<S: Storage> {
    pub id: u64,
    pub term: u64,
    pub vote: u64,
    /// The leader of `term` as far as this replica knows (0 if none).
    pub leader_id: u64,
    pub role: StateRole,
    pub raft_log: RaftLog<S>,
    pub tracker: ProgressTracker,
    /// Messages that may be sent at once.
    pub msgs: Vec<Message>,
    /// Responses that claim something about persisted state (appends, votes): held until the `Ready` that made
    /// them true is reported persisted.
    pub msgs_after_persist: Vec<Message>,
    pub read_states: Vec<ReadState>,
    /// The target of a leadership transfer in progress (0 if none).
    pub lead_transferee: u64,
    read_only: ReadOnly,
    /// Reads that arrived before this leader committed an entry of its term; released when it does.
    pending_reads: VecDeque<Message>,
    election_elapsed: u64,
    heartbeat_elapsed: u64,
    randomized_election_timeout: u64,
    /// Ticks since this replica started; the time base of leases. Starts at 1 (0 means "never").
    tick_count: u64,
    /// With leases, right after a (re)start a replica behaves as if in a leader's lease for one election timeout:
    /// before crashing it may have promised a leader not to vote for anyone else for that long.
    boot_quiet: bool,
    /// The highest term known durable (the caller persisted a Ready carrying it). A heartbeat is acknowledged
    /// only in a durable term: an acknowledgement feeds the leader's lease, and a replica that restarts without
    /// remembering its term must not have promised anything in it (see `Config::quiet_on_start`).
    pub(crate) durable_term: u64,
    /// Set once a leader sends TimeoutNow: the target may win an election inside the lease, so no lease reads
    /// until the term changes.
    lease_revoked: bool,
    /// Index of the latest membership change proposed by this leader; another waits until it is applied.
    pending_conf_index: u64,
    /// A follower that asked its leader for a snapshot ([`crate::RawNode::request_snapshot`]) and has not
    /// installed one yet.
    pub(crate) snapshot_requested: bool,
    uncommitted_bytes: u64,
    rng: SeededRng,
    config: Config,
}

impl<S: Storage> Raft<S> {
    pub fn new(config: Config, storage: S) -> Result<Raft<S>> {
        config.validate()?;
        let initial = storage.initial_state()?;
        let raft_log = RaftLog::new(storage, config.applied_index)?;
        let mut raft = Raft {
            id: config.id,
            term: 0,
            vote: 0,
            leader_id: 0,
            role: StateRole::Follower,
            raft_log,
            tracker: ProgressTracker::new(config.inflight_messages_max, config.inflight_bytes_max),
            msgs: Vec::new(),
            msgs_after_persist: Vec::new(),
            read_states: Vec::new(),
            lead_transferee: 0,
            read_only: ReadOnly::default(),
            pending_reads: VecDeque::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: config.election_timeout_ticks,
            tick_count: 1,
            boot_quiet: false,
            durable_term: 0,
            lease_revoked: false,
            pending_conf_index: 0,
            snapshot_requested: false,
            uncommitted_bytes: 0,
            rng: SeededRng::new(config.random_seed),
            config,
        };
        let last_index = raft.raft_log.last_index();
        raft.tracker.apply_configuration(Configuration::from_conf_state(&initial.conf_state), last_index + 1);
        let hard_state = initial.hard_state;
        raft.become_follower(hard_state.term, 0);
        raft.vote = hard_state.vote;
        raft.durable_term = hard_state.term;
        raft.boot_quiet = raft.config.read_mode == ReadMode::LeaseBased && raft.config.quiet_on_start;
        Ok(raft)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether this replica may become leader: it is a voter (of either half of a joint configuration).
    pub fn promotable(&self) -> bool {
        self.tracker.is_voter(self.id)
    }

    pub fn is_learner(&self) -> bool {
        self.tracker.progress.get(&self.id).is_some_and(|p| p.is_learner)
    }

    pub fn tick_count(&self) -> u64 {
        self.tick_count
    }

    pub fn uncommitted_bytes(&self) -> u64 {
        self.uncommitted_bytes
    }

    /// A message of this replica's current term.
    fn message(&self, msg_type: MessageType, to: u64) -> Message {
        Message::new(msg_type, self.id, to, self.term)
    }

    fn send(&mut self, message: Message) {
        match message.kind() {
            Some(
                MessageType::AppendResponse | MessageType::RequestVoteResponse | MessageType::RequestPreVoteResponse,
            ) => self.msgs_after_persist.push(message),
            Some(MessageType::HeartbeatResponse) if self.term > self.durable_term => {
                self.msgs_after_persist.push(message)
            }
            _ => self.msgs.push(message),
        }
    }

    fn reset_randomized_election_timeout(&mut self) {
        let timeout = self.config.election_timeout_ticks;
        self.randomized_election_timeout = self.rng.in_range(timeout, 2 * timeout);
    }

    fn reset(&mut self, term: u64) {
        if term != self.term {
            self.term = term;
            self.vote = 0;
        }
        self.leader_id = 0;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.reset_randomized_election_timeout();
        self.lead_transferee = 0;
        self.lease_revoked = false;
        self.tracker.reset_votes();
        let next_index = self.raft_log.last_index() + 1;
        let (count, bytes) = (self.config.inflight_messages_max, self.config.inflight_bytes_max);
        for (id, progress) in self.tracker.progress.iter_mut() {
            let is_learner = progress.is_learner;
            *progress = Progress::new(next_index, count, bytes);
            progress.is_learner = is_learner;
            if *id == self.id {
                progress.matched = self.raft_log.persisted;
            }
        }
        self.pending_conf_index = 0;
        self.uncommitted_bytes = 0;
        self.read_only = ReadOnly::default();
        self.pending_reads.clear();
    }

    pub fn become_follower(&mut self, term: u64, leader_id: u64) {
        self.reset(term);
        self.leader_id = leader_id;
        self.role = StateRole::Follower;
    }

    fn become_pre_candidate(&mut self) {
        assert_ne!(self.role, StateRole::Leader, "a leader cannot become a pre-candidate");
        // Neither term nor vote changes: a pre-vote promises nothing.
        self.role = StateRole::PreCandidate;
        self.tracker.reset_votes();
        self.leader_id = 0;
        self.boot_quiet = false;
    }

    fn become_candidate(&mut self) {
        assert_ne!(self.role, StateRole::Leader, "a leader cannot become a candidate");
        self.reset(self.term + 1);
        self.vote = self.id;
        self.role = StateRole::Candidate;
        self.boot_quiet = false;
    }

    fn become_leader(&mut self) {
        assert_ne!(self.role, StateRole::Follower, "a follower cannot become leader without an election");
        self.reset(self.term);
        self.leader_id = self.id;
        self.role = StateRole::Leader;
        if let Some(progress) = self.tracker.progress.get_mut(&self.id) {
            progress.become_replicate();
            progress.matched = self.raft_log.persisted;
        }
        // Membership changes proposed by earlier leaders may still be unapplied; wait for them.
        self.pending_conf_index = self.raft_log.last_index();
        // The no-op of the new term: committing it commits every earlier entry (Raft §5.4.2, §8).
        self.append_entries_as_leader(vec![crate::message::Entry::default()]);
    }

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.tick_count += 1;
        if self.role == StateRole::Leader {
            self.tick_heartbeat();
        } else {
            self.tick_election();
        }
    }

    /// Resumes after a pause in which time went uncounted (a hibernated group stops ticking). Any lease confirmed
    /// before the pause may have run out meanwhile: the lease's time base moves a whole election timeout on, past
    /// every such lease. The election and heartbeat clocks restart, so check-quorum gives the other replicas a
    /// full election timeout to answer again, and a follower waits a full timeout before it campaigns.
    pub fn resume_after_pause(&mut self) {
        self.tick_count += self.config.election_timeout_ticks;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
    }

    /// Time passed that this replica's timers did not see (its host stalled for longer than it catches up on):
    /// the lease's time base moves on by `ticks`, so no lease outlives the time that really passed. No timer
    /// fires for them.
    pub fn skip_ticks(&mut self, ticks: u64) {
        self.tick_count += ticks;
    }

    fn tick_election(&mut self) {
        self.election_elapsed += 1;
        if self.election_elapsed >= self.config.election_timeout_ticks {
            self.boot_quiet = false;
        }
        if self.promotable() && self.election_elapsed >= self.randomized_election_timeout {
            self.election_elapsed = 0;
            self.hup(false);
        }
    }

    fn tick_heartbeat(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.config.election_timeout_ticks {
            self.election_elapsed = 0;
            if self.config.check_quorum && !self.tracker.quorum_active_and_reset(self.id) {
                // Check-quorum: a leader cut off from a quorum steps down rather than serve stale state.
                self.become_follower(self.term, 0);
                return;
            }
            self.abort_leader_transfer();
            self.hand_over_if_removed();
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_interval_ticks {
            self.heartbeat_elapsed = 0;
            self.tick_heartbeats();
        }
    }

    /// Whether a vote request arrives while this replica still honours a leader's lease (or its own restart's
    /// quiet period): it then ignores the request, so a disruptive candidate cannot depose a live leader.
    fn in_lease(&self) -> bool {
        self.config.check_quorum
            && self.election_elapsed < self.config.election_timeout_ticks
            && (self.leader_id != 0 || self.boot_quiet)
    }

    /// Processes a message from another replica.
    pub fn step(&mut self, m: Message) -> Result<()> {
        let kind = m.kind().ok_or(Error::InvalidMessage("unknown message type"))?;
        if m.to != self.id || m.from == 0 {
            return Err(Error::InvalidMessage("wrong addressee or no sender"));
        }
        if m.term > self.term {
            if matches!(kind, MessageType::RequestVote | MessageType::RequestPreVote) {
                let forced = m.context.as_ref() == crate::message::CAMPAIGN_TRANSFER_CONTEXT;
                if !forced && self.in_lease() {
                    return Ok(());
                }
            }
            match kind {
                // A pre-vote changes no term; neither does a granted pre-vote (we raise it once we win).
                MessageType::RequestPreVote => {}
                MessageType::RequestPreVoteResponse if !m.reject => {}
                MessageType::Append | MessageType::Heartbeat | MessageType::Snapshot => {
                    self.become_follower(m.term, m.from)
                }
                _ => self.become_follower(m.term, 0),
            }
        } else if m.term < self.term {
            if (self.config.check_quorum || self.config.pre_vote)
                && matches!(kind, MessageType::Append | MessageType::Heartbeat)
            {
                // A stale leader (one cut off while the rest moved on) learns of the newer term and steps down;
                // with pre-vote and check-quorum it might otherwise never hear of it.
                let reply = self.message(MessageType::AppendResponse, m.from);
                self.msgs.push(reply);
            } else if matches!(kind, MessageType::RequestPreVote | MessageType::RequestVote) {
                // Reject with our term (Raft §5.1): a candidate that never learns the newer term can livelock
                // against a replica whose campaigns never reach it (raft-sim seed 8778: an out-of-date replica
                // campaigning only to its old configuration kept its term ahead of the one viable candidate).
                let response_kind = if kind == MessageType::RequestPreVote {
                    MessageType::RequestPreVoteResponse
                } else {
                    MessageType::RequestVoteResponse
                };
                let mut reply = self.message(response_kind, m.from);
                reply.reject = true;
                (reply.commit, reply.commit_term) = self.commit_info();
                self.msgs.push(reply);
            }
            return Ok(());
        }
        let informs_commit = match kind {
            MessageType::RequestVoteResponse | MessageType::RequestPreVoteResponse => m.reject,
            MessageType::RequestVote | MessageType::RequestPreVote => true,
            _ => false,
        };
        if informs_commit {
            self.maybe_commit_by_vote(&m);
        }
        match kind {
            MessageType::RequestVote | MessageType::RequestPreVote => {
                self.handle_vote_request(m, kind);
                Ok(())
            }
            _ => match self.role {
                StateRole::Leader => self.step_leader(m, kind),
                StateRole::Candidate | StateRole::PreCandidate => self.step_candidate(m, kind),
                StateRole::Follower => self.step_follower(m, kind),
            },
        }
    }

    fn step_leader(&mut self, m: Message, kind: MessageType) -> Result<()> {
        // A follower that asked for a snapshot asks again in each answer it gives (`RawNode::request_snapshot`);
        // the answer itself counts as usual.
        let asks_snapshot = m.request_snapshot.then_some(m.from);
        match kind {
            MessageType::AppendResponse => self.handle_append_response(m),
            MessageType::HeartbeatResponse => self.handle_heartbeat_response(m),
            MessageType::TransferLeader => self.handle_transfer_leader(m.from),
            MessageType::ReadIndex => self.handle_read_index(m)?,
            // Another leader of our term cannot exist (election safety); anything else is stale or misrouted.
            _ => {}
        }
        if let Some(from) = asks_snapshot {
            self.handle_snapshot_request(from);
        }
        Ok(())
    }

    fn step_follower(&mut self, m: Message, kind: MessageType) -> Result<()> {
        match kind {
            MessageType::Append => {
                self.election_elapsed = 0;
                self.leader_id = m.from;
                self.handle_append(m)?;
            }
            MessageType::Heartbeat => {
                self.election_elapsed = 0;
                self.leader_id = m.from;
                self.handle_heartbeat(m);
            }
            MessageType::Snapshot => {
                self.election_elapsed = 0;
                self.leader_id = m.from;
                self.handle_snapshot(m)?;
            }
            // Forwarded to the leader; dropped if none is known (the asker retries).
            MessageType::TransferLeader | MessageType::ReadIndex if self.leader_id != 0 => {
                let mut forwarded = m;
                forwarded.to = self.leader_id;
                self.msgs.push(forwarded);
            }
            MessageType::TimeoutNow if self.promotable() => self.hup(true),
            MessageType::ReadIndexResponse => {
                self.read_states.push(ReadState { index: m.index, context: m.context });
            }
            _ => {}
        }
        Ok(())
    }

    /// Panics if the replica's state breaks an invariant. Called in debug builds after every step, and by every
    /// test and simulator after every action.
    pub fn validate(&self) {
        self.raft_log.validate();
        self.tracker.config.validate();
        assert!(self.vote == 0 || self.term > 0, "a vote without a term");
        match self.role {
            StateRole::Leader => {
                assert_eq!(self.leader_id, self.id, "a leader that does not know itself");
                if let Some(progress) = self.tracker.progress.get(&self.id) {
                    assert!(progress.matched <= self.raft_log.persisted, "leader counts unpersisted entries");
                }
                for (id, progress) in &self.tracker.progress {
                    assert!(progress.matched < progress.next_index, "progress of {id}: match >= next");
                    if progress.state == ProgressState::Snapshot {
                        assert!(progress.pending_snapshot > 0, "snapshot state without a snapshot");
                    }
                }
            }
            StateRole::Candidate => assert_eq!(self.vote, self.id, "a candidate that did not vote for itself"),
            _ => assert_ne!(self.leader_id, self.id, "a non-leader that thinks it leads"),
        }
    }

    fn storage_fatal(&self, what: &str, e: StorageError) -> ! {
        panic!("replica {}: storage failed while {what}: {e}; the node must stop", self.id)
    }

    pub fn read_mode(&self) -> ReadMode {
        self.config.read_mode
    }
}
