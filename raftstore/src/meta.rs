//! The meta range: the cluster's routing table and node registry, kept in a Raft group of the cluster itself.
//!
//! Stored keys from `ff ff` on are the system's ([`SYSTEM_KEYS_START`]): users' keys are stored below them
//! ([`stored_key`]: unchanged unless they start with `ff`, whose rest is escaped, so every key a user may write
//! stays writable and key order is kept), and the **meta range** `[ff ff, ∞)` is one more group of the initial
//! layout, replicated like any other, never split or merged. Its data:
//! - the **range table** — under [`range_key`]`(end)`, for each piece of the user key space `[start, end)` the
//!   descriptor of the group that serves it (a [`RangeDescriptor`] whose bounds are the piece's). The pieces tile
//!   `[∅, ff ff)` exactly, always: the initial layout writes one piece per range, and every update keeps the tiling.
//!   Keying by the end lets a lookup of `key` be a forward scan from it: the first piece whose end is past `key`
//!   holds it (CockroachDB's meta ranges are keyed the same way).
//! - the **node registry** — under [`node_key`]`(id)`, each node's [`NodeEntry`] (where it listens).
//!
//! A group's own descriptor is the truth; the table is what routing starts from. After a split, a merge or a
//! membership change, the group's leader **publishes** its new descriptor ([`Command::publish`], a command of the
//! meta group) until its node's replica of the meta range shows it (`Peer::publish_due`). Applying it
//! ([`publish_ops`]) is [`learn`]'s rule over the pieces it overlaps, so it is idempotent and guarded by epoch: a
//! newer descriptor replaces the pieces it overlaps, and what it does not cover of them stays theirs; a
//! descriptor that overlaps an equal or newer piece is stale (a key's later owners always have higher versions)
//! and changes nothing. Routers read the table (a lookup is a scan of the meta group: [`lookup_scan`],
//! [`pieces`]), cache it, and correct it from the groups' typed errors.
//!
//! [`Command::publish`]: crate::command::Command::publish

use std::borrow::Cow;
use std::collections::BTreeMap;

use flotilla_engine::contract::{KeyValue, KvEngine, KvOp, StateMachineError};
use prost::Message as _;

use crate::range::{RangeDescriptor, RangeEpoch, Replica};

/// The first stored key of the system's part of the key space, and the meta range's start.
pub const SYSTEM_KEYS_START: &[u8] = &[0xff, 0xff];
/// Range table entries: this prefix, then the piece's end key.
const RANGE_PREFIX: &[u8] = &[0xff, 0xff, b'r'];
/// Past every range table entry.
const RANGE_PREFIX_END: &[u8] = &[0xff, 0xff, b's'];
/// Node registry entries: this prefix, then the node id (8 bytes, big-endian).
const NODE_PREFIX: &[u8] = &[0xff, 0xff, b'n'];
const NODE_PREFIX_END: &[u8] = &[0xff, 0xff, b'o'];
/// The escape byte of a stored user's key that starts with `ff`.
const ESCAPE: u8 = 0xfe;
/// Pieces read per engine scan while an update finds the ones it overlaps.
const PAGE: usize = 16;

/// Where a node listens, as the registry keeps it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct NodeEntry {
    #[prost(uint64, tag = "1")]
    pub node_id: u64,
    /// For the other nodes (the Raft transport).
    #[prost(string, tag = "2")]
    pub raft_addr: String,
    /// For clients (RESP), if it serves them.
    #[prost(string, tag = "3")]
    pub client_addr: String,
}

/// Whether the stored key `key` is the system's (at or past [`SYSTEM_KEYS_START`]).
pub fn is_system_key(key: &[u8]) -> bool {
    key >= SYSTEM_KEYS_START
}

