//! The WAL's record format (documented byte by byte in `docs/wal-format.md`).
//!
//! ```text
//! record = payload_len: u32 LE | crc32c: u32 LE | kind: u8 | group_id: u64 LE | payload: [u8; payload_len]
//! crc32c covers payload_len, kind, group_id and payload (every byte of the record but the checksum itself),
//! seeded with the segment's salt (from its id and a random nonce): a record copied into, or left over in, another
//! segment never verifies there — which is what lets segment files be recycled.
//! ```
//!
//! Besides the log operations, two kinds structure a segment: a `Frame` opens every write (its length, and how
//! many bytes of records it holds), a `Seal` ends a full segment.

use flotilla_raft::{Entry, HardState};
use prost::Message as _;

pub const RECORD_HEADER_BYTES: usize = 17;
/// Larger payloads are refused when writing and taken for garbage when reading.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 64 << 20;
/// The largest entry data an Append record holds (an entry's own fields and its framing in the record take at
/// most 40 bytes more). Whoever proposes entries must refuse larger ones: the WAL refuses them as a bug.
pub const ENTRY_DATA_BYTES_MAX: usize = RECORD_PAYLOAD_BYTES_MAX - 64;

/// What a record does to one group's log. Replaying them in order rebuilds the group's persisted state.
#[derive(Clone, Debug, PartialEq)]
pub enum LogOp {
    /// Appends entries (contiguous, ascending). Entries at and after the first one's index that the log already
    /// holds are replaced: an append also truncates a conflicting suffix.
    Append(Vec<Entry>),
    HardState(HardState),
    /// Removes every entry at or after `from_index` (a conflicting suffix; also implied by `Append`).
    Truncate {
        from_index: u64,
    },
    /// Entries before `first_kept_index` are no longer needed (the state machine has them durably); the entry
    /// at `first_kept_index - 1` had `base_term`. Self-sufficient: it states where the log starts even when every
    /// earlier record is gone (purge rewrites a group's start with one).
    Compact {
        first_kept_index: u64,
        base_term: u64,
    },
    /// A snapshot at `index` of `term` was installed: the log restarts after it.
    Snapshot {
        index: u64,
        term: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Append = 1,
    HardState = 2,
    Truncate = 3,
    Compact = 4,
    Snapshot = 5,
    Frame = 6,
    Seal = 7,
}

impl RecordKind {
    fn from_byte(byte: u8) -> Option<RecordKind> {
        Some(match byte {
            1 => RecordKind::Append,
            2 => RecordKind::HardState,
            3 => RecordKind::Truncate,
            4 => RecordKind::Compact,
            5 => RecordKind::Snapshot,
            6 => RecordKind::Frame,
            7 => RecordKind::Seal,
            _ => return None,
        })
    }
}

/// The payload of an `Append` record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EntryBatch {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
}

/// Why bytes are not a valid record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer ends inside the record (a torn write at the tail, or a short read).
    Incomplete,
    /// The declared payload length is impossible.
    BadLength(u32),
    BadChecksum,
    UnknownKind(u8),
    /// The checksum matched but the payload does not parse: a bug or a format mismatch.
    BadPayload(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Incomplete => write!(f, "record cut short"),
            DecodeError::BadLength(len) => write!(f, "impossible payload length {len}"),
            DecodeError::BadChecksum => write!(f, "checksum mismatch"),
            DecodeError::UnknownKind(kind) => write!(f, "unknown record kind {kind}"),
            DecodeError::BadPayload(what) => write!(f, "malformed payload: {what}"),
        }
    }
}

/// The checksum seed of a segment's records: from its id and the random nonce in its header, so no other
/// segment — nor a client crafting values — can produce records that verify in it.
pub fn segment_salt(segment_id: u64, nonce: u64) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&segment_id.to_le_bytes()), &nonce.to_le_bytes())
}

/// Bytes of a `Frame` record.
pub const FRAME_BYTES: usize = RECORD_HEADER_BYTES + 16;

fn checksum(salt: u32, header: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(salt, &header[0..4]);
    let crc = crc32c::crc32c_append(crc, &header[8..RECORD_HEADER_BYTES]);
    crc32c::crc32c_append(crc, payload)
}

