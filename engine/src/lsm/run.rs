//! A run: an immutable, sorted set of entries written once (by a flush, a compaction or a snapshot install) as
//! blocks in the `run_blocks` table, keyed `run id (u64 BE) | last key of the block`. A point read finds the one
//! block whose last key is the first `>=` the key; a cursor walks blocks in order.
//!
//! A run's description ([`Run`]: order, size, key bounds, Bloom filter) is a row of the `runs` table; a run whose
//! row is missing is garbage (a compaction or install that never finished) and is deleted at open.

use prost::Message as _;
use redb::{ReadableTable, Table, TableDefinition};

use super::block::{Block, BlockBuilder};
use super::bloom::{Bloom, BloomBuilder};
use super::merge::Source;
use crate::state_machine::error::{storage, StateMachineError};

/// Room left in a block's budget for redb's leaf header and the block's key (besides the last key itself).
const REDB_PAGE_OVERHEAD_BYTES: usize = 128;

pub(crate) const RUN_BLOCKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("run_blocks");
pub(crate) const RUNS_TABLE: &str = "runs";
pub(crate) const RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new(RUNS_TABLE);

/// The stored form of a [`Run`] (the row of `runs`).
#[derive(Clone, PartialEq, prost::Message)]
struct RunRecord {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(uint64, tag = "2")]
    entries: u64,
    #[prost(uint64, tag = "3")]
    bytes: u64,
    #[prost(bytes = "vec", tag = "4")]
    min_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    max_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    filter: Vec<u8>,
}

/// What is known of a run without reading its blocks.
#[derive(Debug)]
pub(crate) struct Run {
    /// Where its blocks are (the key prefix in `run_blocks`).
    pub(crate) id: u64,
    /// Its age: a higher `seq` shadows a lower one, and a range deletion hides the runs with a lower `seq`.
    pub(crate) seq: u64,
    pub(crate) entries: u64,
    /// Bytes of keys and values (the compaction policy's measure of size).
    pub(crate) bytes: u64,
    pub(crate) min_key: Vec<u8>,
    pub(crate) max_key: Vec<u8>,
    filter: Bloom,
}

/// Parses the block stored under `row_key` (`block_key`); damage is reported with the run and block it is in.
pub(crate) fn parse_located<'a>(row_key: &[u8], bytes: &'a [u8]) -> Result<Block<'a>, StateMachineError> {
    Block::parse(bytes).map_err(|error| located(row_key, error))
}

/// Damage found in the block stored under `row_key`, with the run and block it is in.
fn located(row_key: &[u8], error: StateMachineError) -> StateMachineError {
    let run = run_of_block_key(row_key).map_or_else(|_| "?".to_string(), |id| id.to_string());
    let last_key = String::from_utf8_lossy(row_key.get(8..).unwrap_or_default());
    storage(format!("{error} (run {run}, the block ending at key {last_key:?}, table run_blocks)"))
}

pub(crate) fn block_key(run_id: u64, last_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + last_key.len());
    key.extend_from_slice(&run_id.to_be_bytes());
    key.extend_from_slice(last_key);
    key
}

/// The run id a `run_blocks` key belongs to.
pub(crate) fn run_of_block_key(key: &[u8]) -> Result<u64, StateMachineError> {
    match key.first_chunk::<8>() {
        Some(id) => Ok(u64::from_be_bytes(*id)),
        None => Err(storage(format!("corrupt state machine: a run_blocks key of {} bytes (at least 8)", key.len()))),
    }
}

/// Deletes every block of a run.
pub(crate) fn delete_blocks(blocks: &mut Table<&[u8], &[u8]>, run_id: u64) -> Result<(), StateMachineError> {
    let (start, end) = (block_key(run_id, b""), block_key(run_id + 1, b""));
    blocks.retain_in::<&[u8], _>(start.as_slice()..end.as_slice(), |_, _| false).map_err(storage)
}

