//! The node's shared write-ahead log: every group replica's entries and hard state in one sequence of segment
//! files, so that one write and one `fdatasync` can make many groups' Readies durable at once.
//!
//! - `record.rs`: the record format and codec; `docs/wal-format.md` has the bytes.
//! - `group_log.rs`: one group's log as the WAL knows it (entry locations, hard state, compaction point).
//! - `state.rs`: [`WalState`], what readers share (segment list, index, entry cache) and purge planning.
//! - `segment_writer.rs`: [`SegmentWriter`], the active segment, encoding and rotation.
//! - `entry_cache.rs`: recent entries under a byte budget.
//! - `group_commit.rs`: the writer thread (one fdatasync for many groups) and purging through it.
//! - this file: options, errors, reports, [`Wal`] (state and writer together, for one writer) and recovery.
//!
//! Recovery replays every segment frame by frame and verifies every checksum; a frame's records count only once
//! the whole frame verifies. Every segment but the newest must end with a seal. In the newest, the log ends at the
//! first frame that does not verify: that is a torn write (the process died before the write was synced; reported
//! in the [`RecoveryReport`] and overwritten by the next write) or the stale bytes of a recycled file — unless a
//! valid frame follows at a later aligned offset, which means acknowledged data lies beyond the damage:
//! corruption. Corruption makes [`Wal::open`] fail with [`WalError::Corruption`] naming the file and offset, and
//! `repair_truncate` (the `flotilla wal-repair` command) can cut there.

pub mod entry_cache;
pub mod group_commit;
pub mod group_log;
pub mod record;
pub mod segment_writer;
pub mod state;

pub use segment_writer::{PreparedWrite, SegmentWriter};
pub use state::{PurgePlan, WalState};
use state::Segment;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_raft::{Entry, HardState};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use crate::disk::{Disk, DiskFile};
use entry_cache::EntryCache;
use group_log::{EntryLocation, GroupLog};
use record::{decode, frame_at, segment_salt, Body, LogOp, Record, FRAME_BYTES};
use segment_writer::{open_next_segment, ActiveSegment, BATCH_ALIGN_BYTES};

/// First bytes of every segment: magic and format version, the segment id (u64 LE), the id the file had before
/// it was recycled (u64 LE, 0 for a new file), the random nonce of its records' salt (u64 LE), the length the file
/// was given when the segment started (u64 LE), zeros up to [`SEGMENT_HEADER_BYTES`].
pub const SEGMENT_MAGIC: &[u8; 8] = b"FLOTWAL3";
pub const SEGMENT_HEADER_BYTES: u64 = 4096;

