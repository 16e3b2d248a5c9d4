//! The **local read path**: linearizable reads served on the caller's thread, from the node's state machine,
//! without a message to the replica — while the replica leads and either is its group's only voter or holds a
//! leader lease (as TiKV's local reader does).
//!
//! After every handling of a replica, and before any message that handling produced leaves the node, the host
//! loop publishes the replica's [`LocalReadGrant`] in the group's [`ReadLease`] (`StoreHandler::carry_out`): a
//! lease becomes a deadline on the node's clock, the count of [`TickClock`] intervals before which it runs out.
//! A caller reads the clock and the deadline — two loads, no lock — and serves the read from the state machine
//! if it holds, else sends it to the replica (ReadIndex). The deadline is never later than the one the replica
//! itself judges by: the replica's ticks trail the node's clock, and a stalled replica's missed ticks count
//! against its lease (`Peer::skip_ticks`). The caller judges it on the clock as it reads it, so a node paused
//! past its lease (SIGSTOP, a stalled poller) serves nothing locally when it resumes, whatever its replicas
//! have or have not handled meanwhile.
//!
//! Why publishing before messages leave matters: a leader that hands over leadership sends TimeoutNow, and its
//! target may win an election at once, inside the lease. The core ends the lease when the transfer starts, and
//! the published deadline goes to "none" before the TimeoutNow is out. Likewise a vote this replica grants, a
//! step-down: nothing another node can act on leaves before the grant that no longer holds is withdrawn.
//!
//! Two routing facts travel the same way, for the node's router (`src/server/requests.rs`): the leader each
//! replica knows ([`ReadLease::leader_hint`]), and a count of the splits and merges this node's replicas applied
//! ([`LocalReader::ranges_changed`]) — never used to grant a read. And one count travels back: the reads served
//! locally, for the replica's load trigger ([`LocalReader::count_read`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use super::fsm::PeerMsg;
use super::mailboxes::Mailboxes;
use super::ticks::TickClock;
use crate::peer::LocalReadGrant;

/// One group's published grant on this node: the node tick before which reads may be served locally (0: none;
/// `u64::MAX`: until the replica says otherwise), and the version of the range it covers (a split shrinks the
/// range: a caller that routed with an older version may hold a key the group no longer serves). One per group
/// per node, kept for the node's life, so a caller may hold on to it (a replica destroyed and created again
/// publishes in the same one).
#[derive(Debug, Default)]
pub struct ReadLease {
    until: AtomicU64,
    range_version: AtomicU64,
    /// The node the replica last believed to lead its group (0: none known): a routing hint only, never a grant.
    leader_node: AtomicU64,
    /// Reads served locally since the replica last took them ([`LocalReader::count_read`]), and the keys of
    /// some: reads that never reach the replica still count toward its load (`split_trigger.rs`).
    local_reads: AtomicU64,
    local_read_keys: Mutex<Vec<Vec<u8>>>,
}

/// Every this-many-th local read's key is kept for the load trigger's sample ...
const LOCAL_READ_SAMPLE_STRIDE: u64 = 16;
/// ... up to this many between two takes (a replica takes them on each of its ticks).
const LOCAL_READ_SAMPLES_MAX: usize = 64;
/// Every this-many-th local read tells the replica (`PeerMsg::LocalReads`): a leader that hibernates takes no
/// ticks, so without it a range read only locally would never count as busy.
const LOCAL_READS_PER_WAKE: u64 = 1024;

const NONE: u64 = 0;
const UNTIL_CHANGED: u64 = u64::MAX;

impl ReadLease {
    /// Publishes `grant` for the range at `range_version`, judged at node tick `now_tick` (the tick the replica's
    /// own tick count stands for).
    pub(crate) fn publish(&self, grant: LocalReadGrant, now_tick: u64, range_version: u64) {
        let until = match grant {
            LocalReadGrant::No => NONE,
            LocalReadGrant::UntilChanged => UNTIL_CHANGED,
            LocalReadGrant::Ticks(ticks) => now_tick.saturating_add(ticks).min(UNTIL_CHANGED - 1),
        };
        // The version first: a reader that sees this deadline sees this version or a later one. (One that sees
        // the older deadline with the newer version reads under a grant for a range that held its key anyway.)
        self.range_version.store(range_version, Ordering::Release);
        // Release: the state machine's applies before this handling happen before a reader that sees it.
        self.until.store(until, Ordering::Release);
    }

