//! The batch system: every message handled exactly once and in order per FSM while many threads send; an FSM
//! is never handled by two pollers at once; rounds gather many FSMs; mailboxes are bounded; unregistering drops
//! the FSM; dropping the system drops every FSM and stops its threads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use flotilla_raftstore::batch::{BatchOptions, BatchSystem, Fsm, PollHandler, SendError};
use parking_lot::Mutex;

/// Checks what it receives; `busy` catches two pollers holding one FSM.
struct Counter {
    id: u64,
    next_expected: Vec<u64>,
    busy: AtomicBool,
    drops: Arc<AtomicUsize>,
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// (sender thread, sequence number of that sender's messages to this FSM)
type Message = (usize, u64);

impl Fsm for Counter {
    type Message = Message;
}

#[derive(Clone, Default)]
struct Shared {
    handled: Arc<AtomicUsize>,
    round_sizes: Arc<Mutex<Vec<usize>>>,
    /// Violations seen by pollers (recorded, not asserted: a panicking poller would only show up as a timeout).
    failures: Arc<Mutex<Vec<String>>>,
    /// If set, the first round of each poller meets the test here twice before handling: once to say the round
    /// is gathered, once to be let go. A backlog sent in between builds up behind that round.
    gate: Option<Arc<Barrier>>,
}

struct Handler {
    shared: Shared,
    gated: bool,
}

impl PollHandler<Counter> for Handler {
    fn begin(&mut self) {
        if let Some(gate) = self.shared.gate.as_ref().filter(|_| !std::mem::replace(&mut self.gated, true)) {
            gate.wait();
            gate.wait();
        }
    }

