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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use super::ticks::TickClock;
use crate::peer::LocalReadGrant;

/// One group's published grant on this node: the node tick before which reads may be served locally (0: none;
/// `u64::MAX`: until the replica says otherwise). One per group per node, kept for the node's life, so a caller
/// may hold on to it (a replica destroyed and created again publishes in the same one).
#[derive(Debug, Default)]
pub struct ReadLease(AtomicU64);

const NONE: u64 = 0;
const UNTIL_CHANGED: u64 = u64::MAX;

impl ReadLease {
    /// Publishes `grant`, judged at node tick `now_tick` (the tick the replica's own tick count stands for).
    pub(crate) fn publish(&self, grant: LocalReadGrant, now_tick: u64) {
        let until = match grant {
            LocalReadGrant::No => NONE,
            LocalReadGrant::UntilChanged => UNTIL_CHANGED,
            LocalReadGrant::Ticks(ticks) => now_tick.saturating_add(ticks).min(UNTIL_CHANGED - 1),
        };
        // Release: the state machine's applies before this handling happen before a reader that sees it.
        self.0.store(until, Ordering::Release);
    }

    /// Withdraws any grant (the replica stopped leading here, or is going away).
    pub(crate) fn withdraw(&self) {
        self.0.store(NONE, Ordering::Release);
    }

    fn until(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// The node's published grants, and the clock they are judged on.
pub struct LocalReader {
    clock: Arc<dyn TickClock>,
    leases: Mutex<FxHashMap<u64, Arc<ReadLease>>>,
}

impl LocalReader {
    pub(crate) fn new(clock: Arc<dyn TickClock>) -> LocalReader {
        LocalReader { clock, leases: Mutex::default() }
    }

    /// Group `group_id`'s lease on this node (made on first ask, kept for the node's life). Look it up once and
    /// keep it: [`LocalReader::holds`] needs no lock.
    pub fn lease(&self, group_id: u64) -> Arc<ReadLease> {
        Arc::clone(self.leases.lock().entry(group_id).or_default())
    }

    /// Whether a read of the group `lease` belongs to may be served now from the node's state machine: it
    /// reflects every write acknowledged before this call. Read the state machine after this says yes.
    pub fn holds(&self, lease: &ReadLease) -> bool {
        match lease.until() {
            NONE => false,
            UNTIL_CHANGED => true,
            until => self.clock.ticks() < until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ticks::ManualClock;

    #[test]
    fn a_lease_holds_until_the_node_clock_reaches_its_deadline() {
        let clock = Arc::new(ManualClock::default());
        let reader = LocalReader::new(Arc::clone(&clock) as Arc<dyn TickClock>);
        let lease = reader.lease(7);
        assert!(Arc::ptr_eq(&lease, &reader.lease(7)), "one per group");
        assert!(!reader.holds(&lease), "nothing published yet");
        clock.set(10);
        lease.publish(LocalReadGrant::Ticks(3), 10);
        assert!(reader.holds(&lease));
        clock.set(12);
        assert!(reader.holds(&lease));
        clock.set(13);
        assert!(!reader.holds(&lease), "the deadline is on the clock, whether or not the replica ran since");
        lease.publish(LocalReadGrant::UntilChanged, 13);
        clock.set(1_000_000);
        assert!(reader.holds(&lease));
        lease.withdraw();
        assert!(!reader.holds(&lease));
        lease.publish(LocalReadGrant::Ticks(5), 1_000_000);
        lease.publish(LocalReadGrant::No, 1_000_000);
        assert!(!reader.holds(&lease));
    }
}
