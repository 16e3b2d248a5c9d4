//! A memtable's key: up to 24 bytes kept inline (no allocation of its own, most keys are short), ordered exactly
//! as its bytes are — but compared eight bytes at a time, as big-endian words, rather than through `memcmp`:
//! the memtable B-tree's search compares a key at every step, and was the largest single cost of a write's apply
//! (a stand-alone insert of 100 K keys of 16 bytes: about 13 % faster). Lookups by `&[u8]` (`Borrow`) compare as
//! slices do, which orders the same.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::ops::Deref;

use smallvec::SmallVec;

#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct MemKey(SmallVec<[u8; 24]>);

impl MemKey {
    pub(crate) fn from_slice(key: &[u8]) -> MemKey {
        MemKey(SmallVec::from_slice(key))
    }

    pub(crate) fn from_vec(key: Vec<u8>) -> MemKey {
        MemKey(SmallVec::from_vec(key))
    }
}

impl Deref for MemKey {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Borrow<[u8]> for MemKey {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for MemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0.as_slice())
    }
}

impl Ord for MemKey {
    fn cmp(&self, other: &MemKey) -> Ordering {
        compare(&self.0, &other.0)
    }
}

impl PartialOrd for MemKey {
    fn partial_cmp(&self, other: &MemKey) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// `a.cmp(b)` as byte slices: eight bytes at a time while both have them, then byte by byte, then by length.
#[inline]
fn compare(a: &[u8], b: &[u8]) -> Ordering {
    let common = a.len().min(b.len());
    let mut at = 0;
    while at + 8 <= common {
        let x = u64::from_be_bytes(a[at..at + 8].try_into().expect("eight bytes"));
        let y = u64::from_be_bytes(b[at..at + 8].try_into().expect("eight bytes"));
        if x != y {
            return x.cmp(&y);
        }
        at += 8;
    }
    while at < common {
        if a[at] != b[at] {
            return a[at].cmp(&b[at]);
        }
        at += 1;
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_exactly_as_their_bytes() {
        // Keys of 0..40 bytes over a small alphabet (many shared prefixes, equal words, prefixes of each other).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let keys: Vec<Vec<u8>> = (0..2000)
            .map(|_| {
                let length = (next() % 40) as usize;
                (0..length).map(|_| [0u8, 1, 0x7f, 0x80, 0xff][(next() % 5) as usize]).collect()
            })
            .collect();
        for a in &keys {
            for b in keys.iter().take(200) {
                let (x, y) = (MemKey::from_slice(a), MemKey::from_slice(b));
                assert_eq!(x.cmp(&y), a.as_slice().cmp(b.as_slice()), "{a:?} against {b:?}");
                assert_eq!(x == y, a == b);
            }
        }
    }
}
