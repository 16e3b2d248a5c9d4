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
    /// Flush on the applying thread instead of the background flusher.
    #[arg(long)]
    inline_flush: bool,
    #[arg(long, default_value = "target/apply-bench")]
    dir: String,
}

fn main() {
    let args = Args::parse();
    let dir = std::path::Path::new(&args.dir);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("bench dir");
    let machine = Arc::new(
        StateMachine::open(&dir.join("state.redb"), StateMachineOptions { memtable_bytes_max: args.memtable_mib << 20, cache_bytes: args.cache_mib << 20, ..StateMachineOptions::default() })
            .expect("open state machine"),
    );
    let flusher = (!args.inline_flush).then(|| BackgroundFlusher::start(Arc::clone(&machine)));
    let value = vec![b'v'; args.value_bytes];
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut applied = vec![0u64; args.groups as usize];
    let started = Instant::now();
    let (mut written, mut flushes, mut flush_seconds) = (0u64, 0u64, 0f64);
    let mut last_report = Instant::now();
    while written < args.keys {
        let batch: Vec<GroupApply> = (0..args.groups)
            .map(|group| {
                let ops = (0..args.puts_per_group)
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        // Group g owns keys "g{g:02}/..."; keys are random within the range.
                        let key = format!("g{group:02}/{:016x}", rng).into_bytes();
                        KvOp::Put { key, value: value.clone() }
                    })
                    .collect();
                applied[group as usize] += 1;
                GroupApply { group_id: group + 1, ops, applied_index: applied[group as usize], applied_term: 1 }
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
        "runs at the end: {} ({} MiB of entries); compaction then settled in {:.1} s to {} runs ({} MiB); redb file {file_mib:.0} MiB",
        before.runs,
        before.run_bytes >> 20,
        settle_started.elapsed().as_secs_f64(),
        after.runs,
        after.run_bytes >> 20
    );
    drop(machine);
    let _ = std::fs::remove_dir_all(dir);
}
