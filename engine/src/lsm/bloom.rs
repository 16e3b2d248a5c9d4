//! A Bloom filter per run, so a point read skips the runs that cannot hold its key (about 1 % false positives at
//! 10 bits per key). Hashes are CRC-32C based and fixed: filters are stored on disk and must mean the same after an
//! upgrade.
//!
//! Encoding: `hash_count: u8 | bits`.

const BITS_PER_KEY: usize = 10;
const HASH_COUNT: u8 = 7;

#[derive(Clone, Debug, Default)]
pub(crate) struct Bloom {
    hash_count: u8,
    /// Empty: the filter says "maybe" for every key.
    bits: Vec<u8>,
}

/// The bits a key sets (double hashing over two CRC-32C values).
fn probes(key: &[u8], bit_count: u64, hash_count: u8) -> impl Iterator<Item = (usize, u8)> {
    let first = crc32c::crc32c(key) as u64;
    let second = (crc32c::crc32c_append(0x9E37_79B9, key).rotate_left(15) | 1) as u64;
    (0..hash_count as u64).map(move |i| {
        let bit = first.wrapping_add(i.wrapping_mul(second)) % bit_count;
        ((bit / 8) as usize, 1u8 << (bit % 8))
    })
}

/// Builds a filter sized for an expected number of keys (more keys only raise the false-positive rate).
pub(crate) struct BloomBuilder {
    bits: Vec<u8>,
}

impl BloomBuilder {
    pub(crate) fn new(expected_keys: usize) -> BloomBuilder {
        BloomBuilder { bits: vec![0u8; (expected_keys * BITS_PER_KEY).div_ceil(8).max(8)] }
    }

    pub(crate) fn add(&mut self, key: &[u8]) {
        for (byte, mask) in probes(key, (self.bits.len() * 8) as u64, HASH_COUNT) {
            self.bits[byte] |= mask;
        }
    }

    pub(crate) fn finish(self) -> Bloom {
        Bloom { hash_count: HASH_COUNT, bits: self.bits }
    }
}

impl Bloom {
    /// False only if the key was certainly not among those the filter was built over.
    pub(crate) fn may_contain(&self, key: &[u8]) -> bool {
        if self.bits.is_empty() {
            return true;
        }
        probes(key, (self.bits.len() * 8) as u64, self.hash_count).all(|(byte, mask)| self.bits[byte] & mask != 0)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.bits.len());
        out.push(self.hash_count);
        out.extend_from_slice(&self.bits);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Bloom {
        match bytes.split_first() {
            Some((&hash_count, bits)) if !bits.is_empty() => Bloom { hash_count, bits: bits.to_vec() },
            _ => Bloom::default(),
        }
    }

    pub(crate) fn len_bytes(&self) -> usize {
        self.bits.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let keys: Vec<Vec<u8>> = (0..10_000u32).map(|i| format!("key-{i}").into_bytes()).collect();
        let mut builder = BloomBuilder::new(keys.len());
        keys.iter().for_each(|k| builder.add(k));
        let filter = Bloom::decode(&builder.finish().encode());
        assert!(keys.iter().all(|k| filter.may_contain(k)));
        let false_positives = (0..10_000u32).filter(|i| filter.may_contain(format!("other-{i}").as_bytes())).count();
        assert!(false_positives < 300, "{false_positives} of 10000 (expected about 1 %)");
        assert!(Bloom::default().may_contain(b"anything"), "an empty filter rules nothing out");
    }
}
