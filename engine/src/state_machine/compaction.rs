//! Compaction: merging runs so that reads touch few of them and overwritten or deleted data is dropped.
//!
//! **Policy (size-tiered).** A run's *class* is its size on a logarithmic scale: class `c` holds runs of
//! `memtable_bytes_max / 2 * fanout^c` up to `fanout` times that. When `fanout` runs of one class are adjacent in
//! age they are merged into one run of about the next class, so every byte is rewritten about
//! `log_fanout(data / memtable)` times (measured in `docs/benchmarks.md`) and at most about `fanout - 1` runs of
//! each class exist. Beyond `runs_max` runs (classes out of order, e.g. after snapshot installs) the two adjacent
//! runs with the fewest bytes are merged.
//!
//! **Execution.** The inputs are adjacent in age, so the output takes the newest input's `seq` and nothing in
//! between can be shadowed wrongly. The merge reads one redb read transaction (a fixed view) and writes the output
//! over several write transactions of `COMPACTION_TXN_BYTES` each, so a flush waits for at most one of them. The
//! last transaction records the output run and removes the inputs' records in one step; the inputs' blocks are
//! deleted later, once no reader's version refers to them. A crash before that last step leaves an output without
//! a record: garbage, deleted at open. A compaction that includes the oldest run (a *bottom* one) drops deletions
//! and the range deletions that only concerned its inputs.

use std::sync::Arc;

use redb::{Durability, ReadableDatabase};

use super::{storage, StateMachine, StateMachineError};
use crate::lsm::merge::{Input, Merge};
use crate::lsm::run::{Run, RunCursor, RunWriter, RUNS, RUN_BLOCKS};
use crate::lsm::version::{Contents, Version, RANGE_TOMBSTONES};

/// Bytes of output blocks per compaction write transaction.
const COMPACTION_TXN_BYTES: usize = 8 << 20;

/// Adjacent runs to merge, newest first.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) inputs: Vec<Arc<Run>>,
    /// Whether the inputs include the oldest run.
    pub(crate) bottom: bool,
}

fn class(bytes: u64, base_bytes: u64, fanout: u64) -> u32 {
    let mut limit = (base_bytes / 2).max(1).saturating_mul(fanout);
    let mut class = 0;
    while bytes >= limit {
        class += 1;
        limit = limit.saturating_mul(fanout);
    }
    class
}

/// What to compact next in `version`, if anything.
pub(crate) fn pick(version: &Version, base_bytes: u64, fanout: usize, runs_max: usize) -> Option<Plan> {
    let runs = &version.runs;
    let plan = |from: usize, to: usize| Plan { inputs: runs[from..to].to_vec(), bottom: to == runs.len() };
    let classes: Vec<u32> = runs.iter().map(|r| class(r.bytes, base_bytes, fanout as u64)).collect();
    let mut start = 0;
    for end in 1..=runs.len() {
        if end == runs.len() || classes[end] != classes[start] {
            if end - start >= fanout {
                // The oldest of the class: the output is then older than the rest of its class, as it should be.
                return Some(plan(end - fanout, end));
            }
            start = end;
        }
    }
    if runs.len() > runs_max.max(2) {
        let smallest =
            (0..runs.len() - 1).min_by_key(|&i| runs[i].bytes + runs[i + 1].bytes).expect("at least two runs");
        return Some(plan(smallest, smallest + 2));
    }
    None
}

