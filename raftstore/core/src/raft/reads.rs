//! Linearizable reads without writing to the log (Raft thesis §6.4): ReadIndex confirmed by a heartbeat quorum,
//! or a leader lease (see the crate docs, "Leases and clocks"). A read is answered with a `ReadState`: the caller
//! serves it once its state machine has applied up to `index`.

use bytes::Bytes;

use super::{Raft, StateRole};
use crate::config::ReadMode;
use crate::error::{DropReason, Error, Result};
use crate::message::{Message, MessageType};
use crate::quorum::VoteResult;
use crate::storage::Storage;

/// A confirmed read: serve the read identified by `context` once the state machine has applied `index`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub index: u64,
    pub context: Bytes,
}

impl<S: Storage> Raft<S> {
    /// Requests a read index for the read identified by `context` (unique per read). On a follower the request
    /// goes to the leader. Fails at once if there is no leader to ask or the leader's queue is full; a request in
    /// flight may still be lost (to a leader change or a lost message), so callers time out and retry.
    pub fn read_index(&mut self, context: Bytes) -> Result<()> {
        let mut request = self.message(MessageType::ReadIndex, self.id);
        request.context = context;
        match self.role {
            StateRole::Leader => self.handle_read_index(request),
            StateRole::Follower if self.leader_id != 0 => {
                request.to = self.leader_id;
                self.msgs.push(request);
                Ok(())
            }
            _ => Err(Error::ProposalDropped(DropReason::NotLeader { leader_id: self.leader_id })),
        }
    }

    pub(super) fn handle_read_index(&mut self, m: Message) -> Result<()> {
        if self.tracker.config.voters.is_only_voter(self.id) {
            let committed = self.raft_log.committed;
            if self.committed_entry_in_current_term() {
                self.answer_read(m.from, committed, m.context);
                return Ok(());
            }
        }
        if !self.committed_entry_in_current_term() {
            // Until the leader commits an entry of its term it does not know the true commit index (§8).
            if self.pending_reads.len() >= self.config.pending_reads_max {
                return Err(Error::ProposalDropped(DropReason::PendingReadsFull));
            }
            self.pending_reads.push_back(m);
            return Ok(());
        }
        let committed = self.raft_log.committed;
        if self.read_mode() == ReadMode::LeaseBased && self.lease_valid() {
            self.answer_read(m.from, committed, m.context);
            return Ok(());
        }
        self.read_only.add_request(committed, m.context.clone(), m.from, self.id);
        self.broadcast_heartbeat_with_context(m.context);
        Ok(())
    }

    pub(super) fn release_pending_reads(&mut self) {
        let waiting: Vec<Message> = self.pending_reads.drain(..).collect();
        for read in waiting {
            // Cannot fail: the queue was drained and the leader has committed in its term.
            let _ = self.handle_read_index(read);
        }
    }

    /// `from` acknowledged the heartbeat carrying `context`: answer every read up to it once a quorum has.
    pub(super) fn confirm_read(&mut self, from: u64, context: &Bytes) {
        let Some(acks) = self.read_only.receive_ack(from, context) else { return };
        let votes = acks.iter().map(|id| (*id, true)).collect();
        if self.tracker.config.voters.vote_result(&votes) != VoteResult::Won {
            return;
        }
        for request in self.read_only.advance(context) {
            self.answer_read(request.from, request.index, request.context);
        }
    }

    fn answer_read(&mut self, asker: u64, index: u64, context: Bytes) {
        if asker == self.id {
            self.read_states.push(ReadState { index, context });
        } else {
            let mut response = self.message(MessageType::ReadIndexResponse, asker);
            response.index = index;
            response.context = context;
            self.msgs.push(response);
        }
    }

    pub(super) fn read_only_last_context(&self) -> Bytes {
        self.read_only.last_pending_context().unwrap_or_default()
    }

    /// Whether this leader's lease holds now: a quorum (itself included) has echoed a message sent at a tick that
    /// is still less than `election_timeout_ticks - lease_margin_ticks` ago. Until then none of those voters will
    /// vote for another candidate, so no other leader can exist.
    pub fn lease_valid(&self) -> bool {
        self.lease_end_tick().is_some()
    }

    /// The tick at which this leader's lease runs out (it holds while [`Raft::tick_count`] is below it), or
    /// `None` if it holds none now: not a leader, no check-quorum, or a transfer under way or done this term.
    pub fn lease_end_tick(&self) -> Option<u64> {
        if self.role != StateRole::Leader
            || !self.config.check_quorum
            || self.lease_revoked
            || self.lead_transferee != 0
        {
            return None;
        }
        let confirmed = self.tracker.lease_confirmed_tick(self.id, self.tick_count);
        let end = confirmed + self.config.election_timeout_ticks - self.config.lease_margin_ticks;
        (confirmed != 0 && end > self.tick_count).then_some(end)
    }

    pub fn pending_read_count(&self) -> usize {
        self.pending_reads.len() + self.read_only.len()
    }
}
