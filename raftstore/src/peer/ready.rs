//! The core's Ready turned into [`PeerOutput`], and applied results turned into client responses.

use flotilla_engine::wal::record::LogOp;
use flotilla_raft::StateRole;

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
        for applied in outcomes {
            // Writes proposed here whose index has passed without their entry: replaced by another leader's.
            while self.writes.front().is_some_and(|write| write.index < applied.index) {
                let write = self.writes.pop_front().expect("checked");
                self.responses.push((write.token, Response::Failed(PeerError::Dropped)));
            }
            if let Some(write) = self.writes.front().filter(|write| write.index == applied.index) {
                let response = if write.term == applied.term && write.token == applied.request_id {
                    Response::Written(applied.outcome)
                } else {
                    Response::Failed(PeerError::Dropped)
                };
                let token = write.token;
                self.writes.pop_front();
                self.responses.push((token, response));
            }
        }
        while self.writes.front().is_some_and(|write| write.index <= index) {
            // Applied without a command outcome (the entry was another leader's no-op or a refused command).
            let write = self.writes.pop_front().expect("checked");
            self.responses.push((write.token, Response::Failed(PeerError::Dropped)));
        }
        self.answer_ready_reads();
    }
}
