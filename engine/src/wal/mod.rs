//! The node's shared write-ahead log: every group replica's entries and hard state in one sequence of segment
//! files, so that one write and one `fdatasync` can make many groups' Readies durable at once.
//!
//! - `record.rs`: the record format and codec; `docs/wal-format.md` has the bytes.
//! - `group_log.rs`: one group's log as the WAL knows it (entry locations, hard state, compaction point).
//! - this file: [`Wal`]: segments, batch writes, reads, and recovery.
//!
//! Recovery replays every segment in order and verifies every checksum. Damage at the very end of the newest
//! segment is a torn write (the process died before the write was synced): it is truncated and reported in the
//! [`RecoveryReport`]. Damage anywhere else is corruption: [`Wal::open`] fails with [`WalError::Corruption`]
//! naming the file and offset, and `repair_truncate` (the `flotilla wal-repair` command, later) can cut there.

pub mod entry_cache;
pub mod group_commit;
pub mod group_log;
pub mod record;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_raft::{Entry, HardState};
use parking_lot::Mutex;

use crate::disk::{Disk, DiskFile};
use entry_cache::EntryCache;
use group_log::{EntryLocation, GroupLog};
use record::{append_runs, decode, encode, encode_append, DecodeError, LogOp, RECORD_HEADER_BYTES};

/// First bytes of every segment: magic and format version, then the segment id (u64 LE).
pub const SEGMENT_MAGIC: &[u8; 8] = b"FLOTWAL1";
pub const SEGMENT_HEADER_BYTES: u64 = 16;

/// WAL settings.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// A new segment is started once the active one reaches this size. Default 256 MiB: starting a segment costs
    /// a file creation, an fdatasync and a directory fsync, which at 64 MiB segments kept 4 KiB appends at ~65 %
    /// of the disk's bandwidth and at 256 MiB lets them reach ~80 % (docs/benchmarks.md). The price: the active
    /// segment cannot be purged, so up to this much WAL stays on disk whatever the purge budget.
    pub segment_bytes_max: u64,
    /// Appends are split into records of at most about this many bytes. Default 4 MiB.
    pub record_batch_bytes_max: usize,
    /// **Benchmarks only.** With `false`, writes are never synced: acknowledged writes are lost on power failure
    /// or kernel crash. Opening a WAL this way prints a warning. Default `true`.
    pub sync: bool,
    /// Recent entries of all groups kept in memory for reads (0 disables the cache). Default 64 MiB.
    pub entry_cache_bytes_max: u64,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions { segment_bytes_max: 256 << 20, record_batch_bytes_max: 4 << 20, sync: true, entry_cache_bytes_max: 64 << 20 }
    }
}

#[derive(Debug)]
pub enum WalError {
    /// The disk failed (a broken environment: the node must stop).
    Io { context: String, source: io::Error },
    /// A checksum or structure check failed away from the tail: the node must stop; see `repair_truncate`.
    Corruption { path: PathBuf, offset: u64, reason: String },
    /// The caller asked for something impossible (an append leaving a gap, …): a bug above the WAL.
    Invalid(String),
}

impl std::fmt::Display for WalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalError::Io { context, source } => write!(f, "WAL I/O error while {context}: {source}"),
            WalError::Corruption { path, offset, reason } => write!(
                f,
                "WAL corruption in {} at offset {offset}: {reason} (the node cannot start; `repair_truncate` can cut the WAL there, losing what follows)",
                path.display()
            ),
            WalError::Invalid(what) => write!(f, "invalid WAL operation: {what}"),
        }
    }
}

impl std::error::Error for WalError {}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> WalError {
    let context = context.into();
    move |source| WalError::Io { context, source }
}

/// What a purge did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgeReport {
    pub segments_removed: u64,
    pub groups_rewritten: u64,
    pub entries_rewritten: u64,
}

