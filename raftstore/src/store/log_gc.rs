//! Log housekeeping as the store's own work: every `log_gc_interval`, each replica whose state machine made
//! something new durable since the last pass is asked to compact its log (`PeerMsg::CompactLog`; the replica
//! decides how far, `peer/compaction.rs`, and writes the compaction through its own log writes), then the log
//! engine purges what earlier compactions freed. An idle node costs one read of the state machine's durable
//! generation per pass; 100K idle groups are not visited.

use rustc_hash::FxHashMap;

use flotilla_engine::state_machine::StateMachine;

/// What the last passes saw.
#[derive(Default)]
pub(crate) struct LogGc {
    /// Each group's durable applied index when it was last asked.
    asked_at: FxHashMap<u64, u64>,
    /// The state machine's durable generation at the last full pass.
    generation: Option<u64>,
}

impl LogGc {
    /// One pass over the node's `groups`: `ask(group)` for each whose durable applied index moved since it was last asked
    /// (false: its mailbox is full, ask again next pass). Returns how many were asked.
    pub(crate) fn pass(
        &mut self,
        kv: &StateMachine,
        groups: impl FnOnce() -> Vec<u64>,
        mut ask: impl FnMut(u64) -> bool,
    ) -> usize {
        // Read before the durable states: a flush in between shows as a new generation next time.
        let generation = kv.durable_generation();
        if self.generation == Some(generation) {
            return 0;
        }
        let mut asked = 0;
        let mut finished = true;
        for group_id in groups() {
            let durable = kv.durable_applied(group_id).0;
            if durable == 0 || self.asked_at.get(&group_id) == Some(&durable) {
                continue;
            }
            if ask(group_id) {
                self.asked_at.insert(group_id, durable);
                asked += 1;
            } else {
                finished = false;
            }
        }
        self.generation = finished.then_some(generation);
        asked
    }
}
