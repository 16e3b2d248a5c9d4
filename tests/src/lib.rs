//! Test infrastructure for Flotilla.
//!
//! - [`sim_node`]: one simulated replica (RawNode + MemStorage + state machine + an unsynced-write queue with
//!   crash semantics).
//! - [`network`]: the simulated network of both simulators (reordering, loss, duplication, partitions incl.
//!   one-way; random single deliveries or due-step deliveries).
//! - [`invariants`]: Raft's safety properties, checked after every step.
//! - [`cluster`]: a deterministic cluster for scenario tests with readable message traces.
//! - [`script`]: datadriven scenario scripts (`testdata/raft/*.txt`, `REWRITE=1` to regenerate).
//! - [`linearizability`]: the per-key linearizability checker (Wing–Gong–Lowe) for client histories.
//! - [`store_sim`]: the whole-store simulator (each node the production store run by hand, over the real WAL and
//!   state machine, under faults, with the linearizability checker; `store-sim` binary), and [`sim_engines`]: what
//!   it puts in place of a node's threads and sockets (a slow-disk log, an outbox transport, checkpoints).
//! - [`raft_sim`]: the seeded, replayable randomized simulation of the core (`raft-sim` binary).

pub mod cluster;
pub mod invariants;
pub mod linearizability;
pub mod network;
pub mod raft_sim;
pub mod script;
pub mod seed_runs;
pub mod sim_engines;
pub mod sim_node;
pub mod sim_rng;
pub mod store_sim;