/// Where a user's key is stored, in a key space with a meta range: unchanged if it does not start with `ff`;
/// else its first byte stays and each later `fe` becomes `fe 00` and each `ff` becomes `fe 01`. Every stored
/// user's key then lies below [`SYSTEM_KEYS_START`], and the order of keys is kept (bytes below `fe` sort as
/// before, `fe 00` below `fe 01`, both above them), so ranges and scans mean the same over stored keys.
pub fn stored_key(key: &[u8]) -> Cow<'_, [u8]> {
    match key.split_first() {
        Some((&0xff, rest)) if rest.iter().any(|&byte| byte >= ESCAPE) => {
            let mut stored = Vec::with_capacity(key.len() + 4);
            stored.push(0xff);
            for &byte in rest {
                match byte {
                    ESCAPE.. => stored.extend([ESCAPE, byte - ESCAPE]),
                    _ => stored.push(byte),
                }
            }
            Cow::Owned(stored)
        }
        _ => Cow::Borrowed(key),
    }
}

/// The user's key stored as `stored` ([`stored_key`]'s inverse; bytes that no user's key is stored as — a
/// range bound need not be one — are kept as they are).
pub fn user_key(stored: &[u8]) -> Cow<'_, [u8]> {
    match stored.split_first() {
        Some((&0xff, rest)) if rest.contains(&ESCAPE) => {
            let mut key = Vec::with_capacity(stored.len());
            key.push(0xff);
            let mut bytes = rest.iter().peekable();
            while let Some(&byte) = bytes.next() {
                match bytes.peek().map(|&&next| ESCAPE.checked_add(next)) {
                    Some(Some(escaped)) if byte == ESCAPE => {
                        key.push(escaped);
                        bytes.next();
                    }
                    _ => key.push(byte),
                }
            }
            Cow::Owned(key)
        }
        _ => Cow::Borrowed(stored),
    }
}

/// The key of the range table's piece that ends at `end`.
pub fn range_key(end: &[u8]) -> Vec<u8> {
    [RANGE_PREFIX, end].concat()
}

/// The key of node `node_id`'s registry entry.
pub fn node_key(node_id: u64) -> Vec<u8> {
    [NODE_PREFIX, &node_id.to_be_bytes()].concat()
}

/// The scan (`start`, `end`) of the meta group that finds the pieces from the one holding `key` on, in key order:
/// the pieces whose end is past `key`.
pub fn lookup_scan(key: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut start = range_key(key);
    start.push(0);
    (start, RANGE_PREFIX_END.to_vec())
}

/// The scan (`start`, `end`) of the meta group that reads the node registry.
pub fn registry_scan() -> (Vec<u8>, Vec<u8>) {
    (NODE_PREFIX.to_vec(), NODE_PREFIX_END.to_vec())
}

/// The pieces a scan of the range table returned, in key order (an entry that does not decode is skipped: the
/// meta group wrote it, so that is damage its reader cannot mend, and routing falls back on the groups' errors).
pub fn pieces(entries: &[KeyValue]) -> Vec<RangeDescriptor> {
    entries.iter().filter_map(|(_, value)| RangeDescriptor::decode(value.as_slice()).ok()).collect()
}

/// The nodes a scan of the registry returned.
pub fn nodes(entries: &[KeyValue]) -> Vec<NodeEntry> {
    entries.iter().filter_map(|(_, value)| NodeEntry::decode(value.as_slice()).ok()).collect()
}

/// The meta range's descriptor over `replicas`, as group `group_id` (the last group of the initial layout).
pub fn meta_range(group_id: u64, replicas: &[Replica]) -> RangeDescriptor {
    RangeDescriptor {
        group_id,
        start: SYSTEM_KEYS_START.to_vec(),
        end: Vec::new(),
        epoch: Some(RangeEpoch { version: 1, conf_version: 1 }),
        replicas: replicas.to_vec(),
        ..RangeDescriptor::default()
    }
}