impl StateMachine {
    /// Runs one compaction if the policy asks for one (and deletes runs no reader needs any more). Returns whether
    /// it compacted. The background flusher calls it on its own thread; tests may call it directly.
    pub fn compact(&self) -> Result<bool, StateMachineError> {
        let _one_at_a_time = self.compaction_lock.lock();
        self.collect_garbage()?;
        let version = self.current_version();
        let options = self.options();
        let Some(plan) = pick(&version, options.memtable_bytes_max, options.compaction_fanout, options.runs_max) else {
            return Ok(false);
        };
        let read = self.db.begin_read().map_err(storage)?;
        let blocks = read.open_table(RUN_BLOCKS).map_err(storage)?;
        let mut inputs = Vec::with_capacity(plan.inputs.len());
        for run in &plan.inputs {
            inputs.push(Input { seq: run.seq, source: Box::new(RunCursor::open(&blocks, run.id, b"", b"")?) });
        }
        let mut merge = Merge::new(inputs, version.tombstones.clone(), !plan.bottom)?;
        let output_seq = plan.inputs[0].seq;
        let expected_keys = plan.inputs.iter().map(|r| r.entries).sum::<u64>() as usize;
        let mut writer = RunWriter::new(self.allocate_number(), options.block_bytes_max, Some(expected_keys));
        let (output, dropped_tombstones) = loop {
            let mut write = self.db.begin_write().map_err(storage)?;
            write.set_durability(Durability::None).map_err(storage)?;
            let mut table = write.open_table(RUN_BLOCKS).map_err(storage)?;
            while let Some((key, value)) = merge.current() {
                writer.add(key, value);
                merge.advance()?;
                if writer.ready_bytes() >= COMPACTION_TXN_BYTES {
                    break;
                }
            }
            if merge.current().is_some() {
                writer.write_ready(&mut table)?;
                drop(table);
                write.commit().map_err(storage)?;
                continue;
            }
            // The last transaction: the output replaces the inputs.
            let output = writer.finish(&mut table, output_seq)?;
            drop(table);
            let mut runs = write.open_table(RUNS).map_err(storage)?;
            if let Some(output) = &output {
                runs.insert(output.id, output.encode().as_slice()).map_err(storage)?;
            }
            for run in &plan.inputs {
                runs.remove(run.id).map_err(storage)?;
            }
            drop(runs);
            let dropped: Vec<u64> = if plan.bottom {
                version.tombstones.iter().filter(|t| t.seq <= output_seq).map(|t| t.seq).collect()
            } else {
                Vec::new()
            };
            let mut tombstones = write.open_table(RANGE_TOMBSTONES).map_err(storage)?;
            for seq in &dropped {
                tombstones.remove(*seq).map_err(storage)?;
            }
            drop(tombstones);
            write.commit().map_err(storage)?;
            break (output, dropped);
        };
        drop(blocks);
        drop(read);
        self.publish(Contents::Same, |current| {
            let mut next = current.clone();
            next.runs.retain(|run| !plan.inputs.iter().any(|input| input.id == run.id));
            next.tombstones.retain(|t| !dropped_tombstones.contains(&t.seq));
            match output {
                Some(output) => next.with_run(Arc::new(output)),
                None => next,
            }
        });
        self.garbage.lock().runs.extend(plan.inputs);
        metrics::counter!("flotilla_state_machine_compactions_total").increment(1);
        Ok(true)
    }

    /// Runs compactions until the policy asks for none, then deletes what no reader needs any more.
    pub fn compact_fully(&self) -> Result<(), StateMachineError> {
        while self.compact()? {}
        self.collect_garbage()
    }

