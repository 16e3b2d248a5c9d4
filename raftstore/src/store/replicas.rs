//! Replicas created and destroyed while a node runs (membership changes), on the node's `flotilla-replicas`
//! thread, off the pollers.
//!
//! **Created** when a message arrives for a group the node does not hold — after a short wait in case a split
//! applied here is about to make the group (`awaiting_split.rs`): the replica opens empty (no range, no
//! members) under the message's replica id and is registered; the leader then catches it up by snapshot, which
//! brings the range. A group the node held before is not created again: a replica id is never reused, and the
//! node keeps the group's last descriptor as the record that it held it. Nor one the state machine has a state
//! for already: a split applied here made it, and its replica opens from that (`ReplicaTask::Split`, perhaps
//! still queued behind the message's task).
//!
//! **Destroyed** once it applies its own removal (`Peer::is_removed`): unregistered (no more messages, ticks or
//! requests reach it), forgotten by the ticker, its range's data dropped and its log compacted away
//! (`peer::destroy_replica`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use flotilla_engine::contract::{KvEngine, LogEngine};
use flotilla_raft::Config;

use super::fsm::{refuse_all, PeerFsm, PeerMsg};
use super::mailboxes::Mailboxes;
use super::ticks::{Ticking, TicksSeen};
use super::StoreOptions;
use crate::message::Envelope;
use crate::peer::{Peer, PeerOptions};
use crate::range::RangeDescriptor;
use crate::range_claims::RangeClaims;
use crate::split_trigger::{AskReason, RangeAsk};

/// Work for the replicas thread.
pub(crate) enum ReplicaTask {
    /// A message for a group this node does not hold.
    Create(Box<Envelope>),
    /// The group's replica here applied its own removal (the descriptor it applied: without this node).
    Destroy(Box<RangeDescriptor>),
    /// A split applied here made this group (its first state is in the state machine).
    Split(Box<crate::command::SplitOff>),
    /// Enough was written to this range, which this node leads, for its size to be measured
    /// (`split_trigger.rs`).
    CheckSize(Box<RangeDescriptor>),
    /// A snapshot was refused here because this group's replica holds its keys: wake it (`PeerMsg::CheckMembership`).
    CheckMembership(u64),
    /// Another group asks this group's replica here to propose a command (a merge step, a publication).
    Ask { group_id: u64, command: Box<crate::command::Command> },
    /// Hand this group's replica here a message from another group's replica (a merge's: `MergeAsk`).
    Tell { group_id: u64, message: PeerMsg },
    /// A merge ended this group's replica here (its record is written; its data is the other group's now).
    MergedAway(u64),
    /// A replica a split opened here waits for its first state to be durable (to install a snapshot, or confirm a
    /// merge): a checkpoint is due (`checkpoint_if_due`).
    Checkpoint,
    /// This range, which this node leads, went cold (its leader fell asleep): once it has stayed cold for
    /// `SplitOptions::merge_cold_ticks`, is it small enough to merge into its left neighbour? (`split_trigger.rs`)
    CheckMerge(ColdRange),
}

/// A range whose leader fell asleep, as its merge check waits on it.
pub(crate) struct ColdRange {
    pub(crate) group_id: u64,
    /// The replica's tick count (`PeerFsm::ticks_seen`), and what it said when the leader fell asleep: a replica
    /// asleep takes no ticks, so while the count stays there the range has stayed cold.
    pub(crate) ticks_seen: TicksSeen,
    pub(crate) asleep_at: u64,
}

/// Pairs read per page when a range's size is measured.
const SIZE_CHECK_PAGE_KEYS: usize = 1024;

/// Node ticks from a split's open or a merge's end here to the checkpoint that makes it durable (about a second
/// at the `Db`'s 100 ms ticks, half at a server's 50 ms).
const CHECKPOINT_DELAY_TICKS: u64 = 10;

/// How long the replicas thread waits for a task before it looks at what is due by time (merge checks, a split's
/// checkpoint).
const IDLE_WAKE: std::time::Duration = std::time::Duration::from_millis(250);

