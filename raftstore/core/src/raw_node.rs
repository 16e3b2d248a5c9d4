//! [`RawNode`]: the interface of one replica to its caller, built around numbered [`Ready`]s.
//!
//! See the crate docs for the contract. In short: call `ready()` when `has_ready()`; persist its hard state,
//! snapshot and entries (in that order, after everything of earlier `Ready`s); send its messages at once; then
//! report `on_persisted(number)` when the write is durable (at once if `must_sync` is false and nothing earlier
//! is outstanding); apply its committed entries and report `on_applied`.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::config::Config;
use crate::error::Result;
use crate::message::{ConfChangeV2, ConfState, Entry, HardState, Message, Snapshot};
use crate::raft::{Raft, ReadState, StateRole};
use crate::storage::Storage;

/// Volatile state worth telling the caller about when it changes (it need not be persisted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    pub leader_id: u64,
    pub role: StateRole,
}

/// Everything the caller must do for the replica, numbered so that persistence can complete asynchronously.
#[derive(Debug, Default)]
pub struct Ready {
    /// 1, 2, 3, … per `RawNode`; `on_persisted(n)` declares every `Ready` numbered `<= n` durable.
    pub number: u64,
    pub soft_state: Option<SoftState>,
    /// To persist if present (term, vote and commit).
    pub hard_state: Option<HardState>,
    /// A snapshot from the leader: install it (replacing the state machine and the log) before anything else.
    pub snapshot: Option<Snapshot>,
    /// A snapshot whose state the caller installs in its state machine (before applying `committed_entries`),
    /// leaving the log as it is: the log holds the snapshot's entry, and every entry after it stays. Set only for
    /// a snapshot this replica asked for (`RawNode::request_snapshot`). Nothing to persist in the log.
    pub installed_state: Option<Snapshot>,
    /// Entries to append to the log, replacing any conflicting suffix.
    pub entries: Vec<Entry>,
    /// Messages that may be sent now, before this `Ready` is persisted.
    pub messages: Vec<Message>,
    /// Messages to send only once this `Ready` and every earlier one are persisted (the responses that
    /// acknowledge what they persist). Always empty unless `Config::persisted_messages_in_ready`; otherwise the
    /// core holds them and releases them in a later Ready's `messages` after `on_persisted`.
    pub messages_after_persist: Vec<Message>,
    /// Committed entries to apply, in order; all are already persisted locally.
    pub committed_entries: Vec<Entry>,
    /// Reads confirmed since the last `Ready`.
    pub read_states: Vec<ReadState>,
    /// Whether the persisted part must be durable (synced) before `on_persisted`: true when term, vote, entries or
    /// a snapshot changed. A change of the commit index alone may be written lazily.
    pub must_sync: bool,
}

/// What a `Ready` asked to persist, and the responses that wait for it.
struct PendingPersist {
    number: u64,
    last_entry: Option<(u64, u64)>,
    snapshot_index: Option<u64>,
    messages: Vec<Message>,
    must_sync: bool,
    persisted: bool,
    /// The term of the hard state this Ready carried.
    term: u64,
}

pub struct RawNode<S: Storage> {
    pub raft: Raft<S>,
    previous_soft_state: SoftState,
    previous_hard_state: HardState,
    last_ready_number: u64,
    pending: VecDeque<PendingPersist>,
}

impl<S: Storage> RawNode<S> {
    pub fn new(config: Config, storage: S) -> Result<RawNode<S>> {
        let raft = Raft::new(config, storage)?;
        let previous_hard_state = raft.hard_state();
        let previous_soft_state = raft.soft_state();
        Ok(RawNode { raft, previous_soft_state, previous_hard_state, last_ready_number: 0, pending: VecDeque::new() })
    }

    pub fn tick(&mut self) {
        self.raft.tick();
    }

    /// Starts an election now (if this replica may).
    pub fn campaign(&mut self) {
        self.raft.hup(false);
    }

    /// Leads the current term without an election, as a split's appointed first leader (`Raft::lead_as_appointed`
    /// says when it may). Returns whether it does.
    pub fn lead_as_appointed(&mut self) -> bool {
        let led = self.raft.lead_as_appointed();
        #[cfg(debug_assertions)]
        self.raft.validate();
        led
    }

    pub fn step(&mut self, message: Message) -> Result<()> {
        let result = self.raft.step(message);
        #[cfg(debug_assertions)]
        self.raft.validate();
        result
    }

    /// Proposes one command.
    pub fn propose(&mut self, data: Bytes) -> Result<()> {
        self.raft.propose(vec![Entry::normal(data)])
    }

    /// Proposes several commands at once (one append to the log, one round of messages).
    pub fn propose_batch(&mut self, data: impl IntoIterator<Item = Bytes>) -> Result<()> {
        self.raft.propose(data.into_iter().map(Entry::normal).collect())
    }

    pub fn propose_conf_change(&mut self, change: &ConfChangeV2) -> Result<()> {
        self.raft.propose_conf_change(change)
    }

    pub fn apply_conf_change(&mut self, change: &ConfChangeV2) -> Result<ConfState> {
        self.raft.apply_conf_change(change)
    }

