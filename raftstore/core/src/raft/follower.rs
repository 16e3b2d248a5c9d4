//! A follower's side of replication: accepting appends (§5.3), heartbeats and snapshots (§7). Every response
//! that claims something about the log is held until that log is persisted (see `Raft::send`).

use super::Raft;
use crate::error::{Error, Result};
use crate::message::{Message, MessageType};
use crate::storage::Storage;
use crate::tracker::Configuration;

impl<S: Storage> Raft<S> {
    pub(super) fn handle_append(&mut self, m: Message) -> Result<()> {
        validate_append(&m)?;
        let mut response = self.message(MessageType::AppendResponse, m.from);
        response.lease_tick = m.lease_tick;
        response.request_snapshot = self.snapshot_requested;
        if m.index < self.raft_log.committed {
            // Everything up to our commit index matches the leader's log already.
            response.index = self.raft_log.committed;
            self.send(response);
            return Ok(());
        }
        match self.raft_log.maybe_append(m.index, m.log_term, m.commit, &m.entries) {
            Some(last_new_index) => response.index = last_new_index,
            None => {
                // Fast backtracking: tell the leader the last index where our log could match its log, i.e. the
                // largest index at or below the probed one whose term is at most the probed entry's term.
                let hint = m.index.min(self.raft_log.last_index());
                let (hint_index, hint_term) = self.raft_log.find_conflict_by_term(hint, m.log_term);
                response.index = m.index;
                response.reject = true;
                response.reject_hint = hint_index;
                response.log_term = hint_term;
            }
        }
        self.send(response);
        Ok(())
    }

    /// See [`crate::RawNode::request_snapshot`]. The request goes out at once in a heartbeat response (which claims
    /// nothing about the log), and with every answer to the leader after it until a snapshot is installed.
    pub(crate) fn request_snapshot(&mut self) -> bool {
        if self.role != crate::raft::StateRole::Follower || self.leader_id == 0 {
            return false;
        }
        self.snapshot_requested = true;
        let mut request = self.message(MessageType::HeartbeatResponse, self.leader_id);
        request.request_snapshot = true;
        self.msgs.push(request);
        true
    }

    pub(super) fn handle_heartbeat(&mut self, m: Message) {
        // The leader never sends a commit beyond what it knows we hold; ignore one that is anyway.
        if m.commit <= self.raft_log.last_index() {
            self.raft_log.commit_to(m.commit);
        }
        let mut response = self.message(MessageType::HeartbeatResponse, m.from);
        response.context = m.context;
        response.lease_tick = m.lease_tick;
        response.request_snapshot = self.snapshot_requested;
        self.send(response);
    }

    pub(super) fn handle_snapshot(&mut self, m: Message) -> Result<()> {
        let snapshot = m.snapshot.ok_or(Error::InvalidMessage("snapshot message without a snapshot"))?;
        let mut response = self.message(MessageType::AppendResponse, m.from);
        response.lease_tick = m.lease_tick;
        response.index = self.restore(snapshot).unwrap_or(self.raft_log.committed);
        self.send(response);
        Ok(())
    }

    /// Installs `snapshot` if it is newer than what we have committed. Returns the index the log now matches the
    /// leader's up to, or `None` if it was not needed. A snapshot whose configuration does not include us is
    /// installed too: it predates the change that added us, which follows in the log (we are not promotable until
    /// we apply it).
    ///
    /// A snapshot this replica asked for (`snapshot_requested`: its log is whole, its state is not) is installed
    /// if it is past what it applied, even within what it has committed. Where the log holds the snapshot's entry
    /// durably, only the state is installed and the log is kept (`RaftLog::install_state`): entries after it
    /// that this replica acknowledged must not be lost, and the leader may have counted them. Where the log
    /// differs there, nothing from that entry on was ever committed, and the snapshot replaces the log whole.
    fn restore(&mut self, snapshot: crate::message::Snapshot) -> Option<u64> {
        let (index, term) = (snapshot.index(), snapshot.term());
        let conf_state = snapshot.conf_state();
        let configuration = Configuration::from_conf_state(&conf_state);
        let log = &self.raft_log;
        if self.snapshot_requested {
            if index <= log.applied {
                self.snapshot_requested = false; // its state reaches the snapshot already
                return None;
            }
            if log.match_term(index, term) {
                if index > log.persisted || log.applying != log.applied {
                    return None; // once its entry is durable and nothing is out for applying (the leader retries)
                }
                self.raft_log.install_state(snapshot);
                self.snapshot_requested = false;
                let next_index = self.raft_log.last_index() + 1;
                self.tracker.apply_configuration(configuration, next_index);
                return Some(index);
            }
        } else {
            if index <= log.committed {
                return None;
            }
            if log.match_term(index, term) {
                // We already have the entries; the snapshot only tells us they are committed.
                self.raft_log.commit_to(index);
                return None;
            }
        }
        self.raft_log.restore(snapshot);
        self.snapshot_requested = false;
        let next_index = self.raft_log.last_index() + 1;
        self.tracker.apply_configuration(configuration, next_index);
        Some(self.raft_log.last_index())
    }
}

/// Rejects appends whose entries do not follow `index` contiguously with non-decreasing terms up to the
/// message's term: such a message can only come from a bug or corruption, and accepting it would break the log.
fn validate_append(m: &Message) -> Result<()> {
    let mut previous_term = m.log_term;
    for (expected_index, entry) in (m.index + 1..).zip(&m.entries) {
        if entry.index != expected_index || entry.term < previous_term || entry.term > m.term {
            return Err(Error::InvalidMessage("append entries not contiguous or with impossible terms"));
        }
        previous_term = entry.term;
    }
    Ok(())
}