    fn handle(&mut self, fsm: &mut Counter, messages: &mut Vec<Message>) {
        if fsm.busy.swap(true, Ordering::SeqCst) {
            self.shared.failures.lock().push(format!("FSM {} handled by two pollers at once", fsm.id));
        }
        for (sender, sequence) in messages.drain(..) {
            if sequence != fsm.next_expected[sender] {
                self.shared.failures.lock().push(format!(
                    "FSM {}: sender {sender} sent {sequence}, expected {}",
                    fsm.id, fsm.next_expected[sender]
                ));
            }
            fsm.next_expected[sender] = sequence + 1;
            self.shared.handled.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::yield_now();
        fsm.busy.store(false, Ordering::SeqCst);
    }

    fn end(&mut self, fsms: &mut [&mut Counter]) {
        self.shared.round_sizes.lock().push(fsms.len());
    }
}

fn start(options: BatchOptions, shared: &Shared) -> BatchSystem<Counter> {
    BatchSystem::start("test", options, |_| Handler { shared: shared.clone(), gated: false })
}

fn register(system: &BatchSystem<Counter>, ids: std::ops::Range<u64>, senders: usize, drops: &Arc<AtomicUsize>) {
    for id in ids {
        let fsm = Box::new(Counter {
            id,
            next_expected: vec![0; senders],
            busy: AtomicBool::new(false),
            drops: Arc::clone(drops),
        });
        assert!(system.router().register(id, fsm).is_ok(), "id {id} taken");
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn every_message_is_handled_once_in_order_while_many_threads_send() {
    const FSMS: u64 = 200;
    const SENDERS: usize = 4;
    const PER_FSM_PER_SENDER: u64 = 50;
    let drops = Arc::new(AtomicUsize::new(0));
    let shared = Shared::default();
    // Small bounds everywhere, so rounds, turns and full mailboxes all happen.
    let system = start(
        BatchOptions { pollers: 3, fsms_per_round_max: 16, messages_per_turn_max: 7, mailbox_capacity: 8 },
        &shared,
    );
    register(&system, 0..FSMS, SENDERS, &drops);
    let full = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let (router, full) = (system.router().clone(), Arc::clone(&full));
            std::thread::spawn(move || {
                // A mailbox that stays full this long is never being drained (a lost wake-up): fail, do not hang.
                let deadline = Instant::now() + Duration::from_secs(60);
                for sequence in 0..PER_FSM_PER_SENDER {
                    for id in 0..FSMS {
                        let mut message = (sender, sequence);
                        loop {
                            match router.send(id, message) {
                                Ok(()) => break,
                                Err(SendError::Full(back)) => {
                                    assert!(
                                        Instant::now() < deadline,
                                        "FSM {id}'s mailbox stays full: it is not being polled"
                                    );
                                    full.fetch_add(1, Ordering::Relaxed);
                                    message = back;
                                    std::thread::yield_now();
                                }
                                Err(SendError::NotFound(_)) => panic!("FSM {id} vanished"),
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let total = (FSMS * SENDERS as u64 * PER_FSM_PER_SENDER) as usize;
    wait_until("every message is handled", || shared.handled.load(Ordering::SeqCst) >= total);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(shared.handled.load(Ordering::SeqCst), total, "each message exactly once");
    assert_eq!(shared.failures.lock().clone(), Vec::<String>::new());
    assert!(
        shared.round_sizes.lock().iter().all(|&size| (1..=16).contains(&size)),
        "rounds stay within fsms_per_round_max"
    );
    println!("{} sends found a full mailbox and retried", full.load(Ordering::Relaxed));
    drop(system);
    assert_eq!(drops.load(Ordering::SeqCst), FSMS as usize, "dropping the system drops every FSM");
}

#[test]
fn a_round_gathers_every_fsm_that_has_mail() {
    let drops = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Barrier::new(2));
    let shared = Shared { gate: Some(Arc::clone(&gate)), ..Shared::default() };
    let system = start(BatchOptions { pollers: 1, fsms_per_round_max: 64, ..BatchOptions::default() }, &shared);
    register(&system, 0..100, 1, &drops);
    // FSM 0's round is gathered and waits at the gate; only then do 99 more FSMs get mail.
    system.router().send(0, (0, 0)).unwrap();
    gate.wait();
    for id in 1..100 {
        system.router().send(id, (0, 0)).unwrap();
    }
    gate.wait();
    // Rounds are recorded at their end, after their messages are counted as handled.
    wait_until("every round has ended", || shared.round_sizes.lock().iter().sum::<usize>() == 100);
    let rounds = shared.round_sizes.lock().clone();
    assert_eq!(rounds, vec![1, 64, 35], "the backlog is taken 64 FSMs at a time");
    assert_eq!(shared.failures.lock().clone(), Vec::<String>::new());
}

#[test]
fn mailboxes_are_bounded_and_unknown_or_unregistered_ids_are_refused() {
    let drops = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Barrier::new(2));
    let shared = Shared { gate: Some(Arc::clone(&gate)), ..Shared::default() };
    let system = start(BatchOptions { pollers: 1, mailbox_capacity: 4, ..BatchOptions::default() }, &shared);
    register(&system, 0..2, 1, &drops);
    // The poller takes FSM 0 and waits at the gate before draining it: its mailbox fills up.
    for sequence in 0..4 {
        system.router().send(0, (0, sequence)).unwrap();
    }
    assert_eq!(system.router().send(0, (0, 4)), Err(SendError::Full((0, 4))));
    assert_eq!(system.router().send(7, (0, 0)), Err(SendError::NotFound((0, 0))));
    assert!(system
        .router()
        .register(
            1,
            Box::new(Counter {
                id: 1,
                next_expected: vec![0],
                busy: AtomicBool::new(false),
                drops: Arc::clone(&drops)
            })
        )
        .is_err());
    gate.wait();
    gate.wait();
    wait_until("the backlog is handled", || shared.handled.load(Ordering::SeqCst) == 4);
    // Unregistering an idle FSM drops it at once (the refused duplicate above was dropped too).
    let before = drops.load(Ordering::SeqCst);
    assert!(system.router().unregister(1).is_some());
    assert_eq!(drops.load(Ordering::SeqCst), before + 1);
    assert_eq!(system.router().send(1, (0, 0)), Err(SendError::NotFound((0, 0))));
    assert!(system.router().unregister(1).is_none());
    assert_eq!(system.router().len(), 1);
}
