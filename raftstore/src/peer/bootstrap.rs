//! Readying the engines before a node opens its replicas ([`prepare_groups`]).
//!
//! **Bootstrap.** A fresh group does not start from an empty log: its replicas start from a snapshot at
//! [`BOOTSTRAP_INDEX`] of [`BOOTSTRAP_TERM`] holding its initial configuration (the range descriptor), as TiKV
//! does. A replica created later for a membership change starts empty, so no append from the start of a log can
//! ever match its log — replaying membership changes onto an empty configuration would build the wrong one — and
//! the leader catches it up by snapshot instead.
//!
//! **Repair.** The state machine is written before the log, both when bootstrapping and when installing a
//! snapshot (`snapshot.rs`). A crash between the two leaves a log without the entry at the state machine's
//! applied index; the log then restarts at that index, with a hard state whose term and commit cover it.
//!
//! Both are batched over all groups of a node: one state machine checkpoint, log writes submitted together and
//! waited for once.
//!
//! **Destroy** ([`destroy_replica`]), the other end of a replica's life: once it applied its own removal, its
//! range's data is dropped (durably, keeping its descriptor — which no longer lists the node — as the record that
//! the node held the group) and its log entries are compacted away. A crash between the removal's apply and the
//! end of the destroy is finished at the next open ([`finish_interrupted_destroys`]): a completed destroy leaves
//! no log entries, so a group whose stored descriptor does not list the node but whose log still holds entries
//! is one whose destroy did not finish.

use flotilla_engine::contract::{GroupApply, KvEngine, LogEngine, LogOp, WriteRequest};
use flotilla_raft::{Error, HardState, StorageError};

use crate::range::RangeDescriptor;

/// The vote of a replica that may not vote in its term: no replica has this id.
pub const VOTED_FOR_NO_ONE: u64 = u64::MAX;

/// The index and term of the snapshot every fresh group starts from.
pub const BOOTSTRAP_INDEX: u64 = 5;
pub const BOOTSTRAP_TERM: u64 = 5;

fn storage_error(what: String) -> Error {
    Error::Storage(StorageError::Other(what))
}

/// Bootstraps the fresh groups among `ranges` (initialized descriptors the state machine has never applied; a
/// fresh meta range's table is the other ranges of `ranges`, which are then the initial layout) and
/// repairs every log that lacks its state machine's applied entry. Run before opening the groups' replicas.
pub fn prepare_groups(log: &dyn LogEngine, kv: &dyn KvEngine, ranges: &[RangeDescriptor]) -> Result<(), Error> {
    prepare(log, kv, ranges, None).map(|_| ())
}

/// [`prepare_groups`] for the new group a split made here (its first state already in the state machine). If its
/// log begins here and holds no vote of a later term, the log begins in the term after [`BOOTSTRAP_TERM`] with a
/// vote for `appointee` (the replica the split appoints its first leader, the same on every replica: see
/// `RawNode::lead_as_appointed`). Returns whether the log began so with this call — only then may the appointee
/// lead without an election (a restarted one may have led that term already).
pub fn prepare_split_group(
    log: &dyn LogEngine,
    kv: &dyn KvEngine,
    range: &RangeDescriptor,
    appointee: Option<u64>,
) -> Result<bool, Error> {
    prepare(log, kv, std::slice::from_ref(range), appointee).map(|appointed| appointed > 0)
}

