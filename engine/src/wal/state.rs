//! [`WalState`]: the part of the WAL that readers share — the segment list, every group's index, the entry cache
//! and read handles — and the planning of purges. Writers change it only briefly, after their bytes are durable.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use flotilla_raft::{Entry, HardState};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use super::entry_cache::EntryCache;
use super::group_log::{EntryLocation, GroupLog};
use super::record::{decode, Body, LogOp};
use super::segment_writer::{IndexChange, PreparedWrite};
use super::{io_error, recycle_id, recycle_path, segment_path, PurgeReport, WalError, SEGMENT_HEADER_BYTES};
use crate::disk::{Disk, DiskFile};

/// The part of the WAL that readers share: the segment list, every group's index, read handles. Writers change
/// it only briefly, after their bytes are durable, so reads never wait for an fsync.
pub struct WalState {
    pub(super) dir: PathBuf,
    pub(super) disk: Arc<dyn Disk>,
    /// Every live segment (the active one's length as of the last write).
    pub(super) segments: BTreeMap<u64, Segment>,
    /// Open handles for reads, one per segment (the active one included: a separate handle from the writer's).
    pub(super) readers: Mutex<HashMap<u64, Box<dyn DiskFile>>>,
    pub(super) groups: FxHashMap<u64, GroupLog>,
    pub(super) cache: EntryCache,
    /// Purged segments kept for reuse (see `WalOptions::recycled_segments_max`).
    pub(super) recycled_segments_max: usize,
}

/// A live segment as readers see it.
pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    /// Where its frames end.
    pub(crate) len: u64,
    /// The checksum seed of its records.
    pub(crate) salt: u32,
}

/// What a purge will do: the rewrite to write first, the segments to delete after.
pub struct PurgePlan {
    pub rewrite: Vec<(u64, LogOp)>,
    pub doomed: Vec<u64>,
    pub report: PurgeReport,
}