/// The meta range's first data: one piece per user range of `ranges` (the initial layout; the meta range itself
/// is skipped). Every node of a new cluster writes the same, as the meta group's state at its bootstrap index;
/// nodes register themselves once running.
pub fn initial_ops(ranges: &[RangeDescriptor]) -> Vec<KvOp> {
    let pieces = ranges.iter().filter(|range| !range.is_meta());
    pieces.map(|range| KvOp::Put { key: range_key(&range.end), value: range.encode() }).collect()
}

/// A registry entry's write (a node that joined).
pub fn register_op(node: &NodeEntry) -> (Vec<u8>, Vec<u8>) {
    (node_key(node.node_id), node.encode_to_vec())
}

/// Whether `range` may be published: a user range, bounded at or below the system's keys.
pub fn publishable(range: &RangeDescriptor) -> bool {
    !range.end.is_empty() && range.end.as_slice() <= SYSTEM_KEYS_START && range.is_initialized()
}

/// How recent a descriptor of overlapping keys is: the higher version is the newer (a key's later owners always
/// have higher versions); of one group at one version, the later membership.
fn newness(range: &RangeDescriptor) -> (u64, u64) {
    (range.epoch().version, range.epoch().conf_version)
}

/// Adds `range` to `table` (pieces sorted by start, covering their part of the key space once): it replaces the
/// parts of the pieces it overlaps if it is newer than each of them, else it is ignored; what it does not cover
/// of a piece it replaces stays that piece's, so the table covers what it covered. The rule of the meta range's
/// table and of every router's cache (`flotilla_router::route::RangeTable::learned`).
pub fn learn(table: &mut Vec<RangeDescriptor>, range: RangeDescriptor) {
    if table.iter().any(|known| known.overlaps(&range) && newness(known) >= newness(&range)) {
        return;
    }
    let mut kept = Vec::with_capacity(table.len() + 2);
    for known in table.drain(..) {
        if !known.overlaps(&range) {
            kept.push(known);
            continue;
        }
        // What `range` does not cover of it: the part before, and the part after.
        if known.start < range.start {
            kept.push(RangeDescriptor { end: range.start.clone(), ..known.clone() });
        }
        if !range.end.is_empty() && (known.end.is_empty() || range.end < known.end) {
            kept.push(RangeDescriptor { start: range.end.clone(), ..known });
        }
    }
    kept.push(range);
    kept.sort_by(|a, b| a.start.cmp(&b.start));
    *table = kept;
}

/// The writes that publish `range` in the meta range's table as `engine` holds it overlaid with `written` (the
/// writes of earlier publications in the same batch, by key: `None` a deletion): [`learn`]'s rule over the
/// pieces it overlaps. Nothing if it is stale, already there, or not [`publishable`].
pub fn publish_ops(
    engine: &dyn KvEngine,
    written: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    range: &RangeDescriptor,
) -> Result<Vec<KvOp>, StateMachineError> {
    if !publishable(range) {
        return Ok(Vec::new());
    }
    let overlapped = overlapping(engine, written, range)?;
    let mut pieces = overlapped.clone();
    learn(&mut pieces, range.clone());
    if pieces == overlapped {
        return Ok(Vec::new());
    }
    let mut ops: Vec<KvOp> = overlapped.iter().map(|piece| KvOp::Delete { key: range_key(&piece.end) }).collect();
    ops.extend(pieces.iter().map(|piece| KvOp::Put { key: range_key(&piece.end), value: piece.encode() }));
    Ok(ops)
}

/// The table's pieces that share a key with `range` (a bounded range), in order.
fn overlapping(
    engine: &dyn KvEngine,
    written: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    range: &RangeDescriptor,
) -> Result<Vec<RangeDescriptor>, StateMachineError> {
    let (mut from, end) = lookup_scan(&range.start);
    let mut found = Vec::new();
    loop {
        let page = scan_overlaid(engine, written, &from, &end, PAGE)?;
        for (key, value) in &page {
            let Ok(piece) = RangeDescriptor::decode(value.as_slice()) else {
                return Err(StateMachineError::Storage(format!("meta range entry {key:?} does not decode: damaged")));
            };
            if piece.start >= range.end {
                return Ok(found);
            }
            let last = piece.end >= range.end;
            found.push(piece);
            if last {
                return Ok(found);
            }
        }
        match page.last() {
            Some((key, _)) if page.len() == PAGE => from = [key.as_slice(), &[0]].concat(),
            _ => return Ok(found),
        }
    }
}

