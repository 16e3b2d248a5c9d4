//! Merges: a range taken into its left neighbour through both groups' logs (design in `docs/architecture.md`,
//! "Merges"). Both groups have replicas on the same nodes, whose state machine already holds both ranges' keys:
//! nothing is copied. The right group decides, in its own log, whether the merge happens; the left group is
//! locked meanwhile, so that once decided the merge can always commit.
//!
//! 1. **Prepare** (left log, asked by the host): the left range is locked for its right neighbour at that
//!    range's current epoch; its version moves on, and until the merge ends it takes no split, membership change
//!    or other merge (writes and reads go on).
//! 2. **Freeze** (right log, asked by the host with the locked left range): the right range takes no more
//!    writes, reads, splits or membership changes; its data is final as of this entry `F`.
//!    Once it applied the decision (step 3), a write that reaches it is handed to its node's left replica,
//!    whose leader proposes it behind the commit it proposed (`Peer::decided_into`, `Peer::takes_behind_commit`).
//! 3. **Decide** (right log, by its leader once every replica's log holds `F`): the merge will commit. Final:
//!    the range never unfreezes. If the replicas do not all hold `F` within [`MERGE_TIMEOUT_TICKS`], the leader
//!    proposes **Unfreeze** instead. Decide and Unfreeze are one log's entries: the first applied wins. The
//!    decision records its own entry's index and term `(D, T)`.
//! 4. **Confirm**: every replica of the frozen range whose first state the state machine holds durably (not so
//!    for a replica a split opened here, until the next checkpoint) tells the right leader ([`MergeReady`]),
//!    again at each handling while it is frozen — in parallel with the decision, not after it.
//! 5. **Commit** (left log, asked by the right leader once it applied the decision, every replica's log holds
//!    it durably — the leader's progress tracker says so — and every replica confirmed; then again at each tick
//!    until it ends; the ask goes to the left group's replica on the same node, which hands it to its leader):
//!    the left range grows over the right one and this node's right replica ends — its record says which group
//!    took its keys — in one state machine write. That needs the right replica here to have applied the
//!    decision (its data is then the right range's final data); one that has not yet — its log holds the
//!    decision, but it has not heard that it committed, or it is applying its log again after a crash — is
//!    waited for: the left replica holds its apply at the commit (`Peer::apply_committed`) and, at each tick
//!    meanwhile, tells it that `(D, T)` committed ([`MergeAsk::DecisionCommitted`]): the commit in the left log
//!    vouches for that, so a right replica whose group's other members have all ended still applies its
//!    decision (`RawNode::learn_committed`); a right replica that applies its decision wakes the left replica
//!    here at once. The left range was locked since before the freeze, so the commit, routed with the epoch the
//!    freeze recorded, always applies. (Until session 20 the confirmation came after the decision — applied,
//!    and its commit index stored durably — a further log write and message round with the range frozen.)
//! 6. **Cancel** (left log, by the left leader): the lock is given up once the right range, as this node's
//!    replica of it shows, moved past the locked epoch without freezing for this merge (it never will, then) or
//!    unfroze. A left range that waits too long for a freeze that may never come (the host stopped) asks the
//!    right group for a **Fence** — a version bump that keeps any freeze of the old epoch from applying — and
//!    then cancels.
//!
//! A decided right range is the left range's: a replica of the left group that catches up by a snapshot taken
//! after the commit ends its node's decided right replica as it installs (`range_claims.rs`), whether or not
//! the snapshot still covers those keys.

use std::collections::BTreeSet;

use flotilla_engine::contract::KvEngine;

use super::{Peer, PeerError, Response, Token};
use crate::command::{stored_range, Command, MergeCommand, MergeStep};
use crate::message::{AskMessage, MergeReady, ReplicaMessage};
use crate::range::{RangeDescriptor, RangeEpoch, RangeError};

/// Ticks a frozen range waits for every replica to hold its freeze before the merge is given up (a replica's
/// node is down, say), and a locked range for its neighbour to freeze: 20 s at the store's default 100 ms tick.
pub const MERGE_TIMEOUT_TICKS: u64 = 200;

