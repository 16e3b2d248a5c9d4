//! The WAL against a model: random operations over many groups with reopens, crashes that lose unsynced bytes
//! or keep a torn prefix, failed fsyncs, and bit flips. Everything reported durable must come back exactly;
//! nothing else may come back except a prefix of the write that was in flight; damage is never accepted silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use flotilla_engine::disk::{Disk, SimDisk, StdDisk};
use flotilla_engine::wal::record::LogOp;
use flotilla_engine::wal::record::FRAME_BYTES;
use flotilla_engine::wal::{repair_truncate, segment_path, Wal, WalError, WalOptions, SEGMENT_HEADER_BYTES};
use flotilla_raft::{Entry, HardState};
use proptest::prelude::*;

/// What one group's log must look like.
#[derive(Clone, Debug, Default, PartialEq)]
struct ModelGroup {
    hard_state: HardState,
    base: (u64, u64),
    entries: Vec<Entry>,
}

impl ModelGroup {
    fn first_index(&self) -> u64 {
        self.base.0 + 1
    }
    fn last_index(&self) -> u64 {
        self.base.0 + self.entries.len() as u64
    }
    fn apply(&mut self, op: &LogOp) {
        match op {
            LogOp::Append(entries) => {
                let first = entries[0].index;
                self.entries.truncate((first - self.first_index()) as usize);
                self.entries.extend(entries.iter().cloned());
            }
            LogOp::HardState(hard_state) => self.hard_state = *hard_state,
            LogOp::Truncate { from_index } => {
                self.entries.truncate(from_index.saturating_sub(self.first_index()) as usize)
            }
            LogOp::Compact { first_kept_index, base_term } => {
                if *first_kept_index > self.first_index() {
                    let drop = (first_kept_index - self.first_index()) as usize;
                    assert_eq!(
                        self.entries[drop - 1].term,
                        *base_term,
                        "the model only generates truthful compactions"
                    );
                    self.entries.drain(..drop);
                    self.base = (first_kept_index - 1, *base_term);
                }
            }
            LogOp::Snapshot { index, term } => {
                self.entries.clear();
                self.base = (*index, *term);
                self.hard_state.commit = self.hard_state.commit.max(*index);
            }
        }
    }
}

type Model = BTreeMap<u64, ModelGroup>;

fn apply_all(model: &mut Model, ops: &[(u64, LogOp)]) {
    for (group, op) in ops {
        model.entry(*group).or_default().apply(op);
    }
}

fn assert_matches(wal: &Wal, model: &Model) {
    for (group_id, expected) in model {
        let Some(group) = wal.group(*group_id) else {
            // A group whose state is all defaults needs no record: after a purge it may be absent, which reads the
            // same (empty log from index 1, default hard state).
            assert_eq!(expected, &ModelGroup::default(), "group {group_id} lost");
            continue;
        };
        assert_eq!(group.hard_state, expected.hard_state, "group {group_id} hard state");
        assert_eq!((group.base_index, group.base_term), expected.base, "group {group_id} base");
        assert_eq!((group.first_index, group.last_index()), (expected.first_index(), expected.last_index()));
        if expected.last_index() >= expected.first_index() {
            let entries = wal.entries(*group_id, expected.first_index(), expected.last_index() + 1, u64::MAX).unwrap();
            assert_eq!(entries, expected.entries, "group {group_id} entries");
        }
    }
    for group_id in wal.group_ids() {
        assert!(model.contains_key(&group_id), "group {group_id} should not exist");
    }
}

/// A random but valid operation for `group` given the model.
fn random_op(rng: &mut u64, group: &ModelGroup, term: u64) -> LogOp {
    let mut next = |bound: u64| {
        *rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*rng >> 33) % bound.max(1)
    };
    let (first, last) = (group.first_index(), group.last_index());
    match next(10) {
        0..=5 => {
            // Append, sometimes overwriting a suffix.
            let start = if last >= first && next(3) == 0 { first + next(last - first + 1) } else { last + 1 };
            let count = 1 + next(5);
            let size = next(200) as usize;
            LogOp::Append(
                (start..start + count)
                    .map(|index| Entry {
                        index,
                        term,
                        data: Bytes::from(vec![index as u8; size]),
                        ..Default::default()
                    })
                    .collect(),
            )
        }
        6 => LogOp::HardState(HardState { term, vote: next(4), commit: last }),
        7 if last >= first => LogOp::Truncate { from_index: first + next(last - first + 1) },
        8 if last >= first => {
            let first_kept_index = first + next(last - first + 2);
            let base_term = if first_kept_index == first {
                group.base.1
            } else {
                group.entries[(first_kept_index - first - 1) as usize].term
            };
            LogOp::Compact { first_kept_index, base_term }
        }
        9 => LogOp::Snapshot { index: (last + next(5)).max(1), term },
        _ => LogOp::HardState(HardState { term, vote: 0, commit: 0 }),
    }
}

fn options(segment_bytes_max: u64) -> WalOptions {
    options_with_cache(segment_bytes_max, 0)
}

fn options_with_cache(segment_bytes_max: u64, entry_cache_bytes_max: u64) -> WalOptions {
    WalOptions {
        segment_bytes_max,
        record_batch_bytes_max: 1 << 30,
        sync: true,
        entry_cache_bytes_max,
        ..WalOptions::default()
    }
}

