//! Recovery: replaying the segments at open, telling a torn final write from damage and from a lost suffix.
//!
//! Segments are read frame by frame (a frame at a time in memory, never a whole file: a newly started segment is
//! sized to `segment_bytes_max` and mostly zeros), every checksum is verified, and a frame's records count only
//! once the whole frame verifies. The rules — consecutive ids, a seal on every segment but the newest, a
//! successor for every sealed one, no segment shorter than it started, no valid frame after damage — and what they
//! detect are in `docs/wal-format.md` ("Recovery").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rustc_hash::FxHashMap;

use super::group_log::{EntryLocation, GroupLog};
use super::record::{decode, frame_at, segment_salt, Body, LogOp, Record, FRAME_BYTES};
use super::segment_writer::{open_next_segment, ActiveSegment, BATCH_ALIGN_BYTES};
use super::state::Segment;
use super::{
    io_error, segment_id, segment_path, RecoveryReport, WalError, WalOptions, SEGMENT_HEADER_BYTES, SEGMENT_MAGIC,
};
use crate::disk::{Disk, DiskFile};

/// What recovery rebuilt: the segments, every group's log, where the next write goes.
pub(super) struct Recovered {
    pub(super) segments: BTreeMap<u64, Segment>,
    pub(super) groups: FxHashMap<u64, GroupLog>,
    pub(super) active: ActiveSegment,
    pub(super) report: RecoveryReport,
}

/// Bytes read at a time when probing a segment's rest for frames.
const PROBE_CHUNK_BYTES: u64 = 1 << 20;

/// One segment file being read.
struct SegmentFile {
    path: PathBuf,
    file: Box<dyn DiskFile>,
    len: u64,
}

impl SegmentFile {
    fn open(disk: &dyn Disk, path: PathBuf) -> Result<SegmentFile, WalError> {
        let file = disk.open(&path, false).map_err(io_error(format!("opening {}", path.display())))?;
        let len = file.len_bytes().map_err(io_error(format!("sizing {}", path.display())))?;
        Ok(SegmentFile { path, file, len })
    }

    /// Up to `len` bytes at `offset` (fewer at the end of the file).
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, WalError> {
        let len = len.min(self.len.saturating_sub(offset));
        let mut bytes = vec![0; len as usize];
        self.file.read_exact_at(offset, &mut bytes).map_err(io_error(format!("reading {}", self.path.display())))?;
        Ok(bytes)
    }

    /// The `(batch_bytes, records_bytes)` of a valid frame of this segment at `offset`.
    fn frame_at(&self, offset: u64, salt: u32) -> Result<Option<(u64, u64)>, WalError> {
        Ok(frame_at(&self.read(offset, FRAME_BYTES as u64)?, salt))
    }

    /// The first aligned offset after `from` holding a valid frame of this segment: acknowledged data beyond
    /// damage. Reads the rest of the file a chunk at a time.
    fn later_frame(&self, salt: u32, from: u64) -> Result<Option<u64>, WalError> {
        let mut chunk_start = (from / BATCH_ALIGN_BYTES + 1) * BATCH_ALIGN_BYTES;
        while chunk_start < self.len {
            let chunk = self.read(chunk_start, PROBE_CHUNK_BYTES)?;
            let found =
                (0..chunk.len()).step_by(BATCH_ALIGN_BYTES as usize).find(|&at| frame_at(&chunk[at..], salt).is_some());
            if let Some(at) = found {
                return Ok(Some(chunk_start + at as u64));
            }
            chunk_start += PROBE_CHUNK_BYTES;
        }
        Ok(None)
    }

