//! Snapshots between replicas, streamed beside the Raft core.
//!
//! **Sending** (leader). When a follower needs entries the log no longer holds, the core emits a snapshot message
//! carrying only metadata. The peer keeps that message back and opens a stream instead: a reader over the state
//! machine's durable view of the range (`KvEngine::snapshot_reader`, which flushes first, so the view is at the
//! replica's applied index). Chunks of at most `chunk_bytes_max` go out with at most `chunks_inflight_max`
//! unacknowledged (flow control). The last chunk carries the core's message, its index and term replaced by the
//! view's — at or after the compaction point the core asked for — and the configuration as of that index.
//! Unacknowledged chunks are sent again after `resend_ticks` without progress (go-back-N). A stream without
//! progress for `timeout_ticks` is given up and reported failed to the core, which retries later. The stream
//! ends with the receiver's final acknowledgement (reported to the core as sent) or its rejection.
//!
//! **Receiving** (follower). Chunk 0 of a stream begins an install in the state machine, which verifies and
//! writes each chunk as it comes (bounded memory, whatever the range's size); chunks out of order are ignored and
//! re-acknowledged. Once the last chunk is in, the core's message is stepped. If the core takes the snapshot
//! (it is newer than what this replica has committed), the next output finishes the install — one durable state
//! machine transaction that replaces the range and sets the applied index — and then writes
//! `LogOp::Snapshot` to the log. Otherwise the install is dropped. A replica with committed entries still out
//! for applying refuses to step a snapshot (the entries would apply on top of it); the leader retries.
//!
//! **Crash between the two writes**: the state machine holds the snapshot, the log does not. `Peer::open` finds
//! the log without the applied index's entry and restarts the log there (`bootstrap.rs`).
//!
//! **Asked for** (`docs/architecture.md`, splits against snapshots and crashes, rules 2–3). A replica without a
//! range over a log that is not empty (a crash took the first state a split wrote) asks its leader for one
//! (`ask_for_snapshot_if_stranded`); the core installs it over the kept log where the log holds its entry
//! (`Ready::installed_state`: the state only, no log record). A replica a split opened here installs none until
//! the split is durable (`refuse_installs_until_durable`, `first_state_durable`), and asks its node for that
//! checkpoint (`take_checkpoint_wanted`).

use std::collections::{BTreeMap, VecDeque};

use flotilla_engine::contract::{KvEngine, LogOp, SnapshotReader, StateMachineError};
use flotilla_raft::{Message, MessageType, Snapshot};

use super::{Peer, PeerError, Response};
use crate::message::{ReplicaMessage, SnapshotAck, SnapshotChunk};
use crate::range::RangeDescriptor;

/// Bounds and timing of snapshot streams.
#[derive(Clone, Debug)]
pub struct SnapshotOptions {
    /// Keys and values per chunk (a chunk holds at least one pair). Default 1 MiB.
    pub chunk_bytes_max: usize,
    /// Chunks sent and not yet acknowledged, per stream. Default 4 (so about 4 MiB in flight per stream).
    pub chunks_inflight_max: usize,
    /// Unacknowledged chunks are sent again after this many ticks without progress. Default 5.
    pub resend_ticks: u32,
    /// A stream without progress for this many ticks is given up, at either end. Default 50.
    pub timeout_ticks: u32,
}

impl SnapshotOptions {
    /// Refuses settings that could never work (a zero window, chunk size or resend period; a timeout that
    /// comes before the first resend).
    pub fn validate(&self) -> Result<(), String> {
        if self.chunk_bytes_max == 0 || self.chunks_inflight_max == 0 || self.resend_ticks == 0 {
            return Err(format!("snapshot options must be positive: {self:?}"));
        }
        if self.timeout_ticks <= self.resend_ticks {
            return Err(format!(
                "snapshot timeout_ticks ({}) must exceed resend_ticks ({})",
                self.timeout_ticks, self.resend_ticks
            ));
        }
        Ok(())
    }
}

