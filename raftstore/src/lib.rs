//! Hosting of many Raft group replicas on one node.
//!
//! Each group replica is an FSM that owns its peer state and drives the pure Raft core ([`flotilla_raft`]); the
//! node's log and state machine are seen through the storage contract (`flotilla_engine::contract`), and which
//! engines run is the assembler's choice.
//!
//! - [`batch`]: the batch system — FSMs with bounded mailboxes polled by a small fixed pool in rounds
//!   (begin / handle / end), the shape every group replica runs in.
//! - [`command`]: the commands a group's log carries (puts, deletes, compare-and-sets, atomic per command) and
//!   applying committed entries into one state machine batch plus one outcome per waiting client.
//! - [`peer`]: one group replica's logic, sans I/O: writes, ReadIndex and lease reads, Readys, apply results,
//!   snapshot streams, leadership transfer, membership changes, hibernation; applying committed entries.
//! - [`message`]: what replicas of a group send each other (Raft messages, snapshot chunks and their acks).
//! - [`store`]: a node's group replicas in the batch system over the shared log and state machine — or run by
//!   hand, the same code, in the store simulator (`store::stepped`).
//! - [`range`]: range descriptors with epochs, the typed errors of requests routed to the wrong range or epoch,
//!   splits of a range, and the initial layout of an embedded store; [`range_claims`]: which group holds which
//!   keys on one node (splits and snapshot installs checked against each other).
//! - [`meta`]: the meta range — the cluster's routing table and node registry in a group of its own, over the
//!   system's keys (from `0xff` on) — and the rule by which published descriptors update it.
//! - [`split_check`]: where a range over its size bound should split (a scan of its data); [`load_split`]: where
//!   a range whose load stays over a bound should split (sampled request keys); [`split_trigger`]: when a
//!   group's leader asks its host to split it (by size or load).

pub use flotilla_engine as engine;
pub use flotilla_raft as raft;

pub mod batch;
pub mod command;
pub mod load_split;
pub mod message;
pub mod meta;
pub mod peer;
pub mod range;
pub mod range_claims;
pub mod split_check;
pub mod split_trigger;
pub mod store;