proptest! {
    // 48 cases by default; PROPTEST_CASES=5000 for a long run.
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48), .. ProptestConfig::default() })]

    #[test]
    fn recovered_state_equals_the_model(
        seed in any::<u64>(), groups in 1u64..12, writes in 1usize..60, segment_kib in 1u64..16, cache in 0usize..3,
    ) {
        // The entry cache off, tiny (constant eviction) and large: every read path is compared with the model.
        model_run(seed, groups, writes, segment_kib, [0, 600, 1 << 20][cache], false);
    }

    #[test]
    fn a_crash_keeps_every_acknowledged_write_and_at_most_a_prefix_of_the_one_in_flight(
        seed in any::<u64>(), writes in 1usize..40, kept_per_mille in 0usize..1000, segment_kib in 4u64..24,
    ) {
        let disk = SimDisk::new();
        let dir = Path::new("/node/wal");
        let mut rng = seed | 1;
        let mut model = Model::new();
        let (mut wal, _) = Wal::open(dir, Arc::new(disk.clone()), options(segment_kib << 10)).unwrap();
        for write in 0..writes {
            rng = rng.rotate_left(9) ^ 0x5851_F42D;
            let group = rng % 5 + 1;
            let current = model.get(&group).cloned().unwrap_or_default();
            let op = random_op(&mut rng, &current, write as u64 + 1);
            wal.write(&[(group, op.clone())]).unwrap();
            apply_all(&mut model, &[(group, op)]);
            if rng % 4 == 0 {
                // Purges fill the recycle pool, so the crash may hit a recycled segment full of stale records.
                let segments = wal.segment_ids();
                wal.purge(segments[(rng as usize / 5) % segments.len()]).unwrap();
            }
        }
        // The write in flight: its fsync fails, then the power goes.
        let mut in_flight = Vec::new();
        let mut staged = model.clone();
        for _ in 0..3 {
            rng = rng.rotate_left(9) ^ 0x5851_F42D;
            let group = rng % 5 + 1;
            let op = random_op(&mut rng, staged.entry(group).or_default(), 1000);
            staged.entry(group).or_default().apply(&op);
            in_flight.push((group, op));
        }
        disk.fail_next_syncs(1);
        let failed = matches!(wal.write(&in_flight), Err(WalError::Io { .. }));
        prop_assert!(failed, "the injected fsync failure surfaces as an I/O error");
        drop(wal);
        disk.crash(|_, unsynced| unsynced * kept_per_mille / 1000);
        let (wal, _report) = Wal::open(dir, Arc::new(disk.clone()), options(segment_kib << 10)).unwrap();
        let mut candidates = vec![model.clone()];
        let mut partial = model.clone();
        for op in &in_flight {
            apply_all(&mut partial, std::slice::from_ref(op));
            candidates.push(partial.clone());
        }
        let recovered_matches = candidates.iter().any(|candidate| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_matches(&wal, candidate))).is_ok()
        });
        prop_assert!(recovered_matches, "recovered state is not acknowledged state plus a prefix of the in-flight write");
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range
        .map(|index| Entry { index, term, data: Bytes::from(format!("entry {index}")), ..Default::default() })
        .collect()
}

/// A WAL on `disk` with small segments, holding `rounds` appends of `per_round` entries (of terms 1, 2, …) for
/// `group`.
fn wal_with_rounds(disk: &SimDisk, segment_bytes_max: u64, group: u64, rounds: u64, per_round: u64) -> Wal {
    let dir = Path::new("/node/wal");
    let (mut wal, _) =
        Wal::open(dir, Arc::new(disk.clone()), WalOptions { segment_bytes_max, ..WalOptions::default() }).unwrap();
    for term in 1..=rounds {
        let first = (term - 1) * per_round + 1;
        wal.write(&[(group, LogOp::Append(entries(first..=first + per_round - 1, term)))]).unwrap();
    }
    wal
}

#[test]
fn a_torn_tail_is_reported_and_overwritten_by_the_next_write() {
    let disk = SimDisk::new();
    let dir = Path::new("/node/wal");
    let (mut wal, _) = Wal::open(dir, Arc::new(disk.clone()), WalOptions::default()).unwrap();
    wal.write(&[(1, LogOp::Append(entries(1..=3, 1)))]).unwrap();
    let path = segment_path(dir, 1);
    // The header, then the first write's frame (the file itself is longer: sized when the segment started).
    let durable_len = SEGMENT_HEADER_BYTES as usize + 4096;
    disk.fail_next_syncs(1);
    assert!(wal.write(&[(1, LogOp::Append(entries(4..=9, 1)))]).is_err());
    drop(wal);
    disk.crash(|_, _| FRAME_BYTES + 10); // the frame's opening record and a piece of the first record after it
    let (mut wal, report) = Wal::open(dir, Arc::new(disk.clone()), WalOptions::default()).unwrap();
    let (torn_path, offset, dropped) = report.torn_tail.expect("the torn write is reported");
    assert_eq!((torn_path, offset as usize), (path.clone(), durable_len));
    assert!(dropped > 0);
    assert_eq!(wal.group(1).unwrap().last_index(), 3);
    // The next write goes where the torn one began; the torn bytes never come back.
    wal.write(&[(1, LogOp::Append(entries(4..=4, 2)))]).unwrap();
    drop(wal);
    let (wal, report) = Wal::open(dir, Arc::new(disk.clone()), WalOptions::default()).unwrap();
    assert_eq!(wal.entries(1, 1, 5, u64::MAX).unwrap(), [entries(1..=3, 1), entries(4..=4, 2)].concat());
    assert!(
        report.torn_tail.is_none() || report.torn_tail.as_ref().is_some_and(|(_, at, _)| *at as usize > durable_len)
    );
}

#[test]
fn a_flipped_bit_before_the_tail_is_corruption_naming_file_and_offset_and_repair_cuts_there() {
    let disk = SimDisk::new();
    let dir = Path::new("/node/wal");
    let wal = wal_with_rounds(&disk, 150, 7, 9, 3);
    let segments = wal.segment_ids();
    assert!(segments.len() >= 3, "small segments rotate: {segments:?}");
    drop(wal);
    let victim = segment_path(dir, segments[1]);
    disk.flip_bit(&victim, SEGMENT_HEADER_BYTES as usize + 40, 3);
    let error = Wal::open(dir, Arc::new(disk.clone()), WalOptions::default()).err().expect("corruption is refused");
    let WalError::Corruption { path, offset, reason } = &error else { panic!("{error}") };
    assert_eq!((path, *offset), (&victim, SEGMENT_HEADER_BYTES), "the frame holding the damaged record");
    assert!(reason.contains("checksum"), "{reason}");
    assert!(error.to_string().contains("repair_truncate"), "the message points at the repair");
    repair_truncate(dir, &disk, segments[1], *offset).unwrap();
    let (wal, report) = Wal::open(dir, Arc::new(disk), WalOptions::default()).unwrap();
    assert_eq!(report.torn_tail, None);
    assert_eq!(wal.segment_ids(), segments[..2].to_vec(), "later segments removed");
    assert!(wal.group(7).unwrap().last_index() < 27, "what followed the cut is gone");
}