impl Default for SnapshotOptions {
    fn default() -> SnapshotOptions {
        SnapshotOptions { chunk_bytes_max: 1 << 20, chunks_inflight_max: 4, resend_ticks: 5, timeout_ticks: 50 }
    }
}

/// A stream this replica sends.
struct Outgoing {
    stream_id: u64,
    reader: SnapshotReader,
    /// The descriptor as of the view (sent on chunk 0).
    descriptor: RangeDescriptor,
    /// The core's message with the view's metadata, sent on the last chunk.
    message: Message,
    next_sequence: u64,
    /// Sent, not yet acknowledged, in order.
    unacked: VecDeque<SnapshotChunk>,
    idle_ticks: u32,
}

/// The stream this replica receives (one at a time: a newer stream replaces it).
struct Incoming {
    from: u64,
    term: u64,
    stream_id: u64,
    /// Chunks received in order so far.
    received: u64,
    idle_ticks: u32,
}

/// A replica's snapshot streams.
#[derive(Default)]
pub(super) struct Streams {
    pub(super) options: SnapshotOptions,
    /// By receiving replica id.
    outgoing: BTreeMap<u64, Outgoing>,
    incoming: Option<Incoming>,
    next_stream_id: u64,
    /// Whether the state machine holds an install this replica gave up on (dropped at the next output).
    abort_install: bool,
    /// The descriptor of the stream being received.
    incoming_descriptor: Option<RangeDescriptor>,
    /// The descriptor of the snapshot the core took, until the next output installs it (no other stream may
    /// begin meanwhile: it would replace the install in the state machine).
    taken: Option<RangeDescriptor>,
    /// The decided right ranges that install ends here (`range_claims.rs`).
    taken_ends: Vec<u64>,
}

impl Streams {
    pub(super) fn new(options: SnapshotOptions) -> Streams {
        Streams { options, ..Streams::default() }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.outgoing.is_empty() && self.incoming.is_none()
    }
}

impl Peer {
    /// The state machine failed (a broken environment): recorded for the node to stop on
    /// ([`Peer::storage_failure`]); the replica does nothing more with snapshots.
    pub(super) fn storage_failed(&mut self, what: &str, error: StateMachineError) {
        self.storage_failure.get_or_insert_with(|| format!("state machine failure while {what}: {error}"));
        self.streams.outgoing.clear();
        self.streams.incoming = None;
    }

    /// Opens a stream for the core's snapshot message `message` (to a follower that needs it).
    pub(super) fn start_snapshot_stream(&mut self, mut message: Message, kv: &dyn KvEngine) {
        let range = &self.descriptor;
        let reader =
            match kv.snapshot_reader(range.group_id, &range.start, &range.end, self.streams.options.chunk_bytes_max) {
                Ok(reader) => reader,
                Err(error) => return self.storage_failed("opening a snapshot reader", error),
            };
        let (index, term) = reader.applied();
        assert_eq!(
            index, self.applied_index,
            "group {}: the state machine's view is not at the replica's applied index",
            self.descriptor.group_id
        );
        let metadata =
            message.snapshot.get_or_insert_with(Snapshot::default).metadata.get_or_insert_with(Default::default);
        assert!(index >= metadata.index, "a snapshot view at {index} behind the compaction point {}", metadata.index);
        metadata.index = index;
        metadata.term = term;
        metadata.conf_state = Some(self.raw.raft.tracker.config.to_conf_state());
        self.streams.next_stream_id += 1;
        let outgoing = Outgoing {
            stream_id: self.streams.next_stream_id,
            reader,
            descriptor: self.descriptor.clone(),
            message,
            next_sequence: 0,
            unacked: VecDeque::new(),
            idle_ticks: 0,
        };
        metrics::counter!("flotilla_snapshots_sent_total").increment(1);
        self.streams.outgoing.insert(outgoing.message.to, outgoing);
    }

