//! Applying committed entries, in log order: commands into one state machine batch (`command::ApplyBatch`, many
//! entries and many groups per write), membership changes to the core and the range descriptor as they come
//! (`conf_change.rs`), the descriptor riding in the same batch so that on disk it always matches the applied index.

use flotilla_engine::contract::{GroupApply, KvEngine};
use flotilla_raft::Entry;

use super::Peer;
use crate::command::{Applied, ApplyBatch, ApplyError};

impl Peer {
    /// Applies committed `entries` (from this peer's output, in order): commands into one state machine batch,
    /// membership changes to the core and the descriptor as they come, splits to the descriptor (the groups they
    /// make follow this group's batch). Hand the batches to `KvEngine::apply` together, then report
    /// [`Peer::on_applied`] with the outcomes.
    pub fn apply_committed(
        &mut self,
        kv: &dyn KvEngine,
        entries: &[Entry],
    ) -> Result<(Vec<GroupApply>, Vec<Applied>), ApplyError> {
        let mut batch = ApplyBatch::new(self.group_id());
        let merge_before = (self.descriptor.merge, self.descriptor.merge_lock);
        let mut start = 0;
        for (position, entry) in entries.iter().enumerate().filter(|(_, entry)| entry.is_conf_change()) {
            batch.apply(kv, &mut self.descriptor, &entries[start..position])?;
            if batch.stopped() {
                break;
            }
            batch.apply(kv, &mut self.descriptor, std::slice::from_ref(entry))?; // moves the applied index
            if batch.stopped() {
                break; // (after a merge decision)
            }
            let applied = self.apply_membership_entry(entry)?;
            batch.applied.push(applied);
            batch.group.range = Some(self.descriptor.encode());
            start = position + 1;
        }
        if !batch.stopped() {
            batch.apply(kv, &mut self.descriptor, &entries[start..])?;
        }
        if let Some(index) = batch.held_after_decision.take() {
            // Decided for a merge: what follows its decision goes back to the core, held (`merge.rs`).
            self.raw.hand_back(index);
            self.raw.hold_apply(true);
        }
        if let Some((index, right)) = batch.waits_at.take() {
            // A merge commit whose right range's replica here has not applied the decision yet (its log holds
            // it, but it has not heard that it committed; or a restarted node applies its groups' logs again in no
            // set order). It and what follows go back to the core, held until that replica applied it (`merge.rs`
            // tells it the decision committed, and lets them go).
            self.raw.hand_back(index);
            self.raw.hold_apply(true);
            self.merge.commit_waits_for = Some(right);
            self.merge.commit_wait_told = false;
        }
        // The claims here follow, in log order: a merge commit, then (its lock gone) perhaps a split that gives a
        // new group keys the merged group held (`store-sim` seed 200 applied both in one batch).
        if !batch.merged.is_empty() {
            // The right ranges' claims go to this group, in one step with its growing (`range_claims.rs`).
            self.claims.merge(&self.descriptor, &batch.merged);
            self.merged_away.append(&mut batch.merged);
        }
        let merge_changed = (self.descriptor.merge, self.descriptor.merge_lock) != merge_before;
        if !batch.split_off.is_empty() {
            // The new groups' parts are claimed here in one step with this group's shrinking; one whose group
            // claimed them first (its snapshot came before the split) is not created again (`range_claims.rs`).
            let rights: Vec<&crate::range::RangeDescriptor> = batch.split_off.iter().map(|s| &s.range).collect();
            let mut claimed = self.claims.split(&self.descriptor, &rights).into_iter();
            batch.split_off.retain(|_| claimed.next().expect("one answer per new group"));
        } else if merge_changed {
            self.claims.hold(&self.descriptor); // a freeze decided (or undone) changes what an install may end
        }
        // A merge's next step waits on every replica applying this one (`merge.rs`): `on_applied` tells them it
        // committed at once, not at the next heartbeat.
        self.merge_step_applied |= merge_changed;
        let (applied, split_off) = batch.finish_with_splits();
        self.split_off.extend(split_off);
        Ok(applied)
    }

    /// The groups whose replicas here merges ended since the last call (this group took them in, by a commit
    /// applied or a snapshot installed): the node stops them (their records are written).
    pub fn take_merged_away(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.merged_away)
    }

    /// The groups of the ranges splits applied here gave away and [`Peer::take_split_off`] has not taken yet.
    pub fn split_off_groups(&self) -> impl Iterator<Item = u64> + '_ {
        self.split_off.iter().map(|split_off| split_off.range.group_id)
    }

    /// The ranges splits applied here gave to new groups since the last call, in log order: the node opens a
    /// replica of each (its first state is in the state machine, written with the split's batch).
    pub fn take_split_off(&mut self) -> Vec<crate::command::SplitOff> {
        std::mem::take(&mut self.split_off)
    }
}
