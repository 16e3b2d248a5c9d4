//! The host loop — the one place a replica's output is carried out: one poll round for many group replicas.
//! `begin` reads the node's clock; `handle` feeds each FSM its messages (after the ticks it owes, `ticks.rs`),
//! submits its Ready's writes to the log (the round's writes share fsyncs), sends its messages and answers its
//! clients; `end` applies every group's committed entries in **one** state machine call and answers those
//! clients. `forward_persisted` is the other end of the writes: each write's completion hands it a [`Durable`],
//! and it sends the answers that waited for it, then tells the replica (a `Persisted` message, or its
//! `PersistedNote` when it need not be scheduled for it). The batch system's pollers run it (`Store::start`), and
//! so does the store simulator, by hand (`stepped.rs`).
//!
//! A failed engine (log submit, apply, flusher, a replica's snapshot I/O, a panic) stops the node with the reason
//! (`failure.rs`): later rounds refuse every request with it and write nothing.
//!
//! Metrics (with those of the batch system, WAL and state machine): `flotilla_proposals_total`,
//! `flotilla_proposal_batch_writes` (histogram: writes proposed as one entry, `peer/propose.rs`),
//! `flotilla_reads_total`, `flotilla_log_writes_total`, `flotilla_commands_applied_total`,
//! `flotilla_apply_batch_groups` (histogram: groups per state machine apply), `flotilla_elections_total` (vote
//! rounds started), `flotilla_groups_ticking` (gauge: groups the ticker visits), `flotilla_tick_messages_total`
//! (`Tick` messages the ticker sent: to replicas no poller handled for a whole interval),
//! `flotilla_removal_notices_taken_total` (replicas that learned of their removal from a member),
//! `flotilla_replicas_destroyed_total`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use flotilla_engine::contract::{Checkpointer, Completion, KvEngine, LogEngine, WriteRequest};

use super::failure::NodeFailure;
use super::fsm::{refuse_all, PeerFsm, PeerMsg};
use super::local_reader::LocalReader;
use super::mailboxes::{deliver, Mailboxes};
use super::replicas::{ColdRange, ReplicaTask};
use super::ticks::Ticking;
use super::transport::Transport;
use crate::batch::PollHandler;
use crate::message::{Envelope, ReplicaMessage};
use crate::peer::merge::MergeAsk;
use crate::peer::PeerOutput;
use crate::peer::{LocalReadGrant, PeerError, PersistedNote};
use crate::range::RangeError;
use crate::split_trigger::{AskReason, RangeAsk};

/// One per poller thread (cloned from one template: every field is shared).
#[derive(Clone)]
pub struct StoreHandler {
    pub(crate) node_id: u64,
    /// `StoreOptions::frozen_write_wait_ticks`.
    pub(crate) frozen_write_wait_ticks: u64,
    pub(crate) ticking: Arc<Ticking>,
    pub(crate) log: Arc<dyn LogEngine>,
    pub(crate) kv: Arc<dyn KvEngine>,
    pub(crate) checkpointer: Arc<dyn Checkpointer>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) persisted: Sender<Durable>,
    pub(crate) tasks: Sender<ReplicaTask>,
    pub(crate) failure: Arc<NodeFailure>,
    pub(crate) local_reader: Arc<LocalReader>,
    /// Where the groups this node leads ask to be split (`StoreOptions::range_asks`).
    pub(crate) range_asks: Option<crossbeam_channel::Sender<RangeAsk>>,
    /// Which group holds which keys on this node (`range_claims.rs`), shared by its replicas.
    pub(crate) claims: Arc<crate::range_claims::RangeClaims>,
    /// The meta range's group (`meta.rs`), once known on this node (0: none yet, or a layout without one): set
    /// when the store opens it, or when its replica here ticks.
    pub(crate) meta_group: Arc<AtomicU64>,
    /// A `ReplicaTask::Checkpoint` is queued (one at a time; the replicas thread clears it).
    pub(crate) checkpoint_queued: Arc<std::sync::atomic::AtomicBool>,
    /// The groups this node's splits made, until their replicas are open (`Store::opening`).
    pub(crate) opening: Arc<super::OpeningGroups>,
}

/// A write made durable, as the persisted forwarder gets it: the group's Ready, and what waited for it.
pub struct Durable {
    group_id: u64,
    ready_number: u64,
    after: AfterPersist,
}

/// What waits for a write to be durable: the responses to send then, and, for a replica that need not be
/// scheduled for it, where to note it durable instead of sending `Persisted`.
struct AfterPersist {
    envelopes: Vec<Envelope>,
    note: Option<PersistedNote>,
}

