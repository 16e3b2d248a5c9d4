//! Snapshots of one group's key range, streamed in bounded chunks.
//!
//! **Generating** ([`StateMachine::snapshot_reader`]): the memtable is flushed, then one version of the runs and
//! one redb read transaction — consistent at the group's durable applied index while they live — are merged in key
//! order, at most `chunk_bytes_max` of keys and values per chunk. Only one chunk (and one block per run) is in
//! memory at a time.
//!
//! **Installing** ([`StateMachine::begin_snapshot_install`], then `receive_snapshot_chunk` per chunk, then
//! `finish_snapshot_install`; the state machine keeps the install between calls, so an actor need not): each chunk
//! is verified (checksum, sequence, range, key order) and its pairs become blocks of a new run, written in the
//! chunk's own transaction, so memory stays bounded whatever the range's size. The run has no record yet: a crash
//! or an abort leaves garbage that is deleted later. Finishing then, in **one** durable transaction, records a range deletion over the group's range (hiding
//! every older run's entries there), records the new run just above it and sets the group's applied state —
//! readers see the old range or the new one, never a mix. Nothing old is rewritten: compaction drops the hidden
//! entries later. Installed runs have no Bloom filter (the pair count is unknown until the end); compaction gives
//! the merged run one.
//!
//! Chunk format: `body (protobuf SnapshotChunkBody) | crc32c(body): u32 LE`.

use bytes::Bytes;
use prost::Message as _;
use redb::Durability;

use crate::lsm::merge::Source;
use crate::lsm::run::{RunWriter, RUNS, RUN_BLOCKS};
use crate::lsm::version::{Contents, RangeTombstone, RANGE_TOMBSTONES};
use crate::state_machine::{
    decode_applied, encode_applied, seal_range, storage, AppliedState, StateMachine, StateMachineError, APPLY_STATE,
    RANGES,
};

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
            ChunkError::OutOfOrder { expected, found } => {
                write!(f, "snapshot chunk {found} arrived, expected {expected}")
            }
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

pub use crate::lsm::in_range;

/// Streams a snapshot of one group's range (see `snapshot.rs`).
pub struct SnapshotReader {
    /// The range's pairs in key order, without deletions (for the state machine: a merge that holds the runs'
    /// blocks for as long as the reader lives).
    pairs: Box<dyn Source + Send>,
    group_id: u64,
    sequence: u64,
    total_pairs: u64,
    applied: AppliedState,
    chunk_bytes_max: usize,
    exhausted: bool,
}

impl SnapshotReader {
    pub(crate) fn new(
        pairs: Box<dyn Source + Send>,
        group_id: u64,
        applied: AppliedState,
        chunk_bytes_max: usize,
    ) -> SnapshotReader {
        SnapshotReader { pairs, group_id, sequence: 0, total_pairs: 0, applied, chunk_bytes_max, exhausted: false }
    }

    /// The applied state the snapshot is taken at.
    pub fn applied(&self) -> AppliedState {
        self.applied
    }

    /// Whether every chunk has been handed out.
    pub fn is_exhausted(&self) -> bool {
        self.exhausted
    }

    /// The next encoded chunk, or `None` after the last one.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, StateMachineError> {
        if self.exhausted {
            return Ok(None);
        }
        let mut body = SnapshotChunkBody { group_id: self.group_id, sequence: self.sequence, ..Default::default() };
        let mut bytes = 0usize;
        while let Some((key, value)) = self.pairs.current() {
            let value = value.expect("snapshot sources hold no deletions");
            if !body.keys.is_empty() && bytes + key.len() + value.len() > self.chunk_bytes_max {
                break;
            }
            bytes += key.len() + value.len();
            body.keys.push(key.to_vec());
            body.values.push(value.to_vec());
            self.pairs.advance()?;
        }
        self.total_pairs += body.keys.len() as u64;
        self.sequence += 1;
        if self.pairs.current().is_none() {
            self.exhausted = true;
            body.last = true;
            body.total_pairs = self.total_pairs;
            (body.applied_index, body.applied_term) = self.applied;
        }
        Ok(Some(encode_chunk(&body)))
    }
}

