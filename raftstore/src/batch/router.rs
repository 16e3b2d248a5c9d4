//! [`Router`]: FSM ids to mailboxes. Cheap to clone; every clone reaches the same FSMs.

use std::sync::Arc;

use crossbeam_channel::Sender;
use parking_lot::RwLock;
use rustc_hash::FxHashMap;

use super::mailbox::{Delivery, Fsm, Mailbox, Scheduled, Task};

/// Why a message was not queued; the message comes back.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError<M> {
    /// No FSM has this id (never registered, or unregistered).
    NotFound(M),
    /// The mailbox is at capacity: the sender should back off (the bound that keeps memory finite).
    Full(M),
}

pub struct Router<F: Fsm> {
    mailboxes: Arc<RwLock<FxHashMap<u64, Arc<Mailbox<F>>>>>,
    run_queue: Sender<Task<F>>,
    mailbox_capacity: usize,
}

impl<F: Fsm> Clone for Router<F> {
    fn clone(&self) -> Router<F> {
        Router {
            mailboxes: Arc::clone(&self.mailboxes),
            run_queue: self.run_queue.clone(),
            mailbox_capacity: self.mailbox_capacity,
        }
    }
}

impl<F: Fsm> Router<F> {
    pub(crate) fn new(run_queue: Sender<Task<F>>, mailbox_capacity: usize) -> Router<F> {
        Router { mailboxes: Arc::default(), run_queue, mailbox_capacity }
    }

    /// Adds an FSM under `id`. Refused (and the FSM handed back) if the id is taken.
    pub fn register(&self, id: u64, fsm: Box<F>) -> Result<(), Box<F>> {
        let mut mailboxes = self.mailboxes.write();
        if mailboxes.contains_key(&id) {
            return Err(fsm);
        }
        mailboxes.insert(id, Arc::new(Mailbox::new(fsm, self.mailbox_capacity)));
        Ok(())
    }

    /// Removes an FSM: later sends get `NotFound`; it is dropped now if idle, else after its current turn.
    /// Returns the messages queued for it and never handled, to be answered (`None`: it was not registered).
    pub fn unregister(&self, id: u64) -> Option<Vec<F::Message>> {
        let removed = self.mailboxes.write().remove(&id);
        removed.map(|mailbox| mailbox.close())
    }

    /// [`Router::unregister`], then waits up to `wait` for a poller that holds the FSM (handling it, or about to)
    /// to let it go: whoever replaces the FSM's state underneath (a log restarted) must not race its last turn.
    /// Bounded, never a deadlock: a poller blocked on the caller is waited for no longer than `wait`.
    pub fn unregister_waiting(&self, id: u64, wait: std::time::Duration) -> Option<Vec<F::Message>> {
        let removed = self.mailboxes.write().remove(&id)?;
        let queued = removed.close();
        let deadline = std::time::Instant::now() + wait;
        while !removed.is_dropped() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Some(queued)
    }

    pub fn send(&self, id: u64, message: F::Message) -> Result<(), SendError<F::Message>> {
        // Delivering never blocks, so it runs under the read lock (no reference count traffic per message).
        let mailboxes = self.mailboxes.read();
        let Some(mailbox) = mailboxes.get(&id) else { return Err(SendError::NotFound(message)) };
        let (delivery, to_schedule) = mailbox.deliver(message);
        drop(mailboxes);
        if let Some(scheduled) = to_schedule {
            self.schedule(scheduled);
        }
        match delivery {
            Delivery::Delivered => Ok(()),
            Delivery::Full(message) => Err(SendError::Full(message)),
            Delivery::Closed(message) => Err(SendError::NotFound(message)),
        }
    }

    /// The ids of every registered FSM (a snapshot: registrations may change right after).
    pub fn ids(&self) -> Vec<u64> {
        self.mailboxes.read().keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.mailboxes.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn schedule(&self, scheduled: Scheduled<F>) {
        // The pool is gone only at shutdown: the FSM is dropped with its message.
        let _ = self.run_queue.send(Task::Run(scheduled));
    }
}
