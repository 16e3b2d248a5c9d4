//! [`SegmentWriter`]: the part of the WAL that writes — the active segment, the encode buffer, rotation — owned by
//! one writer (the caller of `Wal::write`, or the group-commit thread).
//!
//! Every write is one **frame**: a `Frame` record at an offset aligned to [`BATCH_ALIGN_BYTES`], the records, and
//! zeros up to the next aligned offset. Aligned, whole-page writes never make the kernel read a page before
//! writing it — which matters once segment files are **recycled**: purge renames unneeded segments into a small
//! pool (`recycle-*.wal`) and rotation reuses one, overwriting blocks already allocated, which on ext4 is 2–4×
//! faster than appending (docs/benchmarks.md). A full segment ends with a frame holding a `Seal`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_raft::Entry;

use super::record::{append_runs, encode, encode_append, encode_frame, encode_seal, segment_salt, LogOp, FRAME_BYTES};
use super::{io_error, recycle_id, segment_path, WalError, WalOptions, SEGMENT_HEADER_BYTES, SEGMENT_MAGIC};

/// Writes start at multiples of this (and are zero-filled up to one).
pub const BATCH_ALIGN_BYTES: u64 = 4096;
use crate::disk::{Disk, DiskFile};

pub(super) struct ActiveSegment {
    pub(super) id: u64,
    /// The checksum seed of its records (see `record::segment_salt`).
    pub(super) salt: u32,
    pub(super) file: Box<dyn DiskFile>,
    pub(super) len: u64,
    /// Every byte of the file below this offset has been written, in this segment or in the file's earlier life:
    /// writing there allocates nothing (see `WalOptions::zero_ahead_bytes`).
    pub(super) blocks_written_until: u64,
    /// The file's length when the segment started: zeros are written ahead up to here at most (beyond it the
    /// file only grows by a frame's own bytes, and the segment is full).
    pub(super) zero_fill_end: u64,
}

/// Zeros written ahead of the frames, a slice of this at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The part of the WAL that writes: the active segment. Owned by one writer (the caller of [`Wal::write`](super::Wal::write), or
/// the group-commit thread).
pub struct SegmentWriter {
    pub(super) dir: PathBuf,
    pub(super) disk: Arc<dyn Disk>,
    pub(super) options: WalOptions,
    pub(super) active: ActiveSegment,
    /// The encode buffer, reused across writes (a fresh multi-megabyte buffer per write costs page faults).
    pub(super) scratch: Vec<u8>,
    /// Records placed by the previous write: the next one's list starts with room for as many (the operations
    /// arrive as an iterator that cannot tell its length, and a batch may hold thousands).
    pub(super) placed_last: usize,
}

/// Records encoded for one write (in the writer's scratch buffer), with where each will land.
pub struct PreparedWrite {
    pub(super) placed: Vec<PlacedRecord>,
    pub(super) segment_id: u64,
    /// Where the frame ends in the segment.
    pub(super) end: u64,
}

/// One encoded record and what it does to its group's index.
pub(super) struct PlacedRecord {
    pub(super) group_id: u64,
    pub(super) offset: u64,
    pub(super) len: usize,
    pub(super) change: IndexChange,
}

/// What a record changes in the index (and the entry cache).
pub(super) enum IndexChange {
    Append(Vec<Entry>),
    Other(LogOp),
}

impl SegmentWriter {
    pub fn active_id(&self) -> u64 {
        self.active.id
    }

