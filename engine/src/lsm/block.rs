//! A block: a few KiB of sorted entries (a put or a deletion of a key), checksummed, searchable in place.
//!
//! ```text
//! entry*  | offset: u32 LE * count | trailer crc32c: u32 LE | count: u32 LE | crc32c(everything before): u32 LE
//! entry   = key_len: u32 LE | value_len: u32 LE (u32::MAX: a deletion) | key | value | crc32c(the entry so far): u32 LE
//! ```
//!
//! The count word's top bit (`ENTRY_CHECKSUMS`) marks this layout. The block's own checksum covers every byte, and
//! is what a scan or a compaction (which read every entry) checks. A point read checks only what it reads: the
//! trailer's checksum (of the offsets and the count word) and the checksum of each entry its binary search visits
//! — about 1 KiB instead of the whole block, the largest cost of a read that misses the memtable when the block
//! is checked whole. Every byte a point read relies on is still checked, so damage still stops the node.
//!
//! Blocks written before entry checksums (count word without the top bit: no entry or trailer checksum) are read
//! as they were: a point read checks the whole block.
//!
//! Blocks are the unit stored in redb: one redb insert per block instead of per key is what makes a flush cheap.

use crate::state_machine::error::StateMachineError;

const DELETION: u32 = u32::MAX;
const ENTRY_HEADER_BYTES: usize = 8;
const CRC_BYTES: usize = 4;
/// Set in the count word of a block whose entries and trailer carry checksums of their own.
const ENTRY_CHECKSUMS: u32 = 1 << 31;

/// Accumulates sorted entries into one block.
#[derive(Default)]
pub(crate) struct BlockBuilder {
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    last_key: Vec<u8>,
}

impl BlockBuilder {
    /// Appends an entry; keys must come in strictly increasing order.
    pub(crate) fn add(&mut self, key: &[u8], value: Option<&[u8]>) {
        debug_assert!(self.offsets.is_empty() || key > self.last_key.as_slice(), "block keys out of order");
        let at = self.bytes.len();
        self.offsets.push(at as u32);
        self.bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        let value_len = value.map_or(DELETION, |v| v.len() as u32);
        self.bytes.extend_from_slice(&value_len.to_le_bytes());
        self.bytes.extend_from_slice(key);
        if let Some(value) = value {
            self.bytes.extend_from_slice(value);
        }
        let crc = crc32c::crc32c(&self.bytes[at..]);
        self.bytes.extend_from_slice(&crc.to_le_bytes());
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
    }

    /// Bytes the finished block would take.
    pub(crate) fn len_bytes(&self) -> usize {
        self.bytes.len() + 4 * self.offsets.len() + 3 * CRC_BYTES
    }

    /// Bytes an entry adds to a block besides its key and value (header, checksum, offset).
    pub(crate) const ENTRY_OVERHEAD_BYTES: usize = ENTRY_HEADER_BYTES + CRC_BYTES + 4;

    pub(crate) fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The block's last key and its encoding; the builder is empty afterwards.
    pub(crate) fn finish(&mut self) -> (Vec<u8>, Vec<u8>) {
        let mut block = std::mem::take(&mut self.bytes);
        block.reserve(4 * self.offsets.len() + 3 * CRC_BYTES);
        let trailer_at = block.len();
        for offset in &self.offsets {
            block.extend_from_slice(&offset.to_le_bytes());
        }
        let count_word = (self.offsets.len() as u32 | ENTRY_CHECKSUMS).to_le_bytes();
        let trailer_crc = crc32c::crc32c_append(crc32c::crc32c(&block[trailer_at..]), &count_word);
        block.extend_from_slice(&trailer_crc.to_le_bytes());
        block.extend_from_slice(&count_word);
        let crc = crc32c::crc32c(&block);
        block.extend_from_slice(&crc.to_le_bytes());
        self.offsets.clear();
        (std::mem::take(&mut self.last_key), block)
    }
}

/// A verified block, read in place.
#[derive(Clone, Copy)]
pub(crate) struct Block<'a> {
    entries: &'a [u8],
    offsets: &'a [u8],
    /// Whether each entry ends with its checksum (blocks written before: no).
    entry_checksums: bool,
}

fn corrupt(what: &str) -> StateMachineError {
    StateMachineError::Storage(format!("corrupt state machine block: {what}"))
}