/// A write's completion (on the log's writer thread): handed to the persisted forwarder with what waited for it.
struct ToForwarder {
    forwarder: Sender<Durable>,
    after: AfterPersist,
}

impl Completion for ToForwarder {
    fn complete(self: Box<Self>, group_id: u64, ready_number: u64) {
        let _ = self.forwarder.send(Durable { group_id, ready_number, after: self.after });
    }
}

/// The persisted forwarder's loop (a thread of its own): for each write made durable, sends the responses that
/// waited for it, then tells the replica — by a `Persisted` message, or by its note (see `LogWrite::prompt`).
pub(crate) fn forward_persisted(done: Receiver<Durable>, mailboxes: Arc<dyn Mailboxes>, transport: Arc<dyn Transport>) {
    while let Ok(persisted) = done.recv() {
        forward_one(persisted, mailboxes.as_ref(), transport.as_ref());
        forward_ready(&done, mailboxes.as_ref(), transport.as_ref());
    }
}

/// Forwards every durable write already reported, then flushes the transport: what the writer completed together
/// goes out together. (The persisted forwarder's turn; a stepping caller's too.)
pub fn forward_ready(done: &Receiver<Durable>, mailboxes: &dyn Mailboxes, transport: &dyn Transport) {
    for persisted in done.try_iter() {
        forward_one(persisted, mailboxes, transport);
    }
    transport.flush();
}

/// One durable write: the answers that waited for it go out, then the replica is told.
fn forward_one(durable: Durable, mailboxes: &dyn Mailboxes, transport: &dyn Transport) {
    let Durable { group_id, ready_number, after } = durable;
    for envelope in after.envelopes {
        transport.send(envelope);
    }
    match after.note {
        Some(note) => note.note(ready_number),
        None => deliver(mailboxes, group_id, PeerMsg::Persisted { ready_number }),
    }
}

/// A publication (`command`) that no replica of the meta range on node `node_id` can take (it holds none, or
/// only a removed one): the host routes it (`AskReason::Publish`; advisory, as every publication ask is).
pub(crate) fn publish_by_host(asks: Option<&Sender<RangeAsk>>, node_id: u64, command: &crate::command::Command) {
    if let (Some(range), Some(asks)) = (&command.publish, asks) {
        let ask = RangeAsk { node_id, range: (**range).clone(), split_key: Vec::new(), reason: AskReason::Publish };
        let _ = asks.try_send(ask);
    }
}

impl StoreHandler {
    /// Where `message` goes: the node of the replica it is for, if known (else it is dropped, and counted).
    fn envelope(&self, fsm: &PeerFsm, message: ReplicaMessage) -> Option<Envelope> {
        let Some(to_node) = fsm.node_of(message.to()) else {
            metrics::counter!("flotilla_transport_dropped_total").increment(1);
            return None;
        };
        Some(Envelope { group_id: fsm.peer.group_id(), from_node: self.node_id, to_node, message })
    }

    /// Tells the transport where the replicas' nodes listen, as the descriptor records it for nodes that joined
    /// later (`Replica::addr`) — once per membership version: the descriptors are the cluster's record of them.
    fn tell_addresses(&self, fsm: &mut PeerFsm) {
        let descriptor = fsm.peer.descriptor();
        let conf_version = descriptor.epoch().conf_version;
        if fsm.addresses_told == Some(conf_version) {
            return;
        }
        for replica in descriptor.replicas.iter().filter(|replica| !replica.addr.is_empty()) {
            self.transport.node_listed(replica.node_id, &replica.addr);
        }
        fsm.addresses_told = Some(conf_version);
    }

    /// Stops the node for a failed engine (see [`NodeFailure::fail`]).
    fn fail(&self, reason: String) {
        self.failure.fail(self.node_id, reason);
    }

    /// Answers the clients the peer has responses for; a read the state machine cannot serve stops the node.
    fn answer(&self, fsm: &mut PeerFsm, responses: Vec<(crate::peer::Token, crate::peer::Response)>) {
        fsm.answer(responses, self.kv.as_ref(), &|reason| self.fail(reason));
    }

    fn failed(&self) -> Option<String> {
        self.failure.reason()
    }

    /// Publishes whether, and until when, the replica's reads may be served on callers' threads
    /// (`local_reader.rs`). First thing in `carry_out`: before any message of the handling leaves.
    fn publish_read_grant(&self, fsm: &mut PeerFsm) {
        let grant = match fsm.peer.local_read_grant() {
            // Its tick count stands for a node tick only while it takes ticks.
            LocalReadGrant::Ticks(_) if !fsm.ticking => LocalReadGrant::No,
            grant => grant,
        };
        let range_version = fsm.peer.descriptor().epoch().version;
        fsm.read_lease.publish(grant, fsm.ticks_seen.load(std::sync::atomic::Ordering::SeqCst), range_version);
        let leader = fsm.peer.leader();
        fsm.read_lease.note_leader(if leader == 0 { 0 } else { fsm.node_of(leader).unwrap_or(0) });
    }

