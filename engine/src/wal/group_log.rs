//! One group's persisted log as the WAL knows it: where each entry is, its hard state, and what was compacted or
//! replaced by a snapshot. Rebuilt on recovery by replaying records; kept up to date by every write.

use std::collections::VecDeque;

use flotilla_raft::HardState;

use super::record::LogOp;

/// Where an entry lives: the record holding it and its position in that record's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLocation {
    pub term: u64,
    pub segment_id: u64,
    pub record_offset: u64,
    pub record_len: u32,
    pub position: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupLog {
    pub hard_state: HardState,
    /// Index of `locations[0]`; entries before it were compacted away or are covered by a snapshot.
    pub first_index: u64,
    /// Index and term just before `first_index` (the snapshot or compaction point; (0, 0) initially).
    pub base_index: u64,
    pub base_term: u64,
    pub locations: VecDeque<EntryLocation>,
    /// Segments holding the latest HardState record, a later Snapshot record that raised the commit, and the
    /// latest record that set the base (0: none needed).
    pub hard_state_segment: u64,
    pub commit_bump_segment: u64,
    pub base_segment: u64,
    /// During recovery only: entries `[missing_from, first_index)` were in purged segments (an append came past
    /// the end of an empty log). A later record must truncate, overwrite or compact them away before recovery
    /// ends, or the log is missing live entries. Kept as a range, not one marker per entry: a long-lived group's
    /// gap spans its whole history.
    pub missing_from: Option<u64>,
}

impl Default for GroupLog {
    fn default() -> GroupLog {
        GroupLog {
            hard_state: HardState::default(),
            first_index: 1,
            base_index: 0,
            base_term: 0,
            locations: VecDeque::new(),
            hard_state_segment: 0,
            commit_bump_segment: 0,
            base_segment: 0,
            missing_from: None,
        }
    }
}

/// Why an operation cannot apply to a group's log: the records are inconsistent (corruption or a caller bug).
pub type ApplyError = String;

/// Indexes a log may hold stay below this (no log grows that far; larger ones in a record are damage).
pub const INDEX_MAX: u64 = 1 << 62;

impl GroupLog {
    pub fn last_index(&self) -> u64 {
        self.first_index + self.locations.len() as u64 - 1
    }

    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            return Some(self.base_term);
        }
        if index < self.first_index || index > self.last_index() {
            return None;
        }
        Some(self.locations[(index - self.first_index) as usize].term)
    }

    pub fn location(&self, index: u64) -> Option<&EntryLocation> {
        if index < self.first_index {
            return None;
        }
        self.locations.get((index - self.first_index) as usize)
    }

    /// The oldest segment holding one of this group's live entries.
    pub fn oldest_entry_segment(&self) -> Option<u64> {
        self.locations.front().map(|l| l.segment_id)
    }

    /// The oldest segment this group still needs for recovery: its live entries and its latest metadata.
    pub fn pinned_segment(&self) -> Option<u64> {
        let metadata = [self.hard_state_segment, self.commit_bump_segment, self.base_segment];
        std::iter::once(self.oldest_entry_segment()).chain(metadata.map(nonzero)).flatten().min()
    }

    /// Appends entries starting at `first_index` (replacing any suffix from there), at `locations`. While
    /// `recovering`, an append past the end of an empty log is what a purge leaves behind (the entries between
    /// were in purged segments): they are recorded missing ([`GroupLog::missing_from`]) until a later record
    /// truncates, overwrites or compacts them. Past the end of a log that holds entries it is an error: no purge
    /// leaves a hole after live entries.
    pub fn apply_append(
        &mut self,
        first_index: u64,
        locations: impl Iterator<Item = EntryLocation>,
        recovering: bool,
    ) -> Result<(), ApplyError> {
        let logical_first = self.missing_from.unwrap_or(self.first_index);
        if first_index < logical_first {
            return Err(format!("append at {first_index} before the first index {logical_first}"));
        }
        if first_index < self.first_index {
            // Into the missing range: what follows is replaced, what precedes stays missing.
            self.locations.clear();
            self.first_index = first_index;
            self.missing_from = (first_index > logical_first).then_some(logical_first);
        } else if first_index > self.last_index() + 1 {
            if !recovering || !self.locations.is_empty() {
                return Err(format!("append at {first_index} leaves a gap after {}", self.last_index()));
            }
            self.missing_from = Some(logical_first);
            self.first_index = first_index;
        } else {
            self.locations.truncate((first_index - self.first_index) as usize);
        }
        self.locations.extend(locations);
        Ok(())
    }

    /// The first entry recovery could not find (see [`GroupLog::missing_from`]), if any.
    pub fn first_missing(&self) -> Option<u64> {
        self.missing_from
    }

    /// Sets where the log starts: entries before `first_kept_index` are gone, the one before it had `base_term`.
    fn set_base(&mut self, first_kept_index: u64, base_term: u64, segment_id: u64) {
        self.first_index = first_kept_index;
        self.base_index = first_kept_index - 1;
        self.base_term = base_term;
        self.base_segment = segment_id;
    }

    /// Applies one operation found in `segment_id`; `locations` gives the place of each appended entry.
    pub fn apply(
        &mut self,
        op: &LogOp,
        segment_id: u64,
        locations: impl Iterator<Item = EntryLocation>,
        recovering: bool,
    ) -> Result<(), ApplyError> {
        let index = match op {
            LogOp::Append(entries) => entries.last().map_or(0, |e| e.index),
            LogOp::Truncate { from_index } => *from_index,
            LogOp::Compact { first_kept_index, .. } => *first_kept_index,
            LogOp::Snapshot { index, .. } => *index,
            LogOp::HardState(_) => 0,
        };
        if index >= INDEX_MAX {
            return Err(format!("index {index} out of range"));
        }
        match op {
            LogOp::Append(entries) => {
                let Some(first) = entries.first() else { return Ok(()) };
                if !entries.windows(2).all(|w| w[0].index.checked_add(1) == Some(w[1].index)) {
                    return Err(format!("an append of non-consecutive entries from {}", first.index));
                }
                self.apply_append(first.index, locations, recovering)?;
            }
            LogOp::HardState(hard_state) => {
                self.hard_state = *hard_state;
                self.hard_state_segment = segment_id;
                self.commit_bump_segment = 0;
            }
            LogOp::Truncate { from_index } => {
                if let Some(missing_from) = self.missing_from {
                    if *from_index <= self.first_index {
                        // Nothing located survives; of the missing range, what lies before `from_index`.
                        self.locations.clear();
                        self.first_index = (*from_index).max(missing_from);
                        self.missing_from = (*from_index > missing_from).then_some(missing_from);
                        return Ok(());
                    }
                }
                let keep = from_index.saturating_sub(self.first_index) as usize;
                self.locations.truncate(keep);
            }
            LogOp::Compact { first_kept_index, base_term } => {
                let first_kept_index = *first_kept_index;
                let logical_first = self.missing_from.unwrap_or(self.first_index);
                if first_kept_index <= logical_first {
                    return Ok(());
                }
                if let Some(missing_from) = self.missing_from {
                    if first_kept_index < self.first_index {
                        // Part of the missing range compacted away.
                        self.missing_from = Some(first_kept_index.max(missing_from));
                        self.base_index = first_kept_index - 1;
                        self.base_term = *base_term;
                        self.base_segment = segment_id;
                        return Ok(());
                    }
                    self.missing_from = None;
                }
                if first_kept_index > self.last_index() + 1 {
                    if !recovering {
                        return Err(format!(
                            "compaction to {first_kept_index} beyond the last index {}",
                            self.last_index()
                        ));
                    }
                    // Replay after a purge: the entries before were in purged segments; this record says where the
                    // log starts.
                    self.locations.clear();
                } else {
                    self.locations.drain(..(first_kept_index - self.first_index) as usize);
                }
                self.set_base(first_kept_index, *base_term, segment_id);
            }
            LogOp::Snapshot { index, term } => {
                self.locations.clear();
                self.missing_from = None;
                self.set_base(index + 1, *term, segment_id);
                if *index > self.hard_state.commit {
                    // The commit this record implies is hard state too: it pins this segment until a newer
                    // HardState record supersedes it (the older HardState record stays pinned for term and vote).
                    self.hard_state.commit = *index;
                    self.commit_bump_segment = segment_id;
                }
            }
        }
        Ok(())
    }
}

