//! [`BackgroundFlusher`]: flushes the state machine's memtable on its own thread, so applying never waits for
//! redb unless memory would grow past its bound.
//!
//! The applier calls [`BackgroundFlusher::after_apply`] with what `StateMachine::apply` returned. Over budget, it
//! asks the flusher thread to flush and goes on applying (into a fresh memtable once the flush has swapped the
//! full one out). Only if the memtable being filled reaches twice its budget while a flush is still under way does
//! the applier wait for it: memory stays under about three times `memtable_bytes_max`. A flush error is fatal: it
//! is kept and returned to the applier.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::state_machine::{StateMachine, StateMachineError};

#[derive(Default)]
struct Shared {
    flushing: bool,
    failure: Option<String>,
}

pub struct BackgroundFlusher {
    machine: Arc<StateMachine>,
    requests: Option<Sender<()>>,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundFlusher {
    pub fn start(machine: Arc<StateMachine>) -> BackgroundFlusher {
        let (requests, receiver) = crossbeam_channel::bounded(1);
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let thread = {
            let (machine, shared) = (Arc::clone(&machine), Arc::clone(&shared));
            std::thread::Builder::new()
                .name("state-machine-flusher".into())
                .spawn(move || run(machine, receiver, shared))
                .expect("spawning the flusher thread")
        };
        BackgroundFlusher { machine, requests: Some(requests), shared, thread: Some(thread) }
    }

    /// Call after every `apply` with its result (`true`: the memtable is over budget).
    pub fn after_apply(&self, over_budget: bool) -> Result<(), StateMachineError> {
        let (lock, condvar) = &*self.shared;
        let mut shared = lock.lock();
        if let Some(reason) = &shared.failure {
            return Err(StateMachineError::Storage(format!("the flusher stopped: {reason}")));
        }
        if !over_budget {
            return Ok(());
        }
        if shared.flushing {
            if self.machine.memtable_bytes() < 2 * self.machine.memtable_bytes_max() {
                return Ok(()); // the flush under way (or about to swap the memtable out) will catch up
            }
            // Hard bound: wait for the flush under way before starting the next.
            while shared.flushing {
                condvar.wait(&mut shared);
            }
        }
        if let Some(reason) = &shared.failure {
            return Err(StateMachineError::Storage(format!("the flusher stopped: {reason}")));
        }
        shared.flushing = true;
        drop(shared);
        let _ = self.requests.as_ref().expect("alive until drop").try_send(());
        Ok(())
    }

    /// Waits for any flush under way, then flushes what is left (for shutdown or a checkpoint).
    pub fn flush_now(&self) -> Result<(), StateMachineError> {
        let (lock, condvar) = &*self.shared;
        let mut shared = lock.lock();
        while shared.flushing {
            condvar.wait(&mut shared);
        }
        drop(shared);
        self.machine.flush()
    }
}

impl Drop for BackgroundFlusher {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(machine: Arc<StateMachine>, requests: Receiver<()>, shared: Arc<(Mutex<Shared>, Condvar)>) {
    while requests.recv().is_ok() {
        let outcome = machine.flush();
        let (lock, condvar) = &*shared;
        let mut state = lock.lock();
        state.flushing = false;
        if let Err(error) = outcome {
            state.failure = Some(error.to_string());
        }
        condvar.notify_all();
        if state.failure.is_some() {
            return;
        }
    }
}
