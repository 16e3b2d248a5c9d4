//! Which group holds which keys on one node ([`RangeClaims`]), shared by the node's replicas.
//!
//! A node's groups share one state machine, one key space: a key's data there must belong to one group at a
//! time, or one group's entries overwrite another's data. Two changes put a range under a group, from different
//! pollers: a **split** applied by the group that held the keys (its right part becomes a new group here), and a
//! **snapshot install** of a group (a replica that was empty, or behind). They race when this node's replica of
//! the splitting group lags: the new group, elected on the other nodes, sends this node a snapshot while the old
//! group here still holds those keys — and would then apply its entries from before the split on top of the
//! snapshot's newer data (TiKV's "snapshot range overlaps" case; `store-sim` seed 1 found it at once).
//!
//! So each group's range is *claimed* here, and every change is checked and recorded under one lock:
//! - a replica that opens with a range claims it ([`RangeClaims::hold`]);
//! - a snapshot is taken only if no other group's claim overlaps its range — and, for a replica without a range
//!   yet, only if no split already claimed its group here (the split's replica opens from the split's state and
//!   replaces the empty one) ([`RangeClaims::claim_for_install`]); a snapshot the core then refuses gives the
//!   claim back ([`RangeClaims::restore`]). A refused snapshot is rejected to its sender, which retries later,
//!   by which time the split has applied here (or a snapshot of the old group shrank it);
//! - a split shrinks the old group's claim and claims the new group's part, unless that group claimed it
//!   first ([`RangeClaims::split`]);
//! - a destroyed replica's claim goes once its data is dropped ([`RangeClaims::release`]);
//! - a merge commit moves the right group's claim to the left group ([`RangeClaims::merge`]). A right range
//!   *decided* for a merge (`peer/merge.rs`) is the left group's already: an install of the left group at an epoch
//!   past the one the merge was decided for (the merge committed, then) ends it, whether or not the snapshot
//!   still covers its keys; the install of any other group is refused while it holds them (the left group's
//!   replica here catches up and ends it first).

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;

use crate::range::{RangeDescriptor, RangeEpoch};

/// The claims of one node's groups (see the module docs).
#[derive(Debug, Default)]
pub struct RangeClaims {
    inner: Mutex<Claims>,
}

#[derive(Debug, Default)]
struct Claims {
    /// By start key: the end (empty: unbounded) and the group.
    by_start: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    /// By group: its start key.
    starts: HashMap<u64, Vec<u8>>,
    /// The groups decided for a merge: into which group, as of which of its epochs.
    decided: HashMap<u64, (u64, RangeEpoch)>,
}

/// One group's claim: its range, and the merge it is decided for, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Claim {
    start: Vec<u8>,
    end: Vec<u8>,
    decided: Option<(u64, RangeEpoch)>,
}

/// The claims an install replaced (to give back if the install does not happen): the group's own, and those
/// of the decided right ranges it ends.
#[derive(Debug, PartialEq, Eq)]
pub struct PreviousClaim {
    own: Option<Claim>,
    ended: Vec<(u64, Claim)>,
}

impl PreviousClaim {
    /// The decided right ranges the install ends here (their replicas must stop, their records say merged).
    pub fn ended(&self) -> Vec<u64> {
        self.ended.iter().map(|(group_id, _)| *group_id).collect()
    }
}

impl Claims {
    /// The group other than `group_id` whose claim overlaps `[start, end)`, if any.
    fn overlapping(&self, group_id: u64, start: &[u8], end: &[u8]) -> Option<u64> {
        // Claims do not overlap one another: only the last ones starting before `end` can reach into the range.
        use std::ops::Bound::{Excluded, Unbounded};
        let upper = if end.is_empty() { Unbounded } else { Excluded(end) };
        let below_end = self.by_start.range::<[u8], _>((Unbounded, upper));
        let (_, (other_end, other)) = below_end.rev().find(|(_, (_, group))| *group != group_id)?;
        (other_end.is_empty() || other_end.as_slice() > start).then_some(*other)
    }

    fn remove(&mut self, group_id: u64) -> Option<Claim> {
        let start = self.starts.remove(&group_id)?;
        let (end, _) = self.by_start.remove(&start).expect("indexed both ways");
        Some(Claim { start, end, decided: self.decided.remove(&group_id) })
    }

    fn insert(&mut self, group_id: u64, start: &[u8], end: &[u8]) {
        self.remove(group_id);
        if let Some((_, other)) = self.by_start.get(start) {
            panic!("group {group_id} claims [{start:?}, {end:?}) over group {other}'s claim at that start; claims: {:?} decided {:?}", self.by_start, self.decided);
        }
        self.by_start.insert(start.to_vec(), (end.to_vec(), group_id));
        self.starts.insert(group_id, start.to_vec());
    }

    /// Claims `range` for its group, with the merge it is decided for, if any.
    fn hold(&mut self, range: &RangeDescriptor) {
        self.insert(range.group_id, &range.start, &range.end);
        if let Some(state) = range.merge.filter(|state| state.decided_index != 0) {
            self.decided.insert(range.group_id, (state.into_group_id, state.into_epoch.unwrap_or_default()));
        }
    }