    fn carry_out(&self, fsm: &mut PeerFsm, output: PeerOutput) {
        self.publish_read_grant(fsm);
        if let Some(reason) = fsm.peer.storage_failure() {
            return self.fail(reason.to_string());
        }
        let group_id = fsm.peer.group_id();
        if fsm.peer.is_removed() {
            // Removed: it answers the clients its last apply decided, and does nothing more. The replicas thread
            // unregisters it (asked once).
            self.answer(fsm, output.responses);
            if !fsm.destroy_requested {
                fsm.destroy_requested = true;
                let _ = self.tasks.send(ReplicaTask::Destroy(Box::new(fsm.peer.descriptor().clone())));
                self.ticking.stop(group_id);
                fsm.ticking = false;
            }
            return;
        }
        self.tell_addresses(fsm);
        let is_vote = |m: &ReplicaMessage| matches!(m, ReplicaMessage::Raft(m) if m.msg_type() == flotilla_raft::MessageType::RequestVote);
        if output.messages.iter().any(is_vote) {
            metrics::counter!("flotilla_elections_total").increment(1);
        }
        if let Some(write) = output.write {
            if !write.ops.is_empty() {
                metrics::counter!("flotilla_log_writes_total").increment(1);
            }
            let envelopes: Vec<Envelope> =
                write.messages.into_iter().filter_map(|message| self.envelope(fsm, message)).collect();
            let note = (!write.prompt).then(|| fsm.peer.persisted_note());
            let after = AfterPersist { envelopes, note };
            let completion = Box::new(ToForwarder { forwarder: self.persisted.clone(), after });
            let request = WriteRequest::with_completion(group_id, write.ready_number, write.ops, completion);
            if let Err(error) = self.log.submit(request) {
                return self.fail(format!("the log failed: {error}"));
            }
        }
        for message in output.messages {
            if let Some(envelope) = self.envelope(fsm, message) {
                self.transport.send(envelope);
            }
        }
        fsm.to_apply.extend(output.committed);
        self.answer(fsm, output.responses);
        for group_id in fsm.peer.take_merged_away() {
            self.local_reader.note_ranges_changed();
            // Rare: waiting for room in the replicas thread's queue is fine.
            let _ = self.tasks.send(ReplicaTask::MergedAway(group_id));
        }
        let wants_ticks = fsm.peer.needs_ticks();
        if wants_ticks != fsm.ticking {
            if wants_ticks {
                self.ticking.start(group_id, &fsm.ticks_seen);
            } else {
                self.ticking.stop(group_id);
            }
            metrics::gauge!("flotilla_groups_ticking").set(self.ticking.len() as f64);
            fsm.ticking = wants_ticks;
        }
    }
}

impl StoreHandler {
    /// The host is asked to split `fsm`'s range at `split_key` (advisory: dropped if its channel is full).
    fn ask_split(&self, fsm: &PeerFsm, split_key: Vec<u8>, reason: AskReason) {
        let Some(asks) = &self.range_asks else { return };
        let range = fsm.peer.descriptor().clone();
        if split_key.as_slice() <= range.start.as_slice() || !range.contains(&split_key) || range.is_meta() {
            return; // a sample from before the range changed (or of the meta range, which never splits)
        }
        let label = match reason {
            AskReason::Size => "size",
            AskReason::Load => "load",
            // Asked by the replicas thread (`Replicas::check_merge`, `ReplicaTask::Ask`).
            AskReason::Merge { .. } | AskReason::Publish => return,
        };
        metrics::counter!("flotilla_splits_asked_total", "reason" => label).increment(1);
        let _ = asks.try_send(RangeAsk { node_id: self.node_id, range, split_key, reason });
    }

    /// On a replica's ticks: a leader asks the meta group to publish its range's descriptor, if this node's meta
    /// replica does not show it (`peer/publish.rs`; advisory, asked again) — through that replica, or the host
    /// if this node holds none; the meta range's replica makes itself known.
    fn publish(&self, fsm: &mut PeerFsm, ticks: u64) {
        if fsm.peer.descriptor().is_meta() {
            self.meta_group.store(fsm.peer.group_id(), Ordering::Relaxed);
            return;
        }
        // (0 where this node holds no replica of the meta range: the replicas thread hands the ask to the host.)
        let meta_group = self.meta_group.load(Ordering::Relaxed);
        if let Some(command) = fsm.peer.publish_due(ticks, self.kv.as_ref()) {
            metrics::counter!("flotilla_publications_asked_total").increment(1);
            let _ = self.tasks.try_send(ReplicaTask::Ask { group_id: meta_group, command: Box::new(command) });
        }
    }