/// What recovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    /// A torn write at the tail that was truncated: (segment path, offset cut at, bytes dropped).
    pub torn_tail: Option<(PathBuf, u64, u64)>,
}

struct ActiveSegment {
    id: u64,
    file: Box<dyn DiskFile>,
    len: u64,
}

/// The part of the WAL that readers share: the segment list, every group's index, read handles. Writers change
/// it only briefly, after their bytes are durable, so reads never wait for an fsync.
pub struct WalState {
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    /// Every live segment: its path and length (the active one's as of the last write).
    segments: BTreeMap<u64, (PathBuf, u64)>,
    /// Open handles for reads, one per segment (the active one included: a separate handle from the writer's).
    readers: Mutex<HashMap<u64, Box<dyn DiskFile>>>,
    groups: HashMap<u64, GroupLog>,
    cache: EntryCache,
}

/// The part of the WAL that writes: the active segment. Owned by one writer (the caller of [`Wal::write`], or
/// the group-commit thread).
pub struct SegmentWriter {
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    options: WalOptions,
    active: ActiveSegment,
    /// The encode buffer, reused across writes (a fresh multi-megabyte buffer per write costs page faults).
    scratch: Vec<u8>,
}

/// Records encoded for one write (in the writer's scratch buffer), with where each will land.
pub struct PreparedWrite {
    placed: Vec<PlacedRecord>,
    segment_id: u64,
}

/// One encoded record and what it does to its group's index.
struct PlacedRecord {
    group_id: u64,
    offset: u64,
    len: usize,
    change: IndexChange,
}

/// What a record changes in the index (and the entry cache).
enum IndexChange {
    Append(Vec<Entry>),
    Other(LogOp),
}

/// The WAL for a single writer: shared state and segment writer together.
pub struct Wal {
    state: WalState,
    writer: SegmentWriter,
}

pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.wal"))
}

fn segment_id(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".wal")?;
    (stem.len() == 20).then(|| stem.parse().ok()).flatten()
}

fn read_all(file: &dyn DiskFile, path: &Path) -> Result<Vec<u8>, WalError> {
    let len = file.len_bytes().map_err(io_error(format!("sizing {}", path.display())))?;
    let mut bytes = vec![0; len as usize];
    file.read_exact_at(0, &mut bytes).map_err(io_error(format!("reading {}", path.display())))?;
    Ok(bytes)
}

