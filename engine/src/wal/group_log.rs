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
}

impl Default for GroupLog {
    fn default() -> GroupLog {
        GroupLog { hard_state: HardState::default(), first_index: 1, base_index: 0, base_term: 0, locations: VecDeque::new() }
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

    /// The oldest segment this group still needs (for purging).
    pub fn oldest_segment(&self) -> Option<u64> {
        self.locations.front().map(|l| l.segment_id)
    }

    /// Appends entries starting at `first_index` (replacing any suffix from there), at `locations`.
    pub fn apply_append(&mut self, first_index: u64, locations: impl Iterator<Item = EntryLocation>) -> Result<(), ApplyError> {
        if first_index < self.first_index {
            return Err(format!("append at {first_index} before the first index {}", self.first_index));
        }
        if first_index > self.last_index() + 1 {
            return Err(format!("append at {first_index} leaves a gap after {}", self.last_index()));
        }
        self.locations.truncate((first_index - self.first_index) as usize);
        self.locations.extend(locations);
        Ok(())
    }

    /// Applies one operation; `locations` gives the place of each appended entry (same length as the entries).
    pub fn apply(&mut self, op: &LogOp, locations: impl Iterator<Item = EntryLocation>) -> Result<(), ApplyError> {
        match op {
            LogOp::Append(entries) => {
                let Some(first) = entries.first() else { return Ok(()) };
                self.apply_append(first.index, locations)?;
            }
            LogOp::HardState(hard_state) => self.hard_state = *hard_state,
            LogOp::Truncate { from_index } => {
                let keep = from_index.saturating_sub(self.first_index) as usize;
                self.locations.truncate(keep);
            }
            LogOp::Compact { first_kept_index } => {
                if *first_kept_index <= self.first_index {
                    return Ok(());
                }
                let Some(base_term) = self.term(first_kept_index - 1) else {
                    return Err(format!("compaction to {first_kept_index} beyond the last index {}", self.last_index()));
                };
                let drop = ((first_kept_index - self.first_index) as usize).min(self.locations.len());
                self.locations.drain(..drop);
                self.base_index = first_kept_index - 1;
                self.base_term = base_term;
                self.first_index = *first_kept_index;
            }
            LogOp::Snapshot { index, term } => {
                self.locations.clear();
                self.first_index = index + 1;
                self.base_index = *index;
                self.base_term = *term;
                self.hard_state.commit = self.hard_state.commit.max(*index);
            }
        }
        Ok(())
    }
}