    /// Moves a replica's part in a merge on, if its range is in one (`Peer::merge_step`): after its messages, and
    /// after its applies (the entry applied may be the step another waited for).
    fn merge_step(&self, fsm: &mut PeerFsm) {
        if fsm.peer.descriptor().is_merging() {
            let ticks = std::mem::take(&mut fsm.merge_ticks);
            self.carry_out_merge_asks(fsm.peer.merge_step(ticks, self.kv.as_ref()));
        }
    }

    /// Sends on the writes a replica decided for a merge handed over to its node's replica of the left group
    /// (through the replicas thread); one its queue has no room for is refused as the replica would have refused
    /// it (the caller asks again).
    fn hand_over(&self, fsm: &mut PeerFsm) {
        for (group_id, message) in fsm.take_handed_over() {
            metrics::counter!("flotilla_writes_handed_over_total").increment(1);
            if let Err(crossbeam_channel::TrySendError::Full(ReplicaTask::Tell {
                message: PeerMsg::HandedOver { reply, decided, .. },
                ..
            })) = self.tasks.try_send(ReplicaTask::Tell { group_id, message })
            {
                let _ = reply.send(Err(PeerError::Range(RangeError::Merging { current: decided })));
            }
        }
    }

    /// What a replica in a merge asks beyond its group (`peer/merge.rs`), for the replicas thread (advisory:
    /// dropped if its queue is full, asked again later).
    fn carry_out_merge_asks(&self, asks: Vec<MergeAsk>) {
        for ask in asks {
            let task = match ask {
                MergeAsk::Propose { group_id, command } => ReplicaTask::Ask { group_id, command },
                MergeAsk::DecisionCommitted { group_id, decided_index, decided_term } => {
                    ReplicaTask::Tell { group_id, message: PeerMsg::DecisionCommitted { decided_index, decided_term } }
                }
                MergeAsk::Wake { group_id } => ReplicaTask::Tell { group_id, message: PeerMsg::Tick },
            };
            let _ = self.tasks.try_send(task);
        }
    }
}

impl PollHandler<PeerFsm> for StoreHandler {
    fn begin(&mut self) {
        // The node's time, read before anything is handled (`ticks.rs`): a lease is judged on it.
        self.ticking.sync();
    }

    fn handle(&mut self, fsm: &mut PeerFsm, messages: &mut Vec<PeerMsg>) {
        if let Some(reason) = self.failed() {
            fsm.read_lease.withdraw();
            fsm.refuse_waiting(PeerError::Stopped(reason.clone()));
            return refuse_all(messages.drain(..), PeerError::Stopped(reason));
        }
        if fsm.peer.is_removed() {
            // No longer a member here: requests go elsewhere; publications asked of it go to the host (this node
            // holds no live replica of the meta range); the rest is dropped.
            for message in messages.iter() {
                if let PeerMsg::Ask { command } = message {
                    publish_by_host(self.range_asks.as_ref(), self.node_id, command);
                }
            }
            return refuse_all(messages.drain(..), PeerError::NotLeader { leader: 0 });
        }
        let mut ticks = 0;
        if fsm.ticking {
            // The ticks it owes first (see `ticks.rs`): whatever it handles next sees the node's time.
            ticks = self.ticking.catch_up(&fsm.ticks_seen, &mut fsm.peer);
            if ticks > 0 {
                let (reads, keys) = fsm.read_lease.take_local_reads();
                if reads > 0 {
                    fsm.split_trigger.on_local_reads(reads, &keys);
                }
            }
            if let Some(split_key) = fsm.split_trigger.on_ticks(ticks).filter(|_| fsm.peer.is_leader()) {
                self.ask_split(fsm, split_key, AskReason::Load);
            }
            if fsm.peer.descriptor().is_merging() {
                fsm.merge_ticks += ticks;
            }
            if ticks > 0 {
                self.publish(fsm, ticks);
            }
        }
        for message in messages.drain(..) {
            fsm.on_message(message, self.kv.as_ref());
        }
        fsm.release_parked(ticks, self.frozen_write_wait_ticks, self.kv.as_ref());
        self.hand_over(fsm);
        // After the messages: a confirmation or an append answer may be what the next step waited for.
        self.merge_step(fsm);
        let output = fsm.peer.take_output(self.kv.as_ref());
        self.carry_out(fsm, output);
        if let Some(holder) = fsm.peer.take_overlapped_by() {
            let _ = self.tasks.try_send(ReplicaTask::CheckMembership(holder));
        }
        let checkpoint_asked =
            fsm.peer.take_checkpoint_wanted() && !self.checkpoint_queued.swap(true, Ordering::SeqCst);
        if checkpoint_asked && self.tasks.try_send(ReplicaTask::Checkpoint).is_err() {
            self.checkpoint_queued.store(false, Ordering::SeqCst); // full: asked again by the next handling
        }
        if fsm.peer.take_fell_asleep() && fsm.split_trigger.merges(fsm.peer.descriptor()) {
            // Cold: no request for a while. Small enough to merge into its left neighbour? Measured on the replicas
            // thread once it has stayed cold long enough (`split_trigger.rs`).
            let cold = ColdRange {
                group_id: fsm.peer.group_id(),
                ticks_seen: Arc::clone(&fsm.ticks_seen),
                asleep_at: fsm.ticks_seen.load(Ordering::SeqCst),
            };
            let _ = self.tasks.try_send(ReplicaTask::CheckMerge(cold));
        }
        if fsm.peer.is_leader() && fsm.split_trigger.take_size_check() && !fsm.peer.descriptor().is_meta() {
            // Measured on the replicas thread (a scan of up to twice the bound); dropped if its queue is full.
            let _ = self.tasks.try_send(ReplicaTask::CheckSize(Box::new(fsm.peer.descriptor().clone())));
        }
    }

