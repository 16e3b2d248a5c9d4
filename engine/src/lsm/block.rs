//! A block: a few KiB of sorted entries (a put or a deletion of a key), checksummed, searchable in place.
//!
//! ```text
//! entry*  | offset: u32 LE * count | count: u32 LE | crc32c(everything before): u32 LE
//! entry   = key_len: u32 LE | value_len: u32 LE (u32::MAX: a deletion) | key | value
//! ```
//!
//! Blocks are the unit stored in redb: one redb insert per block instead of per key is what makes a flush cheap.

use crate::state_machine::error::StateMachineError;

const DELETION: u32 = u32::MAX;
const ENTRY_HEADER_BYTES: usize = 8;

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
        self.offsets.push(self.bytes.len() as u32);
        self.bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        let value_len = value.map_or(DELETION, |v| v.len() as u32);
        self.bytes.extend_from_slice(&value_len.to_le_bytes());
        self.bytes.extend_from_slice(key);
        if let Some(value) = value {
            self.bytes.extend_from_slice(value);
        }
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
    }

    /// Bytes the finished block would take.
    pub(crate) fn len_bytes(&self) -> usize {
        self.bytes.len() + 4 * self.offsets.len() + 8
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The block's last key and its encoding; the builder is empty afterwards.
    pub(crate) fn finish(&mut self) -> (Vec<u8>, Vec<u8>) {
        let mut block = std::mem::take(&mut self.bytes);
        block.reserve(4 * self.offsets.len() + 8);
        for offset in &self.offsets {
            block.extend_from_slice(&offset.to_le_bytes());
        }
        block.extend_from_slice(&(self.offsets.len() as u32).to_le_bytes());
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

impl<'a> Block<'a> {
    /// Checks the checksum and the layout; corruption is a storage error (the node stops).
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Block<'a>, StateMachineError> {
        if bytes.len() < 8 {
            return Err(corrupt("shorter than its trailer"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let count = read_u32(body, body.len() - 4) as usize;
        let offsets_at =
            body.len() - 4 - count.checked_mul(4).filter(|n| *n <= body.len() - 4).ok_or_else(|| corrupt("count"))?;
        let block = Block { entries: &body[..offsets_at], offsets: &body[offsets_at..body.len() - 4] };
        for i in 0..count {
            let at = read_u32(block.offsets, 4 * i) as usize;
            if at + ENTRY_HEADER_BYTES > block.entries.len() {
                return Err(corrupt("offset"));
            }
            let key_len = read_u32(block.entries, at) as usize;
            let value_len = read_u32(block.entries, at + 4);
            let value_len = if value_len == DELETION { 0 } else { value_len as usize };
            if at + ENTRY_HEADER_BYTES + key_len + value_len > block.entries.len() {
                return Err(corrupt("entry length"));
            }
        }
        Ok(block)
    }

    /// A block that [`Block::parse`] has already verified (no checks: cursors re-view their current block).
    pub(crate) fn view(bytes: &'a [u8]) -> Block<'a> {
        let body = &bytes[..bytes.len() - 4];
        let count = read_u32(body, body.len() - 4) as usize;
        let offsets_at = body.len() - 4 - 4 * count;
        Block { entries: &body[..offsets_at], offsets: &body[offsets_at..body.len() - 4] }
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
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let mut builder = BlockBuilder::default();
        builder.add(b"key", Some(b"value"));
        let (_, bytes) = builder.finish();
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(Block::parse(&damaged).is_err(), "bit {bit}");
        }
        assert!(Block::parse(&bytes[..5]).is_err());
    }
}
