//! # Flotilla's Raft core
//!
//! A complete Raft (election with pre-vote and check-quorum, pipelined replication with flow control and fast
//! backtracking, snapshots, ReadIndex and lease reads, leadership transfer, learners and joint consensus) as a
//! **pure, deterministic state machine**. It has no clock (its only time is [`RawNode::tick`]), no threads, no
//! files, no sockets and no randomness of its own (election timeouts come from a generator seeded through
//! [`Config::random_seed`]). Its only dependencies are `prost` and `bytes`; `clippy.toml` forbids the rest.
//!
//! ## The Ready contract
//!
//! Inputs: [`RawNode::tick`], [`RawNode::step`] (messages from peers), [`RawNode::propose`],
//! [`RawNode::read_index`], [`RawNode::propose_conf_change`], [`RawNode::transfer_leader`]. Output: a numbered
//! [`Ready`] whenever [`RawNode::has_ready`]. For each `Ready` #n, in this order:
//!
//! 1. **Persist** `snapshot` (install it), then `entries` (appending, replacing any conflicting suffix), then
//!    `hard_state` — after everything earlier `Ready`s asked to persist. This may happen asynchronously, and many
//!    replicas' writes may share one fsync.
//! 2. **Send** `messages` at once: they never depend on the unpersisted part of #n. In particular a leader sends
//!    its appends before its own write is durable.
//! 3. When the write is durable, call [`RawNode::on_persisted`]`(n)`; this declares every `Ready` `<= n` durable.
//!    Only now does the core (a) count the leader's own entries toward the commit quorum, (b) release the
//!    responses that claim something about durable state — append responses, vote responses, and a candidate's
//!    vote for itself — into the next `Ready`. So a follower acknowledges an append only after persisting it, a
//!    vote is persisted before it is answered, and a candidate becomes leader only once its own vote (hence its
//!    term) is durable, even when the other voters already make a majority: otherwise a crash could put it back
//!    in the previous term and let it lead the same term twice, with two different logs. A `Ready` with `must_sync == false` (only a commit-index change)
//!    may be acknowledged without syncing. With `Config::persisted_messages_in_ready` those responses (all but a
//!    candidate's vote for itself) come in #n's `messages_after_persist` instead, and the caller sends them once #n
//!    and every earlier `Ready` are durable — from whatever thread completes the write — while `on_persisted` may
//!    then wait for the replica's next turn unless [`RawNode::needs_prompt_persisted`].
//! 4. **Apply** `committed_entries` (already persisted locally, so a restarted replica never finds its state
//!    machine ahead of its log), calling [`RawNode::apply_conf_change`] for membership entries, then
//!    [`RawNode::on_applied`]. Apply may lag behind; the core never hands out an entry twice.
//!
//! Storage is seen through the read-only [`Storage`] trait: the caller makes persisted entries readable there
//! before it calls `on_persisted`. Entries not yet persisted are held by the core (`unstable.rs`).
//!
//! ## Membership
//!
//! A configuration takes effect on a replica when its entry is applied there. See `raft/membership.rs` for why
//! that is safe: one change at a time, no campaigning while a committed change is unapplied, and joint consensus
//! for anything beyond one voter.
//!
//! ## Leases and clocks
//!
//! With [`ReadMode::LeaseBased`] a leader serves reads without a heartbeat round while its lease holds. A follower
//! that hears from its leader (or has just restarted) ignores vote requests for `election_timeout_ticks` of its own
//! ticks (the check-quorum rule). The leader's lease, measured from the tick at which it sent a message that a
//! quorum echoed back, lasts `election_timeout_ticks - lease_margin_ticks` of *its* ticks. The assumption: tick
//! rates of replicas differ by at most a factor `(1 + ρ)` with `2ρ/(1+ρ) <= lease_margin_ticks /
//! election_timeout_ticks`; the default margin (2 of 10) allows ρ ≈ 11 %. Message delay only shortens the lease.
//! A leader that sends TimeoutNow gives up its lease for the rest of its term, because the forced election of a
//! transfer ignores leases.
//!
//! ## Where things live
//!
//! `message.rs` wire and persisted types; `config.rs`; `error.rs`; `storage.rs` the trait and [`MemStorage`];
//! `unstable.rs` and `raft_log.rs` the log; `progress.rs`, `progress_map.rs`, `inflights.rs`, `tracker.rs`,
//! `quorum.rs` the leader's view of followers and quorums; `conf_change.rs` computing configurations;
//! `read_only.rs` ReadIndex queue; `raft/` the state machine by feature; `raw_node.rs` the `Ready` interface.

mod conf_change;
mod config;
mod error;
mod inflights;
mod message;
mod progress;
mod progress_map;
mod quorum;
mod raft;
mod raft_log;
mod raw_node;
mod read_only;
mod rng;
mod storage;
mod tracker;
mod unstable;

pub use config::{Config, ReadMode};
pub use error::{DropReason, Error, Result, StorageError};
pub use message::*;
pub use progress::{Progress, ProgressState};
pub use progress_map::ProgressMap;
pub use raft::{Raft, ReadState, StateRole};
pub use raft_log::RaftLog;
pub use raw_node::{RawNode, Ready, SoftState, Status};
pub use rng::SeededRng;
pub use storage::{InitialState, MemStorage, Storage, StorageResult};
pub use tracker::{Configuration, ProgressTracker};

/// The types most callers need.
pub mod prelude {
    pub use crate::{
        ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Config, Entry, EntryType,
        HardState, MemStorage, Message, MessageType, RawNode, ReadMode, Ready, Snapshot, SnapshotMetadata, StateRole,
        Storage,
    };
}
