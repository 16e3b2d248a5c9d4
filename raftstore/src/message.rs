//! What one replica of a group sends another: the Raft core's messages, the snapshot streams that run beside the
//! core (snapshot *data* never goes through it; see `peer/snapshot.rs`), and hibernation requests
//! (`peer/hibernate.rs`). Prost messages, so that the node
//! router can put them on the wire as they are.

use bytes::Bytes;
use flotilla_raft::Message;

use crate::range::RangeDescriptor;

/// One chunk of a snapshot stream, from the leader's replica to a lagging one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotChunk {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub to: u64,
    /// The sender's term: a stream of a deposed leader is refused.
    #[prost(uint64, tag = "3")]
    pub term: u64,
    /// Names one stream of the sender within its term (a new stream replaces an unfinished one).
    #[prost(uint64, tag = "4")]
    pub stream_id: u64,
    /// 0, 1, 2, … within the stream.
    #[prost(uint64, tag = "5")]
    pub sequence: u64,
    /// The state machine's encoded chunk (checksummed; `flotilla_engine::snapshot`).
    #[prost(bytes = "bytes", tag = "6")]
    pub data: Bytes,
    /// On the last chunk only: the core's snapshot message (index, term, configuration), stepped once every chunk
    /// is in.
    #[prost(message, optional, tag = "7")]
    pub message: Option<Message>,
    /// On chunk 0 only: the group's range descriptor as of the snapshot (a replica created empty learns its
    /// range and members from it).
    #[prost(message, optional, tag = "8")]
    pub descriptor: Option<RangeDescriptor>,
}

/// The receiver's answer to a snapshot stream (flow control and completion).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotAck {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub to: u64,
    #[prost(uint64, tag = "3")]
    pub term: u64,
    #[prost(uint64, tag = "4")]
    pub stream_id: u64,
    /// How many chunks of the stream arrived in order (all of them: the stream is done).
    #[prost(uint64, tag = "5")]
    pub received: u64,
    /// The receiver gave the stream up (stale, damaged, or it cannot install now): the sender stops.
    #[prost(bool, tag = "6")]
    pub rejected: bool,
}

/// A leader with nothing to do asks its followers to stop ticking with it (see `peer/hibernate.rs`). A follower
/// agrees only if its log ends exactly where the leader's does and it knows the same commit index.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HibernateRequest {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub to: u64,
    #[prost(uint64, tag = "3")]
    pub term: u64,
    /// The leader's last index and that entry's term.
    #[prost(uint64, tag = "4")]
    pub index: u64,
    #[prost(uint64, tag = "5")]
    pub log_term: u64,
    #[prost(uint64, tag = "6")]
    pub commit: u64,
}

/// Everything that travels between two replicas of one group.
/// From a member of a group to a replica that messaged it but that its configuration does not list: the
/// sender's descriptor, from which the receiver can tell whether it was removed meanwhile (a replica that missed
/// the news of its own removal would otherwise live on). See `Peer::on_removal_notice`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RemovalNotice {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub to: u64,
    #[prost(message, optional, tag = "3")]
    pub descriptor: Option<RangeDescriptor>,
}

/// From a replica of a range frozen for a merge to its leader: its state machine holds the replica's first state
/// durably, so a crash can never leave it without a range under a merge that counts on it (`peer/merge.rs`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MergeReady {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub to: u64,
    /// The freeze entry's index (until protocol version 2: the decision's, confirmed applied and durably
    /// committed).
    #[prost(uint64, tag = "3")]
    pub frozen_index: u64,
}

/// From a replica to its group's leader: propose this command, asked of the group by another group through its
/// replica on the same node — a merge step (`peer/merge.rs`), or a publication in the meta range
/// (`peer/publish.rs`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AskMessage {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub to: u64,
    #[prost(message, optional, tag = "3")]
    pub command: Option<crate::command::Command>,
}

/// To a replica of a group whose replica on the sender's node ended: the entry at `(decided_index,
/// decided_term)` committed — the group's merge decision, where a merge ended it (the other members it could hear
/// that from are gone: `peer/merge.rs`, step 5), or the last entry that replica applied, where it was removed
/// (`Replicas::answer_ended`). A replica whose log holds that entry commits up to it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DecisionNotice {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub to: u64,
    #[prost(uint64, tag = "3")]
    pub decided_index: u64,
    #[prost(uint64, tag = "4")]
    pub decided_term: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ReplicaMessage {
    Raft(Message),
    /// Boxed: with its range descriptor, far larger than every other variant.
    Chunk(Box<SnapshotChunk>),
    Ack(SnapshotAck),
    Hibernate(HibernateRequest),
    Removed(RemovalNotice),
    MergeReady(MergeReady),
    Ask(AskMessage),
    Decided(DecisionNotice),
}

impl ReplicaMessage {
    pub fn from(&self) -> u64 {
        match self {
            ReplicaMessage::Raft(message) => message.from,
            ReplicaMessage::Chunk(chunk) => chunk.from,
            ReplicaMessage::Ack(ack) => ack.from,
            ReplicaMessage::Hibernate(request) => request.from,
            ReplicaMessage::Removed(notice) => notice.from,
            ReplicaMessage::MergeReady(ready) => ready.from,
            ReplicaMessage::Ask(ask) => ask.from,
            ReplicaMessage::Decided(notice) => notice.from,
        }
    }

    pub fn to(&self) -> u64 {
        match self {
            ReplicaMessage::Raft(message) => message.to,
            ReplicaMessage::Chunk(chunk) => chunk.to,
            ReplicaMessage::Ack(ack) => ack.to,
            ReplicaMessage::Hibernate(request) => request.to,
            ReplicaMessage::Removed(notice) => notice.to,
            ReplicaMessage::MergeReady(ready) => ready.to,
            ReplicaMessage::Ask(ask) => ask.to,
            ReplicaMessage::Decided(notice) => notice.to,
        }
    }
}

/// A replica message on its way between nodes: the transport routes by node, the receiving node by group (and
/// learns from `from_node` where the sending replica lives, for replicas its descriptor does not list yet).
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    pub group_id: u64,
    pub from_node: u64,
    pub to_node: u64,
    pub message: ReplicaMessage,
}