    pub fn read_index(&mut self, context: Bytes) -> Result<()> {
        self.raft.read_index(context)
    }

    pub fn transfer_leader(&mut self, target: u64) {
        self.raft.transfer_leader(target);
    }

    /// See [`Raft::skip_ticks`].
    pub fn skip_ticks(&mut self, ticks: u64) {
        self.raft.skip_ticks(ticks);
    }

    /// See [`Raft::resume_after_pause`].
    pub fn resume_after_pause(&mut self) {
        self.raft.resume_after_pause();
    }

    /// As the leader, tells every member the commit index now, by a heartbeat round as at a heartbeat tick —
    /// for an entry that committed with nothing to follow it, which the followers would otherwise learn of only
    /// at the next heartbeat. Nothing on a follower.
    pub fn broadcast_commit(&mut self) {
        if self.raft.role == StateRole::Leader {
            self.raft.broadcast_heartbeat_with_context(Bytes::new());
        }
    }

    /// The entry at `(index, term)` is known committed from outside the group (a merge's decision, vouched for
    /// by the commit in the left group's log: see the raftstore's `peer/merge.rs`). If this log holds it, every
    /// entry up to it is the group's committed log (Log Matching) and is committed here too. Returns whether the
    /// commit index moved.
    pub fn learn_committed(&mut self, index: u64, term: u64) -> bool {
        self.raft.raft_log.maybe_commit(index, term)
    }

    pub fn report_unreachable(&mut self, id: u64) {
        self.raft.report_unreachable(id);
    }

    pub fn report_snapshot(&mut self, id: u64, success: bool) {
        self.raft.report_snapshot(id, success);
    }

    /// Asks the leader for a snapshot: for a follower whose log is whole but whose state is not (a replica that
    /// lost its range's first state and holds its applies: `hold_apply`). It goes on taking and acknowledging
    /// entries (the group may need it for a quorum) and asks again with each answer to the leader until a snapshot
    /// past what it applied is installed — the state only, if its log holds the snapshot's entry (see
    /// `Ready::installed_state`). Calling it again sends the request once more (a lost one). Nothing without a
    /// known leader, or but as a follower. Returns whether it asked.
    pub fn request_snapshot(&mut self) -> bool {
        self.raft.request_snapshot()
    }

    /// Whether a snapshot this replica asked for is still to come.
    pub fn snapshot_requested(&self) -> bool {
        self.raft.snapshot_requested
    }

    /// Holds back committed entries (none handed out for applying) while `held`, or lets them out again. For a
    /// replica that cannot apply yet: one whose state machine lost its range (a crash took a split's state, while
    /// the log the split started survived), which may persist and acknowledge entries but must wait for its
    /// range — from the split applied again, or a snapshot — before applying any.
    pub fn hold_apply(&mut self, held: bool) {
        self.raft.raft_log.apply_held = held;
    }

    pub fn has_ready(&self) -> bool {
        let raft = &self.raft;
        raft.soft_state() != self.previous_soft_state
            || raft.hard_state() != self.previous_hard_state
            || !raft.msgs.is_empty()
            || !raft.msgs_after_persist.is_empty()
            || !raft.read_states.is_empty()
            || raft.raft_log.unstable.has_next_entries()
            || raft.raft_log.unstable.next_snapshot().is_some()
            || raft.raft_log.installed_state.is_some()
            || raft.raft_log.has_next_committed_entries()
    }

    /// Takes out everything the caller must do now. Call only when `has_ready()`; an empty `Ready` is harmless.
    pub fn ready(&mut self) -> Ready {
        self.last_ready_number += 1;
        let number = self.last_ready_number;
        let raft = &mut self.raft;
        let soft_state = raft.soft_state();
        let hard_state = raft.hard_state();
        let term_or_vote_changed =
            hard_state.term != self.previous_hard_state.term || hard_state.vote != self.previous_hard_state.vote;
        let committed_bytes_max = raft.config().committed_bytes_max_per_ready;
        let log = &mut raft.raft_log;
        let snapshot = log.unstable.next_snapshot().cloned();
        let installed_state = log.installed_state.take();
        let entries = log.unstable.next_entries().to_vec();
        log.unstable.accept_in_progress();
        let committed_entries = log.next_committed_entries(committed_bytes_max);
        if let Some(last) = committed_entries.last() {
            raft.raft_log.applying_to(last.index);
        }
        raft.reduce_uncommitted_bytes(&committed_entries);
        let must_sync = term_or_vote_changed || snapshot.is_some() || !entries.is_empty();
        let mut record = PendingPersist {
            number,
            last_entry: entries.last().map(|e| (e.index, e.term)),
            snapshot_index: snapshot.as_ref().map(Snapshot::index),
            messages: std::mem::take(&mut raft.msgs_after_persist),
            must_sync,
            persisted: false,
            term: hard_state.term,
        };
        let mut ready = Ready {
            number,
            soft_state: (soft_state != self.previous_soft_state).then_some(soft_state),
            hard_state: (hard_state != self.previous_hard_state).then_some(hard_state),
            snapshot,
            installed_state,
            entries,
            messages: std::mem::take(&mut raft.msgs),
            committed_entries,
            read_states: std::mem::take(&mut raft.read_states),
            must_sync,
            messages_after_persist: Vec::new(),
        };
        let held_until_persisted = must_sync || !self.pending.is_empty();
        if held_until_persisted && self.raft.config().persisted_messages_in_ready {
            // The caller sends them once this Ready is durable; only our own vote stays, to be counted then.
            let own_id = self.raft.id;
            let (own, others) = std::mem::take(&mut record.messages).into_iter().partition(|m| m.to == own_id);
            record.messages = own;
            ready.messages_after_persist = others;
        }
        if !held_until_persisted {
            // Nothing new to make durable and nothing earlier outstanding: the held responses are already true.
            for message in record.messages {
                assert_ne!(message.to, self.raft.id, "a message to itself without anything to persist");
                ready.messages.push(message);
            }
        } else {
            self.pending.push_back(record);
        }
        self.previous_soft_state = soft_state;
        self.previous_hard_state = hard_state;
        ready
    }

