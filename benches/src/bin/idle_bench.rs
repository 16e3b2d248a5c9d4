//! `idle-bench`: what many idle groups cost a node — resident memory, and CPU while nothing happens. Opens an
//! embedded `Db` with `--groups` groups (single-replica, or with `--nodes 3` replicated on three in-process
//! nodes), writes one key to each group (so each has elected and committed), waits for replicated groups to
//! hibernate, then samples the process's CPU time (`/proc/self/stat`) over `--seconds` of idleness. With several
//! nodes the process holds all of them: the figures are also given per node.
//!
//! ```text
//! cargo run --release -p flotilla-benches --bin idle-bench                       # 100,000 groups
//! cargo run --release -p flotilla-benches --bin idle-bench -- --groups 10000
//! cargo run --release -p flotilla-benches --bin idle-bench -- --nodes 3         # 100,000 groups × 3 replicas
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use flotilla::{Config, Db};

/// The allocator of the `flotilla` command, so that the figures are the ones it gets (`docs/benchmarks.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    groups: u64,
    /// In-process nodes, each with a replica of every group.
    #[arg(long, default_value_t = 1)]
    nodes: u64,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value = "target/idle-bench")]
    dir: String,
}

/// (CPU seconds used by this process so far, resident bytes).
fn usage() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("Linux /proc");
    let after_name = &stat[stat.rfind(')').expect("comm field") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the file: 12 and 13 after the command name's closing parenthesis.
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).expect("resident").parse().expect("a number");
    (ticks / 100.0, pages * 4096)
}

fn main() {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    let started = Instant::now();
    let config = Config {
        groups: args.groups,
        nodes: args.nodes,
        request_timeout: Duration::from_secs(60),
        ..Config::default()
    };
    let db = Db::open_with(&args.dir, config).expect("open");
    println!("opened {} groups in {:.1} s", db.groups(), started.elapsed().as_secs_f64());
    // Each group's first key (the initial layout's bounds never start with `ff`: each is a user's key as stored).
    let starts: Vec<Vec<u8>> = db.ranges().into_iter().map(|range| range.start).collect();
    let writers = 32u64;
    std::thread::scope(|scope| {
        for writer in 0..writers {
            let (db, starts) = (&db, &starts);
            scope.spawn(move || {
                for start in starts.iter().skip(writer as usize).step_by(writers as usize) {
                    db.put(start, b"x").expect("write");
                }
            });
        }
    });
    println!("one write to each group done after {:.1} s", started.elapsed().as_secs_f64());
    // Let the last flushes and compactions settle, and replicated groups hibernate (20 idle ticks of 100 ms).
    std::thread::sleep(Duration::from_secs(if args.nodes > 1 { 6 } else { 2 }));
    let (cpu_before, _) = usage();
    let measured = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    let (cpu_after, resident) = usage();
    let wall = measured.elapsed().as_secs_f64();
    let cpu_percent = 100.0 * (cpu_after - cpu_before) / wall;
    let nodes = args.nodes as f64;
    println!(
        "idle {} groups × {} replicas: {cpu_percent:.1} % of one core over {wall:.1} s; resident memory {:.0} MiB ({:.1} KiB per replica); per node: {:.1} % of a core, {:.0} MiB",
        args.groups,
        args.nodes,
        resident as f64 / (1 << 20) as f64,
        resident as f64 / 1024.0 / (args.groups * args.nodes) as f64,
        cpu_percent / nodes,
        resident as f64 / (1 << 20) as f64 / nodes
    );
    drop(db);
    let _ = std::fs::remove_dir_all(&args.dir);
}
