//! What a leader knows about one follower's log, and how it paces sending to it.
//!
//! - **Probe**: the leader does not know where the logs match; it sends one append at a time and waits for the
//!   answer (or the next heartbeat response) before sending again.
//! - **Replicate**: the logs match up to `matched`; appends are pipelined optimistically (`next_index` moves on
//!   send), bounded by the [`Inflights`] window.
//! - **Snapshot**: a snapshot at `pending_snapshot` is on its way; nothing else is sent until it is reported.

use crate::inflights::Inflights;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    Probe,
    Replicate,
    Snapshot,
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub matched: u64,
    pub next_index: u64,
    pub state: ProgressState,
    /// In Probe: an append was sent and not yet answered.
    pub probe_sent: bool,
    pub pending_snapshot: u64,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// The newest leader tick this follower has echoed back (see leases in the crate docs).
    pub lease_ack_tick: u64,
    /// The leader tick at which it last sent this follower an append (see `Config::heartbeats_skip_after_append`).
    pub append_sent_tick: u64,
    pub is_learner: bool,
    pub inflights: Inflights,
}

impl Progress {
    pub fn new(next_index: u64, inflight_messages_max: usize, inflight_bytes_max: u64) -> Progress {
        Progress {
            matched: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            pending_snapshot: 0,
            recent_active: false,
            lease_ack_tick: 0,
            append_sent_tick: 0,
            is_learner: false,
            inflights: Inflights::new(inflight_messages_max, inflight_bytes_max),
        }
    }

    fn reset_state(&mut self, state: ProgressState) {
        self.probe_sent = false;
        self.pending_snapshot = 0;
        self.state = state;
        self.inflights.reset();
    }

    pub fn become_probe(&mut self) {
        if self.state == ProgressState::Snapshot {
            let pending = self.pending_snapshot;
            self.reset_state(ProgressState::Probe);
            self.next_index = (self.matched + 1).max(pending + 1);
        } else {
            self.reset_state(ProgressState::Probe);
            self.next_index = self.matched + 1;
        }
    }

    pub fn become_replicate(&mut self) {
        self.reset_state(ProgressState::Replicate);
        self.next_index = self.matched + 1;
    }

    pub fn become_snapshot(&mut self, snapshot_index: u64) {
        self.reset_state(ProgressState::Snapshot);
        self.pending_snapshot = snapshot_index;
    }

    /// The follower acknowledged `index`. Returns whether `matched` moved.
    pub fn maybe_update(&mut self, index: u64) -> bool {
        let updated = self.matched < index;
        if updated {
            self.matched = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(index + 1);
        updated
    }

    /// The follower rejected an append at `rejected`, hinting that the logs may match at `match_hint`. Returns
    /// false for a stale rejection (one answering an append sent before the latest one that was answered).
    pub fn maybe_decrease_to(&mut self, rejected: u64, match_hint: u64) -> bool {
        if self.state == ProgressState::Replicate {
            if rejected <= self.matched {
                return false;
            }
            self.next_index = self.matched + 1;
            return true;
        }
        if self.next_index == 0 || self.next_index - 1 != rejected {
            return false;
        }
        self.next_index = rejected.min(match_hint + 1).max(self.matched + 1);
        self.probe_sent = false;
        true
    }

    /// Whether sending an append must wait.
    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot => true,
        }
    }

    /// Records that an append carrying entries up to `last_index` (`bytes` of them; none if `entry_count` is 0)
    /// was sent.
    pub fn on_append_sent(&mut self, entry_count: usize, last_index: u64, bytes: u64) {
        match self.state {
            ProgressState::Replicate => {
                if entry_count > 0 {
                    self.next_index = last_index + 1;
                    self.inflights.add(last_index, bytes);
                }
            }
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Snapshot => panic!("append sent to a follower waiting for a snapshot"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_backs_off_with_the_hint_and_ignores_stale_rejections() {
        let mut pr = Progress::new(11, 8, 1 << 20);
        pr.on_append_sent(1, 10, 10);
        assert!(pr.is_paused(), "probe sends one at a time");
        assert!(!pr.maybe_decrease_to(5, 2), "rejection of an index we did not send last is stale");
        assert!(pr.maybe_decrease_to(10, 3));
        assert_eq!(pr.next_index, 4);
        assert!(!pr.is_paused());
    }

    #[test]
    fn replicate_pipelines_until_the_window_is_full() {
        let mut pr = Progress::new(1, 2, 1 << 20);
        pr.maybe_update(5);
        pr.become_replicate();
        pr.on_append_sent(3, 8, 30);
        assert_eq!(pr.next_index, 9, "next moves optimistically");
        pr.on_append_sent(2, 10, 20);
        assert!(pr.is_paused());
        assert!(pr.maybe_update(8));
        pr.inflights.free_to(8);
        assert!(!pr.is_paused());
        assert!(!pr.maybe_decrease_to(7, 7), "rejection at or below matched is stale in replicate");
        assert!(pr.maybe_decrease_to(10, 9));
        assert_eq!(pr.next_index, 9);
    }

    #[test]
    fn snapshot_state_pauses_and_probe_resumes_after_it() {
        let mut pr = Progress::new(3, 8, 1 << 20);
        pr.become_snapshot(20);
        assert!(pr.is_paused());
        pr.become_probe();
        assert_eq!(pr.next_index, 21);
    }
}
