//! Placement, key routing and transport.
//!
//! - [`route`]: the table of ranges and their believed leaders, and the policy for one attempt's answer (retry,
//!   follow a leader hint, fail with a typed error, within a deadline), shared by everything that sends requests
//!   to groups: the embedded `Db` today, the network client and the server's forwarding next.
//!
//! Placement (ranges that split, merge and move, a meta range) and the node-to-node transport come with later
//! issues; the dependency direction is fixed: router → raftstore.

pub use flotilla_raftstore as raftstore;

pub mod route;
