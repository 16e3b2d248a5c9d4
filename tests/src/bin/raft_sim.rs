//! `raft-sim`: runs the randomized deterministic simulation of the Raft core over many seeds, or replays one.
//!
//! ```text
//! cargo run --release --bin raft-sim -- --seeds 2000          # seeds 1..=2000
//! cargo run --release --bin raft-sim -- --seeds 500 --first 7000
//! cargo run --release --bin raft-sim -- --seed 1234 --verbose  # replay one seed exactly
//! ```
//! Exits non-zero on the first violation, printing the seed, the step and the replay command.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use flotilla_tests::raft_sim::{run, SimOptions};

#[derive(Parser)]
#[command(about = "Randomized deterministic simulation of Flotilla's Raft core")]
struct Args {
    /// Run this many seeds, starting at --first.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed of a --seeds run.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Replay exactly this seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Steps of the fault phase per seed.
    #[arg(long, default_value_t = 3000)]
    steps: u64,
    /// Print a report line per seed.
    #[arg(long)]
    verbose: bool,
    /// Print every message delivery (use with --seed).
    #[arg(long)]
    trace: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seeds: Vec<u64> = match args.seed {
        Some(seed) => vec![seed],
        None => (args.first..args.first + args.seeds).collect(),
    };
    let started = Instant::now();
    let mut totals = (0u64, 0u64, 0u64, 0u64);
    for &seed in &seeds {
        let options = SimOptions { fault_steps: args.steps, trace: args.trace, ..SimOptions::new(seed) };
        let outcome = std::panic::catch_unwind(|| run(&options)).unwrap_or_else(|panic| {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".to_string());
            Err(flotilla_tests::raft_sim::SimFailure { seed, step: 0, reason: format!("panicked: {reason}") })
        });
        match outcome {
            Ok(report) => {
                totals.0 += report.committed;
                totals.1 += report.crashes;
                totals.2 += report.conf_changes;
                totals.3 += report.reads_confirmed;
                if args.verbose {
                    println!("seed {seed}: {report:?}");
                }
            }
            Err(failure) => {
                let passed = seed - seeds[0];
                eprintln!("FAILED seed {} at step {}: {}", failure.seed, failure.step, failure.reason);
                eprintln!(
                    "replay: cargo run --release --bin raft-sim -- --seed {} --steps {} --verbose",
                    failure.seed, args.steps
                );
                println!("raft-sim: {passed} passed, 1 failed");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "raft-sim: {} seeds clean in {:.1}s ({} entries committed, {} crashes, {} membership changes, {} reads checked)",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        totals.0,
        totals.1,
        totals.2,
        totals.3
    );
    println!("raft-sim: {} passed, 0 failed", seeds.len());
    ExitCode::SUCCESS
}
