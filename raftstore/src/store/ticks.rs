//! Time for the replicas that need it, without a message per replica per tick while they are busy.
//!
//! The node's tick count is read from a clock ([`TickClock`]: in production the intervals elapsed since the node
//! started, by the monotonic clock). A replica that needs ticks owes the difference between that count and the
//! count it has seen. Each poll round reads the clock first (`StoreHandler::begin`, `Ticking::sync`), and
//! whenever a poller handles a replica, for whatever reason, the replica first takes the ticks it owes
//! (`Ticking::take_owed`): a busy replica's ticks ride along with its other messages. Every `tick_interval` the
//! ticker sends a `Tick` message only to the replicas that were not handled during the whole last interval, so
//! that time still reaches idle ones.
//!
//! The count follows the clock, not the number of times the ticker woke, and every round reads it before handling
//! anything: after the process was paused (or the ticker starved), the first read a leader handles is judged on
//! the time that passed meanwhile, not on time that stood still while the other nodes' ran on.
//!
//! What this changes for timers: a replica handled by no message for a while takes its ticks up to one interval
//! late, two at a time. Late is the safe side for every timer but the lease: elections start and heartbeats go out
//! a little later (heartbeats stay well inside the election timeout), and a leader's lease is never judged on stale
//! time, because every handling — so every read — catches up first. With 4,096 busy groups on three in-process
//! nodes the per-replica `Tick` messages were about a fifth of all the messages the pollers handled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use super::fsm::PeerMsg;
use super::mailboxes::Mailboxes;
use crate::peer::Peer;

/// The tick count a replica has seen; shared between its FSM and the ticker's list.
pub(crate) type TicksSeen = Arc<AtomicU64>;

/// Owed ticks fired at once at most. Normally a replica owes one or two (the ticker wakes those not handled for
/// a whole interval); more only after its poller stalled, and then each owed tick may send a leader's heartbeats
/// again. Twice the default election timeout still lets every timer fire; a longer one fires a turn later. The
/// ticks beyond it still count against leases (`Peer::skip_ticks`).
pub(crate) const TICKS_OWED_MAX: u64 = 24;

/// Where a node's tick count comes from.
pub trait TickClock: Send + Sync {
    /// Whole tick intervals elapsed since the node started; never goes back.
    fn ticks(&self) -> u64;
}

/// The monotonic clock, in intervals of `interval` since it was made.
pub struct IntervalClock {
    started: std::time::Instant,
    interval: std::time::Duration,
}

impl IntervalClock {
    pub fn new(interval: std::time::Duration) -> IntervalClock {
        IntervalClock { started: std::time::Instant::now(), interval }
    }
}

impl TickClock for IntervalClock {
    fn ticks(&self) -> u64 {
        (self.started.elapsed().as_nanos() / self.interval.as_nanos().max(1)) as u64
    }
}

/// A clock its owner sets (tests and simulators).
#[derive(Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// The clock now says `ticks` (never less than it said).
    pub fn set(&self, ticks: u64) {
        self.0.fetch_max(ticks, Ordering::SeqCst);
    }
}