    /// Whether this (newest) segment holds no frame of its own at all: a rotation or creation the crash cut short.
    fn holds_no_frame(&self, id: u64) -> Result<bool, WalError> {
        match SegmentHeader::parse(&self.read(0, SEGMENT_HEADER_BYTES)?, id) {
            None => Ok(true),
            Some(header) => Ok(self.later_frame(header.salt, 0)?.is_none()),
        }
    }
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
        let field = |at: usize| bytes.get(at..).and_then(<[u8]>::first_chunk::<8>).map(|b| u64::from_le_bytes(*b));
        if (bytes.len() as u64) < SEGMENT_HEADER_BYTES
            || bytes.first_chunk::<8>() != Some(SEGMENT_MAGIC)
            || field(8)? != id
        {
            return None;
        }
        Some(SegmentHeader { salt: segment_salt(id, field(24)?), preallocated_bytes: field(32)? })
    }
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
fn scan_segment(
    segment: &SegmentFile,
    id: u64,
    salt: u32,
    groups: &mut FxHashMap<u64, GroupLog>,
    report: &mut RecoveryReport,
) -> Result<SegmentScan, WalError> {
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut records: Vec<(u64, Record)> = Vec::new();
    let damaged =
        |offset: u64, reason: String| Ok(SegmentScan { end: offset, sealed: false, damage: Some((offset, reason)) });
    let corrupt = |at: u64, reason: String| WalError::Corruption { path: segment.path.clone(), offset: at, reason };
    while offset < segment.len {
        let Some((batch, records_bytes)) = segment.frame_at(offset, salt)? else {
            return damaged(offset, "no valid frame".into());
        };
        let records_end = FRAME_BYTES as u64 + records_bytes;
        if batch % BATCH_ALIGN_BYTES != 0 || records_end > batch || batch > segment.len - offset {
            return damaged(offset, "frame cut short or malformed".into());
        }
        let frame = segment.read(offset, records_end)?;
        records.clear();
        let mut at = FRAME_BYTES;
        while at < frame.len() {
            match decode(&frame[at..], salt) {
                Ok(record) => {
                    let len = record.len;
                    records.push((offset + at as u64, record));
                    at += len;
                }
                Err(error) => {
                    let reason =
                        format!("{error} in the record at offset {} of the frame starting here", offset + at as u64);
                    return damaged(offset, reason);
                }
            }
        }
        let mut sealed = false;
        for (at, record) in records.drain(..) {
            match record.body {
                Body::Op(op) => apply_record(groups, id, at, &op, record.group_id, record.len)
                    .map_err(|reason| corrupt(at, reason))?,
                Body::Seal => sealed = true,
                Body::Frame { .. } => return Err(corrupt(at, "a frame inside a frame".into())),
            }
            report.records += 1;
        }
        offset += batch;
        if sealed {
            return Ok(SegmentScan { end: offset, sealed: true, damage: None });
        }
    }
    Ok(SegmentScan { end: offset, sealed: false, damage: None })
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

/// Removes a segment file that recovery finished off (a rotation or creation cut short), durably.
fn remove(disk: &dyn Disk, dir: &Path, path: &Path) -> Result<(), WalError> {
    disk.remove(path).map_err(io_error(format!("removing {}", path.display())))?;
    disk.sync_dir(dir).map_err(io_error(format!("syncing directory {}", dir.display())))
}

/// Recovers (or creates) the WAL in `dir`.
pub(super) fn recover(dir: &Path, disk: &dyn Disk, options: &WalOptions) -> Result<Recovered, WalError> {
    disk.create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
    let mut ids: Vec<u64> = disk
        .list(dir)
        .map_err(io_error(format!("listing {}", dir.display())))?
        .iter()
        .filter_map(|p| segment_id(p))
        .collect();
    ids.sort_unstable();
    let mut report = RecoveryReport::default();
    let mut groups: FxHashMap<u64, GroupLog> = FxHashMap::default();
    let mut segments = BTreeMap::new();
    // A newest segment without a frame of its own may be a rotation or creation the crash cut short. Asked only
    // on the paths that need it (it probes the whole file), and once.
    let mut newest_empty_answer = None;
    let mut newest_empty = || -> Result<bool, WalError> {
        let Some(&id) = ids.last() else { return Ok(false) };
        if newest_empty_answer.is_none() {
            newest_empty_answer = Some(SegmentFile::open(disk, segment_path(dir, id))?.holds_no_frame(id)?);
        }
        Ok(newest_empty_answer == Some(true))
    };
    let mut previous: Option<(u64, SegmentScan)> = None;
    for (position, &id) in ids.iter().enumerate() {
        let is_last = position + 1 == ids.len();
        let path = segment_path(dir, id);
        if let Some((previous_id, scan)) = &previous {
            if *previous_id + 1 != id {
                return Err(missing_successor(dir, *previous_id, scan));
            }
            if !scan.sealed {
                // Only an interrupted rotation may follow an unsealed segment: its successor, without frames, goes.
                if !(is_last && newest_empty()?) {
                    let path = segment_path(dir, *previous_id);
                    return Err(WalError::Corruption {
                        path,
                        offset: scan.end,
                        reason: "a segment that is not the newest ends without a seal".into(),
                    });
                }
                remove(disk, dir, &path)?;
                break;
            }
        }
        let segment = SegmentFile::open(disk, path.clone())?;
        let Some(header) = SegmentHeader::parse(&segment.read(0, SEGMENT_HEADER_BYTES)?, id) else {
            // The only segment, its header not (yet) durable: a creation cut short, nothing written into it. (After
            // a sealed predecessor the header was durable: damage.)
            if is_last && previous.is_none() && newest_empty()? {
                remove(disk, dir, &path)?;
                break;
            }
            return Err(WalError::Corruption { path, offset: 0, reason: "bad segment header".to_string() });
        };
        if is_last && previous.is_none() && segment.len < header.preallocated_bytes && newest_empty()? {
            // The only segment, started but not yet sized when the crash came, and empty: it goes too.
            remove(disk, dir, &path)?;
            break;
        }
        let scan = scan_segment(&segment, id, header.salt, &mut groups, &mut report)?;
        if let Some((damage_at, reason)) = &scan.damage {
            let later = segment.later_frame(header.salt, scan.end)?;
            // Damage may end only the newest segment — or the one before it, if the newest is an interrupted
            // rotation (the seal was torn) — and nothing valid may follow it.
            if later.is_some() || !(is_last || (position + 2 == ids.len() && newest_empty()?)) {
                let reason = match later {
                    Some(at) => format!("{reason}, yet a valid frame follows at offset {at}"),
                    None => format!("{reason} in a segment that is not the newest (it must end with a seal)"),
                };
                return Err(WalError::Corruption { path, offset: *damage_at, reason });
            }
            // The log ends here. A frame of its own that does not verify whole is a torn write (reported);
            // otherwise what follows was never written: zeros where the file was sized, or the stale bytes of a
            // recycled file's earlier life.
            if let Some((batch_bytes, _)) = segment.frame_at(scan.end, header.salt)? {
                report.torn_tail = Some((path.clone(), scan.end, batch_bytes.min(segment.len - scan.end)));
            }
        }
        if segment.len < header.preallocated_bytes {
            // Every segment keeps at least the length it started with: it was cut, and acknowledged writes may
            // have been in what is gone.
            return Err(WalError::Corruption {
                path,
                offset: scan.end,
                reason: format!(
                    "the file is {} bytes, shorter than the {} it had from its start: it was cut, and acknowledged \
                     writes after offset {} may be lost",
                    segment.len, header.preallocated_bytes, scan.end
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
            let file =
                disk.open(&segment.path, false).map_err(io_error(format!("opening {}", segment.path.display())))?;
            let file_len = file.len_bytes().map_err(io_error(format!("sizing {}", segment.path.display())))?;
            // What lies past the frames is unknown (zeros written ahead, stale bytes of a recycled file, or a
            // hole): zeros are written ahead again from there.
            ActiveSegment {
                id,
                salt: segment.salt,
                file,
                len: segment.len,
                blocks_written_until: segment.len,
                zero_fill_end: file_len,
            }
        }
        None => {
            // A new WAL (or one whose only segment was a creation cut short): the next id starts it.
            let id = ids.last().map_or(1, |id| id + 1);
            let active = open_next_segment(disk, dir, id, options.segment_bytes_max)?;
            segments.insert(id, Segment { path: segment_path(dir, id), len: SEGMENT_HEADER_BYTES, salt: active.salt });
            active
        }
    };
    if let Some((path, offset, dropped)) = &report.torn_tail {
        eprintln!(
            "WAL recovery: the write at the tail of {} (offset {offset}, {dropped} bytes) did not verify and was dropped: a \
             write the crash cut short, never acknowledged — unless the medium damaged the last acknowledged write, which \
             cannot be told apart (docs/wal-format.md)",
            path.display()
        );
    }
    Ok(Recovered { segments, groups, active, report })
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

/// The length segment `id`'s header says the file started with (`None`: not this segment's header).
pub(super) fn preallocated_bytes(header: &[u8], id: u64) -> Option<u64> {
    SegmentHeader::parse(header, id).map(|header| header.preallocated_bytes)
}
