//! What the raftstore sees of a node's log storage: the [`LogEngine`] trait. Writes are submitted per group
//! `Ready` and completed asynchronously with `Persisted`; reads answer the Raft core's `Storage` questions for one
//! group. Implementations: the real WAL behind group commit ([`GroupCommitWal`]), the real WAL written on the
//! caller's thread ([`SyncWal`], for deterministic simulation) and [`MemLogEngine`] for tests where the disk is
//! not what is being tested. `tests/log_engine_conformance.rs` runs one
//! suite against both.

use std::collections::HashMap;

use flotilla_raft::{Entry, HardState};
use parking_lot::RwLock;

use crate::failure::FailureListener;
use crate::wal::group_commit::{GroupCommitWal, WriteRequest};
use crate::wal::group_log::GroupLog;
use crate::wal::record::LogOp;
use crate::wal::{Wal, WalError, WalState};

pub trait LogEngine: Send + Sync {
    /// Queues a group's writes; `Persisted` arrives on the request's reply channel once they are durable.
    fn submit(&self, request: WriteRequest) -> Result<(), WalError>;
    fn hard_state(&self, group_id: u64) -> HardState;
    /// The first index still held (1 for a new group).
    fn first_index(&self, group_id: u64) -> u64;
    /// The last index held (`first_index - 1` when empty).
    fn last_index(&self, group_id: u64) -> u64;
    /// The term of `index`, from `first_index - 1` (the compaction point) to `last_index`.
    fn term(&self, group_id: u64, index: u64) -> Option<u64>;
    /// Entries `[low, high)`, cut after `max_bytes` (at least one).
    fn entries(&self, group_id: u64, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>, WalError>;
    /// Calls `listener` with the reason if the engine stops on a failure of its own, away from any `submit`
    /// (a writer thread's disk error or panic), so that the node stops at once. Engines that fail only inside
    /// `submit` never call it.
    fn on_failure(&self, _listener: FailureListener) {}
    /// Frees log storage down to about `bytes_max`, once compactions have made it unneeded (the WAL deletes whole
    /// segments, first rewriting the few live entries of laggards that pin them). Engines without files do
    /// nothing.
    fn purge(&self, _bytes_max: u64) -> Result<(), WalError> {
        Ok(())
    }
}

/// A log engine backed by the WAL: how it writes, and how its shared state is read. Every such engine is a
/// [`LogEngine`] through the one implementation below.
trait WalBacked: Send + Sync {
    fn write(&self, request: WriteRequest) -> Result<(), WalError>;
    fn with_state<T>(&self, read: impl FnOnce(&WalState) -> T) -> T;
    fn on_failure(&self, _listener: FailureListener) {}
    fn purge(&self, bytes_max: u64) -> Result<(), WalError>;
}

impl WalBacked for GroupCommitWal {
    fn write(&self, request: WriteRequest) -> Result<(), WalError> {
        GroupCommitWal::submit(self, request)
    }

    fn with_state<T>(&self, read: impl FnOnce(&WalState) -> T) -> T {
        read(&self.state())
    }

    fn on_failure(&self, listener: FailureListener) {
        GroupCommitWal::on_failure(self, listener);
    }

    fn purge(&self, bytes_max: u64) -> Result<(), WalError> {
        GroupCommitWal::purge(self, bytes_max).map(drop)
    }
}

/// The WAL without a writer thread: each `submit` writes and syncs on the caller's thread, then replies. For
/// single-threaded, deterministic simulation of the real WAL (the store simulator); production uses
/// [`GroupCommitWal`].
pub struct SyncWal {
    wal: parking_lot::Mutex<Wal>,
}

impl SyncWal {
    pub fn new(wal: Wal) -> SyncWal {
        SyncWal { wal: parking_lot::Mutex::new(wal) }
    }
}

impl WalBacked for SyncWal {
    fn write(&self, mut request: WriteRequest) -> Result<(), WalError> {
        let operations: Vec<(u64, LogOp)> =
            std::mem::take(&mut request.ops).into_iter().map(|op| (request.group_id, op)).collect();
        self.wal.lock().write(&operations)?;
        request.complete();
        Ok(())
    }

    fn with_state<T>(&self, read: impl FnOnce(&WalState) -> T) -> T {
        read(self.wal.lock().state())
    }

    fn purge(&self, bytes_max: u64) -> Result<(), WalError> {
        let mut wal = self.wal.lock();
        let horizon = wal.suggest_horizon(bytes_max);
        wal.purge(horizon).map(drop)
    }
}

impl<W: WalBacked> LogEngine for W {
    fn submit(&self, request: WriteRequest) -> Result<(), WalError> {
        self.write(request)
    }

    fn hard_state(&self, group_id: u64) -> HardState {
        self.with_state(|s| s.hard_state(group_id))
    }

    fn first_index(&self, group_id: u64) -> u64 {
        self.with_state(|s| s.group(group_id).map_or(1, |g| g.first_index))
    }

    fn last_index(&self, group_id: u64) -> u64 {
        self.with_state(|s| s.group(group_id).map_or(0, GroupLog::last_index))
    }

