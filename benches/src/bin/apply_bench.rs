//! `apply-bench`: the state machine's apply path. 64 groups apply 128 B puts of random keys (each group owns a
//! contiguous key range); the memtable flushes to redb in sorted durable transactions whenever it is over budget.
//! The clock runs until the last key is durably in redb (the final flush is included).
//!
//! ```text
//! cargo run --release -p flotilla-benches --bin apply-bench                 # 10 M keys
//! cargo run --release -p flotilla-benches --bin apply-bench -- --keys 1000000
//! ```

use std::time::Instant;

use clap::Parser;
use std::sync::Arc;

use flotilla_engine::flusher::BackgroundFlusher;
use flotilla_engine::state_machine::{GroupApply, KvOp, StateMachine, StateMachineOptions};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000_000)]
    keys: u64,
    #[arg(long, default_value_t = 64)]
    groups: u64,
    /// Puts per group per apply round (one round = one `apply` call covering every group).
    #[arg(long, default_value_t = 64)]
    puts_per_group: u64,
    #[arg(long, default_value_t = 128)]
    value_bytes: usize,
    #[arg(long, default_value_t = 64)]
    memtable_mib: u64,
    /// redb's page cache.
    #[arg(long, default_value_t = 1024)]
    cache_mib: usize,
    /// Point reads of written keys after the load.
    #[arg(long, default_value_t = 200_000)]
    reads: u64,
    /// Keys the point reads are drawn from at random (the first written ones): a working set read again and
    /// again, as a benchmark's `-r` makes it. 0: each read a different key, in the order they were written.
    #[arg(long, default_value_t = 0)]
    read_keys: u64,
    /// The state machine's read cache (`StateMachineOptions::read_cache_bytes`); 0 turns it off.
    #[arg(long, default_value_t = 64)]
    read_cache_mib: u64,
    /// Target size of a run's block.
    #[arg(long, default_value_t = 16)]
    block_kib: usize,
    /// Flush on the applying thread instead of the background flusher.
    #[arg(long)]
    inline_flush: bool,
    #[arg(long, default_value = "target/apply-bench")]
    dir: String,
}

/// The next random key of `group`: group g owns keys "g{g:02}/...", random within the range.
fn next_key(rng: &mut u64, group: u64) -> Vec<u8> {
    format!("g{group:02}/{:016x}", next_random(rng)).into_bytes()
}

/// The next number of an xorshift sequence.
fn next_random(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

fn main() {
    let args = Args::parse();
    let dir = std::path::Path::new(&args.dir);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("bench dir");
    let machine = Arc::new(
        StateMachine::open(
            &dir.join("state.redb"),
            StateMachineOptions {
                memtable_bytes_max: args.memtable_mib << 20,
                cache_bytes: args.cache_mib << 20,
                read_cache_bytes: args.read_cache_mib << 20,
                block_bytes_max: args.block_kib << 10,
                ..StateMachineOptions::default()
            },
        )
        .expect("open state machine"),
    );
    let flusher = (!args.inline_flush).then(|| BackgroundFlusher::start(Arc::clone(&machine)));
    let value = vec![b'v'; args.value_bytes];
    const SEED: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rng = SEED;
    let mut applied = vec![0u64; args.groups as usize];
    let started = Instant::now();
    let (mut written, mut flushes, mut flush_seconds) = (0u64, 0u64, 0f64);
    let mut last_report = Instant::now();
    while written < args.keys {
        let batch: Vec<GroupApply> = (0..args.groups)
            .map(|group| {
                let ops = (0..args.puts_per_group)
                    .map(|_| KvOp::Put { key: next_key(&mut rng, group), value: value.clone() })
                    .collect();
                applied[group as usize] += 1;
                GroupApply {
                    group_id: group + 1,
                    ops,
                    applied_index: applied[group as usize],
                    applied_term: 1,
                    range: None,
                }
            })
            .collect();
        written += args.groups * args.puts_per_group;
        let over_budget = machine.apply(batch).expect("apply");
        match &flusher {
            Some(flusher) => flusher.after_apply(over_budget).expect("background flush"),
            None if over_budget => {
                let flush_started = Instant::now();
                machine.flush().expect("flush");
                flush_seconds += flush_started.elapsed().as_secs_f64();
                flushes += 1;
            }
            None => {}
        }
        if last_report.elapsed().as_secs() >= 5 {
            eprintln!("  {written} keys, {:.0} keys/s so far", written as f64 / started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
    }
    let flush_started = Instant::now();
    match &flusher {
        Some(flusher) => flusher.flush_now().expect("final flush"),
        None => machine.flush().expect("final flush"),
    }
    flush_seconds += flush_started.elapsed().as_secs_f64();
    flushes += 1;
    let elapsed = started.elapsed().as_secs_f64();
    let file_mib = std::fs::metadata(dir.join("state.redb")).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64;
    println!(
        "apply: {written} puts of {} B from {} groups in {elapsed:.1} s = {:.0} keys/s durable in redb \
         ({} flushes; flush time on the applying thread {flush_seconds:.1} s; memtable {} MiB; cache {} MiB; redb file {file_mib:.0} MiB)",
        args.value_bytes,
        args.groups,
        written as f64 / elapsed,
        if args.inline_flush { flushes.to_string() } else { "background".to_string() },
        args.memtable_mib,
        args.cache_mib
    );
    drop(flusher);
    // Compaction may still owe work; what it costs to settle is part of the price of the apply rate above.
    let before = machine.stats().expect("stats");
    let settle_started = Instant::now();
    machine.compact_fully().expect("compaction");
    let after = machine.stats().expect("stats");
    let file_mib = std::fs::metadata(dir.join("state.redb")).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64;
    println!(
        "runs at the end: {} ({} MiB of entries); compaction then settled in {:.1} s to {} runs ({} MiB); redb file {file_mib:.0} MiB, \
         {} MiB allocated ({} MiB fragmented)",
        before.runs,
        before.run_bytes >> 20,
        settle_started.elapsed().as_secs_f64(),
        after.runs,
        after.run_bytes >> 20,
        after.allocated_bytes >> 20,
        after.fragmented_bytes >> 20
    );
    // Point reads of written keys (replaying the key sequence), from redb's cache: the cost of consulting the runs.
    let mut rng = SEED;
    let (reads, working_set) = if args.read_keys > 0 {
        let count = args.read_keys.min(written);
        let keys: Vec<Vec<u8>> =
            (0..count).map(|i| next_key(&mut rng, (i / args.puts_per_group) % args.groups)).collect();
        (args.reads, keys)
    } else {
        (args.reads.min(written), Vec::new())
    };
    let reads_started = Instant::now();
    for i in 0..reads {
        let generated;
        let key: &[u8] = if working_set.is_empty() {
            generated = next_key(&mut rng, (i / args.puts_per_group) % args.groups);
            &generated
        } else {
            &working_set[(next_random(&mut rng) % working_set.len() as u64) as usize]
        };
        assert!(machine.get(key).expect("get").is_some(), "a written key must be found");
    }
    let cycle = if working_set.is_empty() { reads } else { working_set.len() as u64 };
    let read_seconds = reads_started.elapsed().as_secs_f64();
    println!(
        "point reads: {reads} of {cycle} written keys in {read_seconds:.2} s = {:.0} gets/s (one thread; read cache \
         {} MiB)",
        reads as f64 / read_seconds,
        args.read_cache_mib
    );
    drop(machine);
    let _ = std::fs::remove_dir_all(dir);
}
