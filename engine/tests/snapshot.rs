//! Group snapshots: a streamed round trip between two state machines, damage and misuse rejected, and an
//! install that a crash cannot leave half done.

use flotilla_engine::redb_sim::SimRedbBackend;
use flotilla_engine::state_machine::{GroupApply, KvOp, StateMachine, StateMachineError, StateMachineOptions};

fn put(key: String, value: String) -> KvOp {
    KvOp::Put { key: key.into_bytes(), value: value.into_bytes() }
}

/// Groups 1..=3 own "a", "b", "c" prefixed keys; `tag` makes the values of two machines differ.
fn fill(machine: &StateMachine, tag: &str, flush_between: bool) {
    for group in 1..=3u64 {
        let prefix = (b'a' + group as u8 - 1) as char;
        let ops = (0..200).map(|i| put(format!("{prefix}{i:04}"), format!("{tag}-{group}-{i}"))).collect();
        machine
            .apply(vec![GroupApply { group_id: group, ops, applied_index: 10, applied_term: 2, range: None }])
            .unwrap();
        if flush_between && group == 2 {
            machine.flush().unwrap();
        }
    }
    // Some changes only in the memtable, including a deletion.
    machine
        .apply(vec![GroupApply {
            group_id: 2,
            ops: vec![put("b0001".into(), format!("{tag}-late")), KvOp::Delete { key: b"b0002".to_vec() }],
            applied_index: 11,
            applied_term: 2,
            range: None,
        }])
        .unwrap();
}

fn range(machine: &StateMachine, start: &str, end: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    machine.scan(start.as_bytes(), end.as_bytes(), usize::MAX).unwrap()
}

fn stream(
    source: &StateMachine,
    target: &StateMachine,
    group: u64,
    start: &str,
    end: &str,
    chunk_bytes: usize,
) -> (u64, u64) {
    let mut reader = source.snapshot_reader(group, start.as_bytes(), end.as_bytes(), chunk_bytes).unwrap();
    target.begin_snapshot_install(group, start.as_bytes(), end.as_bytes()).unwrap();
    let mut chunks = 0;
    while let Some(chunk) = reader.next_chunk().unwrap() {
        chunks += 1;
        let last = target.receive_snapshot_chunk(group, &chunk).unwrap();
        assert_eq!(last, reader.is_exhausted(), "the last chunk is marked last");
    }
    let applied = target.finish_snapshot_install(group, None).unwrap();
    (chunks, applied.0)
}

#[test]
fn a_streamed_snapshot_replaces_exactly_the_range_and_its_applied_state() {
    let source = StateMachine::open_with_backend(SimRedbBackend::new(), StateMachineOptions::default()).unwrap();
    let target_disk = SimRedbBackend::new();
    let target = StateMachine::open_with_backend(target_disk.clone(), StateMachineOptions::default()).unwrap();
    fill(&source, "new", true);
    fill(&target, "old", false);
    // The target also holds a stray key inside the range that the source does not have.
    target
        .apply(vec![GroupApply {
            group_id: 2,
            ops: vec![put("b9999".into(), "stray".into())],
            applied_index: 12,
            applied_term: 2,
            range: None,
        }])
        .unwrap();
    let (chunks, applied) = stream(&source, &target, 2, "b", "c", 300);
    assert!(chunks >= 10, "small chunks: {chunks}");
    assert_eq!(applied, 11);
    assert_eq!(range(&target, "b", "c"), range(&source, "b", "c"), "the range is the source's, stray key gone");
    assert_eq!(target.applied(2), (11, 2));
    assert!(range(&target, "a", "b").iter().all(|(_, v)| v.starts_with(b"old-")), "other groups untouched");
    assert!(range(&target, "c", "").iter().all(|(_, v)| v.starts_with(b"old-")));
    // Durable: a power cut keeps the installed snapshot.
    target_disk.power_off();
    let expected = range(&source, "b", "c");
    drop(target);
    target_disk.crash();
    target_disk.power_on();
    let target = StateMachine::open_with_backend(target_disk, StateMachineOptions::default()).unwrap();
    assert_eq!(range(&target, "b", "c"), expected);
    assert_eq!(target.durable_applied(2), (11, 2));
}

