//! The `flotilla` command. Subcommands arrive with the issues that build what they drive.

use clap::Parser;

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Flotilla: a multi-raft sharded storage engine")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    println!("flotilla {}: the embedded store and the server arrive with later issues.", env!("CARGO_PKG_VERSION"));
}
