//! `db-bench`: the embedded `Db` under load — by default 3 in-process replicas per group, 64 groups, 100 B values,
//! every write durable on a majority before it is acknowledged. Clients issue one request at a time each — as
//! threads on the blocking `Db`, or with `--async-clients` as tasks on one tokio thread using `AsyncDb` (what a
//! server would do: 256 waiting clients then cost no threads); writes/s and linearizable reads/s are reported
//! with latency percentiles.
//!
//! ```text
//! cargo run --release -p flotilla-benches --bin db-bench                              # 3 nodes, 64 groups
//! cargo run --release -p flotilla-benches --bin db-bench -- --async-clients           # clients as tokio tasks
//! cargo run --release -p flotilla-benches --bin db-bench -- --nodes 1 --groups 16     # the embedded default
//! ```
//!
//! Each phase also reports the process's CPU time per operation; `--metrics` prints the store's counters per
//! operation and its histograms after each phase.
//!
//! `--sequential` writes the keys in order (`key:000000000000`, `key:000000000001`, …: one range takes them all
//! until it splits), and `--ranges` then reopens the database, timing it, and reports its ranges' sizes against
//! the size bound (`--split-size-bytes-max`, 0: no splits by size):
//!
//! ```text
//! cargo run --release -p flotilla-benches --bin db-bench -- --nodes 1 --groups 16 --keys 10000000 --sequential --ranges
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use flotilla::{AsyncDb, Config, Db};
use flotilla_benches::metric_summary::MetricSummary;
use hdrhistogram::Histogram;

/// The allocator of the `flotilla` command, so that the figures are the ones it gets (`docs/benchmarks.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    #[arg(long, default_value_t = 64)]
    groups: u64,
    #[arg(long, default_value_t = 200_000)]
    keys: u64,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Client threads, each with one request in flight.
    #[arg(long, default_value_t = 256)]
    clients: usize,
    #[arg(long, default_value = "target/db-bench")]
    dir: String,
    /// Poller threads per node.
    #[arg(long, default_value_t = 2)]
    pollers: usize,
    /// Confirm every read with a heartbeat round (ReadIndex) instead of the leader's lease.
    #[arg(long)]
    read_index: bool,
    /// Clients as tasks on one tokio thread (through `AsyncDb`) instead of one thread each.
    #[arg(long)]
    async_clients: bool,
    /// The store's tick interval in milliseconds (elections and heartbeats are counted in ticks).
    #[arg(long, default_value_t = 100)]
    tick_ms: u64,
    /// Print the store's metrics after each phase (counters per operation, histograms' means).
    #[arg(long)]
    metrics: bool,
    /// Keys in order (`key:000000000042`) instead of scattered over the key space.
    #[arg(long)]
    sequential: bool,
    /// A range over this many bytes splits (0: never by size). Default: the database's (64 MiB).
    #[arg(long)]
    split_size_bytes_max: Option<u64>,
    /// After the reads: reopen the database (timed) and report its ranges' sizes.
    #[arg(long)]
    ranges: bool,
}

/// Key number `i`: scattered over the key space (a multiplicative hash), or in order.
fn key_of(i: u64, sequential: bool) -> Vec<u8> {
    if sequential {
        format!("key:{i:012}").into_bytes()
    } else {
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes().to_vec()
    }
}

/// Reopens the database in `dir`, timing the open and its first read, and reports its ranges: how many, and
/// their bytes of keys and values against `bound`.
fn report_ranges(dir: &str, config: Config, first_key: &[u8], bound: u64) {
    let started = Instant::now();
    let db = Db::open_with(dir, config).expect("reopen");
    let opened = started.elapsed().as_secs_f64();
    db.get(first_key).expect("a first read");
    let first_read = started.elapsed().as_secs_f64();
    println!("reopened in {opened:.2} s; first read served {first_read:.2} s after the open began");
    let ranges = db.ranges();
    let mut sizes: Vec<u64> = ranges
        .iter()
        .map(|range| {
            let pairs = db.scan(&range.start, &range.end, usize::MAX).expect("scan a range");
            pairs.iter().map(|(key, value)| (key.len() + value.len()) as u64).sum()
        })
        .collect();
    sizes.sort_unstable();
    let holding: Vec<u64> = sizes.iter().copied().filter(|&bytes| bytes > 0).collect();
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "{} ranges ({} holding data); bytes per range holding data: min {:.1} MiB, median {:.1} MiB, max {:.1} MiB (size bound {:.1} MiB)",
        ranges.len(),
        holding.len(),
        mib(holding.first().copied().unwrap_or(0)),
        mib(holding.get(holding.len() / 2).copied().unwrap_or(0)),
        mib(holding.last().copied().unwrap_or(0)),
        mib(bound)
    );
    db.close().expect("close");
}

/// Request latencies in µs, up to a minute.
fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn merge(histograms: Vec<Histogram<u64>>) -> Histogram<u64> {
    let mut merged = new_histogram();
    for histogram in histograms {
        merged.add(histogram).expect("same bounds");
    }
    merged
}

/// The CPU time this process has used (user and system, all threads), from `/proc/self/stat`; `None` where
/// that is not readable.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    const CLOCK_TICKS_PER_SECOND: f64 = 100.0; // USER_HZ, 100 on every Linux this runs on
    Some((ticks(11)? + ticks(12)?) as f64 / CLOCK_TICKS_PER_SECOND)
}

/// A finished phase: wall seconds, CPU seconds of the whole process (if known), request latencies in µs.
struct Phase {
    seconds: f64,
    cpu_seconds: Option<f64>,
    latency: Histogram<u64>,
}