    /// Starts a new segment if the active one is full (sealing it first); returns the new segment's id and salt.
    pub fn rotate_if_full(&mut self) -> Result<Option<(u64, u32)>, WalError> {
        // A segment takes at least one frame, however small the configured size.
        if self.active.len < self.options.segment_bytes_max || self.active.len == SEGMENT_HEADER_BYTES {
            return Ok(None);
        }
        // The successor first, durably: a sealed segment then always has one, so a sealed newest segment is a
        // lost one (recovery reports it), and a crash before the seal leaves a successor without frames, which
        // recovery removes.
        let id = self.active.id + 1;
        let next = open_next_segment(self.disk.as_ref(), &self.dir, id, self.options.segment_bytes_max)?;
        let salt = self.active.salt;
        let mut seal = vec![0; FRAME_BYTES];
        encode_seal(salt, &mut seal);
        let records_bytes = (seal.len() - FRAME_BYTES) as u64;
        seal.resize(BATCH_ALIGN_BYTES as usize, 0);
        encode_frame(salt, BATCH_ALIGN_BYTES, records_bytes, &mut seal);
        self.active.file.write_at(self.active.len, &seal).map_err(io_error("sealing the full segment"))?;
        if self.options.sync {
            self.active.file.sync_data().map_err(io_error("syncing the segment being closed"))?;
        }
        self.active = next;
        Ok(Some((id, self.active.salt)))
    }

    /// Encodes `operations` as one frame placed after what the active segment holds.
    pub fn prepare<'a>(&mut self, operations: impl IntoIterator<Item = (u64, &'a LogOp)>) -> PreparedWrite {
        let salt = self.active.salt;
        let mut buffer = std::mem::take(&mut self.scratch);
        buffer.clear();
        buffer.resize(FRAME_BYTES, 0);
        let operations = operations.into_iter();
        let mut placed = Vec::with_capacity(operations.size_hint().0.max(self.placed_last));
        for (group_id, op) in operations {
            match op {
                LogOp::Append(entries) => {
                    for run in append_runs(entries, self.options.record_batch_bytes_max) {
                        let offset = self.active.len + buffer.len() as u64;
                        let len = encode_append(salt, group_id, &entries[run.clone()], &mut buffer);
                        let change = IndexChange::Append(entries[run].to_vec());
                        placed.push(PlacedRecord { group_id, offset, len, change });
                    }
                }
                other => {
                    let offset = self.active.len + buffer.len() as u64;
                    let len = encode(salt, group_id, other, &mut buffer);
                    placed.push(PlacedRecord { group_id, offset, len, change: IndexChange::Other(other.clone()) });
                }
            }
        }
        let records_bytes = (buffer.len() - FRAME_BYTES) as u64;
        let batch_bytes = (buffer.len() as u64).div_ceil(BATCH_ALIGN_BYTES) * BATCH_ALIGN_BYTES;
        buffer.resize(batch_bytes as usize, 0);
        encode_frame(salt, batch_bytes, records_bytes, &mut buffer);
        self.scratch = buffer;
        self.placed_last = placed.len();
        PreparedWrite { placed, segment_id: self.active.id, end: self.active.len + batch_bytes }
    }

    /// Writes the prepared frame (and zeros ahead of it, see `WalOptions::zero_ahead_bytes`) and syncs once.
    pub fn append_and_sync(&mut self, prepared: &PreparedWrite) -> Result<(), WalError> {
        assert_eq!(prepared.segment_id, self.active.id, "prepared for another segment");
        debug_assert_eq!(self.active.len % BATCH_ALIGN_BYTES, 0, "frames start aligned");
        let end = self.active.len + self.scratch.len() as u64;
        if end > self.active.blocks_written_until {
            // Zeros first: a write torn by a crash then cuts the frame, as without them.
            let zeros_end = (end + self.options.zero_ahead_bytes).min(self.active.zero_fill_end);
            self.write_zeros(end, zeros_end)?;
            self.active.blocks_written_until = zeros_end.max(end);
        }
        self.active.file.write_at(self.active.len, &self.scratch).map_err(io_error("writing to the active segment"))?;
        self.active.len = end;
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

    /// Writes zeros over `from..to` of the active segment (nothing if empty).
    fn write_zeros(&mut self, from: u64, to: u64) -> Result<(), WalError> {
        let mut at = from;
        while at < to {
            let len = (to - at).min(ZEROS.len() as u64);
            self.active
                .file
                .write_at(at, &ZEROS[..len as usize])
                .map_err(io_error("writing zeros ahead in the active segment"))?;
            at += len;
        }
        metrics::counter!("flotilla_wal_zeroed_bytes_total").increment(to.saturating_sub(from));
        Ok(())
    }
}

