//! How the core sees persisted state: a read-only [`Storage`] trait. The core never writes to storage; the caller
//! persists what a `Ready` asks for and then reports it with `on_persisted`. [`MemStorage`] is an in-memory
//! implementation for tests, simulators and benchmarks.

use crate::error::StorageError;
use crate::message::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};

pub type StorageResult<T> = std::result::Result<T, StorageError>;

/// The persisted state a replica restarts from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InitialState {
    pub hard_state: HardState,
    pub conf_state: ConfState,
}

/// Read access to a replica's persisted log. Indexes follow the Raft convention: the log holds entries
/// `first_index()..=last_index()`; the entry just before `first_index()` is the last one covered by the snapshot
/// (or a dummy at index 0), and `term()` of that index must still be answered.
pub trait Storage {
    fn initial_state(&self) -> StorageResult<InitialState>;
    /// Entries `[low, high)`, cut after `max_bytes` (by [`Entry::size_bytes`]) but always at least one.
    fn entries(&self, low: u64, high: u64, max_bytes: u64) -> StorageResult<Vec<Entry>>;
    /// The term of `index`: `Compacted` below `first_index() - 1`, `Unavailable` beyond `last_index()`.
    fn term(&self, index: u64) -> StorageResult<u64>;
    fn first_index(&self) -> StorageResult<u64>;
    fn last_index(&self) -> StorageResult<u64>;
    /// The most recent snapshot, at an index of at least `request_index` if the storage can make one.
    fn snapshot(&self, request_index: u64) -> StorageResult<Snapshot>;
}

/// Truncates `entries` after the byte budget, keeping at least one.
pub fn limit_size(entries: &mut Vec<Entry>, max_bytes: u64) {
    let mut total = 0u64;
    let keep = entries
        .iter()
        .position(|e| {
            total += e.size_bytes();
            total > max_bytes
        })
        .unwrap_or(entries.len());
    entries.truncate(keep.max(1));
}

/// An in-memory [`Storage`]: `entries[0]` is a dummy holding the snapshot's index and term.
#[derive(Clone, Debug)]
pub struct MemStorage {
    hard_state: HardState,
    snapshot_metadata: SnapshotMetadata,
    snapshot_data: bytes::Bytes,
    entries: Vec<Entry>,
}

impl Default for MemStorage {
    fn default() -> MemStorage {
        MemStorage {
            hard_state: HardState::default(),
            snapshot_metadata: SnapshotMetadata::default(),
            snapshot_data: bytes::Bytes::new(),
            entries: vec![Entry::default()],
        }
    }
}

impl MemStorage {
    /// A fresh storage whose configuration is `voters` (as if a snapshot at index 0 had installed it).
    pub fn new_with_voters(voters: &[u64]) -> MemStorage {
        let mut storage = MemStorage::default();
        storage.snapshot_metadata.conf_state = Some(ConfState { voters: voters.to_vec(), ..Default::default() });
        storage
    }

    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.snapshot_metadata.conf_state = Some(conf_state);
    }

    fn offset(&self) -> u64 {
        self.entries[0].index
    }

    /// Appends entries, replacing any conflicting suffix (what a `Ready`'s entries ask for).
    pub fn append(&mut self, entries: &[Entry]) -> StorageResult<()> {
        let Some(first) = entries.first() else { return Ok(()) };
        assert!(first.index > self.offset(), "append at {} overwrites the snapshot at {}", first.index, self.offset());
        let last_existing = self.offset() + self.entries.len() as u64 - 1;
        assert!(first.index <= last_existing + 1, "append at {} leaves a gap after {last_existing}", first.index);
        self.entries.truncate((first.index - self.offset()) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Discards entries before `compact_index`, keeping the entry at it as the new dummy.
    pub fn compact(&mut self, compact_index: u64) -> StorageResult<()> {
        if compact_index <= self.offset() {
            return Err(StorageError::Compacted);
        }
        let last = self.offset() + self.entries.len() as u64 - 1;
        assert!(compact_index <= last, "compact {compact_index} is beyond the last index {last}");
        let cut = (compact_index - self.offset()) as usize;
        self.entries.drain(..cut);
        self.entries[0].data = bytes::Bytes::new();
        Ok(())
    }

    /// Records a snapshot of the state machine at `index` (which must be in the log) without compacting.
    pub fn create_snapshot(&mut self, index: u64, conf_state: ConfState, data: bytes::Bytes) -> StorageResult<()> {
        if index <= self.snapshot_metadata.index {
            return Err(StorageError::SnapshotOutOfDate);
        }
        let term = self.term(index)?;
        self.snapshot_metadata = SnapshotMetadata { conf_state: Some(conf_state), index, term };
        self.snapshot_data = data;
        Ok(())
    }

    /// Installs a snapshot received from the leader: the log becomes empty after it.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> StorageResult<()> {
        let metadata = snapshot.metadata.clone().unwrap_or_default();
        if metadata.index <= self.snapshot_metadata.index {
            return Err(StorageError::SnapshotOutOfDate);
        }
        self.entries = vec![Entry { term: metadata.term, index: metadata.index, ..Default::default() }];
        self.hard_state.term = self.hard_state.term.max(metadata.term);
        self.hard_state.commit = self.hard_state.commit.max(metadata.index);
        self.snapshot_metadata = metadata;
        self.snapshot_data = snapshot.data;
        Ok(())
    }

    /// Every entry held (not the dummy); for checkers.
    pub fn all_entries(&self) -> &[Entry] {
        &self.entries[1..]
    }
}