/// Returns how many logs began with a vote for `appointee`.
fn prepare(
    log: &dyn LogEngine,
    kv: &dyn KvEngine,
    ranges: &[RangeDescriptor],
    appointee: Option<u64>,
) -> Result<usize, Error> {
    let fresh: Vec<GroupApply> = ranges
        .iter()
        .filter(|range| {
            !range.replicas.is_empty() && kv.applied(range.group_id) == (0, 0) && log.last_index(range.group_id) == 0
        })
        .map(|range| GroupApply {
            group_id: range.group_id,
            // The meta range starts with its table of the other ranges (a new cluster's layout, the same on every
            // node: `meta.rs`).
            ops: if range.is_meta() { crate::meta::initial_ops(ranges) } else { Vec::new() },
            applied_index: BOOTSTRAP_INDEX,
            applied_term: BOOTSTRAP_TERM,
            range: Some(range.encode()),
        })
        .collect();
    let fresh_ids: Vec<u64> = fresh.iter().map(|group| group.group_id).collect();
    if !fresh.is_empty() {
        kv.apply(fresh).map_err(|e| storage_error(format!("bootstrapping groups: {e}")))?;
        kv.flush().map_err(|e| storage_error(format!("bootstrapping groups: {e}")))?;
    }
    let (reply, done) = crossbeam_channel::unbounded();
    let (mut waiting, mut appointed_count) = (0, 0);
    for range in ranges {
        let group_id = range.group_id;
        let (index, term) = kv.applied(group_id);
        if index == 0 || log.term(group_id, index) == Some(term) {
            continue;
        }
        // The log does not hold the applied entry. Fine after a snapshot install (the state machine's finished
        // first, the log's record of it was lost with the crash) or a bootstrap the crash cut short (an empty log
        // at the bootstrap index). Otherwise the log once held it — entries are applied only once durable in the
        // log, and compaction keeps the entry at the applied index — so the WAL lost acknowledged entries.
        let interrupted_bootstrap = index == BOOTSTRAP_INDEX && log.last_index(group_id) == 0;
        if !kv.durable_by_install(group_id) && !interrupted_bootstrap {
            return Err(storage_error(format!(
                "corruption: group {group_id}'s state machine has applied entry {index} (term {term}), but its log ends at \
                 {} without it: the WAL lost acknowledged entries (docs/wal-format.md)",
                log.last_index(group_id)
            )));
        }
        let hard_state = log.hard_state(group_id);
        // A group whose first state was made before this call — a split's new group, or a bootstrap a crash
        // interrupted — begins its log in the term after the bootstrap term, with its vote in that term cast:
        // for the split's appointee (who may then lead it without an election), or, where this call cannot know
        // the appointee (a restart that finds a split's new group in the state machine but its log never
        // begun), for no one. So no replica of a split's group ever campaigns for the appointee's term: a
        // replica left in the bootstrap term could win it with another such replica's vote, a second leader.
        let first_term = BOOTSTRAP_TERM + 1;
        let made_before = interrupted_bootstrap && !fresh_ids.contains(&group_id);
        let hard_state = if made_before && hard_state.term < first_term {
            appointed_count += usize::from(appointee.is_some());
            HardState { term: first_term, vote: appointee.unwrap_or(VOTED_FOR_NO_ONE), commit: index }
        } else if hard_state.term >= term {
            HardState { commit: hard_state.commit.max(index), ..hard_state }
        } else {
            HardState { term, vote: 0, commit: hard_state.commit.max(index) }
        };
        let ops = vec![LogOp::Snapshot { index, term }, LogOp::HardState(hard_state)];
        log.submit(WriteRequest::new(group_id, 0, ops, reply.clone()))
            .map_err(|e| storage_error(format!("restarting group {group_id}'s log at {index}: {e}")))?;
        waiting += 1;
    }
    for _ in 0..waiting {
        done.recv().map_err(|e| storage_error(format!("restarting logs: {e}")))?;
    }
    Ok(appointed_count)
}

/// Drops the data and the log entries of a replica removed from `descriptor`'s group (which it no longer
/// lists). The replica must be stopped first.
pub fn destroy_replica(log: &dyn LogEngine, kv: &dyn KvEngine, descriptor: &RangeDescriptor) -> Result<(), Error> {
    let group_id = descriptor.group_id;
    flotilla_engine::contract::clear_group(kv, group_id, &descriptor.start, &descriptor.end, &descriptor.encode())
        .map_err(|e| storage_error(format!("clearing group {group_id}'s data: {e}")))?;
    drop_log(log, group_id)
}

