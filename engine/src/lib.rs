//! The node's durable state: one shared write-ahead log for every group replica on the node (group commit: one
//! fsync for many groups' writes) and one redb database holding the applied data of every group (the state machine).
//!
//! - [`contract`]: the storage contract — every trait and type the raftstore sees of the engines;
//! - [`disk`]: the file-system seam, with [`disk::SimDisk`] injecting crashes, torn writes, fsync errors and bit
//!   flips for tests;
//! - [`wal`]: segments, records, the per-group index, batch writes, recovery and group commit;
//! - [`log_engine`]: the trait the raftstore sees of the log ([`log_engine::LogEngine`]) and an in-memory
//!   implementation;
//! - [`state_machine`]: applied data in redb, as a log-structured merge of checksummed runs ([`lsm`]); with
//!   [`flusher`] (background flushes and compactions), [`snapshot`] (streamed out and installed) and
//!   [`kv_engine`] (the trait the raftstore sees of applied data, and an in-memory implementation);
//! - [`redb_sim`]: a redb backend that loses unsynced writes, for crash tests;
//! - [`decoders`]: every decoder of bytes read back from disk behind one entry point each, for fuzzing;
//! - [`panics`]: panics turned into errors where a thread or a dependency could panic.

pub mod contract;
pub mod decoders;
pub mod disk;
pub mod failure;
pub mod flusher;
pub mod kv_engine;
pub mod log_engine;
pub mod lsm;
pub mod panics;
pub mod redb_sim;
pub mod state_machine;
/// Snapshots streamed out of and installed into the state machine (`state_machine/snapshot.rs`).
pub use state_machine::snapshot;
pub mod wal;

pub use flotilla_raft::prelude::{Entry, HardState};