    fn put(&mut self, group_id: u64, claim: Claim) {
        self.insert(group_id, &claim.start, &claim.end);
        if let Some(decided) = claim.decided {
            self.decided.insert(group_id, decided);
        }
    }

    /// The decided right ranges an install of `range` ends: those decided for a merge into its group at an
    /// epoch it has moved past (the merge committed).
    fn ended_by(&self, range: &RangeDescriptor) -> Vec<u64> {
        let now = range.epoch();
        let past = |then: RangeEpoch| now.version > then.version || now.conf_version > then.conf_version;
        let mut ended: Vec<u64> = (self.decided.iter())
            .filter(|(_, (into, then))| *into == range.group_id && past(*then))
            .map(|(group_id, _)| *group_id)
            .collect();
        ended.sort_unstable();
        ended
    }
}

impl RangeClaims {
    /// Records `range` as its group's (a replica opened with it, or its merge state changed).
    pub fn hold(&self, range: &RangeDescriptor) {
        self.inner.lock().hold(range);
    }

    /// A merge commit applied by `left`'s group: the claims of the groups it took in go to it.
    pub fn merge(&self, left: &RangeDescriptor, rights: &[u64]) {
        let mut claims = self.inner.lock();
        for right in rights {
            claims.remove(*right);
        }
        claims.insert(left.group_id, &left.start, &left.end);
    }

    /// Claims `range` for a snapshot install of its group: `Err` with the group that holds keys of it here, if
    /// another does — or with the group itself if `initialized` is false (the replica has no range yet) and a
    /// split already claimed the group here. `Ok` with the group's previous claim, for [`RangeClaims::restore`].
    pub fn claim_for_install(&self, range: &RangeDescriptor, initialized: bool) -> Result<PreviousClaim, u64> {
        let mut claims = self.inner.lock();
        if !initialized && claims.starts.contains_key(&range.group_id) {
            return Err(range.group_id);
        }
        let ended_ids = claims.ended_by(range);
        let ended: Vec<(u64, Claim)> =
            ended_ids.iter().map(|group_id| (*group_id, claims.remove(*group_id).expect("claimed"))).collect();
        if let Some(other) = claims.overlapping(range.group_id, &range.start, &range.end) {
            for (group_id, claim) in ended {
                claims.put(group_id, claim);
            }
            return Err(other);
        }
        let own = claims.remove(range.group_id);
        claims.hold(range); // a snapshot of a decided range keeps it decided here (`store-sim` seed 744)
        Ok(PreviousClaim { own, ended })
    }

    /// Gives the claims back as they were before [`RangeClaims::claim_for_install`].
    pub fn restore(&self, group_id: u64, previous: PreviousClaim) {
        let mut claims = self.inner.lock();
        claims.remove(group_id);
        if let Some(claim) = previous.own {
            claims.put(group_id, claim);
        }
        for (ended, claim) in previous.ended {
            claims.put(ended, claim);
        }
    }

    /// A split applied by `left`'s group: its claim shrinks to `left`, and each of `rights` (the groups its
    /// splits made) is claimed unless its group holds a claim here already (its snapshot came first). Returns,
    /// per right, whether it was claimed now (the split creates that group here).
    pub fn split(&self, left: &RangeDescriptor, rights: &[&RangeDescriptor]) -> Vec<bool> {
        let mut claims = self.inner.lock();
        claims.insert(left.group_id, &left.start, &left.end);
        rights
            .iter()
            .map(|right| {
                if claims.starts.contains_key(&right.group_id) {
                    return false;
                }
                claims.insert(right.group_id, &right.start, &right.end);
                true
            })
            .collect()
    }

    /// Drops a group's claim (its replica was destroyed here, its data dropped).
    pub fn release(&self, group_id: u64) {
        self.inner.lock().remove(group_id);
    }

    /// The group whose claim ends where `start` begins (a range's left neighbour here), with its claimed
    /// `[start, end)`.
    pub fn left_of(&self, start: &[u8]) -> Option<(u64, Vec<u8>, Vec<u8>)> {
        let claims = self.inner.lock();
        use std::ops::Bound::{Excluded, Unbounded};
        let (left_start, (end, group_id)) =
            claims.by_start.range::<[u8], _>((Unbounded, Excluded(start))).next_back()?;
        (end.as_slice() == start).then(|| (*group_id, left_start.clone(), end.clone()))
    }

