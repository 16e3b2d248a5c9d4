//! The replica's view of its log: persisted entries through [`Storage`], plus the [`Unstable`] entries and
//! snapshot not yet persisted, plus the commit and apply indexes.
//!
//! Ordering that always holds (checked by `validate`): `first_index - 1 <= applied <= applying <= committed`,
//! `committed <= last_index`, and `persisted <= last_index`.

use crate::error::StorageError;
use crate::message::{Entry, Snapshot};
use crate::storage::{limit_size, Storage, StorageResult};
use crate::unstable::Unstable;

pub struct RaftLog<S: Storage> {
    pub storage: S,
    pub unstable: Unstable,
    /// Highest index known committed by a quorum.
    pub committed: u64,
    /// Highest index handed out to the caller for applying.
    pub applying: u64,
    /// Highest index the caller reported applied.
    pub applied: u64,
    /// Highest index known durable and consistent with this log (entries up to it are persisted).
    pub persisted: u64,
    /// Nothing more is handed out for applying while set (`RawNode::hold_apply`).
    pub apply_held: bool,
    /// A snapshot's state taken with the log kept (`install_state`), for the next `Ready` to hand out.
    pub installed_state: Option<Snapshot>,
}

impl<S: Storage> RaftLog<S> {
    pub fn new(storage: S, applied_index: u64) -> StorageResult<RaftLog<S>> {
        let first = storage.first_index()?;
        let last = storage.last_index()?;
        // The commit index in the hard state may be written lazily; whatever the state machine applied (or the
        // snapshot covers) was committed, and nothing beyond the persisted log can be known committed.
        let applied = applied_index.max(first - 1);
        assert!(applied <= last, "applied index {applied} beyond the persisted log's last index {last}");
        let committed = storage.initial_state()?.hard_state.commit.max(applied).min(last);
        Ok(RaftLog {
            storage,
            unstable: Unstable::new(last + 1),
            committed,
            applying: applied,
            applied,
            persisted: last,
            apply_held: false,
            installed_state: None,
        })
    }

    pub fn first_index(&self) -> u64 {
        self.unstable.maybe_first_index().unwrap_or_else(|| self.storage.first_index().expect("storage first_index"))
    }

    pub fn last_index(&self) -> u64 {
        self.unstable.maybe_last_index().unwrap_or_else(|| self.storage.last_index().expect("storage last_index"))
    }

    pub fn last_term(&self) -> u64 {
        self.term(self.last_index()).expect("the last index always has a term")
    }

    /// The term of the entry at `index`; `Ok(0)` beyond the log, `Compacted` below the first index - 1.
    ///
    /// One storage call at most (it is asked on every append and response): whatever the unstable part does not
    /// answer is either beyond the log or the storage's to answer, whose `term` tells compacted indexes apart.
    pub fn term(&self, index: u64) -> StorageResult<u64> {
        if let Some(term) = self.unstable.maybe_term(index) {
            return Ok(term);
        }
        if let Some(snapshot) = &self.unstable.snapshot {
            // A snapshot not yet persisted replaces the stored log: nothing below it, nothing of it but its index.
            return if index < snapshot.index() { Err(StorageError::Compacted) } else { Ok(0) };
        }
        if index >= self.unstable.offset {
            // Unstable entries start at `offset` and come after every stored one; this is beyond them.
            debug_assert!(index > self.last_index(), "index {index} is in the log but not answered");
            return Ok(0);
        }
        match self.storage.term(index) {
            Ok(term) => Ok(term),
            Err(StorageError::Compacted) => Err(StorageError::Compacted),
            Err(StorageError::Unavailable) => Ok(0),
            Err(e) => Err(e),
        }
    }

    pub fn match_term(&self, index: u64, term: u64) -> bool {
        self.term(index).is_ok_and(|t| t == term)
    }

    /// Raft §5.4.1: a log with a later last term, or the same last term and at least as long, is up to date.
    pub fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        last_term > self.last_term() || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// The first entry of `entries` that is not already in the log with the same term, or 0 if there is none.
    pub fn find_conflict(&self, entries: &[Entry]) -> u64 {
        entries.iter().find(|e| !self.match_term(e.index, e.term)).map_or(0, |e| e.index)
    }

    /// The largest index `<= index` whose term is `<= term` (0 if none is known): where a leader's log with
    /// `term` at `index` may match ours. Powers fast backtracking on both sides of a rejected append.
    pub fn find_conflict_by_term(&self, index: u64, term: u64) -> (u64, u64) {
        let mut index = index.min(self.last_index());
        loop {
            match self.term(index) {
                Ok(t) if t > term && index > 0 => index -= 1,
                Ok(t) => return (index, t),
                Err(_) => return (index, 0),
            }
        }
    }

