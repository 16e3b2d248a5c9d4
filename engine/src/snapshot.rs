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

use std::ops::Bound;

use bytes::Bytes;
use prost::Message as _;
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::state_machine::{
    decode_applied, encode_applied, storage, AppliedState, StateMachine, StateMachineError, APPLY_STATE, DATA,
};

fn staging_table_name(group_id: u64) -> String {
    format!("snapshot_staging_{group_id}")
}

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

/// Streams a snapshot of one group's range (see `snapshot.rs`).
pub struct SnapshotReader {
    read: redb::ReadTransaction,
    group_id: u64,
    end: Vec<u8>,
    /// The next key to read (inclusive); `None` once the range is exhausted.
    next_key: Option<Vec<u8>>,
    sequence: u64,
    total_pairs: u64,
    applied: AppliedState,
    chunk_bytes_max: usize,
}

impl SnapshotReader {
    /// The applied state the snapshot is taken at.
    pub fn applied(&self) -> AppliedState {
        self.applied
    }

    /// Whether every chunk has been handed out.
    pub fn is_exhausted(&self) -> bool {
        self.next_key.is_none()
    }

    /// The next encoded chunk, or `None` after the last one.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, StateMachineError> {
        let Some(start) = self.next_key.take() else { return Ok(None) };
        let table = self.read.open_table(DATA).map_err(storage)?;
        let upper = if self.end.is_empty() { Bound::Unbounded } else { Bound::Excluded(self.end.as_slice()) };
        let mut body = SnapshotChunkBody { group_id: self.group_id, sequence: self.sequence, ..Default::default() };
        let mut bytes = 0usize;
        for row in table.range::<&[u8]>((Bound::Included(start.as_slice()), upper)).map_err(storage)? {
            let (key, value) = row.map_err(storage)?;
            if !body.keys.is_empty() && bytes + key.value().len() + value.value().len() > self.chunk_bytes_max {
                self.next_key = Some(key.value().to_vec());
                break;
            }
            bytes += key.value().len() + value.value().len();
            body.keys.push(key.value().to_vec());
            body.values.push(value.value().to_vec());
        }
        self.total_pairs += body.keys.len() as u64;
        self.sequence += 1;
        if self.next_key.is_none() {
            body.last = true;
            body.total_pairs = self.total_pairs;
            (body.applied_index, body.applied_term) = self.applied;
        }
        Ok(Some(encode_chunk(&body)))
    }
}

/// Receives a snapshot of one group's range and installs it atomically (see `snapshot.rs`).
pub struct SnapshotInstaller<'a> {
    machine: &'a StateMachine,
    group_id: u64,
    start: Vec<u8>,
    end: Vec<u8>,
    expected_sequence: u64,
    received_pairs: u64,
    finished: Option<AppliedState>,
}

