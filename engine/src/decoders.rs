//! Every decoder of bytes the engine reads back from disk, behind one entry point each that takes any bytes: the
//! fuzz targets (`tests/fuzz`, cargo-fuzz) and the bounded property tests of the default run
//! (`tests/decoders.rs`) drive them. Each must return — an error is fine — and never panic, loop, or allocate
//! more than a bound of its input, whatever the bytes.
//!
//! Checksums would stop almost every random input at the door, so each entry point also feeds the decoder behind
//! the checksum: the same bytes with a valid checksum made for them (a record, a block, a sealed value), or, for
//! recovery, a segment built from the input's records with valid frames around them — what a bug or a crafted
//! file could hand the code behind the check.

use std::path::Path;
use std::sync::Arc;

use crate::disk::{Disk, SimDisk};
use crate::lsm::block::Block;
use crate::lsm::bloom::Bloom;
use crate::lsm::run::Run;
use crate::lsm::sealed::{seal, unseal};
use crate::lsm::version::RangeTombstone;
use crate::state_machine::decode_applied;
use crate::wal::record::{decode, encode_frame, encode_raw, frame_at, segment_salt, FRAME_BYTES};
use crate::wal::segment_writer::BATCH_ALIGN_BYTES;
use crate::wal::{segment_path, Wal, WalOptions, SEGMENT_HEADER_BYTES, SEGMENT_MAGIC};

/// A few keys to probe decoded structures with: taken from the input, and fixed ones.
fn probe_keys(input: &[u8]) -> Vec<&[u8]> {
    let mut keys: Vec<&[u8]> = vec![b"", b"a", b"key", &[0xff; 8]];
    keys.extend(input.chunks(7).take(4));
    keys
}

/// A WAL record: as read (salt 0), and with a valid checksum for its bytes.
pub fn wal_record(input: &[u8]) {
    let _ = decode(input, 0);
    let _ = frame_at(input, 0);
    if let (Some(group), Some(&kind), Some(payload)) =
        (input.get(9..).and_then(<[u8]>::first_chunk::<8>), input.get(8), input.get(17..))
    {
        let mut fixed = Vec::new();
        encode_raw(0, u64::from_le_bytes(*group), kind, payload, &mut fixed);
        let _ = decode(&fixed, 0);
    }
}

/// A segment file for recovery, built from the input: a header (id 1; the recorded length from the input), then
/// frames of records `kind: u8 | group: u8 % 4 | payload_len: u16 LE % 1024 | payload`, a frame closed after a
/// record whose kind byte has its high bit set, and whatever bytes remain as a torn tail. Recovery must accept it
/// or report corruption; if it opens, a write and a reopen must work as well.
pub fn wal_segment(input: &[u8]) {
    let disk = SimDisk::new();
    let dir = Path::new("/wal");
    let id = 1;
    let nonce = 0;
    let salt = segment_salt(id, nonce);
    let mut bytes = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    bytes.extend_from_slice(SEGMENT_MAGIC);
    bytes.extend_from_slice(&id.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&nonce.to_le_bytes());
    let recorded_len = input.first().map_or(0, |b| u64::from(*b) << 12);
    bytes.extend_from_slice(&recorded_len.to_le_bytes());
    bytes.resize(SEGMENT_HEADER_BYTES as usize, 0);
    let mut rest = input.get(1..).unwrap_or_default();
    let mut frame = vec![0; FRAME_BYTES];
    let close = |frame: &mut Vec<u8>, bytes: &mut Vec<u8>| {
        let records_bytes = (frame.len() - FRAME_BYTES) as u64;
        let batch_bytes = (frame.len() as u64).div_ceil(BATCH_ALIGN_BYTES) * BATCH_ALIGN_BYTES;
        frame.resize(batch_bytes as usize, 0);
        encode_frame(salt, batch_bytes, records_bytes, frame);
        bytes.extend_from_slice(frame);
        *frame = vec![0; FRAME_BYTES];
    };
    while rest.len() >= 4 {
        let (kind, group) = (rest[0], u64::from(rest[1] % 4));
        let len = (u16::from_le_bytes([rest[2], rest[3]]) % 1024) as usize;
        let Some(payload) = rest.get(4..4 + len) else { break };
        encode_raw(salt, group, kind & 0x7f, payload, &mut frame);
        rest = &rest[4 + len..];
        if kind & 0x80 != 0 {
            close(&mut frame, &mut bytes);
        }
    }
    if frame.len() > FRAME_BYTES {
        close(&mut frame, &mut bytes);
    }
    bytes.extend_from_slice(rest);
    if disk.create_dir_all(dir).is_err() {
        return;
    }
    let Ok(mut file) = disk.open(&segment_path(dir, id), true) else { return };
    if file.write_at(0, &bytes).and_then(|()| file.sync_data()).and_then(|()| disk.sync_dir(dir)).is_err() {
        return;
    }
    drop(file);
    let options = WalOptions { segment_bytes_max: 64 << 10, entry_cache_bytes_max: 1 << 20, ..WalOptions::default() };
    let Ok((mut wal, _)) = Wal::open(dir, Arc::new(disk.clone()), options.clone()) else { return };
    let groups: Vec<u64> = wal.group_ids().collect();
    for group in groups {
        if let Some(log) = wal.group(group) {
            let (first, last) = (log.first_index, log.last_index());
            let _ = wal.entries(group, first, last.saturating_add(1).min(first.saturating_add(64)), 1 << 20);
        }
    }
    let _ = wal.write(&[(9, crate::wal::record::LogOp::HardState(Default::default()))]);
    drop(wal);
    let _ = Wal::open(dir, Arc::new(disk), options);
}