impl Wal {
    /// Opens (recovering) or creates the WAL in `dir`.
    pub fn open(dir: &Path, disk: Arc<dyn Disk>, options: WalOptions) -> Result<(Wal, RecoveryReport), WalError> {
        if !options.sync {
            eprintln!(
                "WARNING: the WAL in {} runs with sync disabled (benchmarks only): acknowledged writes will be lost on power failure",
                dir.display()
            );
        }
        disk.create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let mut ids: Vec<u64> =
            disk.list(dir).map_err(io_error(format!("listing {}", dir.display())))?.iter().filter_map(|p| segment_id(p)).collect();
        ids.sort_unstable();
        let mut report = RecoveryReport::default();
        let mut groups: HashMap<u64, GroupLog> = HashMap::new();
        let mut segments = BTreeMap::new();
        for (position, &id) in ids.iter().enumerate() {
            let is_last = position + 1 == ids.len();
            let path = segment_path(dir, id);
            let mut file = disk.open(&path, false).map_err(io_error(format!("opening {}", path.display())))?;
            let bytes = read_all(file.as_ref(), &path)?;
            let header_ok = bytes.len() as u64 >= SEGMENT_HEADER_BYTES
                && &bytes[..8] == SEGMENT_MAGIC
                && bytes[8..16] == id.to_le_bytes();
            if !header_ok {
                if is_last && (bytes.len() as u64) < SEGMENT_HEADER_BYTES {
                    // Created, then the process died before its header was durable: nothing in it.
                    disk.remove(&path).map_err(io_error(format!("removing {}", path.display())))?;
                    report.torn_tail = Some((path, 0, bytes.len() as u64));
                    continue;
                }
                return Err(WalError::Corruption { path, offset: 0, reason: "bad segment header".to_string() });
            }
            let mut offset = SEGMENT_HEADER_BYTES as usize;
            while offset < bytes.len() {
                match decode(&bytes[offset..]) {
                    Ok(record) => {
                        apply_record(&mut groups, id, offset as u64, &record.op, record.group_id, record.len)
                            .map_err(|reason| WalError::Corruption { path: path.clone(), offset: offset as u64, reason })?;
                        offset += record.len;
                        report.records += 1;
                    }
                    Err(error) if is_last && is_torn_tail(&error, &bytes[offset..]) => {
                        let dropped = (bytes.len() - offset) as u64;
                        file.truncate(offset as u64).map_err(io_error(format!("truncating {}", path.display())))?;
                        file.sync_data().map_err(io_error(format!("syncing {}", path.display())))?;
                        report.torn_tail = Some((path.clone(), offset as u64, dropped));
                        break;
                    }
                    Err(error) => {
                        return Err(WalError::Corruption { path, offset: offset as u64, reason: error.to_string() });
                    }
                }
            }
            report.segments += 1;
            report.bytes += offset as u64;
            segments.insert(id, (path, offset as u64));
        }
        if let Some((group_id, missing)) = groups.iter().find_map(|(id, g)| g.first_missing().map(|m| (*id, m))) {
            let path = segments.values().next().map(|(p, _)| p.clone()).unwrap_or_else(|| dir.to_path_buf());
            return Err(WalError::Corruption {
                path,
                offset: 0,
                reason: format!("group {group_id} holds entry {missing} but the record with it is missing"),
            });
        }
        let active = match segments.iter().next_back() {
            Some((&id, (path, _))) => {
                let file = disk.open(path, false).map_err(io_error(format!("opening {}", path.display())))?;
                let len = file.len_bytes().map_err(io_error(format!("sizing {}", path.display())))?;
                ActiveSegment { id, file, len }
            }
            None => {
                let active = create_segment(disk.as_ref(), dir, 1)?;
                segments.insert(1, (segment_path(dir, 1), SEGMENT_HEADER_BYTES));
                active
            }
        };
        let state = WalState {
            dir: dir.to_path_buf(),
            disk: Arc::clone(&disk),
            segments,
            readers: Mutex::new(HashMap::new()),
            groups,
            cache: EntryCache::new(options.entry_cache_bytes_max),
        };
        let writer = SegmentWriter { dir: dir.to_path_buf(), disk, options, active, scratch: Vec::new() };
        Ok((Wal { state, writer }, report))
    }

    /// Writes every operation (in order, many groups at once) and makes them durable with one sync. Returns only
    /// once they are durable. An `Err` of kind `Io` means the disk failed: what was written may or may not be
    /// durable, and the node must stop (a failed fsync cannot be retried safely).
    pub fn write(&mut self, operations: &[(u64, LogOp)]) -> Result<(), WalError> {
        self.state.validate(operations.iter().map(|(group, op)| (*group, op)))?;
        if let Some(new_segment) = self.writer.rotate_if_full()? {
            self.state.add_segment(new_segment);
        }
        let prepared = self.writer.prepare(operations.iter().map(|(group, op)| (*group, op)));
        self.writer.append_and_sync(&prepared)?;
        self.state.apply(prepared);
        Ok(())
    }

    /// Deletes every segment below `horizon` (never the active one). Groups that still need any of them — for
    /// live entries (a laggard) or for their latest hard state or compaction point — are first rewritten into the
    /// active segment (entries only if they lie below the horizon, then a `Compact` stating where the log starts,
    /// then the hard state), in one durable write. So one lagging group costs a rewrite of its own live entries,
    /// never the whole WAL.
    pub fn purge(&mut self, horizon: u64) -> Result<PurgeReport, WalError> {
        let plan = self.state.purge_plan(horizon, self.writer.active_id())?;
        if !plan.rewrite.is_empty() {
            self.write(&plan.rewrite)?;
        }
        self.state.remove_segments(&plan.doomed)?;
        Ok(plan.report)
    }

