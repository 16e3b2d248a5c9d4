//! Entries and a snapshot the core holds until the caller reports them persisted.
//!
//! `offset` is the index of `entries[0]`. Entries from `offset_in_progress` on have not yet been handed out in a
//! `Ready`; those before it were handed out and are being persisted. Invariant: `offset <= offset_in_progress <=
//! offset + entries.len()`; if a snapshot is held, `offset == snapshot.index + 1`.

use crate::message::{Entry, Snapshot};

#[derive(Clone, Debug, Default)]
pub struct Unstable {
    pub snapshot: Option<Snapshot>,
    pub snapshot_in_progress: bool,
    pub entries: Vec<Entry>,
    pub offset: u64,
    pub offset_in_progress: u64,
}

impl Unstable {
    pub fn new(offset: u64) -> Unstable {
        Unstable { offset, offset_in_progress: offset, ..Default::default() }
    }

    pub fn maybe_first_index(&self) -> Option<u64> {
        self.snapshot.as_ref().map(|s| s.index() + 1)
    }

    pub fn maybe_last_index(&self) -> Option<u64> {
        match self.entries.len() {
            0 => self.snapshot.as_ref().map(|s| s.index()),
            n => Some(self.offset + n as u64 - 1),
        }
    }

    pub fn maybe_term(&self, index: u64) -> Option<u64> {
        if index < self.offset {
            let snapshot = self.snapshot.as_ref()?;
            return (snapshot.index() == index).then(|| snapshot.term());
        }
        let last = self.maybe_last_index()?;
        if index > last {
            return None;
        }
        Some(self.entries[(index - self.offset) as usize].term)
    }

    /// Entries not yet handed out.
    pub fn next_entries(&self) -> &[Entry] {
        let start = (self.offset_in_progress - self.offset) as usize;
        &self.entries[start..]
    }

    pub fn has_next_entries(&self) -> bool {
        self.offset_in_progress < self.offset + self.entries.len() as u64
    }

    pub fn next_snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref().filter(|_| !self.snapshot_in_progress)
    }

    /// Marks everything handed out: entries up to the end and the snapshot.
    pub fn accept_in_progress(&mut self) {
        self.offset_in_progress = self.offset + self.entries.len() as u64;
        if self.snapshot.is_some() {
            self.snapshot_in_progress = true;
        }
    }

    /// Entries up to `index` of `term` are durable: drop them. Ignored if the log changed since (the entry at
    /// `index` now has another term, or is gone) — a later report will cover the replacement.
    pub fn stable_to(&mut self, index: u64, term: u64) -> bool {
        if self.maybe_term(index) != Some(term) || index < self.offset {
            return false;
        }
        let count = (index + 1 - self.offset) as usize;
        self.entries.drain(..count);
        self.offset = index + 1;
        self.offset_in_progress = self.offset_in_progress.max(self.offset);
        true
    }

    pub fn stable_snapshot_to(&mut self, index: u64) {
        if self.snapshot.as_ref().is_some_and(|s| s.index() == index) {
            self.snapshot = None;
            self.snapshot_in_progress = false;
        }
    }

    pub fn restore(&mut self, snapshot: Snapshot) {
        self.offset = snapshot.index() + 1;
        self.offset_in_progress = self.offset;
        self.entries.clear();
        self.snapshot = Some(snapshot);
        self.snapshot_in_progress = false;
    }

    /// Appends `entries`, dropping whatever they conflict with. Returns the index from which the log changed.
    pub fn truncate_and_append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let after = first.index;
        let end = self.offset + self.entries.len() as u64;
        if after == end {
            // The common case: a plain append.
        } else if after <= self.offset {
            // Replaces everything unstable; the caller's storage truncates its own suffix when it persists these.
            self.offset = after;
            self.entries.clear();
        } else {
            self.entries.truncate((after - self.offset) as usize);
        }
        self.offset_in_progress = self.offset_in_progress.min(after).max(self.offset);
        self.entries.extend_from_slice(entries);
    }

    /// Entries `[low, high)`, which must lie within the unstable range.
    pub fn slice(&self, low: u64, high: u64) -> &[Entry] {
        assert!(self.offset <= low && low <= high, "unstable slice {low}..{high} outside offset {}", self.offset);
        let upper = self.offset + self.entries.len() as u64;
        assert!(high <= upper, "unstable slice {low}..{high} beyond {upper}");
        &self.entries[(low - self.offset) as usize..(high - self.offset) as usize]
    }
}
