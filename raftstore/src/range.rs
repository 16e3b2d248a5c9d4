//! Key ranges: which keys a group serves, and the epoch that says how current that knowledge is.
//!
//! A [`RangeDescriptor`] names a group, its half-open key range `[start, end)` (an empty `end` means "to the end of
//! the key space") and its replicas, with a [`RangeEpoch`]: `version` goes up with every split or merge (the range
//! changed), `conf_version` with every membership change (the replicas changed). Clients route with the descriptor
//! they have and send its epoch; a replica whose descriptor says otherwise answers with a typed [`RangeError`]
//! carrying its current descriptor — never with a wrong answer for a key it no longer serves.
//!
//! Descriptors are stored per group in the state machine (`KvEngine::put_range`) in their protobuf encoding.

use prost::Message as _;

#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct RangeEpoch {
    /// Bumped by every split or merge.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// Bumped by every membership change.
    #[prost(uint64, tag = "2")]
    pub conf_version: u64,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Replica {
    #[prost(uint64, tag = "1")]
    pub node_id: u64,
    /// The Raft id of this replica within its group.
    #[prost(uint64, tag = "2")]
    pub replica_id: u64,
    #[prost(bool, tag = "3")]
    pub learner: bool,
    /// Where its node listens for the other nodes, for a node that joined the cluster after it was created
    /// (`flotilla serve --join`): the descriptors are where the cluster keeps a joined node's address. Empty for
    /// the nodes the cluster was created with (their addresses are in every node's `--cluster` list) and in the
    /// embedded `Db`.
    #[prost(string, tag = "4")]
    pub addr: String,
}

impl Replica {
    /// A voter on node `node_id`, of no listed address.
    pub fn voter(node_id: u64, replica_id: u64) -> Replica {
        Replica { node_id, replica_id, learner: false, addr: String::new() }
    }
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RangeDescriptor {
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub start: Vec<u8>,
    /// Exclusive; empty: unbounded.
    #[prost(bytes = "vec", tag = "3")]
    pub end: Vec<u8>,
    #[prost(message, optional, tag = "4")]
    pub epoch: Option<RangeEpoch>,
    #[prost(message, repeated, tag = "5")]
    pub replicas: Vec<Replica>,
    /// Set while the range is frozen for a merge into its left neighbour (see `peer/merge.rs`): it takes no
    /// writes, reads, splits or membership changes until the merge commits (this group is gone) or is given up.
    #[prost(message, optional, tag = "6")]
    pub merge: Option<MergeState>,
    /// Non-zero on the record a node keeps of a group a merge ended here: the group that took its keys. Such a
    /// record lists no replicas (no replica of it opens again).
    #[prost(uint64, tag = "7")]
    pub merged_into: u64,
    /// Set while the range waits to take its right neighbour in (see `peer/merge.rs`): its epoch stays as it is
    /// (no split or membership change) until the merge commits or is given up.
    #[prost(message, optional, tag = "8")]
    pub merge_lock: Option<MergeLock>,
    /// The range was split off by request (`Db::split_at`, `flotilla split`): the merge trigger leaves it be
    /// (CockroachDB's sticky splits). A merge by request may still take it in.
    #[prost(bool, tag = "9")]
    pub sticky: bool,
}

/// A left range locked for a merge: which right neighbour, as of which of its epochs.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct MergeLock {
    #[prost(uint64, tag = "1")]
    pub right_group_id: u64,
    /// The right range's epoch when the lock was taken: it freezes only from that epoch.
    #[prost(message, optional, tag = "2")]
    pub right_epoch: Option<RangeEpoch>,
}

/// A range frozen for a merge: into which group, as of which of that group's epochs, from which of its own
/// log entries on.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct MergeState {
    /// The left neighbour that is to take the range.
    #[prost(uint64, tag = "1")]
    pub into_group_id: u64,
    /// That group's epoch when the merge was asked: the merge commits only if the group is still at it.
    #[prost(message, optional, tag = "2")]
    pub into_epoch: Option<RangeEpoch>,
    /// The index of the entry that froze the range: no later entry changes its data.
    #[prost(uint64, tag = "3")]
    pub frozen_index: u64,
    /// The index of the entry that decided the merge (0: not yet). Decided, the range is the left range's:
    /// it never unfreezes, and its replicas end as the left group takes it in.
    #[prost(uint64, tag = "4")]
    pub decided_index: u64,
    /// The term of that entry (0: decided before it was recorded, in a version whose replicas confirmed the
    /// decision's commit durably instead). A replica whose log holds the entry with this term knows everything
    /// up to it committed, whatever its group says (`peer/merge.rs`, step 5).
    #[prost(uint64, tag = "5")]
    pub decided_term: u64,
}

