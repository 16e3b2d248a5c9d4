//! One model-based suite for every [`KvEngine`]: the redb state machine (tiny memtables and blocks, so runs,
//! compactions and range deletions abound, on a disk that loses unsynced writes) and the in-memory engine.
//! Applies of many groups, flushes (durable checkpoints), snapshot installs and crashes run against a model. After
//! a crash the data is exactly the last checkpoint's (plus finished installs); replaying what the WAL holds after
//! each group's durable applied index brings back exactly the model.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_engine::kv_engine::{KvEngine, MemKvEngine};
use flotilla_engine::redb_sim::SimRedbBackend;
use flotilla_engine::state_machine::{GroupApply, StateMachine, StateMachineOptions};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

mod common;

use common::{all, apply_to_model, random_apply, Data};

/// An engine under test, with what only its kind can do.
trait Subject {
    fn engine(&self) -> &dyn KvEngine;
    /// Storage upkeep between operations (compaction, for the redb engine).
    fn maintain(&self, choice: u64) -> Result<(), TestCaseError>;
    /// A power cut and a restart.
    fn crash_and_reopen(&mut self) -> Result<(), TestCaseError>;
}

struct Redb {
    disk: SimRedbBackend,
    options: StateMachineOptions,
    /// `None` only while crashing.
    machine: Option<StateMachine>,
}

impl Redb {
    fn machine(&self) -> &StateMachine {
        self.machine.as_ref().expect("open")
    }
}

impl Subject for Redb {
    fn engine(&self) -> &dyn KvEngine {
        self.machine()
    }

    fn maintain(&self, choice: u64) -> Result<(), TestCaseError> {
        if choice.is_multiple_of(2) {
            self.machine().compact_fully().unwrap();
            prop_assert!(self.machine().run_count() <= self.options.runs_max, "{} runs", self.machine().run_count());
        } else {
            self.machine().compact().unwrap();
        }
        Ok(())
    }

    fn crash_and_reopen(&mut self) -> Result<(), TestCaseError> {
        // The memtable and everything redb did not sync are gone.
        self.disk.power_off();
        drop(self.machine.take());
        self.disk.crash();
        self.disk.power_on();
        self.machine = Some(StateMachine::open_with_backend(self.disk.clone(), self.options.clone()).unwrap());
        let stats = self.machine().stats().unwrap();
        prop_assert_eq!(stats.stored_runs, stats.runs, "garbage runs are deleted at open");
        Ok(())
    }
}

impl Subject for MemKvEngine {
    fn engine(&self) -> &dyn KvEngine {
        self
    }

    fn maintain(&self, _: u64) -> Result<(), TestCaseError> {
        Ok(())
    }

    fn crash_and_reopen(&mut self) -> Result<(), TestCaseError> {
        self.crash();
        Ok(())
    }
}

/// Installs into `machine` a snapshot of `group`'s range made on another engine from random applies, and updates
/// the model (the range is replaced; the install is durable at once).
/// Descriptors by group, as the model expects `KvEngine::ranges` to report them.
type Ranges = BTreeMap<u64, Vec<u8>>;

fn install_random_snapshot(
    machine: &dyn KvEngine,
    rng: &mut u64,
    group: u64,
    index: u64,
    models: [&mut Data; 2],
    ranges: [&mut Ranges; 2],
) {
    // From the other kind of engine than most subjects: chunks must mean the same to every engine.
    let source = MemKvEngine::new(u64::MAX);
    for i in 0..3 {
        source.apply(vec![random_apply(rng, group, index - 2 + i)]).unwrap();
    }
    let (start, end) = (format!("g{group:02}/"), format!("g{group:02}0"));
    let mut reader = source.snapshot_reader(group, start.as_bytes(), end.as_bytes(), 64).unwrap();
    machine.begin_snapshot_install(group, start.as_bytes(), end.as_bytes()).unwrap();
    while let Some(chunk) = reader.next_chunk().unwrap() {
        machine.receive_snapshot_chunk(group, &chunk).unwrap();
    }
    let range = format!("range of g{group} from the snapshot at {index}").into_bytes();
    assert_eq!(machine.finish_snapshot_install(group, Some(&range)).unwrap().0, index);
    for model in ranges {
        model.insert(group, range.clone());
    }
    let installed = source.scan(start.as_bytes(), end.as_bytes(), usize::MAX).unwrap();
    for model in models {
        model.retain(|key, _| !(key.as_slice() >= start.as_bytes() && key.as_slice() < end.as_bytes()));
        model.extend(installed.iter().cloned());
    }
}

