//! The state machine against a model: applies of many groups, flushes (durable checkpoints) and crashes that lose
//! the memtable. After a crash the data is exactly the last checkpoint's; replaying what the WAL holds after each
//! group's durable applied index brings back exactly the model.

use std::collections::BTreeMap;

use flotilla_engine::redb_sim::SimRedbBackend;
use flotilla_engine::state_machine::{GroupApply, KvOp, StateMachine, StateMachineError, StateMachineOptions};
use proptest::prelude::*;

type Data = BTreeMap<Vec<u8>, Vec<u8>>;

fn apply_to_model(model: &mut Data, apply: &GroupApply) {
    for op in &apply.ops {
        match op {
            KvOp::Put { key, value } => {
                model.insert(key.clone(), value.clone());
            }
            KvOp::Delete { key } => {
                model.remove(key);
            }
        }
    }
}

fn all(machine: &StateMachine) -> Data {
    machine.scan(b"", b"", usize::MAX).unwrap().into_iter().collect()
}

fn random_apply(rng: &mut u64, group: u64, index: u64) -> GroupApply {
    let mut next = |bound: u64| {
        *rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*rng >> 33) % bound
    };
    let ops = (0..1 + next(6))
        .map(|_| {
            // Each group owns the keys with its prefix: ranges are disjoint, as in the store.
            let key = format!("g{group:02}/k{:03}", next(40)).into_bytes();
            if next(4) == 0 {
                KvOp::Delete { key }
            } else {
                KvOp::Put { key, value: format!("v{index}-{}", next(1000)).into_bytes() }
            }
        })
        .collect();
    GroupApply { group_id: group, ops, applied_index: index, applied_term: 1 + index / 10 }
}

