//! Placement, key routing and transport.
//!
//! - [`route`]: the table of ranges and their believed leaders, and the policy for one attempt's answer (retry,
//!   follow a leader hint, fail with a typed error, within a deadline), shared by everything that sends requests
//!   to groups: the embedded `Db` today, the network client and the server's forwarding next.
//!
//! - [`transport`]: the node-to-node TCP transport (one connection per node pair and direction for all groups,
//!   frames of batches, a handshake, bounded queues, node liveness).
//!
//! Placement (ranges that split, merge and move, a meta range) comes with a later issue; the dependency direction
//! is fixed: router → raftstore.

pub use flotilla_raftstore as raftstore;

pub mod route;
pub mod transport;
