//! The node's durable state: one shared write-ahead log for every group replica on the node (group commit: one
//! fsync for many groups' writes) and one redb database holding the applied data of every group.
//!
//! This crate is filled by the engine issue; for now it only fixes its place in the dependency graph: it depends
//! on the Raft core for the entry and hard-state types, and nothing below the public package depends on anything
//! above it.

pub use flotilla_raft::prelude::{Entry, HardState};
