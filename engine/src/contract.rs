//! The storage contract: everything the raftstore sees of a node's storage, in one place. The raftstore names
//! these and no implementation — which log engine (the group-commit WAL, the WAL written on the caller's thread,
//! the in-memory one) and which state machine (redb, in memory) a node runs is its assembler's choice (the
//! embedded `Db`'s `node.rs`, the simulators).
//!
//! - the log: [`LogEngine`] — writes submitted per group Ready as [`WriteRequest`]s of [`LogOp`]s, each completed
//!   through the submitter's own typed [`Completion`] once durable; reads for the Raft core; [`WalError`];
//! - applied data: [`KvEngine`] (and [`clear_group`], a removed replica's data dropped) — many groups' entries applied in one batch ([`GroupApply`] of [`KvOp`]s),
//!   reads, durable checkpoints and where replay starts ([`AppliedState`]), snapshots out ([`SnapshotReader`])
//!   and in; [`StateMachineError`];
//! - memory: [`Checkpointer`], told after every apply (the background flusher, or a simulator's own checkpoints);
//! - failure: [`FailureListener`], told when an engine stops on its own.

pub use crate::failure::FailureListener;
pub use crate::flusher::Checkpointer;
pub use crate::kv_engine::clear_group;
pub use crate::kv_engine::KvEngine;
pub use crate::log_engine::LogEngine;
pub use crate::snapshot::SnapshotReader;
pub use crate::state_machine::{AppliedState, GroupApply, KeyValue, KvOp, StateMachineError};
pub use crate::wal::group_commit::{Completion, WriteRequest};
pub use crate::wal::record::{LogOp, ENTRY_DATA_BYTES_MAX};
pub use crate::wal::WalError;