    /// Withdraws any grant (the replica stopped leading here, or is going away).
    pub(crate) fn withdraw(&self) {
        self.until.store(NONE, Ordering::Release);
    }

    /// Notes the node the replica believes leads its group (0: none known).
    pub(crate) fn note_leader(&self, node_id: u64) {
        self.leader_node.store(node_id, Ordering::Relaxed);
    }

    /// A read of `key` was served locally under this grant: counted (and sometimes its key kept) for the
    /// replica's load trigger. Returns whether the replica should be told now (`PeerMsg::LocalReads`).
    fn note_local_read(&self, key: &[u8]) -> bool {
        let reads = self.local_reads.fetch_add(1, Ordering::Relaxed) + 1;
        if reads.is_multiple_of(LOCAL_READ_SAMPLE_STRIDE) {
            let mut keys = self.local_read_keys.lock();
            if keys.len() < LOCAL_READ_SAMPLES_MAX {
                keys.push(key.to_vec());
            }
        }
        reads.is_multiple_of(LOCAL_READS_PER_WAKE)
    }

    /// The reads served locally since the last take, and the keys kept of them.
    pub(crate) fn take_local_reads(&self) -> (u64, Vec<Vec<u8>>) {
        match self.local_reads.swap(0, Ordering::Relaxed) {
            0 => (0, Vec::new()),
            reads => (reads, std::mem::take(&mut *self.local_read_keys.lock())),
        }
    }

    /// The node this node's replica of the group believed to lead it at its last handling (`None`: it knows no
    /// leader, or there is no replica here). A hint for routing — it may be stale by the time it is used.
    pub fn leader_hint(&self) -> Option<u64> {
        Some(self.leader_node.load(Ordering::Relaxed)).filter(|&node| node != 0)
    }
}

/// The node's published grants, and the clock they are judged on.
pub struct LocalReader {
    clock: Arc<dyn TickClock>,
    leases: Mutex<FxHashMap<u64, Arc<ReadLease>>>,
    /// Splits and merges this node's replicas applied (`LocalReader::ranges_changed`).
    ranges_changed: AtomicU64,
    /// Whether reads served locally are counted for the replicas' load trigger (it is on).
    reads_counted: bool,
}

impl LocalReader {
    /// `reads_counted`: the replicas' load trigger is on, and reads served locally count toward it.
    pub(crate) fn new(clock: Arc<dyn TickClock>, reads_counted: bool) -> LocalReader {
        LocalReader { clock, leases: Mutex::default(), ranges_changed: AtomicU64::new(0), reads_counted }
    }

    /// A read of `key` was served locally under `lease`'s grant, group `group_id`'s: it counts toward the group's
    /// load where the load trigger is on (nothing to do where it is off: the embedded default splits by size
    /// only), and now and then the replica is told through `mailboxes` (`PeerMsg::LocalReads`; a full mailbox
    /// drops it: the replica is busy anyway). The one call of every caller that serves reads locally.
    pub fn count_read(&self, lease: &ReadLease, group_id: u64, key: &[u8], mailboxes: &dyn Mailboxes) {
        if self.note_read(lease, key) {
            let _ = mailboxes.send(group_id, PeerMsg::LocalReads);
        }
    }

    /// [`LocalReader::count_read`]'s count: whether the replica should be told now.
    fn note_read(&self, lease: &ReadLease, key: &[u8]) -> bool {
        self.reads_counted && lease.note_local_read(key)
    }

    /// Group `group_id`'s lease on this node (made on first ask, kept for the node's life). Look it up once and
    /// keep it: [`LocalReader::holds`] needs no lock.
    pub fn lease(&self, group_id: u64) -> Arc<ReadLease> {
        Arc::clone(self.leases.lock().entry(group_id).or_default())
    }

    /// How many times this node's replicas changed their ranges (a split or a merge applied here): a router whose
    /// table predates the count learns the ranges again before it routes by them. Counted once the state machine
    /// holds the change.
    pub fn ranges_changed(&self) -> u64 {
        self.ranges_changed.load(Ordering::Acquire)
    }