    /// Deletes the blocks of replaced runs no version refers to any more, and of abandoned snapshot installs.
    pub(crate) fn collect_garbage(&self) -> Result<(), StateMachineError> {
        let ids: Vec<u64> = {
            let mut garbage = self.garbage.lock();
            let mut ids = std::mem::take(&mut garbage.abandoned);
            garbage.runs.retain(|run| {
                let unreferenced = Arc::strong_count(run) == 1;
                if unreferenced {
                    ids.push(run.id);
                }
                !unreferenced
            });
            ids
        };
        if ids.is_empty() {
            return Ok(());
        }
        // Durable: redb reuses the pages a transaction frees only once a durable commit has followed.
        let write = super::begin_durable(&self.db)?;
        {
            let mut blocks = write.open_table(RUN_BLOCKS).map_err(storage)?;
            for id in ids {
                crate::lsm::run::delete_blocks(&mut blocks, id)?;
            }
        }
        write.commit().map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redb_sim::SimRedbBackend;
    use crate::state_machine::{GroupApply, KvOp, StateMachineOptions};

    #[test]
    fn runs_a_reader_pinned_outlive_their_compaction_until_it_lets_go() {
        let options = StateMachineOptions {
            memtable_bytes_max: 1 << 20,
            compaction_fanout: 2,
            runs_max: 2,
            ..StateMachineOptions::default()
        };
        let machine = StateMachine::open_with_backend(SimRedbBackend::new(), options).unwrap();
        for index in 1..=2u64 {
            let ops = (0..50)
                .map(|i| KvOp::Put { key: format!("k{i:03}").into_bytes(), value: format!("v{index}").into_bytes() })
                .collect();
            machine
                .apply(vec![GroupApply { group_id: 1, ops, applied_index: index, applied_term: 1, range: None }])
                .unwrap();
            machine.flush().unwrap();
        }
        // A reader takes the version (two runs)...
        let pinned = machine.current_version();
        assert_eq!(pinned.runs.len(), 2);
        // ...compaction replaces both runs and collects garbage before the reader opens its transaction...
        assert!(machine.compact().unwrap());
        machine.collect_garbage().unwrap();
        assert_eq!(machine.run_count(), 1);
        // ...and the reader still finds every key through its version.
        let read = machine.db.begin_read().unwrap();
        assert_eq!(machine.get_in(&pinned, &read, b"k007").unwrap(), Some(b"v2".to_vec()));
        drop(read);
        assert_eq!(machine.stats().unwrap().stored_runs, 3, "the replaced runs wait while pinned");
        drop(pinned);
        machine.collect_garbage().unwrap();
        assert_eq!(machine.stats().unwrap().stored_runs, 1, "and go once nothing pins them");
    }

    /// Whether the file `disk` holds opens after a crash without redb walking it all (a full repair: what a
    /// durable commit without quick repair leaves for the next open).
    fn opens_without_a_full_repair(disk: &SimRedbBackend) -> bool {
        disk.power_on();
        let opened =
            redb::Database::builder().set_repair_callback(|session| session.abort()).create_with_backend(disk.clone());
        disk.power_off();
        opened.is_ok()
    }

    fn crash(machine: StateMachine, disk: &SimRedbBackend) {
        disk.power_off();
        drop(machine);
        disk.crash();
    }

    #[test]
    fn every_durable_commit_leaves_a_file_that_opens_after_a_crash_without_a_full_repair() {
        let options = StateMachineOptions { compaction_fanout: 2, runs_max: 2, ..StateMachineOptions::default() };
        let disk = SimRedbBackend::new();
        let open = || {
            disk.power_on();
            StateMachine::open_with_backend(disk.clone(), options.clone()).unwrap()
        };
        // The open's own commit.
        crash(open(), &disk);
        assert!(opens_without_a_full_repair(&disk), "after the open");
        // A range descriptor.
        let machine = open();
        machine.put_range(1, b"descriptor").unwrap();
        crash(machine, &disk);
        assert!(opens_without_a_full_repair(&disk), "after put_range");
        // Flushes, then a compaction and its garbage collection.
        let machine = open();
        for index in 1..=2u64 {
            let ops = (0..50).map(|i| KvOp::Put { key: format!("k{i:03}").into_bytes(), value: vec![index as u8] });
            let apply =
                GroupApply { group_id: 1, ops: ops.collect(), applied_index: index, applied_term: 1, range: None };
            machine.apply(vec![apply]).unwrap();
            machine.flush().unwrap();
        }
        crash(machine, &disk);
        assert!(opens_without_a_full_repair(&disk), "after flushes");
        let machine = open();
        assert!(machine.compact().unwrap());
        machine.collect_garbage().unwrap();
        crash(machine, &disk);
        assert!(opens_without_a_full_repair(&disk), "after a compaction and its garbage collection");
        // The control: a durable commit made without quick repair does leave a full repair to the next open.
        let machine = open();
        let write = machine.db.begin_write().unwrap();
        write.open_table(super::super::RANGES).unwrap().insert(2, b"d".as_slice()).unwrap();
        write.commit().unwrap();
        crash(machine, &disk);
        assert!(!opens_without_a_full_repair(&disk), "the check can tell");
    }

    #[test]
    fn classes_grow_by_the_fanout_with_slack_for_merged_runs_that_shrank() {
        let base = 64;
        assert_eq!([0, 10, 64, 127].map(|b| class(b, base, 4)), [0; 4]);
        // Four flushes of about 64 bytes merge to about 256: class 1 even if overwrites made it a little smaller.
        assert_eq!([128, 250, 511].map(|b| class(b, base, 4)), [1; 3]);
        assert_eq!([512, 1000, 2047].map(|b| class(b, base, 4)), [2; 3]);
    }
}