/// Appends the encoding of `op` for `group_id` to `out`; returns the record's length. Panics if the payload is
/// over [`RECORD_PAYLOAD_BYTES_MAX`] (callers split appends; see [`append_runs`]).
pub fn encode(salt: u32, group_id: u64, op: &LogOp, out: &mut Vec<u8>) -> usize {
    match op {
        LogOp::Append(entries) => encode_append(salt, group_id, entries, out),
        LogOp::HardState(hard_state) => encode_with(salt, group_id, RecordKind::HardState, out, |out| {
            hard_state.encode(out).expect("Vec grows");
        }),
        LogOp::Truncate { from_index } => encode_with(salt, group_id, RecordKind::Truncate, out, |out| {
            out.extend_from_slice(&from_index.to_le_bytes())
        }),
        LogOp::Compact { first_kept_index, base_term } => {
            encode_with(salt, group_id, RecordKind::Compact, out, |out| {
                out.extend_from_slice(&first_kept_index.to_le_bytes());
                out.extend_from_slice(&base_term.to_le_bytes());
            })
        }
        LogOp::Snapshot { index, term } => encode_with(salt, group_id, RecordKind::Snapshot, out, |out| {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&term.to_le_bytes());
        }),
    }
}

/// Writes a `Frame` over the first [`FRAME_BYTES`] of `out`: a write of `batch_bytes` (a multiple of the alignment,
/// zero-filled at the end) whose records take the `records_bytes` after the frame.
pub fn encode_frame(salt: u32, batch_bytes: u64, records_bytes: u64, out: &mut [u8]) {
    let mut frame = Vec::with_capacity(FRAME_BYTES);
    encode_with(salt, 0, RecordKind::Frame, &mut frame, |out| {
        out.extend_from_slice(&batch_bytes.to_le_bytes());
        out.extend_from_slice(&records_bytes.to_le_bytes());
    });
    out[..FRAME_BYTES].copy_from_slice(&frame);
}

/// Appends a `Seal`: the segment ends here.
pub fn encode_seal(salt: u32, out: &mut Vec<u8>) -> usize {
    encode_with(salt, 0, RecordKind::Seal, out, |_| {})
}

/// The `(batch_bytes, records_bytes)` of a valid `Frame` at the start of `bytes`. Cheap on anything else (the
/// checksum is computed only when the fixed fields fit), so recovery can probe every aligned offset.
pub fn frame_at(bytes: &[u8], salt: u32) -> Option<(u64, u64)> {
    if bytes.len() < FRAME_BYTES || bytes[0..4] != 16u32.to_le_bytes() || bytes[8] != RecordKind::Frame as u8 {
        return None;
    }
    match decode(&bytes[..FRAME_BYTES], salt) {
        Ok(Record { body: Body::Frame { batch_bytes, records_bytes }, .. }) => Some((batch_bytes, records_bytes)),
        _ => None,
    }
}

/// Encodes an Append record straight from a slice of entries (the same bytes as an `EntryBatch`, no copy of
/// the entries themselves).
pub fn encode_append(salt: u32, group_id: u64, entries: &[Entry], out: &mut Vec<u8>) -> usize {
    out.reserve(RECORD_HEADER_BYTES + prost::encoding::message::encoded_len_repeated(1, entries));
    encode_with(salt, group_id, RecordKind::Append, out, |out| {
        for entry in entries {
            prost::encoding::message::encode(1, entry, out);
        }
    })
}

fn encode_with(
    salt: u32,
    group_id: u64,
    kind: RecordKind,
    out: &mut Vec<u8>,
    payload: impl FnOnce(&mut Vec<u8>),
) -> usize {
    encode_kind_byte(salt, group_id, kind as u8, out, payload)
}

/// A record of any kind byte with any payload and a valid checksum: what the fuzz targets feed recovery, so that
/// it reaches the payload decoders and the replay behind the checksum (`crate::decoders`).
pub(crate) fn encode_raw(salt: u32, group_id: u64, kind: u8, payload: &[u8], out: &mut Vec<u8>) -> usize {
    encode_kind_byte(salt, group_id, kind, out, |out| out.extend_from_slice(payload))
}

