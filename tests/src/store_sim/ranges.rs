//! Ranges in the simulator: what the simulation knows of the key space's ranges (learned from the nodes, as the
//! `Db` rebuilds its table from its nodes' stored ranges), the clients' routing tables that go stale behind
//! splits, the split fault, and the range invariants checked after every step.

use std::collections::HashMap;

use flotilla_raftstore::command::{MergeCommand, MergeStep, Outcome as Applied};
use flotilla_raftstore::meta;
use flotilla_raftstore::range::{RangeDescriptor, SplitRequest};
use flotilla_raftstore::split_trigger::{AskReason, RangeAsk, SplitOptions};
use flotilla_raftstore::store::{Mailboxes, PeerMsg};

use super::{Sim, SimResult};
use crate::sim_rng::SimRng;
use flotilla_raftstore::load_split::LoadSplitOptions;

/// Adds what `range` says to `ranges` (sorted by start, no overlap): it replaces the ranges it overlaps if it is
/// newer than all of them, else it is ignored. Ranges that overlap are of one lineage (a split's parts and the
/// range they came from), so the higher version is the newer; of one group, the later membership.
pub(super) fn learn(ranges: &mut Vec<RangeDescriptor>, range: &RangeDescriptor) {
    let newness = |r: &RangeDescriptor| (r.epoch().version, r.epoch().conf_version);
    if ranges.iter().any(|known| known.overlaps(range) && newness(known) >= newness(range)) {
        return;
    }
    ranges.retain(|known| !known.overlaps(range));
    let at = ranges.partition_point(|known| known.start < range.start);
    ranges.insert(at, range.clone());
}

/// The meta range's table as node's state machine `kv` holds it (empty: no replica of the meta range there).
fn meta_table(kv: &flotilla_engine::state_machine::StateMachine) -> SimResult<Vec<RangeDescriptor>> {
    let (start, end) = meta::lookup_scan(b"");
    let entries = kv.scan(&start, &end, usize::MAX).map_err(|e| format!("reading the meta range's table: {e}"))?;
    Ok(meta::pieces(&entries))
}

/// Whether node's state machine `kv` records group `group_id` as ended by a merge (its replica may still be
/// registered for a moment, on its way out).
pub(super) fn merged_away(kv: &flotilla_engine::state_machine::StateMachine, group_id: u64) -> bool {
    let record = kv.range(group_id).ok().flatten().and_then(|bytes| RangeDescriptor::decode_stored(&bytes).ok());
    record.is_some_and(|record| record.merged_into != 0)
}

/// The split triggers' bounds for a seed: off in some runs; else tiny (a range of a few keys splits by size, a
/// few requests per window make it hot), so that the triggers split ranges all through the faults.
pub(super) fn split_options(rng: &mut SimRng, initial_groups: u64) -> Option<SplitOptions> {
    if rng.chance_per_mille(300) {
        return None;
    }
    let load =
        LoadSplitOptions { requests_per_window_max: 3, hot_windows: 2, samples_max: 16, side_share_min_percent: 25 };
    let size_bytes_max = rng.range(24, 64);
    // Merges of cold ranges with at most a key or two, checked every 50 ticks; in half the runs the initial
    // layout's ranges may merge too.
    let initial_groups = if rng.chance_per_mille(500) { 0 } else { initial_groups };
    Some(SplitOptions {
        size_bytes_max,
        size_check_written_bytes: 16,
        load_window_ticks: 5,
        load,
        merge_size_bytes_max: size_bytes_max / 2,
        merge_cold_ticks: 50,
        initial_groups,
    })
}

/// The range of `table` holding `key`, if any (a table may have holes while a split's parts are being learned).
pub(super) fn route<'a>(table: &'a [RangeDescriptor], key: &[u8]) -> Option<&'a RangeDescriptor> {
    table.iter().find(|range| range.contains(key))
}

impl Sim {
    /// Learns the ranges the running nodes' replicas hold now (a replica created empty holds none yet, one a
    /// merge ended here none any more).
    pub(super) fn refresh_ranges(&mut self) {
        for node in &self.nodes {
            let Some(running) = &node.running else { continue };
            running.store.each_fsm(|group, fsm| {
                let descriptor = fsm.peer().descriptor();
                if descriptor.is_initialized() && !fsm.peer().is_removed() && !merged_away(&running.kv, group) {
                    learn(&mut self.ranges, descriptor);
                }
            });
        }
    }

