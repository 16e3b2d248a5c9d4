//! The messages on a node-to-node connection (prost; the frame around each is `frame.rs`, the format in
//! `docs/wire-format.md`): the dialer's [`Hello`] and the answer [`HelloReply`], then [`Batch`]es — every
//! replica envelope and node message one node had for another when its writer drained the queue.

use flotilla_raftstore::message::{
    Envelope, HibernateRequest, RemovalNotice, ReplicaMessage, SnapshotAck, SnapshotChunk,
};

/// The protocol version this build speaks; a peer that speaks another is refused at the handshake.
pub const PROTOCOL_VERSION: u32 = 1;

/// The first frame on a connection, from the node that dialed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(string, tag = "1")]
    pub cluster_id: String,
    #[prost(uint64, tag = "2")]
    pub from_node: u64,
    /// The node the dialer believes it reached.
    #[prost(uint64, tag = "3")]
    pub to_node: u64,
    #[prost(uint32, tag = "4")]
    pub protocol_version: u32,
    /// Where the dialer itself listens (checked against the cluster's list: a second process started with a
    /// node's id elsewhere is refused).
    #[prost(string, tag = "5")]
    pub listen_addr: String,
}

/// The answer to a [`Hello`]: accepted, or refused with the reason (then the connection closes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(bool, tag = "1")]
    pub accepted: bool,
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// Everything one node had for another at one drain of its queue.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    #[prost(message, repeated, tag = "1")]
    pub envelopes: Vec<WireEnvelope>,
    /// Node liveness: the sender is up (one per tick interval).
    #[prost(bool, tag = "2")]
    pub heartbeat: bool,
}

/// An [`Envelope`] on the wire (the receiving node is the connection's other end).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireEnvelope {
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    #[prost(oneof = "Body", tags = "2, 3, 4, 5, 6")]
    pub body: Option<Body>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    #[prost(message, tag = "2")]
    Raft(flotilla_raft::Message),
    #[prost(message, tag = "3")]
    Chunk(SnapshotChunk),
    #[prost(message, tag = "4")]
    Ack(SnapshotAck),
    #[prost(message, tag = "5")]
    Hibernate(HibernateRequest),
    #[prost(message, tag = "6")]
    Removed(RemovalNotice),
}

impl WireEnvelope {
    pub fn from_envelope(envelope: Envelope) -> WireEnvelope {
        let body = match envelope.message {
            ReplicaMessage::Raft(message) => Body::Raft(message),
            ReplicaMessage::Chunk(chunk) => Body::Chunk(chunk),
            ReplicaMessage::Ack(ack) => Body::Ack(ack),
            ReplicaMessage::Hibernate(request) => Body::Hibernate(request),
            ReplicaMessage::Removed(notice) => Body::Removed(notice),
        };
        WireEnvelope { group_id: envelope.group_id, body: Some(body) }
    }

    /// The envelope, as node `to_node` received it from `from_node`; `None` if it carries no message.
    pub fn into_envelope(self, from_node: u64, to_node: u64) -> Option<Envelope> {
        let message = match self.body? {
            Body::Raft(message) => ReplicaMessage::Raft(message),
            Body::Chunk(chunk) => ReplicaMessage::Chunk(chunk),
            Body::Ack(ack) => ReplicaMessage::Ack(ack),
            Body::Hibernate(request) => ReplicaMessage::Hibernate(request),
            Body::Removed(notice) => ReplicaMessage::Removed(notice),
        };
        Some(Envelope { group_id: self.group_id, from_node, to_node, message })
    }
}