    fn on_panic(&mut self, reason: String) {
        self.fail(reason);
    }

    fn end(&mut self, fsms: &mut [&mut PeerFsm]) {
        // Applying can commit more (a leader's own persisted entries): apply until nothing is left.
        while self.failed().is_none() && fsms.iter().any(|fsm| !fsm.to_apply.is_empty()) {
            if let Err(reason) = self.apply_round(fsms) {
                self.fail(reason);
            }
        }
        self.transport.flush();
    }
}

impl StoreHandler {
    /// Applies every group's committed entries in one state machine batch, then answers their clients.
    fn apply_round(&mut self, fsms: &mut [&mut PeerFsm]) -> Result<(), String> {
        let mut batches = Vec::new();
        let mut applied = Vec::new();
        for (position, fsm) in fsms.iter_mut().enumerate() {
            if fsm.to_apply.is_empty() || fsm.peer.is_removed() {
                fsm.to_apply.clear();
                continue;
            }
            let entries = std::mem::take(&mut fsm.to_apply);
            let last = entries.last().expect("non-empty").index;
            let (groups, outcomes) = fsm
                .peer
                .apply_committed(self.kv.as_ref(), &entries)
                .map_err(|e| format!("applying group {}: {e}", fsm.peer.group_id()))?;
            // The groups its splits make are opening from the moment the state machine shows them (`Store::opening`:
            // a request that finds one there waits for it).
            for group_id in fsm.peer.split_off_groups() {
                self.opening.insert(group_id);
            }
            batches.extend(groups);
            applied.push((position, last, outcomes));
        }
        if batches.is_empty() {
            return Ok(());
        }
        metrics::histogram!("flotilla_apply_batch_groups").record(batches.len() as f64);
        metrics::counter!("flotilla_commands_applied_total")
            .increment(applied.iter().map(|(_, _, outcomes)| outcomes.len() as u64).sum());
        let over_budget = self.kv.apply(batches).map_err(|e| format!("the state machine failed: {e}"))?;
        self.checkpointer.after_apply(over_budget).map_err(|e| format!("the state machine flusher stopped: {e}"))?;
        for (position, last, outcomes) in applied {
            let fsm = &mut fsms[position];
            fsm.peer.on_applied(last, outcomes);
            // The groups its splits made here: their state is in the state machine now; the replicas thread opens
            // them (rare: waiting for room in its queue is fine). The replica the split appoints leads it at once
            // (`SplitRequest::first_leader`; its range takes no writes until it has a leader).
            for split_off in fsm.peer.take_split_off() {
                self.local_reader.note_ranges_changed();
                let _ = self.tasks.send(ReplicaTask::Split(Box::new(split_off)));
            }
            self.merge_step(fsm);
            // The entry applied may be the decision (or the unfreezing) the writes parked here wait for.
            fsm.release_parked(0, self.frozen_write_wait_ticks, self.kv.as_ref());
            self.hand_over(fsm);
            let output = fsm.peer.take_output(self.kv.as_ref());
            self.carry_out(fsm, output);
        }
        Ok(())
    }
}
