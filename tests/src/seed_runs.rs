//! What the simulators' command lines share: which seeds to run and how, and turning a panic into a reason.

/// Seeds to run: `--seeds N --first F`, or one `--seed S` to replay.
#[derive(clap::Args, Debug)]
pub struct SeedArgs {
    /// Run this many seeds, starting at --first.
    #[arg(long, default_value_t = 100)]
    pub seeds: u64,
    /// The first seed of a --seeds run.
    #[arg(long, default_value_t = 1)]
    pub first: u64,
    /// Replay exactly this seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps of the fault phase per seed (each simulator has its default).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Print a report line per seed.
    #[arg(long)]
    pub verbose: bool,
    /// Print every message delivery (use with --seed).
    #[arg(long)]
    pub trace: bool,
}

impl SeedArgs {
    pub fn list(&self) -> Vec<u64> {
        match self.seed {
            Some(seed) => vec![seed],
            None => (self.first..self.first + self.seeds).collect(),
        }
    }
}

/// The message of a caught panic.
pub fn panic_reason(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".to_string())
}
