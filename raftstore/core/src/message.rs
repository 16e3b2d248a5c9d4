//! Wire and persisted types of the Raft core, as prost messages derived in Rust (no `protoc`, no build script).
//!
//! Tags are part of the on-disk and on-wire format: never renumber a field, only add new ones.

use bytes::Bytes;

/// What an entry carries: an opaque command for the state machine, or a membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum EntryType {
    /// `data` is an application command (empty for the leader's no-op).
    Normal = 0,
    /// `data` is an encoded [`ConfChangeV2`].
    ConfChange = 1,
}

/// One log entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(uint64, tag = "1")]
    pub term: u64,
    #[prost(uint64, tag = "2")]
    pub index: u64,
    #[prost(enumeration = "EntryType", tag = "3")]
    pub entry_type: i32,
    #[prost(bytes = "bytes", tag = "4")]
    pub data: Bytes,
}

impl Entry {
    /// A normal entry (index and term are assigned by the leader when it is appended).
    pub fn normal(data: Bytes) -> Entry {
        Entry { term: 0, index: 0, entry_type: EntryType::Normal as i32, data }
    }

    pub fn is_conf_change(&self) -> bool {
        self.entry_type == EntryType::ConfChange as i32
    }

    /// The size counted against byte limits (payload plus a fixed allowance for index, term and framing).
    pub fn size_bytes(&self) -> u64 {
        self.data.len() as u64 + ENTRY_OVERHEAD_BYTES
    }
}

/// The fixed per-entry allowance used by [`Entry::size_bytes`].
pub const ENTRY_OVERHEAD_BYTES: u64 = 24;

/// The state a replica must persist before it answers anyone: its term, its vote in that term, its commit index.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct HardState {
    #[prost(uint64, tag = "1")]
    pub term: u64,
    #[prost(uint64, tag = "2")]
    pub vote: u64,
    #[prost(uint64, tag = "3")]
    pub commit: u64,
}

/// A membership configuration: voters (and, while joint, the outgoing voters) and learners.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ConfState {
    #[prost(uint64, repeated, tag = "1")]
    pub voters: Vec<u64>,
    #[prost(uint64, repeated, tag = "2")]
    pub learners: Vec<u64>,
    /// Non-empty exactly while the configuration is joint.
    #[prost(uint64, repeated, tag = "3")]
    pub voters_outgoing: Vec<u64>,
    /// Outgoing voters that become learners when the joint configuration is left.
    #[prost(uint64, repeated, tag = "4")]
    pub learners_next: Vec<u64>,
    /// Leave the joint configuration automatically once it is applied.
    #[prost(bool, tag = "5")]
    pub auto_leave: bool,
}

/// What a snapshot covers: the log up to `index` (of `term`) and the configuration in force there.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotMetadata {
    #[prost(message, optional, tag = "1")]
    pub conf_state: Option<ConfState>,
    #[prost(uint64, tag = "2")]
    pub index: u64,
    #[prost(uint64, tag = "3")]
    pub term: u64,
}

/// A snapshot as the core sees it: metadata plus opaque data. Moving the data between nodes (in chunks, with flow
/// control) is the caller's job; the core only decides when one is needed and installs its metadata.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Snapshot {
    #[prost(bytes = "bytes", tag = "1")]
    pub data: Bytes,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<SnapshotMetadata>,
}

impl Snapshot {
    pub fn index(&self) -> u64 {
        self.metadata.as_ref().map_or(0, |m| m.index)
    }
    pub fn term(&self) -> u64 {
        self.metadata.as_ref().map_or(0, |m| m.term)
    }
    pub fn conf_state(&self) -> ConfState {
        self.metadata.as_ref().and_then(|m| m.conf_state.clone()).unwrap_or_default()
    }
    pub fn is_empty(&self) -> bool {
        self.index() == 0
    }
}

/// One change of one node's role in a [`ConfChangeV2`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ConfChangeType {
    AddNode = 0,
    RemoveNode = 1,
    AddLearnerNode = 2,
}

/// How a [`ConfChangeV2`] moves between configurations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ConfChangeTransition {
    /// A single change of at most one voter is applied directly; anything larger goes through a joint
    /// configuration that is left automatically.
    Auto = 0,
    /// Always joint, left automatically.
    JointImplicit = 1,
    /// Always joint; the caller leaves it by proposing an empty `ConfChangeV2`.
    JointExplicit = 2,
}

#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct ConfChangeSingle {
    #[prost(enumeration = "ConfChangeType", tag = "1")]
    pub change_type: i32,
    #[prost(uint64, tag = "2")]
    pub node_id: u64,
}