/// How many tasks may wait; beyond, messages for unknown groups are dropped (Raft resends).
pub(crate) const TASKS_MAX: usize = 1024;

/// Opens the replica of `range` held by node `options.node_id` (its configuration is the descriptor's).
pub(crate) fn open_replica(
    options: &StoreOptions,
    range: &RangeDescriptor,
    log: &Arc<dyn LogEngine>,
    kv: &dyn KvEngine,
    claims: &Arc<RangeClaims>,
) -> Result<Peer, flotilla_raft::Error> {
    let replica =
        range.replicas.iter().find(|r| r.node_id == options.node_id).map_or(options.node_id, |r| r.replica_id);
    open_with_id(options, replica, range.clone(), log, kv, claims)
}

fn open_with_id(
    options: &StoreOptions,
    replica: u64,
    range: RangeDescriptor,
    log: &Arc<dyn LogEngine>,
    kv: &dyn KvEngine,
    claims: &Arc<RangeClaims>,
) -> Result<Peer, flotilla_raft::Error> {
    let config = Config {
        id: replica,
        // Per replica, varied by the configured seed (a simulator's runs differ so).
        random_seed: options.raft.random_seed ^ range.group_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ replica,
        ..options.raft.clone()
    };
    let peer_options = PeerOptions { publishes: options.meta_range, ..options.peer.clone() };
    Peer::open(config, peer_options, range, Arc::clone(log), kv, Arc::clone(claims))
}

pub(crate) struct Replicas {
    pub(crate) options: StoreOptions,
    pub(crate) log: Arc<dyn LogEngine>,
    pub(crate) kv: Arc<dyn KvEngine>,
    pub(crate) mailboxes: Arc<dyn Mailboxes>,
    /// For the answers to replicas of groups whose replica here ended (`answer_ended`).
    pub(crate) transport: Arc<dyn super::Transport>,
    pub(crate) ticking: Arc<Ticking>,
    /// Every group this node has held (opened at start, or created since).
    pub(crate) held: HashSet<u64>,
    pub(crate) failure: Arc<super::failure::NodeFailure>,
    pub(crate) local_reader: Arc<super::local_reader::LocalReader>,
    pub(crate) claims: Arc<RangeClaims>,
    /// The split triggers' options, shared by every replica (`StoreOptions::split_triggers`).
    pub(crate) split_triggers: Arc<crate::split_trigger::SplitOptions>,
    /// Messages for groups not held here, waiting a moment for a split to make the group (`awaiting_split.rs`).
    pub(crate) awaiting_split: super::awaiting_split::AwaitingSplit,
    /// Merge checks (`check_merge`) waiting for their ranges to stay cold long enough.
    pub(crate) merge_checks: MergeChecks,
    /// A replica waits for its first state to be durable (`ReplicaTask::Checkpoint`): a checkpoint is due once
    /// the tasks waiting are done (`checkpoint_if_due`).
    pub(crate) checkpoint_asked: bool,
    /// A split's new group opened here, or a merge ended a group here, since the last checkpoint: one is due from
    /// this node tick on (`CHECKPOINT_DELAY_TICKS` after the first such change).
    pub(crate) checkpoint_tick: Option<u64>,
    /// Groups a merge ended here whose logs are dropped after the next checkpoint (`stop_merged`).
    pub(crate) merged_logs: Vec<u64>,
    /// Set while a `ReplicaTask::Checkpoint` is queued (the pollers ask at most one at a time: `handler.rs`).
    pub(crate) checkpoint_queued: Arc<std::sync::atomic::AtomicBool>,
    /// The groups splits made here, until their replicas are open (`Store::opening`).
    pub(crate) opening: Arc<super::OpeningGroups>,
}

/// The merge checks waiting, by group: the node tick each is due at (`SplitOptions::merge_cold_ticks` after its
/// range went cold), and how to tell whether it stayed cold. A range woken meanwhile is not measured; its next
/// cold spell asks again.
#[derive(Default)]
pub(crate) struct MergeChecks {
    waiting: BTreeMap<u64, (u64, ColdRange)>,
}