    /// Declares every `Ready` numbered `<= number` persisted (durable if it had `must_sync`). Releases the
    /// responses that waited for it (to be sent with the next `Ready`) and lets a leader count its own entries.
    pub fn on_persisted(&mut self, number: u64) {
        for record in self.pending.iter_mut() {
            if record.number <= number {
                record.persisted = true;
            }
        }
        while self.pending.front().is_some_and(|r| r.persisted || !r.must_sync) {
            let record = self.pending.pop_front().expect("checked non-empty");
            self.raft.durable_term = self.raft.durable_term.max(record.term);
            if let Some(index) = record.snapshot_index {
                self.raft.raft_log.stable_snapshot_to(index);
            }
            if let Some((index, term)) = record.last_entry {
                self.raft.raft_log.stable_to(index, term);
            }
            for message in record.messages {
                if message.to == self.raft.id {
                    // Our own vote: it counts now that it is durable. A stale one is ignored by the term check.
                    let _ = self.raft.step(message);
                } else {
                    self.raft.msgs.push(message);
                }
            }
        }
        if self.pending.is_empty() {
            // An emptied deque keeps its buffer, which every idle group would hold for good.
            self.pending = VecDeque::new();
        }
        self.raft.on_entries_persisted();
        #[cfg(debug_assertions)]
        self.raft.validate();
    }

    /// Takes back the committed entries from `index` on that were handed out for applying and not applied: the
    /// next Readys hand them out again, in order (once not held: [`RawNode::hold_apply`]).
    pub fn hand_back(&mut self, index: u64) {
        let log = &mut self.raft.raft_log;
        assert!(index > log.applied && index <= log.applying + 1, "handing back {index}: applied {}", log.applied);
        log.applying = index - 1;
    }

    /// How far committed entries have been handed out for applying.
    pub fn applying(&self) -> u64 {
        self.raft.raft_log.applying
    }

    /// The caller applied committed entries up to `index`.
    pub fn on_applied(&mut self, index: u64) {
        self.raft.on_applied(index);
    }

    /// Whether this replica must learn promptly that its Readys are persisted: a leader (its own entries count
    /// toward the commit), a candidate (its own vote counts once durable), or a replica with committed entries
    /// that wait for local persistence before they can be applied. Otherwise (a follower whose responses are in
    /// `messages_after_persist`) `on_persisted` may wait until the replica next handles anything.
    pub fn needs_prompt_persisted(&self) -> bool {
        let raft = &self.raft;
        raft.role != StateRole::Follower || raft.raft_log.committed > raft.raft_log.applying
    }

    /// For a leader: the lowest index every other replica (voter or learner) is known to hold, its own last index
    /// if it has none — what its log must keep for no replica to need a snapshot. `None` for any other role.
    pub fn matched_min(&self) -> Option<u64> {
        let raft = &self.raft;
        if raft.role != StateRole::Leader {
            return None;
        }
        let others = raft.tracker.progress.iter().filter(|(id, _)| **id != raft.id).map(|(_, p)| p.matched);
        Some(others.min().unwrap_or_else(|| raft.raft_log.last_index()))
    }

    /// Whether `Ready`s handed out are still waiting for `on_persisted`.
    pub fn has_unpersisted_ready(&self) -> bool {
        self.pending.iter().any(|r| r.must_sync)
    }

    pub fn status(&self) -> Status {
        Status {
            id: self.raft.id,
            hard_state: self.raft.hard_state(),
            soft_state: self.raft.soft_state(),
            applied: self.raft.raft_log.applied,
            last_index: self.raft.raft_log.last_index(),
        }
    }
}

/// A summary of a replica's state, for operators and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: u64,
    pub hard_state: HardState,
    pub soft_state: SoftState,
    pub applied: u64,
    pub last_index: u64,
}

impl<S: Storage> Raft<S> {
    pub fn hard_state(&self) -> HardState {
        HardState { term: self.term, vote: self.vote, commit: self.raft_log.committed }
    }

    pub fn soft_state(&self) -> SoftState {
        SoftState { leader_id: self.leader_id, role: self.role }
    }
}