#[test]
fn corruption_in_the_middle_of_the_newest_segment_is_not_mistaken_for_a_torn_tail() {
    let disk = SimDisk::new();
    let dir = Path::new("/node/wal");
    let (mut wal, _) = Wal::open(dir, Arc::new(disk.clone()), WalOptions::default()).unwrap();
    wal.write(&[(1, LogOp::Append(entries(1..=2, 1)))]).unwrap();
    wal.write(&[(1, LogOp::Append(entries(3..=4, 1)))]).unwrap();
    drop(wal);
    // In the first write, with a second one after it: not the tail.
    disk.flip_bit(&segment_path(dir, 1), SEGMENT_HEADER_BYTES as usize + 40, 0);
    assert!(matches!(Wal::open(dir, Arc::new(disk), WalOptions::default()), Err(WalError::Corruption { .. })));
}

#[test]
fn invalid_operations_are_refused_before_anything_is_written() {
    let disk = SimDisk::new();
    let (mut wal, _) = Wal::open(Path::new("/w"), Arc::new(disk), WalOptions::default()).unwrap();
    wal.write(&[(1, LogOp::Append(entries(1..=3, 1)))]).unwrap();
    assert!(matches!(wal.write(&[(1, LogOp::Append(entries(6..=7, 1)))]), Err(WalError::Invalid(_))));
    assert!(matches!(
        wal.write(&[(1, LogOp::Compact { first_kept_index: 9, base_term: 1 })]),
        Err(WalError::Invalid(_))
    ));
    assert!(matches!(wal.write(&[(1, LogOp::Snapshot { index: 0, term: 1 })]), Err(WalError::Invalid(_))));
    assert!(
        matches!(wal.write(&[(1, LogOp::Compact { first_kept_index: 3, base_term: 7 })]), Err(WalError::Invalid(_))),
        "a wrong base term"
    );
    assert_eq!(wal.group(1).unwrap().last_index(), 3);
}

#[test]
fn the_real_disk_round_trips_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let disk: Arc<dyn Disk> = Arc::new(StdDisk);
    let (mut wal, _) =
        Wal::open(dir.path(), Arc::clone(&disk), WalOptions { segment_bytes_max: 1024, ..WalOptions::default() })
            .unwrap();
    for group in 1..=20u64 {
        wal.write(&[
            (group, LogOp::Append(entries(1..=10, 2))),
            (group, LogOp::HardState(HardState { term: 2, vote: group, commit: 8 })),
        ])
        .unwrap();
    }
    drop(wal);
    let (wal, report) = Wal::open(dir.path(), disk, WalOptions::default()).unwrap();
    assert!(report.segments > 1);
    for group in 1..=20u64 {
        assert_eq!(wal.hard_state(group), HardState { term: 2, vote: group, commit: 8 });
        let read = wal.entries(group, 1, 11, u64::MAX).unwrap();
        assert_eq!(read, entries(1..=10, 2));
    }
    let limited = wal.entries(3, 1, 11, 60).unwrap();
    assert!(!limited.is_empty() && limited.len() < 10, "max_bytes limits a read");
}

#[test]
fn damage_to_the_last_record_of_an_older_segment_is_corruption_not_a_torn_tail() {
    // Only the newest segment can end in a torn write: older ones were synced before the WAL moved on.
    let disk = SimDisk::new();
    let dir = Path::new("/node/wal");
    let wal = wal_with_rounds(&disk, 150, 7, 6, 3);
    assert!(wal.segment_ids().len() >= 2);
    drop(wal);
    let older = segment_path(dir, 1);
    // Its last record: the seal, in the segment's last 4 KiB frame.
    let seal = disk.file_len(&older).unwrap() - 4096 + FRAME_BYTES + 5;
    disk.flip_bit(&older, seal, 5);
    let error = Wal::open(dir, Arc::new(disk), WalOptions::default()).err().expect("refused");
    assert!(matches!(&error, WalError::Corruption { path, .. } if path == &older), "{error}");
}

mod group_commit {
    use super::*;
    use flotilla_engine::wal::group_commit::{GroupCommitOptions, GroupCommitWal, Persisted, WriteRequest};

    /// Round `round` of a group: entries `2 * round - 1` and `2 * round`, as the Ready numbered `round`.
    fn round_append(group: u64, round: u64, reply: &crossbeam_channel::Sender<Persisted>) -> WriteRequest {
        let first = (round - 1) * 2 + 1;
        WriteRequest::new(group, round, vec![LogOp::Append(entries(first..=first + 1, 1))], reply.clone())
    }

    #[test]
    fn many_groups_share_syncs_and_every_request_is_answered_once_durable() {
        let disk = SimDisk::new();
        let dir = Path::new("/node/wal");
        let (wal, _) = Wal::open(dir, Arc::new(disk.clone()), WalOptions::default()).unwrap();
        let committer = Arc::new(GroupCommitWal::start(wal, GroupCommitOptions::default()));
        let (reply, persisted) = crossbeam_channel::unbounded();
        let groups = 64u64;
        let rounds = 20u64;
        std::thread::scope(|scope| {
            for producer in 0..4u64 {
                let committer = Arc::clone(&committer);
                let reply = reply.clone();
                scope.spawn(move || {
                    for round in 1..=rounds {
                        for group in (1..=groups).filter(|g| g % 4 == producer) {
                            let request = round_append(group, round, &reply);
                            committer.submit(request).unwrap();
                        }
                    }
                });
            }
        });
        let mut answered: Vec<(u64, u64)> = persisted.try_iter().map(|p| (p.group_id, p.ready_number)).collect();
        while answered.len() < (groups * rounds) as usize {
            let done = persisted.recv_timeout(std::time::Duration::from_secs(10)).expect("every request answered");
            answered.push((done.group_id, done.ready_number));
        }
        answered.sort();
        answered.dedup();
        assert_eq!(answered.len(), (groups * rounds) as usize, "each request answered exactly once");
        let syncs = committer.stats().syncs.load(std::sync::atomic::Ordering::Relaxed);
        assert!(syncs < groups * rounds, "{syncs} syncs for {} requests: no group commit", groups * rounds);
        assert_eq!(disk.unsynced_bytes(), 0, "answered means durable");
        let state = committer.state();
        for group in 1..=groups {
            assert_eq!(state.group(group).unwrap().last_index(), rounds * 2);
        }
    }

