//! Where a range should split by size (issue 14's size trigger): a scan of the range's data in the state
//! machine, in pages, adding up the bytes of its keys and values, and the key where the first half of them ends.
//!
//! The scan stops after `2 × bytes_max` (a range far over the bound — load outran the checks — is split where
//! that much ends, near `bytes_max`, and the rest is checked again after the split), so one check costs at most
//! about twice the bound in reads. Which ranges to check, and how often, is the caller's (a range whose writes
//! since its last check add up to a fraction of the bound, as TiKV's split checker does).

use flotilla_engine::contract::{KvEngine, StateMachineError};

use crate::range::RangeDescriptor;

/// What a size check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeCheck {
    /// Bytes of keys and values counted (the whole range's, unless the scan stopped at `2 × bytes_max`).
    pub bytes: u64,
    pub keys: u64,
    /// Over `bytes_max`: the key where the first half of the bytes seen ends (it starts the right part). `None`
    /// under the bound, or when no key past the range's start can split it (one key holds most of the bytes).
    pub split_key: Option<Vec<u8>>,
}

/// Scans `range`'s data `page_keys` pairs at a time (see the module's doc).
pub fn check_size(
    kv: &dyn KvEngine,
    range: &RangeDescriptor,
    bytes_max: u64,
    page_keys: usize,
) -> Result<SizeCheck, StateMachineError> {
    let cap = bytes_max.saturating_mul(2);
    // Keys where the running total crossed each sixteenth of the bound, with the total before them: the middle
    // of what was seen is found among these once the total is known (no second scan).
    let step = (bytes_max / 16).max(1);
    let mut marks: Vec<(u64, Vec<u8>)> = Vec::new();
    let (mut bytes, mut keys) = (0u64, 0u64);
    let mut start = range.start.clone();
    'scan: loop {
        let page = kv.scan(&start, &range.end, page_keys.max(1))?;
        let full = page.len() >= page_keys.max(1);
        for (key, value) in &page {
            if bytes >= cap {
                // Where the scan stops is a split key too (one key past the start may hold most of the bytes).
                marks.push((bytes, key.clone()));
                break 'scan;
            }
            if marks.last().is_none_or(|(at, _)| bytes >= at + step) {
                marks.push((bytes, key.clone()));
            }
            bytes += (key.len() + value.len()) as u64;
            keys += 1;
        }
        match page.last() {
            Some((last, _)) if full => start = [last.as_slice(), &[0]].concat(),
            _ => break,
        }
    }
    let split_key = (bytes > bytes_max)
        .then(|| {
            // The first mark at or past the middle: the keys before it hold about half the bytes.
            let middle = bytes / 2;
            marks.into_iter().find(|(before, _)| *before >= middle).map(|(_, key)| key)
        })
        .flatten()
        .filter(|key| key.as_slice() > range.start.as_slice());
    Ok(SizeCheck { bytes, keys, split_key })
}

#[cfg(test)]
mod tests {
    use flotilla_engine::contract::{GroupApply, KvOp};
    use flotilla_engine::kv_engine::MemKvEngine;

    use super::*;

    fn engine_with(pairs: &[(String, usize)]) -> MemKvEngine {
        let kv = MemKvEngine::new(u64::MAX);
        let ops = pairs.iter().map(|(key, len)| KvOp::Put { key: key.as_bytes().to_vec(), value: vec![b'v'; *len] });
        kv.apply(vec![GroupApply { group_id: 1, ops: ops.collect(), applied_index: 6, applied_term: 5, range: None }])
            .unwrap();
        kv
    }

    fn range(start: &str, end: &str) -> RangeDescriptor {
        RangeDescriptor { group_id: 1, start: start.into(), end: end.into(), ..Default::default() }
    }

    #[test]
    fn a_range_over_the_bound_splits_near_the_middle_of_its_bytes() {
        // 1,000 keys of 100 B values, plus keys outside the range that must not count.
        let mut pairs: Vec<(String, usize)> = (0..1000).map(|i| (format!("k{i:04}"), 100)).collect();
        pairs.push(("a-outside".into(), 5000));
        pairs.push(("z-outside".into(), 5000));
        let kv = engine_with(&pairs);
        let whole = range("k", "l");
        let check = check_size(&kv, &whole, 60_000, 64).unwrap();
        assert_eq!((check.bytes, check.keys), (105_000, 1000));
        let key = check.split_key.expect("over the bound");
        let left = kv.scan(b"k", &key, usize::MAX).unwrap();
        let left_bytes: usize = left.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!((50_000..=57_000).contains(&left_bytes), "the left part holds about half: {left_bytes} B");
        // Under the bound: no split, whatever the page size.
        for page in [1, 7, 1000, 5000] {
            let under = check_size(&kv, &whole, 200_000, page).unwrap();
            assert_eq!((under.bytes, under.split_key), (105_000, None), "page of {page}");
        }
    }

    #[test]
    fn a_range_far_over_the_bound_is_cut_near_the_bound_after_reading_twice_it() {
        let pairs: Vec<(String, usize)> = (0..1000).map(|i| (format!("k{i:04}"), 100)).collect();
        let kv = engine_with(&pairs);
        let check = check_size(&kv, &range("", ""), 10_000, 50).unwrap();
        assert!(check.bytes < 21_000 && check.keys < 200, "stopped at twice the bound: {check:?}");
        let key = check.split_key.expect("over the bound");
        let left_bytes: usize = kv.scan(b"", &key, usize::MAX).unwrap().iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!((9_000..=12_000).contains(&left_bytes), "cut near the bound: {left_bytes} B");
    }

    #[test]
    fn one_big_key_stays_left_and_a_range_of_that_key_alone_does_not_split() {
        let kv = engine_with(&[("m".into(), 100_000), ("m1".into(), 10)]);
        let check = check_size(&kv, &range("m", "n"), 1000, 16).unwrap();
        assert!(check.bytes > 1000);
        assert_eq!(check.split_key, Some(b"m1".to_vec()), "the big key stays left, the rest goes right");
        let alone = engine_with(&[("m".into(), 100_000)]);
        assert_eq!(check_size(&alone, &range("m", "n"), 1000, 16).unwrap().split_key, None, "nothing to split off");
    }
}