impl SnapshotInstaller<'_> {
    /// Verifies a chunk and stages it. Returns true once the last chunk has arrived.
    pub fn receive(&mut self, encoded: &[u8]) -> Result<bool, StateMachineError> {
        let chunk = decode_chunk(encoded).map_err(|e| StateMachineError::Invalid(e.to_string()))?;
        let invalid = |e: ChunkError| Err(StateMachineError::Invalid(e.to_string()));
        if chunk.group_id != self.group_id {
            return invalid(ChunkError::WrongGroup(chunk.group_id));
        }
        if chunk.sequence != self.expected_sequence || self.finished.is_some() {
            return invalid(ChunkError::OutOfOrder { expected: self.expected_sequence, found: chunk.sequence });
        }
        if chunk.keys.iter().any(|k| !in_range(k, &self.start, &self.end)) {
            return invalid(ChunkError::OutsideRange);
        }
        let mut write = self.machine.db.begin_write().map_err(storage)?;
        write.set_durability(Durability::None).map_err(storage)?;
        {
            let name = staging_table_name(self.group_id);
            let definition: TableDefinition<&[u8], &[u8]> = TableDefinition::new(&name);
            let mut staging = write.open_table(definition).map_err(storage)?;
            for (key, value) in chunk.keys.iter().zip(&chunk.values) {
                staging.insert(key.as_slice(), value.as_slice()).map_err(storage)?;
            }
        }
        write.commit().map_err(storage)?;
        self.received_pairs += chunk.keys.len() as u64;
        self.expected_sequence += 1;
        if chunk.last {
            if chunk.total_pairs != self.received_pairs {
                return invalid(ChunkError::CountMismatch { expected: chunk.total_pairs, received: self.received_pairs });
            }
            self.finished = Some((chunk.applied_index, chunk.applied_term));
        }
        Ok(chunk.last)
    }

    /// Replaces the group's range and applied state with the snapshot, in one durable transaction.
    pub fn finish(self) -> Result<AppliedState, StateMachineError> {
        let applied = self.finished.ok_or_else(|| StateMachineError::Invalid("the snapshot's last chunk has not arrived".into()))?;
        let machine = self.machine;
        // No read may see the range half replaced, and no flush may write older data over it.
        let _no_flush = machine.flush_lock.lock();
        let mut memtables = machine.memtables.write();
        let mut write = machine.db.begin_write().map_err(storage)?;
        write.set_durability(Durability::Immediate).map_err(storage)?;
        write.set_quick_repair(true);
        let staging_name = staging_table_name(self.group_id);
        {
            let upper = if self.end.is_empty() { Bound::Unbounded } else { Bound::Excluded(self.end.as_slice()) };
            let mut data = write.open_table(DATA).map_err(storage)?;
            data.retain_in::<&[u8], _>((Bound::Included(self.start.as_slice()), upper), |_, _| false).map_err(storage)?;
            let definition: TableDefinition<&[u8], &[u8]> = TableDefinition::new(&staging_name);
            let staging = write.open_table(definition).map_err(storage)?;
            for row in staging.iter().map_err(storage)? {
                let (key, value) = row.map_err(storage)?;
                data.insert(key.value(), value.value()).map_err(storage)?;
            }
            drop(staging);
            write.open_table(APPLY_STATE).map_err(storage)?.insert(self.group_id, encode_applied(applied)).map_err(storage)?;
        }
        let definition: TableDefinition<&[u8], &[u8]> = TableDefinition::new(&staging_name);
        write.delete_table(definition).map_err(storage)?;
        write.commit().map_err(storage)?;
        let range = |key: &Vec<u8>| in_range(key, &self.start, &self.end);
        memtables.active.data.retain(|key, _| !range(key));
        memtables.active.applied.remove(&self.group_id);
        memtables.active.bytes = memtables.active.data.iter().map(|(k, v)| k.len() as u64 + v.as_ref().map_or(0, |v| v.len() as u64)).sum();
        machine.durable.write().insert(self.group_id, applied);
        Ok(applied)
    }
}

impl StateMachine {
    /// Starts streaming a snapshot of `group_id`'s range `[start, end)` (`end` empty: unbounded), in chunks of at
    /// most `chunk_bytes_max` bytes of keys and values (at least one pair each).
    pub fn snapshot_reader(
        &self,
        group_id: u64,
        start: &[u8],
        end: &[u8],
        chunk_bytes_max: usize,
    ) -> Result<SnapshotReader, StateMachineError> {
        self.flush()?;
        let _no_flush = self.flush_lock.lock();
        let read = self.db.begin_read().map_err(storage)?;
        let applied = read
            .open_table(APPLY_STATE)
            .map_err(storage)?
            .get(group_id)
            .map_err(storage)?
            .map(|state| decode_applied(state.value()))
            .unwrap_or((0, 0));
        Ok(SnapshotReader {
            read,
            group_id,
            end: end.to_vec(),
            next_key: Some(start.to_vec()),
            sequence: 0,
            total_pairs: 0,
            applied,
            chunk_bytes_max,
        })
    }

    /// Starts receiving a snapshot for `group_id`'s range `[start, end)`; any earlier unfinished one is discarded.
    pub fn snapshot_installer(&self, group_id: u64, start: &[u8], end: &[u8]) -> Result<SnapshotInstaller<'_>, StateMachineError> {
        let write = self.db.begin_write().map_err(storage)?;
        let name = staging_table_name(group_id);
        let definition: TableDefinition<&[u8], &[u8]> = TableDefinition::new(&name);
        write.delete_table(definition).map_err(storage)?;
        write.commit().map_err(storage)?;
        Ok(SnapshotInstaller {
            machine: self,
            group_id,
            start: start.to_vec(),
            end: end.to_vec(),
            expected_sequence: 0,
            received_pairs: 0,
            finished: None,
        })
    }
}