    /// Sends each stream's next chunks, up to its window.
    pub(super) fn pump_snapshot_streams(&mut self) {
        let (id, term, window) = (self.raw.raft.id, self.raw.raft.term, self.streams.options.chunks_inflight_max);
        let mut failure = None;
        for (&to, outgoing) in &mut self.streams.outgoing {
            while outgoing.unacked.len() < window && !outgoing.reader.is_exhausted() {
                let data = match outgoing.reader.next_chunk() {
                    Ok(Some(data)) => data,
                    Ok(None) => break,
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                };
                let message = outgoing.reader.is_exhausted().then(|| outgoing.message.clone());
                let descriptor = (outgoing.next_sequence == 0).then(|| outgoing.descriptor.clone());
                let sequence = outgoing.next_sequence;
                let chunk = SnapshotChunk {
                    from: id,
                    to,
                    term,
                    stream_id: outgoing.stream_id,
                    sequence,
                    data,
                    message,
                    descriptor,
                };
                outgoing.next_sequence += 1;
                outgoing.unacked.push_back(chunk.clone());
                self.outbox.push(ReplicaMessage::Chunk(Box::new(chunk)));
            }
        }
        if let Some(error) = failure {
            self.storage_failed("reading a snapshot chunk", error);
        }
    }

    /// Time for the streams: resends, and gives up on streams that stopped moving.
    pub(super) fn tick_snapshot_streams(&mut self) {
        let options = self.streams.options.clone();
        let mut failed = Vec::new();
        for (&to, outgoing) in &mut self.streams.outgoing {
            outgoing.idle_ticks += 1;
            if outgoing.idle_ticks >= options.timeout_ticks {
                failed.push(to);
            } else if outgoing.idle_ticks % options.resend_ticks == 0 {
                self.outbox.extend(outgoing.unacked.iter().map(|chunk| ReplicaMessage::Chunk(Box::new(chunk.clone()))));
            }
        }
        for to in failed {
            self.streams.outgoing.remove(&to);
            self.raw.report_snapshot(to, false);
        }
        if let Some(incoming) = &mut self.streams.incoming {
            incoming.idle_ticks += 1;
            if incoming.idle_ticks >= options.timeout_ticks {
                self.streams.incoming = None;
                self.streams.abort_install = true;
            }
        }
    }

    /// On losing leadership: streams of the old term are pointless (their receivers refuse them).
    pub(super) fn drop_snapshot_streams(&mut self) {
        self.streams.outgoing.clear();
    }

    pub(super) fn on_snapshot_ack(&mut self, ack: SnapshotAck) {
        let Some(outgoing) = self
            .streams
            .outgoing
            .get_mut(&ack.from)
            .filter(|o| o.stream_id == ack.stream_id && ack.term == self.raw.raft.term)
        else {
            return; // an old stream's
        };
        if ack.rejected {
            self.streams.outgoing.remove(&ack.from);
            self.raw.report_snapshot(ack.from, false);
            return;
        }
        while outgoing.unacked.front().is_some_and(|chunk| chunk.sequence < ack.received) {
            outgoing.unacked.pop_front();
            outgoing.idle_ticks = 0;
        }
        if outgoing.reader.is_exhausted() && outgoing.unacked.is_empty() {
            self.streams.outgoing.remove(&ack.from);
            self.raw.report_snapshot(ack.from, true);
        }
    }