    /// A completion of the submitter's own type: what it carries comes back typed, in order.
    struct Labelled {
        label: &'static str,
        done: crossbeam_channel::Sender<(u64, u64, &'static str)>,
    }

    impl flotilla_engine::wal::group_commit::Completion for Labelled {
        fn complete(self: Box<Self>, group_id: u64, ready_number: u64) {
            let _ = self.done.send((group_id, ready_number, self.label));
        }
    }

    #[test]
    fn a_request_without_operations_writes_nothing_and_completes_in_order() {
        let disk = SimDisk::new();
        let dir = Path::new("/node/wal");
        let (wal, _) = Wal::open(dir, Arc::new(disk.clone()), WalOptions::default()).unwrap();
        let committer = GroupCommitWal::start(wal, GroupCommitOptions::default());
        let (done, completed) = crossbeam_channel::unbounded();
        let wait = || completed.recv_timeout(std::time::Duration::from_secs(10)).expect("answered");
        let request = |group_id: u64, ready_number: u64, ops: Vec<LogOp>, label: &'static str| {
            WriteRequest::with_completion(group_id, ready_number, ops, Box::new(Labelled { label, done: done.clone() }))
        };
        committer.submit(request(1, 1, vec![LogOp::Append(entries(1..=2, 1))], "first")).unwrap();
        assert_eq!(wait(), (1, 1, "first"));
        let segment = dir.join("00000000000000000001.wal");
        let written = disk.file_len(&segment);
        committer.submit(request(1, 2, Vec::new(), "alone")).unwrap();
        assert_eq!(wait(), (1, 2, "alone"));
        assert_eq!(disk.file_len(&segment), written, "nothing written for it");
        // Behind a write under way, it is answered after it.
        committer.submit(request(2, 1, vec![LogOp::Append(entries(1..=1, 1))], "write")).unwrap();
        committer.submit(request(1, 3, Vec::new(), "behind")).unwrap();
        assert_eq!((wait(), wait()), ((2, 1, "write"), (1, 3, "behind")), "in order");
        assert_eq!(committer.state().group(1).unwrap().last_index(), 2, "the empty requests changed nothing");
        assert_eq!(disk.unsynced_bytes(), 0);
    }

    #[test]
    fn purging_through_the_writer_bounds_the_wal_while_writes_continue() {
        let disk = SimDisk::new();
        let dir = Path::new("/node/wal");
        let (wal, _) =
            Wal::open(dir, Arc::new(disk.clone()), WalOptions { segment_bytes_max: 4096, ..WalOptions::default() })
                .unwrap();
        let committer = Arc::new(GroupCommitWal::start(wal, GroupCommitOptions::default()));
        let (reply, persisted) = crossbeam_channel::unbounded();
        // A laggard that never compacts.
        committer.submit(WriteRequest::new(99, 1, vec![LogOp::Append(entries(1..=3, 1))], reply.clone())).unwrap();
        persisted.recv_timeout(std::time::Duration::from_secs(10)).expect("the laggard's write answered");
        let writer = {
            let committer = Arc::clone(&committer);
            std::thread::spawn(move || {
                // Like a Raft group: the next Ready goes once the previous one is durable.
                let (reply, persisted) = crossbeam_channel::unbounded();
                for round in 1..=200u64 {
                    let first = (round - 1) * 4 + 1;
                    let ops = vec![
                        LogOp::Append(entries(first..=first + 3, 1)),
                        LogOp::Compact { first_kept_index: first + 3, base_term: 1 },
                    ];
                    committer.submit(WriteRequest::new(1, round, ops, reply.clone())).unwrap();
                    persisted.recv_timeout(std::time::Duration::from_secs(10)).expect("answered");
                }
            })
        };
        let mut purges = 0;
        while !writer.is_finished() {
            committer.purge(3 * 4096).unwrap();
            purges += 1;
        }
        writer.join().unwrap();
        let report = committer.purge(3 * 4096).unwrap();
        assert!(purges > 1, "purges ran while writes went on");
        let _ = report;
        {
            let state = committer.state();
            assert!(state.total_bytes() <= 4 * 4096, "bounded: {} bytes after {purges} purges", state.total_bytes());
            assert_eq!(state.entries(99, 1, 4, u64::MAX).unwrap(), entries(1..=3, 1), "the laggard's entries survive");
            assert_eq!(state.group(1).unwrap().first_index, 800);
        }
        drop(committer);
        let (wal, _) = Wal::open(dir, Arc::new(disk), WalOptions::default()).unwrap();
        assert_eq!(wal.entries(99, 1, 4, u64::MAX).unwrap(), entries(1..=3, 1));
        assert_eq!((wal.group(1).unwrap().first_index, wal.group(1).unwrap().last_index()), (800, 800));
    }

    #[test]
    fn power_loss_under_concurrent_group_commit_keeps_every_persisted_reply_true() {
        for seed in 0..20u64 {
            let disk = SimDisk::new();
            let dir = Path::new("/node/wal");
            let (wal, _) =
                Wal::open(dir, Arc::new(disk.clone()), WalOptions { segment_bytes_max: 8192, ..WalOptions::default() })
                    .unwrap();
            let committer = Arc::new(GroupCommitWal::start(wal, GroupCommitOptions::default()));
            let (reply, persisted) = crossbeam_channel::unbounded();
            let producers: Vec<_> = (1..=4u64)
                .map(|group| {
                    let committer = Arc::clone(&committer);
                    let reply = reply.clone();
                    std::thread::spawn(move || {
                        for round in 1..=400u64 {
                            let request = round_append(group, round, &reply);
                            if committer.submit(request).is_err() {
                                return; // the writer stopped after the power cut
                            }
                        }
                    })
                })
                .collect();
            // Cut the power at a moment that depends on the seed, while the producers are busy.
            std::thread::sleep(std::time::Duration::from_micros(200 + seed * 150));
            disk.power_off();
            for producer in producers {
                producer.join().unwrap();
            }
            drop(committer);
            let answered: Vec<Persisted> = persisted.try_iter().collect();
            disk.crash(|_, unsynced| unsynced * (seed as usize % 5) / 4);
            let (wal, _) = Wal::open(dir, Arc::new(disk), WalOptions::default()).unwrap();
            for group in 1..=4u64 {
                let last_answered =
                    answered.iter().filter(|p| p.group_id == group).map(|p| p.ready_number).max().unwrap_or(0);
                let last = wal.group(group).map_or(0, |g| g.last_index());
                assert!(
                    last >= last_answered * 2,
                    "seed {seed}: group {group} answered ready {last_answered} but holds only {last}"
                );
                assert!(last <= 800, "never more than was written");
                if last > 0 {
                    assert_eq!(wal.entries(group, 1, last + 1, u64::MAX).unwrap(), entries(1..=last, 1), "seed {seed}");
                }
            }
        }
    }