    /// A merge asked as the `Db` asks it, of a range the simulation knows and its left neighbour on the same
    /// nodes: the left range is locked on its leader, and once locked ([`Sim::take_merge_replies`]) the right
    /// range is frozen on its leader; the groups carry it on (`peer/merge.rs`) — through the faults, to a commit,
    /// or given up (a freeze that never comes, replicas that cannot all confirm in time).
    pub(super) fn merge(&mut self) -> SimResult<()> {
        self.refresh_ranges();
        let pairs: Vec<(u64, u64)> = (self.ranges.windows(2))
            .filter(|pair| pair[0].check_merge(&pair[1]).is_ok())
            .map(|pair| (pair[0].group_id, pair[1].group_id))
            .collect();
        if pairs.is_empty() {
            return Ok(());
        }
        let (left, right) = pairs[self.rng.below(pairs.len() as u64) as usize];
        let Some(right_position) = self.leader_position(right) else { return Ok(()) };
        let Some(right_range) =
            self.running(right_position).store.with_fsm(right, |fsm| fsm.peer().descriptor().clone())
        else {
            return Ok(());
        };
        self.ask_merge(left, right_range)
    }

    /// Locks group `left` for merging `right_range` in, on its leader (the freeze follows the lock's answer).
    fn ask_merge(&mut self, left: u64, right_range: RangeDescriptor) -> SimResult<()> {
        let right = right_range.group_id;
        let Some(left_position) = self.leader_position(left) else { return Ok(()) };
        if self.trace {
            println!("step {} node {}: lock group {left} to merge group {right}", self.step, left_position + 1);
        }
        let prepare = MergeCommand::new(MergeStep::Prepare, None, Some(right_range));
        let (reply, answer) = oneshot::channel();
        let message = PeerMsg::Merge { merge: Box::new(prepare), reply };
        if self.running(left_position).store.mailboxes().send(left, message).is_ok() {
            self.merge_locks.push((answer, right));
            self.report.merges += 1;
        }
        self.drive(left_position)
    }

    /// Freezes the right ranges whose left neighbours were locked for them (on the right group's leader, if one
    /// is known: otherwise the locked range waits, fences and gives up); counts the freezes that applied.
    pub(super) fn take_merge_replies(&mut self) {
        let mut locked = Vec::new();
        self.merge_locks.retain(|(answer, right)| match answer.try_recv() {
            Ok(result) => {
                if let Ok(Applied::Merge { range }) = result {
                    locked.push((*range, *right));
                }
                false
            }
            Err(oneshot::TryRecvError::Empty) => true,
            Err(oneshot::TryRecvError::Disconnected) => false,
        });
        for (left, right) in locked {
            let Some(position) = self.leader_position(right) else { continue };
            if self.trace {
                println!("step {} node {}: freeze group {right} into {:?}", self.step, position + 1, left);
            }
            let freeze = MergeCommand::new(MergeStep::Freeze, Some(left), None);
            let (reply, answer) = oneshot::channel();
            let message = PeerMsg::Merge { merge: Box::new(freeze), reply };
            if self.running(position).store.mailboxes().send(right, message).is_ok() {
                self.merge_freezes.push(answer);
            }
        }
        let mut frozen = 0;
        self.merge_freezes.retain(|answer| match answer.try_recv() {
            Ok(result) => {
                frozen += matches!(result, Ok(Applied::Merge { .. })) as u64;
                false
            }
            Err(oneshot::TryRecvError::Empty) => true,
            Err(oneshot::TryRecvError::Disconnected) => false,
        });
        self.report.merges_frozen += frozen;
    }

    /// Counts the groups the running nodes' records say a merge ended (at the end of a run).
    pub(super) fn count_merged(&mut self) -> SimResult<()> {
        let mut merged = std::collections::BTreeSet::new();
        for node in &self.nodes {
            let Some(running) = &node.running else { continue };
            for (group, bytes) in running.kv.ranges().map_err(|e| e.to_string())? {
                let record = RangeDescriptor::decode_stored(&bytes).map_err(|e| e.to_string())?;
                if record.merged_into != 0 {
                    merged.insert(group);
                }
            }
        }
        self.report.merges_committed = merged.len() as u64;
        Ok(())
    }

