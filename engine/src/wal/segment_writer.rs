//! [`SegmentWriter`]: the part of the WAL that writes — the active segment, the encode buffer, rotation — owned by
//! one writer (the caller of `Wal::write`, or the group-commit thread).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_raft::Entry;

use super::record::{append_runs, encode, encode_append, LogOp};
use super::{io_error, segment_path, WalError, WalOptions, SEGMENT_HEADER_BYTES, SEGMENT_MAGIC};
use crate::disk::{Disk, DiskFile};

pub(super) struct ActiveSegment {
    pub(super) id: u64,
    pub(super) file: Box<dyn DiskFile>,
    pub(super) len: u64,
}

/// The part of the WAL that writes: the active segment. Owned by one writer (the caller of [`Wal::write`], or
/// the group-commit thread).
pub struct SegmentWriter {
    pub(super) dir: PathBuf,
    pub(super) disk: Arc<dyn Disk>,
    pub(super) options: WalOptions,
    pub(super) active: ActiveSegment,
    /// The encode buffer, reused across writes (a fresh multi-megabyte buffer per write costs page faults).
    pub(super) scratch: Vec<u8>,
}

/// Records encoded for one write (in the writer's scratch buffer), with where each will land.
pub struct PreparedWrite {
    pub(super) placed: Vec<PlacedRecord>,
    pub(super) segment_id: u64,
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

pub(super) fn create_segment(disk: &dyn Disk, dir: &Path, id: u64) -> Result<ActiveSegment, WalError> {
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

