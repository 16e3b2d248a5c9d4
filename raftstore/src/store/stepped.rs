//! A store run by hand, on its caller's thread: the production host loop — [`StoreHandler`]'s rounds (messages
//! handled, writes submitted, entries applied, clients answered), the persisted forwarding, the replicas'
//! creation and destruction, ticks, node liveness and log collection — with no thread of its own. The caller
//! decides what happens next (which replicas take a round, when the log's completions come back, when time
//! passes): the store simulator does, from a seed.
//!
//! What it does not run: the batch system (its pollers, bounded mailboxes and scheduling — [`SteppedMailboxes`]
//! are unbounded queues the caller drains), the log's writer thread (the caller's log engine completes writes
//! when the caller likes), the flusher's threads (the caller checkpoints), and the threads' timing.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use parking_lot::Mutex;

use flotilla_engine::contract::{Checkpointer, KvEngine, LogEngine, WalError};

use super::fsm::{PeerFsm, PeerMsg};
use super::handler::{forward_ready, StoreHandler};
use super::log_gc::LogGc;
use super::mailboxes::{node_down, Mailboxes};
use super::replicas::{ReplicaTask, Replicas};
use super::ticks::{self, TickClock};
use super::transport::{StoreInbox, Transport};
use super::{StoreCore, StoreOptions};
use crate::batch::{PollHandler, SendError};
use crate::range::RangeDescriptor;

/// One replica's place: the FSM (out while it takes a round) and its waiting messages.
struct Slot {
    fsm: Option<Box<PeerFsm>>,
    queue: VecDeque<PeerMsg>,
}

/// A node's replicas in memory, in group order; a send never finds a queue full.
#[derive(Default)]
pub struct SteppedMailboxes {
    slots: Mutex<BTreeMap<u64, Slot>>,
}

impl Mailboxes for SteppedMailboxes {
    fn send(&self, group_id: u64, message: PeerMsg) -> Result<(), SendError<PeerMsg>> {
        match self.slots.lock().get_mut(&group_id) {
            Some(slot) => {
                slot.queue.push_back(message);
                Ok(())
            }
            None => Err(SendError::NotFound(message)),
        }
    }

    fn register(&self, group_id: u64, fsm: Box<PeerFsm>) -> Result<(), Box<PeerFsm>> {
        let mut slots = self.slots.lock();
        if slots.contains_key(&group_id) {
            return Err(fsm);
        }
        slots.insert(group_id, Slot { fsm: Some(fsm), queue: VecDeque::new() });
        Ok(())
    }

    fn unregister(&self, group_id: u64) -> Vec<PeerMsg> {
        self.slots.lock().remove(&group_id).map(|slot| slot.queue.into()).unwrap_or_default()
    }

    fn ids(&self) -> Vec<u64> {
        self.slots.lock().keys().copied().collect()
    }
}

pub struct SteppedStore {
    handler: StoreHandler,
    replicas: Replicas,
    persisted: Receiver<super::handler::Durable>,
    tasks: Receiver<ReplicaTask>,
    mailboxes: Arc<SteppedMailboxes>,
    log_gc: LogGc,
    log_bytes_max: u64,
}

impl SteppedStore {
    /// Opens the groups in `ranges` this node holds over the given engines, as [`super::Store::start`] does.
    pub fn open(
        options: &StoreOptions,
        ranges: &[RangeDescriptor],
        log: Arc<dyn LogEngine>,
        kv: Arc<dyn KvEngine>,
        checkpointer: Arc<dyn Checkpointer>,
        transport: Arc<dyn Transport>,
        clock: Arc<dyn TickClock>,
    ) -> Result<SteppedStore, flotilla_raft::Error> {
        let core = StoreCore::new(options, log, kv, checkpointer, transport, clock);
        let mailboxes = Arc::new(SteppedMailboxes::default());
        let replicas = core.open_groups(options, ranges, Arc::clone(&mailboxes) as Arc<dyn Mailboxes>)?;
        let StoreCore { handler, persisted, tasks } = core;
        Ok(SteppedStore {
            handler,
            replicas,
            persisted,
            tasks,
            mailboxes,
            log_gc: LogGc::default(),
            log_bytes_max: options.log_bytes_max,
        })
    }

    /// Where clients' requests and the node's own messages go (`Mailboxes::send`).
    pub fn mailboxes(&self) -> &SteppedMailboxes {
        &self.mailboxes
    }

    /// Where callers learn whether a read may be served on their own thread (`local_reader.rs`).
    pub fn local_reader(&self) -> &Arc<super::local_reader::LocalReader> {
        &self.handler.local_reader
    }

    /// Where other nodes' messages for this node's replicas go.
    pub fn inbox(&self) -> StoreInbox {
        StoreInbox { mailboxes: Arc::clone(&self.mailboxes) as Arc<dyn Mailboxes>, tasks: self.handler.tasks.clone() }
    }

    /// The groups whose replicas have messages waiting.
    pub fn waiting(&self) -> Vec<u64> {
        let slots = self.mailboxes.slots.lock();
        slots.iter().filter(|(_, slot)| !slot.queue.is_empty() && slot.fsm.is_some()).map(|(id, _)| *id).collect()
    }

    /// The groups whose replicas hold committed entries not applied yet (their rounds ended without an end).
    pub fn applying(&self) -> Vec<u64> {
        let slots = self.mailboxes.slots.lock();
        let pending = |slot: &Slot| slot.fsm.as_ref().is_some_and(|fsm| !fsm.to_apply.is_empty());
        slots.iter().filter(|(_, slot)| pending(slot)).map(|(id, _)| *id).collect()
    }

