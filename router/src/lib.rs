//! Placement, key routing and transport.
//!
//! Key ranges map to groups through a range table with epochs; the transport multiplexes every group over one
//! connection per node pair. Filled by later issues; today it fixes the dependency direction: router → raftstore.

pub use flotilla_raftstore as raftstore;