/// Drops the log entries of a group's replica that stopped here (removed, or merged away: its data stays, the
/// group that took its keys serves it).
pub fn drop_log(log: &dyn LogEngine, group_id: u64) -> Result<(), Error> {
    // Writes the replica submitted before it stopped may still be queued in the log, ahead of this compaction
    // (the log takes requests in order): once it is done they are too, and a second round drops what they added.
    // (Bounded: a destroy left unfinished is finished at the next open, `finish_interrupted_destroys`.)
    for _round in 0..3 {
        let last = log.last_index(group_id);
        let Some(base_term) = log.term(group_id, last).filter(|_| last >= log.first_index(group_id)) else {
            return Ok(());
        };
        let (reply, done) = crossbeam_channel::bounded(1);
        let ops = vec![LogOp::Compact { first_kept_index: last + 1, base_term }];
        log.submit(WriteRequest::new(group_id, 0, ops, reply))
            .map_err(|e| storage_error(format!("dropping group {group_id}'s log: {e}")))?;
        done.recv().map_err(|e| storage_error(format!("dropping group {group_id}'s log: {e}")))?;
    }
    Ok(())
}

/// Finishes the destroys a crash interrupted on node `node_id` (see the module docs); returns how many. Run it
/// before opening the node's replicas.
pub fn finish_interrupted_destroys(node_id: u64, log: &dyn LogEngine, kv: &dyn KvEngine) -> Result<usize, Error> {
    let mut finished = 0;
    for (group_id, bytes) in kv.ranges().map_err(|e| storage_error(format!("reading the stored ranges: {e}")))? {
        let descriptor = RangeDescriptor::decode_stored(&bytes)
            .map_err(|e| storage_error(format!("group {group_id}'s stored range: {e}")))?;
        let left = !descriptor.replicas.is_empty() && !descriptor.lists_node(node_id);
        let logged = log.last_index(group_id) >= log.first_index(group_id);
        if left && logged {
            destroy_replica(log, kv, &descriptor)?;
            finished += 1;
        } else if descriptor.merged_into != 0 && logged {
            drop_log(log, group_id)?; // merged away: the data is the other group's now
            finished += 1;
        }
    }
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use flotilla_engine::contract::KvOp;
    use flotilla_engine::kv_engine::MemKvEngine;
    use flotilla_engine::log_engine::MemLogEngine;

    use super::*;
    use crate::range::{initial_ranges, Replica};

    fn ranges() -> Vec<RangeDescriptor> {
        let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
        initial_ranges(2, 1, &replicas)
    }

    fn assert_starts_at_bootstrap(log: &MemLogEngine, group_id: u64) {
        assert_eq!(
            (log.first_index(group_id), log.term(group_id, BOOTSTRAP_INDEX)),
            (BOOTSTRAP_INDEX + 1, Some(BOOTSTRAP_TERM))
        );
        assert_eq!(log.hard_state(group_id), HardState { term: BOOTSTRAP_TERM, vote: 0, commit: BOOTSTRAP_INDEX });
    }

    #[test]
    fn fresh_groups_start_from_the_bootstrap_snapshot_and_an_interrupted_bootstrap_is_finished() {
        let (log, kv) = (MemLogEngine::new(), MemKvEngine::new(u64::MAX));
        prepare_groups(&log, &kv, &ranges()).unwrap();
        for range in ranges() {
            assert_eq!(kv.durable_applied(range.group_id), (BOOTSTRAP_INDEX, BOOTSTRAP_TERM));
            assert_starts_at_bootstrap(&log, range.group_id);
        }
        let stored: Vec<u64> = kv.ranges().unwrap().into_iter().map(|(group, _)| group).collect();
        assert_eq!(
            stored,
            ranges().iter().map(|r| r.group_id).collect::<Vec<_>>(),
            "descriptors stored with the bootstrap"
        );
        // A crash after the state machine's bootstrap, before the log's: the log is restarted at the next open, in
        // the next term with its vote there cast for no one (the group may be a split's, whose first term is
        // its appointee's: see `prepare`).
        let empty_log = MemLogEngine::new();
        prepare_groups(&empty_log, &kv, &ranges()).unwrap();
        let group_id = ranges()[0].group_id;
        assert_eq!(empty_log.term(group_id, BOOTSTRAP_INDEX), Some(BOOTSTRAP_TERM));
        let first_term = HardState { term: BOOTSTRAP_TERM + 1, vote: VOTED_FOR_NO_ONE, commit: BOOTSTRAP_INDEX };
        assert_eq!(empty_log.hard_state(group_id), first_term);
        // An uninitialized replica (no replicas known yet: it waits for a snapshot) is left alone.
        let uninitialized = RangeDescriptor { group_id: 77, ..RangeDescriptor::default() };
        prepare_groups(&log, &kv, &[uninitialized]).unwrap();
        assert_eq!((kv.applied(77), log.last_index(77)), ((0, 0), 0));
    }

    #[test]
    fn a_splits_new_group_begins_its_log_with_a_vote_for_its_appointee_once() {
        let (log, kv) = (MemLogEngine::new(), MemKvEngine::new(u64::MAX));
        let [left, right] = <[RangeDescriptor; 2]>::try_from(ranges()).unwrap();
        prepare_groups(&log, &kv, std::slice::from_ref(&left)).unwrap();
        // The split wrote the new group's first state (as `ApplyBatch` does), not its log.
        let first = GroupApply {
            group_id: right.group_id,
            ops: Vec::new(),
            applied_index: BOOTSTRAP_INDEX,
            applied_term: BOOTSTRAP_TERM,
            range: Some(right.encode()),
        };
        kv.apply(vec![first]).unwrap();
        assert!(prepare_split_group(&log, &kv, &right, Some(2)).unwrap(), "its log begins here");
        let appointed = HardState { term: BOOTSTRAP_TERM + 1, vote: 2, commit: BOOTSTRAP_INDEX };
        assert_eq!(log.hard_state(right.group_id), appointed);
        // Reopened over that log (the split applied again after a crash): nothing begins, the appointee must not
        // lead the term again.
        assert!(!prepare_split_group(&log, &kv, &right, Some(2)).unwrap());
        assert_eq!(log.hard_state(right.group_id), appointed);
        // A replica whose log already holds a vote of a later term (an empty replica a candidate's request
        // created) keeps it.
        let (later_log, later) = (MemLogEngine::new(), HardState { term: 7, vote: 3, commit: 0 });
        let (reply, done) = crossbeam_channel::bounded(1);
        later_log.submit(WriteRequest::new(right.group_id, 1, vec![LogOp::HardState(later)], reply)).unwrap();
        done.recv().unwrap();
        assert!(!prepare_split_group(&later_log, &kv, &right, Some(2)).unwrap());
        assert_eq!(later_log.hard_state(right.group_id), HardState { commit: BOOTSTRAP_INDEX, ..later });
    }

    #[test]
    fn a_log_that_ends_below_the_applied_entry_is_corruption_unless_an_install_or_bootstrap_explains_it() {
        let (log, kv) = (MemLogEngine::new(), MemKvEngine::new(u64::MAX));
        let group = ranges()[0].clone();
        prepare_groups(&log, &kv, std::slice::from_ref(&group)).unwrap();
        // Entries 6..=8 applied and checkpointed; then the WAL loses them (a fresh log engine: every record gone).
        let entries: Vec<flotilla_raft::Entry> =
            (6..=8).map(|index| flotilla_raft::Entry { index, term: 6, ..Default::default() }).collect();
        let (reply, done) = crossbeam_channel::bounded(1);
        log.submit(WriteRequest::new(group.group_id, 1, vec![LogOp::Append(entries)], reply)).unwrap();
        done.recv().unwrap();
        kv.apply(vec![GroupApply {
            group_id: group.group_id,
            ops: vec![],
            applied_index: 8,
            applied_term: 6,
            range: None,
        }])
        .unwrap();
        kv.flush().unwrap();
        let lost = MemLogEngine::new();
        let error = prepare_groups(&lost, &kv, std::slice::from_ref(&group)).unwrap_err();
        assert!(format!("{error:?}").contains("the WAL lost acknowledged entries"), "{error:?}");
        // The same gap after a snapshot install (state machine first, log record lost with the crash): restarted.
        kv.begin_snapshot_install(group.group_id, &group.start, &group.end).unwrap();
        let body = flotilla_engine::snapshot::SnapshotChunkBody {
            group_id: group.group_id,
            last: true,
            applied_index: 20,
            applied_term: 7,
            ..Default::default()
        };
        kv.receive_snapshot_chunk(group.group_id, &flotilla_engine::snapshot::encode_chunk(&body)).unwrap();
        kv.finish_snapshot_install(group.group_id, None).unwrap();
        prepare_groups(&lost, &kv, std::slice::from_ref(&group)).unwrap();
        assert_eq!(lost.term(group.group_id, 20), Some(7), "the log restarts at the install");
    }

    #[test]
    fn a_destroy_a_crash_interrupted_is_finished_at_open_and_a_finished_one_is_left_alone() {
        let (log, kv) = (MemLogEngine::new(), MemKvEngine::new(u64::MAX));
        let [kept, left] = <[RangeDescriptor; 2]>::try_from(ranges()).unwrap();
        prepare_groups(&log, &kv, &[kept.clone(), left.clone()]).unwrap();
        // Node 3 applied its removal from `left` (the new descriptor is durable with a key of the range) and
        // crashed before destroying the replica: the data and the log entries are still there.
        let without_3 = RangeDescriptor {
            replicas: left.replicas.iter().filter(|r| r.node_id != 3).cloned().collect(),
            ..left.clone()
        };
        let key = [left.start.clone(), b"k".to_vec()].concat();
        let ops = vec![KvOp::Put { key: key.clone(), value: b"v".to_vec() }];
        kv.apply(vec![GroupApply {
            group_id: left.group_id,
            ops,
            applied_index: BOOTSTRAP_INDEX,
            applied_term: BOOTSTRAP_TERM,
            range: Some(without_3.encode()),
        }])
        .unwrap();
        kv.flush().unwrap();
        let entries = (BOOTSTRAP_INDEX + 1..=BOOTSTRAP_INDEX + 3)
            .map(|index| flotilla_raft::Entry { index, term: BOOTSTRAP_TERM + 1, ..Default::default() })
            .collect();
        let (reply, done) = crossbeam_channel::bounded(1);
        log.submit(WriteRequest::new(left.group_id, 1, vec![LogOp::Append(entries)], reply)).unwrap();
        done.recv().unwrap();
        assert_eq!(finish_interrupted_destroys(3, &log, &kv).unwrap(), 1, "the interrupted destroy is finished");
        assert_eq!(kv.get(&key).unwrap(), None, "its data is gone");
        assert!(log.first_index(left.group_id) > log.last_index(left.group_id), "and its log");
        assert_eq!(log.last_index(kept.group_id), BOOTSTRAP_INDEX, "the group node 3 still holds is untouched");
        assert_eq!(finish_interrupted_destroys(3, &log, &kv).unwrap(), 0, "a finished destroy is left alone");
        assert_eq!(
            finish_interrupted_destroys(1, &log, &kv).unwrap(),
            0,
            "nodes the descriptors list keep their groups"
        );
    }
}
