//! Merging sorted sources (memtables and runs) into one ordered view: for a key present in several, the newest
//! source wins; entries hidden by a range deletion are skipped; deletions are skipped too unless a compaction must
//! keep them (because older runs outside it may still hold the key).
//!
//! Few sources are ever merged (the compaction policy bounds the runs), so the smallest key is found by a linear
//! pass rather than a heap.

use std::collections::btree_map;

use super::version::RangeTombstone;
use crate::state_machine::error::StateMachineError;

pub(crate) use super::mem_key::MemKey;

/// A sorted stream of entries (`None` value: a deletion).
pub(crate) trait Source {
    fn current(&self) -> Option<(&[u8], Option<&[u8]>)>;
    fn advance(&mut self) -> Result<(), StateMachineError>;
}

/// A memtable's entries in a key range.
pub(crate) struct MemSource<'a> {
    entries: btree_map::Range<'a, MemKey, Option<Vec<u8>>>,
    current: Option<(&'a MemKey, &'a Option<Vec<u8>>)>,
}

impl<'a> MemSource<'a> {
    pub(crate) fn new(mut entries: btree_map::Range<'a, MemKey, Option<Vec<u8>>>) -> MemSource<'a> {
        let current = entries.next();
        MemSource { entries, current }
    }
}

impl Source for MemSource<'_> {
    fn current(&self) -> Option<(&[u8], Option<&[u8]>)> {
        self.current.map(|(key, value)| (&**key, value.as_deref()))
    }

    fn advance(&mut self) -> Result<(), StateMachineError> {
        self.current = self.entries.next();
        Ok(())
    }
}

/// A source and the `seq` of what it holds (`u64::MAX` for memtables: newer than every range deletion).
pub(crate) struct Input<'a> {
    pub(crate) seq: u64,
    pub(crate) source: Box<dyn Source + Send + 'a>,
}

pub(crate) struct Merge<'a> {
    /// Newest first.
    inputs: Vec<Input<'a>>,
    tombstones: Vec<RangeTombstone>,
    keep_deletions: bool,
    /// The input whose current entry is the merge's current entry.
    winner: Option<usize>,
    key: Vec<u8>,
}

impl<'a> Merge<'a> {
    /// `inputs` newest first (their `seq`s decreasing).
    pub(crate) fn new(
        inputs: Vec<Input<'a>>,
        tombstones: Vec<RangeTombstone>,
        keep_deletions: bool,
    ) -> Result<Merge<'a>, StateMachineError> {
        debug_assert!(inputs.windows(2).all(|w| w[0].seq >= w[1].seq), "merge inputs must be newest first");
        let mut merge = Merge { inputs, tombstones, keep_deletions, winner: None, key: Vec::new() };
        merge.settle()?;
        Ok(merge)
    }

    /// The current entry (`None` value: a deletion, only with `keep_deletions`); `None` once exhausted.
    pub(crate) fn current(&self) -> Option<(&[u8], Option<&[u8]>)> {
        self.winner.and_then(|i| self.inputs[i].source.current())
    }

    pub(crate) fn advance(&mut self) -> Result<(), StateMachineError> {
        if self.winner.is_some() {
            self.skip_current_key()?;
            self.settle()?;
        }
        Ok(())
    }

    /// Moves every input past the key in `self.key`.
    fn skip_current_key(&mut self) -> Result<(), StateMachineError> {
        for input in &mut self.inputs {
            if input.source.current().is_some_and(|(key, _)| key == self.key.as_slice()) {
                input.source.advance()?;
            }
        }
        Ok(())
    }

    /// Finds the next visible entry.
    fn settle(&mut self) -> Result<(), StateMachineError> {
        loop {
            let mut winner: Option<(usize, &[u8])> = None;
            for (i, input) in self.inputs.iter().enumerate() {
                if let Some((key, _)) = input.source.current() {
                    if winner.is_none_or(|(_, smallest)| key < smallest) {
                        winner = Some((i, key));
                    }
                }
            }
            let Some((i, key)) = winner else {
                self.winner = None;
                return Ok(());
            };
            self.key.clear();
            self.key.extend_from_slice(key);
            let seq = self.inputs[i].seq;
            let hidden = self.tombstones.iter().any(|t| t.hides(&self.key, seq));
            let deleted = self.inputs[i].source.current().is_some_and(|(_, value)| value.is_none());
            if !hidden && (!deleted || self.keep_deletions) {
                self.winner = Some(i);
                return Ok(());
            }
            self.skip_current_key()?;
        }
    }
}

impl Source for Merge<'_> {
    fn current(&self) -> Option<(&[u8], Option<&[u8]>)> {
        Merge::current(self)
    }

    fn advance(&mut self) -> Result<(), StateMachineError> {
        Merge::advance(self)
    }
}

/// Owned pairs in key order (the in-memory engine's snapshots).
pub(crate) struct VecSource {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    position: usize,
}

impl VecSource {
    pub(crate) fn new(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> VecSource {
        VecSource { pairs, position: 0 }
    }
}

impl Source for VecSource {
    fn current(&self) -> Option<(&[u8], Option<&[u8]>)> {
        self.pairs.get(self.position).map(|(key, value)| (key.as_slice(), Some(value.as_slice())))
    }

    fn advance(&mut self) -> Result<(), StateMachineError> {
        self.position += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn memtable(entries: &[(&str, Option<&str>)]) -> BTreeMap<MemKey, Option<Vec<u8>>> {
        entries.iter().map(|(k, v)| (MemKey::from_slice(k.as_bytes()), v.map(|v| v.as_bytes().to_vec()))).collect()
    }

    fn collect(mut merge: Merge<'_>) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        while let Some((key, value)) = merge.current() {
            out.push((String::from_utf8(key.to_vec()).unwrap(), value.map(|v| String::from_utf8(v.to_vec()).unwrap())));
            merge.advance().unwrap();
        }
        out
    }

    #[test]
    fn the_newest_source_wins_and_deletions_and_range_deletions_hide() {
        let newest = memtable(&[("b", Some("2")), ("c", None), ("e", Some("2"))]);
        let oldest =
            memtable(&[("a", Some("1")), ("b", Some("1")), ("c", Some("1")), ("d", Some("1")), ("f", Some("1"))]);
        let inputs = |keep| {
            let inputs = vec![
                Input {
                    seq: 9,
                    source: Box::new(MemSource::new(newest.range::<MemKey, _>(..))) as Box<dyn Source + Send>,
                },
                Input { seq: 3, source: Box::new(MemSource::new(oldest.range::<MemKey, _>(..))) },
            ];
            // Deletes [d, f) in runs older than 5: hides the old "d" but not the newer "e".
            Merge::new(inputs, vec![RangeTombstone { seq: 5, start: b"d".to_vec(), end: b"f".to_vec() }], keep).unwrap()
        };
        let some = |k: &str, v: &str| (k.to_string(), Some(v.to_string()));
        assert_eq!(collect(inputs(false)), vec![some("a", "1"), some("b", "2"), some("e", "2"), some("f", "1")]);
        assert_eq!(
            collect(inputs(true)),
            vec![some("a", "1"), some("b", "2"), ("c".to_string(), None), some("e", "2"), some("f", "1")]
        );
    }
}