/// The header of segment `id`: magic, id, the id the file had before it was recycled (0: a new file), the salt's
/// nonce, the length the file was given when the segment started (it is never shorter after that), zeros.
fn segment_header(id: u64, previous_id: u64, nonce: u64, preallocated_bytes: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    header.extend_from_slice(SEGMENT_MAGIC);
    header.extend_from_slice(&id.to_le_bytes());
    header.extend_from_slice(&previous_id.to_le_bytes());
    header.extend_from_slice(&nonce.to_le_bytes());
    header.extend_from_slice(&preallocated_bytes.to_le_bytes());
    header.resize(SEGMENT_HEADER_BYTES as usize, 0);
    header
}

/// A random nonce for a new segment's salt (from the standard library's randomly seeded hasher: no clock, no
/// extra dependency).
fn fresh_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// Starts segment `id` in a recycled file if the pool has one, else in a new file, given at least
/// `preallocated_bytes` (sparse where new), all durable before it returns.
pub(super) fn open_next_segment(
    disk: &dyn Disk,
    dir: &Path,
    id: u64,
    preallocated_bytes: u64,
) -> Result<ActiveSegment, WalError> {
    let listed = disk.list(dir).map_err(io_error(format!("listing {}", dir.display())))?;
    // Only a file whose every earlier life had a lower id may be reused: its stale bytes then carry other salts.
    let pool: Vec<(u64, PathBuf)> = listed.into_iter().filter_map(|p| recycle_id(&p).map(|r| (r, p))).collect();
    for (_, unusable) in pool.iter().filter(|(previous_id, _)| *previous_id >= id) {
        disk.remove(unusable).map_err(io_error(format!("removing {}", unusable.display())))?;
    }
    let path = segment_path(dir, id);
    let (file, previous_id) = match pool.into_iter().filter(|(previous_id, _)| *previous_id < id).min() {
        Some((previous_id, recycled)) => {
            disk.rename(&recycled, &path).map_err(io_error(format!(
                "recycling {} as {}",
                recycled.display(),
                path.display()
            )))?;
            metrics::counter!("flotilla_wal_segments_recycled_total").increment(1);
            (disk.open(&path, false).map_err(io_error(format!("opening {}", path.display())))?, previous_id)
        }
        None => (disk.open(&path, true).map_err(io_error(format!("creating {}", path.display())))?, 0),
    };
    start_segment(disk, dir, &path, file, id, previous_id, preallocated_bytes)
}

/// Writes segment `id`'s header into `file`, gives the file its length (never shortening a recycled one) and
/// makes both and its name durable.
fn start_segment(
    disk: &dyn Disk,
    dir: &Path,
    path: &Path,
    mut file: Box<dyn DiskFile>,
    id: u64,
    previous_id: u64,
    preallocated_bytes: u64,
) -> Result<ActiveSegment, WalError> {
    let len = file.len_bytes().map_err(io_error(format!("sizing {}", path.display())))?;
    let preallocated_bytes = preallocated_bytes.max(len).max(SEGMENT_HEADER_BYTES);
    let nonce = fresh_nonce();
    file.write_at(0, &segment_header(id, previous_id, nonce, preallocated_bytes))
        .map_err(io_error(format!("writing the header of {}", path.display())))?;
    if len < preallocated_bytes {
        file.truncate(preallocated_bytes).map_err(io_error(format!("sizing {}", path.display())))?;
    }
    file.sync_data().map_err(io_error(format!("syncing {}", path.display())))?;
    disk.sync_dir(dir).map_err(io_error(format!("syncing directory {}", dir.display())))?;
    Ok(ActiveSegment {
        id,
        salt: segment_salt(id, nonce),
        file,
        len: SEGMENT_HEADER_BYTES,
        // A recycled file was written up to its length in its earlier life (frames are contiguous up to its seal).
        blocks_written_until: len.max(SEGMENT_HEADER_BYTES),
        zero_fill_end: preallocated_bytes,
    })
}