#[test]
fn point_reads_after_an_install_see_the_installed_range_not_answers_read_before_it() {
    let source = StateMachine::open_with_backend(SimRedbBackend::new(), StateMachineOptions::default()).unwrap();
    let target = StateMachine::open_with_backend(SimRedbBackend::new(), StateMachineOptions::default()).unwrap();
    fill(&source, "new", true);
    fill(&target, "old", true);
    target.flush().unwrap();
    let keys: Vec<String> = (0..200).map(|i| format!("b{i:04}")).chain(["b9999".to_string()]).collect();
    // Every key of the range read twice from the target's runs (its read cache fills with the old answers)...
    for key in keys.iter().chain(&keys) {
        target.get(key.as_bytes()).unwrap();
    }
    // ...then the range is replaced by the source's.
    stream(&source, &target, 2, "b", "c", 4096);
    for key in &keys {
        assert_eq!(target.get(key.as_bytes()).unwrap(), source.get(key.as_bytes()).unwrap(), "{key}");
    }
}

#[test]
fn a_crash_before_finish_leaves_the_old_range_and_damaged_or_misordered_chunks_are_refused() {
    let source = StateMachine::open_with_backend(SimRedbBackend::new(), StateMachineOptions::default()).unwrap();
    let disk = SimRedbBackend::new();
    let target = StateMachine::open_with_backend(disk.clone(), StateMachineOptions::default()).unwrap();
    fill(&source, "new", true);
    fill(&target, "old", true);
    target.flush().unwrap();
    let before = range(&target, "b", "c");
    let mut reader = source.snapshot_reader(2, b"b", b"c", 300).unwrap();
    let first = reader.next_chunk().unwrap().unwrap();
    let second = reader.next_chunk().unwrap().unwrap();
    target.begin_snapshot_install(2, b"b", b"c").unwrap();
    let mut damaged = first.to_vec();
    damaged[10] ^= 4;
    let refused = |result: Result<bool, StateMachineError>, what: &str| matches!(result, Err(StateMachineError::Invalid(e)) if e.contains(what));
    assert!(refused(target.receive_snapshot_chunk(2, &damaged), "checksum"));
    assert!(refused(target.receive_snapshot_chunk(2, &second), "expected 0"));
    assert!(refused(target.receive_snapshot_chunk(3, &first), "no snapshot install"));
    target.begin_snapshot_install(2, b"c", b"d").unwrap(); // abandons the first install
    assert!(refused(target.receive_snapshot_chunk(2, &first), "outside"));
    target.begin_snapshot_install(2, b"b", b"c").unwrap();
    target.receive_snapshot_chunk(2, &first).unwrap();
    target.receive_snapshot_chunk(2, &second).unwrap();
    assert!(target.finish_snapshot_install(2, None).is_err(), "finishing before the last chunk is refused");
    assert_eq!(range(&target, "b", "c"), before, "an unfinished install is invisible");
    // Power cut in the middle of an install: the old range is intact.
    disk.power_off();
    drop(target);
    disk.crash();
    disk.power_on();
    let target = StateMachine::open_with_backend(disk, StateMachineOptions::default()).unwrap();
    assert_eq!(range(&target, "b", "c"), before);
}

#[test]
fn clearing_a_group_drops_its_range_durably_and_keeps_its_descriptor() {
    let disk = SimRedbBackend::new();
    let machine = StateMachine::open_with_backend(disk.clone(), StateMachineOptions::default()).unwrap();
    fill(&machine, "v", true);
    let keys: Vec<String> = (0..200).map(|i| format!("b{i:04}")).collect();
    for key in keys.iter().chain(&keys) {
        machine.get(key.as_bytes()).unwrap(); // (twice: the read cache keeps the runs' answers)
    }
    flotilla_engine::kv_engine::clear_group(&machine, 2, b"b", b"c", b"descriptor without this node").unwrap();
    assert_eq!(range(&machine, "b", "c"), vec![], "the range is empty, memtable and runs alike");
    assert!(keys.iter().all(|key| machine.get(key.as_bytes()).unwrap().is_none()), "point reads too");
    assert_eq!(range(&machine, "a", "b").len(), 200, "other groups untouched");
    assert_eq!(machine.applied(2), (11, 2), "the applied state stays");
    // Durable at once: a power cut right after keeps it cleared.
    disk.power_off();
    drop(machine);
    disk.crash();
    disk.power_on();
    let machine = StateMachine::open_with_backend(disk, StateMachineOptions::default()).unwrap();
    assert_eq!(range(&machine, "b", "c"), vec![]);
    assert_eq!(range(&machine, "a", "b").len(), 200, "group 1's checkpointed data survives");
    assert!(machine.ranges().unwrap().contains(&(2, b"descriptor without this node".to_vec())));
}