    /// What node `position`'s replicas hold, for failure messages: group, version, range, removed.
    pub(super) fn held_by(&self, position: usize) -> String {
        let Some(running) = &self.nodes[position].running else { return "down".into() };
        let mut held = Vec::new();
        running.store.each_fsm(|group, fsm| {
            let d = fsm.peer().descriptor();
            let removed = if fsm.peer().is_removed() { " removed" } else { "" };
            held.push(format!("{group} v{} {:?}..{:?}{removed}", d.epoch().version, d.start, d.end));
        });
        held.join(", ")
    }

    /// The groups the simulation knows of now.
    pub(super) fn group_ids(&self) -> Vec<u64> {
        self.ranges.iter().map(|range| range.group_id).collect()
    }

    /// A group the simulation knows of, at random.
    pub(super) fn any_group(&mut self) -> u64 {
        self.ranges[self.rng.below(self.ranges.len() as u64) as usize].group_id
    }

    /// The version of group `group_id`'s range as the simulation knows it (0: not known).
    pub(super) fn known_version(&self, group_id: u64) -> u64 {
        self.ranges.iter().find(|range| range.group_id == group_id).map_or(0, |range| range.epoch().version)
    }

    /// A split proposed on a leader (as `Db::split_at` does), at one of the clients' keys strictly inside the
    /// range: the keys on its right then move to a new group mid-history, on the same nodes. During faults it may
    /// not complete, or be refused (the epoch moved: another split or a membership change came first).
    pub(super) fn split(&mut self) -> SimResult<()> {
        self.refresh_ranges();
        let group = self.any_group();
        let Some(position) = self.leader_position(group) else { return Ok(()) };
        let Some(range) = self.running(position).store.with_fsm(group, |fsm| fsm.peer().descriptor().clone()) else {
            return Ok(());
        };
        // At a key of the range but its first: each part keeps a key (the keys are sorted).
        let inside: Vec<Vec<u8>> = self.keys.iter().filter(|key| range.contains(key)).skip(1).cloned().collect();
        if inside.is_empty() {
            return Ok(());
        }
        let split_key = inside[self.rng.below(inside.len() as u64) as usize].clone();
        self.propose_split(position, &range, split_key)
    }

    /// The splits the nodes' leaders asked for (the size and load triggers, `split_trigger.rs`), proposed as the
    /// `Db`'s splitter proposes them: on the asking node, with new ids. Only during the faults.
    pub(super) fn take_asks(&mut self) -> SimResult<()> {
        self.confirm_host_publications()?;
        for position in 0..self.nodes.len() {
            let Some(running) = &self.nodes[position].running else { continue };
            let asks: Vec<RangeAsk> = running.asks.try_iter().collect();
            for wanted in asks {
                if wanted.reason == AskReason::Publish {
                    self.publish(position, wanted.range);
                    continue;
                }
                if let AskReason::Merge { into_group_id } = wanted.reason {
                    self.report.merges_asked_by_trigger += 1;
                    if self.faults && self.is_up(position) {
                        self.ask_merge(into_group_id, wanted.range)?;
                    }
                    continue;
                }
                self.report.splits_asked += 1;
                if self.faults && self.is_up(position) {
                    self.propose_split(position, &wanted.range, wanted.split_key)?;
                }
            }
        }
        Ok(())
    }

    /// A publication in the meta range asked by a leader on node `position`, which holds no replica of it:
    /// handed to the meta group's replica on the first running node that has one (lost if none takes it: the
    /// leader asks again), and the leader told once a member's table shows it, as a server's host does.
    fn publish(&mut self, position: usize, range: RangeDescriptor) {
        self.report.publications_by_host += 1;
        // The latest ask of each group's leader on each node.
        self.host_publications.retain(|(at, known)| (*at, known.group_id) != (position, range.group_id));
        if self.host_publications.len() < 64 {
            self.host_publications.push((position, range.clone()));
        }
        let Some(meta) = self.initial.iter().find(|range| range.is_meta()).map(|range| range.group_id) else { return };
        let command = Box::new(flotilla_raftstore::command::Command::publish(range));
        for node in self.nodes.iter().filter_map(|node| node.running.as_ref()) {
            if node.store.mailboxes().send(meta, PeerMsg::Ask { command: command.clone() }).is_ok() {
                return;
            }
        }
    }

