//! The poller threads and the round they run (see `batch/mod.rs`).

use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use flotilla_engine::panics::catch;

use super::mailbox::{Fsm, Scheduled, Task};
use super::router::Router;

/// What a poller does with the FSMs of a round. One handler per poller thread, so it may keep per-round
/// buffers (the Readys to write, the messages to send) without locks.
pub trait PollHandler<F: Fsm>: Send + 'static {
    /// A round starts.
    fn begin(&mut self) {}
    /// One FSM's turn with the messages taken from its mailbox (the handler drains `messages`; leftovers are
    /// dropped).
    fn handle(&mut self, fsm: &mut F, messages: &mut Vec<F::Message>);
    /// The round ends; every FSM it handled is still held, in the order handled. Work done once per round for
    /// all of them belongs here.
    fn end(&mut self, _fsms: &mut [&mut F]) {}
    /// `handle` or `end` panicked (a bug, or a dependency's): the FSMs stay, and the poller goes on. The
    /// handler must make the failure known (the store stops its node). By default the panic goes on: the
    /// poller thread ends.
    fn on_panic(&mut self, reason: String) {
        panic!("{reason}");
    }
}

/// Settings of a batch system.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Poller threads. Default 2 (the reference machine has 2 cores).
    pub pollers: usize,
    /// FSMs handled in one round at most (bounds a round's latency and memory). Default 256.
    pub fsms_per_round_max: usize,
    /// Messages taken from one mailbox per turn at most (fairness between busy FSMs). Default 256.
    pub messages_per_turn_max: usize,
    /// Messages a mailbox holds at most; beyond, `send` returns `Full`. Default 4096.
    pub mailbox_capacity: usize,
}

impl Default for BatchOptions {
    fn default() -> BatchOptions {
        BatchOptions { pollers: 2, fsms_per_round_max: 256, messages_per_turn_max: 256, mailbox_capacity: 4096 }
    }
}

/// A running batch system: its router and its poller threads. Dropping it stops the pollers (after the rounds
/// under way) and drops every FSM.
pub struct BatchSystem<F: Fsm> {
    router: Router<F>,
    run_queue: Sender<Task<F>>,
    threads: Vec<JoinHandle<()>>,
}

impl<F: Fsm> BatchSystem<F> {
    /// Starts `options.pollers` threads, each with the handler `handler(poller_index)` makes.
    pub fn start<H: PollHandler<F>>(
        name: &str,
        options: BatchOptions,
        mut handler: impl FnMut(usize) -> H,
    ) -> BatchSystem<F> {
        assert!(
            options.pollers > 0 && options.fsms_per_round_max > 0 && options.messages_per_turn_max > 0,
            "batch options must be positive"
        );
        // Unbounded, yet bounded in fact: the notified flag keeps each FSM in it at most once.
        let (run_queue, tasks) = crossbeam_channel::unbounded();
        let router = Router::new(run_queue.clone(), options.mailbox_capacity);
        let threads = (0..options.pollers)
            .map(|index| {
                let (tasks, router, options, handler) =
                    (tasks.clone(), router.clone(), options.clone(), handler(index));
                std::thread::Builder::new()
                    .name(format!("{name}-{index}"))
                    .spawn(move || poll(tasks, router, options, handler))
                    .expect("spawning a poller thread")
            })
            .collect();
        BatchSystem { router, run_queue, threads }
    }

    pub fn router(&self) -> &Router<F> {
        &self.router
    }
}

impl<F: Fsm> Drop for BatchSystem<F> {
    fn drop(&mut self) {
        for _ in &self.threads {
            let _ = self.run_queue.send(Task::Stop);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn poll<F: Fsm, H: PollHandler<F>>(tasks: Receiver<Task<F>>, router: Router<F>, options: BatchOptions, mut handler: H) {
    let mut round: Vec<Scheduled<F>> = Vec::with_capacity(options.fsms_per_round_max);
    let mut messages = Vec::with_capacity(options.messages_per_turn_max);
    let mut stopping = false;
    while !stopping {
        // Block for the first FSM with mail, then take whatever else is ready, up to the round's bound.
        match tasks.recv() {
            Ok(Task::Run(scheduled)) => round.push(scheduled),
            Ok(Task::Stop) | Err(_) => break,
        }
        while round.len() < options.fsms_per_round_max {
            match tasks.try_recv() {
                Ok(Task::Run(scheduled)) => round.push(scheduled),
                Ok(Task::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        metrics::histogram!("flotilla_batch_round_fsms").record(round.len() as f64);
        handler.begin();
        for scheduled in round.iter_mut() {
            scheduled.mailbox.drain(&mut messages, options.messages_per_turn_max);
            if let Err(reason) = catch("a poller handling an FSM", || handler.handle(&mut scheduled.fsm, &mut messages))
            {
                handler.on_panic(reason);
            }
            messages.clear();
        }
        let mut fsms: Vec<&mut F> = round.iter_mut().map(|scheduled| &mut *scheduled.fsm).collect();
        if let Err(reason) = catch("a poller ending its round", || handler.end(&mut fsms)) {
            handler.on_panic(reason);
        }
        drop(fsms);
        for Scheduled { fsm, mailbox } in round.drain(..) {
            if let Some(again) = mailbox.release(fsm) {
                router.schedule(again);
            }
        }
    }
}
