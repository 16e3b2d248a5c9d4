//! The transport seam of a node: where its replicas' messages go and where other nodes' messages come in.
//!
//! - [`Transport`]: the outbound side. A poller sends each envelope as its replicas produce them, then calls
//!   [`Transport::flush`] once at the end of its round (and the persisted forwarder after each batch of durable
//!   writes), so a network transport can put one round's messages to a node into one frame.
//! - [`StoreInbox`]: the inbound side — a node's router, and its replicas thread for groups it does not hold yet.
//! - [`NoTransport`]: a node whose groups have one replica each; [`InProcessTransport`]: several stores in one
//!   process (tests, benchmarks, the embedded multi-node `Db`). An envelope goes to the inbox of the node it
//!   names. A full mailbox drops the message rather than blocking the sending poller (two stores' pollers waiting
//!   on each other would deadlock); Raft treats it as a lost message and retries.
//!
//! Node-level messages (`Transport::send_node`: liveness heartbeats, `liveness.rs`; load figures later) travel
//! beside the envelopes; the TCP transport of the next issue carries both over one connection per node pair.

use std::collections::HashMap;

use parking_lot::RwLock;

use crossbeam_channel::Sender;

use std::sync::Arc;

use super::fsm::PeerMsg;
use super::mailboxes::Mailboxes;
use super::replicas::ReplicaTask;
use crate::batch::SendError;
use crate::message::Envelope;

/// Where a group's Raft messages go (another node, or another store in this process).
pub trait Transport: Send + Sync + 'static {
    fn send(&self, envelope: Envelope);
    /// A node-level message (liveness), beside the replicas' envelopes. Transports within one process, where
    /// nodes fail only when a test removes them, drop it.
    fn send_node(&self, _message: super::liveness::NodeMessage) {}
    /// A group's descriptor lists node `node_id` at `addr` (a node that joined the cluster after it was created:
    /// `Replica::addr`). A network transport adds it to the nodes it connects to; the others ignore it.
    fn node_listed(&self, _node_id: u64, _addr: &str) {}
    /// The round that sent the last envelopes is over: a transport that batches may put them on the wire now.
    fn flush(&self) {}
}

/// For a node whose groups have one replica each: nothing ever leaves it.
pub struct NoTransport;

impl Transport for NoTransport {
    fn send(&self, envelope: Envelope) {
        debug_assert!(
            false,
            "group {} has a message for node {} but this node has no transport",
            envelope.group_id, envelope.to_node
        );
    }
}

/// Where a node receives replica messages: its router, and the replicas thread for groups it does not hold.
#[derive(Clone)]
pub struct StoreInbox {
    pub(crate) mailboxes: Arc<dyn Mailboxes>,
    pub(crate) tasks: Sender<ReplicaTask>,
}

impl StoreInbox {
    /// Delivers without waiting; returns false if the message was dropped (a full mailbox or task queue).
    pub fn deliver(&self, envelope: Envelope) -> bool {
        match self.mailboxes.send(envelope.group_id, PeerMsg::Replica(Box::new(envelope))) {
            Ok(()) => true,
            Err(SendError::Full(_)) => false,
            Err(SendError::NotFound(PeerMsg::Replica(envelope))) => {
                self.tasks.try_send(ReplicaTask::Create(envelope)).is_ok()
            }
            Err(SendError::NotFound(_)) => unreachable!("the message sent comes back"),
        }
    }
}

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
