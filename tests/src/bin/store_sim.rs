//! `store-sim`: runs the whole-store simulation over many seeds, or replays one.
//!
//! ```text
//! cargo run --release --bin store-sim -- --seeds 1000          # seeds 1..=1000
//! cargo run --release --bin store-sim -- --seed 1234            # replay one seed exactly
//! ```
//! Exits non-zero on the first failure (a Raft invariant, a group that does not converge or serve, or a
//! history that is not linearizable), printing the seed, the step and the replay command.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use flotilla_tests::seed_runs::{panic_reason, SeedArgs};
use flotilla_tests::store_sim::{run, StoreSimFailure, StoreSimOptions, StoreSimReport};

#[derive(Parser)]
#[command(about = "Deterministic simulation of Flotilla's multi-group store, checked for linearizability")]
struct Args {
    #[command(flatten)]
    run: SeedArgs,
}

fn main() -> ExitCode {
    let args = Args::parse().run;
    let steps = args.steps.unwrap_or(StoreSimOptions::new(0).fault_steps);
    let seeds = args.list();
    let started = Instant::now();
    let mut total = StoreSimReport::default();
    for &seed in &seeds {
        let options = StoreSimOptions { fault_steps: steps, trace: args.trace, ..StoreSimOptions::new(seed) };
        let outcome = std::panic::catch_unwind(|| run(&options)).unwrap_or_else(|panic| {
            Err(StoreSimFailure { seed, step: 0, reason: format!("panicked: {}", panic_reason(panic)) })
        });
        match outcome {
            Ok(report) => {
                total.add(&report);
                if args.verbose {
                    println!("seed {seed}: {report:?}");
                }
            }
            Err(failure) => {
                eprintln!("FAILED seed {} at step {}: {}", failure.seed, failure.step, failure.reason);
                eprintln!(
                    "replay: cargo run --release --bin store-sim -- --seed {} --steps {steps} --verbose",
                    failure.seed
                );
                println!("store-sim: {} passed, 1 failed", seed - seeds[0]);
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "store-sim: {} seeds clean in {:.1}s ({} client operations checked for linearizability ({} reads served locally, {} of them while the node's pollers stood still), {} with unknown outcome, {} node crashes, {} torn writes ({} of them written unsynced), {} pauses, {} stall duels, {} leadership transfers, {} membership changes proposed ({} applied, {} replicas destroyed), {} splits proposed ({} applied; {} asked by the size and load triggers; {} client attempts routed again after one), {} merges asked of leaders ({} asks from the merge trigger; {} frozen, {} committed), the meta range's table matching every range at the end ({} publications routed by a host), {} log compactions, {} snapshots installed, {} replica ticks slept through)",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        total.operations,
        total.local_reads,
        total.local_reads_stalled,
        total.unknown,
        total.crashes,
        total.torn_writes,
        total.torn_writes_written,
        total.pauses,
        total.stall_duels,
        total.transfers,
        total.membership_changes,
        total.membership_changes_applied,
        total.replicas_destroyed,
        total.splits,
        total.splits_applied,
        total.splits_asked,
        total.reroutes,
        total.merges,
        total.merges_asked_by_trigger,
        total.merges_frozen,
        total.merges_committed,
        total.publications_by_host,
        total.compactions,
        total.snapshot_installs,
        total.ticks_slept
    );
    println!("store-sim: {} passed, 0 failed", seeds.len());
    ExitCode::SUCCESS
}