    /// See [`WalState::suggest_horizon`].
    pub fn suggest_horizon(&self, bytes_max: u64) -> u64 {
        self.state.suggest_horizon(bytes_max, self.writer.active_id())
    }

    /// Splits the WAL into the shared state and the writer (for the group-commit thread).
    pub fn into_parts(self) -> (WalState, SegmentWriter) {
        (self.state, self.writer)
    }

    pub fn state(&self) -> &WalState {
        &self.state
    }

    pub fn group(&self, group_id: u64) -> Option<&GroupLog> {
        self.state.group(group_id)
    }

    pub fn group_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.state.groups.keys().copied()
    }

    pub fn hard_state(&self, group_id: u64) -> HardState {
        self.state.hard_state(group_id)
    }

    pub fn segment_ids(&self) -> Vec<u64> {
        self.state.segment_ids()
    }

    pub fn entries(&self, group_id: u64, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>, WalError> {
        self.state.entries(group_id, low, high, max_bytes)
    }
}

/// What a purge will do: the rewrite to write first, the segments to delete after.
pub struct PurgePlan {
    pub rewrite: Vec<(u64, LogOp)>,
    pub doomed: Vec<u64>,
    pub report: PurgeReport,
}

impl SegmentWriter {
    pub fn active_id(&self) -> u64 {
        self.active.id
    }

    /// Starts a new segment if the active one is full; returns the new segment's id.
    pub fn rotate_if_full(&mut self) -> Result<Option<u64>, WalError> {
        if self.active.len < self.options.segment_bytes_max {
            return Ok(None);
        }
        if self.options.sync {
            self.active.file.sync_data().map_err(io_error("syncing the segment being closed"))?;
        }
        let id = self.active.id + 1;
        self.active = create_segment(self.disk.as_ref(), &self.dir, id)?;
        Ok(Some(id))
    }

    /// Encodes `operations` as records placed after what the active segment holds.
    pub fn prepare<'a>(&mut self, operations: impl IntoIterator<Item = (u64, &'a LogOp)>) -> PreparedWrite {
        let mut buffer = std::mem::take(&mut self.scratch);
        buffer.clear();
        let mut placed = Vec::new();
        for (group_id, op) in operations {
            match op {
                LogOp::Append(entries) => {
                    for run in append_runs(entries, self.options.record_batch_bytes_max) {
                        let offset = self.active.len + buffer.len() as u64;
                        let len = encode_append(group_id, &entries[run.clone()], &mut buffer);
                        let change = IndexChange::Append(entries[run].to_vec());
                        placed.push(PlacedRecord { group_id, offset, len, change });
                    }
                }
                other => {
                    let offset = self.active.len + buffer.len() as u64;
                    let len = encode(group_id, other, &mut buffer);
                    placed.push(PlacedRecord { group_id, offset, len, change: IndexChange::Other(other.clone()) });
                }
            }
        }
        self.scratch = buffer;
        PreparedWrite { placed, segment_id: self.active.id }
    }

    /// Appends the prepared records and syncs once.
    pub fn append_and_sync(&mut self, prepared: &PreparedWrite) -> Result<(), WalError> {
        assert_eq!(prepared.segment_id, self.active.id, "prepared for another segment");
        self.active.file.append(&self.scratch).map_err(io_error("appending to the active segment"))?;
        self.active.len += self.scratch.len() as u64;
        // Keep the buffer for the next write, but do not hold on to an exceptional one.
        if self.scratch.capacity() > 4 * self.options.record_batch_bytes_max.max(1 << 20) * 8 {
            self.scratch = Vec::new();
        }
        if self.options.sync {
            self.active.file.sync_data().map_err(io_error("syncing the active segment"))?;
        }
        Ok(())
    }

    pub fn options(&self) -> &WalOptions {
        &self.options
    }
}

