//! Tests of the `flotilla` command (they belong to the root package, which owns the binary).

mod cluster;
mod demo;
mod history;
mod join;
mod partition;
mod pause;
mod processes;
mod split;
mod wal;