impl ConfChangeSingle {
    pub fn new(change_type: ConfChangeType, node_id: u64) -> ConfChangeSingle {
        ConfChangeSingle { change_type: change_type as i32, node_id }
    }
    /// `None` for a value this version does not know (a corrupt or newer proposal).
    pub fn kind(&self) -> Option<ConfChangeType> {
        ConfChangeType::try_from(self.change_type).ok()
    }
}

/// A membership change. An empty list of changes means "leave the joint configuration".
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfChangeV2 {
    #[prost(enumeration = "ConfChangeTransition", tag = "1")]
    pub transition: i32,
    #[prost(message, repeated, tag = "2")]
    pub changes: Vec<ConfChangeSingle>,
    #[prost(bytes = "bytes", tag = "3")]
    pub context: Bytes,
}

impl ConfChangeV2 {
    pub fn new(changes: Vec<ConfChangeSingle>) -> ConfChangeV2 {
        ConfChangeV2 { transition: ConfChangeTransition::Auto as i32, changes, context: Bytes::new() }
    }
    /// The change that leaves a joint configuration.
    pub fn leave_joint() -> ConfChangeV2 {
        ConfChangeV2::new(Vec::new())
    }
    pub fn is_leave_joint(&self) -> bool {
        self.changes.is_empty()
    }
    /// `None` for a value this version does not know.
    pub fn transition_kind(&self) -> Option<ConfChangeTransition> {
        ConfChangeTransition::try_from(self.transition).ok()
    }
}

/// Kinds of messages between replicas of one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MessageType {
    Append = 0,
    AppendResponse = 1,
    RequestVote = 2,
    RequestVoteResponse = 3,
    RequestPreVote = 4,
    RequestPreVoteResponse = 5,
    Snapshot = 6,
    Heartbeat = 7,
    HeartbeatResponse = 8,
    TransferLeader = 9,
    TimeoutNow = 10,
    ReadIndex = 11,
    ReadIndexResponse = 12,
}

/// Context of a `RequestVote` sent because of a leadership transfer: voters grant it even inside their lease.
pub const CAMPAIGN_TRANSFER_CONTEXT: &[u8] = b"transfer";

/// A message between two replicas of one group. Which fields mean what depends on `msg_type`; see the crate docs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Message {
    #[prost(enumeration = "MessageType", tag = "1")]
    pub msg_type: i32,
    #[prost(uint64, tag = "2")]
    pub to: u64,
    #[prost(uint64, tag = "3")]
    pub from: u64,
    #[prost(uint64, tag = "4")]
    pub term: u64,
    /// Append: term of the entry at `index`. Vote requests: term of the candidate's last entry. Rejected append
    /// responses: term of the entry at `reject_hint` in the follower's log.
    #[prost(uint64, tag = "5")]
    pub log_term: u64,
    /// Append: index preceding `entries`. Append response: the follower's last matching index (or, rejected, the
    /// index the leader probed). Vote requests: the candidate's last index. ReadIndex response: the read index.
    #[prost(uint64, tag = "6")]
    pub index: u64,
    #[prost(message, repeated, tag = "7")]
    pub entries: Vec<Entry>,
    #[prost(uint64, tag = "8")]
    pub commit: u64,
    #[prost(message, optional, tag = "9")]
    pub snapshot: Option<Snapshot>,
    #[prost(bool, tag = "10")]
    pub reject: bool,
    /// Rejected append responses: the follower's suggestion of where the logs may match.
    #[prost(uint64, tag = "11")]
    pub reject_hint: u64,
    /// Read-index requests and the heartbeats that confirm them; `CAMPAIGN_TRANSFER_CONTEXT` on forced votes.
    #[prost(bytes = "bytes", tag = "12")]
    pub context: Bytes,
    /// The leader's tick counter when it sent this heartbeat or append; echoed in responses to extend its lease.
    #[prost(uint64, tag = "13")]
    pub lease_tick: u64,
    /// Vote requests and rejected vote responses: the term of the entry at `commit`, so that a leaderless replica
    /// holding that entry may learn that it is committed (see `Raft::maybe_commit_by_vote`).
    #[prost(uint64, tag = "14")]
    pub commit_term: u64,
    /// Append and heartbeat responses of a follower that asked for a snapshot
    /// ([`crate::RawNode::request_snapshot`]): it still wants one.
    #[prost(bool, tag = "15")]
    pub request_snapshot: bool,
}

impl Message {
    pub fn new(msg_type: MessageType, from: u64, to: u64, term: u64) -> Message {
        Message { msg_type: msg_type as i32, from, to, term, ..Default::default() }
    }
    /// `None` for a type this version does not know; `step` rejects such a message.
    pub fn kind(&self) -> Option<MessageType> {
        MessageType::try_from(self.msg_type).ok()
    }
}
