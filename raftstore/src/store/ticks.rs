//! Time for the replicas that need it, without a message per replica per tick while they are busy.
//!
//! The ticker thread advances a node-wide tick count every `tick_interval` (`Ticking::advance`). A replica that
//! needs ticks owes the difference between that count and the count it has seen. Whenever a poller handles it,
//! for whatever reason, it first takes the ticks it owes (`Ticking::take_owed`): a busy replica's ticks ride
//! along with its other messages. The ticker sends a `Tick` message only to the replicas that were not handled
//! during the whole last interval, so that time still reaches idle ones.
//!
//! What this changes for timers: a replica handled by no message for a while takes its ticks up to one interval
//! late, two at a time. Late is the safe side for every timer: elections start and heartbeats go out a little
//! later (heartbeats stay well inside the election timeout), and a leader's lease is never judged on stale time,
//! because every handling — so every read — catches up first. With 4,096 busy groups on three in-process nodes
//! the per-replica `Tick` messages were about a fifth of all the messages the pollers handled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use super::fsm::PeerMsg;
use super::mailboxes::Mailboxes;

/// The tick count a replica has seen; shared between its FSM and the ticker's list.
pub(crate) type TicksSeen = Arc<AtomicU64>;

/// Owed ticks taken at once at most. Normally a replica owes one or two (the ticker wakes those not handled for
/// a whole interval); more only after its poller stalled, and then each owed tick may send a leader's heartbeats
/// again. Twice the default election timeout still lets every timer fire; a longer one fires a turn later.
const TICKS_OWED_MAX: u64 = 24;

/// The node's tick count and the replicas that need ticks.
#[derive(Default)]
pub struct Ticking {
    now: AtomicU64,
    groups: Mutex<FxHashMap<u64, TicksSeen>>,
}

impl Ticking {
    /// Nothing is owed for the time before now (a replica about to be handled for the first time).
    pub(crate) fn settle(&self, seen: &AtomicU64) {
        seen.store(self.now.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Group `group_id` needs ticks from now on (none owed for the time before).
    pub(crate) fn start(&self, group_id: u64, seen: &TicksSeen) {
        self.settle(seen);
        self.groups.lock().insert(group_id, Arc::clone(seen));
    }

    pub(crate) fn stop(&self, group_id: u64) {
        self.groups.lock().remove(&group_id);
    }

    /// How many replicas need ticks.
    pub fn len(&self) -> usize {
        self.groups.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One interval has passed: counts a tick and returns the groups to send a `Tick` to — those that owe more
    /// than this one (no poller handled them during the whole last interval).
    pub(crate) fn advance(&self) -> Vec<u64> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.groups
            .lock()
            .iter()
            .filter(|(_, seen)| seen.load(Ordering::SeqCst) + 1 < now)
            .map(|(group, _)| *group)
            .collect()
    }

    /// The ticks a replica owes, marking them taken.
    pub(crate) fn take_owed(&self, seen: &AtomicU64) -> u64 {
        let now = self.now.load(Ordering::SeqCst);
        if seen.load(Ordering::SeqCst) >= now {
            return 0; // handled already this interval (most turns of a busy replica): no write to a shared line
        }
        now.saturating_sub(seen.swap(now, Ordering::SeqCst)).min(TICKS_OWED_MAX)
    }
}

/// One interval has passed (the ticker's turn; a stepping caller's too): the tick is counted, and replicas no
/// poller handled during the whole last interval are sent a `Tick`. Returns how many.
pub fn tick(ticking: &Ticking, mailboxes: &dyn Mailboxes) -> usize {
    let behind = ticking.advance();
    for &group_id in &behind {
        let _ = mailboxes.send(group_id, PeerMsg::Tick); // a full mailbox has work: a tick can wait
    }
    behind.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_replicas_take_their_ticks_inline_and_only_idle_ones_are_sent_a_tick() {
        let ticking = Ticking::default();
        let (busy, idle) = (TicksSeen::default(), TicksSeen::default());
        ticking.advance();
        ticking.start(1, &busy);
        ticking.start(2, &idle);
        assert_eq!(ticking.take_owed(&busy), 0, "nothing owed for the time before it started");
        assert!(ticking.advance().is_empty(), "both started within the last interval");
        assert_eq!(ticking.take_owed(&busy), 1, "handled: it takes the tick");
        for _ in 0..3 {
            // `idle` was not handled during the whole last interval: the ticker asks for it, every time.
            assert_eq!(ticking.advance(), vec![2]);
            assert_eq!(ticking.take_owed(&busy), 1, "handled once per interval: one tick each time");
        }
        assert_eq!(ticking.take_owed(&idle), 4, "handled at last: every tick since it started");
        assert_eq!(ticking.take_owed(&idle), 0);
        assert!(ticking.advance().is_empty(), "both handled within the last interval");
        ticking.stop(2);
        assert_eq!(ticking.len(), 1);
        // After a long stall, at most `TICKS_OWED_MAX` at once.
        for _ in 0..100 {
            ticking.advance();
        }
        assert_eq!(ticking.take_owed(&busy), TICKS_OWED_MAX);
    }
}
