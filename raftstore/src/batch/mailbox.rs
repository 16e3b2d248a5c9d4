//! An FSM's mailbox and parking cell.
//!
//! Ownership moves, it is never shared: while idle an FSM sits in its cell; the first message that finds the
//! `notified` flag down raises it and moves the FSM (boxed) into the pool's run queue; the poller that takes it
//! owns it exclusively, handles its messages, parks it again and lowers the flag — then, if mail arrived in
//! between, schedules it once more. The flag guarantees at most one scheduled copy, so no lock ever guards the
//! FSM's own state (the cell's mutex is held only for the hand-over).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;

/// What the batch system runs: a state machine that owns its state and is fed through its mailbox.
pub trait Fsm: Send + 'static {
    type Message: Send + 'static;
}

/// An FSM handed to a poller, with the mailbox it came from.
pub(crate) struct Scheduled<F: Fsm> {
    pub(crate) fsm: Box<F>,
    pub(crate) mailbox: Arc<Mailbox<F>>,
}

pub(crate) struct Mailbox<F: Fsm> {
    /// Messages queued at most (concurrent senders may overshoot it by one message each).
    capacity: usize,
    sender: Sender<F::Message>,
    receiver: Receiver<F::Message>,
    notified: AtomicBool,
    /// The FSM while no poller holds it.
    parked: Mutex<Option<Box<F>>>,
    /// Unregistered: the FSM is dropped instead of parked.
    closed: AtomicBool,
}

pub(crate) enum Delivery<M> {
    Delivered,
    Full(M),
    Closed(M),
}

impl<F: Fsm> Mailbox<F> {
    pub(crate) fn new(fsm: Box<F>, capacity: usize) -> Mailbox<F> {
        // Not `bounded(capacity)`: that preallocates every slot (hundreds of KiB per FSM, tens of GiB for 100K
        // groups). A list channel grows in small blocks; the capacity is enforced on its length.
        let (sender, receiver) = crossbeam_channel::unbounded();
        Mailbox { capacity, sender, receiver, notified: AtomicBool::new(false), parked: Mutex::new(Some(fsm)), closed: AtomicBool::new(false) }
    }

    /// Queues a message; if the FSM was idle, returns it to be scheduled.
    pub(crate) fn deliver(self: &Arc<Self>, message: F::Message) -> (Delivery<F::Message>, Option<Scheduled<F>>) {
        if self.closed.load(Ordering::SeqCst) {
            return (Delivery::Closed(message), None);
        }
        if self.sender.len() >= self.capacity {
            return (Delivery::Full(message), None);
        }
        match self.sender.try_send(message) {
            Ok(()) => (Delivery::Delivered, self.wake()),
            Err(TrySendError::Full(message)) => (Delivery::Full(message), None),
            Err(TrySendError::Disconnected(message)) => (Delivery::Closed(message), None),
        }
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
        into.extend(self.receiver.try_iter().take(max));
    }

    /// Gives the FSM back after a turn. Returns it to be scheduled again if mail is waiting.
    pub(crate) fn release(self: &Arc<Self>, fsm: Box<F>) -> Option<Scheduled<F>> {
        if self.closed.load(Ordering::SeqCst) {
            return None; // unregistered: the FSM is dropped here
        }
        *self.parked.lock() = Some(fsm);
        self.notified.store(false, Ordering::SeqCst);
        if self.receiver.is_empty() {
            return None;
        }
        self.wake()
    }

    /// Unregisters: later messages are refused; the FSM is dropped now if parked, else when its poller releases it.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        drop(self.parked.lock().take());
    }
}
