//! Flotilla: a multi-raft sharded storage engine.
//!
//! Embed it with [`Db::open`] (see [`db`]; [`AsyncDb`] for async code on tokio); the layers are re-exported below, keeping the dependency direction
//! (public package → router → raftstore → raft core, and → engine).

pub mod async_db;
pub mod db;
pub mod layout;

pub use async_db::AsyncDb;
pub use db::{Config, Db, DbError, WriteBatch};

pub use flotilla_engine as engine;
pub use flotilla_raft as raft;
pub use flotilla_raftstore as raftstore;
pub use flotilla_router as router;