/// What a replica in a merge wants done beyond its own group (advisory: each is asked again while it matters).
#[derive(Clone, Debug, PartialEq)]
pub enum MergeAsk {
    /// Propose `command` (a merge step) to group `group_id`, through its replica on this node (a duplicate is
    /// refused by its epoch).
    Propose { group_id: u64, command: Box<Command> },
    /// Tell group `group_id`'s replica on this node that its decision, the entry at `(decided_index,
    /// decided_term)`, committed: a merge commit here waits for it to apply it, and it may have no member left
    /// to hear that from. (`decided_term` 0: a decision recorded before terms were — only wake it.)
    DecisionCommitted { group_id: u64, decided_index: u64, decided_term: u64 },
    /// Wake group `group_id`'s replica on this node (the left range's): this replica applied the decision its
    /// merge commit may be waiting for.
    Wake { group_id: u64 },
}

/// A replica's progress in a merge (reset whenever its range's merge state changes).
#[derive(Debug, Default)]
pub(super) struct MergeProgress {
    /// The merge state it counts for: the freeze (or lock) and the decision it saw last.
    seen: Option<(u64, u64)>,
    /// Ticks since then.
    ticks: u64,
    /// The log index of the last step it proposed itself.
    proposed_at: Option<u64>,
    /// As the right range's leader: the replicas that confirmed their first state durable (step 4).
    confirmed: BTreeSet<u64>,
    /// As a replica of the decided right range: whether it woke its node's left replica after applying the
    /// decision.
    left_woken: bool,
    /// As a replica of the decided right range: whether it ended itself, taken in already (`end_taken_in`).
    ended_here: bool,
    /// As the right range's leader: how many other replicas held the decision when its commit was last told.
    holding_told: usize,
    /// As the right range's leader: `ticks` when it last asked the left group for the commit.
    commit_asked_at_ticks: Option<u64>,
    /// As a leader: the step it last proposed because another replica asked (`on_asked`), at (term, index) — an
    /// ask repeated while that entry is on its way is not proposed again.
    asked_proposed: Option<(i32, u64, u64)>,
    /// As a replica of the locked left range: the right range a merge commit in its log waits for (this node's
    /// replica of it has not applied the decision yet; `Peer::apply_committed`).
    pub(super) commit_waits_for: Option<RangeDescriptor>,
    /// Whether that replica was told its decision committed since the wait began (then again at each tick).
    pub(super) commit_wait_told: bool,
    /// As the locked left range's leader: the right range of the merge commit it proposed, with the term and
    /// index of its entry (`takes_behind_commit`).
    commit_proposed: Option<(RangeDescriptor, u64, u64)>,
}

/// Whether `now` is later than `then` in a range's history (each part of an epoch only grows).
fn moved_past(now: RangeEpoch, then: RangeEpoch) -> bool {
    now.version > then.version || now.conf_version > then.conf_version
}

impl Peer {
    /// Whether the range is frozen for a merge into its left neighbour.
    pub fn is_frozen(&self) -> bool {
        self.descriptor.merge.is_some()
    }

    /// Whether a write that reaches this replica now waits for its merge to move on (`PeerFsm::release_parked`):
    /// the range is frozen and the merge not decided yet, or this replica leads and proposed a freeze that has
    /// not applied (a write proposed now would follow it in the log, and be refused when it applies).
    pub fn holds_writes(&self) -> bool {
        let freeze_on_its_way =
            self.merge_proposed_freezes && self.merge_proposed_at > self.applied_index && self.is_leader();
        (self.is_frozen() && self.decided_into().is_none()) || freeze_on_its_way
    }

    /// Whether this replica leads the range locked for the merge of group `right_group_id` into it, the merge's
    /// commit not proposed here yet: writes that group's decided replicas hand over wait for it
    /// (`store/parked.rs`).
    pub fn awaits_commit_for(&self, right_group_id: u64) -> bool {
        self.is_leader()
            && self.descriptor.merge_lock.is_some_and(|lock| lock.right_group_id == right_group_id)
            && self.merge.commit_proposed.as_ref().is_none_or(|(right, _, _)| right.group_id != right_group_id)
    }

