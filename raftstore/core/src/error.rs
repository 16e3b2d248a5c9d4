//! Typed errors of the core: expected conditions a caller handles, never panics.

use std::fmt;

/// Why the core refused a proposal, a read or a membership change. All are expected in normal operation; the
/// caller retries elsewhere or later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// This replica is not the leader; `leader_id` is the leader it knows of (0 if none).
    NotLeader { leader_id: u64 },
    /// A leadership transfer is under way; proposals resume when it completes or aborts.
    Transferring,
    /// The leader's uncommitted bytes would exceed `Config::uncommitted_bytes_max`: back off.
    UncommittedBytesFull,
    /// Too many reads are waiting for the leader's first commit of its term (`Config::pending_reads_max`).
    PendingReadsFull,
    /// A membership change is still unapplied; only one may be in flight.
    ConfChangePending,
    /// The membership change is not valid from the current configuration.
    InvalidConfChange,
}

/// Errors of the core's API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// A proposal or read was not accepted (see [`DropReason`]).
    ProposalDropped(DropReason),
    /// A message of the wrong group, an unknown type or an impossible shape.
    InvalidMessage(&'static str),
    /// The storage could not serve a request.
    Storage(StorageError),
    /// The configuration is invalid (see [`crate::Config::validate`]).
    Config(String),
}

/// Errors a [`crate::Storage`] implementation returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageError {
    /// The requested index is below the first index: it was compacted away.
    Compacted,
    /// The requested index is beyond the last index.
    Unavailable,
    /// The requested snapshot is older than the one the storage has.
    SnapshotOutOfDate,
    /// A snapshot is being generated; ask again later.
    SnapshotTemporarilyUnavailable,
    /// The storage itself failed (a broken environment; the caller decides whether to stop).
    Other(String),
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::NotLeader { leader_id: 0 } => write!(f, "not the leader and no leader is known"),
            DropReason::NotLeader { leader_id } => write!(f, "not the leader; the leader is {leader_id}"),
            DropReason::Transferring => write!(f, "leadership transfer in progress"),
            DropReason::UncommittedBytesFull => write!(f, "too many uncommitted bytes; back off"),
            DropReason::PendingReadsFull => write!(f, "too many reads waiting for the leader's first commit"),
            DropReason::ConfChangePending => write!(f, "a membership change is still pending"),
            DropReason::InvalidConfChange => write!(f, "invalid membership change"),
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Compacted => write!(f, "log compacted at the requested index"),
            StorageError::Unavailable => write!(f, "log index unavailable"),
            StorageError::SnapshotOutOfDate => write!(f, "snapshot out of date"),
            StorageError::SnapshotTemporarilyUnavailable => write!(f, "snapshot temporarily unavailable"),
            StorageError::Other(reason) => write!(f, "storage failed: {reason}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ProposalDropped(reason) => write!(f, "proposal dropped: {reason}"),
            Error::InvalidMessage(what) => write!(f, "invalid message: {what}"),
            Error::Storage(e) => write!(f, "{e}"),
            Error::Config(what) => write!(f, "invalid raft config: {what}"),
        }
    }
}

impl std::error::Error for Error {}
impl std::error::Error for StorageError {}

impl From<StorageError> for Error {
    fn from(e: StorageError) -> Error {
        Error::Storage(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