/// Installs into `machine` a snapshot of `group`'s range made on another machine from random applies, and updates
/// the model (the range is replaced; the install is durable at once).
fn install_random_snapshot(machine: &StateMachine, rng: &mut u64, group: u64, index: u64, models: [&mut Data; 2]) {
    let source = StateMachine::open_with_backend(SimRedbBackend::new(), StateMachineOptions::default()).unwrap();
    for i in 0..3 {
        source.apply(vec![random_apply(rng, group, index - 2 + i)]).unwrap();
    }
    let (start, end) = (format!("g{group:02}/"), format!("g{group:02}0"));
    let mut reader = source.snapshot_reader(group, start.as_bytes(), end.as_bytes(), 64).unwrap();
    let mut installer = machine.snapshot_installer(group, start.as_bytes(), end.as_bytes()).unwrap();
    while let Some(chunk) = reader.next_chunk().unwrap() {
        installer.receive(&chunk).unwrap();
    }
    assert_eq!(installer.finish().unwrap().0, index);
    let installed = source.scan(start.as_bytes(), end.as_bytes(), usize::MAX).unwrap();
    for model in models {
        model.retain(|key, _| !(key.as_slice() >= start.as_bytes() && key.as_slice() < end.as_bytes()));
        model.extend(installed.iter().cloned());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24), .. ProptestConfig::default() })]

    /// Applies, flushes, compactions (tiny blocks and memtables, so runs, merges and range deletions abound),
    /// snapshot installs and crashes against a model.
    #[test]
    fn crash_recovery_from_the_checkpoint_plus_replay_equals_the_model(
        seed in any::<u64>(),
        steps in 1usize..150,
        memtable_bytes in 64u64..4096,
        block_bytes in 32usize..512,
        fanout in 2usize..5,
        extra_runs in 0usize..6,
    ) {
        let disk = SimRedbBackend::new();
        let options = StateMachineOptions {
            memtable_bytes_max: memtable_bytes,
            block_bytes_max: block_bytes,
            compaction_fanout: fanout,
            runs_max: fanout + extra_runs,
            ..StateMachineOptions::default()
        };
        let mut machine = StateMachine::open_with_backend(disk.clone(), options.clone()).unwrap();
        let mut rng = seed | 1;
        let mut model = Data::new();
        let mut history: Vec<GroupApply> = Vec::new();
        let mut next_index = BTreeMap::new();
        let mut checkpoint = Data::new();
        let mut checkpoint_applied: BTreeMap<u64, u64> = BTreeMap::new();
        for _ in 0..steps {
            rng = rng.rotate_left(11) ^ 0xA076_1D64_78BD_642F;
            match rng % 12 {
                0..=5 => {
                    let batch: Vec<GroupApply> = (0..1 + rng % 3)
                        .map(|i| {
                            let group = (rng >> (8 * i)) % 5 + 1;
                            let index = next_index.entry(group).or_insert(0);
                            *index += 1 + (rng >> 40) % 3;
                            random_apply(&mut rng, group, *index)
                        })
                        .collect();
                    let over_budget = machine.apply(batch.clone()).unwrap();
                    for apply in &batch {
                        apply_to_model(&mut model, apply);
                        history.push(apply.clone());
                    }
                    if over_budget {
                        machine.flush().unwrap();
                        checkpoint = model.clone();
                        checkpoint_applied = next_index.clone();
                    }
                }
                6 => {
                    machine.flush().unwrap();
                    checkpoint = model.clone();
                    checkpoint_applied = next_index.clone();
                }
                7 | 8 => {
                    if rng % 2 == 0 {
                        machine.compact_fully().unwrap();
                        prop_assert!(machine.run_count() <= options.runs_max, "{} runs", machine.run_count());
                    } else {
                        machine.compact().unwrap();
                    }
                }
                9 => {
                    let group = (rng >> 20) % 5 + 1;
                    let index = next_index.entry(group).or_insert(0);
                    *index += 5;
                    let index = *index;
                    install_random_snapshot(&machine, &mut rng, group, index, [&mut model, &mut checkpoint]);
                    checkpoint_applied.insert(group, index);
                }
                _ => {
                    // Power loss: the memtable and everything redb did not sync are gone.
                    disk.power_off();
                    drop(machine);
                    disk.crash();
                    disk.power_on();
                    machine = StateMachine::open_with_backend(disk.clone(), options.clone()).unwrap();
                    let stats = machine.stats().unwrap();
                    prop_assert_eq!(stats.stored_runs, stats.runs, "garbage runs are deleted at open");
                    prop_assert_eq!(&all(&machine), &checkpoint, "after a crash the data is the last checkpoint");
                    for group in next_index.keys() {
                        // Exactly: the WAL below it may be compacted away, so an index too low would lose data.
                        let expected = checkpoint_applied.get(group).copied().unwrap_or(0);
                        prop_assert_eq!(machine.durable_applied(*group).0, expected, "durable applied index of group {}", group);
                    }
                    // The raftstore replays the WAL after each group's durable applied index.
                    let replay: Vec<GroupApply> = history
                        .iter()
                        .filter(|a| a.applied_index > machine.durable_applied(a.group_id).0)
                        .cloned()
                        .collect();
                    for apply in &replay {
                        machine.apply(vec![apply.clone()]).unwrap();
                    }
                }
            }
            prop_assert_eq!(&all(&machine), &model);
            for (key, value) in model.iter().take(5) {
                let stored = machine.get(key).unwrap();
                prop_assert_eq!(stored.as_ref(), Some(value));
            }
            for probe in 0..5u64 {
                let key = format!("g{:02}/k{:03}", probe % 5 + 1, (rng >> (probe * 6)) % 40).into_bytes();
                let stored = machine.get(&key).unwrap();
                prop_assert_eq!(stored.as_ref(), model.get(&key), "point read of {:?}", String::from_utf8_lossy(&key));
            }
        }
        for (group, index) in &next_index {
            prop_assert_eq!(machine.applied(*group).0, *index);
        }
    }
}