    /// The group taking this range in, once this replica applied the merge's decision: the writes it gets are
    /// that group's to take (see [`Peer::takes_behind_commit`]).
    pub fn decided_into(&self) -> Option<u64> {
        let state = self.descriptor.merge.filter(|state| state.decided_index != 0)?;
        (self.applied_index >= state.decided_index).then_some(state.into_group_id)
    }

    /// Whether a write of `keys`, refused by this range as it is (`refusal`), is proposed all the same: this
    /// replica leads the locked left range and proposed, in this term, the merge's commit, not applied yet —
    /// the write's entry follows it in the log, so it applies over the grown range (and is refused there, like
    /// any write, if the commit turns out not to). Only for writes routed without an epoch, whose keys all lie
    /// in this range or the one the commit takes in: writes handed over by that range's replica
    /// (`PeerFsm::on_message`), which take the commit's round instead of waiting for it to end.
    pub(super) fn takes_behind_commit(&self, keys: &[&[u8]], sent: Option<RangeEpoch>, refusal: &RangeError) -> bool {
        let outside = matches!(refusal, RangeError::KeyNotInRange { .. } | RangeError::BatchSpansRanges { .. });
        outside && self.behind_commit(keys, sent)
    }

    /// Whether a write handed over by the range a merge decided into this one would be proposed now
    /// ([`Peer::takes_behind_commit`]; a write whose keys this range holds already always is).
    pub fn can_take_behind_commit(&self, command: &Command) -> bool {
        let keys: Vec<&[u8]> = command.ops.iter().map(|op| op.key.as_slice()).collect();
        self.descriptor.check(&keys, command.epoch).is_ok() || self.behind_commit(&keys, command.epoch)
    }

    fn behind_commit(&self, keys: &[&[u8]], sent: Option<RangeEpoch>) -> bool {
        let Some((right, term, at)) = &self.merge.commit_proposed else { return false };
        sent.is_none()
            && self.is_leader()
            && *term == self.raw.raft.term
            && self.applied_index < *at
            && keys.iter().all(|key| self.descriptor.contains(key) || right.contains(key))
    }

    /// Proposes a step of a merge for the client `token`, routed with the range's whole current epoch:
    /// answered `Written(Merge { range })` once applied (or `InvalidMerge` if it did not fit then), or refused
    /// now. Returns the index of its entry, if proposed.
    pub fn propose_merge(&mut self, token: Token, merge: MergeCommand) -> Option<u64> {
        self.on_request();
        if !self.is_leader() {
            let refusal = self.not_leader();
            self.responses.push((token, Response::Failed(refusal)));
            return None;
        }
        let locks = [MergeStep::Prepare as i32, MergeStep::Freeze as i32].contains(&merge.step);
        let freezes = merge.step == MergeStep::Freeze as i32;
        if locks && self.raw.raft.has_pending_conf_change() {
            // The members stay as they are from the lock or freeze on: no membership change may be on its way.
            let busy = PeerError::Busy(flotilla_raft::DropReason::ConfChangePending);
            self.responses.push((token, Response::Failed(busy)));
            return None;
        }
        let command = Command { request_id: token, ..Command::merge(self.descriptor.epoch(), merge) };
        let proposed = self.propose_entry(token, command);
        if let Some(at) = proposed.filter(|_| locks) {
            self.merge_proposed_at = at;
            self.merge_proposed_freezes = freezes;
        }
        proposed
    }

    /// A lock or freeze proposed here and not applied yet: membership changes wait for it (then refuse).
    pub(super) fn merge_step_pending(&self) -> bool {
        self.merge_proposed_at > self.applied_index
    }