    /// Tells the leaders whose publications the host carried that a member's table shows them.
    fn confirm_host_publications(&mut self) -> SimResult<()> {
        if self.host_publications.is_empty() {
            return Ok(());
        }
        let Some(meta) = self.ranges.iter().find(|range| range.is_meta()) else { return Ok(()) };
        let member = self.nodes.iter().find(|node| node.running.is_some() && meta.lists_node(node.id));
        let Some(running) = member.and_then(|node| node.running.as_ref()) else { return Ok(()) };
        let table = meta_table(&running.kv)?;
        let shown = |range: &RangeDescriptor| table.iter().any(|piece| piece == range);
        let (done, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.host_publications).into_iter().partition(|(_, range)| shown(range));
        self.host_publications = waiting;
        for (position, range) in done {
            if let Some(running) = &self.nodes[position].running {
                let _ = running.store.mailboxes().send(range.group_id, PeerMsg::Published { epoch: range.epoch() });
            }
        }
        Ok(())
    }

    /// Proposes a split of `range` at `split_key` on node `position`'s replica, with a new group id and one new
    /// replica id per replica.
    fn propose_split(&mut self, position: usize, range: &RangeDescriptor, split_key: Vec<u8>) -> SimResult<()> {
        let group = range.group_id;
        let right_group_id = self.next_group_id;
        self.next_group_id += 1;
        let right_replica_ids: Vec<u64> = range
            .replicas
            .iter()
            .map(|replica| {
                let replica_id = self.next_replica_id;
                self.next_replica_id += 1;
                self.replica_nodes.insert((right_group_id, replica_id), replica.node_id);
                replica_id
            })
            .collect();
        if self.trace {
            println!(
                "step {} group {group}: node {} proposes a split at {split_key:?} into group {right_group_id} {right_replica_ids:?}",
                self.step, self.nodes[position].id
            );
        }
        // Half of the splits are first led where they are proposed (as the embedded Db's), half by the rotation.
        let led_where_proposed = right_group_id.is_multiple_of(2);
        let split =
            SplitRequest { split_key, right_group_id, right_replica_ids, led_where_proposed, ..Default::default() };
        let (reply, answer) = oneshot::channel();
        if self.running(position).store.mailboxes().send(group, PeerMsg::Split { split, reply }).is_ok() {
            self.split_replies.push(answer);
            self.report.splits += 1;
        }
        self.drive(position)
    }

    /// Counts the splits that applied (answers to split proposals).
    pub(super) fn take_split_replies(&mut self) {
        let mut applied = 0;
        self.split_replies.retain(|answer| match answer.try_recv() {
            Ok(result) => {
                applied += matches!(result, Ok(Applied::Split { .. })) as u64;
                false
            }
            Err(oneshot::TryRecvError::Empty) => true,
            Err(oneshot::TryRecvError::Disconnected) => false,
        });
        self.report.splits_applied += applied;
    }

    /// After the faults: the ranges learned cover the key space exactly once (every split applied completely).
    pub(super) fn check_tiling(&self) -> SimResult<()> {
        let ends = self.ranges.first().map(|r| r.start.is_empty()) == Some(true)
            && self.ranges.last().map(|r| r.end.is_empty()) == Some(true);
        if !ends || self.ranges.windows(2).any(|pair| pair[0].end != pair[1].start) {
            let bounds: Vec<_> = self.ranges.iter().map(|r| (r.group_id, &r.start, &r.end)).collect();
            return Err(format!("the ranges do not cover the key space once: {bounds:?}"));
        }
        Ok(())
    }

    /// The meta range's table on every running node that holds a replica of it: pieces that cover the users'
    /// key space exactly once, whatever publications applied in whatever order (`meta::publish_ops`). Checked
    /// every tenth step (a scan of each node's table).
    pub(super) fn check_meta_tiling(&self) -> SimResult<()> {
        if !self.step.is_multiple_of(10) {
            return Ok(());
        }
        for node in &self.nodes {
            let Some(running) = &node.running else { continue };
            let pieces = meta_table(&running.kv)?;
            if pieces.is_empty() {
                continue; // no replica of the meta range here (yet)
            }
            let mut at: &[u8] = &[];
            for piece in &pieces {
                if piece.start != at || piece.end <= piece.start || !meta::publishable(piece) {
                    return Err(format!(
                        "node {}: the meta range's table does not tile the users' keys: {pieces:?}",
                        node.id
                    ));
                }
                at = &piece.end;
            }
            if at != meta::SYSTEM_KEYS_START {
                return Err(format!("node {}: the meta range's table ends at {at:?}: {pieces:?}", node.id));
            }
        }
        Ok(())
    }