/// A split of a group's range, carried by a command through the group's log ([`RangeDescriptor::split`] says
/// what it makes).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SplitRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub split_key: Vec<u8>,
    /// The new group, which takes `[split_key, end)`.
    #[prost(uint64, tag = "2")]
    pub right_group_id: u64,
    /// The new group's replica ids, one per replica of the group, in its descriptor's order.
    #[prost(uint64, repeated, tag = "3")]
    pub right_replica_ids: Vec<u64>,
    /// Asked for by request rather than by a trigger: the new range is `sticky`.
    #[prost(bool, tag = "4")]
    pub sticky: bool,
    /// The new group is first led on the node whose replica proposes the split (the group's leader), rather than
    /// where [`RangeDescriptor::split_leader`]'s rotation says (which spreads the leaders of a range split by load
    /// over its nodes). The embedded `Db` asks for it: its nodes share one process's cores, so spreading gains
    /// nothing there, and the proposer applies the split first — its new group is ready soonest.
    #[prost(bool, tag = "5")]
    pub led_where_proposed: bool,
    /// The node whose replica leads the new group first (appointed: every replica starts the group having voted
    /// for it); filled in by the proposing leader if `led_where_proposed`. 0: the rotation.
    #[prost(uint64, tag = "6")]
    pub first_leader_node: u64,
}

impl SplitRequest {
    /// A split at `split_key` into group `right_group_id`, whose replicas take the ids from `first_replica_id`
    /// on, one for each of the range's `replicas`.
    pub fn new(split_key: Vec<u8>, (right_group_id, first_replica_id): (u64, u64), replicas: usize) -> SplitRequest {
        let right_replica_ids = (first_replica_id..).take(replicas).collect();
        SplitRequest { split_key, right_group_id, right_replica_ids, ..Default::default() }
    }

    /// This split, its new group first led where it is proposed (`led_where_proposed`).
    pub fn led_where_proposed(self) -> SplitRequest {
        SplitRequest { led_where_proposed: true, ..self }
    }

    /// The replica of `right` (the new group this split makes) that leads it first: a voter.
    pub fn first_leader<'a>(&self, right: &'a RangeDescriptor) -> Option<&'a Replica> {
        match self.first_leader_node {
            0 => right.split_leader(),
            node => right.replicas.iter().find(|r| r.node_id == node && !r.learner),
        }
    }

    /// This split, asked for by request (its new range is sticky).
    pub fn by_request(self) -> SplitRequest {
        SplitRequest { sticky: true, ..self }
    }
}

/// Why a replica refuses a request for its range (expected conditions: the client re-routes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeError {
    /// The key is not in this group's range (any more): `current` says what the group serves now.
    KeyNotInRange { key: Vec<u8>, current: Box<RangeDescriptor> },
    /// The request was routed with an epoch the range has moved past (or, after a restart, not yet reached).
    StaleEpoch { sent: RangeEpoch, current: Box<RangeDescriptor> },
    /// The keys of one atomic batch belong to more than one range.
    BatchSpansRanges { first_outside: Vec<u8>, current: Box<RangeDescriptor> },
    /// The range is frozen for a merge into its left neighbour: retry in a moment (after the merge its keys are
    /// that group's; a merge given up unfreezes the range).
    Merging { current: Box<RangeDescriptor> },
}

impl std::fmt::Display for RangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let describe = |d: &RangeDescriptor| {
            format!(
                "group {} serves [{:?}, {:?})",
                d.group_id,
                String::from_utf8_lossy(&d.start),
                String::from_utf8_lossy(&d.end)
            )
        };
        match self {
            RangeError::KeyNotInRange { key, current } => {
                write!(f, "key {:?} is not in this range: {}", String::from_utf8_lossy(key), describe(current))
            }
            RangeError::StaleEpoch { sent, current } => {
                write!(
                    f,
                    "request routed with epoch {sent:?}, the range is at {:?}: {}",
                    current.epoch.unwrap_or_default(),
                    describe(current)
                )
            }
            RangeError::BatchSpansRanges { first_outside, current } => write!(
                f,
                "an atomic batch must stay in one range; key {:?} is outside: {}",
                String::from_utf8_lossy(first_outside),
                describe(current)
            ),
            RangeError::Merging { current } => write!(f, "the range is being merged: {}", describe(current)),
        }
    }
}