    /// A command another replica (of this group, or of another group on this node) asks this group to propose —
    /// a merge step, or a publication in the meta range (`publish.rs`): proposed if this replica leads (a merge
    /// step only if routed with the current epoch; a publication only on the meta range); else handed to every
    /// other member (`forward`: not when it came from another replica already) — whichever leads proposes it.
    /// Not only to the leader this replica believes in: cut off from its group, it may know none, or a stale one,
    /// while the merge waits on the group (a test found one that never forwarded).
    pub fn on_asked(&mut self, command: Command, forward: bool) {
        if self.is_leader() {
            let current = command.epoch == Some(self.descriptor.epoch());
            match (command.merge, command.publish, command.split.is_none() && command.ops.is_empty()) {
                (Some(merge), None, true) if current => self.propose_asked_merge(*merge),
                (None, Some(range), true) if self.descriptor.is_meta() => {
                    self.on_request(); // (a sleeping leader wakes to carry it)
                    self.propose_entry(0, Command::publish(*range));
                }
                _ => {}
            }
            return;
        }
        let me = self.raw.raft.id;
        if forward {
            for to in self.descriptor.replicas.iter().map(|r| r.replica_id).filter(|&id| id != me) {
                let ask = AskMessage { from: me, to, command: Some(command.clone()) };
                self.outbox.push(ReplicaMessage::Ask(ask));
            }
        }
    }

    /// Proposes a merge step another replica asked for — unless the same step, proposed here in this term, is
    /// still on its way (not applied yet): the asker repeats its ask until the step takes effect, and each copy
    /// would be another entry of this log (refused at apply). Keyed by term: a proposal a new leader may have
    /// truncated never blocks the ask.
    fn propose_asked_merge(&mut self, merge: MergeCommand) {
        let (step, term) = (merge.step, self.raw.raft.term);
        if let Some((proposed_step, proposed_term, at)) = self.merge.asked_proposed {
            if (proposed_step, proposed_term) == (step, term) && self.applied_index < at {
                return;
            }
        }
        let right = merge.right.clone().filter(|_| step == MergeStep::Commit as i32);
        if let Some(at) = self.propose_merge(0, merge) {
            self.merge.asked_proposed = Some((step, term, at));
            self.merge.commit_proposed = right.map(|right| (right, term, at));
        }
    }

    /// A replica in a merge is handled, `ticks` of time having passed since the last handling (0 for a message
    /// alone): it moves its part on at once (see the module docs), looking at its node's replicas of the other
    /// group in `kv` — a merge's steps follow one another as fast as its messages and writes go, not at the
    /// pace of ticks, which only its timeouts count. Nothing while its range is neither frozen nor locked.
    pub fn merge_step(&mut self, ticks: u64, kv: &dyn KvEngine) -> Vec<MergeAsk> {
        let seen = match (self.descriptor.merge, self.descriptor.merge_lock) {
            (Some(state), _) => Some((state.frozen_index, state.decided_index)),
            (None, Some(_)) => Some((0, self.descriptor.epoch().version)),
            (None, None) => None,
        };
        let mut wake = None;
        if let Some(right) = &self.merge.commit_waits_for {
            if crate::command::ready_to_take(kv, right) {
                self.merge.commit_waits_for = None;
                self.raw.hold_apply(false); // the commit is handed out again
            } else if ticks > 0 || !self.merge.commit_wait_told {
                self.merge.commit_wait_told = true;
                let state = right.merge.unwrap_or_default();
                let (decided_index, decided_term) = (state.decided_index, state.decided_term);
                wake = Some(MergeAsk::DecisionCommitted { group_id: right.group_id, decided_index, decided_term });
            }
        }
        if seen != self.merge.seen {
            let waits = self.merge.commit_waits_for.take();
            // Confirmations answer the freeze (step 4): the decision keeps them.
            let same_freeze =
                matches!((seen, self.merge.seen), (Some((at, _)), Some((was, _))) if at == was && at != 0);
            let confirmed = if same_freeze { std::mem::take(&mut self.merge.confirmed) } else { BTreeSet::new() };
            self.merge = MergeProgress { seen, commit_waits_for: waits, confirmed, ..MergeProgress::default() };
        }
        if seen.is_none() || self.removed {
            return wake.into_iter().collect();
        }
        self.merge.ticks += ticks;
        let mut asks = if self.descriptor.merge.is_some() { self.frozen_tick(kv) } else { self.locked_tick(kv) };
        asks.extend(wake);
        asks
    }

