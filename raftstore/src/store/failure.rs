//! [`NodeFailure`]: why a node stopped, once one of its engines failed (a broken environment: disk gone,
//! corruption), and everything that must happen then — the reason printed and counted once, listeners told, every
//! replica woken to refuse the clients waiting on it.

use flotilla_engine::failure::{Failure, FailureListener};

use std::sync::Arc;

use super::fsm::PeerMsg;
use super::mailboxes::Mailboxes;

/// Why the node stopped, once its engines failed (a broken environment: disk gone, corruption). From then on
/// every request is refused with the reason; nothing more is written. Every FSM turn asks (one load of a flag).
#[derive(Default)]
pub struct NodeFailure {
    failure: Failure,
    /// The node's replicas, woken when it stops so that each refuses the clients waiting on it at once.
    mailboxes: std::sync::OnceLock<Arc<dyn Mailboxes>>,
}

impl NodeFailure {
    /// The reason the node stopped, if it did.
    pub fn reason(&self) -> Option<String> {
        self.failure.get()
    }

    /// Calls `listener` with the reason once the node stops (at once if it has).
    pub(crate) fn listen(&self, listener: FailureListener) {
        self.failure.listen(listener);
    }

    /// Where to wake the replicas from when the node stops (set once, when they run).
    pub(crate) fn wake_on_stop(&self, mailboxes: Arc<dyn Mailboxes>) {
        let _ = self.mailboxes.set(mailboxes);
    }

    /// Stops node `node_id` for a failed engine: the first reason sticks, is reported once (printed, counted,
    /// told to the listeners), and every replica is woken to refuse its waiting clients with it.
    pub(crate) fn fail(&self, node_id: u64, reason: String) {
        if !self.failure.set(reason.clone()) {
            return;
        }
        eprintln!("flotilla: node {node_id} stopped: {reason}");
        metrics::counter!("flotilla_node_failures_total").increment(1);
        if let Some(mailboxes) = self.mailboxes.get() {
            for group_id in mailboxes.ids() {
                let _ = mailboxes.send(group_id, PeerMsg::Tick); // a full mailbox is handled anyway
            }
        }
    }
}
