//! The leader's side of log replication (Raft §5.3): proposals, appends paced per follower (probe / pipelined
//! replicate / snapshot), fast backtracking on rejection, heartbeats, and the commit rule.

use bytes::Bytes;

use super::{Raft, StateRole};
use crate::error::{DropReason, Error, Result, StorageError};
use crate::message::{Entry, Message, MessageType};
use crate::progress::ProgressState;
use crate::storage::Storage;

impl<S: Storage> Raft<S> {
    /// Appends client entries to the leader's log and starts replicating them. Fails (nothing appended) when not
    /// leader, while transferring leadership, or when the uncommitted bytes would pass their bound.
    pub fn propose(&mut self, entries: Vec<Entry>) -> Result<()> {
        self.check_can_propose()?;
        let bytes: u64 = entries.iter().map(Entry::size_bytes).sum();
        if self.uncommitted_bytes > 0 && self.uncommitted_bytes + bytes > self.config.uncommitted_bytes_max {
            return Err(Error::ProposalDropped(DropReason::UncommittedBytesFull));
        }
        self.uncommitted_bytes += bytes;
        self.append_entries_as_leader(entries);
        self.broadcast_append();
        Ok(())
    }

    pub(super) fn check_can_propose(&self) -> Result<()> {
        if self.role != StateRole::Leader {
            return Err(Error::ProposalDropped(DropReason::NotLeader { leader_id: self.leader_id }));
        }
        if self.lead_transferee != 0 {
            return Err(Error::ProposalDropped(DropReason::Transferring));
        }
        Ok(())
    }

    /// Gives `entries` the next indexes and the current term and appends them (not yet persisted: the leader's
    /// own progress moves only when they are).
    pub(super) fn append_entries_as_leader(&mut self, mut entries: Vec<Entry>) {
        let mut index = self.raft_log.last_index();
        for entry in entries.iter_mut() {
            index += 1;
            entry.index = index;
            entry.term = self.term;
        }
        self.raft_log.append(&entries);
    }

    /// Entries handed out as committed no longer count as uncommitted.
    pub fn reduce_uncommitted_bytes(&mut self, committed: &[Entry]) {
        if self.role != StateRole::Leader {
            return;
        }
        let bytes: u64 = committed.iter().filter(|e| !e.data.is_empty()).map(Entry::size_bytes).sum();
        self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(bytes);
    }

    /// The caller persisted entries: a leader counts itself toward commit only now.
    pub(crate) fn on_entries_persisted(&mut self) {
        if self.role != StateRole::Leader {
            return;
        }
        let persisted = self.raft_log.persisted;
        let updated = self.tracker.progress.get_mut(&self.id).is_some_and(|p| p.maybe_update(persisted));
        let before = self.raft_log.committed;
        if updated && self.maybe_commit() {
            self.after_commit(before);
        }
    }

    /// Commits the largest index a quorum has persisted, if it is of the current term (§5.4.2). Returns whether
    /// the commit index moved.
    pub(super) fn maybe_commit(&mut self) -> bool {
        let first_in_term = !self.committed_entry_in_current_term();
        let index = self.tracker.committed_index();
        if !self.raft_log.maybe_commit(index, self.term) {
            return false;
        }
        if first_in_term {
            self.release_pending_reads();
        }
        true
    }

    pub(super) fn committed_entry_in_current_term(&self) -> bool {
        self.raft_log.term(self.raft_log.committed).is_ok_and(|t| t == self.term)
    }

    pub(super) fn broadcast_append(&mut self) {
        self.send_appends(true);
    }

    /// Every follower gets the entries it needs next (with `send_if_empty`, an append even if there are none).
    fn send_appends(&mut self, send_if_empty: bool) {
        let peers: Vec<u64> = self.tracker.progress.keys().copied().filter(|&id| id != self.id).collect();
        for id in peers {
            self.maybe_send_append(id, send_if_empty);
        }
    }

    /// After the commit index moved from `before`: with `commit_broadcast`, every follower gets an append
    /// (carrying the new commit index) at once; without, only the followers with new entries to receive do, and
    /// the others learn the commit index from their next append or heartbeat (see `Config::commit_broadcast`).
    /// Except when a membership change just committed: everyone hears at once then, because a replica it
    /// removes gets no heartbeat once the leader applies it, and would otherwise never learn of its removal.
    fn after_commit(&mut self, before: u64) {
        let membership_committed = (before + 1..=self.raft_log.committed).contains(&self.pending_conf_index);
        self.send_appends(self.config.commit_broadcast || membership_committed);
    }