    /// A frozen range's replica: confirms its first state durable; wakes its node's left replica once it applied
    /// the decision; as the leader, decides (or gives up) and asks the left group to commit once the decision
    /// is applied here, held by every replica's log and everyone confirmed.
    fn frozen_tick(&mut self, kv: &dyn KvEngine) -> Vec<MergeAsk> {
        let state = self.descriptor.merge.expect("frozen");
        let mut asks = Vec::new();
        let me = self.raw.raft.id;
        let durable = self.first_state_durable(kv);
        let applied = state.decided_index != 0 && self.applied_index >= state.decided_index;
        if applied && self.taken_in_already(kv, &state) {
            self.end_taken_in(kv, &state);
            return asks;
        }
        if applied && !self.merge.left_woken {
            self.merge.left_woken = true;
            asks.push(MergeAsk::Wake { group_id: state.into_group_id });
        }
        if !self.is_leader() {
            let leader = self.raw.raft.leader_id;
            if durable && leader != 0 && leader != me {
                let ready = MergeReady { from: me, to: leader, frozen_index: state.frozen_index };
                self.outbox.push(ReplicaMessage::MergeReady(ready));
            }
            return asks;
        }
        if durable {
            self.merge.confirmed.insert(me);
        }
        let raft = &self.raw.raft;
        if state.decided_index == 0 {
            let everyone_holds = self.raw.matched_min().is_some_and(|matched| matched >= state.frozen_index)
                && raft.raft_log.persisted >= state.frozen_index;
            let step = if everyone_holds {
                Some(MergeStep::Decide)
            } else if self.merge.ticks >= MERGE_TIMEOUT_TICKS {
                Some(MergeStep::Unfreeze)
            } else {
                None
            };
            if let Some(step) = step {
                self.propose_own_step(step);
            }
            return asks;
        }
        // A replica that acknowledged the decision after its commit went out learns of the commit now, not at the
        // next heartbeat: a frozen range has no appends to carry it, and its node's left replica may wait for it.
        let holding = (raft.tracker.progress.iter())
            .filter(|(id, progress)| **id != me && progress.matched >= state.decided_index)
            .count();
        if raft.raft_log.committed >= state.decided_index && holding > self.merge.holding_told {
            self.merge.holding_told = holding;
            self.raw.broadcast_commit();
        }
        let raft = &self.raw.raft;
        let everyone_holds = self.raw.matched_min().is_some_and(|matched| matched >= state.decided_index)
            && raft.raft_log.persisted >= state.decided_index;
        let everyone_confirmed = self.descriptor.replicas.iter().all(|r| self.merge.confirmed.contains(&r.replica_id));
        // The commit is asked once, then again at each tick while this range lives (an ask may be lost: a full
        // queue, a left leader that changed before proposing it) — not on every handling: the left leader proposes
        // each ask it gets (once while its proposal of it is on its way: `propose_asked_merge`), and every one it
        // proposes is an entry of its log (up to 13 per merge in a test when asked on every handling).
        let due = self.merge.commit_asked_at_ticks.is_none_or(|at| self.merge.ticks > at);
        if due && applied && everyone_holds && everyone_confirmed {
            self.merge.commit_asked_at_ticks = Some(self.merge.ticks);
            let commit = MergeCommand::new(MergeStep::Commit, None, Some(self.descriptor.clone()));
            let command = Command::merge(state.into_epoch.unwrap_or_default(), commit);
            asks.push(MergeAsk::Propose { group_id: state.into_group_id, command: Box::new(command) });
        }
        asks
    }

    /// Whether this node's replica of the left group moved past the epoch the merge was decided for — it took
    /// this range in, by a snapshot installed while this replica had not applied the decision yet (by its log it
    /// would have waited for this replica: `apply.rs`). Nothing else moves it: a lock is given up only for a range
    /// that never froze for it or unfroze, and a decision is final.
    /// (Not when the left replica here took it in by applying the commit, which wrote this range's record too:
    /// the node stops this replica already.)
    fn taken_in_already(&self, kv: &dyn KvEngine, state: &crate::range::MergeState) -> bool {
        let then = state.into_epoch.unwrap_or_default();
        let left_past = stored_range(kv, state.into_group_id).is_some_and(|left| left.epoch().version > then.version);
        left_past && stored_range(kv, self.group_id()).is_some_and(|own| own.merged_into == 0)
    }