impl std::error::Error for RangeError {}

impl RangeDescriptor {
    /// Whether replica `replica_id` is a member (voter or learner).
    pub fn lists_replica(&self, replica_id: u64) -> bool {
        self.replicas.iter().any(|r| r.replica_id == replica_id)
    }

    /// The node holding replica `replica_id`, if the group lists it.
    pub fn node_of(&self, replica_id: u64) -> Option<u64> {
        self.replicas.iter().find(|r| r.replica_id == replica_id).map(|r| r.node_id)
    }

    /// Whether node `node_id` holds a replica of the group.
    pub fn lists_node(&self, node_id: u64) -> bool {
        self.replicas.iter().any(|r| r.node_id == node_id)
    }

    /// The replica a split that made this group appoints its first leader unless the split says otherwise
    /// (`SplitRequest::first_leader`; `docs/architecture.md`, "Splits"): its voters in turn by group id — new
    /// groups' ids follow one another, so the leaders of a range split again and again spread over its nodes, and
    /// with them the load a load split halves (a local rule until a placement driver moves leaders). The same on
    /// every replica: each starts the group having voted for it.
    pub fn split_leader(&self) -> Option<&Replica> {
        let voters: Vec<&Replica> = self.replicas.iter().filter(|r| !r.learner).collect();
        (!voters.is_empty()).then(|| voters[(self.group_id % voters.len() as u64) as usize])
    }

    pub fn epoch(&self) -> RangeEpoch {
        self.epoch.unwrap_or_default()
    }

    /// The Raft configuration the replicas describe (groups change one replica at a time: never joint).
    pub fn conf_state(&self) -> flotilla_raft::ConfState {
        let ids = |learner: bool| self.replicas.iter().filter(|r| r.learner == learner).map(|r| r.replica_id).collect();
        flotilla_raft::ConfState { voters: ids(false), learners: ids(true), ..Default::default() }
    }

    /// Whether the descriptor describes a group (a replica created empty has none until its first snapshot).
    pub fn is_initialized(&self) -> bool {
        !self.replicas.is_empty()
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }

    /// Whether the two ranges share a key (an empty `end` is unbounded).
    pub fn overlaps(&self, other: &RangeDescriptor) -> bool {
        let before = |a: &RangeDescriptor, b: &RangeDescriptor| !a.end.is_empty() && a.end <= b.start;
        !before(self, other) && !before(other, self)
    }

    /// Whether a data command with `keys`, sent with epoch `sent`, fits this range. Only the epoch's `version`
    /// (which changes with the keys a group holds) is compared: a membership change (`conf_version`) leaves the
    /// range as it was.
    pub fn check(&self, keys: &[&[u8]], sent: Option<RangeEpoch>) -> Result<(), RangeError> {
        if let Some(sent) = sent.filter(|sent| sent.version != self.epoch().version) {
            return Err(RangeError::StaleEpoch { sent, current: Box::new(self.clone()) });
        }
        if self.merge.is_some() {
            return Err(RangeError::Merging { current: Box::new(self.clone()) });
        }
        match keys.iter().position(|key| !self.contains(key)) {
            None => Ok(()),
            Some(0) => Err(RangeError::KeyNotInRange { key: keys[0].to_vec(), current: Box::new(self.clone()) }),
            Some(at) => {
                Err(RangeError::BatchSpansRanges { first_outside: keys[at].to_vec(), current: Box::new(self.clone()) })
            }
        }
    }