fn encode_kind_byte(
    salt: u32,
    group_id: u64,
    kind: u8,
    out: &mut Vec<u8>,
    payload: impl FnOnce(&mut Vec<u8>),
) -> usize {
    let start = out.len();
    out.resize(start + RECORD_HEADER_BYTES, 0);
    payload(out);
    let payload_len = out.len() - start - RECORD_HEADER_BYTES;
    assert!(payload_len <= RECORD_PAYLOAD_BYTES_MAX, "record payload of {payload_len} bytes; split appends first");
    let (header, payload) = out[start..].split_at_mut(RECORD_HEADER_BYTES);
    header[0..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    header[8] = kind;
    header[9..17].copy_from_slice(&group_id.to_le_bytes());
    let crc = checksum(salt, header, payload);
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// What a decoded record holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    Op(LogOp),
    Frame { batch_bytes: u64, records_bytes: u64 },
    Seal,
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub group_id: u64,
    pub body: Body,
    /// Bytes the record occupies.
    pub len: usize,
}

/// The u64 (LE) at `at`; a payload too short for it is malformed.
fn u64_at(bytes: &[u8], at: usize) -> Result<u64, DecodeError> {
    bytes
        .get(at..)
        .and_then(<[u8]>::first_chunk::<8>)
        .map(|b| u64::from_le_bytes(*b))
        .ok_or(DecodeError::BadPayload("wrong fixed payload size"))
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, DecodeError> {
    bytes.get(at..).and_then(<[u8]>::first_chunk::<4>).map(|b| u32::from_le_bytes(*b)).ok_or(DecodeError::Incomplete)
}

/// Decodes the record at the start of `bytes`, written in the segment with this `salt`. Never panics, whatever
/// the bytes.
pub fn decode(bytes: &[u8], salt: u32) -> Result<Record, DecodeError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(DecodeError::Incomplete);
    }
    let payload_len = u32_at(bytes, 0)?;
    if payload_len as usize > RECORD_PAYLOAD_BYTES_MAX {
        return Err(DecodeError::BadLength(payload_len));
    }
    let len = RECORD_HEADER_BYTES + payload_len as usize;
    if bytes.len() < len {
        return Err(DecodeError::Incomplete);
    }
    let (header, payload) = bytes[..len].split_at(RECORD_HEADER_BYTES);
    if checksum(salt, header, payload) != u32_at(header, 4)? {
        return Err(DecodeError::BadChecksum);
    }
    let group_id = u64_at(header, 9)?;
    let kind = RecordKind::from_byte(header[8]).ok_or(DecodeError::UnknownKind(header[8]))?;
    let fixed = |expected: usize| -> Result<(), DecodeError> {
        if payload.len() == expected {
            Ok(())
        } else {
            Err(DecodeError::BadPayload("wrong fixed payload size"))
        }
    };
    let body = match kind {
        RecordKind::Append => {
            let batch = EntryBatch::decode(payload).map_err(|_| DecodeError::BadPayload("entry batch"))?;
            Body::Op(LogOp::Append(batch.entries))
        }
        RecordKind::HardState => {
            Body::Op(LogOp::HardState(HardState::decode(payload).map_err(|_| DecodeError::BadPayload("hard state"))?))
        }
        RecordKind::Truncate => {
            fixed(8)?;
            Body::Op(LogOp::Truncate { from_index: u64_at(payload, 0)? })
        }
        RecordKind::Compact => {
            fixed(16)?;
            Body::Op(LogOp::Compact { first_kept_index: u64_at(payload, 0)?, base_term: u64_at(payload, 8)? })
        }
        RecordKind::Snapshot => {
            fixed(16)?;
            Body::Op(LogOp::Snapshot { index: u64_at(payload, 0)?, term: u64_at(payload, 8)? })
        }
        RecordKind::Frame => {
            fixed(16)?;
            Body::Frame { batch_bytes: u64_at(payload, 0)?, records_bytes: u64_at(payload, 8)? }
        }
        RecordKind::Seal => {
            fixed(0)?;
            Body::Seal
        }
    };
    Ok(Record { group_id, body, len })
}

