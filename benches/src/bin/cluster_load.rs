//! `cluster-load`: writes against a running cluster the way a range-aware client does — each write sent straight
//! to the node leading its range (`flotilla::Client::put_many`: a connection's pipeline of writes grouped by leader,
//! one pipelined exchange per node). redis-benchmark instead sends every request to the node it is given, which
//! forwards what it does not lead: a hop that spreads the client work over every node whichever leads.
//!
//! `--clients` tasks each write `--pipeline` pairs at a time, at keys `user:0000000000` … drawn uniformly from
//! `--keys` (all in one range of a fresh cluster) — or, with `--sequential`, at monotonically increasing keys
//! (`user:0000000000`, `user:0000000001`, … from one counter shared by every client: the hot tail of
//! time-ordered keys) — 100 B values; after `--warmup-seconds` (not counted) it writes
//! for `--seconds` and prints the writes/s and each pipeline's latency. The routes are learned at the start and
//! every 5 s (a write sent by stale routes is forwarded by the node it reached: slower, never wrong).
//!
//! ```text
//! cargo run --release -p flotilla-benches --bin cluster-load -- --addr 127.0.0.1:6381,127.0.0.1:6382 --seconds 20
//! ```
//! `scripts/cluster-bench` runs it with `LOADER=client`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use parking_lot::Mutex;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// RESP addresses of the nodes, comma-separated; the clients take them in turn as their first node.
    #[arg(long, value_delimiter = ',', required = true)]
    addr: Vec<String>,
    /// Concurrent clients (each with one pipeline in flight).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Writes per pipeline.
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    /// Keys drawn from (`user:` and ten digits).
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Seconds of load before the measured part.
    #[arg(long, default_value_t = 0)]
    warmup_seconds: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Runtime threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Write monotonically increasing keys (one counter for all clients) instead of drawing them from `--keys`.
    #[arg(long)]
    sequential: bool,
    /// With `--sequential`: the first key's number (a measured run after a warm-up starts past what it wrote).
    #[arg(long, default_value_t = 0)]
    first_key: u64,
}

/// splitmix64: a fast, well-mixed sequence for drawing keys (each client seeded apart).
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn main() {
    let args = Arc::new(Args::parse());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("starting a runtime");
    let written = Arc::new(AtomicU64::new(0));
    let next_key = Arc::new(AtomicU64::new(args.first_key));
    let failed = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new(3).expect("histogram")));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup_seconds);
    let end = measure_from + Duration::from_secs(args.seconds);
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for index in 0..args.clients {
            let (args, written, failed, latency) = (args.clone(), written.clone(), failed.clone(), latency.clone());
            let next_key = next_key.clone();
            tasks.push(tokio::spawn(async move {
                let seed = &args.addr[index % args.addr.len()];
                let client = match flotilla::Client::connect(seed).await {
                    Ok(client) => client,
                    Err(error) => panic!("connecting to {seed}: {error}"),
                };
                let mut random = index as u64 * 7919 + 1;
                let value = vec![b'v'; args.value_bytes];
                let mut own = Histogram::<u64>::new(3).expect("histogram");
                loop {
                    let began = Instant::now();
                    if began >= end {
                        break;
                    }
                    // (The shared counter only for sequential keys: uniform ones stay free of it.)
                    let first = args.sequential.then(|| next_key.fetch_add(args.pipeline as u64, Ordering::Relaxed));
                    let keys: Vec<Vec<u8>> = (0..args.pipeline as u64)
                        .map(|i| match first {
                            Some(first) => first + i,
                            None => next_random(&mut random) % args.keys,
                        })
                        .map(|n| format!("user:{n:010}").into_bytes())
                        .collect();
                    let pairs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), value.as_slice())).collect();
                    let result = client.put_many(&pairs).await;
                    if began < measure_from {
                        continue;
                    }
                    match result {
                        Ok(()) => {
                            written.fetch_add(pairs.len() as u64, Ordering::Relaxed);
                            let _ = own.record(began.elapsed().as_micros() as u64);
                        }
                        Err(error) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("a pipeline failed: {error}");
                            }
                        }
                    }
                }
                latency.lock().add(&own).expect("same histogram bounds");
            }));
        }
        for task in tasks {
            task.await.expect("a client task");
        }
    });
    let seconds = end.duration_since(measure_from).as_secs_f64();
    let latency = latency.lock();
    let ms = |quantile: f64| latency.value_at_quantile(quantile) as f64 / 1000.0;
    println!(
        "writes: {:.0}/s over {seconds:.0} s ({} clients × {} pipelined); pipeline latency p50 {:.2} ms, p99 {:.2} ms, \
         max {:.2} ms; failed pipelines: {}",
        written.load(Ordering::Relaxed) as f64 / seconds,
        args.clients,
        args.pipeline,
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1000.0,
        failed.load(Ordering::Relaxed),
    );
}
