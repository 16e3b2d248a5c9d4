//! What the raftstore sees of a node's applied data: the [`KvEngine`] trait. Two implementations: the redb
//! [`StateMachine`] and [`MemKvEngine`], in memory, for simulations where the disk is not what is being tested.
//! `tests/kv_engine_conformance.rs` runs one model-based suite (applies, flushes, snapshot installs, crashes)
//! against both.
//!
//! The contract, whatever the engine:
//! - `apply` takes many groups' committed entries at once, each with its applied index, which never goes back;
//! - `flush` is the durable checkpoint: after a crash the data is exactly the last flush's (plus finished snapshot
//!   installs), and [`KvEngine::durable_applied`] says where each group's WAL replay must start;
//! - snapshots leave in checksummed chunks ([`SnapshotReader`]) and arrive through `begin` / `receive` / `finish`,
//!   the same chunks refused by every engine; finishing replaces the group's range in one durable step.

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;

use crate::lsm::merge::VecSource;
use crate::snapshot::{
    encode_chunk, in_range, no_install, unfinished_install, ChunkVerifier, SnapshotChunkBody, SnapshotReader,
};
use crate::state_machine::{AppliedState, GroupApply, KeyValue, KvOp, StateMachine, StateMachineError};

pub trait KvEngine: Send + Sync {
    /// Applies many groups' committed entries. Returns whether memory is over budget (time to `flush`).
    fn apply(&self, batch: Vec<GroupApply>) -> Result<bool, StateMachineError>;
    /// Makes everything applied so far durable (the checkpoint).
    fn flush(&self) -> Result<(), StateMachineError>;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateMachineError>;
    /// Up to `limit` pairs with `start <= key < end` (`end` empty: unbounded), in key order.
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, StateMachineError>;
    /// The latest applied state of a group.
    fn applied(&self, group_id: u64) -> AppliedState;
    /// The applied state the last checkpoint made durable.
    fn durable_applied(&self, group_id: u64) -> AppliedState;
    /// Changes whenever any group's durable applied state changes (a caller that read it, then the states it
    /// wanted, need not read them again until it changes).
    fn durable_generation(&self) -> u64;
    /// Whether a snapshot install (or a group's clearing) set the durable applied state, rather than applying the
    /// log: only then may a log after a crash end below it (see `peer::prepare_groups`).
    fn durable_by_install(&self, group_id: u64) -> bool;
    /// Stores a group's range descriptor, durably: it replaces one an apply not yet checkpointed changed.
    fn put_range(&self, group_id: u64, descriptor: &[u8]) -> Result<(), StateMachineError>;
    /// Every group's descriptor, including those changed by applies not yet checkpointed (`GroupApply::range`,
    /// durable with the applied index).
    fn ranges(&self) -> Result<Vec<(u64, Vec<u8>)>, StateMachineError>;
    /// One group's descriptor, as [`KvEngine::ranges`] would give it.
    fn range(&self, group_id: u64) -> Result<Option<Vec<u8>>, StateMachineError>;
    /// A snapshot of the group's range at its durable applied state, in chunks of about `chunk_bytes_max`.
    fn snapshot_reader(
        &self,
        group_id: u64,
        start: &[u8],
        end: &[u8],
        chunk_bytes_max: usize,
    ) -> Result<SnapshotReader, StateMachineError>;
    fn begin_snapshot_install(&self, group_id: u64, start: &[u8], end: &[u8]) -> Result<(), StateMachineError>;
    /// Returns true once the last chunk has arrived.
    fn receive_snapshot_chunk(&self, group_id: u64, chunk: &[u8]) -> Result<bool, StateMachineError>;
    /// Replaces the group's range data and applied state with the snapshot — and its descriptor with `range`, if
    /// given — in one durable step.
    fn finish_snapshot_install(&self, group_id: u64, range: Option<&[u8]>) -> Result<AppliedState, StateMachineError>;
    fn abort_snapshot_install(&self, group_id: u64);
}

/// Drops a group's data: its range `[start, end)` is replaced by nothing, in one durable step, and `range` is
/// stored as its descriptor (the record that the node held the group); the applied state stays. How a node
/// destroys a replica that was removed — an empty snapshot install, through the same checked path.
pub fn clear_group(
    kv: &dyn KvEngine,
    group_id: u64,
    start: &[u8],
    end: &[u8],
    range: &[u8],
) -> Result<(), StateMachineError> {
    let (applied_index, applied_term) = kv.applied(group_id);
    kv.begin_snapshot_install(group_id, start, end)?;
    let body = SnapshotChunkBody {
        group_id,
        sequence: 0,
        last: true,
        total_pairs: 0,
        applied_index,
        applied_term,
        ..Default::default()
    };
    kv.receive_snapshot_chunk(group_id, &encode_chunk(&body))?;
    kv.finish_snapshot_install(group_id, Some(range)).map(|_| ())
}