    #[test]
    fn a_failed_sync_stops_the_writer_and_fails_later_submits() {
        let disk = SimDisk::new();
        let (wal, _) = Wal::open(Path::new("/w"), Arc::new(disk.clone()), WalOptions::default()).unwrap();
        let committer = GroupCommitWal::start(wal, GroupCommitOptions::default());
        let (reply, persisted) = crossbeam_channel::unbounded();
        disk.fail_next_syncs(1);
        let request = |n: u64| WriteRequest::new(1, n, vec![LogOp::Append(entries(n..=n, 1))], reply.clone());
        committer.submit(request(1)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while committer.failure().is_none() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(committer.failure().unwrap().contains("injected fsync failure"));
        assert!(persisted.try_recv().is_err(), "a failed write is never reported persisted");
        assert!(committer.submit(request(2)).is_err());
    }

    #[test]
    fn an_entry_over_the_record_limit_stops_the_writer_with_its_reason_and_tells_the_listener() {
        let disk = SimDisk::new();
        let (wal, _) = Wal::open(Path::new("/w"), Arc::new(disk), WalOptions::default()).unwrap();
        let committer = GroupCommitWal::start(wal, GroupCommitOptions::default());
        let (told, heard) = crossbeam_channel::unbounded();
        committer.on_failure(Box::new(move |reason| told.send(reason.to_string()).unwrap()));
        let (reply, persisted) = crossbeam_channel::unbounded();
        let data = Bytes::from(vec![0u8; flotilla_engine::wal::record::ENTRY_DATA_BYTES_MAX + 1]);
        let huge = Entry { index: 1, term: 1, data, ..Default::default() };
        committer.submit(WriteRequest::new(1, 1, vec![LogOp::Append(vec![huge])], reply)).unwrap();
        let reason = heard.recv_timeout(std::time::Duration::from_secs(10)).expect("the listener is told");
        assert!(reason.contains("over the") && reason.contains("Append record"), "{reason}");
        assert_eq!(committer.failure(), Some(reason));
        assert!(persisted.try_recv().is_err());
        // A listener registered after the failure hears it at once.
        let (told, heard) = crossbeam_channel::unbounded();
        committer.on_failure(Box::new(move |reason| told.send(reason.to_string()).unwrap()));
        assert!(heard.try_recv().is_ok());
    }
}

#[test]
fn one_lagging_group_does_not_pin_the_wal_and_costs_only_its_own_rewrite() {
    let disk = SimDisk::new();
    let dir = Path::new("/node/wal");
    // Segments of about four frames (a frame is at least 4 KiB).
    const SEGMENT: u64 = 16 << 10;
    let (mut wal, _) =
        Wal::open(dir, Arc::new(disk.clone()), WalOptions { segment_bytes_max: SEGMENT, ..WalOptions::default() })
            .unwrap();
    // The laggard writes a little early on and then never compacts.
    wal.write(&[
        (99, LogOp::Append(entries(1..=3, 1))),
        (99, LogOp::HardState(HardState { term: 1, vote: 1, commit: 3 })),
    ])
    .unwrap();
    // Busy groups write a lot and compact as they go.
    for round in 1..=60u64 {
        for group in 1..=4u64 {
            let first = (round - 1) * 4 + 1;
            wal.write(&[(group, LogOp::Append(entries(first..=first + 3, 1)))]).unwrap();
            wal.write(&[(group, LogOp::Compact { first_kept_index: first + 2, base_term: 1 })]).unwrap();
        }
    }
    let state = wal.state();
    // A segment holds its header, up to SEGMENT of frames and one more, and its seal.
    let segment_bytes_max = SEGMENT + 2 * 4096;
    assert!(
        state.pinned_bytes(99) >= state.total_bytes() - segment_bytes_max,
        "the laggard pins (almost) the whole WAL"
    );
    assert!(state.pinned_bytes(1) < 3 * segment_bytes_max, "a busy group pins only its recent segments");
    let most = state.most_pinned(3);
    assert_eq!((most.len(), most[0]), (3, (99, state.pinned_bytes(99))), "the laggard heads the exported list");
    assert_eq!(state.max_pinned_bytes(), (state.pinned_bytes(99), 99));
    let mut every: Vec<(u64, u64)> =
        [1, 2, 3, 4, 99].map(|g| (g, state.pinned_bytes(g))).into_iter().filter(|(_, b)| *b > 0).collect();
    every.sort_by_key(|&(group, bytes)| (std::cmp::Reverse(bytes), group));
    assert_eq!(state.most_pinned(10), every, "the one-lookup-per-group ranking agrees with each group's own sum");
    assert_eq!(state.most_pinned(2), every[..2]);
    let before = wal.segment_ids().len();
    let horizon = wal.suggest_horizon(4 * segment_bytes_max);
    let report = wal.purge(horizon).unwrap();
    assert!(report.segments_removed as usize >= before - 10, "{report:?} of {before} segments");
    assert_eq!(report.entries_rewritten, 3, "only the laggard's live entries were copied");
    assert!(wal.state().total_bytes() <= 10 * segment_bytes_max);
    drop(wal);
    let (wal, _) = Wal::open(dir, Arc::new(disk), WalOptions::default()).unwrap();
    assert_eq!(wal.entries(99, 1, 4, u64::MAX).unwrap(), entries(1..=3, 1));
    assert_eq!(wal.hard_state(99), HardState { term: 1, vote: 1, commit: 3 });
    let busy = wal.group(1).unwrap();
    assert_eq!((busy.first_index, busy.last_index(), busy.base_term), (239, 240, 1));
}

#[test]
fn a_group_whose_early_records_vanished_without_a_rewrite_is_corruption() {
    let disk = SimDisk::new();
    let dir = Path::new("/node/wal");
    drop(wal_with_rounds(&disk, 100, 5, 4, 2));
    disk.remove(&segment_path(dir, 1)).unwrap();
    let error = Wal::open(dir, Arc::new(disk), WalOptions::default()).err().expect("refused");
    assert!(error.to_string().contains("but the record with it is missing"), "{error}");
}

/// Random operations over `groups` groups with purges and reopens; after each, the WAL must equal the model.
fn model_run(seed: u64, groups: u64, writes: usize, segment_kib: u64, cache_bytes: u64, trace: bool) {
    let disk = SimDisk::new();
    let dir = Path::new("/node/wal");
    let mut rng = seed | 1;
    let mut model = Model::new();
    let (mut wal, _) =
        Wal::open(dir, Arc::new(disk.clone()), options_with_cache(segment_kib << 10, cache_bytes)).unwrap();
    for write in 0..writes {
        let mut ops = Vec::new();
        let mut staged = model.clone();
        for _ in 0..1 + (rng % 4) {
            rng = rng.rotate_left(7) ^ 0x9E37_79B9;
            let group = rng % groups + 1;
            let op = random_op(&mut rng, staged.entry(group).or_default(), write as u64 + 1);
            staged.entry(group).or_default().apply(&op);
            ops.push((group, op));
        }
        if trace {
            for (group, op) in &ops {
                let shown = match op {
                    LogOp::Append(e) => format!("Append({}..={} t{})", e[0].index, e.last().unwrap().index, e[0].term),
                    other => format!("{other:?}"),
                };
                println!("write {write} seg {:?}: group {group} {shown}", wal.segment_ids().last());
            }
        }
        wal.write(&ops).unwrap();
        apply_all(&mut model, &ops);
        if rng.is_multiple_of(5) {
            // Purge below a random horizon: laggards and metadata are rewritten, the logical state is unchanged.
            let segments = wal.segment_ids();
            let horizon = segments[(rng as usize / 3) % segments.len()];
            let report = wal.purge(horizon).unwrap();
            if trace {
                println!("purge below {horizon}: {report:?}");
            }
            assert_matches(&wal, &model);
        }
        if rng.is_multiple_of(7) {
            drop(wal);
            let (reopened, report) =
                Wal::open(dir, Arc::new(disk.clone()), options_with_cache(segment_kib << 10, cache_bytes)).unwrap();
            assert_eq!(report.torn_tail, None);
            wal = reopened;
            assert_matches(&wal, &model);
        }
    }
    assert_matches(&wal, &model);
    drop(wal);
    let (wal, _) = Wal::open(dir, Arc::new(disk), options(segment_kib << 10)).unwrap();
    assert_matches(&wal, &model);
}

#[test]
#[ignore = "debugging aid: replay one case with a trace"]
fn model_run_trace() {
    let seed = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    model_run(seed, 5, 40, 2, 600, true);
}

#[test]
fn reads_outside_the_log_are_refused_even_when_the_cache_held_those_entries() {
    let (mut wal, _) =
        Wal::open(Path::new("/w"), Arc::new(SimDisk::new()), options_with_cache(1 << 20, 1 << 20)).unwrap();
    wal.write(&[(1, LogOp::Append(entries(1..=5, 1)))]).unwrap();
    wal.write(&[(1, LogOp::Truncate { from_index: 4 })]).unwrap();
    assert!(matches!(wal.entries(1, 3, 6, u64::MAX), Err(WalError::Invalid(_))));
    assert_eq!(wal.entries(1, 1, 4, u64::MAX).unwrap(), entries(1..=3, 1));
    wal.write(&[(1, LogOp::Compact { first_kept_index: 3, base_term: 1 })]).unwrap();
    assert!(matches!(wal.entries(1, 2, 4, u64::MAX), Err(WalError::Invalid(_))));
    assert!(wal.state().entry_cache_bytes() > 0);
}

mod recycling {
    use super::*;

