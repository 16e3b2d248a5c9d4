//! The node's durable state: one shared write-ahead log for every group replica on the node (group commit: one
//! fsync for many groups' writes) and, next, one redb database holding the applied data of every group.
//!
//! - [`disk`]: the file-system seam, with [`disk::SimDisk`] injecting crashes, torn writes, fsync errors and bit
//!   flips for tests;
//! - [`wal`]: segments, records, the per-group index, batch writes, recovery and group commit;
//! - [`log_engine`]: the trait the raftstore sees ([`log_engine::LogEngine`]) and an in-memory implementation;
//! - [`decoders`]: every decoder of bytes read back from disk behind one entry point each, for fuzzing.

pub mod decoders;
pub mod disk;
pub mod flusher;
pub mod kv_engine;
pub mod log_engine;
pub mod lsm;
pub mod panics;
pub mod redb_sim;
pub mod snapshot;
pub mod state_machine;
pub mod wal;

pub use flotilla_raft::prelude::{Entry, HardState};
