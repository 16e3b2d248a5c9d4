//! `merge-bench`: what a split and a merge cost the writes of the range they change. Clients write 100 B values
//! at random keys of one range's worth of `user:…` keys, split by request in the middle; every few seconds the
//! right half is merged back into the left (`Db::merge_left`), and split off again (`Db::split_at`). Each write
//! of the right half's keys is timed and judged by when it ran: during a merge, during a split, or outside both;
//! the p50/p99/max of each, and of all of them, are reported (the issue's target: p99 during ≤ 2× p99 outside;
//! `--rounds 0` gives the run without changes to compare the whole run's p99 with).
//!
//! ```text
//! cargo run --release -p flotilla-benches --bin merge-bench                 # 3 in-process nodes, 5 rounds
//! cargo run --release -p flotilla-benches --bin merge-bench -- --nodes 1
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flotilla::{Config, Db};
use hdrhistogram::Histogram;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Keys written (half on each side of the boundary).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Client threads, each with one write in flight.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Merge-and-split rounds.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds of plain writing before, between and after the changes.
    #[arg(long, default_value_t = 3)]
    calm_seconds: u64,
    #[arg(long, default_value = "target/merge-bench")]
    dir: String,
}

fn key(i: u64) -> Vec<u8> {
    format!("user:{i:010}").into_bytes()
}

/// One timed write of the right half's keys: when it started and ended.
type Timed = (Instant, Instant);

fn main() {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    // One range at the start; no split or merge but the bench's own.
    let mut config = Config { nodes: args.nodes, groups: 1, ..Config::default() };
    config.store.split.size_bytes_max = 0;
    config.store.split.merge_size_bytes_max = 0;
    let db = Arc::new(Db::open_with(&args.dir, config).expect("opening the database"));
    let value = vec![b'v'; 100];
    for i in 0..args.keys {
        db.put(&key(i), &value).expect("loading");
    }
    let boundary = key(args.keys / 2);
    db.split_at(&boundary).expect("the first split");
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..args.clients)
        .map(|client| {
            let (db, stop, value, keys) = (Arc::clone(&db), Arc::clone(&stop), value.clone(), args.keys);
            std::thread::spawn(move || {
                let mut timed: Vec<Timed> = Vec::new();
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ client as u64;
                while !stop.load(Ordering::Relaxed) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let i = rng % keys;
                    let started = Instant::now();
                    db.put(&key(i), &value).expect("a write");
                    if i >= keys / 2 {
                        timed.push((started, Instant::now()));
                    }
                }
                timed
            })
        })
        .collect();
    let calm = Duration::from_secs(args.calm_seconds);
    let (mut merges, mut splits) = (Vec::new(), Vec::new());
    std::thread::sleep(calm);
    for _ in 0..args.rounds {
        let started = Instant::now();
        db.merge_left(&boundary).expect("a merge");
        merges.push((started, Instant::now()));
        std::thread::sleep(calm);
        let started = Instant::now();
        db.split_at(&boundary).expect("a split");
        splits.push((started, Instant::now()));
        std::thread::sleep(calm);
    }
    stop.store(true, Ordering::Relaxed);
    let timed: Vec<Timed> = clients.into_iter().flat_map(|client| client.join().expect("a client")).collect();
    let overlaps = |write: &Timed, windows: &[Timed]| windows.iter().any(|(from, to)| write.0 < *to && write.1 > *from);
    let mut histograms = [new_histogram(), new_histogram(), new_histogram(), new_histogram()];
    for write in &timed {
        histograms[3].record((write.1 - write.0).as_micros().max(1) as u64).expect("in range");
        let at = if overlaps(write, &merges) {
            0
        } else if overlaps(write, &splits) {
            1
        } else {
            2
        };
        histograms[at].record((write.1 - write.0).as_micros().max(1) as u64).expect("in range");
    }
    let took = |windows: &[Timed]| {
        let total: Duration = windows.iter().map(|(from, to)| *to - *from).sum();
        total.as_secs_f64() * 1000.0 / windows.len().max(1) as f64
    };
    println!(
        "merge-bench: {} nodes, {} keys, {} clients, {} rounds; a merge took {:.1} ms on average, a split {:.1} ms",
        args.nodes,
        args.keys,
        args.clients,
        args.rounds,
        took(&merges),
        took(&splits)
    );
    let names = ["during a merge", "during a split", "outside both", "all"];
    for (name, histogram) in names.iter().zip(&histograms) {
        println!(
            "  writes of the right half {name:<15} {:>8}  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            histogram.len(),
            histogram.value_at_quantile(0.5) as f64 / 1000.0,
            histogram.value_at_quantile(0.99) as f64 / 1000.0,
            histogram.max() as f64 / 1000.0
        );
    }
    drop(db);
    let _ = std::fs::remove_dir_all(&args.dir);
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}