impl TickClock for ManualClock {
    fn ticks(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The node's tick count and the replicas that need ticks.
pub struct Ticking {
    clock: Arc<dyn TickClock>,
    now: AtomicU64,
    groups: Mutex<FxHashMap<u64, TicksSeen>>,
}

impl Ticking {
    pub fn new(clock: Arc<dyn TickClock>) -> Ticking {
        Ticking { clock, now: AtomicU64::new(0), groups: Mutex::default() }
    }

    /// Brings the node's tick count up to the clock (each poll round does, before handling anything); returns it.
    pub(crate) fn sync(&self) -> u64 {
        let ticks = self.clock.ticks();
        self.now.fetch_max(ticks, Ordering::SeqCst).max(ticks)
    }

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

    /// The node's tick count.
    pub fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    /// How many replicas need ticks.
    pub fn len(&self) -> usize {
        self.groups.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ticker's question, each interval: the count brought up to the clock, which groups to send a `Tick`
    /// to — those that owe more than one tick (no poller handled them during the whole last interval).
    pub(crate) fn behind(&self) -> Vec<u64> {
        let now = self.sync();
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
        now.saturating_sub(seen.swap(now, Ordering::SeqCst))
    }

    /// Gives `peer` the ticks it owes (those beyond [`TICKS_OWED_MAX`] as skipped time): afterwards its tick count
    /// stands for the node tick `seen` holds, as far as its lease is concerned (`local_reader.rs`).
    /// Returns how many ticks it owed.
    pub(crate) fn catch_up(&self, seen: &AtomicU64, peer: &mut Peer) -> u64 {
        let owed = self.take_owed(seen);
        for _ in 0..owed.min(TICKS_OWED_MAX) {
            peer.on_tick();
        }
        if owed > TICKS_OWED_MAX {
            peer.skip_ticks(owed - TICKS_OWED_MAX);
        }
        owed
    }
}

/// The ticker's turn (a stepping caller's too): replicas no poller handled during the whole last interval are
/// sent a `Tick`. Returns how many.
pub fn tick(ticking: &Ticking, mailboxes: &dyn Mailboxes) -> usize {
    let behind = ticking.behind();
    for &group_id in &behind {
        let _ = mailboxes.send(group_id, PeerMsg::Tick); // a full mailbox has work: a tick can wait
    }
    behind.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ticking whose clock the test moves, and a way to move it by one interval.
    fn ticking() -> (Ticking, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        (Ticking::new(Arc::clone(&clock) as Arc<dyn TickClock>), clock)
    }

    #[test]
    fn busy_replicas_take_their_ticks_inline_and_only_idle_ones_are_sent_a_tick() {
        let (ticking, clock) = ticking();
        let interval = |ticking: &Ticking| {
            clock.set(clock.ticks() + 1);
            ticking.behind()
        };
        let (busy, idle) = (TicksSeen::default(), TicksSeen::default());
        interval(&ticking);
        ticking.start(1, &busy);
        ticking.start(2, &idle);
        assert_eq!(ticking.take_owed(&busy), 0, "nothing owed for the time before it started");
        assert!(interval(&ticking).is_empty(), "both started within the last interval");
        assert_eq!(ticking.take_owed(&busy), 1, "handled: it takes the tick");
        for _ in 0..3 {
            // `idle` was not handled during the whole last interval: the ticker asks for it, every time.
            assert_eq!(interval(&ticking), vec![2]);
            assert_eq!(ticking.take_owed(&busy), 1, "handled once per interval: one tick each time");
        }
        assert_eq!(ticking.take_owed(&idle), 4, "handled at last: every tick since it started");
        assert_eq!(ticking.take_owed(&idle), 0);
        assert!(interval(&ticking).is_empty(), "both handled within the last interval");
        ticking.stop(2);
        assert_eq!(ticking.len(), 1);
        // After a long stall, all of it (the caller fires at most `TICKS_OWED_MAX` and skips the rest).
        for _ in 0..100 {
            interval(&ticking);
        }
        assert_eq!(ticking.take_owed(&busy), 101, "the interval before the stall, and the 100 of it");
    }

    #[test]
    fn after_a_pause_the_first_round_sees_the_time_that_passed_before_the_ticker_runs() {
        let (ticking, clock) = ticking();
        let leader = TicksSeen::default();
        ticking.start(1, &leader);
        // The process stood still for 30 intervals; the ticker has not run since.
        clock.set(30);
        assert_eq!(ticking.take_owed(&leader), 0, "no round has read the clock yet");
        ticking.sync(); // a poll round begins
        assert_eq!(ticking.take_owed(&leader), 30, "every interval that passed counts");
    }
}