impl KvEngine for StateMachine {
    fn apply(&self, batch: Vec<GroupApply>) -> Result<bool, StateMachineError> {
        StateMachine::apply(self, batch)
    }
    fn flush(&self) -> Result<(), StateMachineError> {
        StateMachine::flush(self)
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateMachineError> {
        StateMachine::get(self, key)
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, StateMachineError> {
        StateMachine::scan(self, start, end, limit)
    }
    fn applied(&self, group_id: u64) -> AppliedState {
        StateMachine::applied(self, group_id)
    }
    fn durable_applied(&self, group_id: u64) -> AppliedState {
        StateMachine::durable_applied(self, group_id)
    }
    fn durable_generation(&self) -> u64 {
        StateMachine::durable_generation(self)
    }

    fn durable_by_install(&self, group_id: u64) -> bool {
        StateMachine::durable_by_install(self, group_id)
    }
    fn put_range(&self, group_id: u64, descriptor: &[u8]) -> Result<(), StateMachineError> {
        StateMachine::put_range(self, group_id, descriptor)
    }
    fn ranges(&self) -> Result<Vec<(u64, Vec<u8>)>, StateMachineError> {
        StateMachine::ranges(self)
    }
    fn range(&self, group_id: u64) -> Result<Option<Vec<u8>>, StateMachineError> {
        StateMachine::range(self, group_id)
    }
    fn snapshot_reader(
        &self,
        group_id: u64,
        start: &[u8],
        end: &[u8],
        chunk_bytes_max: usize,
    ) -> Result<SnapshotReader, StateMachineError> {
        StateMachine::snapshot_reader(self, group_id, start, end, chunk_bytes_max)
    }
    fn begin_snapshot_install(&self, group_id: u64, start: &[u8], end: &[u8]) -> Result<(), StateMachineError> {
        StateMachine::begin_snapshot_install(self, group_id, start, end)
    }
    fn receive_snapshot_chunk(&self, group_id: u64, chunk: &[u8]) -> Result<bool, StateMachineError> {
        StateMachine::receive_snapshot_chunk(self, group_id, chunk)
    }
    fn finish_snapshot_install(&self, group_id: u64, range: Option<&[u8]>) -> Result<AppliedState, StateMachineError> {
        StateMachine::finish_snapshot_install(self, group_id, range)
    }
    fn abort_snapshot_install(&self, group_id: u64) {
        StateMachine::abort_snapshot_install(self, group_id)
    }
}

#[derive(Default)]
struct MemState {
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    durable_applied: HashMap<u64, AppliedState>,
    /// Counts changes of `durable_applied`.
    durable_generation: u64,
    /// Groups whose durable applied state a snapshot install set.
    durable_by_install: std::collections::HashSet<u64>,
    /// Applied since the last flush (`None`: a deletion).
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pending_applied: HashMap<u64, AppliedState>,
    pending_ranges: BTreeMap<u64, Vec<u8>>,
    pending_bytes: u64,
    ranges: BTreeMap<u64, Vec<u8>>,
    installs: HashMap<u64, (ChunkVerifier, Vec<KeyValue>)>,
}

/// An in-memory [`KvEngine`] with the same durability contract: [`MemKvEngine::crash`] loses what was not flushed.
pub struct MemKvEngine {
    state: Mutex<MemState>,
    pending_bytes_max: u64,
}

impl MemKvEngine {
    /// `pending_bytes_max`: `apply` reports "over budget" beyond this many bytes applied since the last flush.
    pub fn new(pending_bytes_max: u64) -> MemKvEngine {
        MemKvEngine { state: Mutex::new(MemState::default()), pending_bytes_max }
    }

    /// A power cut: everything applied since the last flush, and unfinished snapshot installs, are lost.
    pub fn crash(&self) {
        let mut state = self.state.lock();
        state.pending.clear();
        state.pending_applied.clear();
        state.pending_ranges.clear();
        state.pending_bytes = 0;
        state.installs.clear();
    }
}

impl KvEngine for MemKvEngine {
    fn apply(&self, batch: Vec<GroupApply>) -> Result<bool, StateMachineError> {
        let mut state = self.state.lock();
        for group in batch {
            let current = state
                .pending_applied
                .get(&group.group_id)
                .or(state.durable_applied.get(&group.group_id))
                .copied()
                .unwrap_or((0, 0));
            if group.applied_index < current.0 {
                return Err(StateMachineError::Invalid(format!(
                    "group {} applied {} after {}",
                    group.group_id, group.applied_index, current.0
                )));
            }
            for op in group.ops {
                let (key, value) = match op {
                    KvOp::Put { key, value } => (key, Some(value)),
                    KvOp::Delete { key } => (key, None),
                };
                state.pending_bytes += (key.len() + value.as_ref().map_or(0, Vec::len)) as u64;
                state.pending.insert(key, value);
            }
            state.pending_applied.insert(group.group_id, (group.applied_index, group.applied_term));
            if let Some(range) = group.range {
                state.pending_ranges.insert(group.group_id, range);
            }
        }
        Ok(state.pending_bytes >= self.pending_bytes_max)
    }

    fn flush(&self) -> Result<(), StateMachineError> {
        let mut state = self.state.lock();
        let state = &mut *state;
        for (key, value) in std::mem::take(&mut state.pending) {
            match value {
                Some(value) => state.durable.insert(key, value),
                None => state.durable.remove(&key),
            };
        }
        let flushed: Vec<(u64, AppliedState)> = state.pending_applied.drain().collect();
        for (group, _) in &flushed {
            state.durable_by_install.remove(group);
        }
        state.durable_applied.extend(flushed);
        state.durable_generation += 1;
        let changed = std::mem::take(&mut state.pending_ranges);
        state.ranges.extend(changed);
        state.pending_bytes = 0;
        Ok(())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateMachineError> {
        let state = self.state.lock();
        Ok(match state.pending.get(key) {
            Some(value) => value.clone(),
            None => state.durable.get(key).cloned(),
        })
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, StateMachineError> {
        let state = self.state.lock();
        let mut merged: BTreeMap<&[u8], Option<&Vec<u8>>> = BTreeMap::new();
        merged.extend(
            state.durable.iter().filter(|(k, _)| in_range(k, start, end)).map(|(k, v)| (k.as_slice(), Some(v))),
        );
        merged.extend(
            state.pending.iter().filter(|(k, _)| in_range(k, start, end)).map(|(k, v)| (k.as_slice(), v.as_ref())),
        );
        Ok(merged.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_vec(), v.clone()))).take(limit).collect())
    }

    fn applied(&self, group_id: u64) -> AppliedState {
        let state = self.state.lock();
        state.pending_applied.get(&group_id).or(state.durable_applied.get(&group_id)).copied().unwrap_or((0, 0))
    }

    fn durable_applied(&self, group_id: u64) -> AppliedState {
        self.state.lock().durable_applied.get(&group_id).copied().unwrap_or((0, 0))
    }

    fn durable_generation(&self) -> u64 {
        self.state.lock().durable_generation
    }

    fn durable_by_install(&self, group_id: u64) -> bool {
        self.state.lock().durable_by_install.contains(&group_id)
    }

    fn put_range(&self, group_id: u64, descriptor: &[u8]) -> Result<(), StateMachineError> {
        let mut state = self.state.lock();
        state.pending_ranges.remove(&group_id);
        state.ranges.insert(group_id, descriptor.to_vec());
        Ok(())
    }

    fn ranges(&self) -> Result<Vec<(u64, Vec<u8>)>, StateMachineError> {
        let state = self.state.lock();
        let mut ranges = state.ranges.clone();
        ranges.extend(state.pending_ranges.iter().map(|(g, d)| (*g, d.clone())));
        Ok(ranges.into_iter().collect())
    }

    fn range(&self, group_id: u64) -> Result<Option<Vec<u8>>, StateMachineError> {
        let state = self.state.lock();
        Ok(state.pending_ranges.get(&group_id).or_else(|| state.ranges.get(&group_id)).cloned())
    }

    fn snapshot_reader(
        &self,
        group_id: u64,
        start: &[u8],
        end: &[u8],
        chunk_bytes_max: usize,
    ) -> Result<SnapshotReader, StateMachineError> {
        self.flush()?;
        let state = self.state.lock();
        let pairs: Vec<KeyValue> = state
            .durable
            .iter()
            .filter(|(k, _)| in_range(k, start, end))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let applied = state.durable_applied.get(&group_id).copied().unwrap_or((0, 0));
        Ok(SnapshotReader::new(Box::new(VecSource::new(pairs)), group_id, applied, chunk_bytes_max))
    }

    fn begin_snapshot_install(&self, group_id: u64, start: &[u8], end: &[u8]) -> Result<(), StateMachineError> {
        self.state.lock().installs.insert(group_id, (ChunkVerifier::new(group_id, start, end), Vec::new()));
        Ok(())
    }

    fn receive_snapshot_chunk(&self, group_id: u64, chunk: &[u8]) -> Result<bool, StateMachineError> {
        let mut state = self.state.lock();
        let (verifier, pairs) = state.installs.get_mut(&group_id).ok_or_else(|| no_install(group_id))?;
        let chunk = verifier.verify(chunk)?;
        pairs.extend(chunk.keys.into_iter().zip(chunk.values));
        Ok(chunk.last)
    }

    fn finish_snapshot_install(&self, group_id: u64, range: Option<&[u8]>) -> Result<AppliedState, StateMachineError> {
        let mut state = self.state.lock();
        let (verifier, _) = state.installs.get(&group_id).ok_or_else(|| no_install(group_id))?;
        let applied = verifier.finished.ok_or_else(|| unfinished_install(group_id))?;
        let (verifier, pairs) = state.installs.remove(&group_id).expect("present");
        let (start, end) = verifier.range();
        state.durable.retain(|k, _| !in_range(k, start, end));
        state.pending.retain(|k, _| !in_range(k, start, end));
        state.durable.extend(pairs);
        state.pending_applied.remove(&group_id);
        state.durable_applied.insert(group_id, applied);
        state.durable_generation += 1;
        state.durable_by_install.insert(group_id);
        state.pending_ranges.remove(&group_id);
        if let Some(range) = range {
            state.ranges.insert(group_id, range.to_vec());
        }
        Ok(applied)
    }

    fn abort_snapshot_install(&self, group_id: u64) {
        self.state.lock().installs.remove(&group_id);
    }
}
