//! A [`Version`]: the set of live runs and range deletions at one moment. Readers take the current version together
//! with a redb read transaction and see a consistent state for as long as they hold both; writers (flush,
//! compaction, snapshot install) commit to redb first, then publish a new version.
//!
//! Runs a compaction replaced are not deleted at once: a reader holding an older version may still read them. They
//! wait in the garbage list until no version refers to them (`Arc::strong_count`), then their blocks are deleted.

use std::sync::Arc;

use prost::Message as _;
use redb::TableDefinition;

use super::in_range;
use super::run::Run;
use crate::state_machine::error::{storage, StateMachineError};

const RANGE_TOMBSTONES_TABLE: &str = "range_tombstones";
pub(crate) const RANGE_TOMBSTONES: TableDefinition<u64, &[u8]> = TableDefinition::new(RANGE_TOMBSTONES_TABLE);

/// A deletion of the key range `[start, end)` (`end` empty: unbounded) in every run with a lower `seq`: how a
/// snapshot install replaces a range without rewriting the runs that overlap it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RangeTombstone {
    pub(crate) seq: u64,
    pub(crate) start: Vec<u8>,
    pub(crate) end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RangeTombstoneRecord {
    #[prost(bytes = "vec", tag = "1")]
    start: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    end: Vec<u8>,
}

impl RangeTombstone {
    /// Whether it hides `key` in a run of age `seq`.
    pub(crate) fn hides(&self, key: &[u8], seq: u64) -> bool {
        seq < self.seq && in_range(key, &self.start, &self.end)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let record = RangeTombstoneRecord { start: self.start.clone(), end: self.end.clone() };
        super::sealed::seal(RANGE_TOMBSTONES_TABLE, self.seq, record.encode_to_vec())
    }

    pub(crate) fn decode(seq: u64, sealed: &[u8]) -> Result<RangeTombstone, StateMachineError> {
        let bytes = super::sealed::unseal(RANGE_TOMBSTONES_TABLE, seq, sealed)?;
        let record = RangeTombstoneRecord::decode(bytes)
            .map_err(|e| storage(format!("range deletion {seq} is undecodable: {e}")))?;
        Ok(RangeTombstone { seq, start: record.start, end: record.end })
    }
}

/// What a change of the version does to what the runs answer (see [`Version::contents_generation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Contents {
    /// New data (a flush, a snapshot install): reads may answer differently.
    New,
    /// The same data held differently (a compaction).
    Same,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Version {
    /// Newest (highest `seq`) first.
    pub(crate) runs: Vec<Arc<Run>>,
    pub(crate) tombstones: Vec<RangeTombstone>,
    /// Which data the runs hold: bumped by every change that gives them new data (a flush, a snapshot install),
    /// kept by a compaction (it rewrites runs, not what they answer). Cached answers are valid within one
    /// generation (`read_cache.rs`).
    pub(crate) contents_generation: u64,
}

impl Version {
    /// The `seq` below which every run's entry for `key` is hidden by a range deletion (0: none is).
    pub(crate) fn hidden_below(&self, key: &[u8]) -> u64 {
        self.tombstones.iter().filter(|t| in_range(key, &t.start, &t.end)).map(|t| t.seq).max().unwrap_or(0)
    }

    /// This version with `run` added in its place by age.
    pub(crate) fn with_run(&self, run: Arc<Run>) -> Version {
        let mut next = self.clone();
        let at = next.runs.iter().position(|r| r.seq < run.seq).unwrap_or(next.runs.len());
        next.runs.insert(at, run);
        next
    }

    /// Bytes of keys and values in all runs (overwritten and deleted entries included).
    pub(crate) fn run_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.bytes).sum()
    }
}