impl Run {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let record = RunRecord {
            seq: self.seq,
            entries: self.entries,
            bytes: self.bytes,
            min_key: self.min_key.clone(),
            max_key: self.max_key.clone(),
            filter: self.filter.encode(),
        };
        super::sealed::seal(RUNS_TABLE, self.id, record.encode_to_vec())
    }

    pub(crate) fn decode(id: u64, sealed: &[u8]) -> Result<Run, StateMachineError> {
        let bytes = super::sealed::unseal(RUNS_TABLE, id, sealed)?;
        let record = RunRecord::decode(bytes).map_err(|e| storage(format!("run {id}'s record is undecodable: {e}")))?;
        Ok(Run {
            id,
            seq: record.seq,
            entries: record.entries,
            bytes: record.bytes,
            min_key: record.min_key,
            max_key: record.max_key,
            filter: Bloom::decode(&record.filter),
        })
    }

    /// Whether the run may hold `key` (its filter and key bounds).
    pub(crate) fn may_contain(&self, key: &[u8]) -> bool {
        key >= self.min_key.as_slice() && key <= self.max_key.as_slice() && self.filter.may_contain(key)
    }

    /// Whether the run's keys span any of `[start, end)` (`end` empty: unbounded).
    pub(crate) fn overlaps(&self, start: &[u8], end: &[u8]) -> bool {
        self.max_key.as_slice() >= start && (end.is_empty() || self.min_key.as_slice() < end)
    }

    /// Bytes of memory the run's description takes (mostly its filter).
    pub(crate) fn filter_bytes(&self) -> usize {
        self.filter.len_bytes()
    }

    /// `Some(value)` if the run holds `key` (`Some(None)`: deleted here).
    pub(crate) fn get(
        &self,
        blocks: &impl ReadableTable<&'static [u8], &'static [u8]>,
        key: &[u8],
    ) -> Result<Option<Option<Vec<u8>>>, StateMachineError> {
        if !self.may_contain(key) {
            return Ok(None);
        }
        let (from, to) = (block_key(self.id, key), block_key(self.id + 1, b""));
        let Some(row) = blocks.range::<&[u8]>(from.as_slice()..to.as_slice()).map_err(storage)?.next() else {
            return Ok(None);
        };
        let (row_key, block) = row.map_err(storage)?;
        let found = Block::lookup(block.value(), key).map_err(|error| located(row_key.value(), error))?;
        Ok(found.map(|value| value.map(<[u8]>::to_vec)))
    }
}

/// Writes one run's blocks. Entries come in key order; full blocks wait in memory until [`RunWriter::write_ready`]
/// (so a long run can be written over several transactions).
pub(crate) struct RunWriter {
    id: u64,
    block_bytes_max: usize,
    builder: BlockBuilder,
    ready: Vec<(Vec<u8>, Vec<u8>)>,
    ready_bytes: usize,
    entries: u64,
    bytes: u64,
    min_key: Option<Vec<u8>>,
    last_key: Vec<u8>,
    filter: Option<BloomBuilder>,
}

impl RunWriter {
    /// `expected_keys`: sizes the Bloom filter; `None` writes a run without one.
    pub(crate) fn new(id: u64, block_bytes_max: usize, expected_keys: Option<usize>) -> RunWriter {
        RunWriter {
            id,
            block_bytes_max,
            builder: BlockBuilder::default(),
            ready: Vec::new(),
            ready_bytes: 0,
            entries: 0,
            bytes: 0,
            min_key: None,
            last_key: Vec::new(),
            filter: expected_keys.map(BloomBuilder::new),
        }
    }

    /// Whether `key` may come next (keys strictly increase).
    pub(crate) fn accepts(&self, key: &[u8]) -> bool {
        self.min_key.is_none() || key > self.last_key.as_slice()
    }

    pub(crate) fn add(&mut self, key: &[u8], value: Option<&[u8]>) {
        debug_assert!(self.accepts(key), "run keys out of order");
        if self.min_key.is_none() {
            self.min_key = Some(key.to_vec());
        }
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        if let Some(filter) = &mut self.filter {
            filter.add(key);
        }
        self.entries += 1;
        let entry_bytes = key.len() + value.map_or(0, <[u8]>::len);
        self.bytes += entry_bytes as u64;
        // Seal before the block would outgrow its budget (less room for redb's page header and the block's key), so
        // that a block fills one redb page of that size rather than spilling into one twice as large.
        let budget = self.block_bytes_max.saturating_sub(REDB_PAGE_OVERHEAD_BYTES + key.len());
        if !self.builder.is_empty()
            && self.builder.len_bytes() + BlockBuilder::ENTRY_OVERHEAD_BYTES + entry_bytes > budget
        {
            self.seal_block();
        }
        self.builder.add(key, value);
    }

