//! The state machine's storage layout on redb: a log-structured merge of sorted **runs** of checksummed blocks.
//!
//! Why not one redb table keyed by user key: redb costs a few microseconds per inserted key even in large sorted
//! transactions (~280K keys/s measured here at best), and with random keys every flush rewrites most of the
//! B-tree's leaves. So a memtable flush writes a new run — a few thousand blocks, one redb insert each — and
//! background compaction merges runs so that reads touch few of them. redb still provides what it is good at:
//! atomic, crash-safe transactions (a flush's blocks, its run record and every covered group's applied index
//! commit together), MVCC read views, and free-space management.
//!
//! - `block.rs`: the block format (sorted entries, offsets, CRC-32C);
//! - `bloom.rs`: a Bloom filter per run for point reads;
//! - `run.rs`: writing runs, point reads in a run, cursors over a run;
//! - `mem_key.rs`: the memtables' keys (short ones inline, compared a word at a time);
//! - `merge.rs`: merging memtables and runs (newest wins; deletions and range deletions hide);
//! - `read_cache.rs`: the answers of recent point reads, valid while the runs hold the same data;
//! - `version.rs`: the set of live runs and range deletions, published after each change;
//! - `sealed.rs`: the checksums of run records, range deletions, applied states and range descriptors.
//!
//! The byte layout is in `docs/state-machine-format.md`.

pub(crate) mod block;
pub(crate) mod bloom;
pub(crate) mod mem_key;
pub(crate) mod merge;
pub(crate) mod read_cache;
pub(crate) mod run;
pub(crate) mod sealed;
pub(crate) mod version;

/// Whether `key` lies in `[start, end)` (`end` empty: no upper bound).
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}