    pub(crate) fn note_ranges_changed(&self) {
        self.ranges_changed.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a read of the group `lease` belongs to, routed by its range at `range_version`, may be served now
    /// from the node's state machine: it reflects every write acknowledged before this call. Read the state
    /// machine after this says yes. A caller whose range is older or newer than the replica's is sent to the
    /// replica, which checks the key against the range it has.
    pub fn holds(&self, lease: &ReadLease, range_version: u64) -> bool {
        let granted = match lease.until.load(Ordering::Acquire) {
            NONE => false,
            UNTIL_CHANGED => true,
            until => self.clock.ticks() < until,
        };
        granted && lease.range_version.load(Ordering::Acquire) == range_version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ticks::ManualClock;

    #[test]
    fn local_reads_are_counted_sampled_within_bounds_and_told_now_and_then() {
        let lease = ReadLease::default();
        assert_eq!(lease.take_local_reads(), (0, Vec::new()), "none yet");
        let told: Vec<u64> =
            (1..=3 * LOCAL_READS_PER_WAKE).filter(|&i| lease.note_local_read(format!("k{i}").as_bytes())).collect();
        assert_eq!(told, vec![LOCAL_READS_PER_WAKE, 2 * LOCAL_READS_PER_WAKE, 3 * LOCAL_READS_PER_WAKE]);
        let (reads, keys) = lease.take_local_reads();
        assert_eq!(reads, 3 * LOCAL_READS_PER_WAKE);
        assert_eq!(keys.len(), LOCAL_READ_SAMPLES_MAX, "at most this many keys between two takes");
        assert_eq!(keys[0], format!("k{LOCAL_READ_SAMPLE_STRIDE}").into_bytes(), "every stride-th read's key");
        assert_eq!(lease.take_local_reads(), (0, Vec::new()), "taken");
        lease.note_local_read(b"a");
        assert_eq!(lease.take_local_reads(), (1, Vec::new()), "counted, not sampled");
    }

    #[test]
    fn local_reads_are_counted_only_where_the_load_trigger_is_on() {
        let clock: Arc<dyn TickClock> = Arc::new(ManualClock::default());
        let (on, off) = (LocalReader::new(Arc::clone(&clock), true), LocalReader::new(clock, false));
        let (counted, uncounted) = (on.lease(1), off.lease(1));
        for _ in 0..LOCAL_READS_PER_WAKE {
            on.note_read(&counted, b"k");
            assert!(!off.note_read(&uncounted, b"k"), "never told");
        }
        assert_eq!(counted.take_local_reads().0, LOCAL_READS_PER_WAKE);
        assert_eq!(uncounted.take_local_reads(), (0, Vec::new()));
    }

    #[test]
    fn a_lease_holds_until_the_node_clock_reaches_its_deadline() {
        let clock = Arc::new(ManualClock::default());
        let reader = LocalReader::new(Arc::clone(&clock) as Arc<dyn TickClock>, true);
        let lease = reader.lease(7);
        assert!(Arc::ptr_eq(&lease, &reader.lease(7)), "one per group");
        assert!(!reader.holds(&lease, 1), "nothing published yet");
        clock.set(10);
        lease.publish(LocalReadGrant::Ticks(3), 10, 1);
        assert!(reader.holds(&lease, 1));
        clock.set(12);
        assert!(reader.holds(&lease, 1));
        clock.set(13);
        assert!(!reader.holds(&lease, 1), "the deadline is on the clock, whether or not the replica ran since");
        lease.publish(LocalReadGrant::UntilChanged, 13, 1);
        clock.set(1_000_000);
        assert!(reader.holds(&lease, 1));
        lease.withdraw();
        assert!(!reader.holds(&lease, 1));
        lease.publish(LocalReadGrant::Ticks(5), 1_000_000, 1);
        lease.publish(LocalReadGrant::No, 1_000_000, 1);
        assert!(!reader.holds(&lease, 1));
        // A grant covers the range at the version it was published for: after a split, a caller that routed
        // with the range as it was goes to the replica.
        lease.publish(LocalReadGrant::UntilChanged, 1_000_000, 2);
        assert!(reader.holds(&lease, 2));
        assert!(!reader.holds(&lease, 1));
    }
}
