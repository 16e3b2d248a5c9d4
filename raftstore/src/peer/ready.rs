//! The core's Ready turned into [`PeerOutput`], and applied results turned into client responses.

use flotilla_engine::wal::record::LogOp;
use flotilla_raft::StateRole;

use std::collections::BTreeMap;

use super::{LogWrite, Peer, PeerError, PeerOutput, Response};
use crate::command::Applied;

impl Peer {
    /// Everything the caller must do now (empty if nothing).
    pub fn take_output(&mut self) -> PeerOutput {
        let mut output = PeerOutput::default();
        if self.raw.has_ready() {
            let ready = self.raw.ready();
            assert!(ready.snapshot.is_none(), "snapshot install is not supported yet (the next slice of the peer)");
            let mut ops = Vec::new();
            if !ready.entries.is_empty() {
                ops.push(LogOp::Append(ready.entries));
            }
            if let Some(hard_state) = ready.hard_state {
                ops.push(LogOp::HardState(hard_state));
            }
            if ops.is_empty() {
                // Nothing to persist. It may be acknowledged at once only if no earlier Ready is still being
                // written: `on_persisted(n)` declares every Ready up to `n` durable. Otherwise the core releases it
                // (and whatever responses it holds) behind the earlier one.
                if !self.raw.has_unpersisted_ready() {
                    self.raw.on_persisted(ready.number);
                }
            } else {
                output.write = Some(LogWrite { ready_number: ready.number, ops, must_sync: ready.must_sync });
            }
            output.messages = ready.messages;
            output.committed = ready.committed_entries;
            self.on_read_states(ready.read_states);
            if let Some(soft_state) = ready.soft_state {
                if self.role == StateRole::Leader && soft_state.role != StateRole::Leader {
                    self.fail_unconfirmed_reads();
                }
                self.role = soft_state.role;
            }
        }
        output.responses = std::mem::take(&mut self.responses);
        output
    }

    /// The Ready numbered `ready_number` (and every earlier one) is durable.
    pub fn on_persisted(&mut self, ready_number: u64) {
        self.raw.on_persisted(ready_number);
    }

    /// The committed entries up to `index` are applied, with these command outcomes (from
    /// [`crate::command::apply_entries`]): their clients are answered.
    pub fn on_applied(&mut self, index: u64, outcomes: Vec<Applied>) {
        self.raw.on_applied(index);
        self.applied_index = index;
        let mut outcomes: BTreeMap<u64, Applied> = outcomes.into_iter().map(|applied| (applied.index, applied)).collect();
        // Every write waiting at an index now applied is answered: written if the entry there is its own (same
        // term and token), else dropped (another leader's entry took the index; the write did not happen).
        while let Some(entry) = self.writes.first_entry().filter(|entry| *entry.key() <= index) {
            let (at, waiting) = entry.remove_entry();
            let applied = outcomes.remove(&at);
            for write in waiting {
                let response = match &applied {
                    Some(applied) if applied.term == write.term && applied.request_id == write.token => Response::Written(applied.outcome.clone()),
                    _ => Response::Failed(PeerError::Dropped),
                };
                self.responses.push((write.token, response));
            }
        }
        self.answer_ready_reads();
    }
}
