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
}

/// The location recovery gives an entry whose record was purged: it must be truncated, overwritten or
/// compacted away by a later record before recovery ends, or the log is missing a live entry.
pub const MISSING: EntryLocation =
    EntryLocation { term: 0, segment_id: 0, record_offset: 0, record_len: 0, position: 0 };

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
        }
    }
}

/// Why an operation cannot apply to a group's log: the records are inconsistent (corruption or a caller bug).
pub type ApplyError = String;

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
    /// `recovering`, an append past the end is what a purge leaves behind (the entries between were in purged
    /// segments): they are marked [`MISSING`] until a later record truncates, overwrites or compacts them.
    pub fn apply_append(
        &mut self,
        first_index: u64,
        locations: impl Iterator<Item = EntryLocation>,
        recovering: bool,
    ) -> Result<(), ApplyError> {
        if first_index < self.first_index {
            return Err(format!("append at {first_index} before the first index {}", self.first_index));
        }
        if first_index > self.last_index() + 1 {
            if !recovering {
                return Err(format!("append at {first_index} leaves a gap after {}", self.last_index()));
            }
            let missing = (first_index - self.last_index() - 1) as usize;
            self.locations.extend(std::iter::repeat_n(MISSING, missing));
        }
        self.locations.truncate((first_index - self.first_index) as usize);
        self.locations.extend(locations);
        Ok(())
    }

    /// The first entry recovery could not find (see [`MISSING`]), if any.
    pub fn first_missing(&self) -> Option<u64> {
        self.locations.iter().position(|l| l.segment_id == 0).map(|p| self.first_index + p as u64)
    }

    /// Applies one operation found in `segment_id`; `locations` gives the place of each appended entry.
    pub fn apply(
        &mut self,
        op: &LogOp,
        segment_id: u64,
        locations: impl Iterator<Item = EntryLocation>,
        recovering: bool,
    ) -> Result<(), ApplyError> {
        match op {
            LogOp::Append(entries) => {
                let Some(first) = entries.first() else { return Ok(()) };
                self.apply_append(first.index, locations, recovering)?;
            }
            LogOp::HardState(hard_state) => {
                self.hard_state = *hard_state;
                self.hard_state_segment = segment_id;
                self.commit_bump_segment = 0;
            }
            LogOp::Truncate { from_index } => {
                let keep = from_index.saturating_sub(self.first_index) as usize;
                self.locations.truncate(keep);
            }
            LogOp::Compact { first_kept_index, base_term } => {
                let first_kept_index = *first_kept_index;
                if first_kept_index <= self.first_index {
                    return Ok(());
                }
                if first_kept_index > self.last_index() + 1 {
                    if !recovering {
                        return Err(format!("compaction to {first_kept_index} beyond the last index {}", self.last_index()));
                    }
                    // Replay after a purge: the entries before were in purged segments; this record says where the
                    // log starts.
                    self.locations.clear();
                } else {
                    self.locations.drain(..(first_kept_index - self.first_index) as usize);
                }
                self.first_index = first_kept_index;
                self.base_index = first_kept_index - 1;
                self.base_term = *base_term;
                self.base_segment = segment_id;
            }
            LogOp::Snapshot { index, term } => {
                self.locations.clear();
                self.first_index = index + 1;
                self.base_index = *index;
                self.base_term = *term;
                if *index > self.hard_state.commit {
                    // The commit this record implies is hard state too: it pins this segment until a newer
                    // HardState record supersedes it (the older HardState record stays pinned for term and vote).
                    self.hard_state.commit = *index;
                    self.commit_bump_segment = segment_id;
                }
                self.base_segment = segment_id;
            }
        }
        Ok(())
    }
}

fn nonzero(segment: u64) -> Option<u64> {
    (segment != 0).then_some(segment)
}