/// Merge checks that may wait at once; beyond, a group's is dropped (its next cold spell asks again).
const MERGE_CHECKS_WAITING_MAX: usize = 4096;

impl Replicas {
    /// The replicas thread's loop, until the store stops.
    pub(crate) fn run(mut self, tasks: Receiver<ReplicaTask>, stopped: Receiver<()>) {
        loop {
            crossbeam_channel::select! {
                recv(tasks) -> task => match task {
                    Ok(task) => {
                        self.handle(task);
                        if tasks.is_empty() {
                            self.checkpoint_if_due();
                        }
                    }
                    Err(_) => return,
                },
                recv(stopped) -> _ => return,
                default(IDLE_WAKE) => {
                    self.run_due_merge_checks();
                    self.create_awaited();
                    self.checkpoint_if_due();
                }
            }
        }
    }

    /// Carries out one task; a panic in it stops the node.
    pub(crate) fn handle(&mut self, task: ReplicaTask) {
        let done = match task {
            ReplicaTask::Create(envelope) => {
                flotilla_engine::panics::catch("creating a replica", || self.create(*envelope))
            }
            ReplicaTask::Destroy(descriptor) => {
                flotilla_engine::panics::catch("destroying a replica", || self.destroy(&descriptor))
            }
            ReplicaTask::Split(split_off) => {
                let opened =
                    flotilla_engine::panics::catch("opening a split's new group", || self.open_split_off(&split_off));
                self.opening.remove(split_off.range.group_id);
                opened
            }
            ReplicaTask::CheckMembership(group_id) => {
                let _ = self.mailboxes.send(group_id, PeerMsg::CheckMembership);
                Ok(())
            }
            ReplicaTask::Tell { group_id, message } => {
                let _ = self.mailboxes.send(group_id, message);
                Ok(())
            }
            ReplicaTask::CheckSize(range) => {
                flotilla_engine::panics::catch("measuring a range", || self.check_size(&range))
            }
            ReplicaTask::Ask { group_id, command } => {
                use crate::batch::router::SendError;
                if let Err(SendError::NotFound(message) | SendError::Full(message)) =
                    self.mailboxes.send(group_id, PeerMsg::Ask { command })
                {
                    if let PeerMsg::Ask { command } = message {
                        // No replica of the meta range here (or its mailbox is full): the host routes it.
                        super::handler::publish_by_host(
                            self.options.range_asks.as_ref(),
                            self.options.node_id,
                            &command,
                        );
                    }
                }
                Ok(())
            }
            ReplicaTask::Checkpoint => {
                self.checkpoint_queued.store(false, std::sync::atomic::Ordering::SeqCst);
                self.checkpoint_asked = true;
                Ok(())
            }
            ReplicaTask::CheckMerge(cold) => {
                self.merge_check_asked(cold);
                Ok(())
            }
            ReplicaTask::MergedAway(group_id) => {
                flotilla_engine::panics::catch("stopping a merged replica", || self.stop_merged(group_id))
            }
        };
        if let Err(reason) = done {
            self.failure.fail(self.options.node_id, reason);
        }
        self.run_due_merge_checks();
        self.create_awaited();
    }

    /// Checkpoints the state machine if one is due (see `checkpoint_asked`, `checkpoint_tick`): once for however
    /// many splits, merges and asks came before, after the tasks that waited (none of them waits behind it). Then
    /// the logs of the groups merges ended here go.
    pub(crate) fn checkpoint_if_due(&mut self) {
        let changes_due = self.checkpoint_tick.is_some_and(|tick| tick <= self.ticking.now());
        if !(self.checkpoint_asked || changes_due) || self.failure.reason().is_some() {
            return;
        }
        (self.checkpoint_asked, self.checkpoint_tick) = (false, None);
        if let Err(error) = self.kv.flush() {
            let reason = format!("checkpointing the state machine after a split or merge: {error}");
            return self.failure.fail(self.options.node_id, reason);
        }
        for group_id in std::mem::take(&mut self.merged_logs) {
            if let Err(error) = crate::peer::drop_log(self.log.as_ref(), group_id) {
                // The engines' failure (the pollers meet it too); the log is dropped at the next open.
                eprintln!("flotilla: dropping the log of merged group {group_id} failed: {error:?}");
            }
        }
    }

