//! The `flotilla` command: `serve` (one node of a cluster), `demo` (the embedded store at work) and the WAL
//! tools.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

/// Writes cost about a quarter less CPU than with glibc's allocator (`docs/benchmarks.md`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use flotilla_engine::disk::StdDisk;
use flotilla_engine::wal::{repair_truncate, Wal, WalError, WalOptions};

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Flotilla: a multi-raft sharded storage engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open the embedded store (the default configuration) in a directory, load keys from many client threads,
    /// read them all back, scan, close, reopen and check — printing what it did.
    Demo {
        /// Where the store lives (kept afterwards; run again to reuse it).
        #[arg(long, default_value = "flotilla-demo")]
        dir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        #[arg(long, default_value_t = 100)]
        value_bytes: usize,
        /// Client threads (each waits for its write to be durable before the next).
        #[arg(long, default_value_t = 64)]
        clients: usize,
    },
    /// Run one node of a cluster: `flotilla serve --id 1 --cluster 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003
    /// --resp-addr 127.0.0.1:6381 --data-dir data-1` (and the same for nodes 2 and 3), or `--config node.toml`.
    /// Restarting a node with the same command picks up its data. SIGTERM or Ctrl-C stops it cleanly.
    Serve(Box<flotilla::server::config::ServeSettings>),
    /// Read a key from a running cluster (any node's RESP address).
    Get {
        #[arg(long, default_value = "127.0.0.1:6379")]
        addr: String,
        key: String,
    },
    /// Write a key in a running cluster (durable on a majority when it returns).
    Put {
        #[arg(long, default_value = "127.0.0.1:6379")]
        addr: String,
        key: String,
        value: String,
    },
    /// Delete a key in a running cluster.
    Del {
        #[arg(long, default_value = "127.0.0.1:6379")]
        addr: String,
        key: String,
    },
    /// List keys and values in key order, `start <= key < end` (end empty: to the end).
    Scan {
        #[arg(long, default_value = "127.0.0.1:6379")]
        addr: String,
        #[arg(long, default_value = "")]
        start: String,
        #[arg(long, default_value = "")]
        end: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Split the range holding KEY so that KEY starts a range of its own, served by a new group on the same nodes
    /// (no data moves); then print the ranges.
    Split {
        #[arg(long, default_value = "127.0.0.1:6379")]
        addr: String,
        key: String,
    },
    /// Merge the range holding KEY into its left neighbour, one group then serving both (no data moves); then
    /// print the ranges.
    Merge {
        #[arg(long, default_value = "127.0.0.1:6379")]
        addr: String,
        key: String,
    },
    /// Print the cluster's ranges, their groups and leaders, and where each leader serves clients.
    Status {
        #[arg(long, default_value = "127.0.0.1:6379")]
        addr: String,
    },
    /// Recover a node's WAL as at startup (a torn tail is dropped, to be overwritten by the next write) and report
    /// what it holds; on corruption, print where and the repair command.
    WalCheck {
        /// The WAL directory (`<data dir>/wal`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Cut the WAL at a corrupt record and delete every later segment. What follows the cut is lost from this
    /// node; its groups' other replicas must still hold it. Run only what `wal-check` printed.
    WalRepair {
        #[arg(long)]
        dir: PathBuf,
        /// The segment id (the number in the file name).
        #[arg(long)]
        segment: u64,
        /// The byte offset of the first bad record in that segment.
        #[arg(long)]
        offset: u64,
    },
}

/// Runs a server node until SIGTERM or SIGINT.
fn serve(options: flotilla::server::ServeOptions) -> ExitCode {
    let server = match flotilla::server::Server::start(options) {
        Ok(server) => server,
        Err(error) => {
            eprintln!("flotilla serve: {error}");
            return ExitCode::from(2);
        }
    };
    let http = server.http_addr().map(|addr| format!(", HTTP on {addr}")).unwrap_or_default();
    println!("flotilla: serving RESP on {}{http}, other nodes on {}", server.resp_addr(), server.raft_addr());
    let signals = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a signal runtime");
    signals.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
    println!("flotilla: stopping");
    match server.shutdown() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flotilla serve: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `work` with a client of the cluster at `addr`; an error is printed and exits with 1.
fn with_client(
    addr: &str,
    work: impl FnOnce(&flotilla::BlockingClient) -> Result<(), flotilla::client::ClientError>,
) -> ExitCode {
    match flotilla::BlockingClient::connect(addr).and_then(|client| work(&client)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flotilla: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The routes as a table: one line per range, and the nodes leading how many.
fn status_table(routes: &[flotilla::client::Route]) -> String {
    // A key of printable ASCII as text, in quotes; any other in hex.
    let shown = |key: &[u8]| match key {
        [] => "-".to_string(),
        _ if key.iter().all(|b| b.is_ascii_graphic()) => format!("{:?}", String::from_utf8_lossy(key)),
        _ => format!("0x{}", key.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    };
    let mut out = format!("{:>6}  {:<18} {:<18} {:>6}  {}\n", "group", "start", "end", "leader", "leader serves at");
    for route in routes {
        out += &format!(
            "{:>6}  {:<18} {:<18} {:>6}  {}\n",
            route.group_id,
            shown(&route.start),
            shown(&route.end),
            route.leader,
            route.leader_addr.as_deref().unwrap_or("?")
        );
    }
    let mut leaders = std::collections::BTreeMap::<u64, usize>::new();
    for route in routes {
        *leaders.entry(route.leader).or_default() += 1;
    }
    for (node, count) in leaders {
        out += &format!("node {node} leads {count} of {} groups\n", routes.len());
    }
    out
}

fn segment_of(path: &std::path::Path) -> Option<u64> {
    path.file_name()?.to_str()?.strip_suffix(".wal")?.parse().ok()
}

fn main() -> ExitCode {
    let command = Cli::parse().command;
    // The WAL tools work on a database's files: never while it is open (recovery and repair rewrite them).
    let _lock = match &command {
        Command::WalCheck { dir } | Command::WalRepair { dir, .. } => {
            match flotilla::layout::lock_database_of(&StdDisk, dir) {
                Ok(lock) => lock,
                Err(error) => {
                    eprintln!("{error}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => None,
    };
    match command {
        Command::Serve(settings) => match settings.resolve() {
            Ok(options) => serve(options),
            Err(error) => {
                eprintln!("flotilla serve: {error}");
                ExitCode::from(2)
            }
        },
        Command::Get { addr, key } => with_client(&addr, |client| {
            match client.get(key.as_bytes())? {
                Some(value) => println!("{}", String::from_utf8_lossy(&value)),
                None => println!("(not found)"),
            }
            Ok(())
        }),
        Command::Put { addr, key, value } => with_client(&addr, |client| {
            client.put(key.as_bytes(), value.as_bytes())?;
            println!("OK");
            Ok(())
        }),
        Command::Del { addr, key } => with_client(&addr, |client| {
            println!("{}", if client.delete(key.as_bytes())? { "deleted" } else { "(not found)" });
            Ok(())
        }),
        Command::Scan { addr, start, end, limit } => with_client(&addr, |client| {
            for (key, value) in client.scan(start.as_bytes(), end.as_bytes(), limit)? {
                println!("{}\t{}", String::from_utf8_lossy(&key), String::from_utf8_lossy(&value));
            }
            Ok(())
        }),
        Command::Split { addr, key } => with_client(&addr, |client| {
            client.split(key.as_bytes())?;
            print!("{}", status_table(&client.routes()));
            Ok(())
        }),
        Command::Merge { addr, key } => with_client(&addr, |client| {
            client.merge_left(key.as_bytes())?;
            print!("{}", status_table(&client.routes()));
            Ok(())
        }),
        Command::Status { addr } => with_client(&addr, |client| {
            print!("{}", status_table(&client.routes()));
            Ok(())
        }),
        Command::Demo { dir, keys, value_bytes, clients } => match demo::run(&dir, keys, value_bytes, clients) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(error) => {
                eprintln!("demo failed: {error}");
                ExitCode::from(2)
            }
        },
        Command::WalCheck { dir } => match Wal::open(&dir, Arc::new(StdDisk), WalOptions::default()) {
            Ok((wal, report)) => {
                let groups = wal.group_ids().count();
                println!(
                    "WAL {} is healthy: {} segments, {} records, {} bytes, {groups} groups",
                    dir.display(),
                    report.segments,
                    report.records,
                    report.bytes
                );
                if let Some((path, offset, dropped)) = report.torn_tail {
                    println!(
                        "a torn write at the tail was dropped: {} at offset {offset} ({dropped} bytes)",
                        path.display()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(WalError::Corruption { path, offset, reason }) => {
                eprintln!("WAL corruption in {} at offset {offset}: {reason}", path.display());
                if let Some(segment) = segment_of(&path) {
                    eprintln!(
                        "to cut the WAL there (losing what follows on this node): flotilla wal-repair --dir {} --segment {segment} --offset {offset}",
                        dir.display()
                    );
                }
                ExitCode::from(2)
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::FAILURE
            }
        },
        Command::WalRepair { dir, segment, offset } => match repair_truncate(&dir, &StdDisk, segment, offset) {
            Ok(()) => {
                println!("cut segment {segment} at offset {offset} and removed every later segment");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::FAILURE
            }
        },
    }
}
