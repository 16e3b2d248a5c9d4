//! Flotilla: a multi-raft sharded storage engine.
//!
//! The embedded `Db` arrives with the raftstore issue; today this crate re-exports the layers so that the
//! dependency direction (public package → router → raftstore → raft core, and → engine) holds from day one.

pub use flotilla_engine as engine;
pub use flotilla_raft as raft;
pub use flotilla_raftstore as raftstore;
pub use flotilla_router as router;
