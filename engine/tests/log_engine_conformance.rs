//! One behavioural suite for every [`LogEngine`]: the real WAL behind group commit (on the simulated and on the
//! real disk) and the in-memory engine must answer identically.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use flotilla_engine::disk::{SimDisk, StdDisk};
use flotilla_engine::log_engine::{LogEngine, MemLogEngine};
use flotilla_engine::wal::group_commit::{GroupCommitOptions, GroupCommitWal, Persisted, WriteRequest};
use flotilla_engine::wal::record::LogOp;
use flotilla_engine::wal::{Wal, WalOptions};
use flotilla_raft::{Entry, HardState};

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range
        .map(|index| Entry { index, term, data: Bytes::from(format!("e{index}t{term}")), ..Default::default() })
        .collect()
}

struct Harness<'a> {
    engine: &'a dyn LogEngine,
    reply: Sender<Persisted>,
    persisted: Receiver<Persisted>,
    ready_number: u64,
}

impl Harness<'_> {
    /// Submits and waits until durable, checking the reply names the right group and Ready.
    fn write(&mut self, group_id: u64, ops: Vec<LogOp>) {
        self.ready_number += 1;
        let request = WriteRequest::new(group_id, self.ready_number, ops, self.reply.clone());
        self.engine.submit(request).expect("submit");
        let done = self.persisted.recv_timeout(Duration::from_secs(10)).expect("persisted");
        assert_eq!((done.group_id, done.ready_number), (group_id, self.ready_number));
    }

    fn terms(&self, group_id: u64) -> Vec<u64> {
        let (first, last) = (self.engine.first_index(group_id), self.engine.last_index(group_id));
        if last < first {
            return Vec::new();
        }
        self.engine.entries(group_id, first, last + 1, u64::MAX).unwrap().iter().map(|e| e.term).collect()
    }
}

fn conformance(engine: &dyn LogEngine) {
    let (reply, persisted) = crossbeam_channel::unbounded();
    let mut h = Harness { engine, reply, persisted, ready_number: 0 };
    // A group never written to.
    assert_eq!((engine.first_index(1), engine.last_index(1), engine.term(1, 0)), (1, 0, Some(0)));
    assert_eq!(engine.hard_state(1), HardState::default());

    h.write(1, vec![LogOp::Append(entries(1..=5, 1))]);
    assert_eq!((engine.first_index(1), engine.last_index(1)), (1, 5));
    assert_eq!(engine.entries(1, 2, 4, u64::MAX).unwrap(), entries(2..=3, 1));
    assert_eq!((engine.term(1, 3), engine.term(1, 6)), (Some(1), None));

    // An append that conflicts replaces the suffix.
    h.write(1, vec![LogOp::Append(entries(4..=7, 2))]);
    assert_eq!(h.terms(1), vec![1, 1, 1, 2, 2, 2, 2]);
    assert_eq!(engine.entries(1, 3, 6, u64::MAX).unwrap(), [entries(3..=3, 1), entries(4..=5, 2)].concat());

    h.write(1, vec![LogOp::Truncate { from_index: 6 }, LogOp::HardState(HardState { term: 2, vote: 3, commit: 4 })]);
    assert_eq!((engine.last_index(1), engine.hard_state(1)), (5, HardState { term: 2, vote: 3, commit: 4 }));

    // Compaction keeps the term of the compaction point answerable.
    h.write(1, vec![LogOp::Compact { first_kept_index: 3, base_term: 1 }]);
    assert_eq!((engine.first_index(1), engine.term(1, 2), engine.term(1, 1)), (3, Some(1), None));
    assert_eq!(h.terms(1), vec![1, 2, 2]);

    // A byte budget still returns at least one entry.
    assert_eq!(engine.entries(1, 3, 6, 1).unwrap().len(), 1);

    // Another group is independent, and a snapshot restarts the log after it.
    h.write(2, vec![LogOp::Append(entries(1..=3, 1))]);
    h.write(2, vec![LogOp::Snapshot { index: 20, term: 3 }]);
    assert_eq!((engine.first_index(2), engine.last_index(2), engine.term(2, 20)), (21, 20, Some(3)));
    assert!(engine.hard_state(2).commit >= 20, "a snapshot is committed");
    h.write(2, vec![LogOp::Append(entries(21..=22, 3))]);
    assert_eq!(h.terms(2), vec![3, 3]);
    assert_eq!(h.terms(1), vec![1, 2, 2], "group 1 untouched");

    // Many groups in one go.
    for group in 10..40 {
        h.write(
            group,
            vec![LogOp::Append(entries(1..=2, 1)), LogOp::HardState(HardState { term: 1, vote: group, commit: 2 })],
        );
    }
    for group in 10..40 {
        assert_eq!((engine.last_index(group), engine.hard_state(group).vote), (2, group));
    }
}

#[test]
fn the_in_memory_engine_conforms() {
    conformance(&MemLogEngine::new());
}

#[test]
fn the_wal_on_the_simulated_disk_conforms() {
    let (wal, _) = Wal::open(
        Path::new("/node/wal"),
        Arc::new(SimDisk::new()),
        WalOptions { segment_bytes_max: 512, ..WalOptions::default() },
    )
    .unwrap();
    conformance(&GroupCommitWal::start(wal, GroupCommitOptions::default()));
}

#[test]
fn the_wal_on_the_real_disk_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), Arc::new(StdDisk), WalOptions::default()).unwrap();
    conformance(&GroupCommitWal::start(wal, GroupCommitOptions::default()));
}

#[test]
fn the_wal_written_on_the_callers_thread_conforms() {
    let (wal, _) = Wal::open(
        Path::new("/node/wal"),
        Arc::new(SimDisk::new()),
        WalOptions { segment_bytes_max: 512, ..WalOptions::default() },
    )
    .unwrap();
    conformance(&flotilla_engine::log_engine::SyncWal::new(wal));
}
