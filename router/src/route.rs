//! Routing a request to the replica that can serve it: the table of ranges with the node believed to lead each
//! ([`RangeTable`]), and the policy for one attempt's answer ([`RangeTable::judge`]): done, fail with a typed
//! [`RouteError`], or retry after a pause — following a not-leader hint, trying the next node while a group has
//! no leader, waiting out a leadership transfer — all within the request's deadline.
//!
//! How an attempt travels is the caller's: the embedded `Db` hands it to an in-process store's mailbox (blocking
//! or async); a network client and a server forwarding a request send it over a connection. They share this
//! table and this policy, so a request is retried the same way wherever it comes from.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_raftstore::peer::PeerError;
use flotilla_raftstore::raft::DropReason;
use flotilla_raftstore::range::{RangeDescriptor, RangeError};

/// Why a routed request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// The request is not acceptable as it is (too large, …): nothing happened.
    InvalidArgument(String),
    /// An atomic batch touched keys of more than one group: nothing happened. `cut_at`: where the range of the
    /// batch's first key ends (its keys below it may go in one batch; empty: unbounded).
    BatchSpansRanges { first_outside: Vec<u8>, cut_at: Vec<u8> },
    /// The group is at a bound (uncommitted bytes, pending reads, a full mailbox): nothing happened.
    Busy(String),
    /// No answer in time: a write may or may not have taken effect.
    Timeout,
    /// The replica that took the write lost track of it (a snapshot replaced its log before the write applied).
    OutcomeUnknown,
    /// The node stopped on a storage failure (the reason): a write may or may not have taken effect.
    Storage(String),
    /// A membership change that does not fit the group's members (the reason): nothing happened.
    Membership(String),
}

/// What to do after one attempt of a request.
pub enum Attempt<T> {
    Done(T),
    Retry(Duration),
    Fail(RouteError),
    /// The group no longer holds the request's keys as this table says (a split moved them, or the request was
    /// routed with an older epoch): nothing happened; route it again by a table as the groups have it now.
    Reroute,
}

/// Where the answer to one attempt comes.
pub type Answer<T> = oneshot::Receiver<Result<T, PeerError>>;

/// The ranges (sorted by start key, covering the key space) and, per range, the node believed to lead its group.
pub struct RangeTable {
    ranges: Vec<RangeDescriptor>,
    leaders: Vec<AtomicU64>,
    /// Nodes are numbered `1..=nodes`.
    nodes: u64,
}

