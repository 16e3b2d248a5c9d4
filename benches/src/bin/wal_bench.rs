//! `wal-bench`: durable WAL appends through group commit, next to the raw limit of the disk, and recovery time.
//!
//! ```text
//! cargo run --release -p flotilla-benches --bin wal-bench                  # the full matrix (~1 minute)
//! cargo run --release -p flotilla-benches --bin wal-bench -- --quick       # a smoke run
//! ```
//! Each run keeps every simulated group with one Ready in flight (like a Raft group waiting for its write);
//! a Ready carries `--entries-per-ready` entries. Throughput counts entries whose Ready was reported durable.
//! The raw limits are a plain `write` + `fdatasync` loop with the batch size the WAL run achieved: appending to a new
//! file ("raw", what the WAL does), and overwriting a file already written and synced ("prealloc", what recycled
//! segments would do).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use flotilla_engine::disk::StdDisk;
use flotilla_engine::wal::group_commit::{GroupCommitOptions, GroupCommitWal, WriteRequest};
use flotilla_engine::wal::record::LogOp;
use flotilla_engine::wal::{Wal, WalOptions};
use flotilla_raft::Entry;

#[derive(Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    #[arg(long, default_value_t = 16)]
    entries_per_ready: u64,
    /// Directory for the WAL files (on the disk to measure).
    #[arg(long, default_value = "target/wal-bench")]
    dir: String,
    /// Size of the WAL replayed by the recovery measurement, in MiB.
    #[arg(long, default_value_t = 1024)]
    recovery_mib: u64,
    /// A short run: fewer cases, one second each, 64 MiB recovery.
    #[arg(long)]
    quick: bool,
    /// Segment size, MiB (the WAL's default is 256).
    #[arg(long, default_value_t = 256)]
    segment_mib: u64,
    /// Only this entry size (bytes), e.g. 4096.
    #[arg(long)]
    only_entry_bytes: Option<usize>,
    /// Never compact nor purge: the WAL only grows and every segment is a new file (no recycling).
    #[arg(long)]
    no_purge: bool,
    /// Seconds of writing before the clock starts (in steady state this fills the recycle pool).
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
}

struct Outcome {
    entries_per_second: f64,
    mib_per_second: f64,
    syncs_per_second: f64,
    bytes_per_sync: u64,
    /// Share of the run the writer spent writing (encode, write, fdatasync, index update) rather than waiting.
    writer_busy: f64,
}