    pub(super) fn recycled_files(disk: &SimDisk, dir: &Path) -> usize {
        disk.list(dir)
            .unwrap()
            .iter()
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("recycle-"))
            .count()
    }

    /// Group 1 writes `rounds` appends and compacts behind itself, so purges can free old segments.
    pub(super) fn churn(wal: &mut Wal, from_round: u64, rounds: u64) {
        for round in from_round..from_round + rounds {
            let first = (round - 1) * 2 + 1;
            wal.write(&[(1, LogOp::Append(entries(first..=first + 1, 1)))]).unwrap();
            wal.write(&[(1, LogOp::Compact { first_kept_index: first + 1, base_term: 1 })]).unwrap();
        }
    }

    /// A WAL of `segment_bytes_max` segments on a fresh disk, churned for `rounds` and then purged as far as it
    /// goes (filling the recycle pool of 2).
    pub(super) fn churned_and_purged(segment_bytes_max: u64, rounds: u64) -> (SimDisk, WalOptions, Wal, Vec<u64>) {
        let disk = SimDisk::new();
        let options = WalOptions { segment_bytes_max, recycled_segments_max: 2, ..WalOptions::default() };
        let (mut wal, _) = Wal::open(Path::new("/node/wal"), Arc::new(disk.clone()), options.clone()).unwrap();
        churn(&mut wal, 1, rounds);
        let before = wal.segment_ids();
        let horizon = wal.suggest_horizon(0);
        wal.purge(horizon).unwrap();
        (disk, options, wal, before)
    }

