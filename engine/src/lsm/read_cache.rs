//! The answers of recent point reads in the runs, so that a key read again costs a hash lookup instead of a Bloom
//! filter per run, a redb B-tree descent and a block search with its checksums (RocksDB calls this a row cache).
//!
//! Why it is always right: what the runs answer for a key depends only on which data they hold. Every answer is
//! stored with the **contents generation** of the version it was read from (`version.rs`), and only a read of a
//! version with the same generation may use it. A flush and a snapshot install give the runs new data and a new
//! generation (the older answers stay until their keys are cached again or they are evicted: emptying the cache
//! at once would hold up its readers while it frees them); a compaction rewrites runs without changing
//! what they answer and keeps the generation, so a compaction does not cool the cache. A reader that read an older
//! version and stores its answer after the change stores it under the older generation, where no newer read finds
//! it. Memtables are consulted before the runs and never cached: a key written since the last flush is answered
//! there.
//!
//! Bounded by the bytes of its keys and values plus a fixed overhead per entry
//! (`StateMachineOptions::read_cache_bytes`; 0 turns it off). Eviction is `quick_cache`'s (CLOCK-Pro-like: a key
//! read once does not push out keys read often). **Admission on the second miss**: an answer is cached only when
//! its key missed the cache recently before (a direct-mapped table of key fingerprints, TinyLFU's "doorkeeper").
//! Point reads spread uniformly over far more data than the cache holds would otherwise pay an insert and an
//! eviction on nearly every read and gain almost no hits (measured: −20 % point reads over 3 M keys with a 64 MiB
//! cache); with it they pay a fingerprint check, while a key read again soon is cached on its second read.

use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use quick_cache::sync::Cache;
use quick_cache::Weighter;

use super::merge::MemKey;

/// What one entry costs besides its key and value: the map's slot, the entry's header (with up to 24 bytes of key),
/// the value's allocation and the allocator's slack — measured: a cache filled to 64 MiB by this weight (267 K
/// entries of 15-byte keys and 100-byte values) grew the process by 64 MiB, fingerprint table included (96 here
/// gave 76 MiB).
const ENTRY_OVERHEAD_BYTES: u64 = 136;

#[derive(Clone)]
struct Answer {
    generation: u64,
    /// `None`: no run holds the key (or a deletion or range deletion hides it).
    value: Option<Vec<u8>>,
}

#[derive(Clone)]
struct AnswerWeight;

impl Weighter<MemKey, Answer> for AnswerWeight {
    fn weight(&self, key: &MemKey, answer: &Answer) -> u64 {
        key.len() as u64 + answer.value.as_ref().map_or(0, |v| v.len() as u64) + ENTRY_OVERHEAD_BYTES
    }
}

/// See the module doc.
pub(crate) struct ReadCache {
    /// `None`: turned off. Keyed as the memtable is: a key of up to 24 bytes is stored in the entry itself (one
    /// cache miss less per lookup than a key of its own allocation).
    answers: Option<Cache<MemKey, Answer, AnswerWeight>>,
    /// The fingerprints of keys that missed recently, one slot per hash (a power of two of them, about one per
    /// entry the cache can hold); allocated at the first miss, so that an idle state machine does not pay for it.
    missed: OnceLock<Box<[AtomicU32]>>,
    missed_slots: usize,
}

impl ReadCache {
    /// A cache of at most `bytes_max` bytes (0: none).
    pub(crate) fn new(bytes_max: u64) -> ReadCache {
        let estimated_entries = (bytes_max / (ENTRY_OVERHEAD_BYTES + 128)).max(1) as usize;
        let answers = (bytes_max > 0).then(|| Cache::with_weighter(estimated_entries, bytes_max, AnswerWeight));
        ReadCache { answers, missed: OnceLock::new(), missed_slots: estimated_entries.next_power_of_two() }
    }

    /// The runs' answer for `key` as read from a version of contents `generation`, if it is cached.
    pub(crate) fn get(&self, generation: u64, key: &[u8]) -> Option<Option<Vec<u8>>> {
        let answer = self.answers.as_ref()?.get(key)?;
        (answer.generation == generation).then_some(answer.value)
    }

    /// The runs' answer for `key`, read from a version of contents `generation` after a miss: cached if `key`
    /// missed recently before (see the module doc).
    pub(crate) fn missed(&self, generation: u64, key: &[u8], value: &Option<Vec<u8>>) {
        let Some(answers) = &self.answers else { return };
        let hash = rustc_hash::FxBuildHasher.hash_one(key);
        let fingerprint = (hash >> 32) as u32 | 1;
        let missed = self.missed.get_or_init(|| (0..self.missed_slots).map(|_| AtomicU32::new(0)).collect());
        let slot = &missed[hash as usize & (self.missed_slots - 1)];
        if slot.load(Ordering::Relaxed) == fingerprint {
            slot.store(0, Ordering::Relaxed);
            answers.insert(MemKey::from_slice(key), Answer { generation, value: value.clone() });
        } else {
            slot.store(fingerprint, Ordering::Relaxed);
        }
    }

    /// Bytes the cached answers take (by the weight above).
    pub(crate) fn bytes(&self) -> u64 {
        self.answers.as_ref().map_or(0, |answers| answers.weight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_serves_only_reads_of_its_generation() {
        let cache = ReadCache::new(1 << 20);
        for _ in 0..2 {
            cache.missed(3, b"k", &Some(b"v".to_vec()));
            cache.missed(3, b"gone", &None);
        }
        assert_eq!(cache.get(3, b"k"), Some(Some(b"v".to_vec())));
        assert_eq!(cache.get(3, b"gone"), Some(None), "an absence is an answer too");
        assert_eq!(cache.get(4, b"k"), None, "a newer generation's read must read the runs");
        assert_eq!(cache.get(3, b"other"), None);
        // A newer generation's answer replaces the stale one.
        cache.missed(4, b"k", &Some(b"v4".to_vec()));
        cache.missed(4, b"k", &Some(b"v4".to_vec()));
        assert_eq!(cache.get(4, b"k"), Some(Some(b"v4".to_vec())));
        assert_eq!(cache.get(3, b"k"), None);
    }

    #[test]
    fn an_answer_is_cached_at_its_keys_second_miss() {
        let cache = ReadCache::new(1 << 20);
        cache.missed(1, b"k", &None);
        assert_eq!(cache.get(1, b"k"), None, "one miss is not enough");
        cache.missed(1, b"k", &None);
        assert_eq!(cache.get(1, b"k"), Some(None));
        assert_eq!(cache.bytes(), 1 + ENTRY_OVERHEAD_BYTES);
    }

    #[test]
    fn it_stays_within_its_bytes_and_zero_turns_it_off() {
        let cache = ReadCache::new(64 << 10);
        for i in 0..20_000u32 {
            let key = (i / 2).to_be_bytes();
            cache.missed(1, &key, &Some(vec![0; 100]));
        }
        assert!(cache.bytes() <= 64 << 10, "{} bytes cached", cache.bytes());
        assert!(cache.bytes() > 32 << 10, "{} bytes cached", cache.bytes());
        let off = ReadCache::new(0);
        off.missed(1, b"k", &None);
        off.missed(1, b"k", &None);
        assert_eq!(off.get(1, b"k"), None);
        assert_eq!(off.bytes(), 0);
    }
}
