//! Flotilla: a multi-raft sharded storage engine.
//!
//! Embed it with [`Db::open`] (see [`db`]; [`AsyncDb`] for async code on tokio). What lives where:
//! - [`db`]: the configuration, the errors, the `Db` and its requests (routed through `router::route`);
//! - `node.rs`: one node's engines and store, opened and stopped in one place;
//! - [`layout`]: a database directory's lock and its recorded layout;
//! - [`async_db`]: the same database for async code;
//! - [`server`]: `flotilla serve` — one node of a cluster in its own process (TCP transport, RESP, HTTP);
//! - [`resp`]: the Redis protocol, parsed with bounds and encoded (the server's requests, the client's replies);
//! - [`client`]: [`Client`], a cluster's client over RESP that sends each request to its range's leader;
//! - `splitter.rs`: the thread that proposes the splits the groups' leaders ask for (size and load triggers).
//!
//! The layers are re-exported below, keeping the dependency direction (public package → router → raftstore →
//! raft core, and → engine).

pub mod async_db;
pub mod client;
pub mod db;
mod db_routes;
pub mod keys;
pub mod layout;
mod merge;
mod node;
pub mod resp;
pub mod server;
mod splitter;

pub use async_db::AsyncDb;
pub use client::{BlockingClient, Client};
pub use db::{Config, Db, DbError, WriteBatch};

pub use flotilla_engine as engine;
pub use flotilla_raft as raft;
pub use flotilla_raftstore as raftstore;
pub use flotilla_router as router;
