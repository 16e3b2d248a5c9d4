//! [`Mailboxes`]: where a node's replicas receive their messages, as the store's code sees it — the batch
//! system's [`Router`] when threads poll them, [`super::stepped::SteppedMailboxes`] when a caller runs the rounds
//! by hand (the store simulator). The host loop, the persisted forwarding, the replicas' lifecycle, ticks, node
//! liveness and log collection all go through this trait, so both run the same code.

use super::fsm::{PeerFsm, PeerMsg};
use crate::batch::{Router, SendError};

pub trait Mailboxes: Send + Sync + 'static {
    /// Queues `message` for group `group_id` without waiting (`Full`: back off; `NotFound`: no such replica).
    fn send(&self, group_id: u64, message: PeerMsg) -> Result<(), SendError<PeerMsg>>;
    /// Adds a replica; refused (and handed back) if the group has one.
    fn register(&self, group_id: u64, fsm: Box<PeerFsm>) -> Result<(), Box<PeerFsm>>;
    /// Removes a replica: later sends get `NotFound`. Returns the messages queued for it and never handled.
    fn unregister(&self, group_id: u64) -> Vec<PeerMsg>;
    /// The groups with a replica (a snapshot).
    fn ids(&self) -> Vec<u64>;
}

impl Mailboxes for Router<PeerFsm> {
    fn send(&self, group_id: u64, message: PeerMsg) -> Result<(), SendError<PeerMsg>> {
        Router::send(self, group_id, message)
    }

    fn register(&self, group_id: u64, fsm: Box<PeerFsm>) -> Result<(), Box<PeerFsm>> {
        Router::register(self, group_id, fsm)
    }

    fn unregister(&self, group_id: u64) -> Vec<PeerMsg> {
        // A poller may be in the replica's last turn: what the caller does next (a log restarted under a
        // replaced replica, a destroyed replica's data dropped) must not race it.
        Router::unregister_waiting(self, group_id, std::time::Duration::from_millis(200)).unwrap_or_default()
    }

    fn ids(&self) -> Vec<u64> {
        Router::ids(self)
    }
}

/// Delivers `message` even to a full mailbox, by waiting (for internal messages that must not be lost); a group
/// with no replica drops it.
pub(crate) fn deliver(mailboxes: &dyn Mailboxes, group_id: u64, mut message: PeerMsg) {
    loop {
        match mailboxes.send(group_id, message) {
            Ok(()) | Err(SendError::NotFound(_)) => return,
            Err(SendError::Full(back)) => {
                message = back;
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
    }
}

/// The transport lost its connection to node `node_id`: every replica here hears it (a hint: a full mailbox
/// drops it).
pub fn node_unreachable(mailboxes: &dyn Mailboxes, node_id: u64) {
    tell_every_replica(mailboxes, || PeerMsg::Unreachable { node_id });
}

/// Node liveness: node `node_id` is down. Every replica here hears it; those hibernating under a leader there
/// wake, to elect another. Never waits (the transport's tasks call it): a full mailbox drops it — that replica
/// has work, so it is awake — and liveness repeats the verdict every interval while the node stays silent.
pub fn node_down(mailboxes: &dyn Mailboxes, node_id: u64) {
    tell_every_replica(mailboxes, || PeerMsg::NodeDown { node_id });
}

/// Sends every replica a message `make` builds, without waiting: a full mailbox drops its copy.
fn tell_every_replica(mailboxes: &dyn Mailboxes, make: impl Fn() -> PeerMsg) {
    for group_id in mailboxes.ids() {
        let _ = mailboxes.send(group_id, make());
    }
}