    fn term(&self, group_id: u64, index: u64) -> Option<u64> {
        self.with_state(|s| match s.group(group_id) {
            Some(group) => group.term(index),
            None => (index == 0).then_some(0),
        })
    }

    fn entries(&self, group_id: u64, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>, WalError> {
        self.with_state(|s| s.entries(group_id, low, high, max_bytes))
    }

    fn on_failure(&self, listener: FailureListener) {
        WalBacked::on_failure(self, listener);
    }

    fn purge(&self, bytes_max: u64) -> Result<(), WalError> {
        WalBacked::purge(self, bytes_max)
    }
}

/// One group's log held in memory.
#[derive(Clone, Debug, Default)]
struct MemGroup {
    hard_state: HardState,
    base_index: u64,
    base_term: u64,
    entries: Vec<Entry>,
}

impl MemGroup {
    fn first_index(&self) -> u64 {
        self.base_index + 1
    }

    fn last_index(&self) -> u64 {
        self.base_index + self.entries.len() as u64
    }

    fn apply(&mut self, op: &LogOp) -> Result<(), WalError> {
        let invalid = |what: String| Err(WalError::Invalid(what));
        match op {
            LogOp::Append(entries) => {
                let Some(first) = entries.first() else { return Ok(()) };
                if first.index < self.first_index() || first.index > self.last_index() + 1 {
                    return invalid(format!(
                        "append at {} outside [{}, {}]",
                        first.index,
                        self.first_index(),
                        self.last_index() + 1
                    ));
                }
                self.entries.truncate((first.index - self.first_index()) as usize);
                self.entries.extend(entries.iter().cloned());
            }
            LogOp::HardState(hard_state) => self.hard_state = *hard_state,
            LogOp::Truncate { from_index } => {
                let keep = from_index.saturating_sub(self.first_index()) as usize;
                self.entries.truncate(keep);
            }
            LogOp::Compact { first_kept_index, base_term } => {
                if *first_kept_index <= self.first_index() {
                    return Ok(());
                }
                if *first_kept_index > self.last_index() + 1 {
                    return invalid(format!("compaction to {first_kept_index} beyond {}", self.last_index()));
                }
                let drop = (first_kept_index - self.first_index()) as usize;
                if self.entries[drop - 1].term != *base_term {
                    return invalid(format!("compaction base term {base_term} disagrees with the log"));
                }
                self.entries.drain(..drop);
                self.base_index = first_kept_index - 1;
                self.base_term = *base_term;
            }
            LogOp::Snapshot { index, term } => {
                self.entries.clear();
                self.base_index = *index;
                self.base_term = *term;
                self.hard_state.commit = self.hard_state.commit.max(*index);
            }
        }
        Ok(())
    }
}

/// An in-memory [`LogEngine`]: writes are "durable" at once (for tests and simulations that model the disk
/// elsewhere, or not at all).
#[derive(Default)]
pub struct MemLogEngine {
    groups: RwLock<HashMap<u64, MemGroup>>,
}

impl MemLogEngine {
    pub fn new() -> MemLogEngine {
        MemLogEngine::default()
    }
}

impl LogEngine for MemLogEngine {
    fn submit(&self, request: WriteRequest) -> Result<(), WalError> {
        {
            let mut groups = self.groups.write();
            let mut staged = groups.get(&request.group_id).cloned().unwrap_or_default();
            for op in &request.ops {
                staged.apply(op)?;
            }
            groups.insert(request.group_id, staged);
        }
        request.complete();
        Ok(())
    }

    fn hard_state(&self, group_id: u64) -> HardState {
        self.groups.read().get(&group_id).map(|g| g.hard_state).unwrap_or_default()
    }

    fn first_index(&self, group_id: u64) -> u64 {
        self.groups.read().get(&group_id).map_or(1, MemGroup::first_index)
    }

    fn last_index(&self, group_id: u64) -> u64 {
        self.groups.read().get(&group_id).map_or(0, MemGroup::last_index)
    }

    fn term(&self, group_id: u64, index: u64) -> Option<u64> {
        let groups = self.groups.read();
        let Some(group) = groups.get(&group_id) else { return (index == 0).then_some(0) };
        if index == group.base_index {
            return Some(group.base_term);
        }
        if index < group.first_index() || index > group.last_index() {
            return None;
        }
        Some(group.entries[(index - group.first_index()) as usize].term)
    }

    fn entries(&self, group_id: u64, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>, WalError> {
        let groups = self.groups.read();
        let group = groups.get(&group_id).ok_or_else(|| WalError::Invalid(format!("unknown group {group_id}")))?;
        if low < group.first_index() || high > group.last_index() + 1 || low > high {
            return Err(WalError::Invalid(format!(
                "entries {low}..{high} outside [{}, {}]",
                group.first_index(),
                group.last_index()
            )));
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in &group.entries[(low - group.first_index()) as usize..(high - group.first_index()) as usize] {
            bytes += entry.size_bytes();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }
}
