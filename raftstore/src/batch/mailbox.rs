//! An FSM's mailbox and parking cell.
//!
//! Ownership moves, it is never shared: while idle an FSM sits in its cell; the first message that finds the
//! `notified` flag down raises it and moves the FSM (boxed) into the pool's run queue; the poller that takes it
//! owns it exclusively, handles its messages, parks it again and lowers the flag — then, if mail arrived in
//! between, schedules it once more. The flag guarantees at most one scheduled copy, so no lock ever guards the
//! FSM's own state (the cell's mutex is held only for the hand-over).
//!
//! The queue is a `VecDeque` under a mutex held for one push or one drain. A lock-free list channel was the
//! first choice and cost more: it allocates (and zeroes) a block of 31 slots as its queue grows and keeps one per
//! mailbox that ever had mail, so with thousands of groups, each seeing a message or two per write, the blocks
//! themselves were a tenth of the pollers' time. A drained queue keeps a small buffer
//! (`RETAINED_SLOTS_MAX`) so that a busy FSM does not allocate per message, and an idle one holds little.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// A drained mailbox keeps its buffer if it has at most this many slots, else frees it.
pub(crate) const RETAINED_SLOTS_MAX: usize = 8;

/// What the batch system runs: a state machine that owns its state and is fed through its mailbox.
pub trait Fsm: Send + 'static {
    type Message: Send + 'static;
}

/// An FSM handed to a poller, with the mailbox it came from.
pub(crate) struct Scheduled<F: Fsm> {
    pub(crate) fsm: Box<F>,
    pub(crate) mailbox: Arc<Mailbox<F>>,
}

/// What the pool's run queue carries: an FSM with mail, or the order to stop.
pub(crate) enum Task<F: Fsm> {
    Run(Scheduled<F>),
    Stop,
}

pub(crate) struct Mailbox<F: Fsm> {
    /// Messages queued at most.
    capacity: usize,
    queue: Mutex<VecDeque<F::Message>>,
    notified: AtomicBool,
    /// The FSM while no poller holds it.
    parked: Mutex<Option<Box<F>>>,
    /// Unregistered: the FSM is dropped instead of parked.
    closed: AtomicBool,
    /// Closed and the FSM dropped (at once if it was parked, else when its poller released it).
    dropped: AtomicBool,
}

pub(crate) enum Delivery<M> {
    Delivered,
    Full(M),
    Closed(M),
}

impl<F: Fsm> Mailbox<F> {
    pub(crate) fn new(fsm: Box<F>, capacity: usize) -> Mailbox<F> {
        Mailbox {
            capacity,
            queue: Mutex::new(VecDeque::new()),
            notified: AtomicBool::new(false),
            parked: Mutex::new(Some(fsm)),
            closed: AtomicBool::new(false),
            dropped: AtomicBool::new(false),
        }
    }

    /// Queues a message; if the FSM was idle, returns it to be scheduled.
    pub(crate) fn deliver(self: &Arc<Self>, message: F::Message) -> (Delivery<F::Message>, Option<Scheduled<F>>) {
        {
            // (Checked under the queue's lock: `close` takes what is queued under it, so nothing is queued after.)
            let mut queue = self.queue.lock();
            if self.closed.load(Ordering::SeqCst) {
                return (Delivery::Closed(message), None);
            }
            if queue.len() >= self.capacity {
                return (Delivery::Full(message), None);
            }
            queue.push_back(message);
        }
        (Delivery::Delivered, self.wake())
    }

    /// Raises the flag; if it was down, the FSM is parked and is taken out to be scheduled.
    fn wake(self: &Arc<Self>) -> Option<Scheduled<F>> {
        if self.notified.swap(true, Ordering::SeqCst) {
            return None; // already scheduled or being handled: the poller will see the message
        }
        let fsm = self.parked.lock().take()?; // None only once closed
        Some(Scheduled { fsm, mailbox: Arc::clone(self) })
    }

    /// Moves up to `max` queued messages into `into`.
    pub(crate) fn drain(&self, into: &mut Vec<F::Message>, max: usize) {
        let mut queue = self.queue.lock();
        let taken = queue.len().min(max);
        into.extend(queue.drain(..taken));
        if queue.is_empty() && queue.capacity() > RETAINED_SLOTS_MAX {
            *queue = VecDeque::new();
        }
    }