    /// Sends `to` the entries it needs next, or a snapshot if they were compacted away. With `send_if_empty`
    /// false, sends nothing when there are no new entries. Returns whether a message was sent.
    pub(super) fn maybe_send_append(&mut self, to: u64, send_if_empty: bool) -> bool {
        let Some(progress) = self.tracker.progress.get(&to) else { return false };
        if progress.is_paused() {
            return false;
        }
        let next_index = progress.next_index;
        let previous_term = self.raft_log.term(next_index - 1);
        let entries = self.raft_log.entries_from(next_index, self.config.append_message_bytes_max);
        let (previous_term, entries) = match (previous_term, entries) {
            (Ok(term), Ok(entries)) => (term, entries),
            (Err(StorageError::Compacted), _) | (_, Err(StorageError::Compacted)) => return self.send_snapshot(to),
            (Err(e), _) | (_, Err(e)) => self.storage_fatal("reading entries to replicate", e),
        };
        if entries.is_empty() && !send_if_empty {
            return false;
        }
        let bytes: u64 = entries.iter().map(Entry::size_bytes).sum();
        let last_index = entries.last().map_or(next_index - 1, |e| e.index);
        let count = entries.len();
        let mut message = self.message(MessageType::Append, to);
        message.index = next_index - 1;
        message.log_term = previous_term;
        message.entries = entries;
        message.commit = self.raft_log.committed;
        message.lease_tick = self.tick_count;
        self.msgs.push(message);
        if let Some(progress) = self.tracker.progress.get_mut(&to) {
            progress.on_append_sent(count, last_index, bytes);
            progress.append_sent_tick = self.tick_count;
        }
        true
    }

    /// A follower asks for a snapshot (`RawNode::request_snapshot`): sent now, unless one is on its way (it asks
    /// again with every answer until it has one) or none is stored yet.
    pub(super) fn handle_snapshot_request(&mut self, to: u64) {
        if !self.tracker.progress.get(&to).is_some_and(|p| p.state != ProgressState::Snapshot) {
            return;
        }
        self.send_snapshot_as(to, true);
    }

    fn send_snapshot(&mut self, to: u64) -> bool {
        self.send_snapshot_as(to, false)
    }

    /// Sends `to` the storage's snapshot: because its log needs entries compacted away, or because it asked
    /// (`requested`; then the log may not be compacted, and a storage that has stored no snapshot sends none).
    fn send_snapshot_as(&mut self, to: u64, requested: bool) -> bool {
        if !self.tracker.progress.get(&to).is_some_and(|p| p.recent_active) {
            // Do not push a snapshot at a replica that may be down; wait until it answers again.
            return false;
        }
        let snapshot = match self.raft_log.snapshot(self.raft_log.first_index() - 1) {
            Ok(snapshot) => snapshot,
            Err(StorageError::SnapshotTemporarilyUnavailable) => return false,
            Err(e) => self.storage_fatal("getting a snapshot", e),
        };
        if snapshot.is_empty() {
            assert!(requested, "the log is compacted but storage has no snapshot");
            return false;
        }
        let index = snapshot.index();
        let mut message = self.message(MessageType::Snapshot, to);
        message.snapshot = Some(snapshot);
        message.lease_tick = self.tick_count;
        self.msgs.push(message);
        if let Some(progress) = self.tracker.progress.get_mut(&to) {
            progress.become_snapshot(index);
        }
        true
    }

    /// The periodic heartbeat to every member, carrying the newest pending ReadIndex context so one round
    /// confirms reads. With `heartbeats_skip_after_append` and no read waiting, a follower sent an append within
    /// the last heartbeat interval is skipped.
    pub(super) fn tick_heartbeats(&mut self) {
        let context = self.read_only_last_context();
        let recent = self.tick_count.saturating_sub(self.config.heartbeat_interval_ticks);
        let skip_after = (self.config.heartbeats_skip_after_append && context.is_empty()).then_some(recent);
        self.send_heartbeats(context, skip_after);
    }

    pub(crate) fn broadcast_heartbeat_with_context(&mut self, context: Bytes) {
        self.send_heartbeats(context, None);
    }