impl WalState {
    /// Rejects operations that replay could not apply, before anything is written.
    pub fn validate<'a>(&self, operations: impl IntoIterator<Item = (u64, &'a LogOp)>) -> Result<(), WalError> {
        let mut bounds: HashMap<u64, (u64, u64)> = HashMap::new();
        let mut touched = std::collections::HashSet::new();
        for (group_id, op) in operations {
            let untouched = touched.insert(group_id);
            let group_id = &group_id;
            let (first, last) = *bounds.entry(*group_id).or_insert_with(|| {
                self.groups.get(group_id).map_or((1, 0), |g| (g.first_index, g.last_index()))
            });
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
            rewrite.push((group_id, LogOp::Compact { first_kept_index: group.first_index, base_term: group.base_term }));
            rewrite.push((group_id, LogOp::HardState(group.hard_state)));
        }
        Ok(PurgePlan { rewrite, doomed, report })
    }

    /// Deletes segments (after the purge's rewrite is durable) and makes that durable.
    pub fn remove_segments(&mut self, doomed: &[u64]) -> Result<(), WalError> {
        if doomed.is_empty() {
            return Ok(());
        }
        for id in doomed {
            if let Some((path, _)) = self.segments.remove(id) {
                self.readers.lock().remove(id);
                self.disk.remove(&path).map_err(io_error(format!("removing {}", path.display())))?;
            }
        }
        self.disk.sync_dir(&self.dir).map_err(io_error("syncing the WAL directory after a purge"))
    }

    /// The horizon that frees every segment no group needs for live entries, and beyond that as many segments
    /// as it takes to bring the WAL under `bytes_max` (rewriting the laggards that pin them).
    pub fn suggest_horizon(&self, bytes_max: u64, active_id: u64) -> u64 {
        let needed_for_entries = self.groups.values().filter_map(GroupLog::oldest_entry_segment).min().unwrap_or(active_id);
        let mut horizon = needed_for_entries.min(active_id);
        let mut total: u64 = self.segments.range(horizon..).map(|(_, (_, len))| len).sum();
        for (&id, (_, len)) in self.segments.range(horizon..) {
            if total <= bytes_max || id >= active_id {
                break;
            }
            total -= len;
            horizon = id + 1;
        }
        horizon
    }

    /// The largest number of WAL bytes any one group keeps from being purged, and that group.
    pub fn max_pinned_bytes(&self) -> (u64, u64) {
        self.groups.keys().map(|&g| (self.pinned_bytes(g), g)).max().unwrap_or((0, 0))
    }

    pub fn add_segment(&mut self, id: u64) {
        self.segments.insert(id, (segment_path(&self.dir, id), SEGMENT_HEADER_BYTES));
    }

    /// Bytes of WAL that `group_id` keeps from being purged: every segment from the oldest it needs on.
    pub fn pinned_bytes(&self, group_id: u64) -> u64 {
        let Some(oldest) = self.groups.get(&group_id).and_then(GroupLog::pinned_segment) else { return 0 };
        self.segments.range(oldest..).map(|(_, (_, len))| len).sum()
    }

    pub fn entry_cache_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    pub fn total_bytes(&self) -> u64 {
        self.segments.values().map(|(_, len)| len).sum()
    }

    /// Updates the index with a write that is now durable.
    pub fn apply(&mut self, prepared: PreparedWrite) {
        let segment_id = prepared.segment_id;
        if let (Some(last), Some((_, len))) = (prepared.placed.last(), self.segments.get_mut(&segment_id)) {
            *len = (*len).max(last.offset + last.len as u64);
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
                IndexChange::Append(entries) => self.cache.append(record.group_id, &entries),
                IndexChange::Other(LogOp::Truncate { from_index }) => self.cache.truncate_from(record.group_id, from_index),
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
        reader.read_exact_at(location.record_offset, &mut bytes).map_err(io_error(format!("reading {}", path.display())))?;
        drop(readers);
        match decode(&bytes) {
            Ok(record) => match record.op {
                LogOp::Append(entries) => Ok(entries),
                _ => Err(WalError::Corruption { path, offset: location.record_offset, reason: "not an append record".into() }),
            },
            Err(error) => Err(WalError::Corruption { path, offset: location.record_offset, reason: error.to_string() }),
        }
    }
}