/// Checks the chunks of one incoming snapshot: checksum, group, sequence, range, key order, and the final count.
/// Shared by every engine, so all refuse the same chunks.
#[derive(Debug)]
pub(crate) struct ChunkVerifier {
    group_id: u64,
    start: Vec<u8>,
    end: Vec<u8>,
    expected_sequence: u64,
    received_pairs: u64,
    last_key: Option<Vec<u8>>,
    /// The applied state, once the last chunk has arrived.
    pub(crate) finished: Option<AppliedState>,
}

impl ChunkVerifier {
    pub(crate) fn new(group_id: u64, start: &[u8], end: &[u8]) -> ChunkVerifier {
        ChunkVerifier {
            group_id,
            start: start.to_vec(),
            end: end.to_vec(),
            expected_sequence: 0,
            received_pairs: 0,
            last_key: None,
            finished: None,
        }
    }

    pub(crate) fn range(&self) -> (&[u8], &[u8]) {
        (&self.start, &self.end)
    }

    /// Decodes and checks the next chunk; on success it counts as received.
    pub(crate) fn verify(&mut self, encoded: &[u8]) -> Result<SnapshotChunkBody, StateMachineError> {
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
        let mut previous = self.last_key.as_ref();
        for key in &chunk.keys {
            if previous.is_some_and(|p| p >= key) {
                return invalid(ChunkError::Malformed("keys out of order"));
            }
            previous = Some(key);
        }
        let received = self.received_pairs + chunk.keys.len() as u64;
        if chunk.last && chunk.total_pairs != received {
            return invalid(ChunkError::CountMismatch { expected: chunk.total_pairs, received });
        }
        self.received_pairs = received;
        self.expected_sequence += 1;
        if let Some(key) = chunk.keys.last() {
            self.last_key = Some(key.clone());
        }
        if chunk.last {
            self.finished = Some((chunk.applied_index, chunk.applied_term));
        }
        Ok(chunk)
    }
}

/// A snapshot being received for one group (see `snapshot.rs`); kept by the state machine between chunks.
pub(crate) struct Install {
    verifier: ChunkVerifier,
    /// Writes the received pairs as a run (its blocks have no record until `finish`).
    writer: RunWriter,
    run_id: u64,
}

impl Install {
    /// Verifies a chunk and writes its pairs. Returns true once the last chunk has arrived.
    fn receive(&mut self, machine: &StateMachine, encoded: &[u8]) -> Result<bool, StateMachineError> {
        let chunk = self.verifier.verify(encoded)?;
        let mut write = machine.db.begin_write().map_err(storage)?;
        write.set_durability(Durability::None).map_err(storage)?;
        {
            let mut blocks = write.open_table(RUN_BLOCKS).map_err(storage)?;
            for (key, value) in chunk.keys.iter().zip(&chunk.values) {
                self.writer.add(key, Some(value));
            }
            self.writer.write_ready(&mut blocks)?;
        }
        write.commit().map_err(storage)?;
        Ok(chunk.last)
    }

