//! [`InProcessTransport`]: several stores in one process (tests, benchmarks, the embedded multi-node `Db`). A
//! group's replica ids are its nodes' ids, so a message goes to the router of the node named by its `to`.
//!
//! A full mailbox drops the message rather than blocking the sending poller (two stores' pollers waiting on
//! each other would deadlock); Raft treats it as a lost message and retries.

use std::collections::HashMap;

use parking_lot::RwLock;

use super::fsm::{PeerFsm, PeerMsg};
use super::handler::Transport;
use crate::batch::Router;
use crate::message::ReplicaMessage;

#[derive(Default)]
pub struct InProcessTransport {
    nodes: RwLock<HashMap<u64, Router<PeerFsm>>>,
}

impl InProcessTransport {
    pub fn new() -> InProcessTransport {
        InProcessTransport::default()
    }

    /// Makes node `node_id`'s groups reachable (call once its store has started).
    pub fn add_node(&self, node_id: u64, router: Router<PeerFsm>) {
        self.nodes.write().insert(node_id, router);
    }

    /// Makes a node unreachable (it stopped).
    pub fn remove_node(&self, node_id: u64) {
        self.nodes.write().remove(&node_id);
    }
}

impl Transport for InProcessTransport {
    fn send(&self, group_id: u64, message: ReplicaMessage) {
        let router = self.nodes.read().get(&message.to()).cloned();
        let delivered = router.is_some_and(|router| router.send(group_id, PeerMsg::Replica(Box::new(message))).is_ok());
        if !delivered {
            metrics::counter!("flotilla_transport_dropped_total").increment(1);
        }
    }
}