    /// After the faults, once every replica of a group agrees: how the meta range's table differs from the
    /// ranges the groups hold (`None`: it shows each of them exactly).
    pub(super) fn meta_mismatch(&self) -> SimResult<Option<String>> {
        // A member's table (a replica removed from the meta group may keep its last one until it learns).
        let Some(meta) = self.ranges.iter().find(|range| range.is_meta()) else {
            return Ok(Some("no meta range".into()));
        };
        let member = self.nodes.iter().find(|node| node.running.is_some() && meta.lists_node(node.id));
        let Some(running) = member.and_then(|node| node.running.as_ref()) else {
            return Ok(Some(format!("no member of the meta range is running: {meta:?}")));
        };
        let table = meta_table(&running.kv)?;
        let held: Vec<&RangeDescriptor> = self.ranges.iter().filter(|range| !range.is_meta()).collect();
        if table.iter().collect::<Vec<_>>() != held {
            return Ok(Some(format!("the meta range shows {table:?}\nbut the groups hold {held:?}")));
        }
        Ok(None)
    }

    /// Range invariants, over every running node's replicas: replicas of a group at one epoch agree on its range
    /// (a split applies alike everywhere), and on one node no two replicas that hold a range overlap — each key's
    /// data there belongs to one group (a replica that installed the new group's snapshot while the group that
    /// split still held its keys here would have that group's later entries overwrite it).
    pub(super) fn check_ranges(&self) -> SimResult<()> {
        // (group, version) → the first node seen holding it, and its range there.
        let mut seen: HashMap<(u64, u64), (u64, RangeDescriptor)> = HashMap::new();
        for node in &self.nodes {
            let Some(running) = &node.running else { continue };
            let mut held = Vec::new();
            running.store.each_fsm(|group, fsm| {
                let descriptor = fsm.peer().descriptor();
                if descriptor.is_initialized() && !merged_away(&running.kv, group) {
                    held.push(descriptor.clone());
                }
            });
            for (at, range) in held.iter().enumerate() {
                let key = (range.group_id, range.epoch().version);
                let (first, other) = seen.entry(key).or_insert_with(|| (node.id, range.clone()));
                if (&other.start, &other.end) != (&range.start, &range.end) {
                    return Err(format!(
                        "group {} version {}: node {first} holds [{:?}, {:?}), node {} [{:?}, {:?})",
                        key.0, key.1, other.start, other.end, node.id, range.start, range.end
                    ));
                }
                if let Some(other) = held[at + 1..].iter().find(|other| other.overlaps(range)) {
                    return Err(format!(
                        "node {}: groups {} ({:?}) and {} ({:?}) both hold keys of [{:?}, {:?})",
                        node.id,
                        range.group_id,
                        range.epoch(),
                        other.group_id,
                        other.epoch(),
                        range.start,
                        range.end
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_raftstore::range::{initial_ranges, Replica};

    #[test]
    fn newer_ranges_replace_what_they_overlap_and_older_ones_are_ignored() {
        let replicas = [Replica::voter(1, 1)];
        let whole = initial_ranges(1, 1, &replicas).remove(0);
        let split = |range: &RangeDescriptor, key: &[u8], group: u64| {
            let request = SplitRequest {
                split_key: key.to_vec(),
                right_group_id: group,
                right_replica_ids: vec![group],
                ..Default::default()
            };
            range.split(&request).unwrap()
        };
        let (left, right) = split(&whole, b"m", 2);
        let (left_left, left_right) = split(&left, b"f", 3);
        let mut ranges = vec![whole.clone()];
        learn(&mut ranges, &left_left);
        assert_eq!(ranges, vec![left_left.clone()], "a hole until the rest is learned");
        learn(&mut ranges, &whole);
        learn(&mut ranges, &left);
        assert_eq!(ranges, vec![left_left.clone()], "older views are ignored");
        learn(&mut ranges, &right);
        learn(&mut ranges, &left_right);
        assert_eq!(ranges, vec![left_left, left_right, right.clone()]);
        assert_eq!(route(&ranges, b"z"), Some(&right));
        assert_eq!(route(&[], b"z"), None);
    }
}
