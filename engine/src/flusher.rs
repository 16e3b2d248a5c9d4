//! [`BackgroundFlusher`]: flushes the state machine's memtable and compacts its runs on two threads of its own, so
//! applying never waits for redb unless memory would grow past its bound.
//!
//! The applier calls [`BackgroundFlusher::after_apply`] with what `StateMachine::apply` returned. Over budget, it
//! asks the flusher thread to flush and goes on applying (into a fresh memtable once the flush has swapped the
//! full one out). Only if the memtable being filled reaches twice its budget while a flush is still under way does
//! the applier wait for it: memory stays under about three times `memtable_bytes_max`.
//!
//! After each flush the compactor thread is woken and compacts until the policy is satisfied. If runs pile up past
//! `runs_max` (compaction slower than flushing), the flusher waits for the compactor before flushing again, and
//! the applier in turn waits at twice the memtable budget: backpressure, never unbounded runs. A flush or
//! compaction error is fatal: it is kept and returned to the applier.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::state_machine::{guard, StateMachine, StateMachineError};

/// What the applier tells after each state machine apply, so that memory stays bounded: the storage contract's
/// checkpoint side. [`BackgroundFlusher`] in production; a simulator checkpoints at times of its own choosing.
pub trait Checkpointer: Send + Sync {
    /// Called after every `apply` with its result (`true`: the memtable is over budget). An error is fatal (the
    /// flusher failed): the node must stop.
    fn after_apply(&self, over_budget: bool) -> Result<(), StateMachineError>;
}

impl Checkpointer for BackgroundFlusher {
    fn after_apply(&self, over_budget: bool) -> Result<(), StateMachineError> {
        BackgroundFlusher::after_apply(self, over_budget)
    }
}

#[derive(Default)]
struct Shared {
    flushing: bool,
    failure: Option<String>,
}

type SharedState = Arc<(Mutex<Shared>, Condvar)>;

pub struct BackgroundFlusher {
    machine: Arc<StateMachine>,
    requests: Option<Sender<()>>,
    shared: SharedState,
    threads: Vec<JoinHandle<()>>,
}

impl BackgroundFlusher {
    pub fn start(machine: Arc<StateMachine>) -> BackgroundFlusher {
        let (requests, receiver) = crossbeam_channel::bounded(1);
        let (compaction_requests, compaction_receiver) = crossbeam_channel::bounded(1);
        let shared: SharedState = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(body).expect("spawning a state machine thread")
        };
        let flusher = {
            let (machine, shared) = (Arc::clone(&machine), Arc::clone(&shared));
            spawn("state-machine-flusher", Box::new(move || flush_loop(machine, receiver, compaction_requests, shared)))
        };
        let compactor = {
            let (machine, shared) = (Arc::clone(&machine), Arc::clone(&shared));
            spawn("state-machine-compactor", Box::new(move || compaction_loop(machine, compaction_receiver, shared)))
        };
        BackgroundFlusher { machine, requests: Some(requests), shared, threads: vec![flusher, compactor] }
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
        self.requests = None; // the flusher stops, dropping the compactor's channel: it stops too
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn fail(shared: &SharedState, error: StateMachineError) {
    let (lock, condvar) = &**shared;
    lock.lock().failure = Some(error.to_string());
    condvar.notify_all();
}

fn flush_loop(machine: Arc<StateMachine>, requests: Receiver<()>, compaction: Sender<()>, shared: SharedState) {
    let runs_max = machine.options().runs_max;
    while requests.recv().is_ok() {
        // Backpressure: wait while compaction is behind.
        {
            let (lock, condvar) = &*shared;
            let mut state = lock.lock();
            while machine.run_count() > runs_max && state.failure.is_none() {
                let _ = compaction.try_send(());
                condvar.wait(&mut state);
            }
        }
        let outcome = guard("a flush", || machine.flush());
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
        let _ = compaction.try_send(());
    }
}

fn compaction_loop(machine: Arc<StateMachine>, requests: Receiver<()>, shared: SharedState) {
    while requests.recv().is_ok() {
        if let Err(error) = guard("a compaction", || machine.compact_fully()) {
            return fail(&shared, error);
        }
        // Wake a flusher waiting for compaction to catch up.
        let (lock, condvar) = &*shared;
        let _state = lock.lock();
        condvar.notify_all();
    }
}