fn run_wal(dir: &Path, groups: u64, entry_bytes: usize, args: &Args, seconds: f64) -> Outcome {
    let (entries_per_ready, segment_mib, purge) = (args.entries_per_ready, args.segment_mib, !args.no_purge);
    let _ = std::fs::remove_dir_all(dir);
    let options = WalOptions { segment_bytes_max: segment_mib << 20, ..WalOptions::default() };
    let (wal, _) = Wal::open(dir, Arc::new(StdDisk), options).expect("open WAL");
    let committer = GroupCommitWal::start(
        wal,
        GroupCommitOptions { queue_capacity: (groups as usize).max(16), ..Default::default() },
    );
    let payload = Bytes::from(vec![b'x'; entry_bytes]);
    let (reply, persisted) = crossbeam_channel::unbounded();
    let mut next_index = vec![1u64; groups as usize + 1];
    let mut ready_number = vec![0u64; groups as usize + 1];
    let mut submit = |group: u64| {
        let first = next_index[group as usize];
        let entries: Vec<Entry> = (first..first + entries_per_ready)
            .map(|index| Entry { index, term: 1, data: payload.clone(), ..Default::default() })
            .collect();
        next_index[group as usize] += entries_per_ready;
        ready_number[group as usize] += 1;
        let mut ops = vec![LogOp::Append(entries)];
        if purge && first > 1 {
            // Steady state: the state machine has checkpointed what came before this Ready.
            ops.push(LogOp::Compact { first_kept_index: first, base_term: 1 });
        }
        committer.submit(WriteRequest::new(group, ready_number[group as usize], ops, reply.clone())).expect("submit");
    };
    for group in 1..=groups {
        submit(group);
    }
    let warmup_end = Instant::now() + Duration::from_secs_f64(args.warmup_seconds);
    let mut next_purge = Instant::now();
    let (mut durable_entries, mut started, mut measuring) = (0u64, Instant::now(), false);
    let (mut syncs_at_start, mut bytes_at_start, mut busy_at_start) = (0, 0, 0);
    loop {
        let now = Instant::now();
        if !measuring && now >= warmup_end {
            let stats = committer.stats();
            (syncs_at_start, bytes_at_start, busy_at_start) = (
                stats.syncs.load(Ordering::Relaxed),
                stats.bytes.load(Ordering::Relaxed),
                stats.sync_nanos.load(Ordering::Relaxed),
            );
            (started, measuring) = (now, true);
        }
        if measuring && now >= started + Duration::from_secs_f64(seconds) {
            break;
        }
        if purge && now >= next_purge {
            // Keep about two segments: purged files go to the recycle pool and rotation reuses them.
            committer.purge(2 * (segment_mib << 20)).expect("purge");
            next_purge = now + Duration::from_millis(100);
        }
        let done = persisted.recv_timeout(Duration::from_secs(10)).expect("the writer answers");
        if measuring {
            durable_entries += entries_per_ready;
        }
        submit(done.group_id);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = committer.stats();
    let syncs = (stats.syncs.load(Ordering::Relaxed) - syncs_at_start).max(1);
    let bytes = stats.bytes.load(Ordering::Relaxed) - bytes_at_start;
    let writer_busy = (stats.sync_nanos.load(Ordering::Relaxed) - busy_at_start) as f64 / 1e9 / elapsed;
    drop(committer);
    let _ = std::fs::remove_dir_all(dir);
    Outcome {
        entries_per_second: durable_entries as f64 / elapsed,
        mib_per_second: durable_entries as f64 * entry_bytes as f64 / elapsed / (1 << 20) as f64,
        syncs_per_second: syncs as f64 / elapsed,
        bytes_per_sync: bytes / syncs,
        writer_busy,
    }
}

/// A plain write + fdatasync loop writing `bytes_per_sync` per sync: the most the disk gives at that batch size.
/// `preallocated`: into a file already written (with zeros) and synced, rather than appending — on ext4 appends
/// pay for block allocation and a journal commit at every fdatasync, overwrites do not.
fn run_raw(dir: &Path, bytes_per_sync: u64, seconds: f64, preallocated: bool) -> f64 {
    std::fs::create_dir_all(dir).expect("bench dir");
    let path = dir.join("raw.bin");
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path).expect("raw file");
    let buffer = vec![b'y'; bytes_per_sync.max(1) as usize];
    // Enough room for the run at up to ~1.5 GiB/s (preallocated) and a cap on the file either way.
    let limit_bytes = ((seconds * 1.5 * (1u64 << 30) as f64) as u64).max(buffer.len() as u64 * 4);
    if preallocated {
        let zeros = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < limit_bytes {
            file.write_all_at(&zeros, offset).expect("preallocating");
            offset += zeros.len() as u64;
        }
        file.sync_all().expect("syncing the preallocated file");
    }
    let started = Instant::now();
    let mut offset = 0u64;
    while started.elapsed().as_secs_f64() < seconds && offset + buffer.len() as u64 <= limit_bytes {
        file.write_all_at(&buffer, offset).expect("raw write");
        offset += buffer.len() as u64;
        file.sync_data().expect("raw fdatasync");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = file.flush();
    let _ = std::fs::remove_file(&path);
    offset as f64 / elapsed / (1 << 20) as f64
}

fn run_recovery(dir: &Path, mib: u64) -> (u64, f64, u64) {
    let _ = std::fs::remove_dir_all(dir);
    let (mut wal, _) = Wal::open(dir, Arc::new(StdDisk), WalOptions::default()).expect("open WAL");
    let payload = Bytes::from(vec![b'r'; 1024]);
    let groups = 256u64;
    let mut next_index = vec![1u64; groups as usize + 1];
    let mut written = 0u64;
    while written < mib << 20 {
        let mut ops = Vec::new();
        for group in 1..=groups {
            let first = next_index[group as usize];
            let entries: Vec<Entry> = (first..first + 16)
                .map(|index| Entry { index, term: 1, data: payload.clone(), ..Default::default() })
                .collect();
            next_index[group as usize] += 16;
            written += 16 * 1024;
            ops.push((group, LogOp::Append(entries)));
        }
        wal.write(&ops).expect("write");
    }
    drop(wal);
    let started = Instant::now();
    let (wal, report) = Wal::open(dir, Arc::new(StdDisk), WalOptions::default()).expect("recover");
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(wal.group(1).expect("group 1").last_index(), next_index[1] - 1, "recovered everything");
    let _ = std::fs::remove_dir_all(dir);
    (report.bytes, elapsed, report.records)
}

fn main() {
    let args = Args::parse();
    let dir = Path::new(&args.dir);
    let (seconds, group_counts, sizes, recovery_mib): (f64, Vec<u64>, Vec<usize>, u64) = if args.quick {
        (1.0, vec![1, 16], vec![128], 64)
    } else {
        (args.seconds, vec![1, 16, 256, 4096], vec![16, 128, 4096], args.recovery_mib)
    };
    println!(
        "WAL group commit: each group keeps one Ready of {} entries in flight; durable = fdatasync'd; {}",
        args.entries_per_ready,
        if args.no_purge {
            "no purge (every segment a new file)"
        } else {
            "steady state (compact + purge, segments recycled)"
        }
    );
    println!(
        "{:>6} {:>7} {:>14} {:>9} {:>9} {:>12} {:>11} {:>7} {:>7} {:>15} {:>7}",
        "groups",
        "entry",
        "entries/s",
        "MiB/s",
        "syncs/s",
        "bytes/sync",
        "raw MiB/s",
        "of raw",
        "busy",
        "prealloc MiB/s",
        "of it"
    );
    for &groups in &group_counts {
        for &entry_bytes in &sizes {
            if args.only_entry_bytes.is_some_and(|only| only != entry_bytes) {
                continue;
            }
            let outcome = run_wal(dir, groups, entry_bytes, &args, seconds);
            let raw_mib = run_raw(dir, outcome.bytes_per_sync, seconds.min(2.0), false);
            let preallocated_mib = run_raw(dir, outcome.bytes_per_sync, seconds.min(2.0), true);
            println!(
                "{:>6} {:>6}B {:>14.0} {:>9.1} {:>9.0} {:>12} {:>11.1} {:>6.0}% {:>6.0}% {:>15.1} {:>6.0}%",
                groups,
                entry_bytes,
                outcome.entries_per_second,
                outcome.mib_per_second,
                outcome.syncs_per_second,
                outcome.bytes_per_sync,
                raw_mib,
                100.0 * outcome.mib_per_second / raw_mib,
                100.0 * outcome.writer_busy,
                preallocated_mib,
                100.0 * outcome.mib_per_second / preallocated_mib
            );
        }
    }
    let (bytes, elapsed, records) = run_recovery(dir, recovery_mib);
    println!(
        "recovery: replayed {:.0} MiB ({records} records) in {elapsed:.2} s ({:.0} MiB/s)",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / (1 << 20) as f64 / elapsed
    );
}