/// A block built from `entries` (sorted and made unique here; the value `None` for deletions), then damaged —
/// `damage` is (position, xor) pairs, positions taken modulo the block's length — and read as [`block`] reads any
/// bytes: damage behind valid checksums, in a block whose layout is otherwise sound.
pub fn damaged_block(entries: &[(Vec<u8>, Option<Vec<u8>>)], damage: &[(usize, u8)]) {
    let mut sorted: Vec<_> = entries.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|a, b| a.0 == b.0);
    let mut builder = crate::lsm::block::BlockBuilder::default();
    for (key, value) in &sorted {
        builder.add(key, value.as_deref());
    }
    let (_, mut bytes) = builder.finish();
    for (at, xor) in damage {
        let len = bytes.len();
        bytes[at % len] ^= xor;
    }
    block(&bytes);
}

/// A state machine block: as read, and with valid checksums made for its bytes (the block's, and its trailer's and
/// entries' where it has them); a block that parses is read whole, and every block is looked up in.
pub fn block(input: &[u8]) {
    let read = |bytes: &[u8]| {
        if let Ok(block) = Block::parse(bytes) {
            for i in 0..block.len() {
                let _ = block.entry(i);
            }
            for key in probe_keys(bytes) {
                let _ = block.get(key);
                let _ = block.seek(key);
            }
        }
        for key in probe_keys(bytes) {
            let _ = Block::lookup(bytes, key);
        }
    };
    read(input);
    if input.len() >= 8 {
        let mut fixed = input.to_vec();
        Block::make_checksums_valid(&mut fixed);
        read(&fixed);
    }
}

/// A Bloom filter's bytes (as a run record holds them), probed.
pub fn bloom(input: &[u8]) {
    let filter = Bloom::decode(input);
    for key in probe_keys(input) {
        let _ = filter.may_contain(key);
    }
    let _ = filter.len_bytes();
}

/// A run record: sealed as stored, and raw (which the seal refuses); a record that decodes is probed.
pub fn run_record(input: &[u8]) {
    let _ = Run::decode(1, input);
    if let Ok(run) = Run::decode(1, &seal("runs", 1, input.to_vec())) {
        for key in probe_keys(input) {
            let _ = run.may_contain(key);
            let _ = run.overlaps(key, b"");
        }
    }
}

/// A range deletion record and a stored range descriptor's seal; an applied state's 21 bytes.
pub fn state_values(input: &[u8]) {
    let _ = RangeTombstone::decode(3, input);
    let _ = RangeTombstone::decode(3, &seal("range_tombstones", 3, input.to_vec()));
    let _ = unseal("ranges", 5, input);
    let mut applied = [0u8; 21];
    let n = input.len().min(21);
    applied[..n].copy_from_slice(&input[..n]);
    let _ = decode_applied(7, applied);
}