/// Splits `entries` into runs (as index ranges into the slice) whose encoded batches stay under
/// `batch_bytes_max` (a single larger entry gets a run of its own). An iterator: the WAL writer splits every
/// append of every write, almost always into one run, and allocates nothing for it.
pub fn append_runs(entries: &[Entry], batch_bytes_max: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start == entries.len() {
            return None;
        }
        let mut end = start;
        let mut bytes = 0;
        while let Some(entry) = entries.get(end) {
            let size = entry.encoded_len() + 8;
            if end > start && bytes + size > batch_bytes_max {
                break;
            }
            bytes += size;
            end += 1;
        }
        let run = start..end;
        start = end;
        Some(run)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(index: u64, term: u64, data: &'static [u8]) -> Entry {
        Entry { index, term, data: Bytes::from_static(data), ..Default::default() }
    }

    fn ops() -> Vec<LogOp> {
        vec![
            LogOp::Append(vec![entry(5, 2, b"five"), entry(6, 2, b""), entry(7, 3, b"seven")]),
            LogOp::HardState(HardState { term: 3, vote: 2, commit: 6 }),
            LogOp::Truncate { from_index: 6 },
            LogOp::Compact { first_kept_index: 4, base_term: 2 },
            LogOp::Snapshot { index: 100, term: 9 },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        let salt = segment_salt(3, 77);
        for (group, op) in ops().into_iter().enumerate() {
            let mut out = Vec::new();
            let len = encode(salt, group as u64 + 7, &op, &mut out);
            assert_eq!(len, out.len());
            let record = decode(&out, salt).unwrap();
            assert_eq!((record.group_id, &record.body, record.len), (group as u64 + 7, &Body::Op(op), len));
        }
        let mut frame = vec![0; FRAME_BYTES];
        encode_frame(salt, 8192, 100, &mut frame);
        assert_eq!(frame_at(&frame, salt), Some((8192, 100)));
        let mut seal = Vec::new();
        encode_seal(salt, &mut seal);
        assert_eq!(decode(&seal, salt).unwrap().body, Body::Seal);
    }

    #[test]
    fn a_record_never_verifies_in_another_segment() {
        let mut out = Vec::new();
        encode(segment_salt(1, 77), 1, &ops()[0], &mut out);
        assert!(decode(&out, segment_salt(1, 77)).is_ok());
        assert_eq!(decode(&out, segment_salt(2, 77)), Err(DecodeError::BadChecksum), "stale bytes of a recycled file");
        assert_eq!(decode(&out, segment_salt(1, 78)), Err(DecodeError::BadChecksum), "the same id with another nonce");
        let mut frame = vec![0; FRAME_BYTES];
        encode_frame(segment_salt(1, 77), 4096, 0, &mut frame);
        assert_eq!(frame_at(&frame, segment_salt(2, 77)), None);
    }

    #[test]
    fn any_damage_is_detected_and_never_panics() {
        let salt = segment_salt(1, 77);
        let mut out = Vec::new();
        for op in ops() {
            encode(salt, 1, &op, &mut out);
        }
        let first_len = decode(&out, salt).unwrap().len;
        for cut in 0..first_len {
            assert_eq!(decode(&out[..cut], salt), Err(DecodeError::Incomplete), "cut at {cut}");
        }
        for byte in 0..first_len {
            for bit in 0..8 {
                let mut damaged = out.clone();
                damaged[byte] ^= 1 << bit;
                let decoded = decode(&damaged, salt);
                assert!(decoded.is_err(), "flip of bit {bit} in byte {byte} went unnoticed");
            }
        }
        // Arbitrary bytes: errors, never panics.
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = (state >> 58) as usize * 4;
            let bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 56)) as u8).collect();
            let _ = decode(&bytes, salt);
            let _ = frame_at(&bytes, salt);
        }
    }

    #[test]
    fn append_runs_cover_the_entries_in_order_within_the_bound() {
        let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1, b"0123456789")).collect();
        let runs: Vec<_> = append_runs(&entries, 100).collect();
        assert!(runs.len() > 1);
        for run in &runs {
            let bytes: usize = entries[run.clone()].iter().map(|e| e.encoded_len() + 8).sum();
            assert!(bytes <= 100 || run.len() == 1, "run {run:?} holds {bytes} bytes");
        }
        let rejoined: Vec<Entry> = runs.iter().flat_map(|run| entries[run.clone()].iter().cloned()).collect();
        assert_eq!(rejoined, entries);
        assert_eq!(append_runs(&entries[..0], 100).count(), 0);
        let large = vec![entry(1, 1, b"0123456789"); 3];
        assert_eq!(
            append_runs(&large, 1).collect::<Vec<_>>(),
            vec![0..1, 1..2, 2..3],
            "an entry over the bound runs alone"
        );
    }

    #[test]
    fn encode_append_matches_the_entry_batch_encoding() {
        let entries = vec![entry(1, 1, b"a"), entry(2, 1, b"bb")];
        let salt = segment_salt(9, 77);
        let mut direct = Vec::new();
        encode_append(salt, 3, &entries, &mut direct);
        let mut via_op = Vec::new();
        encode(salt, 3, &LogOp::Append(entries.clone()), &mut via_op);
        assert_eq!(direct, via_op);
        assert_eq!(decode(&direct, salt).unwrap().body, Body::Op(LogOp::Append(entries)));
    }
}