    /// `[start, end)` (`end` empty: unbounded) clipped to this range: what a scan of it may return from here.
    pub fn clip(&self, start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let start = start.max(&self.start).to_vec();
        let end = match (end.is_empty(), self.end.is_empty()) {
            (true, _) => self.end.clone(),
            (false, true) => end.to_vec(),
            (false, false) => end.min(&self.end).to_vec(),
        };
        (start, end)
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// The two ranges a split at `request.split_key` makes of this one: the left keeps the group, its replicas and
    /// `[start, split_key)`; the right is group `right_group_id` over `[split_key, end)` on the same nodes (the same
    /// learners, the same addresses) with the request's replica ids, in the order of this descriptor's replicas.
    /// Both get the next `version`; the membership version stays. `Err` says why the request does not fit.
    pub fn split(&self, request: &SplitRequest) -> Result<(RangeDescriptor, RangeDescriptor), String> {
        let key = request.split_key.as_slice();
        if key <= self.start.as_slice() || !self.contains(key) {
            return Err(format!("split key {:?} is not inside the range", String::from_utf8_lossy(key)));
        }
        if crate::meta::is_system_key(key) || self.is_meta() {
            return Err("the system's keys (the meta range's) are never split".to_string());
        }
        if request.right_group_id == 0 || request.right_group_id == self.group_id {
            return Err(format!("the new group's id {} is not a new id", request.right_group_id));
        }
        let ids = &request.right_replica_ids;
        let distinct = ids.iter().collect::<std::collections::BTreeSet<_>>().len() == ids.len();
        if ids.len() != self.replicas.len() || !distinct || ids.contains(&0) {
            return Err(format!("{} new replica ids for {} replicas: {ids:?}", ids.len(), self.replicas.len()));
        }
        let epoch = self.epoch();
        let epoch = Some(RangeEpoch { version: epoch.version + 1, ..epoch });
        let left = RangeDescriptor { end: key.to_vec(), epoch, ..self.clone() };
        let replicas = (self.replicas.iter().zip(ids))
            .map(|(replica, &replica_id)| Replica { replica_id, ..replica.clone() })
            .collect();
        let right = RangeDescriptor {
            group_id: request.right_group_id,
            start: key.to_vec(),
            end: self.end.clone(),
            epoch,
            replicas,
            sticky: request.sticky,
            ..RangeDescriptor::default()
        };
        Ok((left, right))
    }

    /// Whether `right` may be merged into this range: its right neighbour, on the same nodes in the same roles,
    /// neither a merged group's record. (What each step needs of their locks and freezes, `command.rs` checks.)
    /// `Err` says why not.
    pub fn check_merge(&self, right: &RangeDescriptor) -> Result<(), String> {
        if self.end.is_empty() || self.end != right.start {
            return Err(format!("group {} is not the right neighbour of group {}", right.group_id, self.group_id));
        }
        let nodes = |range: &RangeDescriptor| {
            let mut nodes: Vec<(u64, bool)> = range.replicas.iter().map(|r| (r.node_id, r.learner)).collect();
            nodes.sort_unstable();
            nodes
        };
        if nodes(self) != nodes(right) || self.replicas.is_empty() {
            return Err(format!("groups {} and {} are not on the same nodes", self.group_id, right.group_id));
        }
        if self.merged_into != 0 || right.merged_into != 0 {
            return Err("one of the ranges was merged away".to_string());
        }
        if right.is_meta() {
            return Err("the meta range is never merged".to_string());
        }
        Ok(())
    }

    /// Whether this is the meta range (`meta.rs`): the system's keys, never split or merged.
    pub fn is_meta(&self) -> bool {
        self.start == crate::meta::SYSTEM_KEYS_START
    }

    /// Whether a split, a membership change or a merge lock must wait: the range is frozen or locked for a merge.
    pub fn is_merging(&self) -> bool {
        self.merge.is_some() || self.merge_lock.is_some()
    }

    /// This range with `right` (its frozen right neighbour) merged in: `[start, right.end)`, a `version` above
    /// both (a key's later owners always have higher versions), the same members.
    pub fn merged_with(&self, right: &RangeDescriptor) -> RangeDescriptor {
        let version = self.epoch().version.max(right.epoch().version) + 1;
        let epoch = Some(RangeEpoch { version, ..self.epoch() });
        RangeDescriptor { end: right.end.clone(), epoch, merge_lock: None, ..self.clone() }
    }

    /// The record a node keeps of this group once a merge into `into_group_id` ended it here.
    pub fn merged_record(&self, into_group_id: u64) -> RangeDescriptor {
        RangeDescriptor { replicas: Vec::new(), merged_into: into_group_id, ..self.clone() }
    }

    /// This range at its next version (a lock, a freeze, an unfreeze, a merge given up: the range's keys stay,
    /// but requests and merge steps routed with the old epoch are refused).
    pub fn next_version(&self) -> RangeDescriptor {
        let epoch = Some(RangeEpoch { version: self.epoch().version + 1, ..self.epoch() });
        RangeDescriptor { epoch, ..self.clone() }
    }

    pub fn decode_stored(bytes: &[u8]) -> Result<RangeDescriptor, prost::DecodeError> {
        RangeDescriptor::decode(bytes)
    }
}

/// `groups` ranges covering the whole key space, split evenly by the first four bytes of the key (an embedded
/// store's starting layout: with random or hashed keys, load spreads evenly). Groups are numbered from
/// `first_group_id`.
pub fn initial_ranges(groups: u64, first_group_id: u64, replicas: &[Replica]) -> Vec<RangeDescriptor> {
    assert!((1..=INITIAL_GROUPS_MAX).contains(&groups), "between 1 and {INITIAL_GROUPS_MAX} initial groups");
    let boundary = |i: u64| -> Vec<u8> {
        if i == 0 || i == groups {
            return Vec::new();
        }
        let prefix = ((i as u128) << 32) / groups as u128;
        (prefix as u32).to_be_bytes().to_vec()
    };
    (0..groups)
        .map(|i| RangeDescriptor {
            group_id: first_group_id + i,
            start: boundary(i),
            end: boundary(i + 1),
            epoch: Some(RangeEpoch { version: 1, conf_version: 1 }),
            replicas: replicas.to_vec(),
            ..RangeDescriptor::default()
        })
        .collect()
}

/// A new database's or cluster's layout: `groups` ranges covering the users' stored keys (`[∅, ff ff)`), split
/// evenly by their first four bytes as [`initial_ranges`] does, as groups `1..=groups`, then the meta range
/// (`meta.rs`) as group `groups + 1`, all on `replicas`.
pub fn initial_layout(groups: u64, replicas: &[Replica]) -> Vec<RangeDescriptor> {
    let mut ranges = initial_ranges(groups, 1, replicas);
    for (i, range) in ranges.iter_mut().enumerate() {
        // The boundaries of `initial_ranges`, scaled into [0, 0xff00_0000): a boundary never starts with `ff`,
        // so it is a user's key stored as it is (`meta::user_key` gives it back).
        let boundary = |i: u64| (((i as u128) * 0xff00_0000) / groups as u128) as u32;
        range.start = if i == 0 { Vec::new() } else { boundary(i as u64).to_be_bytes().to_vec() };
        range.end = match i as u64 + 1 == groups {
            true => crate::meta::SYSTEM_KEYS_START.to_vec(),
            false => boundary(i as u64 + 1).to_be_bytes().to_vec(),
        };
    }
    ranges.push(crate::meta::meta_range(groups + 1, replicas));
    ranges
}

/// The most groups [`initial_ranges`] makes (each gets a distinct 4-byte boundary).
pub const INITIAL_GROUPS_MAX: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_ranges_cover_the_key_space_once() {
        for groups in [1u64, 3, 16, 1000, 100_000] {
            let ranges = initial_ranges(groups, 1, &[]);
            assert_eq!(ranges.len() as u64, groups);
            assert!(ranges[0].start.is_empty() && ranges.last().unwrap().end.is_empty());
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start, "adjacent, no gap or overlap");
                assert!(pair[0].start < pair[1].start || pair[0].start.is_empty());
            }
            for key in [&b""[..], b"\x00", b"a", b"zzz", b"\xff\xff\xff", b"\x80\x00"] {
                assert_eq!(ranges.iter().filter(|r| r.contains(key)).count(), 1, "{groups} groups, key {key:?}");
            }
        }
    }

    #[test]
    fn a_split_makes_two_adjacent_ranges_of_the_next_version_on_the_same_nodes() {
        let learner = Replica { learner: true, addr: "10.0.0.4:7000".into(), ..Replica::voter(4, 9) };
        let range = RangeDescriptor {
            group_id: 7,
            start: b"b".to_vec(),
            end: Vec::new(),
            epoch: Some(RangeEpoch { version: 3, conf_version: 2 }),
            replicas: vec![Replica::voter(1, 1), Replica::voter(2, 2), learner.clone()],
            ..RangeDescriptor::default()
        };
        let request = SplitRequest::new(b"m".to_vec(), (8, 11), 3);
        let (left, right) = range.split(&request).unwrap();
        assert_eq!((left.group_id, left.start.as_slice(), left.end.as_slice()), (7, &b"b"[..], &b"m"[..]));
        assert_eq!((right.group_id, right.start.as_slice(), right.end.as_slice()), (8, &b"m"[..], &b""[..]));
        assert_eq!(left.replicas, range.replicas, "the left keeps its replicas");
        assert_eq!(right.replicas[2], Replica { replica_id: 13, ..learner }, "same nodes, learners, addresses");
        let next = RangeEpoch { version: 4, conf_version: 2 };
        assert_eq!((left.epoch(), right.epoch()), (next, next));
        for key in [&b"b"[..], b"c", b"l", b"m", b"z", b"\xff"] {
            assert_eq!(range.contains(key), left.contains(key) ^ right.contains(key), "{key:?} in exactly one");
        }
        assert!(!left.overlaps(&right) && !right.overlaps(&left), "adjacent ranges share no key");
        assert!(range.overlaps(&left) && right.overlaps(&range) && range.overlaps(&range));
        let before = RangeDescriptor { start: Vec::new(), end: b"b".to_vec(), ..range.clone() };
        assert!(!before.overlaps(&range) && before.overlaps(&RangeDescriptor { end: b"c".to_vec(), ..before.clone() }));
        // What does not fit: a key at the start or outside, an id in use, the wrong number of replica ids.
        let with = |change: fn(&mut SplitRequest)| {
            let mut request = request.clone();
            change(&mut request);
            range.split(&request)
        };
        assert!(with(|r| r.split_key = b"b".to_vec()).is_err(), "at the start: an empty left");
        assert!(with(|r| r.split_key = b"a".to_vec()).is_err(), "outside");
        assert!(with(|r| r.right_group_id = 7).is_err());
        assert!(with(|r| r.right_group_id = 0).is_err());
        assert!(with(|r| r.right_replica_ids.pop().map(drop).unwrap_or(())).is_err());
        assert!(with(|r| r.right_replica_ids[1] = 11).is_err(), "repeated");
        let bounded = RangeDescriptor { end: b"m".to_vec(), ..range.clone() };
        assert!(bounded.split(&request).is_err(), "at the end: an empty right");
    }

    #[test]
    fn requests_outside_the_range_or_with_another_epoch_get_typed_errors() {
        let range = RangeDescriptor {
            group_id: 7,
            start: b"b".to_vec(),
            end: b"d".to_vec(),
            epoch: Some(RangeEpoch { version: 3, conf_version: 2 }),
            replicas: vec![],
            ..RangeDescriptor::default()
        };
        assert_eq!(range.check(&[b"b", b"c"], Some(range.epoch())), Ok(()));
        assert_eq!(range.check(&[b"c"], None), Ok(()), "no epoch sent: the key check alone");
        assert!(
            matches!(range.check(&[b"d"], None), Err(RangeError::KeyNotInRange { key, current }) if key == b"d" && *current == range)
        );
        assert!(
            matches!(range.check(&[b"c", b"a"], None), Err(RangeError::BatchSpansRanges { first_outside, .. }) if first_outside == b"a")
        );
        let stale = RangeEpoch { version: 2, conf_version: 2 };
        assert!(matches!(range.check(&[b"c"], Some(stale)), Err(RangeError::StaleEpoch { sent, .. }) if sent == stale));
        let other_members = RangeEpoch { version: 3, conf_version: 1 };
        assert_eq!(
            range.check(&[b"c"], Some(other_members)),
            Ok(()),
            "a membership change leaves the range's keys where they were"
        );
        assert_eq!(RangeDescriptor::decode_stored(&range.encode()).unwrap(), range);
        assert!(range.check(&[b"d"], None).unwrap_err().to_string().contains("group 7 serves"));
    }

    #[test]
    fn any_stored_bytes_decode_or_fail_without_panicking() {
        // A real descriptor's bytes, mutated, and random bytes (the cargo-fuzz target `range_and_layout` runs the
        // same for longer).
        let replicas: Vec<Replica> = (1..=3).map(|id| Replica { learner: id == 3, ..Replica::voter(id, id) }).collect();
        let real = initial_ranges(4, 1, &replicas)[1].encode();
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..2_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut bytes = if round % 2 == 0 { real.clone() } else { rng.to_le_bytes().repeat((rng % 9) as usize) };
            if let Some(at) = (!bytes.is_empty()).then(|| (rng >> 8) as usize % bytes.len()) {
                bytes[at] ^= (rng >> 16) as u8;
            }
            if let Ok(range) = RangeDescriptor::decode_stored(&bytes) {
                let _ = range.contains(&bytes);
                let _ = range.check(&[&bytes], None);
            }
        }
    }
}