/// Up to `limit` pairs of `[start, end)` as `engine` holds them overlaid with `written`, in key order.
fn scan_overlaid(
    engine: &dyn KvEngine,
    written: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    start: &[u8],
    end: &[u8],
    limit: usize,
) -> Result<Vec<KeyValue>, StateMachineError> {
    let overlay: Vec<_> = written.range(start.to_vec()..end.to_vec()).collect();
    // Each overlaid key hides at most one of the engine's: that many more cannot leave fewer than `limit`.
    let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = engine.scan(start, end, limit + overlay.len())?.into_iter().collect();
    for (key, value) in overlay {
        match value {
            Some(value) => merged.insert(key.clone(), value.clone()),
            None => merged.remove(key),
        };
    }
    Ok(merged.into_iter().take(limit).collect())
}

#[cfg(test)]
mod tests {
    use flotilla_engine::contract::GroupApply;
    use flotilla_engine::kv_engine::MemKvEngine;

    use super::*;
    use crate::range::SplitRequest;

    fn replicas() -> Vec<Replica> {
        (1..=3).map(|id| Replica::voter(id, id)).collect()
    }

    /// An engine holding the meta range's first data for `ranges`.
    fn engine_with(ranges: &[RangeDescriptor]) -> MemKvEngine {
        let engine = MemKvEngine::new(u64::MAX);
        let ops = initial_ops(ranges);
        engine.apply(vec![GroupApply { group_id: 9, ops, applied_index: 5, applied_term: 5, range: None }]).unwrap();
        engine
    }

    fn table(engine: &MemKvEngine) -> Vec<RangeDescriptor> {
        let (start, end) = lookup_scan(b"");
        pieces(&engine.scan(&start, &end, usize::MAX).unwrap())
    }

    fn publish(engine: &MemKvEngine, range: &RangeDescriptor) -> usize {
        let ops = publish_ops(engine, &BTreeMap::new(), range).unwrap();
        let count = ops.len();
        engine.apply(vec![GroupApply { group_id: 9, ops, applied_index: 6, applied_term: 5, range: None }]).unwrap();
        count
    }

    fn split(range: &RangeDescriptor, key: &[u8], group: u64) -> (RangeDescriptor, RangeDescriptor) {
        range.split(&SplitRequest::new(key.to_vec(), (group, group * 10), 3)).unwrap()
    }

    #[test]
    fn every_users_key_is_stored_below_the_systems_keys_in_the_same_order() {
        let mut keys: Vec<Vec<u8>> = vec![vec![], vec![0xfe], vec![0xff], vec![0xff, 0xff], vec![0xff, 0xff, 0xff]];
        for first in [0x00u8, 0x7f, 0xfe, 0xff] {
            for second in [0x00u8, 0x01, 0xfd, 0xfe, 0xff] {
                for third in [None, Some(0x00u8), Some(0xfe), Some(0xff)] {
                    keys.push([first, second].into_iter().chain(third).collect());
                }
            }
        }
        keys.sort();
        keys.dedup();
        let stored: Vec<Vec<u8>> = keys.iter().map(|key| stored_key(key).into_owned()).collect();
        assert!(stored.windows(2).all(|pair| pair[0] < pair[1]), "order kept, no two keys stored alike");
        assert!(stored.iter().all(|key| !is_system_key(key)), "all below the system's keys");
        for odd in [&[0xff, 0xfe][..], &[0xff, 0xfe, 0x80], &[0xff, 0x10, 0xfe]] {
            assert_eq!(user_key(odd).as_ref(), odd, "what no key is stored as is kept as it is");
        }
        for (key, stored) in keys.iter().zip(&stored) {
            assert_eq!(user_key(stored).as_ref(), key.as_slice());
            if key.first() != Some(&0xff) {
                assert_eq!(stored, key, "keys not starting with ff are stored as they are");
            }
        }
    }

