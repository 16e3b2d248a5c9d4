//! When a group asks to be split ([`SplitTrigger`], one per replica; only a leader's counts): by **size** — after
//! `size_check_written_bytes` of writes since its last check, its range's data is measured off the pollers
//! (`split_check.rs`, on the replicas thread) and a range over `size_bytes_max` asks to split near the middle of
//! its bytes — and by **load** — its requests (with the reads its node served locally:
//! `LocalReader::count_read`) are counted and sampled per window of ticks (`load_split.rs`), and a load over
//! the bound for enough windows in a row asks to split at the sampled key that halves it.
//!
//! Asking is all a store does: a [`RangeAsk`] goes to the host (`StoreOptions::range_asks`), which takes the
//! new group's ids and proposes the split like a split by request (the embedded `Db`'s splitter thread, a
//! server's). Asks are advisory: a full channel drops one (the next check asks again), and a split proposed for a
//! range that changed meanwhile is refused where it applies.
//!
//! And when a range asks to be **merged** into its left neighbour: when its leader falls asleep (the group
//! hibernates: no request for a while — cold) and stays asleep for `merge_cold_ticks`, the replicas thread
//! measures it and its left neighbour; if it is under `merge_size_bytes_max` and the two together under half of
//! `size_bytes_max`, it asks ([`AskReason::Merge`]), and the host proposes the merge as a merge by request
//! (`peer/merge.rs`). Hysteresis: a merged range is at most half the split bound, and a range split by load is
//! busy — a pause in its load shorter than `merge_cold_ticks` (a client restarting, say) does not merge it back.
//! Never merged: the ranges of the initial layout (`initial_groups`: the host chose it, and a merge never removes
//! one of its boundaries) and ranges split off by request (`sticky`).

use std::sync::Arc;

use crate::command::Command;
use crate::load_split::{LoadSampler, LoadSplitOptions};
use crate::range::RangeDescriptor;

/// The split triggers' bounds (see the module's doc). Each has a default; a zero turns its trigger off.
#[derive(Clone, Debug)]
pub struct SplitOptions {
    /// A range whose keys and values add up to more than this asks to split near the middle of its bytes
    /// (0: never by size). Default 64 MiB.
    pub size_bytes_max: u64,
    /// Bytes of keys and values written to a range (on its leader) between two size checks. Default
    /// `size_bytes_max / 8` (8 MiB).
    pub size_check_written_bytes: u64,
    /// Load windows are this many of the node's ticks long (0: never by load). Default 10 (1 s at the store's
    /// default 100 ms tick).
    pub load_window_ticks: u32,
    /// What makes a window hot, how many in a row split, and where (`load_split.rs`).
    pub load: LoadSplitOptions,
    /// A cold range under this many bytes asks to be merged into its left neighbour, if the two together are
    /// under half of `size_bytes_max` (0: never by size). Default 16 MiB.
    pub merge_size_bytes_max: u64,
    /// How long, in the node's ticks, a range must stay cold (its leader asleep: no request at all) before it is
    /// measured for a merge; a request meanwhile wakes it, and its next cold spell waits as long again. Default
    /// 600 (a minute at the store's default 100 ms tick).
    pub merge_cold_ticks: u64,
    /// Groups with ids up to this are the initial layout's: never merged away (their boundaries stay). Default 0
    /// (the `Db` and `flotilla serve` set their layout's group count).
    pub initial_groups: u64,
}

impl Default for SplitOptions {
    fn default() -> SplitOptions {
        SplitOptions {
            size_bytes_max: 64 << 20,
            size_check_written_bytes: 8 << 20,
            load_window_ticks: 10,
            load: LoadSplitOptions::default(),
            merge_size_bytes_max: 16 << 20,
            merge_cold_ticks: 600,
            initial_groups: 0,
        }
    }
}

/// A group's leader asks its host to split its range at `split_key`, or to merge it into its left neighbour
/// (`reason` says which trigger).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeAsk {
    /// The node whose replica asks (it leads the group: the host proposes the split there).
    pub node_id: u64,
    /// The range as the asking replica holds it.
    pub range: RangeDescriptor,
    /// Where to split (empty for a merge).
    pub split_key: Vec<u8>,
    pub reason: AskReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AskReason {
    /// Split: over the size bound.
    Size,
    /// Split: under sustained load.
    Load,
    /// Merge into the left neighbour, group `into_group_id`: both small, this one cold.
    Merge { into_group_id: u64 },
    /// Not a split: publish `range` (this node's leader's descriptor) in the meta range, which this node holds
    /// no replica of (`peer/publish.rs`); the host routes it to the meta group like a write.
    Publish,
}

