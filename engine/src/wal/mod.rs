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
mod recovery;
pub mod segment_writer;
pub mod state;

pub use segment_writer::{PreparedWrite, SegmentWriter};
pub use state::{PurgePlan, WalState};

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_raft::{Entry, HardState};
use parking_lot::Mutex;

use crate::disk::Disk;
use entry_cache::EntryCache;
use group_log::GroupLog;
use record::LogOp;
use recovery::Recovered;

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
    /// In a segment whose file is new (not recycled), a write that reaches past the zeros written so far also
    /// writes zeros this far beyond its own end, in the same sync. The file system then allocates the blocks once
    /// per this many bytes; every other sync overwrites blocks already written, which needs no journal commit (on
    /// this VM's ext4 such a sync costs a third less CPU and latency; docs/benchmarks.md). 0 disables it.
    /// Default 1 MiB.
    pub zero_ahead_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions {
            segment_bytes_max: 256 << 20,
            record_batch_bytes_max: 4 << 20,
            sync: true,
            entry_cache_bytes_max: 64 << 20,
            recycled_segments_max: 2,
            zero_ahead_bytes: 1 << 20,
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

impl Wal {
    /// Opens (recovering) or creates the WAL in `dir` (see `recovery.rs`).
    pub fn open(dir: &Path, disk: Arc<dyn Disk>, options: WalOptions) -> Result<(Wal, RecoveryReport), WalError> {
        if !options.sync {
            eprintln!(
                "WARNING: the WAL in {} runs with sync disabled (benchmarks only): acknowledged writes will be lost on power failure",
                dir.display()
            );
        }
        let Recovered { segments, groups, active, report } = recovery::recover(dir, disk.as_ref(), &options)?;
        let state = WalState {
            dir: dir.to_path_buf(),
            disk: Arc::clone(&disk),
            segments,
            readers: Mutex::new(HashMap::new()),
            groups,
            cache: EntryCache::new(options.entry_cache_bytes_max),
            recycled_segments_max: options.recycled_segments_max,
        };
        let writer =
            SegmentWriter { dir: dir.to_path_buf(), disk, options, active, scratch: Vec::new(), placed_last: 0 };
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
    if let Some(preallocated) = recovery::preallocated_bytes(&header, segment_id) {
        if preallocated > offset {
            file.truncate(preallocated).map_err(io_error(format!("sizing {}", path.display())))?;
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