    pub(super) fn on_snapshot_chunk(&mut self, chunk: SnapshotChunk, kv: &dyn KvEngine) {
        let group_id = self.descriptor.group_id;
        let mut ack = SnapshotAck {
            from: chunk.to,
            to: chunk.from,
            term: chunk.term,
            stream_id: chunk.stream_id,
            received: 0,
            rejected: false,
        };
        if chunk.term < self.raw.raft.term || self.streams.taken.is_some() {
            ack.rejected = true;
            return self.outbox.push(ReplicaMessage::Ack(ack));
        }
        let current = |incoming: &Incoming| {
            (incoming.from, incoming.term, incoming.stream_id) == (chunk.from, chunk.term, chunk.stream_id)
        };
        if chunk.sequence == 0 && !self.streams.incoming.as_ref().is_some_and(current) {
            if self.install_waits_for_durable_split(kv) {
                // Refused before a byte is taken (once durable, it stays so): the leader sends it again later.
                ack.rejected = true;
                return self.outbox.push(ReplicaMessage::Ack(ack));
            }
            // A new stream: it replaces any unfinished one (the state machine drops that install).
            let Some(range) = chunk.descriptor.clone().filter(|range| range.group_id == group_id) else {
                ack.rejected = true; // a first chunk without this group's descriptor: damaged
                return self.outbox.push(ReplicaMessage::Ack(ack));
            };
            if let Err(error) = kv.begin_snapshot_install(group_id, &range.start, &range.end) {
                return self.storage_failed("beginning a snapshot install", error);
            }
            self.streams.abort_install = false;
            self.streams.incoming = Some(Incoming {
                from: chunk.from,
                term: chunk.term,
                stream_id: chunk.stream_id,
                received: 0,
                idle_ticks: 0,
            });
            self.streams.incoming_descriptor = Some(range);
        }
        let Some(incoming) = self.streams.incoming.as_mut().filter(|incoming| current(incoming)) else {
            ack.rejected = true; // a stream this replica is not receiving (gave up on, or finished)
            return self.outbox.push(ReplicaMessage::Ack(ack));
        };
        if chunk.sequence != incoming.received {
            // A duplicate, or a gap after a lost chunk: say where the stream stands; the sender resends from there.
            ack.received = incoming.received;
            return self.outbox.push(ReplicaMessage::Ack(ack));
        }
        let last = match kv.receive_snapshot_chunk(group_id, &chunk.data) {
            Ok(last) => last,
            Err(StateMachineError::Invalid(_)) => {
                // Damaged or not of this range: give the stream up; the leader starts over.
                self.streams.incoming = None;
                self.streams.abort_install = true;
                ack.rejected = true;
                return self.outbox.push(ReplicaMessage::Ack(ack));
            }
            Err(error) => return self.storage_failed("writing a snapshot chunk", error),
        };
        incoming.received += 1;
        incoming.idle_ticks = 0;
        ack.received = incoming.received;
        if last {
            self.streams.incoming = None;
            ack.rejected = !self.step_received_snapshot(chunk.message);
        } else if chunk.message.is_some() {
            // The state machine says more chunks follow, the sender says this was the last: damaged.
            self.streams.incoming = None;
            self.streams.abort_install = true;
            ack.rejected = true;
        }
        self.outbox.push(ReplicaMessage::Ack(ack));
    }