    /// One poll round over `groups` (those without a replica are skipped): each is handled with every message
    /// waiting for it, in the order given; `inspect` then sees each FSM; then, if `end`, the round ends as a
    /// poller's does — committed entries applied in one state machine batch, clients answered, the transport
    /// flushed. Without `end`, committed entries wait in their FSMs for a later round's end (apply lagging).
    pub fn round(&mut self, groups: &[u64], end: bool, mut inspect: impl FnMut(&PeerFsm)) {
        let mut taken: Vec<(u64, Box<PeerFsm>, Vec<PeerMsg>)> = Vec::new();
        {
            let mut slots = self.mailboxes.slots.lock();
            for group_id in groups {
                let Some(slot) = slots.get_mut(group_id) else { continue };
                let Some(fsm) = slot.fsm.take() else { continue };
                taken.push((*group_id, fsm, slot.queue.drain(..).collect()));
            }
        }
        self.handler.begin();
        for (_, fsm, messages) in &mut taken {
            self.handler.handle(fsm, messages);
            inspect(fsm);
        }
        if end {
            let mut fsms: Vec<&mut PeerFsm> = taken.iter_mut().map(|(_, fsm, _)| fsm.as_mut()).collect();
            self.handler.end(&mut fsms);
        } else {
            self.handler.transport.flush();
        }
        let mut slots = self.mailboxes.slots.lock();
        for (group_id, fsm, _) in taken {
            // Unregistered during its turn (destroyed): dropped, as the batch system drops it.
            if let Some(slot) = slots.get_mut(&group_id) {
                slot.fsm = Some(fsm);
            }
        }
    }

    /// What the persisted forwarder does with the writes the log reported durable so far.
    pub fn forward_persisted(&self) {
        forward_ready(&self.persisted, self.mailboxes.as_ref(), self.handler.transport.as_ref());
    }

    /// What the replicas thread does with the tasks waiting (replicas created for messages, removed ones
    /// destroyed, merge checks that are due). Returns how many destroys it ran.
    pub fn run_tasks(&mut self) -> usize {
        let mut destroyed = 0;
        while let Ok(task) = self.tasks.try_recv() {
            destroyed += matches!(task, ReplicaTask::Destroy(_)) as usize;
            self.replicas.handle(task);
        }
        self.replicas.run_due_merge_checks();
        self.replicas.create_awaited();
        self.replicas.checkpoint_if_due();
        destroyed
    }

    /// The ticker's turn (`ticks::tick`): replicas not handled for a whole interval of the node's clock are sent a
    /// `Tick`.
    pub fn tick(&self) {
        ticks::tick(&self.handler.ticking, self.mailboxes.as_ref());
    }

    /// Node liveness: node `node_id` is down.
    pub fn node_down(&self, node_id: u64) {
        node_down(self.mailboxes.as_ref(), node_id);
    }

    /// The log collector's pass (`log_gc.rs`): compactions asked, the log purged behind the last ones.
    pub fn collect_logs(&mut self) -> Result<usize, WalError> {
        self.log_gc.pass(
            self.handler.kv.as_ref(),
            self.handler.log.as_ref(),
            self.log_bytes_max,
            self.mailboxes.as_ref(),
        )
    }

    /// Why the node stopped, if an engine failed.
    pub fn failure(&self) -> Option<String> {
        self.handler.failure.reason()
    }

    /// Reads group `group_id`'s replica (`None`: none here, or it is taking a round).
    pub fn with_fsm<T>(&self, group_id: u64, read: impl FnOnce(&PeerFsm) -> T) -> Option<T> {
        self.mailboxes.slots.lock().get(&group_id).and_then(|slot| slot.fsm.as_deref()).map(read)
    }

    /// Reads every replica here, in group order.
    pub fn each_fsm(&self, mut read: impl FnMut(u64, &PeerFsm)) {
        for (group_id, slot) in self.mailboxes.slots.lock().iter() {
            if let Some(fsm) = &slot.fsm {
                read(*group_id, fsm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerOptions;
    use crate::range::{initial_ranges, Replica};
    use crate::store::ticks::ManualClock;
    use crate::store::NoTransport;
    use flotilla_engine::contract::StateMachineError;
    use flotilla_engine::kv_engine::MemKvEngine;
    use flotilla_engine::log_engine::MemLogEngine;

    struct NoCheckpoints;

    impl Checkpointer for NoCheckpoints {
        fn after_apply(&self, _over_budget: bool) -> Result<(), StateMachineError> {
            Ok(())
        }
    }

    #[test]
    fn a_round_reads_the_clock_before_handling_anything() {
        let options = StoreOptions {
            peer: PeerOptions { hibernate_idle_ticks: 0, ..PeerOptions::default() },
            ..StoreOptions::default()
        };
        let ranges = initial_ranges(1, 1, &[Replica::voter(1, 1)]);
        let clock = Arc::new(ManualClock::default());
        let mut store = SteppedStore::open(
            &options,
            &ranges,
            Arc::new(MemLogEngine::new()),
            Arc::new(MemKvEngine::new(u64::MAX)),
            Arc::new(NoCheckpoints),
            Arc::new(NoTransport),
            Arc::clone(&clock) as Arc<dyn TickClock>,
        )
        .unwrap();
        let seen =
            |store: &SteppedStore| store.with_fsm(1, |fsm| fsm.ticks_seen.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(seen(&store), Some(0));
        // The process stood still for 30 intervals; the ticker has not run since. The first message handled is
        // handled on the time that passed (a leader's lease is judged on it).
        clock.set(30);
        assert!(store.mailboxes().send(1, PeerMsg::Campaign).is_ok());
        store.round(&[1], true, |_| {});
        assert_eq!(seen(&store), Some(30));
        assert!(store.failure().is_none());
    }
}