    fn seal_block(&mut self) {
        let (last_key, block) = self.builder.finish();
        self.ready_bytes += block.len();
        self.ready.push((block_key(self.id, &last_key), block));
    }

    /// Bytes of sealed blocks not yet written.
    pub(crate) fn ready_bytes(&self) -> usize {
        self.ready_bytes
    }

    pub(crate) fn write_ready(&mut self, blocks: &mut Table<&[u8], &[u8]>) -> Result<(), StateMachineError> {
        for (key, block) in self.ready.drain(..) {
            blocks.insert(key.as_slice(), block.as_slice()).map_err(storage)?;
        }
        self.ready_bytes = 0;
        Ok(())
    }

    /// Writes what is left and describes the run (`None` if it has no entries: nothing was written).
    pub(crate) fn finish(
        mut self,
        blocks: &mut Table<&[u8], &[u8]>,
        seq: u64,
    ) -> Result<Option<Run>, StateMachineError> {
        if !self.builder.is_empty() {
            self.seal_block();
        }
        self.write_ready(blocks)?;
        let Some(min_key) = self.min_key else { return Ok(None) };
        Ok(Some(Run {
            id: self.id,
            seq,
            entries: self.entries,
            bytes: self.bytes,
            min_key,
            max_key: self.last_key,
            filter: self.filter.map(BloomBuilder::finish).unwrap_or_default(),
        }))
    }
}

/// Walks one run's entries in `[start, end)` in key order, one block in memory at a time.
pub(crate) struct RunCursor {
    blocks: redb::Range<'static, &'static [u8], &'static [u8]>,
    /// The current block (verified), empty once the run is exhausted.
    block: Vec<u8>,
    position: usize,
    count: usize,
    end: Vec<u8>,
}

impl RunCursor {
    pub(crate) fn open(
        blocks: &redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
        run_id: u64,
        start: &[u8],
        end: &[u8],
    ) -> Result<RunCursor, StateMachineError> {
        let (from, to) = (block_key(run_id, start), block_key(run_id + 1, b""));
        let blocks = blocks.range::<&[u8]>(from.as_slice()..to.as_slice()).map_err(storage)?;
        let mut cursor = RunCursor { blocks, block: Vec::new(), position: 0, count: 0, end: end.to_vec() };
        cursor.load_next_block()?;
        if cursor.count > 0 {
            cursor.position = Block::view(&cursor.block).seek(start);
            cursor.skip_exhausted_block()?;
        }
        Ok(cursor)
    }

    fn load_next_block(&mut self) -> Result<(), StateMachineError> {
        self.position = 0;
        match self.blocks.next() {
            Some(row) => {
                let (row_key, block) = row.map_err(storage)?;
                self.count = parse_located(row_key.value(), block.value())?.len();
                self.block.clear();
                self.block.extend_from_slice(block.value());
            }
            None => {
                self.count = 0;
                self.block.clear();
            }
        }
        Ok(())
    }

    fn skip_exhausted_block(&mut self) -> Result<(), StateMachineError> {
        while self.count > 0 && self.position >= self.count {
            self.load_next_block()?;
        }
        Ok(())
    }
}

impl Source for RunCursor {
    fn current(&self) -> Option<(&[u8], Option<&[u8]>)> {
        if self.position >= self.count {
            return None;
        }
        let (key, value) = Block::view(&self.block).entry(self.position);
        (self.end.is_empty() || key < self.end.as_slice()).then_some((key, value))
    }

    fn advance(&mut self) -> Result<(), StateMachineError> {
        self.position += 1;
        self.skip_exhausted_block()
    }
}