impl Storage for MemStorage {
    fn initial_state(&self) -> StorageResult<InitialState> {
        Ok(InitialState {
            hard_state: self.hard_state,
            conf_state: self.snapshot_metadata.conf_state.clone().unwrap_or_default(),
        })
    }

    fn entries(&self, low: u64, high: u64, max_bytes: u64) -> StorageResult<Vec<Entry>> {
        if low <= self.offset() {
            return Err(StorageError::Compacted);
        }
        if high > self.last_index()? + 1 {
            return Err(StorageError::Unavailable);
        }
        let lo = (low - self.offset()) as usize;
        let hi = (high - self.offset()) as usize;
        let mut entries = self.entries[lo..hi].to_vec();
        limit_size(&mut entries, max_bytes);
        Ok(entries)
    }

    fn term(&self, index: u64) -> StorageResult<u64> {
        if index < self.offset() {
            return Err(StorageError::Compacted);
        }
        let position = (index - self.offset()) as usize;
        self.entries.get(position).map(|e| e.term).ok_or(StorageError::Unavailable)
    }

    fn first_index(&self) -> StorageResult<u64> {
        Ok(self.offset() + 1)
    }

    fn last_index(&self) -> StorageResult<u64> {
        Ok(self.offset() + self.entries.len() as u64 - 1)
    }

    fn snapshot(&self, _request_index: u64) -> StorageResult<Snapshot> {
        Ok(Snapshot { data: self.snapshot_data.clone(), metadata: Some(self.snapshot_metadata.clone()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, ..Default::default() }
    }

    #[test]
    fn append_replaces_conflicting_suffix_and_compact_keeps_terms() {
        let mut s = MemStorage::default();
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 2)]).unwrap();
        s.append(&[entry(3, 3), entry(4, 3)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(3).unwrap(), 3);
        s.compact(2).unwrap();
        assert_eq!(s.first_index().unwrap(), 3);
        assert_eq!(s.term(2).unwrap(), 1, "the compaction point's term stays answerable");
        assert_eq!(s.term(1), Err(StorageError::Compacted));
        assert_eq!(s.entries(2, 4, u64::MAX), Err(StorageError::Compacted));
        assert_eq!(s.entries(3, 6, u64::MAX), Err(StorageError::Unavailable));
        assert_eq!(s.entries(3, 5, 0).unwrap().len(), 1, "at least one entry whatever the budget");
    }

    #[test]
    fn snapshot_install_resets_log() {
        let mut s = MemStorage::new_with_voters(&[1, 2, 3]);
        s.append(&[entry(1, 1), entry(2, 1)]).unwrap();
        let snap = Snapshot {
            data: bytes::Bytes::from_static(b"x"),
            metadata: Some(SnapshotMetadata { index: 10, term: 4, conf_state: Some(ConfState::default()) }),
        };
        s.apply_snapshot(snap.clone()).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (11, 10));
        assert_eq!(s.term(10).unwrap(), 4);
        assert_eq!(s.apply_snapshot(snap), Err(StorageError::SnapshotOutOfDate));
    }
}