    /// Gives the FSM back after a turn. Returns it to be scheduled again if mail is waiting.
    pub(crate) fn release(self: &Arc<Self>, fsm: Box<F>) -> Option<Scheduled<F>> {
        if self.closed.load(Ordering::SeqCst) {
            drop(fsm); // unregistered: the FSM is dropped here
            self.dropped.store(true, Ordering::SeqCst);
            return None;
        }
        *self.parked.lock() = Some(fsm);
        self.notified.store(false, Ordering::SeqCst);
        if self.queue.lock().is_empty() {
            return None;
        }
        self.wake()
    }

    /// Unregisters: later messages are refused; the FSM is dropped now if parked, else when its poller releases it.
    /// Returns the messages still queued (never handled), for the caller to answer.
    pub(crate) fn close(&self) -> Vec<F::Message> {
        let queued = {
            let mut queue = self.queue.lock();
            self.closed.store(true, Ordering::SeqCst);
            queue.drain(..).collect()
        };
        if self.parked.lock().take().is_some() {
            self.dropped.store(true, Ordering::SeqCst);
        }
        queued
    }

    /// Whether a closed mailbox's FSM is gone (no poller handles it any more).
    pub(crate) fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Idle;
    impl Fsm for Idle {
        type Message = u64;
    }

    fn buffer_slots(mailbox: &Mailbox<Idle>) -> usize {
        mailbox.queue.lock().capacity()
    }

    #[test]
    fn closing_hands_back_what_was_queued_and_refuses_what_comes_after() {
        let mailbox = Arc::new(Mailbox::new(Box::new(Idle), 8));
        for message in [1, 2] {
            assert!(matches!(mailbox.deliver(message).0, Delivery::Delivered));
        }
        assert_eq!(mailbox.close(), vec![1, 2], "never handled: the caller answers them");
        assert!(matches!(mailbox.deliver(3).0, Delivery::Closed(3)));
        assert_eq!(mailbox.close(), Vec::<u64>::new());
    }

    #[test]
    fn a_closed_mailbox_says_when_its_fsm_is_gone() {
        let parked = Arc::new(Mailbox::new(Box::new(Idle), 8));
        parked.close();
        assert!(parked.is_dropped(), "parked: dropped at once");
        let handled = Arc::new(Mailbox::new(Box::new(Idle), 8));
        let (_, scheduled) = handled.deliver(1);
        let scheduled = scheduled.expect("scheduled: a poller takes it");
        handled.close();
        assert!(!handled.is_dropped(), "a poller holds it");
        assert!(handled.release(scheduled.fsm).is_none());
        assert!(handled.is_dropped(), "released after the close: dropped");
    }

    #[test]
    fn a_drained_mailbox_keeps_a_small_buffer_and_frees_a_large_one() {
        let mailbox = Arc::new(Mailbox::new(Box::new(Idle), 1024));
        assert_eq!(buffer_slots(&mailbox), 0, "an FSM that never had mail holds no buffer");
        let mut taken = Vec::new();
        for message in 0..3 {
            assert!(matches!(mailbox.deliver(message).0, Delivery::Delivered));
        }
        mailbox.drain(&mut taken, 256);
        assert_eq!(taken, vec![0, 1, 2]);
        let small = buffer_slots(&mailbox);
        assert!(small > 0 && small <= RETAINED_SLOTS_MAX, "a busy FSM's small buffer is kept ({small} slots)");

        for message in 0..100 {
            mailbox.deliver(message);
        }
        taken.clear();
        mailbox.drain(&mut taken, 64);
        assert_eq!(taken, (0..64).collect::<Vec<_>>(), "a turn takes at most its bound, oldest first");
        assert!(buffer_slots(&mailbox) >= 36, "messages still queued keep their buffer");
        taken.clear();
        mailbox.drain(&mut taken, 64);
        assert_eq!(taken, (64..100).collect::<Vec<_>>());
        assert_eq!(buffer_slots(&mailbox), 0, "a drained large buffer is freed");
    }
}
