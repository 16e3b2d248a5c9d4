//! The batch system: many finite-state machines (FSMs, one per group replica) polled by a small fixed pool of
//! threads, as in TiKV's batch-system.
//!
//! Why not one actor or task per group: measured on this machine, one actix actor or one tokio task with its own
//! timer per group costs 0.36–1.26 cores just to tick 100K groups every 100 ms. Here an idle FSM costs nothing but
//! its memory: it is touched only when a message arrives.
//!
//! - [`mailbox`]: an FSM's bounded mailbox and the cell it is parked in while idle; the notified flag that makes
//!   sure an FSM is scheduled once, and owned by one thread at a time (no lock around its state);
//! - [`router`]: FSM ids to mailboxes; `send` is how everything reaches an FSM;
//! - [`pool`]: the poller threads. A round takes the FSMs that have mail (up to `fsms_per_round_max`), calls
//!   [`PollHandler::begin`], then [`PollHandler::handle`] once per FSM with its messages, then
//!   [`PollHandler::end`] with all of them — the place for what is done once per round for every group touched
//!   (one WAL write and one fsync for all their Readys) — and finally parks them again.

pub mod mailbox;
pub mod pool;
pub mod router;

pub use mailbox::Fsm;
pub use pool::{BatchOptions, BatchSystem, PollHandler};
pub use router::{Router, SendError};
