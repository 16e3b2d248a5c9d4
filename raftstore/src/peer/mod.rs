//! One group replica's logic, sans I/O (design in `docs/architecture.md`, "peers and rounds"). Built up file by
//! file:
//!
//! - [`storage`]: the core's `Storage` over the node's shared log.

pub mod storage;

pub use storage::PeerStorage;
