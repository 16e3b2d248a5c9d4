//! Snapshots of one group's key range, streamed in bounded chunks.
//!
//! **Generating** ([`StateMachine::snapshot_reader`]): the memtable is flushed, then one redb read transaction —
//! consistent at the group's durable applied index while it lives — is walked in key order, at most
//! `chunk_bytes_max` of keys and values per chunk. Only one chunk is in memory at a time.
//!
//! **Installing** ([`StateMachine::snapshot_installer`]): each chunk is verified (checksum, sequence, range) and
//! written to a staging table of the group in its own transaction, so memory stays bounded whatever the range's
//! size. `finish` then replaces the range in **one** transaction: the range's old data is deleted, the staged rows
//! move in, the staging table is dropped and the group's applied state is set — readers see the old range or the
//! new one, never a mix.
//!
//! Chunk format: `body (protobuf SnapshotChunkBody) | crc32c(body): u32 LE`.

use bytes::Bytes;
use prost::Message as _;

/// One chunk's content.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotChunkBody {
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// 0, 1, 2, … within one snapshot.
    #[prost(uint64, tag = "2")]
    pub sequence: u64,
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub keys: Vec<Vec<u8>>,
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub values: Vec<Vec<u8>>,
    /// Set on the last chunk only.
    #[prost(bool, tag = "5")]
    pub last: bool,
    /// On the last chunk: how many pairs the snapshot holds, and the applied state it is taken at.
    #[prost(uint64, tag = "6")]
    pub total_pairs: u64,
    #[prost(uint64, tag = "7")]
    pub applied_index: u64,
    #[prost(uint64, tag = "8")]
    pub applied_term: u64,
}

/// Why a chunk cannot be installed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkError {
    Checksum,
    Malformed(&'static str),
    OutOfOrder { expected: u64, found: u64 },
    OutsideRange,
    WrongGroup(u64),
    CountMismatch { expected: u64, received: u64 },
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkError::Checksum => write!(f, "snapshot chunk checksum mismatch"),
            ChunkError::Malformed(what) => write!(f, "malformed snapshot chunk: {what}"),
            ChunkError::OutOfOrder { expected, found } => write!(f, "snapshot chunk {found} arrived, expected {expected}"),
            ChunkError::OutsideRange => write!(f, "snapshot chunk holds a key outside the group's range"),
            ChunkError::WrongGroup(group) => write!(f, "snapshot chunk of group {group}"),
            ChunkError::CountMismatch { expected, received } => {
                write!(f, "snapshot ended after {received} pairs, the last chunk says {expected}")
            }
        }
    }
}

pub fn encode_chunk(body: &SnapshotChunkBody) -> Bytes {
    let mut bytes = body.encode_to_vec();
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Bytes::from(bytes)
}

pub fn decode_chunk(bytes: &[u8]) -> Result<SnapshotChunkBody, ChunkError> {
    if bytes.len() < 4 {
        return Err(ChunkError::Malformed("shorter than its checksum"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(ChunkError::Checksum);
    }
    let chunk = SnapshotChunkBody::decode(body).map_err(|_| ChunkError::Malformed("undecodable body"))?;
    if chunk.keys.len() != chunk.values.len() {
        return Err(ChunkError::Malformed("keys and values differ in number"));
    }
    Ok(chunk)
}

/// Whether `key` lies in `[start, end)` (`end` empty: unbounded).
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}
