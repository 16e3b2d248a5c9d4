//! Hosting of many Raft group replicas on one node.
//!
//! Each group replica will be an actor that owns its peer state and drives the pure Raft core
//! ([`flotilla_raft`]); the node's shared WAL and state machine come from [`flotilla_engine`]. This crate is filled
//! by the raftstore issue; today it fixes the dependency direction: raftstore → raft core, raftstore → engine.

pub use flotilla_engine as engine;
pub use flotilla_raft as raft;