/// Runs `op(i)` for `i < count` on `clients` threads.
fn run(count: u64, clients: usize, op: impl Fn(u64) + Sync) -> Phase {
    let next = AtomicU64::new(0);
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let histograms: Vec<Histogram<u64>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| {
                    let mut histogram = new_histogram();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return histogram;
                        }
                        let began = Instant::now();
                        op(i);
                        histogram.saturating_record(began.elapsed().as_micros() as u64);
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a client panicked")).collect()
    });
    finish(started, cpu_before, histograms)
}

fn finish(started: Instant, cpu_before: Option<f64>, histograms: Vec<Histogram<u64>>) -> Phase {
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu_before.zip(process_cpu_seconds()).map(|(before, after)| after - before);
    Phase { seconds, cpu_seconds, latency: merge(histograms) }
}

/// As [`run`], with the clients as tasks on a single-threaded tokio runtime. They share one histogram (one
/// thread runs them all, so its lock is never contended; a histogram per task would be 1,024 × 140 KiB to zero).
fn run_async<F, Fut>(count: u64, clients: usize, op: F) -> Phase
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a tokio runtime");
    let next = std::sync::Arc::new(AtomicU64::new(0));
    let histogram = std::sync::Arc::new(std::sync::Mutex::new(new_histogram()));
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (op, next, histogram) = (op.clone(), std::sync::Arc::clone(&next), std::sync::Arc::clone(&histogram));
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let began = Instant::now();
                    op(i).await;
                    histogram.lock().expect("histogram lock").saturating_record(began.elapsed().as_micros() as u64);
                }
            });
        }
        tasks.join_all().await
    });
    let histogram = std::mem::replace(&mut *histogram.lock().expect("histogram lock"), new_histogram());
    finish(started, cpu_before, vec![histogram])
}

fn report(what: &str, count: u64, phase: &Phase) {
    let ms = |q: f64| phase.latency.value_at_quantile(q) as f64 / 1000.0;
    let cpu = phase.cpu_seconds.map_or(String::new(), |cpu| {
        format!("; CPU {:.1} µs per operation ({:.2} cores busy)", cpu * 1e6 / count as f64, cpu / phase.seconds)
    });
    println!(
        "{what}: {count} in {:.2} s = {:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms{cpu}",
        phase.seconds,
        count as f64 / phase.seconds,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        phase.latency.max() as f64 / 1000.0
    );
}

fn main() {
    let args = Args::parse();
    let metrics = args.metrics.then(|| MetricSummary::install().expect("metrics recorder"));
    let print_metrics = |phase: &str| {
        if let Some(metrics) = &metrics {
            metrics.print(phase, args.keys);
        }
    };
    let _ = std::fs::remove_dir_all(&args.dir);
    let mut config = Config { nodes: args.nodes, groups: args.groups, ..Config::default() };
    config.store.batch.pollers = args.pollers;
    config.store.tick_interval = Duration::from_millis(args.tick_ms);
    if args.read_index {
        config.store.raft.read_mode = flotilla::raft::ReadMode::Safe;
    }
    if let Some(bytes) = args.split_size_bytes_max {
        config.store.split.size_bytes_max = bytes;
        config.store.split.size_check_written_bytes = (bytes / 8).max(1);
    }
    let sequential = args.sequential;
    let key = move |i: u64| key_of(i, sequential);
    let db = Db::open_with(&args.dir, config.clone()).expect("open");
    println!(
        "db-bench: {} node(s) in process, {} groups ({} replica(s) each), {} B values, {} clients, {} poller(s) per node, {} reads",
        args.nodes,
        args.groups,
        args.nodes,
        args.value_bytes,
        args.clients,
        args.pollers,
        if args.read_index || args.nodes == 1 { "ReadIndex" } else { "lease" }
    );
    // Warm-up: every group has elected its leader and served a request.
    for i in 0..args.groups * 4 {
        db.put(&key(u64::MAX - i), b"warm-up").expect("warm-up write");
    }
    if let Some(metrics) = &metrics {
        metrics.print("open and warm-up", args.groups * 4);
    }
    let value = vec![b'v'; args.value_bytes];
    if args.async_clients {
        let db = AsyncDb::new(db);
        let (writer, value_written) = (db.clone(), value.clone());
        let phase = run_async(args.keys, args.clients, move |i| {
            let (db, value) = (writer.clone(), value_written.clone());
            async move { db.put(&key(i), &value).await.expect("write") }
        });
        report("writes (durable)", args.keys, &phase);
        print_metrics("writes");
        let reader = db.clone();
        let phase = run_async(args.keys, args.clients, move |i| {
            let (db, value) = (reader.clone(), value.clone());
            async move { assert_eq!(db.get(&key(i)).await.expect("read"), Some(value), "read back key {i}") }
        });
        report("reads (linearizable)", args.keys, &phase);
        print_metrics("reads");
        db.close().expect("close");
    } else {
        let phase = run(args.keys, args.clients, |i| db.put(&key(i), &value).expect("write"));
        report("writes (durable)", args.keys, &phase);
        print_metrics("writes");
        let phase = run(args.keys, args.clients, |i| {
            assert_eq!(db.get(&key(i)).expect("read").as_deref(), Some(value.as_slice()), "read back key {i}");
        });
        report("reads (linearizable)", args.keys, &phase);
        print_metrics("reads");
        db.close().expect("close");
    }
    if args.ranges {
        report_ranges(&args.dir, config.clone(), &key(0), config.store.split.size_bytes_max);
    }
    std::thread::sleep(Duration::from_millis(10));
    let _ = std::fs::remove_dir_all(&args.dir);
}