fn create_segment(disk: &dyn Disk, dir: &Path, id: u64) -> Result<ActiveSegment, WalError> {
    let path = segment_path(dir, id);
    let mut file = disk.open(&path, true).map_err(io_error(format!("creating {}", path.display())))?;
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    header.extend_from_slice(SEGMENT_MAGIC);
    header.extend_from_slice(&id.to_le_bytes());
    file.append(&header).map_err(io_error(format!("writing the header of {}", path.display())))?;
    file.sync_data().map_err(io_error(format!("syncing {}", path.display())))?;
    disk.sync_dir(dir).map_err(io_error(format!("syncing directory {}", dir.display())))?;
    Ok(ActiveSegment { id, file, len: SEGMENT_HEADER_BYTES })
}

/// A decode failure at the end of the newest segment that can only be a write cut short: the record is
/// incomplete, or its declared extent reaches the end of the file (garbage in the last, torn sector).
fn is_torn_tail(error: &DecodeError, rest: &[u8]) -> bool {
    match error {
        DecodeError::Incomplete => true,
        DecodeError::BadChecksum | DecodeError::BadLength(_) | DecodeError::UnknownKind(_) => {
            let declared = u32::from_le_bytes(rest[0..4].try_into().expect("header present")) as usize;
            RECORD_HEADER_BYTES + declared >= rest.len()
        }
        DecodeError::BadPayload(_) => false,
    }
}

/// Replays one record found during recovery.
fn apply_record(
    groups: &mut HashMap<u64, GroupLog>,
    segment_id: u64,
    offset: u64,
    op: &LogOp,
    group_id: u64,
    record_len: usize,
) -> Result<(), String> {
    let group = groups.entry(group_id).or_default();
    let locations = match op {
        LogOp::Append(entries) => entries
            .iter()
            .enumerate()
            .map(|(position, entry)| EntryLocation {
                term: entry.term,
                segment_id,
                record_offset: offset,
                record_len: record_len as u32,
                position: position as u32,
            })
            .collect(),
        _ => Vec::new(),
    };
    group.apply(op, segment_id, locations.into_iter(), true).map_err(|e| format!("group {group_id}: {e}"))
}

/// Cuts the WAL at `offset` of segment `segment_id` and deletes every later segment: the documented repair for
/// a corruption report. Everything after the cut is lost; run it only when the replicas of the affected groups on
/// other nodes can restore what is lost.
pub fn repair_truncate(dir: &Path, disk: &dyn Disk, segment_id: u64, offset: u64) -> Result<(), WalError> {
    let path = segment_path(dir, segment_id);
    let mut file = disk.open(&path, false).map_err(io_error(format!("opening {}", path.display())))?;
    file.truncate(offset.max(SEGMENT_HEADER_BYTES)).map_err(io_error(format!("truncating {}", path.display())))?;
    file.sync_data().map_err(io_error(format!("syncing {}", path.display())))?;
    for later in disk.list(dir).map_err(io_error(format!("listing {}", dir.display())))? {
        if self::segment_id(&later).is_some_and(|id| id > segment_id) {
            disk.remove(&later).map_err(io_error(format!("removing {}", later.display())))?;
        }
    }
    disk.sync_dir(dir).map_err(io_error(format!("syncing directory {}", dir.display())))
}