    /// A split or merge changed this node's groups: a checkpoint is due `CHECKPOINT_DELAY_TICKS` from now, or
    /// sooner if one was due already.
    fn checkpoint_soon(&mut self) {
        let due = self.ticking.now() + CHECKPOINT_DELAY_TICKS;
        self.checkpoint_tick = Some(self.checkpoint_tick.map_or(due, |tick| tick.min(due)));
    }

    /// A cold range asks for a merge check: it is due once the range has stayed cold for `merge_cold_ticks` (a
    /// later ask of the same group replaces it).
    fn merge_check_asked(&mut self, cold: ColdRange) {
        let due = self.ticking.now() + self.options.split.merge_cold_ticks;
        let waiting = &mut self.merge_checks.waiting;
        if waiting.len() < MERGE_CHECKS_WAITING_MAX || waiting.contains_key(&cold.group_id) {
            waiting.insert(cold.group_id, (due, cold));
        }
    }

    /// The merge checks that are due, of the ranges still cold, on each group's range as this node stores it now.
    pub(crate) fn run_due_merge_checks(&mut self) {
        if self.merge_checks.waiting.is_empty() {
            return;
        }
        let now = self.ticking.now();
        let due: Vec<u64> =
            (self.merge_checks.waiting.iter()).filter(|(_, (at, _))| *at <= now).map(|(g, _)| *g).collect();
        for group_id in due {
            let Some((_, cold)) = self.merge_checks.waiting.remove(&group_id) else { continue };
            if cold.ticks_seen.load(std::sync::atomic::Ordering::SeqCst) != cold.asleep_at {
                continue; // woken since: not cold for long enough
            }
            let Some(range) = crate::command::stored_range(self.kv.as_ref(), group_id) else { continue };
            if range.lists_node(self.options.node_id) && !range.is_merging() {
                let checked = flotilla_engine::panics::catch("measuring ranges to merge", || self.check_merge(&range));
                if let Err(reason) = checked {
                    return self.failure.fail(self.options.node_id, reason);
                }
            }
        }
    }

    /// Unregisters the group's replica; requests queued for it and never handled are refused as sent to a
    /// replica that does not lead (nothing happened: the caller tries elsewhere, or again).
    fn unregister(&self, group_id: u64) {
        refuse_all(self.mailboxes.unregister(group_id).into_iter(), crate::peer::PeerError::NotLeader { leader: 0 });
    }

    fn destroy(&mut self, descriptor: &RangeDescriptor) {
        self.unregister(descriptor.group_id);
        self.local_reader.lease(descriptor.group_id).withdraw();
        self.ticking.stop(descriptor.group_id);
        // A failure here is the engines' (the node's pollers meet it too); the data stays until a later try.
        if let Err(error) = crate::peer::destroy_replica(self.log.as_ref(), self.kv.as_ref(), descriptor) {
            eprintln!("flotilla: destroying the replica of group {} failed: {error:?}", descriptor.group_id);
            return;
        }
        self.claims.release(descriptor.group_id); // its data is gone: the keys are free here
        metrics::counter!("flotilla_replicas_destroyed_total").increment(1);
    }

    /// Stops the replica of a group a merge ended here: like a destroy, but its data stays (the group that took
    /// it in serves it) and its claim is gone already (moved with the merge). The log goes only after the next
    /// checkpoint has made the merge durable: a crash must not bring back the group's replica, not merged, without
    /// the log its applied state needs (`store-sim` seed 40). That checkpoint comes a little later, with those of
    /// splits (`checkpoint_soon`), not at once: a whole-memtable flush on every node just as the writes of the
    /// merged range move to the left group slowed them several-fold. A crash before it brings the replica back
    /// frozen over its log, and the merge ends it again.
    fn stop_merged(&mut self, group_id: u64) {
        self.unregister(group_id);
        self.local_reader.lease(group_id).withdraw();
        self.ticking.stop(group_id);
        self.merged_logs.push(group_id);
        self.checkpoint_soon();
        metrics::counter!("flotilla_replicas_merged_away_total").increment(1);
    }