    /// Steps the snapshot message of a fully received stream; keeps the install if the core takes the snapshot.
    /// Returns false if the stream must be reported failed. The snapshot's range is claimed on this node first
    /// (`range_claims.rs`): a snapshot of keys another group still holds here is refused (the leader retries).
    fn step_received_snapshot(&mut self, message: Option<Message>) -> bool {
        let snapshot_index = message.as_ref().and_then(|m| m.snapshot.as_ref()).map(Snapshot::index);
        let log = &self.raw.raft.raft_log;
        let busy_applying = log.applying != log.applied;
        let descriptor = self.streams.incoming_descriptor.take().expect("a stream's first chunk brings its range");
        let (Some(message), Some(index), false) = (message, snapshot_index, busy_applying) else {
            self.streams.abort_install = true;
            return false;
        };
        let previous = match self.claims.claim_for_install(&descriptor, self.descriptor.is_initialized()) {
            Ok(previous) => previous,
            Err(holder) => {
                // (Mostly a lagging replica here of the group that split: it holds the keys until it applies the
                // split, and this group's replica is then made by the split. Or one removed that missed the news:
                // the node wakes it, `Peer::check_membership`.)
                metrics::counter!("flotilla_snapshots_refused_overlap_total").increment(1);
                if holder != descriptor.group_id {
                    self.overlapped_by = Some(holder);
                }
                self.streams.abort_install = true;
                return false;
            }
        };
        if message.msg_type() != MessageType::Snapshot || self.raw.step(message).is_err() {
            self.claims.restore(descriptor.group_id, previous);
            self.streams.abort_install = true;
            return false;
        }
        // Taken only if the core now holds it waiting to be handed out. A snapshot of the same index already handed
        // out (an earlier stream's, its log record still being written) is not this one: the core refused this
        // one as not newer, and this install must be dropped — else it would wait forever for a Ready (seed 832).
        let log = &self.raw.raft.raft_log;
        let taken = log.unstable.next_snapshot().is_some_and(|s| s.index() == index)
            || log.installed_state.as_ref().is_some_and(|s| s.index() == index); // asked for: the log kept
        self.streams.abort_install = !taken;
        if taken {
            self.streams.taken = Some(descriptor);
            self.streams.taken_ends = previous.ended();
        } else {
            self.claims.restore(descriptor.group_id, previous);
        }
        true
    }

    /// Finishes the install of the snapshot the core took (durably, in the state machine) and returns the log
    /// record that restarts the log after it. Writes that waited at indexes the snapshot covers cannot learn
    /// their fate here: they are answered `OutcomeUnknown`.
    /// `None` if the state machine failed (the node must stop: [`Peer::storage_failure`]).
    pub(super) fn finish_snapshot_install(&mut self, snapshot: &Snapshot, kv: &dyn KvEngine) -> Option<LogOp> {
        let (index, term) = (snapshot.index(), snapshot.term());
        let descriptor = self.streams.taken.take().expect("a snapshot the core took came with its stream's descriptor");
        // Decided right ranges this group took in while this replica was behind: their records say so first
        // (durably), so that no replica of theirs here opens again or reads this install as their merge given up.
        let ended = std::mem::take(&mut self.streams.taken_ends);
        for &group_id in &ended {
            let record = kv
                .range(group_id)
                .map(|stored| stored.and_then(|bytes| RangeDescriptor::decode_stored(&bytes).ok()))
                .and_then(|right| match right {
                    Some(right) => kv.put_range(group_id, &right.merged_record(descriptor.group_id).encode()),
                    None => Ok(()),
                });
            if let Err(error) = record {
                self.storage_failed("recording a merged range", error);
                return None;
            }
        }
        self.merged_away.extend(ended);
        if self.merge.commit_waits_for.take().is_some() {
            // A merge commit it held waits no more: the snapshot is past it (`apply.rs`).
            self.raw.hold_apply(false);
        }
        let installed = match kv.finish_snapshot_install(self.descriptor.group_id, Some(&descriptor.encode())) {
            Ok(installed) => installed,
            Err(error) => {
                self.storage_failed("finishing a snapshot install", error);
                return None;
            }
        };
        self.descriptor = descriptor;
        self.raw.hold_apply(false); // a replica created empty has its range now
        assert_eq!(
            installed,
            (index, term),
            "group {}: the installed data is not the snapshot the core took",
            self.descriptor.group_id
        );
        self.applied_index = index;
        self.hold_apply_once_decided();
        while let Some(entry) = self.writes.first_entry().filter(|entry| *entry.key() <= index) {
            let unknown =
                entry.remove().into_iter().map(|write| (write.token, Response::Failed(PeerError::OutcomeUnknown)));
            self.responses.extend(unknown);
        }
        self.release_empty_writes();
        self.answer_ready_reads();
        metrics::counter!("flotilla_snapshots_installed_total").increment(1);
        Some(LogOp::Snapshot { index, term })
    }