/// WAL settings.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// A new segment is started once the active one reaches this size. Default 256 MiB: starting a segment costs
    /// a seal, a rename or file creation, two fsyncs and a directory fsync, so fewer is cheaper (docs/benchmarks.md).
    /// The price: the active segment cannot be purged, so up to this much WAL stays on disk whatever the purge
    /// budget (plus the recycle pool, `recycled_segments_max` segments).
    pub segment_bytes_max: u64,
    /// Appends are split into records of at most about this many bytes. Default 4 MiB.
    pub record_batch_bytes_max: usize,
    /// **Benchmarks only.** With `false`, writes are never synced: acknowledged writes are lost on power failure
    /// or kernel crash. Opening a WAL this way prints a warning. Default `true`.
    pub sync: bool,
    /// Recent entries of all groups kept in memory for reads (0 disables the cache). Default 64 MiB.
    pub entry_cache_bytes_max: u64,
    /// Purged segment files kept for reuse instead of deleted: writing over a file's allocated blocks is much
    /// faster than appending to a new one (docs/benchmarks.md). Costs up to this many segments of disk space.
    /// Default 2.
    pub recycled_segments_max: usize,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions {
            segment_bytes_max: 256 << 20,
            record_batch_bytes_max: 4 << 20,
            sync: true,
            entry_cache_bytes_max: 64 << 20,
            recycled_segments_max: 2,
        }
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

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> WalError {
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

/// Where a purged segment waits to be reused.
pub fn recycle_path(dir: &Path, previous_id: u64) -> PathBuf {
    dir.join(format!("recycle-{previous_id:020}.wal"))
}

/// The previous segment id of a file in the recycle pool.
pub(crate) fn recycle_id(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    segment_id(Path::new(name.strip_prefix("recycle-")?))
}

/// What one segment's replay found.
struct SegmentScan {
    /// Where its valid frames end: the next write goes here (for the newest segment).
    end: u64,
    sealed: bool,
    /// The first damage seen (offset, reason), if any.
    damage: Option<(u64, String)>,
}

/// Replays one segment's frames into `groups` (a frame's records only once the whole frame verifies).
fn scan_segment(bytes: &[u8], id: u64, salt: u32, groups: &mut FxHashMap<u64, GroupLog>, report: &mut RecoveryReport) -> Result<SegmentScan, String> {
    let mut offset = SEGMENT_HEADER_BYTES as usize;
    let mut records: Vec<(usize, Record)> = Vec::new();
    while offset < bytes.len() {
        let Some((batch_bytes, records_bytes)) = frame_at(&bytes[offset..], salt) else {
            return Ok(SegmentScan { end: offset as u64, sealed: false, damage: Some((offset as u64, "no valid frame".into())) });
        };
        let (batch, records_end) = (batch_bytes as usize, FRAME_BYTES + records_bytes as usize);
        if batch % BATCH_ALIGN_BYTES as usize != 0 || records_end > batch || offset + batch > bytes.len() {
            return Ok(SegmentScan { end: offset as u64, sealed: false, damage: Some((offset as u64, "frame cut short or malformed".into())) });
        }
        records.clear();
        let mut at = offset + FRAME_BYTES;
        while at < offset + records_end {
            match decode(&bytes[at..offset + records_end], salt) {
                Ok(record) => {
                    let len = record.len;
                    records.push((at, record));
                    at += len;
                }
                Err(error) => {
                    let reason = format!("{error} in the record at offset {at} of the frame starting here");
                    return Ok(SegmentScan { end: offset as u64, sealed: false, damage: Some((offset as u64, reason)) });
                }
            }
        }
        let mut sealed = false;
        for (at, record) in records.drain(..) {
            match record.body {
                Body::Op(op) => apply_record(groups, id, at as u64, &op, record.group_id, record.len)
                    .map_err(|reason| format!("at offset {at}: {reason}"))?,
                Body::Seal => sealed = true,
                Body::Frame { .. } => return Err(format!("at offset {at}: a frame inside a frame")),
            }
            report.records += 1;
        }
        offset += batch;
        if sealed {
            return Ok(SegmentScan { end: offset as u64, sealed: true, damage: None });
        }
    }
    Ok(SegmentScan { end: offset as u64, sealed: false, damage: None })
}

/// The first aligned offset after `from` holding a valid frame of this segment: acknowledged data beyond damage.
fn later_frame(bytes: &[u8], salt: u32, from: u64) -> Option<u64> {
    let start = (from / BATCH_ALIGN_BYTES + 1) * BATCH_ALIGN_BYTES;
    (start..bytes.len() as u64).step_by(BATCH_ALIGN_BYTES as usize).find(|&at| frame_at(&bytes[at as usize..], salt).is_some())
}

/// A segment's header, as recovery reads it.
struct SegmentHeader {
    /// The checksum seed of the segment's own records.
    salt: u32,
    /// The length the file was given when the segment started.
    preallocated_bytes: u64,
}

impl SegmentHeader {
    /// The header of segment `id` at the start of `bytes`, if it is this segment's.
    fn parse(bytes: &[u8], id: u64) -> Option<SegmentHeader> {
        let field = |at: usize| bytes.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        if (bytes.len() as u64) < SEGMENT_HEADER_BYTES || &bytes[..8] != SEGMENT_MAGIC || field(8)? != id {
            return None;
        }
        Some(SegmentHeader { salt: segment_salt(id, field(24)?), preallocated_bytes: field(32)? })
    }
}

/// Segment `id` is sealed but `id + 1` is missing: a seal is written only once the successor is durable.
fn missing_successor(dir: &Path, id: u64, scan: &SegmentScan) -> WalError {
    WalError::Corruption {
        path: segment_path(dir, id),
        // The seal's frame: cutting there makes this segment the newest again.
        offset: scan.end.saturating_sub(BATCH_ALIGN_BYTES),
        reason: format!(
            "segment {} is missing: this segment is sealed, which happens only once its successor exists, so the WAL lost \
             it and the acknowledged writes it held",
            id + 1
        ),
    }
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
        let ids: Vec<u64> = {
            let mut ids: Vec<u64> = disk.list(dir).map_err(io_error(format!("listing {}", dir.display())))?.iter().filter_map(|p| segment_id(p)).collect();
            ids.sort_unstable();
            ids
        };
        let mut report = RecoveryReport::default();
        let mut groups: FxHashMap<u64, GroupLog> = FxHashMap::default();
        let mut segments = BTreeMap::new();
        // A newest segment without a frame of its own may be a rotation or creation the crash cut short (its
        // predecessor, if any, not yet sealed): see `recover_newest`.
        let newest_empty = match ids.last() {
            Some(&id) => {
                let path = segment_path(dir, id);
                let bytes = read_all(disk.open(&path, false).map_err(io_error(format!("opening {}", path.display())))?.as_ref(), &path)?;
                SegmentHeader::parse(&bytes, id).is_none_or(|header| later_frame(&bytes, header.salt, 0).is_none())
            }
            None => false,
        };
        let mut previous: Option<(u64, SegmentScan)> = None;
        for (position, &id) in ids.iter().enumerate() {
            let is_last = position + 1 == ids.len();
            // The one before the newest may end unsealed (even torn) if the newest is an interrupted rotation.
            let may_end_unsealed = is_last || (position + 2 == ids.len() && newest_empty);
            if let Some((previous_id, scan)) = &previous {
                if *previous_id + 1 != id {
                    return Err(missing_successor(dir, *previous_id, scan));
                }
                if !scan.sealed {
                    // Only the newest may follow an unsealed segment, and only as an interrupted rotation.
                    if !(is_last && newest_empty) {
                        let path = segment_path(dir, *previous_id);
                        return Err(WalError::Corruption { path, offset: scan.end, reason: "a segment that is not the newest ends without a seal".into() });
                    }
                    let path = segment_path(dir, id);
                    disk.remove(&path).map_err(io_error(format!("removing {}", path.display())))?;
                    disk.sync_dir(dir).map_err(io_error(format!("syncing directory {}", dir.display())))?;
                    break;
                }
            }
            let path = segment_path(dir, id);
            let file = disk.open(&path, false).map_err(io_error(format!("opening {}", path.display())))?;
            let bytes = read_all(file.as_ref(), &path)?;
            let Some(header) = SegmentHeader::parse(&bytes, id) else {
                // A newest segment whose header is not (yet) its own, without a sealed predecessor, is a creation
                // the crash cut short: nothing was written into it. It goes. Anything else is damage.
                // (A predecessor is sealed here: an unsealed one ended the loop above.)
                if is_last && newest_empty && previous.is_none() {
                    disk.remove(&path).map_err(io_error(format!("removing {}", path.display())))?;
                    disk.sync_dir(dir).map_err(io_error(format!("syncing directory {}", dir.display())))?;
                    break;
                }
                return Err(WalError::Corruption { path, offset: 0, reason: "bad segment header".to_string() });
            };
            if is_last && newest_empty && previous.is_none() && (bytes.len() as u64) < header.preallocated_bytes {
                // The only segment, started but not yet sized when the crash came, and empty: it goes too.
                disk.remove(&path).map_err(io_error(format!("removing {}", path.display())))?;
                disk.sync_dir(dir).map_err(io_error(format!("syncing directory {}", dir.display())))?;
                break;
            }
            let scan = scan_segment(&bytes, id, header.salt, &mut groups, &mut report)
                .map_err(|reason| WalError::Corruption { path: path.clone(), offset: 0, reason })?;
            if let Some((damage_at, reason)) = &scan.damage {
                let later = later_frame(&bytes, header.salt, scan.end);
                if !may_end_unsealed || later.is_some() {
                    let reason = match later {
                        Some(at) => format!("{reason}, yet a valid frame follows at offset {at}"),
                        None => format!("{reason} in a segment that is not the newest (it must end with a seal)"),
                    };
                    return Err(WalError::Corruption { path, offset: *damage_at, reason });
                }
                // The log ends here. A frame of its own that does not verify whole is a torn write (reported);
                // otherwise what follows was never written: zeros where the file was sized, or the stale bytes of a
                // recycled file's earlier life.
                if let Some((batch_bytes, _)) = frame_at(&bytes[scan.end as usize..], header.salt) {
                    let dropped = batch_bytes.min(bytes.len() as u64 - scan.end);
                    report.torn_tail = Some((path.clone(), scan.end, dropped));
                }
            }
            if (bytes.len() as u64) < header.preallocated_bytes {
                // Every segment keeps at least the length it started with: it was cut, and acknowledged writes
                // may have been in what is gone.
                return Err(WalError::Corruption {
                    path,
                    offset: scan.end,
                    reason: format!(
                        "the file is {} bytes, shorter than the {} it had from its start: it was cut, and acknowledged \
                         writes after offset {} may be lost",
                        bytes.len(),
                        header.preallocated_bytes,
                        scan.end
                    ),
                });
            }
            report.segments += 1;
            report.bytes += scan.end;
            segments.insert(id, Segment { path, len: scan.end, salt: header.salt });
            previous = Some((id, scan));
        }
        if let Some((id, scan)) = &previous {
            if scan.sealed {
                // A segment is sealed only once its successor is durable: the successor is lost.
                return Err(missing_successor(dir, *id, scan));
            }
        }
        if let Some((group_id, missing)) = groups.iter().find_map(|(id, g)| g.first_missing().map(|m| (*id, m))) {
            let path = segments.values().next().map(|segment| segment.path.clone()).unwrap_or_else(|| dir.to_path_buf());
            return Err(WalError::Corruption {
                path,
                offset: 0,
                reason: format!("group {group_id} holds entry {missing} but the record with it is missing"),
            });
        }
        let active = match segments.iter().next_back() {
            Some((&id, segment)) => {
                let file = disk.open(&segment.path, false).map_err(io_error(format!("opening {}", segment.path.display())))?;
                ActiveSegment { id, salt: segment.salt, file, len: segment.len }
            }
            None => {
                // A new WAL (or one whose only segment was a creation cut short): the next id starts it.
                let id = ids.last().map_or(1, |id| id + 1);
                let active = open_next_segment(disk.as_ref(), dir, id, options.segment_bytes_max)?;
                segments.insert(id, Segment { path: segment_path(dir, id), len: SEGMENT_HEADER_BYTES, salt: active.salt });
                active
            }
        };
        if let Some((path, offset, dropped)) = &report.torn_tail {
            eprintln!(
                "WAL recovery: the write at the tail of {} (offset {offset}, {dropped} bytes) did not verify and was dropped: a \
                 write the crash cut short, never acknowledged — unless the medium damaged the last acknowledged write, \
                 which cannot be told apart (docs/wal-format.md)",
                path.display()
            );
        }
        let state = WalState {
            dir: dir.to_path_buf(),
            disk: Arc::clone(&disk),
            segments,
            readers: Mutex::new(HashMap::new()),
            groups,
            cache: EntryCache::new(options.entry_cache_bytes_max),
            recycled_segments_max: options.recycled_segments_max,
        };
        let writer = SegmentWriter { dir: dir.to_path_buf(), disk, options, active, scratch: Vec::new(), placed_last: 0 };
        Ok((Wal { state, writer }, report))
    }

    /// Writes every operation (in order, many groups at once) and makes them durable with one sync. Returns only
    /// once they are durable. An `Err` of kind `Io` means the disk failed: what was written may or may not be
    /// durable, and the node must stop (a failed fsync cannot be retried safely).
    pub fn write(&mut self, operations: &[(u64, LogOp)]) -> Result<(), WalError> {
        if operations.is_empty() {
            return Ok(()); // every earlier write returned durable
        }
        self.state.validate(operations.iter().map(|(group, op)| (*group, op)))?;
        if let Some((new_segment, salt)) = self.writer.rotate_if_full()? {
            self.state.add_segment(new_segment, salt);
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

/// Replays one record found during recovery.
fn apply_record(
    groups: &mut FxHashMap<u64, GroupLog>,
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
    let mut header = vec![0; SEGMENT_HEADER_BYTES as usize];
    file.read_exact_at(0, &mut header).map_err(io_error(format!("reading the header of {}", path.display())))?;
    file.truncate(offset.max(SEGMENT_HEADER_BYTES)).map_err(io_error(format!("truncating {}", path.display())))?;
    // Back to the length it started with (zeros after the cut), which recovery checks it still has.
    if let Some(header) = SegmentHeader::parse(&header, segment_id) {
        if header.preallocated_bytes > offset {
            file.truncate(header.preallocated_bytes).map_err(io_error(format!("sizing {}", path.display())))?;
        }
    }
    file.sync_data().map_err(io_error(format!("syncing {}", path.display())))?;
    for later in disk.list(dir).map_err(io_error(format!("listing {}", dir.display())))? {
        if self::segment_id(&later).is_some_and(|id| id > segment_id) {
            disk.remove(&later).map_err(io_error(format!("removing {}", later.display())))?;
        }
    }
    disk.sync_dir(dir).map_err(io_error(format!("syncing directory {}", dir.display())))
}