    /// Follower side of an append: if our log has `log_term` at `index`, append `entries` (dropping any
    /// conflicting suffix), advance the commit to `min(committed, last new index)` and return the last new index.
    pub fn maybe_append(&mut self, index: u64, log_term: u64, committed: u64, entries: &[Entry]) -> Option<u64> {
        if !self.match_term(index, log_term) {
            return None;
        }
        let last_new = index + entries.len() as u64;
        let conflict = self.find_conflict(entries);
        if conflict != 0 {
            assert!(
                conflict > self.committed,
                "entry {conflict} conflicts with the committed prefix {}",
                self.committed
            );
            let start = (conflict - (index + 1)) as usize;
            self.append(&entries[start..]);
        }
        self.commit_to(committed.min(last_new));
        Some(last_new)
    }

    /// Appends entries (whose first index must be at most `last_index + 1`); returns the new last index.
    pub fn append(&mut self, entries: &[Entry]) -> u64 {
        if let Some(first) = entries.first() {
            assert!(first.index > self.committed, "append at {} rewrites committed {}", first.index, self.committed);
            self.persisted = self.persisted.min(first.index - 1);
            self.unstable.truncate_and_append(entries);
        }
        self.last_index()
    }

    pub fn commit_to(&mut self, index: u64) {
        if index > self.committed {
            assert!(index <= self.last_index(), "commit {index} beyond the last index {}", self.last_index());
            self.committed = index;
        }
    }

    /// Leader side: commit `index` if it is in the leader's current `term` (Raft §5.4.2: entries of earlier
    /// terms are committed only by committing one of the current term).
    pub fn maybe_commit(&mut self, index: u64, term: u64) -> bool {
        if index > self.committed && self.match_term(index, term) {
            self.commit_to(index);
            return true;
        }
        false
    }

    pub fn applied_to(&mut self, index: u64) {
        if index == 0 || index <= self.applied {
            return;
        }
        assert!(index <= self.applying, "applied {index} was never handed out (applying {})", self.applying);
        self.applied = index;
    }

    /// Entries `[low, high)` from storage and unstable, cut after `max_bytes` (at least one).
    pub fn slice(&self, low: u64, high: u64, max_bytes: u64) -> StorageResult<Vec<Entry>> {
        if low >= high {
            return Ok(Vec::new());
        }
        if low < self.first_index() {
            return Err(StorageError::Compacted);
        }
        assert!(high <= self.last_index() + 1, "slice {low}..{high} beyond the last index {}", self.last_index());
        let unstable_from = self.unstable.offset;
        let mut entries = if low < unstable_from {
            let stored = self.storage.entries(low, high.min(unstable_from), max_bytes)?;
            if (stored.len() as u64) < high.min(unstable_from) - low {
                return Ok(stored); // The byte budget cut inside storage.
            }
            stored
        } else {
            Vec::new()
        };
        if high > unstable_from {
            entries.extend_from_slice(self.unstable.slice(low.max(unstable_from), high));
        }
        limit_size(&mut entries, max_bytes);
        Ok(entries)
    }

    /// Entries from `index` to the end, cut after `max_bytes`.
    pub fn entries_from(&self, index: u64, max_bytes: u64) -> StorageResult<Vec<Entry>> {
        self.slice(index, self.last_index() + 1, max_bytes)
    }

    /// Highest index that may be handed out for applying: committed and already persisted locally (so that a
    /// restarted replica never finds its state machine ahead of its log).
    fn max_appliable_index(&self) -> u64 {
        if self.unstable.snapshot.is_some() || self.apply_held {
            return self.applying;
        }
        self.committed.min(self.unstable.offset - 1)
    }

    pub fn has_next_committed_entries(&self) -> bool {
        self.applying < self.max_appliable_index()
    }

    pub fn next_committed_entries(&self, max_bytes: u64) -> Vec<Entry> {
        let high = self.max_appliable_index();
        if self.applying >= high {
            return Vec::new();
        }
        self.slice(self.applying + 1, high + 1, max_bytes)
            .expect("committed entries are never compacted before being applied")
    }

    pub fn applying_to(&mut self, index: u64) {
        assert!(index >= self.applying && index <= self.committed, "applying {index} out of order");
        self.applying = index;
    }

    /// Entries up to `index` of `term` were persisted.
    pub fn stable_to(&mut self, index: u64, term: u64) {
        if self.unstable.stable_to(index, term) || self.match_term(index, term) {
            self.persisted = self.persisted.max(index).min(self.last_index());
        }
    }

    pub fn stable_snapshot_to(&mut self, index: u64) {
        self.unstable.stable_snapshot_to(index);
        if self.unstable.snapshot.is_none() && self.first_index() > index {
            self.persisted = self.persisted.max(index);
        }
    }