    /// Ends this decided replica, which its node's left replica took in already (`taken_in_already`), as that
    /// install would have had it applied the decision then (`snapshot.rs`): its record says where its keys went
    /// (durably first), its claim goes — the keys are the left group's, or a later owner's whose install waits
    /// for them (`store-sim` seed 35: the merged range split again) — and the node stops it.
    fn end_taken_in(&mut self, kv: &dyn KvEngine, state: &crate::range::MergeState) {
        if self.merge.ended_here {
            return;
        }
        if let Err(error) = kv.put_range(self.group_id(), &self.descriptor.merged_record(state.into_group_id).encode())
        {
            return self.storage_failed("recording a merged range", error);
        }
        self.merge.ended_here = true;
        self.claims.release(self.group_id());
        self.merged_away.push(self.group_id());
    }

    /// A locked range's leader: gives the lock up once this node's replica of the right range shows it will
    /// never freeze for it (or unfroze); after waiting too long for a freeze, fences the right range first.
    fn locked_tick(&mut self, kv: &dyn KvEngine) -> Vec<MergeAsk> {
        let lock = self.descriptor.merge_lock.expect("locked");
        if !self.is_leader() {
            return Vec::new();
        }
        let right_epoch = lock.right_epoch.unwrap_or_default();
        let right = stored_range(kv, lock.right_group_id).filter(|right| right.merged_into == 0);
        let frozen_for_this = |right: &RangeDescriptor| {
            right.merge.is_some_and(|state| {
                state.into_group_id == self.group_id() && state.into_epoch == Some(self.descriptor.epoch())
            })
        };
        match right {
            Some(right) if frozen_for_this(&right) => Vec::new(), // the right group drives it now
            Some(right) if moved_past(right.epoch(), right_epoch) => {
                self.propose_own_step(MergeStep::Cancel);
                Vec::new()
            }
            _ if self.merge.ticks >= MERGE_TIMEOUT_TICKS => {
                let fence = Command::merge(right_epoch, MergeCommand::new(MergeStep::Fence, None, None));
                vec![MergeAsk::Propose { group_id: lock.right_group_id, command: Box::new(fence) }]
            }
            _ => Vec::new(),
        }
    }

    /// A range decided for a merge applies nothing after its decision (`peer/merge.rs`): what could follow — a new
    /// leader's no-op, a step refused — changes nothing, and its applied index must stay where the left group's
    /// commit reads it: the commit writes this group's record with that index, in a state machine write that
    /// must not go behind one of this group's own in the same round (`store-sim` seed 342).
    pub(super) fn hold_apply_once_decided(&mut self) {
        let decided_at = self.descriptor.merge.map_or(0, |state| state.decided_index);
        if decided_at != 0 && self.applied_index >= decided_at {
            self.raw.hold_apply(true);
        }
    }

    /// Proposes a step this replica decided on (as the leader), unless its last one is still on its way (not
    /// applied yet): it is looked at on every handling, and one entry is enough.
    fn propose_own_step(&mut self, step: MergeStep) {
        if self.merge.proposed_at.is_some_and(|at| self.applied_index < at) {
            return;
        }
        if let Some(at) = self.propose_merge(0, MergeCommand::new(step, None, None)) {
            self.merge.proposed_at = Some(at);
        }
    }

    /// A replica's confirmation that its first state is durable (counted by the leader of a range frozen at that
    /// entry).
    pub(super) fn on_merge_ready(&mut self, ready: MergeReady) {
        let frozen_at = self.descriptor.merge.map(|state| state.frozen_index);
        if self.is_leader() && frozen_at == Some(ready.frozen_index) && self.descriptor.lists_replica(ready.from) {
            self.merge.confirmed.insert(ready.from);
        }
    }

    /// This replica's decision, the entry at `(decided_index, decided_term)`, committed — as its node's left
    /// replica knows from the merge commit in its own log, which waits for this replica to apply it (step 5). A
    /// replica whose log holds that entry commits up to it, whatever its descriptor shows yet (it may be
    /// applying its log again after a crash); one whose group's other members all ended in the merge hears it
    /// from nobody else.
    pub fn on_decision_committed(&mut self, decided_index: u64, decided_term: u64) {
        if decided_term != 0 {
            self.raw.learn_committed(decided_index, decided_term);
        }
    }
}