    /// Heartbeats to every member but those sent an append after leader tick `skip_after` (if given).
    fn send_heartbeats(&mut self, context: Bytes, skip_after: Option<u64>) {
        let peers: Vec<(u64, u64)> = self
            .tracker
            .progress
            .iter()
            .filter(|(id, p)| **id != self.id && skip_after.is_none_or(|after| p.append_sent_tick <= after))
            .map(|(id, p)| (*id, p.matched))
            .collect();
        for (id, matched) in peers {
            let mut heartbeat = self.message(MessageType::Heartbeat, id);
            // Never tell a follower to commit beyond what it is known to hold.
            heartbeat.commit = matched.min(self.raft_log.committed);
            heartbeat.context = context.clone();
            heartbeat.lease_tick = self.tick_count;
            self.msgs.push(heartbeat);
        }
    }

    pub(super) fn handle_append_response(&mut self, m: Message) {
        let last_index = self.raft_log.last_index();
        let first_index = self.raft_log.first_index();
        let Some(progress) = self.tracker.progress.get_mut(&m.from) else { return };
        progress.recent_active = true;
        progress.lease_ack_tick = progress.lease_ack_tick.max(m.lease_tick);
        if m.reject {
            // Fast backtracking: skip every entry of a term the follower does not have, in one step.
            let mut next_probe = m.reject_hint;
            if m.log_term > 0 {
                next_probe = self.raft_log.find_conflict_by_term(m.reject_hint, m.log_term).0;
            }
            let progress = self.tracker.progress.get_mut(&m.from).expect("checked above");
            if progress.maybe_decrease_to(m.index, next_probe) {
                if progress.state == ProgressState::Replicate {
                    progress.become_probe();
                }
                self.maybe_send_append(m.from, true);
            }
            return;
        }
        let was_paused = progress.is_paused();
        if !progress.maybe_update(m.index) {
            return;
        }
        match progress.state {
            ProgressState::Probe => progress.become_replicate(),
            ProgressState::Snapshot if progress.matched + 1 >= first_index => {
                progress.become_probe();
                progress.become_replicate();
            }
            ProgressState::Snapshot => {}
            ProgressState::Replicate => progress.inflights.free_to(m.index),
        }
        let matched = progress.matched;
        let before = self.raft_log.committed;
        if self.maybe_commit() {
            self.after_commit(before);
        } else if was_paused && self.config.commit_broadcast {
            // It may lack the commit index (it was paused): tell it now.
            self.maybe_send_append(m.from, true);
        }
        // Keep the pipeline full.
        while self.maybe_send_append(m.from, false) {}
        if m.from == self.lead_transferee && matched == last_index {
            self.send_timeout_now(m.from);
        }
    }

    pub(super) fn handle_heartbeat_response(&mut self, m: Message) {
        let last_index = self.raft_log.last_index();
        let Some(progress) = self.tracker.progress.get_mut(&m.from) else { return };
        progress.recent_active = true;
        progress.lease_ack_tick = progress.lease_ack_tick.max(m.lease_tick);
        progress.probe_sent = false;
        if progress.state == ProgressState::Replicate && progress.inflights.full() {
            progress.inflights.free_first_one();
        }
        if progress.matched < last_index || progress.state == ProgressState::Probe {
            self.maybe_send_append(m.from, true);
        }
        if !m.context.is_empty() {
            self.confirm_read(m.from, &m.context);
        }
    }
}

impl<S: Storage> Raft<S> {
    /// The caller could not deliver a message to `id`: stop pipelining to it and probe again.
    pub fn report_unreachable(&mut self, id: u64) {
        if self.role != StateRole::Leader {
            return;
        }
        if let Some(progress) = self.tracker.progress.get_mut(&id) {
            if progress.state == ProgressState::Replicate {
                progress.become_probe();
            }
        }
    }

    /// The caller finished (or failed) sending the snapshot the core asked for to `id`. Must be called once for
    /// every snapshot message, whatever its fate: until then the leader sends `id` nothing else.
    pub fn report_snapshot(&mut self, id: u64, success: bool) {
        if self.role != StateRole::Leader {
            return;
        }
        if let Some(progress) = self.tracker.progress.get_mut(&id) {
            if progress.state == ProgressState::Snapshot {
                if !success {
                    progress.pending_snapshot = 0;
                }
                progress.become_probe();
                // Wait for the follower's answer to the snapshot (or the next heartbeat) before probing.
                progress.probe_sent = true;
            }
        }
    }
}
