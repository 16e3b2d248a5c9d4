//! Log housekeeping as the store's own work: every `log_gc_interval`, each replica whose state machine made
//! something new durable since the last pass is asked to compact its log (`PeerMsg::CompactLog`; the replica
//! decides how far, `peer/compaction.rs`, and writes the compaction through its own log writes), and the log
//! engine purges what the compactions asked in the pass before freed. An idle node costs one read of the state
//! machine's durable generation per pass; 100K idle groups are not visited.

use rustc_hash::FxHashMap;

use flotilla_engine::contract::{KvEngine, LogEngine, WalError};

use super::fsm::PeerMsg;
use super::mailboxes::Mailboxes;

/// What the last passes saw.
pub struct LogGc {
    /// Each group's durable applied index when it was last asked.
    asked_at: FxHashMap<u64, u64>,
    /// The state machine's durable generation at the last pass that asked every group it had to.
    generation: Option<u64>,
    /// Whether the last pass asked any replica to compact (the log is purged in the next pass, behind them; the
    /// first pass purges too, after a restart).
    purge_due: bool,
}

impl Default for LogGc {
    fn default() -> LogGc {
        LogGc { asked_at: FxHashMap::default(), generation: None, purge_due: true }
    }
}

impl LogGc {
    /// One pass: purges `log` down to `bytes_max` if the last pass asked for compactions, then asks each replica
    /// in `mailboxes` whose durable applied index moved since it was last asked (a full mailbox: next pass).
    /// Returns how many were asked; `Err` if the log failed (the node stops through it).
    pub fn pass(
        &mut self,
        kv: &dyn KvEngine,
        log: &dyn LogEngine,
        bytes_max: u64,
        mailboxes: &dyn Mailboxes,
    ) -> Result<usize, WalError> {
        if std::mem::take(&mut self.purge_due) {
            log.purge(bytes_max)?;
        }
        // Read before the durable states: a flush in between shows as a new generation next time.
        let generation = kv.durable_generation();
        if self.generation == Some(generation) {
            return Ok(0);
        }
        let (mut asked, mut finished) = (0, true);
        for group_id in mailboxes.ids() {
            let durable = kv.durable_applied(group_id).0;
            if durable == 0 || self.asked_at.get(&group_id) == Some(&durable) {
                continue;
            }
            if mailboxes.send(group_id, PeerMsg::CompactLog).is_ok() {
                self.asked_at.insert(group_id, durable);
                asked += 1;
            } else {
                finished = false;
            }
        }
        self.generation = finished.then_some(generation);
        self.purge_due = asked > 0;
        Ok(asked)
    }
}
