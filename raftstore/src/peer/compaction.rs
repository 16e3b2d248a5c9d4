//! Log compaction, decided by the replica itself: its log may drop what its state machine has made durable, and
//! — on a leader — what every other replica already holds, but never keeps more than `log_lag_entries_max`
//! entries for a replica that lags (that one catches up by a snapshot stream instead).
//!
//! The node asks ([`Peer::compact_log`], when its state machine made something new durable: `store/log_gc.rs`);
//! the replica answers with a `LogOp::Compact` in its next [`LogWrite`], which goes to the log in order with every
//! other write of the group. Nothing writes into a running replica's log behind it.
//!
//! A follower knows nothing of the others' logs: it keeps only its own margin (below its durable state). Should it
//! lead later, a replica needing entries it dropped gets a snapshot.

use flotilla_engine::contract::{KvEngine, LogOp};

use super::{LogWrite, Peer};

/// Where a log may start: at `lowest` (what every replica holds, as far as this one knows), but no more than
/// `lag_max` entries below the replica's own durable applied index `own`, and never above `own`. The entry at the
/// returned index stays, as a margin: replay after a restart starts after it.
pub(super) fn first_kept_index(lowest: u64, own: u64, lag_max: u64) -> u64 {
    lowest.max(own.saturating_sub(lag_max)).min(own)
}

impl Peer {
    /// Compacts the log below what `kv` holds durably for this group (see the module docs): the compaction goes
    /// out with the next output's log write. Does nothing if nothing would be dropped, or if the entry before the
    /// new start is not in the log yet (a snapshot's record on its way: the next request will do).
    pub fn compact_log(&mut self, kv: &dyn KvEngine) {
        if self.removed || self.storage_failure.is_some() {
            return;
        }
        let group_id = self.group_id();
        let own = kv.durable_applied(group_id).0;
        let lowest = self.raw.matched_min().unwrap_or(own);
        let keep_from = first_kept_index(lowest, own, self.log_lag_entries_max);
        let log = self.raw.raft.raft_log.storage.log();
        if keep_from <= log.first_index(group_id) {
            return;
        }
        let Some(base_term) = log.term(group_id, keep_from - 1) else { return };
        self.compaction = Some(LogOp::Compact { first_kept_index: keep_from, base_term });
    }

    /// Puts a requested compaction into `write` (first: it drops only entries already durable), or into a write of
    /// its own (`ready_number` 0: no Ready waits for it).
    pub(super) fn take_compaction(&mut self, write: &mut Option<LogWrite>) {
        let Some(op) = self.compaction.take() else { return };
        match write {
            Some(write) => write.ops.insert(0, op),
            None => *write = Some(LogWrite { ready_number: 0, ops: vec![op], messages: Vec::new(), prompt: false }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::first_kept_index;

    #[test]
    fn logs_are_kept_for_laggards_only_up_to_the_lag_bound() {
        assert_eq!(first_kept_index(900, 1_000, 10_000), 900, "a replica 100 behind: keep what it needs");
        assert_eq!(
            first_kept_index(5, 50_000, 10_000),
            40_000,
            "one 49,995 behind: compact past it, it gets a snapshot"
        );
        assert_eq!(first_kept_index(1_000, 1_000, 0), 1_000, "all caught up");
        assert_eq!(first_kept_index(7, 3, 10), 3, "never past the node's own durable state");
    }
}
