//! Membership changes and leadership transfer.
//!
//! A configuration takes effect when its entry is **applied** (the caller calls `apply_conf_change`), on every
//! replica alike. The leader proposes a new change only after the previous one is applied
//! (`pending_conf_index`), and a replica does not campaign while a committed change is unapplied, so at most
//! one change is ever in flight and every decision is made by a configuration that overlaps its successor
//! (a simple change alters one voter; larger ones pass through a joint configuration needing both majorities).

use bytes::Bytes;
use prost::Message as _;

use super::{Raft, StateRole};
use crate::conf_change::next_configuration;
use crate::error::{DropReason, Error, Result};
use crate::message::{ConfChangeV2, ConfState, Entry, EntryType, MessageType};
use crate::progress::ProgressState;
use crate::storage::Storage;
use crate::tracker::Configuration;

impl<S: Storage> Raft<S> {
    /// Proposes a membership change. Fails if one is still unapplied or if it is invalid from the current one.
    pub fn propose_conf_change(&mut self, change: &ConfChangeV2) -> Result<()> {
        self.check_can_propose()?;
        if self.pending_conf_index > self.raft_log.applied {
            return Err(Error::ProposalDropped(DropReason::ConfChangePending));
        }
        if next_configuration(&self.tracker.config, change).is_err() {
            return Err(Error::ProposalDropped(DropReason::InvalidConfChange));
        }
        let entry = Entry {
            entry_type: EntryType::ConfChange as i32,
            data: Bytes::from(change.encode_to_vec()),
            ..Default::default()
        };
        self.propose(vec![entry])?;
        self.pending_conf_index = self.raft_log.last_index();
        Ok(())
    }

    /// Whether a membership change proposed by this leader, or by an earlier one, may still be unapplied.
    pub fn has_pending_conf_change(&self) -> bool {
        self.pending_conf_index > self.raft_log.applied
    }

    /// Applies a committed membership change; the caller calls this when it applies the entry and stores the
    /// returned configuration with its applied state. An invalid change is skipped identically on every replica.
    pub fn apply_conf_change(&mut self, change: &ConfChangeV2) -> Result<ConfState> {
        let next = next_configuration(&self.tracker.config, change)
            .map_err(|_| Error::ProposalDropped(DropReason::InvalidConfChange))?;
        self.switch_to_configuration(next);
        Ok(self.tracker.config.to_conf_state())
    }

    fn switch_to_configuration(&mut self, configuration: Configuration) {
        let next_index = self.raft_log.last_index() + 1;
        self.tracker.apply_configuration(configuration, next_index);
        if self.role != StateRole::Leader {
            return;
        }
        if self.lead_transferee != 0 && !self.tracker.is_voter(self.lead_transferee) {
            self.abort_leader_transfer();
        }
        self.hand_over_if_removed();
        if self.maybe_commit() {
            self.broadcast_append();
        } else {
            // Probe new members (still in Probe, never heard from) at once rather than at the next heartbeat.
            let peers: Vec<(u64, bool)> = self
                .tracker
                .progress
                .iter()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, p)| (*id, p.state == ProgressState::Probe && p.matched == 0))
                .collect();
            for (id, is_new) in peers {
                self.maybe_send_append(id, is_new);
            }
        }
    }

    /// A leader that is no longer a voter (removed or demoted) keeps leading — committing by the new
    /// configuration's quorum, refusing proposals — and transfers leadership to the most up-to-date voter. It must
    /// not simply step down: the remaining voters may not yet know that the change removing it is committed, still
    /// count it as a voter, and fail to elect anyone while it (with the longest log) refuses them its vote. Called
    /// again when a transfer times out.
    pub(super) fn hand_over_if_removed(&mut self) {
        if self.role != StateRole::Leader || self.tracker.is_voter(self.id) || self.lead_transferee != 0 {
            return;
        }
        let successor = self
            .tracker
            .progress
            .iter()
            .filter(|(id, _)| **id != self.id && self.tracker.is_voter(**id))
            .max_by_key(|(id, p)| (p.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id);
        if let Some(successor) = successor {
            self.handle_transfer_leader(successor);
        }
    }

    /// The caller applied entries up to `index`. A leader in a joint configuration that leaves automatically
    /// proposes the leaving change once the joint one is applied.
    pub fn on_applied(&mut self, index: u64) {
        self.raft_log.applied_to(index);
        if self.role == StateRole::Leader
            && self.tracker.config.auto_leave
            && self.raft_log.applied >= self.pending_conf_index
        {
            // Refused only while a transfer is under way; retried at the next apply.
            let _ = self.propose_conf_change(&ConfChangeV2::leave_joint());
        }
    }

    /// Starts moving leadership to `target` (a voter): bring it up to date, then tell it to campaign at once.
    /// Proposals are refused meanwhile; the transfer aborts after an election timeout.
    pub(super) fn handle_transfer_leader(&mut self, target: u64) {
        if target == self.id || !self.tracker.is_voter(target) {
            return;
        }
        if self.lead_transferee == target {
            return;
        }
        self.abort_leader_transfer();
        self.election_elapsed = 0;
        self.lead_transferee = target;
        let caught_up = self.tracker.progress.get(&target).is_some_and(|p| p.matched == self.raft_log.last_index());
        if caught_up {
            self.send_timeout_now(target);
        } else {
            self.maybe_send_append(target, true);
        }
    }

    /// Asks this replica's leader (or itself, if leader) to hand leadership to `target`.
    pub fn transfer_leader(&mut self, target: u64) {
        match self.role {
            StateRole::Leader => self.handle_transfer_leader(target),
            StateRole::Follower if self.leader_id != 0 => {
                let mut request = self.message(MessageType::TransferLeader, self.leader_id);
                request.from = target;
                self.msgs.push(request);
            }
            _ => {}
        }
    }

    pub(super) fn send_timeout_now(&mut self, to: u64) {
        // The target campaigns with a forced vote that voters grant inside their lease: this leader's lease
        // guarantee is void from now on.
        self.lease_revoked = true;
        let message = self.message(MessageType::TimeoutNow, to);
        self.msgs.push(message);
    }

    pub(super) fn abort_leader_transfer(&mut self) {
        self.lead_transferee = 0;
    }
}