    /// The snapshot a lagging follower should get: one not yet persisted here (a replica can win an election
    /// before its own snapshot install is durable) or else the storage's.
    pub fn snapshot(&self, request_index: u64) -> StorageResult<Snapshot> {
        match &self.unstable.snapshot {
            Some(snapshot) => Ok(snapshot.clone()),
            None => self.storage.snapshot(request_index),
        }
    }

    /// Replaces the log with a snapshot received from the leader.
    /// Takes a snapshot's state while keeping the log, which holds the snapshot's entry durably and agrees with it
    /// (see `Raft::restore`): applied jumps to its index, committed reaches it; the caller installs the state
    /// (`Ready::installed_state`). Nothing may be out for applying.
    pub fn install_state(&mut self, snapshot: Snapshot) {
        let index = snapshot.index();
        assert!(self.applying == self.applied && index > self.applied && index <= self.persisted);
        self.committed = self.committed.max(index);
        self.applying = index;
        self.applied = index;
        self.installed_state = Some(snapshot);
    }

    pub fn restore(&mut self, snapshot: Snapshot) {
        let index = snapshot.index();
        self.committed = index;
        // Whatever was persisted is superseded: nothing after the snapshot is durable until it is.
        self.persisted = self.persisted.min(index.saturating_sub(1));
        self.unstable.restore(snapshot);
        self.applying = index;
        self.applied = index;
    }

    /// Panics if the ordering invariants in the module docs are broken. Cheap enough for every test step.
    pub fn validate(&self) {
        let first = self.first_index();
        let last = self.last_index();
        assert!(first - 1 <= self.applied, "applied {} below the first index {first}", self.applied);
        assert!(self.applied <= self.applying, "applied {} > applying {}", self.applied, self.applying);
        assert!(self.applying <= self.committed, "applying {} > committed {}", self.applying, self.committed);
        assert!(self.committed <= last, "committed {} > last index {last}", self.committed);
        assert!(self.persisted <= last, "persisted {} > last index {last}", self.persisted);
        let unstable = &self.unstable;
        assert!(unstable.offset <= unstable.offset_in_progress);
        assert!(unstable.offset_in_progress <= unstable.offset + unstable.entries.len() as u64);
        for pair in unstable.entries.windows(2) {
            assert_eq!(pair[0].index + 1, pair[1].index, "unstable entries not contiguous");
            assert!(pair[0].term <= pair[1].term, "terms go backwards in the unstable log");
        }
        if let Some(first_unstable) = unstable.entries.first() {
            assert_eq!(first_unstable.index, unstable.offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::SnapshotMetadata;
    use crate::storage::MemStorage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, ..Default::default() }
    }

    /// `term` written out from its definition: bounds from the first and last index, then the unstable part,
    /// then the storage.
    fn term_by_definition(log: &RaftLog<MemStorage>, index: u64) -> StorageResult<u64> {
        if index < log.first_index() - 1 {
            return Err(StorageError::Compacted);
        }
        if index > log.last_index() {
            return Ok(0);
        }
        match log.unstable.maybe_term(index) {
            Some(term) => Ok(term),
            None => log.storage.term(index),
        }
    }

    fn assert_terms_match_definition(log: &RaftLog<MemStorage>, what: &str) {
        for index in 0..30 {
            assert_eq!(log.term(index), term_by_definition(log, index), "{what}: term of {index}");
        }
    }

    #[test]
    fn term_answers_as_defined_across_storage_unstable_entries_and_snapshots() {
        let mut storage = MemStorage::default();
        storage.append(&[entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2), entry(5, 2)]).unwrap();
        storage.compact(2).unwrap();
        let mut log = RaftLog::new(storage, 2).unwrap();
        assert_terms_match_definition(&log, "stored entries only, compacted to 2");
        assert_eq!(log.term(2), Ok(1), "the compaction point keeps its term");
        assert_eq!(log.term(1), Err(StorageError::Compacted));

        log.append(&[entry(6, 3), entry(7, 3)]);
        assert_terms_match_definition(&log, "unstable entries after the stored ones");
        assert_eq!((log.term(7), log.term(8)), (Ok(3), Ok(0)));

        log.append(&[entry(4, 4)]);
        assert_terms_match_definition(&log, "an unstable suffix replacing stored entries");
        assert_eq!((log.term(4), log.term(5)), (Ok(4), Ok(0)), "the stored 4 and 5 are superseded");

        let metadata = SnapshotMetadata { index: 20, term: 5, ..Default::default() };
        log.restore(Snapshot { metadata: Some(metadata), ..Default::default() });
        assert_terms_match_definition(&log, "an unstable snapshot over a stale storage");
        assert_eq!((log.term(19), log.term(20), log.term(21)), (Err(StorageError::Compacted), Ok(5), Ok(0)));

        log.append(&[entry(21, 5)]);
        assert_terms_match_definition(&log, "entries after an unstable snapshot");
    }
}
