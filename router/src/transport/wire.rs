//! The messages on a node-to-node connection (prost; the frame around each is `frame.rs`, the format in
//! `docs/wire-format.md`): the dialer's [`Hello`] and the answer [`HelloReply`], then [`Batch`]es — every
//! replica envelope and node message one node had for another when its writer drained the queue.

use flotilla_raftstore::message::{
    AskMessage, DecisionNotice, Envelope, HibernateRequest, MergeReady, RemovalNotice, ReplicaMessage, SnapshotAck,
    SnapshotChunk,
};
use flotilla_raftstore::peer::PeerError;
use flotilla_raftstore::raft::DropReason;
use flotilla_raftstore::range::{RangeDescriptor, RangeEpoch, RangeError};

/// The protocol version this build speaks; a peer that speaks another is refused at the handshake. 2: a
/// `MergeReady` names the freeze it answers, not the decision; 3: a log entry may batch writes (the `Command`'s
/// field 7, which a node of version 2 would apply as an empty command: `docs/wire-format.md`).
pub const PROTOCOL_VERSION: u32 = 3;

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
    /// Where the dialer serves clients (its RESP address; empty if none), so that every node can tell clients
    /// where each node is.
    #[prost(string, tag = "6")]
    pub client_addr: String,
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
    /// Client requests forwarded to this node, and answers to those it forwarded.
    #[prost(message, repeated, tag = "3")]
    pub requests: Vec<ForwardRequest>,
    #[prost(message, repeated, tag = "4")]
    pub replies: Vec<ForwardReply>,
}

/// An [`Envelope`] on the wire (the receiving node is the connection's other end).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireEnvelope {
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    #[prost(oneof = "Body", tags = "2, 3, 4, 5, 6, 7, 8")]
    pub body: Option<Body>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    #[prost(message, tag = "2")]
    Raft(flotilla_raft::Message),
    #[prost(message, boxed, tag = "3")]
    Chunk(Box<SnapshotChunk>),
    #[prost(message, tag = "4")]
    Ack(SnapshotAck),
    #[prost(message, tag = "5")]
    Hibernate(HibernateRequest),
    #[prost(message, tag = "6")]
    Removed(RemovalNotice),
    #[prost(message, tag = "7")]
    MergeReady(MergeReady),
    #[prost(message, tag = "8")]
    Ask(AskMessage),
    #[prost(message, tag = "9")]
    Decided(DecisionNotice),
}

impl WireEnvelope {
    pub fn from_envelope(envelope: Envelope) -> WireEnvelope {
        let body = match envelope.message {
            ReplicaMessage::Raft(message) => Body::Raft(message),
            ReplicaMessage::Chunk(chunk) => Body::Chunk(chunk),
            ReplicaMessage::Ack(ack) => Body::Ack(ack),
            ReplicaMessage::Hibernate(request) => Body::Hibernate(request),
            ReplicaMessage::Removed(notice) => Body::Removed(notice),
            ReplicaMessage::MergeReady(ready) => Body::MergeReady(ready),
            ReplicaMessage::Ask(ask) => Body::Ask(ask),
            ReplicaMessage::Decided(notice) => Body::Decided(notice),
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
            Body::MergeReady(ready) => ReplicaMessage::MergeReady(ready),
            Body::Ask(ask) => ReplicaMessage::Ask(ask),
            Body::Decided(notice) => ReplicaMessage::Decided(notice),
        };
        Some(Envelope { group_id: self.group_id, from_node, to_node, message })
    }
}