impl WalState {
    /// Rejects operations that replay could not apply, before anything is written.
    pub fn validate<'a>(&self, operations: impl IntoIterator<Item = (u64, &'a LogOp)>) -> Result<(), WalError> {
        // Each group's (first, last) index as the batch's operations so far leave it.
        let mut bounds: FxHashMap<u64, (u64, u64)> = FxHashMap::default();
        for (group_id, op) in operations {
            let untouched = !bounds.contains_key(&group_id);
            let group_id = &group_id;
            let (first, last) = *bounds
                .entry(*group_id)
                .or_insert_with(|| self.groups.get(group_id).map_or((1, 0), |g| (g.first_index, g.last_index())));
            let next = match op {
                LogOp::Append(entries) => {
                    let Some(head) = entries.first() else { continue };
                    if head.index < first || head.index > last + 1 {
                        return Err(WalError::Invalid(format!(
                            "group {group_id}: append at {} outside [{first}, {}]",
                            head.index,
                            last + 1
                        )));
                    }
                    if let Some(large) = entries.iter().find(|e| e.data.len() > super::record::ENTRY_DATA_BYTES_MAX) {
                        return Err(WalError::Invalid(format!(
                            "group {group_id}: entry {} holds {} bytes, over the {} an Append record can hold",
                            large.index,
                            large.data.len(),
                            super::record::ENTRY_DATA_BYTES_MAX
                        )));
                    }
                    let contiguous = entries.windows(2).all(|w| w[1].index == w[0].index + 1);
                    if !contiguous {
                        return Err(WalError::Invalid(format!("group {group_id}: append of non-contiguous entries")));
                    }
                    (first, head.index + entries.len() as u64 - 1)
                }
                LogOp::Truncate { from_index } => (first, last.min(from_index.saturating_sub(1)).max(first - 1)),
                LogOp::Compact { first_kept_index, base_term } => {
                    if *first_kept_index > last + 1 {
                        return Err(WalError::Invalid(format!(
                            "group {group_id}: compaction to {first_kept_index} beyond the last index {last}"
                        )));
                    }
                    let known_term = self.groups.get(group_id).and_then(|g| g.term(first_kept_index - 1));
                    // (Only against the log before this write: an earlier operation of the batch may rewrite it.)
                    if untouched && *first_kept_index > first && known_term.is_some_and(|t| t != *base_term) {
                        return Err(WalError::Invalid(format!(
                            "group {group_id}: compaction says entry {} has term {base_term}, the log says {known_term:?}",
                            first_kept_index - 1
                        )));
                    }
                    (first.max(*first_kept_index), last)
                }
                LogOp::Snapshot { index, .. } => {
                    if *index == 0 {
                        return Err(WalError::Invalid(format!("group {group_id}: a snapshot at index 0")));
                    }
                    (index + 1, *index)
                }
                LogOp::HardState(_) => (first, last),
            };
            bounds.insert(*group_id, next);
        }
        Ok(())
    }

    /// Plans a purge below `horizon` (capped at the active segment): which groups to rewrite and how, and which
    /// segments then go.
    pub fn purge_plan(&self, horizon: u64, active_id: u64) -> Result<PurgePlan, WalError> {
        let horizon = horizon.min(active_id);
        let doomed: Vec<u64> = self.segments.range(..horizon).map(|(id, _)| *id).collect();
        let mut rewrite = Vec::new();
        let mut report = PurgeReport { segments_removed: doomed.len() as u64, ..Default::default() };
        if doomed.is_empty() {
            return Ok(PurgePlan { rewrite, doomed, report });
        }
        for (&group_id, group) in &self.groups {
            if group.pinned_segment().is_none_or(|oldest| oldest >= horizon) {
                continue;
            }
            report.groups_rewritten += 1;
            if group.oldest_entry_segment().is_some_and(|oldest| oldest < horizon) {
                let live = self.entries(group_id, group.first_index, group.last_index() + 1, u64::MAX)?;
                report.entries_rewritten += live.len() as u64;
                rewrite.push((group_id, LogOp::Append(live)));
            }
            rewrite
                .push((group_id, LogOp::Compact { first_kept_index: group.first_index, base_term: group.base_term }));
            rewrite.push((group_id, LogOp::HardState(group.hard_state)));
        }
        Ok(PurgePlan { rewrite, doomed, report })
    }

    /// Deletes segments (after the purge's rewrite is durable) and makes that durable.
    pub fn remove_segments(&mut self, doomed: &[u64]) -> Result<(), WalError> {
        if doomed.is_empty() {
            return Ok(());
        }
        let listed = self.disk.list(&self.dir).map_err(io_error(format!("listing {}", self.dir.display())))?;
        let mut pool = listed.iter().filter(|path| recycle_id(path).is_some()).count();
        for id in doomed {
            if let Some(Segment { path, .. }) = self.segments.remove(id) {
                self.readers.lock().remove(id);
                if pool < self.recycled_segments_max {
                    // Kept for the writer to reuse (its stale records never verify under another segment's salt).
                    let recycled = recycle_path(&self.dir, *id);
                    self.disk.rename(&path, &recycled).map_err(io_error(format!("recycling {}", path.display())))?;
                    pool += 1;
                } else {
                    self.disk.remove(&path).map_err(io_error(format!("removing {}", path.display())))?;
                }
            }
        }
        self.disk.sync_dir(&self.dir).map_err(io_error("syncing the WAL directory after a purge"))
    }

    /// The horizon that frees every segment no group needs for live entries, and beyond that as many segments
    /// as it takes to bring the WAL under `bytes_max` (rewriting the laggards that pin them).
    pub fn suggest_horizon(&self, bytes_max: u64, active_id: u64) -> u64 {
        let needed_for_entries =
            self.groups.values().filter_map(GroupLog::oldest_entry_segment).min().unwrap_or(active_id);
        let mut horizon = needed_for_entries.min(active_id);
        let mut total: u64 = self.segments.range(horizon..).map(|(_, segment)| segment.len).sum();
        for (&id, segment) in self.segments.range(horizon..) {
            if total <= bytes_max || id >= active_id {
                break;
            }
            total -= segment.len;
            horizon = id + 1;
        }
        horizon
    }

    /// The largest number of WAL bytes any one group keeps from being purged, and that group.
    pub fn max_pinned_bytes(&self) -> (u64, u64) {
        self.most_pinned(1).first().map(|&(group, bytes)| (bytes, group)).unwrap_or((0, 0))
    }

    /// The `count` groups that keep the most WAL from being purged, most first: (group, pinned bytes).
    /// Linear in the groups (one lookup each, a partial sort): it runs on every purge, over 100K groups.
    pub fn most_pinned(&self, count: usize) -> Vec<(u64, u64)> {
        // Bytes from each segment to the newest, so that each group's pin is one lookup.
        let mut from_segment = BTreeMap::new();
        let mut total = 0;
        for (&id, segment) in self.segments.iter().rev() {
            total += segment.len;
            from_segment.insert(id, total);
        }
        let pinned_bytes = |oldest: u64| from_segment.range(oldest..).next().map_or(0, |(_, bytes)| *bytes);
        let mut pinned: Vec<(u64, u64)> = self
            .groups
            .iter()
            .filter_map(|(&group_id, group)| group.pinned_segment().map(|oldest| (group_id, pinned_bytes(oldest))))
            .filter(|(_, bytes)| *bytes > 0)
            .collect();
        let order = |&(group, bytes): &(u64, u64)| (std::cmp::Reverse(bytes), group);
        if pinned.len() > count && count > 0 {
            pinned.select_nth_unstable_by_key(count - 1, order);
            pinned.truncate(count);
        }
        pinned.sort_unstable_by_key(order);
        pinned.truncate(count);
        pinned
    }

    pub fn add_segment(&mut self, id: u64, salt: u32) {
        self.segments.insert(id, Segment { path: segment_path(&self.dir, id), len: SEGMENT_HEADER_BYTES, salt });
    }

    /// Bytes of WAL that `group_id` keeps from being purged: every segment from the oldest it needs on.
    pub fn pinned_bytes(&self, group_id: u64) -> u64 {
        let Some(oldest) = self.groups.get(&group_id).and_then(GroupLog::pinned_segment) else { return 0 };
        self.segments.range(oldest..).map(|(_, segment)| segment.len).sum()
    }

    pub fn entry_cache_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    pub fn total_bytes(&self) -> u64 {
        self.segments.values().map(|segment| segment.len).sum()
    }

    /// Updates the index with a write that is now durable.
    pub fn apply(&mut self, prepared: PreparedWrite) {
        let segment_id = prepared.segment_id;
        if let Some(segment) = self.segments.get_mut(&segment_id) {
            segment.len = segment.len.max(prepared.end);
        }
        for record in prepared.placed {
            let group = self.groups.entry(record.group_id).or_default();
            let applied = match &record.change {
                IndexChange::Append(entries) => {
                    let locations = entries.iter().enumerate().map(|(position, entry)| EntryLocation {
                        term: entry.term,
                        segment_id,
                        record_offset: record.offset,
                        record_len: record.len as u32,
                        position: position as u32,
                    });
                    group.apply_append(entries[0].index, locations, false)
                }
                IndexChange::Other(op) => group.apply(op, segment_id, std::iter::empty(), false),
            };
            applied.expect("operations were validated before writing");
            match record.change {
                IndexChange::Append(entries) => self.cache.append(record.group_id, entries),
                IndexChange::Other(LogOp::Truncate { from_index }) => {
                    self.cache.truncate_from(record.group_id, from_index)
                }
                IndexChange::Other(LogOp::Compact { first_kept_index, .. }) => {
                    self.cache.compact_to(record.group_id, first_kept_index)
                }
                IndexChange::Other(LogOp::Snapshot { .. }) => self.cache.clear_group(record.group_id),
                IndexChange::Other(LogOp::HardState(_)) | IndexChange::Other(LogOp::Append(_)) => {}
            }
        }
    }

    pub fn group(&self, group_id: u64) -> Option<&GroupLog> {
        self.groups.get(&group_id)
    }

    pub fn hard_state(&self, group_id: u64) -> HardState {
        self.groups.get(&group_id).map(|g| g.hard_state).unwrap_or_default()
    }

    pub fn segment_ids(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    pub fn groups(&self) -> impl Iterator<Item = (u64, &GroupLog)> {
        self.groups.iter().map(|(id, group)| (*id, group))
    }

    /// Entries `[low, high)` of a group, cut after `max_bytes` (at least one).
    pub fn entries(&self, group_id: u64, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>, WalError> {
        let group = self.groups.get(&group_id).ok_or_else(|| WalError::Invalid(format!("unknown group {group_id}")))?;
        if low < group.first_index || high > group.last_index() + 1 || low > high {
            return Err(WalError::Invalid(format!(
                "group {group_id}: entries {low}..{high} outside [{}, {}]",
                group.first_index,
                group.last_index()
            )));
        }
        if let Some(cached) = self.cache.get(group_id, low, high, max_bytes) {
            return Ok(cached);
        }
        let mut entries = Vec::new();
        let mut bytes = 0u64;
        let mut index = low;
        while index < high {
            let location = *group
                .location(index)
                .ok_or_else(|| WalError::Invalid(format!("group {group_id} holds no entry {index}")))?;
            let batch = self.read_batch(&location)?;
            for entry in batch.into_iter().skip(location.position as usize) {
                if index >= high {
                    break;
                }
                if entry.index != index {
                    return Err(WalError::Corruption {
                        path: segment_path(&self.dir, location.segment_id),
                        offset: location.record_offset,
                        reason: format!("expected entry {index}, found {}", entry.index),
                    });
                }
                bytes += entry.size_bytes();
                if !entries.is_empty() && bytes > max_bytes {
                    return Ok(entries);
                }
                entries.push(entry);
                index += 1;
                // The next entry may live in another record (after its suffix was rewritten).
                let same_record = |l: &EntryLocation| {
                    l.record_offset == location.record_offset && l.segment_id == location.segment_id
                };
                if group.location(index).is_some_and(|l| !same_record(l)) {
                    break;
                }
            }
        }
        Ok(entries)
    }

    fn read_batch(&self, location: &EntryLocation) -> Result<Vec<Entry>, WalError> {
        let path = segment_path(&self.dir, location.segment_id);
        let mut bytes = vec![0; location.record_len as usize];
        let mut readers = self.readers.lock();
        let reader = match readers.entry(location.segment_id) {
            std::collections::hash_map::Entry::Occupied(open) => open.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(self.disk.open(&path, false).map_err(io_error(format!("opening {}", path.display())))?)
            }
        };
        reader
            .read_exact_at(location.record_offset, &mut bytes)
            .map_err(io_error(format!("reading {}", path.display())))?;
        drop(readers);
        let salt = self.segments.get(&location.segment_id).map_or(0, |segment| segment.salt);
        match decode(&bytes, salt) {
            Ok(record) => match record.body {
                Body::Op(LogOp::Append(entries)) => Ok(entries),
                _ => Err(WalError::Corruption {
                    path,
                    offset: location.record_offset,
                    reason: "not an append record".into(),
                }),
            },
            Err(error) => Err(WalError::Corruption { path, offset: location.record_offset, reason: error.to_string() }),
        }
    }
}
