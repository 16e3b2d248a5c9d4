//! The core's Ready turned into [`PeerOutput`], and applied results turned into client responses.

use flotilla_engine::contract::{KvEngine, LogOp};
use flotilla_raft::{MessageType, StateRole};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{LogWrite, Peer, PeerError, PeerOutput, Response};
use crate::command::{Applied, Outcome};
use crate::message::ReplicaMessage;

impl Peer {
    /// Everything the caller must do now (empty if nothing). `kv` is the node's state machine: a snapshot the
    /// core took is installed into it (durably, before the returned log write), and snapshot streams read it.
    pub fn take_output(&mut self, kv: &dyn KvEngine) -> PeerOutput {
        self.take_noted_persisted();
        self.propose_batched();
        let mut output = PeerOutput::default();
        self.abort_dropped_install(kv);
        if self.raw.has_ready() {
            let mut ready = self.raw.ready();
            // Learning of this write's durability at once matters for a leader, a candidate, a replica with
            // committed entries waiting for it, or an installed snapshot; a follower's answer goes with the write.
            let prompt = ready.snapshot.is_some() || self.raw.needs_prompt_persisted();
            let after_persist: Vec<ReplicaMessage> =
                std::mem::take(&mut ready.messages_after_persist).into_iter().map(ReplicaMessage::Raft).collect();
            let mut ops = Vec::new();
            if let Some(snapshot) = &ready.snapshot {
                match self.finish_snapshot_install(snapshot, kv) {
                    Some(op) => ops.push(op),
                    None => return output, // the state machine failed: the node stops (storage_failure)
                }
            }
            if let Some(state) = &ready.installed_state {
                // A snapshot this replica asked for, over its log kept whole: the state only (no log record).
                if self.finish_snapshot_install(state, kv).is_none() {
                    return output;
                }
            }
            if !ready.entries.is_empty() {
                ops.push(LogOp::Append(ready.entries));
            }
            // A Ready that changed nothing but the commit index (`must_sync` false) writes nothing: the commit
            // index may be stored lazily (a restarted replica takes the larger of it and its applied index, and
            // learns the rest from its leader). The stored one catches up whenever a Ready that must be synced
            // carries a changed hard state. With one write per group in flight (thousands of groups), the
            // leader's commit and every follower's learning of it would otherwise cost a log write, a sync and a
            // `Persisted` round trip each.
            //
            // So a Ready that must be synced (entries, a term, a vote) carries the hard state as it stands, commit
            // index included, whether or not this Ready changed it: a replica whose log durably holds an entry also
            // durably knows the commit index its leader had when it got it. The core's rule that a replica with
            // committed, unapplied membership changes does not campaign depends on this: a restarted leader that
            // had proposed two membership changes, its commit index stored from before both, campaigned under the
            // configuration two changes old and won a term another leader held (`store-sim` seed 793).
            if ready.must_sync {
                let hard_state = ready.hard_state.unwrap_or_else(|| self.raw.raft.hard_state());
                if hard_state != self.hard_state_written {
                    self.hard_state_written = hard_state;
                    ops.push(LogOp::HardState(hard_state));
                }
            }
            if ops.is_empty() && after_persist.is_empty() {
                // Nothing to persist. It may be acknowledged at once only if no earlier Ready is still being
                // written: `on_persisted(n)` declares every Ready up to `n` durable. Otherwise the core releases it
                // behind the earlier one.
                if !self.raw.has_unpersisted_ready() {
                    self.raw.on_persisted(ready.number);
                }
            } else {
                // With responses and nothing to persist, the write is empty: it completes after the earlier ones.
                output.write = Some(LogWrite { ready_number: ready.number, ops, messages: after_persist, prompt });
            }
            for message in ready.messages {
                if message.msg_type() == MessageType::Snapshot {
                    self.start_snapshot_stream(message, kv);
                } else {
                    output.messages.push(ReplicaMessage::Raft(message));
                }
            }
            output.committed = ready.committed_entries;
            self.on_read_states(ready.read_states);
            if let Some(soft_state) = ready.soft_state {
                if self.role == StateRole::Leader && soft_state.role != StateRole::Leader {
                    self.fail_unconfirmed_reads();
                    self.drop_snapshot_streams();
                }
                self.role = soft_state.role;
            }
        }
        self.pump_snapshot_streams();
        self.take_compaction(&mut output.write);
        output.messages.append(&mut self.outbox);
        output.responses = std::mem::take(&mut self.responses);
        output
    }