/// One replica's split triggers (see the module's doc). Deterministic: it sees what its caller feeds it. Small
/// (a node may hold 100,000 replicas): the options are shared, and the load sampler is made at the first
/// request a leader records.
#[derive(Debug)]
pub struct SplitTrigger {
    options: Arc<SplitOptions>,
    written_bytes: u64,
    /// Bytes to write before the next size check: `size_check_written_bytes`, or what the range lacked of the
    /// bound at its last measure if more (a range far under it is not measured again and again).
    next_check_bytes: u64,
    load: Option<Box<LoadSampler>>,
    window_ticks: u32,
    seed: u64,
}

impl SplitTrigger {
    /// `seed` varies the load sampler's choices (per group).
    pub fn new(options: Arc<SplitOptions>, seed: u64) -> SplitTrigger {
        let next_check_bytes = options.size_check_written_bytes.max(1);
        SplitTrigger { options, written_bytes: 0, next_check_bytes, load: None, window_ticks: 0, seed }
    }

    /// The load sampler, made at the first request recorded (none if the load trigger is off).
    fn sampler(&mut self) -> Option<&mut LoadSampler> {
        if self.options.load_window_ticks == 0 {
            return None;
        }
        let (options, seed) = (&self.options, self.seed);
        Some(self.load.get_or_insert_with(|| Box::new(LoadSampler::new(options.load.clone(), seed))))
    }

    /// A write this replica took as leader: each of its operations counts toward the load as a request (a
    /// server combines the plain writes of a client's pipeline into one command; they are the requests they were).
    pub fn on_write(&mut self, command: &Command) {
        if self.options.size_bytes_max > 0 {
            let bytes: usize = command.ops.iter().map(|op| op.key.len() + op.value.len()).sum();
            self.written_bytes += bytes as u64;
        }
        if let Some(load) = self.sampler() {
            for op in &command.ops {
                load.record(&op.key);
            }
        }
    }

    /// A read of `key` this replica serves as leader.
    pub fn on_read(&mut self, key: &[u8]) {
        if let Some(load) = self.sampler() {
            load.record(key);
        }
    }

    /// Reads this replica's node served locally while it led (`store/local_reader.rs`: they never reach the
    /// replica), `keys` an even sample of them: they count toward the load like reads through it.
    pub fn on_local_reads(&mut self, reads: u64, keys: &[Vec<u8>]) {
        if let Some(load) = self.sampler() {
            load.record_sampled(reads, keys);
        }
    }

    /// `ticks` of the node's time passed for this replica: a load window that ends may name a split key.
    pub fn on_ticks(&mut self, ticks: u64) -> Option<Vec<u8>> {
        let load = self.load.as_deref_mut()?; // no sampler yet: nothing recorded, no window to close
        let mut split_key = None;
        for _ in 0..ticks {
            self.window_ticks += 1;
            if self.window_ticks >= self.options.load_window_ticks {
                self.window_ticks = 0;
                split_key = load.end_window().or(split_key);
            }
        }
        split_key
    }

    /// Whether enough was written since the last check for the range's size to be checked now (the count
    /// starts again).
    pub fn take_size_check(&mut self) -> bool {
        let due = self.options.size_bytes_max > 0 && self.written_bytes >= self.next_check_bytes;
        if due {
            self.written_bytes = 0;
        }
        due
    }

    /// Whether `range`, whose leader just fell asleep, may be merged into its left neighbour on its own (see the
    /// module's doc): merges on, not the first range, not of the initial layout, not split off by request, not in
    /// a merge already, not the meta range. (When it is measured is the replicas thread's: `Replicas::merge_check_asked`.)
    pub fn merges(&self, range: &RangeDescriptor) -> bool {
        let options = &self.options;
        options.merge_size_bytes_max > 0
            && !range.start.is_empty()
            && range.group_id > options.initial_groups
            && !range.sticky
            && !range.is_merging()
            && !range.is_meta()
    }