    #[test]
    fn the_initial_layout_keeps_users_keys_below_the_meta_range() {
        for groups in [1u64, 3, 16, 1000] {
            let ranges = crate::range::initial_layout(groups, &replicas());
            let meta = ranges.last().unwrap();
            assert!(meta.is_meta() && meta.group_id == groups + 1 && meta.end.is_empty());
            let user = &ranges[..ranges.len() - 1];
            assert_eq!(user.last().unwrap().end, SYSTEM_KEYS_START);
            assert!(user.iter().all(|range| publishable(range) && !range.is_meta()));
            assert!(user.iter().all(|range| range.start.first() != Some(&0xff)), "bounds that are users' keys");
            assert_eq!(table(&engine_with(&ranges)), user, "one piece per user range, in order");
        }
    }

    #[test]
    fn publications_are_guarded_by_epoch_idempotent_and_keep_the_table_tiled() {
        let ranges = crate::range::initial_layout(1, &replicas());
        let engine = engine_with(&ranges);
        let whole = ranges[0].clone();
        let (left, right) = split(&whole, b"m", 10);
        let (right_left, right_right) = split(&right, b"t", 11);
        // The newest part first: the rest stays routed by the range it came from.
        assert!(publish(&engine, &right_right) > 0);
        let bounds: Vec<_> = table(&engine).iter().map(|r| (r.group_id, r.start.clone(), r.end.clone())).collect();
        assert_eq!(bounds, vec![(1, vec![], b"t".to_vec()), (11, b"t".to_vec(), SYSTEM_KEYS_START.to_vec())]);
        // Stale descriptors and repeats change nothing.
        assert_eq!(publish(&engine, &whole), 0);
        assert_eq!(publish(&engine, &right_right), 0);
        publish(&engine, &left);
        publish(&engine, &right);
        assert_eq!(publish(&engine, &right), 0);
        publish(&engine, &right_left);
        assert_eq!(table(&engine), vec![left.clone(), right_left.clone(), right_right.clone()]);
        // A merge covers both parts; a membership change of one group replaces its own piece.
        let merged = left.merged_with(&right_left);
        publish(&engine, &merged);
        let mut moved = right_right.clone();
        moved.replicas[0].learner = true;
        moved.epoch = Some(RangeEpoch { conf_version: 2, ..moved.epoch() });
        publish(&engine, &moved);
        assert_eq!(table(&engine), vec![merged, moved]);
        // Not a user range: nothing.
        let meta = meta_range(2, &replicas());
        assert!(publish_ops(&engine, &BTreeMap::new(), &meta).unwrap().is_empty());
    }

    #[test]
    fn a_publication_sees_the_writes_of_earlier_ones_in_its_batch() {
        let ranges = crate::range::initial_layout(1, &replicas());
        let engine = engine_with(&ranges);
        let (left, right) = split(&ranges[0], b"m", 10);
        let mut written = BTreeMap::new();
        for range in [&left, &right] {
            for op in publish_ops(&engine, &written, range).unwrap() {
                match op {
                    KvOp::Put { key, value } => written.insert(key, Some(value)),
                    KvOp::Delete { key } => written.insert(key, None),
                };
            }
        }
        let ops = written.into_iter().map(|(key, value)| match value {
            Some(value) => KvOp::Put { key, value },
            None => KvOp::Delete { key },
        });
        let apply = GroupApply { group_id: 9, ops: ops.collect(), applied_index: 6, applied_term: 5, range: None };
        engine.apply(vec![apply]).unwrap();
        assert_eq!(table(&engine), vec![left, right]);
    }
}