    /// Opens this node's replica of the group a split made. The split's state is made durable first (a
    /// checkpoint): the replica may install snapshots, which are durable at once, and a crash must not keep such
    /// an install while losing the split that shrank the group it came from (the two would hold the same keys
    /// here). An empty replica a message of that group created before the split applied here (its leader
    /// elsewhere applied it first) is replaced: it never installed a snapshot (`range_claims.rs` refused them), and
    /// what it persisted — the vote it may have cast — stays in the log, which restarts at the bootstrap index
    /// under it (`prepare_groups` keeps a hard state of a later term).
    fn open_split_off(&mut self, split_off: &crate::command::SplitOff) {
        let range = &split_off.range;
        let appointee = split_off.first_leader.as_ref();
        let campaign = appointee.is_some_and(|r| r.node_id == self.options.node_id);
        let group_id = range.group_id;
        if self.failure.reason().is_some() {
            return; // the node stopped
        }
        if self.held.contains(&group_id) {
            self.unregister(group_id);
            self.ticking.stop(group_id);
            // Whatever it submitted to the log is written before the log restarts under it.
            let (reply, done) = crossbeam_channel::bounded(1);
            let barrier = flotilla_engine::contract::WriteRequest::new(group_id, 0, Vec::new(), reply);
            if self.log.submit(barrier).is_err() || done.recv().is_err() {
                return self.failure.fail(self.options.node_id, format!("the log failed under group {group_id}"));
            }
        }
        // Every replica's log begins in the term after the bootstrap term with a vote for the replica the split
        // appoints; that one leads the term at once, without an election — only if its log began just now (a
        // replica reopened over its log may have led that term before a crash).
        let appointee = appointee.map(|r| r.replica_id);
        let opened =
            crate::peer::prepare_split_group(self.log.as_ref(), self.kv.as_ref(), range, appointee).and_then(|begun| {
                Ok((begun, open_replica(&self.options, range, &self.log, self.kv.as_ref(), &self.claims)?))
            });
        let (begun, mut peer) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                return self.failure.fail(self.options.node_id, format!("opening group {group_id}: {error:?}"));
            }
        };
        if campaign && begun {
            peer.lead_as_appointed();
        }
        // Not made durable first (a checkpoint under load takes 100+ ms, the new range taking no writes
        // meanwhile) but a little later (not at once either: its writes would slow the new group's first
        // election and commits on every node): installs and merge confirmations wait until it is, and ask for it
        // sooner if they come first; a crash before leaves a replica without its first state over the new
        // group's log, which asks for a snapshot (`peer/snapshot.rs`).
        peer.refuse_installs_until_durable();
        self.checkpoint_soon();
        let fsm = PeerFsm::new(
            peer,
            self.local_reader.lease(group_id),
            self.options.split_trigger(&self.split_triggers, group_id),
        );
        if self.register(group_id, fsm) {
            // Messages of the group's other replicas that came before the split applied here (the appointed
            // leader's first appends, say), then its own campaign if it was appointed but could not lead at once
            // (its log did not begin here). A leader ignores the campaign: it only has the replica handled, which
            // sends its first appends.
            for envelope in self.awaiting_split.take(group_id) {
                let _ = self.mailboxes.send(group_id, PeerMsg::Replica(Box::new(envelope)));
            }
            if campaign {
                let _ = self.mailboxes.send(group_id, PeerMsg::Campaign);
            }
        }
        metrics::counter!("flotilla_split_groups_opened_total").increment(1);
    }

    /// Measures `range`'s data (`split_check.rs`); over the bound, asks the host to split it near the middle of
    /// its bytes. A state machine that fails here fails the pollers too: the check is skipped.
    fn check_size(&self, range: &RangeDescriptor) {
        let (Some(asks), bytes_max) = (&self.options.range_asks, self.options.split.size_bytes_max) else { return };
        let checked = crate::split_check::check_size(self.kv.as_ref(), range, bytes_max, SIZE_CHECK_PAGE_KEYS);
        if let Ok(check) = &checked {
            let _ = self.mailboxes.send(range.group_id, PeerMsg::SizeMeasured { bytes: check.bytes });
        }
        if let Ok(crate::split_check::SizeCheck { split_key: Some(split_key), .. }) = checked {
            metrics::counter!("flotilla_splits_asked_total", "reason" => "size").increment(1);
            let reason = crate::split_trigger::AskReason::Size;
            let wanted = RangeAsk { node_id: self.options.node_id, range: range.clone(), split_key, reason };
            let _ = asks.try_send(wanted); // advisory: the next check asks again
        }
    }

    /// Measures `range` and its left neighbour here (`split_check.rs`); if the range is under
    /// `merge_size_bytes_max` and the two together under half of `size_bytes_max` (a merged range never splits
    /// again by size at once), asks the host to merge it. A state machine that fails here fails the pollers too:
    /// the check is skipped.
    fn check_merge(&self, range: &RangeDescriptor) {
        let split = &self.options.split;
        let Some(asks) = &self.options.range_asks else { return };
        let Some((left_id, left_start, left_end)) = self.claims.left_of(&range.start) else { return };
        let measure = |start: &[u8], end: &[u8], bytes_max: u64| {
            let range = RangeDescriptor { start: start.to_vec(), end: end.to_vec(), ..RangeDescriptor::default() };
            crate::split_check::check_size(self.kv.as_ref(), &range, bytes_max, SIZE_CHECK_PAGE_KEYS).map(|c| c.bytes)
        };
        let together_max = split.size_bytes_max / 2;
        let Ok(bytes) = measure(&range.start, &range.end, split.merge_size_bytes_max) else { return };
        if bytes > split.merge_size_bytes_max || bytes > together_max {
            return;
        }
        let Ok(left_bytes) = measure(&left_start, &left_end, together_max) else { return };
        if bytes + left_bytes > together_max {
            return;
        }
        metrics::counter!("flotilla_merges_asked_total").increment(1);
        let reason = AskReason::Merge { into_group_id: left_id };
        let wanted = RangeAsk { node_id: self.options.node_id, range: range.clone(), split_key: Vec::new(), reason };
        let _ = asks.try_send(wanted); // advisory: asked again at the next check
    }

    /// Registers a replica just opened, its ticks settled first: a fresh replica owes none for the time before it
    /// existed. False if the router refused it.
    fn register(&mut self, group_id: u64, fsm: PeerFsm) -> bool {
        self.ticking.settle(&fsm.ticks_seen);
        let (ticking, seen) = (fsm.ticking, Arc::clone(&fsm.ticks_seen));
        if self.mailboxes.register(group_id, Box::new(fsm)).is_err() {
            return false;
        }
        self.held.insert(group_id);
        if ticking {
            self.ticking.start(group_id, &seen);
        }
        true
    }

    fn create(&mut self, envelope: Envelope) {
        let group_id = envelope.group_id;
        if self.failure.reason().is_some() {
            return; // the node stopped
        }
        if self.held.contains(&group_id) {
            // Held now (created by an earlier message) or before (removed, or ended by a merge): deliver, or drop
            // — answering a replica of a group a merge ended here.
            if let Err(crate::batch::SendError::NotFound(PeerMsg::Replica(envelope))) =
                self.mailboxes.send(group_id, PeerMsg::Replica(Box::new(envelope)))
            {
                // (Never a notice: two nodes where the group ended would answer each other's forever.)
                if !matches!(envelope.message, crate::message::ReplicaMessage::Decided(_)) {
                    self.answer_ended(&envelope);
                }
            }
            return;
        }
        // Perhaps a split about to be applied here makes the group: its messages wait a moment for it
        // (`awaiting_split.rs`).
        match self.awaiting_split.hold(envelope, self.ticking.now()) {
            Ok(()) => {}
            Err(envelopes) => self.create_empty(group_id, envelopes),
        }
    }

    /// A message from a replica of group `envelope.group_id`, whose replica here ended, is answered with an entry
    /// of the group known committed (`DecisionNotice`): a replica whose log holds it commits up to it.
    /// - **Ended by a merge**: the group's decision. Its other members may all have ended like this one — a
    ///   replica that acknowledged the decision, but never heard that it committed, would otherwise wait forever,
    ///   its keys claimed on its node where the left group wants them (`store-sim` seed 43 met it). Nothing for a
    ///   group decided before decisions recorded their term.
    /// - **Removed**: the last entry its replica here applied (kept with the group's record), which it applied
    ///   only once committed. A leader that lost the commit index in a crash may need it: its configuration, not
    ///   yet applied again, still counts the removed replica, whose node destroyed it, and without this it can
    ///   lack the votes to commit anything — past the removal among them (`store-sim` seed 9518: a fourth voter
    ///   removed, the third an empty replica refusing the leader's snapshot, older than a split its node had).
    fn answer_ended(&self, envelope: &Envelope) {
        let (index, term) = match crate::command::stored_range(self.kv.as_ref(), envelope.group_id) {
            Some(record) if record.merged_into != 0 => match record.merge {
                Some(state) => (state.decided_index, state.decided_term),
                None => return,
            },
            _ => self.kv.applied(envelope.group_id),
        };
        if term == 0 {
            return;
        }
        let notice = crate::message::DecisionNotice {
            from: envelope.message.to(),
            to: envelope.message.from(),
            decided_index: index,
            decided_term: term,
        };
        self.transport.send(Envelope {
            group_id: envelope.group_id,
            from_node: self.options.node_id,
            to_node: envelope.from_node,
            message: crate::message::ReplicaMessage::Decided(notice),
        });
        self.transport.flush();
    }

    /// The groups whose messages waited long enough for a split to make them here (`awaiting_split.rs`): their
    /// replicas are created empty, and handed the messages.
    pub(crate) fn create_awaited(&mut self) {
        if self.awaiting_split.is_empty() {
            return;
        }
        for (group_id, envelopes) in self.awaiting_split.take_expired(self.ticking.now()) {
            self.create_empty(group_id, envelopes);
        }
    }

    /// Creates an empty replica of group `group_id` for `envelopes` (messages for it: the first one's replica id
    /// is the replica's) and hands them to it.
    fn create_empty(&mut self, group_id: u64, envelopes: Vec<Envelope>) {
        let Some(first) = envelopes.first() else { return };
        if self.failure.reason().is_some() || self.held.contains(&group_id) {
            return; // the node stopped; or the group opened since (a split took its messages)
        }
        if self.kv.applied(group_id) != (0, 0) {
            // A split applied here made the group, and the task to open it is behind this one in the queue: the
            // messages are dropped (Raft resends), the replica opens from the split's state.
            return;
        }
        let empty = RangeDescriptor { group_id, ..RangeDescriptor::default() };
        let opened = open_with_id(&self.options, first.message.to(), empty, &self.log, self.kv.as_ref(), &self.claims);
        let peer = match opened {
            Ok(peer) => peer,
            Err(error) => {
                self.failure
                    .fail(self.options.node_id, format!("opening an empty replica of group {group_id}: {error:?}"));
                return;
            }
        };
        let fsm = PeerFsm::new(
            peer,
            self.local_reader.lease(group_id),
            self.options.split_trigger(&self.split_triggers, group_id),
        );
        if self.register(group_id, fsm) {
            metrics::counter!("flotilla_replicas_created_total").increment(1);
            for envelope in envelopes {
                let _ = self.mailboxes.send(group_id, PeerMsg::Replica(Box::new(envelope)));
            }
        }
    }
}