    /// A size check measured the range at `bytes`: under the bound, the next check waits until what it lacks
    /// of the bound has been written (at least `size_check_written_bytes`).
    pub fn on_measured(&mut self, bytes: u64) {
        let lacking = self.options.size_bytes_max.saturating_sub(bytes);
        self.next_check_bytes = lacking.max(self.options.size_check_written_bytes).max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Op;

    fn write(key: &str, value_bytes: usize) -> Command {
        Command::write(None, vec![Op::put(key.as_bytes().to_vec(), vec![b'v'; value_bytes])])
    }

    #[test]
    fn reads_served_locally_count_toward_the_load() {
        let load = LoadSplitOptions { requests_per_window_max: 100, hot_windows: 2, ..LoadSplitOptions::default() };
        let options = SplitOptions { load_window_ticks: 1, load, ..SplitOptions::default() };
        let mut trigger = SplitTrigger::new(Arc::new(options), 1);
        let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("k{i:02}").into_bytes()).collect();
        trigger.on_local_reads(1000, &keys);
        assert_eq!(trigger.on_ticks(1), None, "one hot window");
        trigger.on_local_reads(1000, &keys);
        let split_key = trigger.on_ticks(1).expect("two hot windows of reads alone");
        assert!(keys[5..15].contains(&split_key), "near the middle of the sampled keys: {split_key:?}");
        trigger.on_local_reads(50, &keys[..2]);
        assert_eq!(trigger.on_ticks(1), None, "under the bound");
    }

    #[test]
    fn every_operation_of_a_write_counts_toward_the_load() {
        let load = LoadSplitOptions { requests_per_window_max: 100, hot_windows: 1, ..LoadSplitOptions::default() };
        let options = SplitOptions { load_window_ticks: 1, load, ..SplitOptions::default() };
        let mut trigger = SplitTrigger::new(Arc::new(options), 1);
        // 150 writes in 10 commands: over the bound of 100 requests, split near the middle of their keys.
        for command in 0..10 {
            let ops = (0..15).map(|i| Op::put(format!("k{:03}", command * 15 + i).into_bytes(), vec![1])).collect();
            trigger.on_write(&Command::write(None, ops));
        }
        let split_key = String::from_utf8(trigger.on_ticks(1).expect("a hot window")).unwrap();
        assert!(("k030".."k120").contains(&split_key.as_str()), "near the middle: {split_key}");
    }

    #[test]
    fn a_size_check_comes_after_enough_bytes_written_and_never_when_off() {
        let options = SplitOptions { size_bytes_max: 1000, size_check_written_bytes: 250, ..SplitOptions::default() };
        let mut trigger = SplitTrigger::new(Arc::new(options.clone()), 1);
        trigger.on_write(&write("k1", 100));
        assert!(!trigger.take_size_check());
        trigger.on_write(&write("k2", 200));
        assert!(trigger.take_size_check(), "304 bytes written");
        assert!(!trigger.take_size_check(), "the count started again");
        // Measured far under the bound: the next check waits until what it lacks is written.
        trigger.on_measured(100);
        trigger.on_write(&write("k3", 600));
        assert!(!trigger.take_size_check(), "604 of the 900 bytes it lacked");
        trigger.on_write(&write("k4", 300));
        assert!(trigger.take_size_check());
        trigger.on_measured(2000);
        trigger.on_write(&write("k5", 250));
        assert!(trigger.take_size_check(), "over the bound: checked again after size_check_written_bytes");
        let mut off = SplitTrigger::new(Arc::new(SplitOptions { size_bytes_max: 0, ..options }), 1);
        off.on_write(&write("k1", 10_000));
        assert!(!off.take_size_check());
    }

    #[test]
    fn sustained_load_names_a_key_at_a_window_end_and_off_means_never() {
        let load = LoadSplitOptions { requests_per_window_max: 100, hot_windows: 2, ..LoadSplitOptions::default() };
        let options = SplitOptions { load_window_ticks: 5, load, ..SplitOptions::default() };
        let mut trigger = SplitTrigger::new(Arc::new(options.clone()), 3);
        let mut named = None;
        for window in 0..2 {
            for i in 0..400 {
                if i % 2 == 0 {
                    trigger.on_write(&write(&format!("user:{i:04}"), 10));
                } else {
                    trigger.on_read(format!("user:{i:04}").as_bytes());
                }
            }
            assert_eq!(trigger.on_ticks(4), None, "window {window} not over");
            named = trigger.on_ticks(1);
        }
        let key = String::from_utf8(named.expect("two hot windows")).unwrap();
        assert!(("user:0100".."user:0300").contains(&key.as_str()), "near the middle: {key}");
        let mut off = SplitTrigger::new(Arc::new(SplitOptions { load_window_ticks: 0, ..options }), 3);
        for i in 0..10_000 {
            off.on_read(format!("user:{i:04}").as_bytes());
        }
        assert_eq!(off.on_ticks(100), None);
    }
}