#[test]
fn scans_merge_the_memtable_over_redb_with_bounds_limits_and_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let machine = StateMachine::open(&dir.path().join("s.redb"), StateMachineOptions::default()).unwrap();
    let put = |key: &str, value: &str| KvOp::Put { key: key.into(), value: value.into() };
    machine
        .apply(vec![GroupApply { group_id: 1, ops: vec![put("a", "1"), put("b", "1"), put("c", "1"), put("d", "1")], applied_index: 1, applied_term: 1 }])
        .unwrap();
    machine.flush().unwrap();
    machine
        .apply(vec![GroupApply { group_id: 1, ops: vec![put("b", "2"), KvOp::Delete { key: "c".into() }, put("bb", "2")], applied_index: 2, applied_term: 1 }])
        .unwrap();
    let scan = |start: &str, end: &str, limit: usize| -> Vec<(String, String)> {
        machine
            .scan(start.as_bytes(), end.as_bytes(), limit)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    };
    let pairs = |list: &[(&str, &str)]| list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    assert_eq!(scan("", "", 100), pairs(&[("a", "1"), ("b", "2"), ("bb", "2"), ("d", "1")]));
    assert_eq!(scan("b", "d", 100), pairs(&[("b", "2"), ("bb", "2")]));
    assert_eq!(scan("", "", 2), pairs(&[("a", "1"), ("b", "2")]));
    assert_eq!(machine.get(b"c").unwrap(), None, "a deletion in the memtable hides the stored value");
    assert_eq!((machine.applied(1), machine.durable_applied(1)), ((2, 1), (1, 1)));
}

#[test]
fn applying_backwards_is_refused_and_ranges_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let machine = StateMachine::open(&dir.path().join("s.redb"), StateMachineOptions::default()).unwrap();
    machine.apply(vec![GroupApply { group_id: 3, ops: vec![], applied_index: 10, applied_term: 2 }]).unwrap();
    let backwards = machine.apply(vec![GroupApply { group_id: 3, ops: vec![], applied_index: 9, applied_term: 2 }]);
    assert!(matches!(backwards, Err(StateMachineError::Invalid(_))));
    machine.put_range(3, b"descriptor").unwrap();
    assert_eq!(machine.ranges().unwrap(), vec![(3, b"descriptor".to_vec())]);
}

#[test]
fn the_background_flusher_keeps_data_exact_and_memory_bounded() {
    use flotilla_engine::flusher::BackgroundFlusher;
    use std::sync::Arc;
    let disk = SimRedbBackend::new();
    let budget = 4096;
    let machine = Arc::new(
        StateMachine::open_with_backend(
            disk.clone(),
            // Tiny blocks and a low fanout: compactions run on their thread while flushes and applies go on.
            StateMachineOptions { memtable_bytes_max: budget, block_bytes_max: 256, compaction_fanout: 2, runs_max: 4, ..StateMachineOptions::default() },
        )
        .unwrap(),
    );
    let flusher = BackgroundFlusher::start(Arc::clone(&machine));
    let mut model = Data::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut index = 0;
    for _ in 0..2000 {
        index += 1;
        let apply = random_apply(&mut rng, 1 + index % 5, index);
        let over_budget = machine.apply(vec![apply.clone()]).unwrap();
        apply_to_model(&mut model, &apply);
        flusher.after_apply(over_budget).unwrap();
        assert!(machine.memtable_bytes() <= 2 * budget + 1024, "bounded: {} bytes", machine.memtable_bytes());
        assert!(machine.run_count() <= 4 + 1, "runs bounded: {}", machine.run_count());
    }
    assert_eq!(all(&machine), model, "reads during background flushes see every apply");
    flusher.flush_now().unwrap();
    drop(flusher);
    for group in 1..=5 {
        assert_eq!(machine.durable_applied(group), machine.applied(group), "everything durable after flush_now");
    }
    disk.power_off();
    drop(machine);
    disk.crash();
    disk.power_on();
    let machine = StateMachine::open_with_backend(disk, StateMachineOptions::default()).unwrap();
    assert_eq!(all(&machine), model);
}