fn nonzero(segment: u64) -> Option<u64> {
    (segment != 0).then_some(segment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_raft::Entry;

    fn at(segment_id: u64) -> EntryLocation {
        EntryLocation { term: 1, segment_id, record_offset: 0, record_len: 0, position: 0 }
    }

    fn append(log: &mut GroupLog, first: u64, count: u64) -> Result<(), ApplyError> {
        let entries: Vec<Entry> =
            (first..first + count).map(|index| Entry { index, term: 1, ..Default::default() }).collect();
        log.apply(&LogOp::Append(entries), 7, (0..count).map(|_| at(7)), true)
    }

    #[test]
    fn a_purged_history_is_one_missing_range_however_long() {
        // A long-lived group whose first surviving record appends at index 10^12: no marker per missing entry.
        let mut log = GroupLog::default();
        append(&mut log, 1_000_000_000_000, 3).unwrap();
        assert_eq!(log.first_missing(), Some(1));
        assert_eq!(log.locations.len(), 3);
        // A compaction into the range shrinks it; one up to the located entries resolves it.
        log.apply(&LogOp::Compact { first_kept_index: 500, base_term: 1 }, 8, std::iter::empty(), true).unwrap();
        assert_eq!(log.first_missing(), Some(500));
        log.apply(&LogOp::Compact { first_kept_index: 1_000_000_000_001, base_term: 1 }, 8, std::iter::empty(), true)
            .unwrap();
        assert_eq!(log.first_missing(), None);
        assert_eq!(
            (log.first_index, log.last_index(), log.base_index),
            (1_000_000_000_001, 1_000_000_000_002, 1_000_000_000_000)
        );
    }

    #[test]
    fn a_rewrite_into_the_missing_range_replaces_what_follows_and_a_truncation_before_it_clears_it() {
        let mut log = GroupLog::default();
        append(&mut log, 101, 200).unwrap(); // 1..=100 missing
        append(&mut log, 50, 251).unwrap(); // a laggard's rewrite: 50..=300; 1..=49 still missing
        assert_eq!((log.first_missing(), log.first_index, log.last_index()), (Some(1), 50, 300));
        log.apply(&LogOp::Truncate { from_index: 1 }, 9, std::iter::empty(), true).unwrap();
        assert_eq!((log.first_missing(), log.first_index, log.last_index()), (None, 1, 0));
    }

    #[test]
    fn an_append_past_the_end_of_live_entries_and_a_snapshot_at_the_last_index_are_refused() {
        let mut log = GroupLog::default();
        append(&mut log, 1, 3).unwrap();
        assert!(append(&mut log, 10, 1).is_err(), "no purge leaves a hole after live entries");
        assert!(log.apply(&LogOp::Snapshot { index: u64::MAX, term: 1 }, 1, std::iter::empty(), true).is_err());
    }
}