fn run_model(subject: &mut dyn Subject, seed: u64, steps: usize) -> Result<(), TestCaseError> {
    let mut rng = seed | 1;
    let mut model = Data::new();
    let mut history: Vec<GroupApply> = Vec::new();
    let mut next_index = BTreeMap::new();
    let mut checkpoint = Data::new();
    let mut checkpoint_applied: BTreeMap<u64, u64> = BTreeMap::new();
    let (mut ranges, mut checkpoint_ranges) = (Ranges::new(), Ranges::new());
    // Groups whose durable applied state an install set, and groups applied since the last checkpoint.
    let (mut by_install, mut applied_since) = (BTreeSet::new(), BTreeSet::new());
    let checkpointed = |by_install: &mut BTreeSet<u64>, applied_since: &mut BTreeSet<u64>| {
        for group in std::mem::take(applied_since) {
            by_install.remove(&group);
        }
    };
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
                let over_budget = subject.engine().apply(batch.clone()).unwrap();
                for apply in &batch {
                    applied_since.insert(apply.group_id);
                    apply_to_model(&mut model, apply);
                    ranges.extend(apply.range.clone().map(|range| (apply.group_id, range)));
                    history.push(apply.clone());
                }
                if over_budget {
                    subject.engine().flush().unwrap();
                    checkpointed(&mut by_install, &mut applied_since);
                    checkpoint = model.clone();
                    checkpoint_applied = next_index.clone();
                    checkpoint_ranges = ranges.clone();
                }
            }
            6 => {
                subject.engine().flush().unwrap();
                checkpointed(&mut by_install, &mut applied_since);
                checkpoint = model.clone();
                checkpoint_applied = next_index.clone();
                checkpoint_ranges = ranges.clone();
            }
            7 | 8 => subject.maintain(rng >> 30)?,
            9 => {
                let group = (rng >> 20) % 5 + 1;
                let index = next_index.entry(group).or_insert(0);
                *index += 5;
                let index = *index;
                install_random_snapshot(
                    subject.engine(),
                    &mut rng,
                    group,
                    index,
                    [&mut model, &mut checkpoint],
                    [&mut ranges, &mut checkpoint_ranges],
                );
                checkpoint_applied.insert(group, index);
                by_install.insert(group);
                applied_since.remove(&group);
            }
            _ => {
                subject.crash_and_reopen()?;
                prop_assert_eq!(&all(subject.engine()), &checkpoint, "after a crash the data is the last checkpoint");
                let stored: Ranges = subject.engine().ranges().unwrap().into_iter().collect();
                prop_assert_eq!(&stored, &checkpoint_ranges, "and so are the descriptors");
                for group in next_index.keys() {
                    // Exactly: the WAL below it may be compacted away, so an index too low would lose data.
                    let expected = checkpoint_applied.get(group).copied().unwrap_or(0);
                    prop_assert_eq!(
                        subject.engine().durable_applied(*group).0,
                        expected,
                        "durable applied index of group {}",
                        group
                    );
                    prop_assert_eq!(
                        subject.engine().durable_by_install(*group),
                        by_install.contains(group),
                        "how group {}'s was set",
                        group
                    );
                }
                applied_since.clear();
                // The raftstore replays the WAL after each group's durable applied index.
                let replay: Vec<GroupApply> = history
                    .iter()
                    .filter(|a| a.applied_index > subject.engine().durable_applied(a.group_id).0)
                    .cloned()
                    .collect();
                for apply in &replay {
                    subject.engine().apply(vec![apply.clone()]).unwrap();
                    applied_since.insert(apply.group_id);
                }
                // (Replaying restores the descriptors the lost applies had changed.)
                ranges = checkpoint_ranges.clone();
                for apply in &replay {
                    ranges.extend(apply.range.clone().map(|range| (apply.group_id, range)));
                }
            }
        }
        prop_assert_eq!(&all(subject.engine()), &model);
        let reported: Ranges = subject.engine().ranges().unwrap().into_iter().collect();
        prop_assert_eq!(&reported, &ranges, "descriptors as applied");
        for (key, value) in model.iter().take(5) {
            let stored = subject.engine().get(key).unwrap();
            prop_assert_eq!(stored.as_ref(), Some(value));
        }
        for probe in 0..5u64 {
            let key = format!("g{:02}/k{:03}", probe % 5 + 1, (rng >> (probe * 6)) % 40).into_bytes();
            let stored = subject.engine().get(&key).unwrap();
            prop_assert_eq!(stored.as_ref(), model.get(&key), "point read of {:?}", String::from_utf8_lossy(&key));
        }
    }
    for (group, index) in &next_index {
        prop_assert_eq!(subject.engine().applied(*group).0, *index);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24), .. ProptestConfig::default() })]

    #[test]
    fn the_redb_state_machine_conforms(
        seed in any::<u64>(),
        steps in 1usize..150,
        memtable_bytes in 64u64..4096,
        block_bytes in 32usize..512,
        fanout in 2usize..5,
        extra_runs in 0usize..6,
    ) {
        let options = StateMachineOptions {
            memtable_bytes_max: memtable_bytes,
            block_bytes_max: block_bytes,
            compaction_fanout: fanout,
            runs_max: fanout + extra_runs,
            ..StateMachineOptions::default()
        };
        let disk = SimRedbBackend::new();
        let machine = StateMachine::open_with_backend(disk.clone(), options.clone()).unwrap();
        run_model(&mut Redb { disk, options, machine: Some(machine) }, seed, steps)?;
    }

    #[test]
    fn the_in_memory_engine_conforms(seed in any::<u64>(), steps in 1usize..150, pending_bytes in 64u64..4096) {
        run_model(&mut MemKvEngine::new(pending_bytes), seed, steps)?;
    }
}