/// A client's request for a group the receiving node is believed to lead, forwarded by a node that does not lead
/// it (a server's RESP or HTTP request); answered by a [`ForwardReply`] with the same `id`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ForwardRequest {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub group_id: u64,
    #[prost(oneof = "ForwardOp", tags = "3, 4, 5, 6, 7, 8, 9, 10")]
    pub op: Option<ForwardOp>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ForwardOp {
    /// A write: the command as the group's log will hold it.
    #[prost(message, tag = "3")]
    Write(flotilla_raftstore::command::Command),
    /// A linearizable read of one key.
    #[prost(bytes = "vec", tag = "4")]
    Get(Vec<u8>),
    /// A linearizable scan of the group's part of `[start, end)`.
    #[prost(message, tag = "5")]
    Scan(ScanRange),
    /// A learner replica for a node joining the cluster (`flotilla serve --join`); answered done once applied,
    /// also if the group has it already.
    #[prost(message, tag = "6")]
    AddLearner(AddLearner),
    /// A split of the group's range at this key (`flotilla split`): the node that leads the group takes the new
    /// group's ids and proposes it; answered done once applied there.
    #[prost(bytes = "vec", tag = "7")]
    SplitAt(Vec<u8>),
    /// A step of a merge (`flotilla merge`): proposed as it is; answered with the range after it.
    #[prost(message, boxed, tag = "8")]
    Merge(Box<flotilla_raftstore::command::MergeCommand>),
    /// `SplitAt`, asked by a split trigger rather than by request: the new range is not sticky (the merge
    /// trigger may undo it).
    #[prost(bytes = "vec", tag = "9")]
    TriggeredSplitAt(Vec<u8>),
    /// Linearizable reads of several keys of the group (a pipeline's GETs): answered with their `Values`, in
    /// order.
    #[prost(message, tag = "10")]
    Gets(Keys),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Keys {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub keys: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AddLearner {
    #[prost(uint64, tag = "1")]
    pub node_id: u64,
    #[prost(uint64, tag = "2")]
    pub replica_id: u64,
    /// Where the node listens for the other nodes.
    #[prost(string, tag = "3")]
    pub addr: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ScanRange {
    #[prost(bytes = "vec", tag = "1")]
    pub start: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub end: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub limit: u64,
    /// The range's epoch as the forwarding node routed by (the scan is refused if the range changed since).
    #[prost(message, optional, tag = "4")]
    pub epoch: Option<RangeEpoch>,
}

/// The answer to a [`ForwardRequest`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct ForwardReply {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(oneof = "ForwardResult", tags = "2, 3, 4, 5, 6, 7, 8, 9")]
    pub result: Option<ForwardResult>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ForwardResult {
    /// The write applied; every operation took effect.
    #[prost(bool, tag = "2")]
    Done(bool),
    /// A compare-and-set's precondition failed at operation `op`; the current value.
    #[prost(message, tag = "3")]
    PreconditionFailed(PreconditionFailed),
    #[prost(message, tag = "4")]
    Value(OptionalValue),
    #[prost(message, tag = "5")]
    Pairs(Pairs),
    /// Refused: the replica's typed error, as [`Refusal`].
    #[prost(message, tag = "6")]
    Refused(Refusal),
    /// A split applied: the new group's range.
    #[prost(message, tag = "7")]
    Split(flotilla_raftstore::range::RangeDescriptor),
    /// A merge step applied: the range after it.
    #[prost(message, tag = "8")]
    Merge(flotilla_raftstore::range::RangeDescriptor),
    /// The values of a `Gets`, in the order of its keys.
    #[prost(message, tag = "9")]
    Values(Values),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Values {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<OptionalValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OptionalValue {
    #[prost(bool, tag = "1")]
    pub present: bool,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

impl OptionalValue {
    pub fn new(value: Option<Vec<u8>>) -> OptionalValue {
        OptionalValue { present: value.is_some(), value: value.unwrap_or_default() }
    }

    pub fn into_option(self) -> Option<Vec<u8>> {
        self.present.then_some(self.value)
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PreconditionFailed {
    #[prost(uint64, tag = "1")]
    pub op: u64,
    #[prost(message, optional, tag = "2")]
    pub current: Option<OptionalValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Pairs {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub keys: Vec<Vec<u8>>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub values: Vec<Vec<u8>>,
}

/// A replica's refusal (`PeerError`) on the wire, whole: its kind and what that kind carries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Refusal {
    #[prost(enumeration = "RefusalKind", tag = "1")]
    pub kind: i32,
    /// `NotLeader`: the replica id believed to lead (0: none known).
    #[prost(uint64, tag = "2")]
    pub leader: u64,
    /// `Stopped`, `Membership`, `InvalidSplit`: the reason.
    #[prost(string, tag = "3")]
    pub reason: String,
    /// `TooLarge`: the encoded size and the bound.
    #[prost(uint64, tag = "4")]
    pub bytes: u64,
    #[prost(uint64, tag = "5")]
    pub max: u64,
    /// `BatchSpansRanges`: the first key outside the group's range; `KeyNotInRange`: the key.
    #[prost(bytes = "vec", tag = "6")]
    pub key: Vec<u8>,
    /// `Busy`: which bound (see `busy_code`).
    #[prost(uint32, tag = "7")]
    pub busy: u32,
    /// The range errors: the group's descriptor as the replica has it.
    #[prost(message, optional, tag = "8")]
    pub current: Option<RangeDescriptor>,
    /// `StaleEpoch`: the epoch the request was routed with.
    #[prost(message, optional, tag = "9")]
    pub sent: Option<RangeEpoch>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum RefusalKind {
    NotLeader = 0,
    Transferring = 1,
    Busy = 2,
    Dropped = 3,
    OutcomeUnknown = 4,
    Stopped = 5,
    TooLarge = 6,
    BatchSpansRanges = 7,
    /// A kind this build does not know (a newer node's): failed with its reason.
    Other = 8,
    /// The node the request was forwarded to got no answer from its replica in time (a write may or may not
    /// have happened).
    TimedOut = 9,
    Membership = 10,
    KeyNotInRange = 11,
    StaleEpoch = 12,
    InvalidSplit = 13,
    Merging = 14,
    InvalidMerge = 15,
}

/// The code of a `Busy` refusal's bound (0: not known to this build).
fn busy_code(reason: DropReason) -> u32 {
    match reason {
        DropReason::NotLeader { .. } => 1,
        DropReason::Transferring => 2,
        DropReason::UncommittedBytesFull => 3,
        DropReason::PendingReadsFull => 4,
        DropReason::ConfChangePending => 5,
        DropReason::InvalidConfChange => 6,
    }
}

fn busy_reason(code: u32) -> Option<DropReason> {
    Some(match code {
        1 => DropReason::NotLeader { leader_id: 0 },
        2 => DropReason::Transferring,
        3 => DropReason::UncommittedBytesFull,
        4 => DropReason::PendingReadsFull,
        5 => DropReason::ConfChangePending,
        6 => DropReason::InvalidConfChange,
        _ => return None,
    })
}

impl Refusal {
    /// No answer in time.
    pub fn timed_out() -> Refusal {
        Refusal { kind: RefusalKind::TimedOut as i32, ..Refusal::default() }
    }

    pub fn is_timeout(&self) -> bool {
        self.kind == RefusalKind::TimedOut as i32
    }

    pub fn from_peer_error(error: &PeerError) -> Refusal {
        let refusal = |kind: RefusalKind| Refusal { kind: kind as i32, ..Refusal::default() };
        match error {
            PeerError::NotLeader { leader } => Refusal { leader: *leader, ..refusal(RefusalKind::NotLeader) },
            PeerError::Busy(DropReason::Transferring) => refusal(RefusalKind::Transferring),
            PeerError::Busy(reason) => Refusal { busy: busy_code(*reason), ..refusal(RefusalKind::Busy) },
            PeerError::Dropped => refusal(RefusalKind::Dropped),
            PeerError::OutcomeUnknown => refusal(RefusalKind::OutcomeUnknown),
            PeerError::Stopped(reason) => Refusal { reason: reason.clone(), ..refusal(RefusalKind::Stopped) },
            PeerError::Membership(reason) => Refusal { reason: reason.clone(), ..refusal(RefusalKind::Membership) },
            PeerError::InvalidSplit(reason) => Refusal { reason: reason.clone(), ..refusal(RefusalKind::InvalidSplit) },
            PeerError::InvalidMerge(reason) => Refusal { reason: reason.clone(), ..refusal(RefusalKind::InvalidMerge) },
            PeerError::Range(RangeError::Merging { current }) => {
                Refusal { current: Some(current.as_ref().clone()), ..refusal(RefusalKind::Merging) }
            }
            PeerError::TooLarge { bytes, max } => {
                Refusal { bytes: *bytes as u64, max: *max as u64, ..refusal(RefusalKind::TooLarge) }
            }
            PeerError::Range(RangeError::BatchSpansRanges { first_outside, current }) => Refusal {
                key: first_outside.clone(),
                current: Some(current.as_ref().clone()),
                ..refusal(RefusalKind::BatchSpansRanges)
            },
            PeerError::Range(RangeError::KeyNotInRange { key, current }) => Refusal {
                key: key.clone(),
                current: Some(current.as_ref().clone()),
                ..refusal(RefusalKind::KeyNotInRange)
            },
            PeerError::Range(RangeError::StaleEpoch { sent, current }) => Refusal {
                sent: Some(*sent),
                current: Some(current.as_ref().clone()),
                ..refusal(RefusalKind::StaleEpoch)
            },
        }
    }

    /// The error as the replica gave it.
    pub fn into_peer_error(self) -> PeerError {
        let current = Box::new(self.current.unwrap_or_default());
        match RefusalKind::try_from(self.kind).unwrap_or(RefusalKind::Other) {
            RefusalKind::NotLeader => PeerError::NotLeader { leader: self.leader },
            RefusalKind::Transferring => PeerError::Busy(DropReason::Transferring),
            RefusalKind::Busy => match busy_reason(self.busy) {
                Some(reason) => PeerError::Busy(reason),
                None => {
                    PeerError::Stopped(format!("refused as busy for a reason this build does not know ({})", self.busy))
                }
            },
            RefusalKind::Dropped => PeerError::Dropped,
            RefusalKind::OutcomeUnknown => PeerError::OutcomeUnknown,
            RefusalKind::Stopped => PeerError::Stopped(self.reason),
            RefusalKind::Membership => PeerError::Membership(self.reason),
            RefusalKind::InvalidSplit => PeerError::InvalidSplit(self.reason),
            RefusalKind::InvalidMerge => PeerError::InvalidMerge(self.reason),
            RefusalKind::Merging => PeerError::Range(RangeError::Merging { current }),
            RefusalKind::TooLarge => PeerError::TooLarge { bytes: self.bytes as usize, max: self.max as usize },
            RefusalKind::BatchSpansRanges => {
                PeerError::Range(RangeError::BatchSpansRanges { first_outside: self.key, current })
            }
            RefusalKind::KeyNotInRange => PeerError::Range(RangeError::KeyNotInRange { key: self.key, current }),
            RefusalKind::StaleEpoch => {
                PeerError::Range(RangeError::StaleEpoch { sent: self.sent.unwrap_or_default(), current })
            }
            RefusalKind::Other | RefusalKind::TimedOut => PeerError::Stopped(format!(
                "refused for a reason this build does not know ({}): {}",
                self.kind, self.reason
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_survives_the_wire_whole() {
        let current = Box::new(RangeDescriptor {
            group_id: 7,
            start: b"a".to_vec(),
            end: b"m".to_vec(),
            epoch: Some(RangeEpoch { version: 3, conf_version: 4 }),
            ..RangeDescriptor::default()
        });
        let mut errors = vec![
            PeerError::NotLeader { leader: 3 },
            PeerError::Dropped,
            PeerError::OutcomeUnknown,
            PeerError::Stopped("disk gone".into()),
            PeerError::Membership("node 4 already holds a replica".into()),
            PeerError::InvalidSplit("split key not inside the range".into()),
            PeerError::InvalidMerge("not on the same nodes".into()),
            PeerError::Range(RangeError::Merging { current: current.clone() }),
            PeerError::TooLarge { bytes: 10, max: 5 },
            PeerError::Range(RangeError::BatchSpansRanges { first_outside: b"k".to_vec(), current: current.clone() }),
            PeerError::Range(RangeError::KeyNotInRange { key: b"z".to_vec(), current: current.clone() }),
            PeerError::Range(RangeError::StaleEpoch { sent: RangeEpoch { version: 2, conf_version: 4 }, current }),
        ];
        let reasons = [
            DropReason::NotLeader { leader_id: 0 },
            DropReason::Transferring,
            DropReason::UncommittedBytesFull,
            DropReason::PendingReadsFull,
            DropReason::ConfChangePending,
            DropReason::InvalidConfChange,
        ];
        errors.extend(reasons.map(PeerError::Busy));
        for error in errors {
            let bytes = prost::Message::encode_to_vec(&Refusal::from_peer_error(&error));
            let refusal: Refusal = prost::Message::decode(bytes.as_slice()).unwrap();
            assert_eq!(refusal.into_peer_error(), error);
        }
        assert!(Refusal::timed_out().is_timeout());
        let unknown = Refusal { kind: 99, reason: "new".into(), ..Refusal::default() };
        assert!(matches!(unknown.into_peer_error(), PeerError::Stopped(reason) if reason.contains("new")));
    }
}
