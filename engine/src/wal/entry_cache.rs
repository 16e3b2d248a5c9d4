//! Recent entries of every group, kept in memory under one byte budget so that leaders replicating and
//! followers catching up rarely read segments. Each group caches a contiguous tail of its log; when the budget
//! is exceeded the oldest-written entries are evicted first, whichever group they belong to.
//!
//! Consistency: the cache is only filled with durable entries (after the write's sync) and follows every change
//! of the log — a conflicting append or a truncation drops the replaced suffix, a compaction or snapshot the
//! prefix — so a cached entry is always the one the segments hold.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use flotilla_raft::Entry;

#[derive(Default)]
struct GroupCache {
    /// A contiguous run of the group's entries.
    entries: VecDeque<Entry>,
}

impl GroupCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    /// Drops the entries at and after `index`; returns how many and their bytes.
    fn drop_from(&mut self, index: u64) -> (usize, u64) {
        let (mut count, mut bytes) = (0, 0);
        while self.entries.back().is_some_and(|e| e.index >= index) {
            bytes += self.entries.pop_back().expect("checked").size_bytes();
            count += 1;
        }
        (count, bytes)
    }
}

pub struct EntryCache {
    groups: FxHashMap<u64, GroupCache>,
    /// Insertion order, for eviction: (group, index). Stale pairs (already dropped) are skipped.
    order: VecDeque<(u64, u64)>,
    /// Entries cached over all groups (to tell when `order` holds too many stale pairs without counting).
    entries: usize,
    bytes: u64,
    bytes_max: u64,
}

impl EntryCache {
    pub fn new(bytes_max: u64) -> EntryCache {
        EntryCache { groups: FxHashMap::default(), order: VecDeque::new(), entries: 0, bytes: 0, bytes_max }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Durable entries appended to a group's log (replacing any suffix from the first one on).
    pub fn append(&mut self, group_id: u64, entries: Vec<Entry>) {
        if self.bytes_max == 0 {
            return;
        }
        let Some(first) = entries.first() else { return };
        // One lookup of the group (this runs for every group of every WAL write).
        let cache = self.groups.entry(group_id).or_default();
        let (count, bytes) = cache.drop_from(first.index);
        self.entries -= count;
        self.bytes -= bytes;
        let contiguous = cache.entries.back().is_none_or(|last| last.index + 1 == first.index);
        if !contiguous {
            // The cached run no longer adjoins the log's tail: start a new run here.
            self.entries -= cache.entries.len();
            let dropped: u64 = cache.entries.drain(..).map(|e| e.size_bytes()).sum();
            self.bytes -= dropped;
        }
        for entry in entries {
            self.bytes += entry.size_bytes();
            self.entries += 1;
            self.order.push_back((group_id, entry.index));
            cache.entries.push_back(entry);
        }
        self.evict();
    }

    /// Drops cached entries at and after `index`.
    pub fn truncate_from(&mut self, group_id: u64, index: u64) {
        let Some(cache) = self.groups.get_mut(&group_id) else { return };
        let (count, bytes) = cache.drop_from(index);
        self.entries -= count;
        self.bytes -= bytes;
    }

    /// Drops cached entries before `index`.
    pub fn compact_to(&mut self, group_id: u64, index: u64) {
        let Some(cache) = self.groups.get_mut(&group_id) else { return };
        while cache.entries.front().is_some_and(|e| e.index < index) {
            let entry = cache.entries.pop_front().expect("checked");
            self.bytes -= entry.size_bytes();
            self.entries -= 1;
        }
    }

    pub fn clear_group(&mut self, group_id: u64) {
        if let Some(cache) = self.groups.remove(&group_id) {
            self.entries -= cache.entries.len();
            self.bytes -= cache.entries.iter().map(Entry::size_bytes).sum::<u64>();
        }
    }

    /// Entries `[low, high)` if all of them are cached, cut after `max_bytes` (at least one).
    pub fn get(&self, group_id: u64, low: u64, high: u64, max_bytes: u64) -> Option<Vec<Entry>> {
        let cache = self.groups.get(&group_id)?;
        let first = cache.first_index()?;
        let last = cache.entries.back()?.index;
        if low < first || high > last + 1 || low >= high {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in cache.entries.range((low - first) as usize..(high - first) as usize) {
            bytes += entry.size_bytes();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Some(out)
    }

    fn evict(&mut self) {
        while self.bytes > self.bytes_max {
            let Some((group_id, index)) = self.order.pop_front() else { break };
            let Some(cache) = self.groups.get_mut(&group_id) else { continue };
            // Only the group's oldest cached entry can be evicted (the run stays contiguous); a stale pair whose
            // entry is already gone or was replaced is skipped.
            if cache.first_index() == Some(index) {
                let entry = cache.entries.pop_front().expect("checked");
                self.bytes -= entry.size_bytes();
                self.entries -= 1;
            }
        }
        debug_assert_eq!(self.entries, self.groups.values().map(|c| c.entries.len()).sum::<usize>());
        if self.order.len() > 4 * (self.entries + 1024) {
            // Too many stale pairs: rebuild the order from what is cached (oldest index first per group).
            let mut rebuilt: Vec<(u64, u64)> =
                self.groups.iter().flat_map(|(g, c)| c.entries.iter().map(move |e| (*g, e.index))).collect();
            rebuilt.sort_by_key(|&(_, index)| index);
            self.order = rebuilt.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|index| Entry { index, term, data: Bytes::from(vec![0; 76]), ..Default::default() }).collect()
    }

    #[test]
    fn follows_appends_conflicts_truncations_and_compactions() {
        let mut cache = EntryCache::new(1 << 20);
        cache.append(1, entries(1..=10, 1));
        assert_eq!(cache.get(1, 3, 6, u64::MAX).unwrap(), entries(3..=5, 1));
        cache.append(1, entries(8..=12, 2));
        assert_eq!(cache.get(1, 7, 10, u64::MAX).unwrap(), [entries(7..=7, 1), entries(8..=9, 2)].concat());
        cache.truncate_from(1, 11);
        assert!(cache.get(1, 10, 12, u64::MAX).is_none(), "11 is gone");
        cache.compact_to(1, 5);
        assert!(cache.get(1, 4, 6, u64::MAX).is_none());
        assert_eq!(cache.get(1, 5, 11, 1).unwrap().len(), 1, "byte budget, at least one");
        cache.clear_group(1);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn the_byte_budget_evicts_the_oldest_written_first() {
        let mut cache = EntryCache::new(10 * 100);
        cache.append(1, entries(1..=6, 1));
        cache.append(2, entries(1..=6, 1));
        assert!(cache.bytes() <= 1000);
        assert!(cache.get(1, 1, 3, u64::MAX).is_none(), "group 1's oldest were evicted first");
        assert!(cache.get(2, 1, 7, u64::MAX).is_some(), "the newest run is whole");
    }
}