/// A descriptor stored by `put_range` (a merged group's record) replaces the one an apply not yet checkpointed
/// left for the group: reads show it at once, and neither a later checkpoint nor a crash brings the older back.
fn put_range_replaces_an_unflushed_descriptor(subject: &mut dyn Subject, flush: &dyn Fn(&dyn Subject)) {
    let engine = subject.engine();
    let apply = GroupApply {
        group_id: 7,
        ops: Vec::new(),
        applied_index: 10,
        applied_term: 1,
        range: Some(b"applied".to_vec()),
    };
    engine.apply(vec![apply]).unwrap();
    assert_eq!(engine.range(7).unwrap().as_deref(), Some(&b"applied"[..]));
    engine.put_range(7, b"record").unwrap();
    assert_eq!(engine.range(7).unwrap().as_deref(), Some(&b"record"[..]), "read at once");
    flush(subject);
    assert_eq!(subject.engine().range(7).unwrap().as_deref(), Some(&b"record"[..]), "a checkpoint keeps it");
    subject.crash_and_reopen().unwrap();
    assert_eq!(subject.engine().range(7).unwrap().as_deref(), Some(&b"record"[..]), "so does a crash");
    assert_eq!(subject.engine().ranges().unwrap(), vec![(7, b"record".to_vec())]);
}

#[test]
fn put_range_replaces_an_unflushed_descriptor_in_both_engines() {
    let disk = SimRedbBackend::new();
    let options = StateMachineOptions::default();
    let machine = StateMachine::open_with_backend(disk.clone(), options.clone()).unwrap();
    put_range_replaces_an_unflushed_descriptor(&mut Redb { disk, options, machine: Some(machine) }, &|subject| {
        subject.engine().flush().unwrap()
    });
    put_range_replaces_an_unflushed_descriptor(&mut MemKvEngine::new(1 << 20), &|subject| {
        subject.engine().flush().unwrap()
    });
}
