//! [`InProcessTransport`]: several stores in one process (tests, benchmarks, the embedded multi-node `Db`). An
//! envelope goes to the inbox of the node it names (its router, or its replicas thread for a group it does not
//! hold yet).
//!
//! A full mailbox drops the message rather than blocking the sending poller (two stores' pollers waiting on
//! each other would deadlock); Raft treats it as a lost message and retries.

use std::collections::HashMap;

use parking_lot::RwLock;

use super::handler::Transport;
use super::replicas::StoreInbox;
use crate::message::Envelope;

#[derive(Default)]
pub struct InProcessTransport {
    nodes: RwLock<HashMap<u64, StoreInbox>>,
}

impl InProcessTransport {
    pub fn new() -> InProcessTransport {
        InProcessTransport::default()
    }

    /// Makes node `node_id`'s groups reachable (call once its store has started).
    pub fn add_node(&self, node_id: u64, inbox: StoreInbox) {
        self.nodes.write().insert(node_id, inbox);
    }

    /// Makes a node unreachable (it stopped).
    pub fn remove_node(&self, node_id: u64) {
        self.nodes.write().remove(&node_id);
    }
}

impl Transport for InProcessTransport {
    fn send(&self, envelope: Envelope) {
        // Delivering never blocks, so it runs under the read lock (no clone of the inbox per message).
        let nodes = self.nodes.read();
        let delivered = nodes.get(&envelope.to_node).is_some_and(|inbox| inbox.deliver(envelope));
        if !delivered {
            metrics::counter!("flotilla_transport_dropped_total").increment(1);
        }
    }
}