    /// Replaces the group's range and applied state with the snapshot, in one durable transaction.
    fn finish(
        self,
        machine: &StateMachine,
        group_id: u64,
        applied: AppliedState,
        range: Option<&[u8]>,
    ) -> Result<AppliedState, StateMachineError> {
        // No read may see the range half replaced, and no flush may write older data over it.
        let _no_flush = machine.flush_lock.lock();
        let mut memtables = machine.memtables.write();
        let (start, end) = self.verifier.range();
        let tombstone = RangeTombstone { seq: machine.allocate_number(), start: start.to_vec(), end: end.to_vec() };
        let run_seq = machine.allocate_number();
        let write = super::begin_durable(&machine.db)?;
        let run = {
            let mut blocks = write.open_table(RUN_BLOCKS).map_err(storage)?;
            let run = self.writer.finish(&mut blocks, run_seq)?;
            drop(blocks);
            if let Some(run) = &run {
                write.open_table(RUNS).map_err(storage)?.insert(run.id, run.encode().as_slice()).map_err(storage)?;
            }
            write
                .open_table(RANGE_TOMBSTONES)
                .map_err(storage)?
                .insert(tombstone.seq, tombstone.encode().as_slice())
                .map_err(storage)?;
            write
                .open_table(APPLY_STATE)
                .map_err(storage)?
                .insert(group_id, encode_applied(group_id, applied, true))
                .map_err(storage)?;
            if let Some(range) = range {
                write
                    .open_table(RANGES)
                    .map_err(storage)?
                    .insert(group_id, seal_range(group_id, range).as_slice())
                    .map_err(storage)?;
            }
            run
        };
        write.commit().map_err(storage)?;
        machine.publish(Contents::New, |current| {
            let mut next = current.clone();
            next.tombstones.push(tombstone);
            match run {
                Some(run) => next.with_run(std::sync::Arc::new(run)),
                None => next,
            }
        });
        memtables.active.data.retain(|key, _| !in_range(key, start, end));
        memtables.active.applied.remove(&group_id);
        memtables.active.ranges.remove(&group_id);
        memtables.active.bytes =
            memtables.active.data.iter().map(|(k, v)| k.len() as u64 + v.as_ref().map_or(0, |v| v.len() as u64)).sum();
        machine.make_durable([(group_id, applied)], true);
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
        let (version, read) = self.read_view()?;
        let applied = read
            .open_table(APPLY_STATE)
            .map_err(storage)?
            .get(group_id)
            .map_err(storage)?
            .map(|state| decode_applied(group_id, state.value()).map(|(applied, _)| applied))
            .transpose()?
            .unwrap_or((0, 0));
        let merge = self.merge_view(Vec::new(), &version, &read, start, end)?;
        Ok(SnapshotReader::new(Box::new(merge), group_id, applied, chunk_bytes_max))
    }

    /// Starts receiving a snapshot for `group_id`'s range `[start, end)` (`end` empty: unbounded). An unfinished
    /// earlier install of the group is abandoned.
    pub fn begin_snapshot_install(&self, group_id: u64, start: &[u8], end: &[u8]) -> Result<(), StateMachineError> {
        let run_id = self.allocate_number();
        let install = Install {
            verifier: ChunkVerifier::new(group_id, start, end),
            writer: RunWriter::new(run_id, self.options().block_bytes_max, None),
            run_id,
        };
        if let Some(abandoned) = self.installs.lock().insert(group_id, install) {
            self.garbage.lock().abandoned.push(abandoned.run_id);
        }
        Ok(())
    }

    /// Verifies one chunk of the group's install and writes it. Returns true once the last chunk has arrived. A
    /// refused chunk leaves the install as it was (the sender may resend the right one, or abort).
    pub fn receive_snapshot_chunk(&self, group_id: u64, chunk: &[u8]) -> Result<bool, StateMachineError> {
        let mut installs = self.installs.lock();
        let install = installs.get_mut(&group_id).ok_or_else(|| no_install(group_id))?;
        install.receive(self, chunk)
    }

    /// Makes the received snapshot the group's data and applied state — and `range` its descriptor, if given —
    /// in one durable step.
    pub fn finish_snapshot_install(
        &self,
        group_id: u64,
        range: Option<&[u8]>,
    ) -> Result<AppliedState, StateMachineError> {
        let install = {
            let mut installs = self.installs.lock();
            let install = installs.get(&group_id).ok_or_else(|| no_install(group_id))?;
            let applied = install.verifier.finished.ok_or_else(|| unfinished_install(group_id))?;
            (installs.remove(&group_id).expect("present"), applied)
        };
        let (install, applied) = install;
        install.finish(self, group_id, applied, range)
    }

    /// Abandons the group's install, if any (its blocks become garbage).
    pub fn abort_snapshot_install(&self, group_id: u64) {
        if let Some(abandoned) = self.installs.lock().remove(&group_id) {
            self.garbage.lock().abandoned.push(abandoned.run_id);
        }
    }
}

pub(crate) fn no_install(group_id: u64) -> StateMachineError {
    StateMachineError::Invalid(format!("group {group_id} has no snapshot install under way"))
}

pub(crate) fn unfinished_install(group_id: u64) -> StateMachineError {
    StateMachineError::Invalid(format!("group {group_id}: the snapshot's last chunk has not arrived"))
}