    /// For a replica a split applied here opened (the split's state not yet durable, as a checkpoint makes it): no
    /// snapshot is installed until that state is durable. An install is durable at once, the split's shrinking of
    /// its old group only at the next checkpoint; a crash between them would leave two groups holding the same
    /// keys here (`store-sim` seed 36). Called by the node right after it opens such a replica.
    pub fn refuse_installs_until_durable(&mut self) {
        self.installs_wait_for_durable = true;
    }

    /// Whether a received snapshot must be refused for now (see `refuse_installs_until_durable`): until the
    /// state machine holds this group's first state durably.
    fn install_waits_for_durable_split(&mut self, kv: &dyn KvEngine) -> bool {
        let waits = !self.first_state_durable(kv);
        if waits {
            metrics::counter!("flotilla_snapshots_refused_split_not_durable_total").increment(1);
        }
        waits
    }

    /// Whether the state machine holds this replica's first state durably — always, but for a replica a split
    /// opened here until the next checkpoint (`refuse_installs_until_durable`); while not, the node is asked for
    /// one (rather than wait for the flusher's next turn). Snapshot installs wait for it, and so does a frozen
    /// range's confirmation of a merge (`merge.rs`): the group ends with the merge, so a crash that took its
    /// first state afterwards would leave a replica no snapshot can ever reach, under a commit its node's left
    /// replica cannot apply without it (`store-sim` seed 735).
    pub(super) fn first_state_durable(&mut self, kv: &dyn KvEngine) -> bool {
        if self.installs_wait_for_durable && kv.durable_applied(self.descriptor.group_id).0 > 0 {
            self.installs_wait_for_durable = false;
        }
        if self.installs_wait_for_durable {
            self.checkpoint_wanted = true;
        }
        !self.installs_wait_for_durable
    }

    /// Whether this replica waited for its first state to be durable since the last call: the node checkpoints
    /// its state machine (off the pollers), and the replica finds it durable next time.
    pub fn take_checkpoint_wanted(&mut self) -> bool {
        std::mem::take(&mut self.checkpoint_wanted)
    }

    /// Whether this replica has no range over a log that is not empty: a crash took the first state a split wrote
    /// here while the new group's log survived. The split applied again here replaces it — but not if its old
    /// group here has caught up by a snapshot past the split meanwhile; then only a snapshot of its own group
    /// brings its range, and a leader that finds its log whole never sends one unasked.
    pub(super) fn is_stranded(&self) -> bool {
        !self.descriptor.is_initialized() && self.raw.raft.raft_log.last_index() > 0
    }

    /// On a tick: a stranded replica (`is_stranded`) asks its leader for a snapshot reaching its last index, after
    /// two election timeouts and every two more (the split applied again is the common way out, and is given that
    /// long first). The install is refused while its keys are still another group's here (`range_claims.rs`).
    pub(super) fn ask_for_snapshot_if_stranded(&mut self) {
        if !self.is_stranded() {
            self.stranded_ticks = 0;
            return;
        }
        self.stranded_ticks += 1;
        if self.asks_due(self.stranded_ticks) && self.raw.request_snapshot() {
            metrics::counter!("flotilla_snapshots_requested_total").increment(1);
        }
    }

    /// Drops an install given up on (see [`Streams`]).
    pub(super) fn abort_dropped_install(&mut self, kv: &dyn KvEngine) {
        if std::mem::take(&mut self.streams.abort_install) {
            kv.abort_snapshot_install(self.descriptor.group_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SnapshotOptions;

    #[test]
    fn settings_that_could_never_work_are_refused() {
        assert_eq!(SnapshotOptions::default().validate(), Ok(()));
        for broken in [
            SnapshotOptions { chunk_bytes_max: 0, ..SnapshotOptions::default() },
            SnapshotOptions { chunks_inflight_max: 0, ..SnapshotOptions::default() },
            SnapshotOptions { resend_ticks: 0, ..SnapshotOptions::default() },
            SnapshotOptions { timeout_ticks: 5, resend_ticks: 5, ..SnapshotOptions::default() },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }
}
