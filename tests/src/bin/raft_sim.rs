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
use flotilla_tests::seed_runs::{panic_reason, SeedArgs};

#[derive(Parser)]
#[command(about = "Randomized deterministic simulation of Flotilla's Raft core")]
struct Args {
    #[command(flatten)]
    run: SeedArgs,
}

/// Fault-phase steps per seed unless `--steps` says otherwise.
const STEPS: u64 = 3000;

fn main() -> ExitCode {
    let args = Args::parse().run;
    let steps = args.steps.unwrap_or(STEPS);
    let seeds = args.list();
    let started = Instant::now();
    let mut totals = (0u64, 0u64, 0u64, 0u64, 0u64);
    for &seed in &seeds {
        let options = SimOptions { fault_steps: steps, trace: args.trace, ..SimOptions::new(seed) };
        let outcome = std::panic::catch_unwind(|| run(&options)).unwrap_or_else(|panic| {
            Err(flotilla_tests::raft_sim::SimFailure {
                seed,
                step: 0,
                reason: format!("panicked: {}", panic_reason(panic)),
            })
        });
        match outcome {
            Ok(report) => {
                totals.0 += report.committed;
                totals.1 += report.crashes;
                totals.2 += report.conf_changes;
                totals.3 += report.reads_confirmed;
                totals.4 += report.snapshots_requested;
                if args.verbose {
                    println!("seed {seed}: {report:?}");
                }
            }
            Err(failure) => {
                let passed = seed - seeds[0];
                eprintln!("FAILED seed {} at step {}: {}", failure.seed, failure.step, failure.reason);
                eprintln!(
                    "replay: cargo run --release --bin raft-sim -- --seed {} --steps {} --verbose",
                    failure.seed, steps
                );
                println!("raft-sim: {passed} passed, 1 failed");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "raft-sim: {} seeds clean in {:.1}s ({} entries committed, {} crashes, {} membership changes, {} reads checked, {} snapshots asked for)",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        totals.0,
        totals.1,
        totals.2,
        totals.3,
        totals.4
    );
    println!("raft-sim: {} passed, 0 failed", seeds.len());
    ExitCode::SUCCESS
}