/// The u32 (LE) at `at`: every caller reads where `Block::parse` checked that four bytes lie.
fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let word = bytes.get(at..).and_then(<[u8]>::first_chunk::<4>);
    u32::from_le_bytes(
        *word.unwrap_or_else(|| panic!("a block read at {at} of {} bytes, past what parse checked", bytes.len())),
    )
}

/// Where a block's parts lie, from its count word (not yet checked against any checksum).
struct Trailer {
    count: usize,
    entry_checksums: bool,
    /// Where the offsets start (the entries end).
    offsets_at: usize,
    /// Where the offsets end.
    offsets_end: usize,
}

impl Trailer {
    fn read(bytes: &[u8]) -> Result<Trailer, StateMachineError> {
        if bytes.len() < 8 {
            return Err(corrupt("shorter than its trailer"));
        }
        let word = read_u32(bytes, bytes.len() - 8);
        let entry_checksums = word & ENTRY_CHECKSUMS != 0;
        let count = (word & !ENTRY_CHECKSUMS) as usize;
        let fixed = if entry_checksums { 3 * CRC_BYTES } else { 2 * CRC_BYTES };
        let offsets_end = bytes.len().checked_sub(fixed).ok_or_else(|| corrupt("shorter than its trailer"))?;
        let offsets_at =
            count.checked_mul(4).and_then(|n| offsets_end.checked_sub(n)).ok_or_else(|| corrupt("count"))?;
        Ok(Trailer { count, entry_checksums, offsets_at, offsets_end })
    }

    /// The trailer checksum `bytes` should hold (of the offsets and the count word), and where it lies.
    fn checksum(&self, bytes: &[u8]) -> (u32, std::ops::Range<usize>) {
        let count_word = &bytes[bytes.len() - 8..bytes.len() - 4];
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[self.offsets_at..self.offsets_end]), count_word);
        (crc, self.offsets_end..self.offsets_end + CRC_BYTES)
    }

    fn block<'a>(&self, bytes: &'a [u8]) -> Block<'a> {
        Block {
            entries: &bytes[..self.offsets_at],
            offsets: &bytes[self.offsets_at..self.offsets_end],
            entry_checksums: self.entry_checksums,
        }
    }
}