impl RangeTable {
    /// A table of `ranges` over `nodes` nodes; the group at position `i` is first tried on node `i mod nodes + 1`
    /// (where the embedded store has it campaign, spreading leaders over the nodes).
    pub fn new(mut ranges: Vec<RangeDescriptor>, nodes: u64) -> RangeTable {
        assert!(nodes >= 1 && !ranges.is_empty(), "a table of at least one range on at least one node");
        ranges.sort_by(|a, b| a.start.cmp(&b.start));
        let leaders = (0..ranges.len() as u64).map(|i| AtomicU64::new(i % nodes + 1)).collect();
        RangeTable { ranges, leaders, nodes }
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// This table with the leader hints of `older` for the groups both know (a table rebuilt after a split keeps
    /// what requests learned).
    pub fn with_hints_from(self, older: &RangeTable) -> RangeTable {
        let hints: std::collections::HashMap<u64, u64> =
            (0..older.len()).map(|at| (older.ranges[at].group_id, older.leader(at))).collect();
        for (position, range) in self.ranges.iter().enumerate() {
            if let Some(&leader) = hints.get(&range.group_id) {
                self.leaders[position].store(leader, Ordering::Relaxed);
            }
        }
        self
    }

    /// This table with what `ranges` say learned (descriptors as nodes applied them: a split's parts, a newer
    /// membership), keeping the leader hints of the groups both know. A range replaces the parts of the ranges
    /// it overlaps if it is newer than each of them (overlapping ranges are of one lineage: the higher version is
    /// the newer; of one group, the later membership), else it is ignored; what it does not cover of a range it
    /// replaces stays routed by that older range (refused there, and learned again), so the table always covers
    /// the key space.
    pub fn learned(&self, ranges: impl IntoIterator<Item = RangeDescriptor>) -> RangeTable {
        let mut table = self.ranges.clone();
        for range in ranges {
            // The meta range's own rule (`flotilla_raftstore::meta::learn`): the table a router caches and the one
            // the cluster keeps change alike.
            flotilla_raftstore::meta::learn(&mut table, range);
        }
        let learned = RangeTable::new(table, self.nodes);
        // A group the older table did not know is a split's: first tried where the range it split from was led
        // (where the embedded `Db`'s splits are led first; a cluster's load splits rotate their leaders, and the
        // first answer's hint corrects the guess).
        for (position, range) in learned.ranges.iter().enumerate() {
            learned.note_leader(position, self.leader(self.position_of(&range.start)));
        }
        learned.with_hints_from(self)
    }

    /// The nodes leaders are looked for on (`1..=nodes`).
    pub fn nodes(&self) -> u64 {
        self.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The range at `position`.
    pub fn range(&self, position: usize) -> &RangeDescriptor {
        &self.ranges[position]
    }

    pub fn ranges(&self) -> &[RangeDescriptor] {
        &self.ranges
    }

    /// The position of the range holding `key`.
    pub fn position_of(&self, key: &[u8]) -> usize {
        self.ranges.partition_point(|range| range.start.as_slice() <= key).saturating_sub(1)
    }

    /// The position of the one range holding every key of an atomic batch ([`RouteError::BatchSpansRanges`] if
    /// they lie in more than one; `InvalidArgument` if there are none).
    pub fn batch_position<'a>(&self, mut keys: impl Iterator<Item = &'a [u8]>) -> Result<usize, RouteError> {
        let first = keys.next().ok_or_else(|| RouteError::InvalidArgument("a batch of no operations".into()))?;
        let position = self.position_of(first);
        match keys.find(|key| !self.ranges[position].contains(key)) {
            Some(outside) => Err(RouteError::BatchSpansRanges {
                first_outside: outside.to_vec(),
                cut_at: self.ranges[position].end.clone(),
            }),
            None => Ok(position),
        }
    }

    /// The positions of the ranges a scan of `[start, end)` visits, in order (`end` empty: to the end).
    pub fn scan_positions(&self, start: &[u8], end: &[u8]) -> Result<Range<usize>, RouteError> {
        if !end.is_empty() && end < start {
            return Err(RouteError::InvalidArgument("scan end before start".into()));
        }
        let first = self.position_of(start);
        let last =
            if end.is_empty() { self.ranges.len() } else { self.ranges.partition_point(|r| r.start.as_slice() < end) };
        Ok(first..last.max(first + 1))
    }

    /// Notes `node` as the one believed to lead the group at `position` (a hint from elsewhere: a replica's).
    pub fn note_leader(&self, position: usize, node: u64) {
        if (1..=self.nodes).contains(&node) {
            self.leaders[position].store(node, Ordering::Relaxed);
        }
    }

    /// The node believed to lead the group at `position`.
    pub fn leader(&self, position: usize) -> u64 {
        self.leaders[position].load(Ordering::Relaxed)
    }

    /// The node believed to lead each group, by position.
    pub fn leaders(&self) -> Vec<u64> {
        self.leaders.iter().map(|leader| leader.load(Ordering::Relaxed)).collect()
    }

    /// What to do with the answer of an attempt sent to `node` for the range at `position` (`None`: none came
    /// in time). Learns where the leader is from not-leader answers.
    pub fn judge<T>(
        &self,
        position: usize,
        node: u64,
        answer: Option<Result<T, PeerError>>,
        deadline: Instant,
    ) -> Attempt<T> {
        let in_time = Instant::now() < deadline;
        match answer {
            Some(Ok(value)) => Attempt::Done(value),
            Some(Err(PeerError::NotLeader { leader })) if in_time => {
                // Nothing happened: go to the node of the replica the hint names, or try the next node while
                // there is no leader (or the hint names no replica the table knows).
                let hinted = self.ranges[position].replicas.iter().find(|r| r.replica_id == leader).map(|r| r.node_id);
                let next = hinted.filter(|n| (1..=self.nodes).contains(n)).unwrap_or(node % self.nodes + 1);
                self.leaders[position].store(next, Ordering::Relaxed);
                Attempt::Retry(if hinted.is_none() || next == node { Duration::from_millis(2) } else { Duration::ZERO })
            }
            Some(Err(PeerError::Dropped)) if in_time => Attempt::Retry(Duration::from_millis(1)),
            // A leadership transfer refuses proposals for at most about an election timeout: wait it out.
            Some(Err(PeerError::Busy(DropReason::Transferring))) if in_time => Attempt::Retry(Duration::from_millis(5)),
            Some(Err(PeerError::Busy(reason))) => Attempt::Fail(RouteError::Busy(format!("{reason:?}"))),
            Some(Err(PeerError::OutcomeUnknown)) => Attempt::Fail(RouteError::OutcomeUnknown),
            Some(Err(PeerError::Membership(reason))) => Attempt::Fail(RouteError::Membership(reason)),
            Some(Err(PeerError::InvalidSplit(reason) | PeerError::InvalidMerge(reason))) => {
                Attempt::Fail(RouteError::InvalidArgument(reason))
            }
            // Frozen for a merge: for a few milliseconds (then its keys are the left group's, or it takes them
            // again); asked again often enough that a write does not wait much past the freeze.
            Some(Err(PeerError::Range(RangeError::Merging { .. }))) if in_time => {
                Attempt::Retry(Duration::from_micros(500))
            }
            Some(Err(PeerError::Stopped(reason))) => Attempt::Fail(RouteError::Storage(reason)),
            Some(Err(PeerError::TooLarge { bytes, max })) => Attempt::Fail(RouteError::InvalidArgument(format!(
                "the batch encodes to {bytes} bytes, over the {max} one log entry holds"
            ))),
            Some(Err(PeerError::Range(RangeError::BatchSpansRanges { first_outside, current }))) => {
                Attempt::Fail(RouteError::BatchSpansRanges { first_outside, cut_at: current.end })
            }
            Some(Err(PeerError::Range(RangeError::KeyNotInRange { .. } | RangeError::StaleEpoch { .. })))
                if in_time =>
            {
                Attempt::Reroute
            }
            Some(Err(other)) if in_time => Attempt::Fail(RouteError::Storage(format!("unexpected refusal: {other:?}"))),
            Some(Err(_)) | None => Attempt::Fail(RouteError::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_raftstore::range::{initial_ranges, Replica};

    fn table() -> RangeTable {
        let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
        RangeTable::new(initial_ranges(4, 1, &replicas), 3)
    }

    #[test]
    fn keys_and_scans_find_their_ranges() {
        let table = table();
        assert_eq!(table.position_of(b""), 0);
        assert_eq!(table.position_of(&[0xff; 8]), 3);
        for position in 0..4 {
            assert_eq!(table.position_of(&table.range(position).start), position);
        }
        assert_eq!(table.scan_positions(b"", b"").unwrap(), 0..4);
        assert_eq!(table.scan_positions(&[0x50], &[0x60]).unwrap(), 1..2);
        assert!(matches!(table.scan_positions(b"b", b"a"), Err(RouteError::InvalidArgument(_))));
        let (first, second) = (table.range(1).start.clone(), table.range(2).start.clone());
        assert_eq!(table.batch_position([first.as_slice(), &[first[0], 1]].into_iter()).unwrap(), 1);
        assert_eq!(
            table.batch_position([first.as_slice(), second.as_slice()].into_iter()),
            Err(RouteError::BatchSpansRanges { first_outside: second.clone(), cut_at: second.clone() })
        );
        assert_eq!(table.leaders(), vec![1, 2, 3, 1], "leaders spread over the nodes at first");
    }

    #[test]
    fn answers_are_judged_and_leader_hints_followed_within_the_deadline() {
        let table = table();
        let later = Instant::now() + Duration::from_secs(60);
        assert!(matches!(table.judge(0, 1, Some(Ok(7)), later), Attempt::Done(7)));
        let hinted: Attempt<()> = table.judge(0, 1, Some(Err(PeerError::NotLeader { leader: 3 })), later);
        assert!(matches!(hinted, Attempt::Retry(pause) if pause.is_zero()));
        assert_eq!(table.leader(0), 3);
        let leaderless: Attempt<()> = table.judge(0, 3, Some(Err(PeerError::NotLeader { leader: 0 })), later);
        assert!(matches!(leaderless, Attempt::Retry(_)));
        assert_eq!(table.leader(0), 1, "the next node, wrapping");
        let bogus: Attempt<()> = table.judge(0, 1, Some(Err(PeerError::NotLeader { leader: 99 })), later);
        assert!(matches!(bogus, Attempt::Retry(_)));
        assert_eq!(table.leader(0), 2, "a hint naming no replica of the group is not followed");
        let stopped: Attempt<()> = table.judge(0, 2, Some(Err(PeerError::Stopped("disk".into()))), later);
        assert!(matches!(stopped, Attempt::Fail(RouteError::Storage(reason)) if reason == "disk"));
        let past = Instant::now() - Duration::from_millis(1);
        let late: Attempt<()> = table.judge(0, 2, Some(Err(PeerError::NotLeader { leader: 1 })), past);
        assert!(matches!(late, Attempt::Fail(RouteError::Timeout)));
        assert!(matches!(table.judge::<()>(0, 2, None, later), Attempt::Fail(RouteError::Timeout)));
    }

    #[test]
    fn a_table_learns_splits_and_always_covers_the_key_space() {
        let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
        let whole = initial_ranges(1, 1, &replicas).remove(0);
        let split = |range: &RangeDescriptor, key: &[u8], group: u64| {
            let ids = vec![group * 10 + 1, group * 10 + 2, group * 10 + 3];
            let request = flotilla_raftstore::range::SplitRequest {
                split_key: key.to_vec(),
                right_group_id: group,
                right_replica_ids: ids,
                ..Default::default()
            };
            range.split(&request).unwrap()
        };
        let (left, right) = split(&whole, b"m", 2);
        let (left_left, left_right) = split(&left, b"f", 3);
        let table = RangeTable::new(vec![whole.clone()], 3);
        table.leaders[0].store(2, Ordering::Relaxed);
        // Only the newest left part known: the rest is still routed by the range it came from.
        let learned = table.learned([left_left.clone()]);
        let bounds: Vec<_> = learned.ranges().iter().map(|r| (r.group_id, r.start.clone(), r.end.clone())).collect();
        assert_eq!(bounds, vec![(1, vec![], b"f".to_vec()), (1, b"f".to_vec(), vec![])]);
        assert_eq!(learned.leaders(), vec![2, 2], "hints kept by group");
        // Older views change nothing; the rest completes it.
        let learned = learned.learned([whole, left.clone(), right.clone(), left_right.clone()]);
        assert_eq!(learned.ranges(), &[left_left, left_right, right][..]);
        assert_eq!(learned.position_of(b"g"), 1);
    }
}