    /// The Ready numbered `ready_number` (and every earlier one) is durable.
    pub fn on_persisted(&mut self, ready_number: u64) {
        self.raw.on_persisted(ready_number);
    }

    /// A write this replica asked for ([`LogWrite`]) is durable, told by a caller on the replica's own thread:
    /// at once if the write was `prompt`, else through the note, taken up at the next handling — what the store's
    /// persisted forwarder does across threads (a `Persisted` message, or the note).
    pub fn on_write_durable(&mut self, ready_number: u64, prompt: bool) {
        if prompt {
            self.on_persisted(ready_number);
        } else {
            self.persisted_note.note(ready_number);
        }
    }

    /// Where another thread notes this replica's writes durable without scheduling it (see [`LogWrite::prompt`]).
    pub fn persisted_note(&self) -> PersistedNote {
        self.persisted_note.clone()
    }

    /// Takes up what was noted durable since the last handling: first thing in every handling, so nothing the
    /// replica does is judged on staler durability than the note holds.
    pub(super) fn take_noted_persisted(&mut self) {
        if !self.raw.has_unpersisted_ready() {
            return; // nothing written is waiting (and the note's cache line stays cold)
        }
        let noted = self.persisted_note.0.load(Ordering::Acquire);
        if noted > self.persisted_taken {
            self.persisted_taken = noted;
            self.raw.on_persisted(noted);
        }
    }

    /// The committed entries up to `index` are applied, with these command outcomes (from
    /// [`Peer::apply_committed`]): their clients are answered.
    pub fn on_applied(&mut self, index: u64, outcomes: Vec<Applied>) {
        // Not past what stayed handed out: a merge commit waiting for this node's right replica was handed back
        // with the entries after it (`Peer::apply_committed`).
        let index = index.min(self.raw.applying());
        self.raw.on_applied(index);
        self.applied_index = index;
        self.hold_apply_once_decided(); // (on the index just applied: the decision may be among its entries)
        if std::mem::take(&mut self.merge_step_applied) {
            self.raw.broadcast_commit();
        }
        // By index and request: a batch entry holds several writes (`propose.rs`).
        let mut outcomes: BTreeMap<(u64, u64), Applied> =
            outcomes.into_iter().map(|applied| ((applied.index, applied.request_id), applied)).collect();
        // Every write waiting at an index now applied is answered: written if the entry there is its own (same
        // term and token), else dropped (another leader's entry took the index; the write did not happen). One
        // refused where it applied (a split came first) is answered as one refused when proposed: nothing
        // happened, and the caller routes it again.
        while let Some(entry) = self.writes.first_entry().filter(|entry| *entry.key() <= index) {
            let (at, waiting) = entry.remove_entry();
            for write in waiting {
                let response = match &outcomes.remove(&(at, write.token)) {
                    Some(applied) if applied.term == write.term => match &applied.outcome {
                        Outcome::Refused(refusal) => Response::Failed(PeerError::Range(refusal.clone())),
                        outcome => Response::Written(outcome.clone()),
                    },
                    _ => Response::Failed(PeerError::Dropped),
                };
                self.responses.push((write.token, response));
            }
        }
        self.release_empty_writes();
        self.answer_ready_reads();
    }
}

/// A replica's durable Ready numbers, noted from the thread that completed its writes. Cheap to clone; every
/// clone notes for the same replica (a replica opened again gets a new one, so a stale note reaches nobody).
#[derive(Clone, Debug, Default)]
pub struct PersistedNote(Arc<AtomicU64>);

impl PersistedNote {
    /// The Ready numbered `ready_number`, and every earlier one, is durable.
    pub fn note(&self, ready_number: u64) {
        self.0.fetch_max(ready_number, Ordering::Release);
    }
}