    #[test]
    fn purged_segments_are_reused_and_their_stale_records_never_count() {
        let dir = Path::new("/node/wal");
        let (disk, options, mut wal, before) = churned_and_purged(12 << 10, 20);
        assert_eq!(recycled_files(&disk, dir), 2, "two kept for reuse, the rest deleted");
        assert!(disk.list(dir).unwrap().len() < before.len());
        // Rotation takes from the pool: write until it does.
        let mut round = 21;
        while recycled_files(&disk, dir) == 2 {
            churn(&mut wal, round, 1);
            round += 1;
        }
        let newest = *wal.segment_ids().last().unwrap();
        let written = SEGMENT_HEADER_BYTES as usize + 2 * 4096;
        assert!(disk.file_len(&segment_path(dir, newest)).unwrap() > written, "a reused file keeps its earlier bytes");
        // Reopen: the recycled newest segment ends in stale bytes of its earlier life — neither corruption nor torn.
        drop(wal);
        let (mut wal, report) = Wal::open(dir, Arc::new(disk.clone()), options.clone()).unwrap();
        assert_eq!(report.torn_tail, None, "{report:?}");
        let last = (round - 1) * 2;
        assert_eq!(wal.group(1).unwrap().last_index(), last);
        assert_eq!(wal.entries(1, last, last + 1, u64::MAX).unwrap(), entries(last..=last, 1));
        churn(&mut wal, round, 2);
        drop(wal);
        let (wal, _) = Wal::open(dir, Arc::new(disk), options).unwrap();
        assert_eq!(wal.group(1).unwrap().last_index(), last + 4);
    }

    #[test]
    fn damage_followed_by_a_valid_frame_in_a_recycled_segment_is_corruption() {
        let dir = Path::new("/node/wal");
        let (disk, options, mut wal, _) = churned_and_purged(64 << 10, 30);
        assert!(recycled_files(&disk, dir) > 0);
        churn(&mut wal, 31, 12); // rotates into a recycled file and writes several frames there
        let newest = *wal.segment_ids().last().unwrap();
        drop(wal);
        assert_eq!(recycled_files(&disk, dir), 0, "both recycled files are in use: the newest segment is one");
        // Damage the newest segment's first frame: later frames of this segment still verify.
        disk.flip_bit(&segment_path(dir, newest), SEGMENT_HEADER_BYTES as usize + 40, 1);
        let error = Wal::open(dir, Arc::new(disk), options).err().expect("refused");
        assert!(matches!(&error, WalError::Corruption { offset, .. } if *offset == SEGMENT_HEADER_BYTES), "{error}");
        assert!(error.to_string().contains("a valid frame follows"), "{error}");
    }
}

/// Zeros ahead (`WalOptions::zero_ahead_bytes`): a new segment's file gets its blocks written ahead of its frames,
/// a chunk at a time and never past the length the segment started with, so most syncs overwrite written blocks;
/// a recycled file, written in its earlier life, gets none.
mod zero_ahead {
    use super::*;

    const PAGE: usize = 4096;
    const HEADER: usize = SEGMENT_HEADER_BYTES as usize;

    fn write_one(wal: &mut Wal, index: u64) {
        wal.write(&[(1, LogOp::Append(entries(index..=index, 1)))]).unwrap(); // one page-long frame
    }

    #[test]
    fn a_new_segment_is_zero_filled_ahead_of_its_frames_up_to_its_length() {
        let dir = Path::new("/node/wal");
        let disk = SimDisk::new();
        let options = WalOptions { segment_bytes_max: 64 << 10, zero_ahead_bytes: 16 << 10, ..WalOptions::default() };
        let (mut wal, _) = Wal::open(dir, Arc::new(disk.clone()), options).unwrap();
        let first = segment_path(dir, wal.segment_ids()[0]);
        assert_eq!(disk.written_len(&first), Some(HEADER), "a new segment: its header, the rest sparse");
        write_one(&mut wal, 1);
        assert_eq!(disk.written_len(&first), Some(HEADER + PAGE + (16 << 10)));
        // Frames within the zeros write nothing ahead.
        let before = disk.bytes_written_total();
        for index in 2..=5 {
            write_one(&mut wal, index);
        }
        assert_eq!(disk.bytes_written_total() - before, 4 * PAGE as u64);
        assert_eq!(disk.written_len(&first), Some(HEADER + 5 * PAGE));
        // The next frame reaches past them: zeros again, from its end.
        write_one(&mut wal, 6);
        assert_eq!(disk.written_len(&first), Some(HEADER + 6 * PAGE + (16 << 10)));
        let mut index = 7;
        while wal.segment_ids().len() == 1 {
            write_one(&mut wal, index);
            index += 1;
        }
        // Zeros stop at the segment's 64 KiB; only its seal's frame lies beyond.
        assert_eq!(disk.written_len(&first), Some((64 << 10) + PAGE));
        drop(wal);
        let options = WalOptions { segment_bytes_max: 64 << 10, zero_ahead_bytes: 16 << 10, ..WalOptions::default() };
        let (wal, report) = Wal::open(dir, Arc::new(disk), options).unwrap();
        assert_eq!(report.torn_tail, None, "{report:?}");
        assert_eq!(wal.group(1).unwrap().last_index(), index - 1);
    }

    #[test]
    fn without_zeros_ahead_a_new_segment_holds_only_its_frames() {
        let dir = Path::new("/node/wal");
        let disk = SimDisk::new();
        let options = WalOptions { segment_bytes_max: 64 << 10, zero_ahead_bytes: 0, ..WalOptions::default() };
        let (mut wal, _) = Wal::open(dir, Arc::new(disk.clone()), options).unwrap();
        write_one(&mut wal, 1);
        assert_eq!(disk.written_len(&segment_path(dir, wal.segment_ids()[0])), Some(HEADER + PAGE));
    }

    #[test]
    fn a_recycled_file_is_overwritten_without_zeros_ahead() {
        let dir = Path::new("/node/wal");
        let (disk, _, mut wal, _) = recycling::churned_and_purged(64 << 10, 30);
        let mut round = 31;
        loop {
            let before = disk.bytes_written_total();
            recycling::churn(&mut wal, round, 1);
            round += 1;
            if recycling::recycled_files(&disk, dir) < 2 {
                // This round rotated into a recycled file: the old segment's seal, the new one's header and the
                // round's two frames, nothing ahead of them.
                assert_eq!(disk.bytes_written_total() - before, 4 * PAGE as u64);
                break;
            }
        }
    }
}

/// Lost or cut segments: a lost acknowledged suffix is told apart from a torn final write wherever the WAL holds
/// what it takes (issue 11, case 7), and `repair_truncate` at the reported place makes the WAL usable again.
mod lost_suffix {
    use super::*;