impl<'a> Block<'a> {
    /// Checks the checksum of the whole block and its layout; corruption is a storage error (the node stops).
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Block<'a>, StateMachineError> {
        if bytes.len() < 8 {
            return Err(corrupt("shorter than its trailer"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let trailer = Trailer::read(bytes)?;
        let block = trailer.block(bytes);
        for i in 0..trailer.count {
            block.entry_span(i)?;
        }
        Ok(block)
    }

    /// A block that [`Block::parse`] has already verified (no checks: cursors re-view their current block).
    pub(crate) fn view(bytes: &'a [u8]) -> Block<'a> {
        Trailer::read(bytes).expect("a block parse verified").block(bytes)
    }

    /// `Some(value)` if the block holds `key` (`Some(None)`: deleted there), `None` if not — checking every byte
    /// the answer rests on, no more (see the module's doc); damage is a storage error.
    pub(crate) fn lookup(bytes: &'a [u8], key: &[u8]) -> Result<Option<Option<&'a [u8]>>, StateMachineError> {
        let trailer = Trailer::read(bytes)?;
        if !trailer.entry_checksums {
            return Ok(Block::parse(bytes)?.get(key));
        }
        let (crc, stored) = trailer.checksum(bytes);
        if crc.to_le_bytes() != bytes[stored] {
            return Err(corrupt("trailer checksum mismatch"));
        }
        let block = trailer.block(bytes);
        let checked_key = |i: usize| -> Result<&'a [u8], StateMachineError> {
            let span = block.entry_span(i)?;
            let (entry, stored) = block.entries[span.clone()].split_at(span.len() - CRC_BYTES);
            if crc32c::crc32c(entry).to_le_bytes() != stored {
                return Err(corrupt("entry checksum mismatch"));
            }
            Ok(block.key(i))
        };
        let (mut low, mut high) = (0, block.len());
        while low < high {
            let middle = (low + high) / 2;
            if checked_key(middle)? < key {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        Ok((low < block.len() && checked_key(low)? == key).then(|| block.entry(low).1))
    }

    /// Rewrites every checksum of `bytes` — each entry's that lies within the block, the trailer's, the block's —
    /// to match its bytes, as far as they parse: what a bug or a crafted file could hand the code behind the
    /// checks (the decoders' fuzzing, `decoders.rs`).
    pub(crate) fn make_checksums_valid(bytes: &mut [u8]) {
        let Ok(trailer) = Trailer::read(bytes) else { return };
        if trailer.entry_checksums {
            let spans: Vec<_> = {
                let block = trailer.block(bytes);
                (0..trailer.count).filter_map(|i| block.entry_span(i).ok()).collect()
            };
            for span in spans {
                let crc = crc32c::crc32c(&bytes[span.start..span.end - CRC_BYTES]);
                bytes[span.end - CRC_BYTES..span.end].copy_from_slice(&crc.to_le_bytes());
            }
            let (crc, stored) = trailer.checksum(bytes);
            bytes[stored].copy_from_slice(&crc.to_le_bytes());
        }
        let body = bytes.len() - CRC_BYTES;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Where entry `i` lies in `entries` (its checksum included), checked to lie within them.
    fn entry_span(&self, i: usize) -> Result<std::ops::Range<usize>, StateMachineError> {
        let at = read_u32(self.offsets, 4 * i) as usize;
        if at.checked_add(ENTRY_HEADER_BYTES).is_none_or(|end| end > self.entries.len()) {
            return Err(corrupt("offset"));
        }
        let key_len = read_u32(self.entries, at) as usize;
        let value_len = read_u32(self.entries, at + 4);
        let value_len = if value_len == DELETION { 0 } else { value_len as usize };
        let checksum = if self.entry_checksums { CRC_BYTES } else { 0 };
        let end = (at + ENTRY_HEADER_BYTES + checksum).checked_add(key_len).and_then(|n| n.checked_add(value_len));
        match end {
            Some(end) if end <= self.entries.len() => Ok(at..end),
            _ => Err(corrupt("entry length")),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.offsets.len() / 4
    }

    /// The `i`th entry: its key and value (`None`: a deletion).
    pub(crate) fn entry(&self, i: usize) -> (&'a [u8], Option<&'a [u8]>) {
        let at = read_u32(self.offsets, 4 * i) as usize;
        let key_len = read_u32(self.entries, at) as usize;
        let value_len = read_u32(self.entries, at + 4);
        let key_at = at + ENTRY_HEADER_BYTES;
        let key = &self.entries[key_at..key_at + key_len];
        let value =
            (value_len != DELETION).then(|| &self.entries[key_at + key_len..key_at + key_len + value_len as usize]);
        (key, value)
    }

    pub(crate) fn key(&self, i: usize) -> &'a [u8] {
        self.entry(i).0
    }

    /// The position of the first entry whose key is `>= key` (`len()` if none).
    pub(crate) fn seek(&self, key: &[u8]) -> usize {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let middle = (low + high) / 2;
            if self.key(middle) < key {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        low
    }

    /// `Some(value)` if the block holds `key` (`Some(None)`: deleted here), `None` if it does not.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Option<&'a [u8]>> {
        let at = self.seek(key);
        (at < self.len() && self.key(at) == key).then(|| self.entry(at).1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Entries = Vec<(Vec<u8>, Option<Vec<u8>>)>;

    /// Twenty entries of varied sizes, every third a deletion, with the keys a lookup may be asked for.
    fn sample() -> (Vec<u8>, Entries) {
        let mut builder = BlockBuilder::default();
        let mut entries = Vec::new();
        for i in 0..20u8 {
            let key = format!("key-{:02}", 2 * i).into_bytes();
            let value = (i % 3 != 0).then(|| vec![i; i as usize * 3]);
            builder.add(&key, value.as_deref());
            entries.push((key, value));
        }
        (builder.finish().1, entries)
    }

    /// The keys to look up: every stored key, and keys between, before and after them.
    fn probes(entries: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<Vec<u8>> {
        let mut probes: Vec<Vec<u8>> = entries.iter().map(|(key, _)| key.clone()).collect();
        probes.extend((0..=40).step_by(2).map(|i| format!("key-{:02}", i + 1).into_bytes()));
        probes.extend([b"".to_vec(), b"a".to_vec(), b"z".to_vec()]);
        probes
    }

    fn expected<'a>(entries: &'a [(Vec<u8>, Option<Vec<u8>>)], key: &[u8]) -> Option<Option<&'a [u8]>> {
        entries.iter().find(|(k, _)| k == key).map(|(_, value)| value.as_deref())
    }

    #[test]
    fn entries_round_trip_and_lookups_find_exactly_what_was_added() {
        let mut builder = BlockBuilder::default();
        builder.add(b"a", Some(b"1"));
        builder.add(b"c", None);
        builder.add(b"e", Some(b""));
        let expected_len = builder.len_bytes();
        let (last, bytes) = builder.finish();
        assert_eq!((last.as_slice(), bytes.len()), (&b"e"[..], expected_len));
        assert!(builder.is_empty());
        let block = Block::parse(&bytes).unwrap();
        assert_eq!(block.len(), 3);
        assert_eq!(block.get(b"a"), Some(Some(&b"1"[..])));
        assert_eq!(block.get(b"c"), Some(None));
        assert_eq!(block.get(b"e"), Some(Some(&b""[..])));
        assert_eq!((block.get(b"b"), block.get(b"0"), block.get(b"f")), (None, None, None));
        assert_eq!((block.seek(b""), block.seek(b"b"), block.seek(b"e"), block.seek(b"z")), (0, 1, 2, 3));
        let (bytes, entries) = sample();
        let block = Block::parse(&bytes).unwrap();
        for probe in probes(&entries) {
            assert_eq!(Block::lookup(&bytes, &probe).unwrap(), expected(&entries, &probe), "{probe:?}");
            assert_eq!(block.get(&probe), expected(&entries, &probe), "{probe:?}");
        }
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let (bytes, _) = sample();
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(Block::parse(&damaged).is_err(), "bit {bit}");
        }
        assert!(Block::parse(&bytes[..5]).is_err());
        assert!(Block::lookup(&bytes[..5], b"key").is_err());
    }

    /// A point read checks less than the whole block, yet never answers wrongly from a damaged one: whatever bit
    /// is flipped, each lookup either reports damage or gives the right answer — and damage to the entry it
    /// finds, or to the offsets and count, is always reported.
    #[test]
    fn a_lookup_in_a_damaged_block_reports_the_damage_or_answers_right() {
        let (bytes, entries) = sample();
        let block = Block::parse(&bytes).unwrap();
        let trailer = Trailer::read(&bytes).unwrap();
        let mut caught = 0;
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            for probe in probes(&entries) {
                match Block::lookup(&damaged, &probe) {
                    Err(_) => caught += 1,
                    Ok(found) => assert_eq!(found, expected(&entries, &probe), "bit {bit}, key {probe:?}"),
                }
            }
            let byte = bit / 8;
            let in_trailer = byte >= trailer.offsets_at && byte < bytes.len() - CRC_BYTES;
            for (i, (key, _)) in entries.iter().enumerate() {
                if in_trailer || block.entry_span(i).unwrap().contains(&byte) {
                    assert!(Block::lookup(&damaged, key).is_err(), "bit {bit} in what the lookup of {key:?} read");
                }
            }
        }
        assert!(caught > 0);
    }

    /// Blocks written before entry checksums: `entry* | offsets | count | crc32c`, entries without checksums.
    #[test]
    fn blocks_without_entry_checksums_are_still_read_and_checked_whole() {
        let (_, entries) = sample();
        let mut bytes = Vec::new();
        let mut offsets = Vec::new();
        for (key, value) in &entries {
            offsets.push(bytes.len() as u32);
            bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&value.as_ref().map_or(DELETION, |v| v.len() as u32).to_le_bytes());
            bytes.extend_from_slice(key);
            bytes.extend_from_slice(value.as_deref().unwrap_or_default());
        }
        for offset in &offsets {
            bytes.extend_from_slice(&offset.to_le_bytes());
        }
        bytes.extend_from_slice(&(offsets.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let block = Block::parse(&bytes).unwrap();
        assert_eq!(block.len(), entries.len());
        for (i, (key, value)) in entries.iter().enumerate() {
            assert_eq!(Block::view(&bytes).entry(i), (key.as_slice(), value.as_deref()));
        }
        for probe in probes(&entries) {
            assert_eq!(Block::lookup(&bytes, &probe).unwrap(), expected(&entries, &probe), "{probe:?}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(Block::parse(&damaged).is_err(), "bit {bit}");
            assert!(Block::lookup(&damaged, &entries[0].0).is_err(), "bit {bit}");
        }
    }
}