    /// The group's claimed `[start, end)`, if any.
    pub fn claimed(&self, group_id: u64) -> Option<(Vec<u8>, Vec<u8>)> {
        let claims = self.inner.lock();
        let start = claims.starts.get(&group_id)?;
        Some((start.clone(), claims.by_start[start].0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(group_id: u64, start: &[u8], end: &[u8]) -> RangeDescriptor {
        RangeDescriptor { group_id, start: start.to_vec(), end: end.to_vec(), ..RangeDescriptor::default() }
    }

    #[test]
    fn an_install_overlapping_another_groups_keys_is_refused_until_that_group_lets_them_go() {
        let claims = RangeClaims::default();
        claims.hold(&range(1, b"", b"m"));
        claims.hold(&range(2, b"m", b""));
        // Group 1 split at "f" on the other nodes; its new group 3's snapshot reaches this node first.
        let new_group = range(3, b"f", b"m");
        assert_eq!(claims.claim_for_install(&new_group, false), Err(1), "group 1 still holds those keys here");
        assert_eq!(claims.claim_for_install(&range(2, b"k", b""), true), Err(1), "nor may a group grow into them");
        // The split applies here: group 3 is claimed by it, and its empty replica's install is refused.
        assert_eq!(claims.split(&range(1, b"", b"f"), &[&new_group]), vec![true]);
        assert_eq!(claims.claim_for_install(&new_group, false), Err(3), "the split's replica replaces the empty one");
        // Once initialized, a newer snapshot of its own range is taken.
        let previous = claims.claim_for_install(&new_group, true).unwrap();
        assert_eq!(previous.own.map(|claim| (claim.start, claim.end)), Some((b"f".to_vec(), b"m".to_vec())));
        assert_eq!(claims.claimed(3), Some((b"f".to_vec(), b"m".to_vec())));
    }

    #[test]
    fn a_snapshot_that_came_first_keeps_its_group_and_a_refused_one_gives_its_claim_back() {
        let claims = RangeClaims::default();
        claims.hold(&range(1, b"a", b"f"));
        // Group 1 here caught up past its split by a snapshot (shrunk): the new group's snapshot may come.
        let previous = claims.claim_for_install(&range(3, b"f", b"m"), false).unwrap();
        assert_eq!(previous, PreviousClaim { own: None, ended: Vec::new() });
        assert_eq!(claims.split(&range(1, b"a", b"f"), &[&range(3, b"f", b"m")]), vec![false], "claimed first");
        // The core refused that snapshot after all: the claim goes back to none.
        claims.restore(3, previous);
        assert_eq!(claims.claimed(3), None);
        assert_eq!(claims.split(&range(1, b"a", b"f"), &[&range(3, b"f", b"m")]), vec![true]);
        claims.release(3);
        assert_eq!(claims.claimed(3), None);
        assert!(claims.claim_for_install(&range(4, b"g", b"z"), false).is_ok(), "released keys may be claimed");
        assert_eq!(claims.claim_for_install(&range(5, b"", b"b"), false), Err(1), "an unbounded start overlaps");
        assert!(claims.claim_for_install(&range(5, b"", b"a"), false).is_ok(), "adjacent");
    }

    #[test]
    fn an_install_of_the_left_group_past_the_merge_ends_its_decided_right_ranges_and_no_other_install_does() {
        use crate::range::{MergeState, RangeEpoch};
        let claims = RangeClaims::default();
        let locked_at = RangeEpoch { version: 3, conf_version: 1 };
        let state = MergeState {
            into_group_id: 1,
            into_epoch: Some(locked_at),
            frozen_index: 7,
            decided_index: 9,
            decided_term: 2,
        };
        claims.hold(&range(1, b"a", b"f"));
        claims.hold(&RangeDescriptor { merge: Some(MergeState { decided_index: 0, ..state }), ..range(2, b"f", b"m") });
        let at = |group_id, start: &[u8], end: &[u8], version| RangeDescriptor {
            epoch: Some(RangeEpoch { version, conf_version: 1 }),
            ..range(group_id, start, end)
        };
        // Frozen, not decided: the merge may still be given up; nothing ends it.
        assert_eq!(claims.claim_for_install(&at(1, b"a", b"m", 4), true), Err(2));
        claims.hold(&RangeDescriptor { merge: Some(state), ..range(2, b"f", b"m") });
        // Decided: another group's install is refused, and the left group's at the locked epoch (before the
        // commit) does not reach it.
        assert_eq!(claims.claim_for_install(&at(3, b"f", b"g", 9), false), Err(2));
        assert_eq!(claims.claim_for_install(&at(1, b"a", b"f", 3), true).unwrap().ended(), Vec::<u64>::new());
        // Past it, the left group's install ends it — also one that no longer covers its keys (split since) — and
        // gives it back if the install is dropped.
        let previous = claims.claim_for_install(&at(1, b"a", b"c", 6), true).unwrap();
        assert_eq!(previous.ended(), vec![2]);
        assert_eq!(claims.claimed(2), None);
        claims.restore(1, previous);
        assert_eq!(claims.claimed(2), Some((b"f".to_vec(), b"m".to_vec())));
        assert_eq!(claims.claim_for_install(&at(1, b"a", b"m", 6), true).unwrap().ended(), vec![2]);
        // A commit applied moves the claims the same way.
        claims.hold(&range(4, b"m", b"z"));
        claims.merge(&range(1, b"a", b"z"), &[4]);
        assert_eq!((claims.claimed(1), claims.claimed(4)), (Some((b"a".to_vec(), b"z".to_vec())), None));
    }
}