    const SEGMENT_BYTES: u64 = 16 << 10;

    /// A WAL of several segments (one group, one entry per write); returns the last index written.
    fn wal_of_segments(disk: &SimDisk, dir: &Path, segments: usize) -> u64 {
        let (mut wal, _) = Wal::open(dir, Arc::new(disk.clone()), options(SEGMENT_BYTES)).unwrap();
        let mut index = 0;
        while wal.segment_ids().len() < segments {
            index += 1;
            wal.write(&[(1, LogOp::Append(entries(index..=index, 1)))]).unwrap();
        }
        // And a few writes into the newest.
        for _ in 0..2 {
            index += 1;
            wal.write(&[(1, LogOp::Append(entries(index..=index, 1)))]).unwrap();
        }
        index
    }

    fn corruption(disk: &SimDisk, dir: &Path) -> (PathBuf, u64, String) {
        match Wal::open(dir, Arc::new(disk.clone()), options(SEGMENT_BYTES)) {
            Err(WalError::Corruption { path, offset, reason }) => (path, offset, reason),
            Err(other) => panic!("{other}"),
            Ok((wal, report)) => {
                panic!("a lost suffix went unnoticed: {report:?}, last index {}", wal.group(1).unwrap().last_index())
            }
        }
    }

    fn repair_and_open(disk: &SimDisk, dir: &Path, path: &Path, offset: u64) -> Wal {
        let id: u64 = path.file_name().unwrap().to_str().unwrap().strip_suffix(".wal").unwrap().parse().unwrap();
        repair_truncate(dir, disk, id, offset).unwrap();
        let (wal, _) = Wal::open(dir, Arc::new(disk.clone()), options(SEGMENT_BYTES)).expect("usable after the repair");
        wal
    }

    #[test]
    fn a_deleted_newest_segment_is_corruption_not_an_empty_tail() {
        let disk = SimDisk::new();
        let dir = Path::new("/node/wal");
        wal_of_segments(&disk, dir, 4);
        disk.remove(&segment_path(dir, 4)).unwrap();
        let (path, offset, reason) = corruption(&disk, dir);
        assert!(reason.contains("segment 4 is missing"), "{reason}");
        assert_eq!(path, segment_path(dir, 3));
        let mut wal = repair_and_open(&disk, dir, &path, offset);
        let last = wal.group(1).unwrap().last_index();
        wal.write(&[(1, LogOp::Append(entries(last + 1..=last + 1, 2)))]).unwrap();
    }

    #[test]
    fn a_segment_missing_in_the_middle_is_corruption() {
        let disk = SimDisk::new();
        let dir = Path::new("/node/wal");
        wal_of_segments(&disk, dir, 5);
        disk.remove(&segment_path(dir, 3)).unwrap();
        let (path, _, reason) = corruption(&disk, dir);
        assert!(reason.contains("segment 3 is missing"), "{reason}");
        assert_eq!(path, segment_path(dir, 2));
    }

    #[test]
    fn a_newest_segment_cut_short_is_corruption_and_the_repair_keeps_its_prefix() {
        let disk = SimDisk::new();
        let dir = Path::new("/node/wal");
        let last = wal_of_segments(&disk, dir, 3);
        // Cut to 60 % of what was written in it (the write that rotated into it, then two more, a frame each):
        // acknowledged frames are gone.
        let path = segment_path(dir, 3);
        let written = SEGMENT_HEADER_BYTES + 3 * 4096;
        let mut file = disk.open(&path, false).unwrap();
        file.truncate(written * 6 / 10).unwrap();
        drop(file);
        let (reported, offset, reason) = corruption(&disk, dir);
        assert!(reason.contains("shorter than") && reason.contains("acknowledged"), "{reason}");
        assert_eq!(reported, path);
        let wal = repair_and_open(&disk, dir, &reported, offset);
        let whole_frames_kept = (written * 6 / 10 - SEGMENT_HEADER_BYTES) / 4096;
        assert_eq!(wal.group(1).unwrap().last_index(), last - 3 + whole_frames_kept, "the frames before the cut stay");
    }

    #[test]
    fn a_crash_at_any_step_of_a_rotation_loses_nothing_acknowledged_and_opens() {
        // Syncs of a write that rotates: the successor's header (0), the seal (1), the write itself (2).
        for succeeding in 0..3 {
            for kept_per_mille in [0, 500, 1000] {
                let disk = SimDisk::new();
                let dir = Path::new("/node/wal");
                let (mut wal, _) = Wal::open(dir, Arc::new(disk.clone()), options(SEGMENT_BYTES)).unwrap();
                let mut index = 0;
                // Fill the first segment to the brim: the next write rotates.
                while wal.state().total_bytes() < SEGMENT_BYTES {
                    index += 1;
                    wal.write(&[(1, LogOp::Append(entries(index..=index, 1)))]).unwrap();
                }
                assert_eq!(wal.segment_ids(), vec![1], "full, not yet rotated");
                disk.fail_sync_after(succeeding);
                assert!(wal.write(&[(1, LogOp::Append(entries(index + 1..=index + 1, 1)))]).is_err());
                drop(wal);
                disk.crash(|_, unsynced| unsynced * kept_per_mille / 1000);
                let (mut wal, _) = Wal::open(dir, Arc::new(disk.clone()), options(SEGMENT_BYTES))
                    .unwrap_or_else(|e| panic!("sync {succeeding} failed, {kept_per_mille} ‰ kept: {e}"));
                let recovered = wal.group(1).unwrap().last_index();
                assert!(
                    recovered == index || recovered == index + 1,
                    "sync {succeeding}, {kept_per_mille} ‰: {recovered} of {index}"
                );
                // And it goes on: the next writes land and survive a reopen.
                wal.write(&[(1, LogOp::Append(entries(recovered + 1..=recovered + 3, 2)))]).unwrap();
                drop(wal);
                let (wal, _) = Wal::open(dir, Arc::new(disk.clone()), options(SEGMENT_BYTES)).unwrap();
                assert_eq!(wal.group(1).unwrap().last_index(), recovered + 3);
            }
        }
    }
}
