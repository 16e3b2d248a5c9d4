//! A store: one node's group replicas hosted in the batch system over the node's log and state machine (seen
//! through the storage contract, `flotilla_engine::contract`), with a ticker, a log collector, a replicas thread
//! and the path that brings each durable write back to its group.
//!
//! - [`fsm`]: the FSM around a peer, its messages, and the waiting clients;
//! - [`handler`]: the host loop — the poll round (writes of all groups to the log, one state machine apply per
//!   round) and the persisted forwarding;
//! - [`replicas`]: replicas created (on a message for a group the node does not hold) and destroyed (once
//!   removed) while the node runs; `awaiting_split.rs`: messages for a group not held yet, waiting a moment for
//!   a split to make it there;
//! - [`ticks`]: the node's tick count, and which replicas need ticks (busy ones take theirs inline);
//! - `log_gc.rs`: log compaction asked of the replicas as their state machine checkpoints, and the log purged;
//! - [`transport`]: the transport seam — the outbound [`Transport`] (flushed once per round), the inbound
//!   [`StoreInbox`], and stores in one process reaching each other;
//! - [`local_reader`]: linearizable reads on the caller's thread while a leader's lease holds (or it is its
//!   group's only voter), from grants the host loop publishes;
//! - [`liveness`]: node liveness (one heartbeat per node pair, verdicts passed to the replicas);
//! - [`mailboxes`]: where replicas receive messages, as the store's code sees it (the batch system's router, or
//!   the stepped store's queues);
//! - `parked.rs`: writes a replica in a merge holds for a round or two instead of refusing them;
//! - [`stepped`]: the same store run by hand on its caller's thread (the store simulator runs it);
//! - `failure.rs`: why the node stopped, and what stopping does (waiting clients refused, listeners told);
//! - this file: `StoreCore` (a store without threads: the handler and the channels its threads drain) and
//!   [`Store`], which runs it on pollers and threads of its own.

mod awaiting_split;
mod failure;
pub mod fsm;
pub mod handler;
pub mod liveness;
pub mod local_reader;
mod log_gc;
pub mod mailboxes;
mod parked;
pub mod replicas;
pub mod stepped;
pub mod ticks;
pub mod transport;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use flotilla_engine::contract::{Checkpointer, KvEngine, LogEngine};
use flotilla_raft::{Config, ReadMode};

pub use fsm::{PeerFsm, PeerMsg, ReadRequest, ReadResult, WriteReply};
pub use handler::StoreHandler;
pub use mailboxes::Mailboxes;
pub use transport::{InProcessTransport, NoTransport, StoreInbox, Transport};

use crate::batch::{BatchOptions, BatchSystem, Router};
use crate::peer::PeerOptions;
use crate::range::RangeDescriptor;
use crate::split_trigger::{RangeAsk, SplitOptions, SplitTrigger};
use local_reader::LocalReader;
use replicas::{ReplicaTask, Replicas};
use ticks::{TickClock, Ticking};

/// Settings of a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub batch: BatchOptions,
    /// The Raft settings of every replica (its `id` and `random_seed` are set per replica). Default: the core's
    /// defaults with lease reads (`ReadMode::LeaseBased`): a leader holding a valid lease answers linearizable
    /// reads without a round trip, else by ReadIndex — safe within the clock-drift bound in the core's docs; and
    /// without `commit_broadcast` (followers learn the commit index with the next append or heartbeat), and
    /// with `heartbeats_skip_after_append` (no heartbeat to a follower that just got an append), and with
    /// `persisted_messages_in_ready` (a follower's answers go out from the thread that completes its write, and it
    /// is not scheduled just for that).
    pub raft: Config,
    /// How often every group ticks. Default 100 ms (an election timeout of 10 ticks is then 1–2 s).
    pub tick_interval: Duration,
    /// This node's id (replica ids of its groups are taken from the descriptors).
    pub node_id: u64,
    /// Every replica's snapshot streams (chunk size, window, timeouts), hibernation and log lag bound.
    pub peer: PeerOptions,
    /// How often replicas whose state machine made something new durable are asked to compact their logs, and
    /// the log purged (`log_gc.rs`). Default 1 s.
    pub log_gc_interval: Duration,
    /// What the log is purged down to, in bytes (the WAL keeps its active segment whatever this says, and
    /// rewrites the live entries of laggards that pin older ones). Default 512 MiB (two default WAL segments).
    pub log_bytes_max: u64,
    /// The split triggers' bounds (`split_trigger.rs`): by size and by load.
    pub split: SplitOptions,
    /// Where the groups this node leads ask to be split (`split_trigger.rs`; the host proposes the splits).
    /// Default none: nothing is counted or measured, and nothing splits but by request.
    pub range_asks: Option<crossbeam_channel::Sender<RangeAsk>>,
    /// The key space has a meta range (`meta.rs`): the groups' leaders publish their descriptors in it after each
    /// change — through this node's replica of it, or, where there is none, the host (`range_asks`,
    /// `AskReason::Publish`). Default false (a key space of format 1, or a test's own layout).
    pub meta_range: bool,
    /// How long, in node ticks, messages for a group this node does not hold wait for a split applied here to
    /// make the group, before an empty replica is created for them (`awaiting_split.rs`). Default 3.
    pub split_message_wait_ticks: u64,
    /// How long, in node ticks, a write that reaches a range frozen for a merge (not decided yet) is held for
    /// the merge to move on — handed to the left group once decided, proposed here if given up — and a write
    /// handed over to the left leader waits for it to propose the merge's commit, before it is refused
    /// (`RangeError::Merging`; the caller asks again). A merge moves on a round or two after its freeze unless a
    /// replica stopped answering. Default 3; 0: refused at once (`store/parked.rs`).
    pub frozen_write_wait_ticks: u64,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            batch: BatchOptions::default(),
            raft: Config {
                read_mode: ReadMode::LeaseBased,
                commit_broadcast: false,
                heartbeats_skip_after_append: true,
                persisted_messages_in_ready: true,
                ..Config::default()
            },
            tick_interval: Duration::from_millis(100),
            node_id: 1,
            peer: PeerOptions::default(),
            log_gc_interval: Duration::from_secs(1),
            log_bytes_max: 512 << 20,
            split: SplitOptions::default(),
            range_asks: None,
            meta_range: false,
            split_message_wait_ticks: 3,
            frozen_write_wait_ticks: 3,
        }
    }
}

impl StoreOptions {
    /// A replica's split triggers: as `split` says if a host takes the asks, else off (`options`: what
    /// [`StoreOptions::split_triggers`] made, shared by every replica).
    pub(crate) fn split_trigger(&self, options: &Arc<SplitOptions>, group_id: u64) -> SplitTrigger {
        SplitTrigger::new(Arc::clone(options), self.raft.random_seed ^ group_id)
    }

    /// The triggers' options every replica shares: `split`, or off if no host takes the asks.
    pub(crate) fn split_triggers(&self) -> Arc<SplitOptions> {
        let off = SplitOptions { size_bytes_max: 0, load_window_ticks: 0, ..SplitOptions::default() };
        Arc::new(if self.range_asks.is_some() { self.split.clone() } else { off })
    }
}

/// A node's groups, running. Dropping it stops its threads (the engines are flushed by their owners).
pub struct Store {
    node_id: u64,
    system: Option<BatchSystem<PeerFsm>>,
    router: Router<PeerFsm>,
    mailboxes: Arc<dyn Mailboxes>,
    ticking: Arc<Ticking>,
    failure: Arc<failure::NodeFailure>,
    local_reader: Arc<LocalReader>,
    opening: Arc<OpeningGroups>,
    tasks: crossbeam_channel::Sender<ReplicaTask>,
    /// Dropped to stop the ticker, the log collector and the replicas thread.
    stop: Option<crossbeam_channel::Sender<()>>,
    /// The replicas thread, the log collector and the ticker, joined on drop. (The persisted forwarder is not: it
    /// ends when the log's writer drops its last sender, which the log's owner does after the store.)
    threads: Vec<JoinHandle<()>>,
}

/// Everything of a store but its threads: the host loop ([`StoreHandler`]) and the channels its threads drain.
/// [`Store::start`] runs it on the batch system's pollers and threads of its own; [`stepped::SteppedStore`] runs
/// the same parts by hand, on its caller's thread.
pub(crate) struct StoreCore {
    pub(crate) handler: StoreHandler,
    /// Writes made durable, for the persisted forwarder.
    pub(crate) persisted: crossbeam_channel::Receiver<handler::Durable>,
    /// Replicas to create or destroy, for the replicas thread.
    pub(crate) tasks: crossbeam_channel::Receiver<ReplicaTask>,
}

impl StoreCore {
    pub(crate) fn new(
        options: &StoreOptions,
        log: Arc<dyn LogEngine>,
        kv: Arc<dyn KvEngine>,
        checkpointer: Arc<dyn Checkpointer>,
        transport: Arc<dyn Transport>,
        clock: Arc<dyn TickClock>,
    ) -> StoreCore {
        let (persisted, persisted_receiver) = crossbeam_channel::unbounded::<handler::Durable>();
        let (tasks, task_receiver) = crossbeam_channel::bounded::<ReplicaTask>(replicas::TASKS_MAX);
        let handler = StoreHandler {
            node_id: options.node_id,
            frozen_write_wait_ticks: options.frozen_write_wait_ticks,
            range_asks: options.range_asks.clone(),
            local_reader: Arc::new(LocalReader::new(Arc::clone(&clock), options.split.load_window_ticks > 0)),
            claims: Arc::default(),
            meta_group: Arc::default(),
            checkpoint_queued: Arc::default(),
            opening: Arc::default(),
            ticking: Arc::new(Ticking::new(clock)),
            log,
            kv,
            checkpointer,
            transport,
            persisted,
            tasks,
            failure: Arc::default(),
        };
        StoreCore { handler, persisted: persisted_receiver, tasks: task_receiver }
    }

    /// Opens the groups in `ranges` that this node holds (each replica restarts from what the engines hold) into
    /// `mailboxes`, and returns the keeper of the replicas created and destroyed from now on.
    pub(crate) fn open_groups(
        &self,
        options: &StoreOptions,
        ranges: &[RangeDescriptor],
        mailboxes: Arc<dyn Mailboxes>,
    ) -> Result<Replicas, flotilla_raft::Error> {
        let StoreHandler {
            log, kv, ticking, failure, local_reader, claims, checkpoint_queued, opening, transport, ..
        } = &self.handler;
        failure.wake_on_stop(Arc::clone(&mailboxes));
        {
            // The log's writer failing on its own (a disk error, a panic) stops the node at once. (Weak: the log
            // outlives the store, and the failure holds the mailboxes, which hold the replicas, which hold the log.)
            let (failure, node_id) = (Arc::downgrade(failure), options.node_id);
            log.on_failure(Box::new(move |reason| {
                if let Some(failure) = failure.upgrade() {
                    failure.fail(node_id, format!("the log failed: {reason}"));
                }
            }));
        }
        // The groups this node holds (a descriptor that no longer lists it: its replica was removed).
        let held: Vec<RangeDescriptor> =
            ranges.iter().filter(|range| range.lists_node(options.node_id)).cloned().collect();
        let finished = crate::peer::finish_interrupted_destroys(options.node_id, log.as_ref(), kv.as_ref())?;
        metrics::counter!("flotilla_replicas_destroyed_total").increment(finished as u64);
        crate::peer::prepare_groups(log.as_ref(), kv.as_ref(), &held)?;
        let split_triggers = options.split_triggers();
        if let Some(meta) = held.iter().find(|range| range.is_meta()) {
            self.handler.meta_group.store(meta.group_id, std::sync::atomic::Ordering::Relaxed);
        }
        for range in &held {
            let peer = replicas::open_replica(options, range, log, kv.as_ref(), claims)?;
            let trigger = options.split_trigger(&split_triggers, range.group_id);
            let fsm = PeerFsm::new(peer, local_reader.lease(range.group_id), trigger);
            if fsm.ticking {
                ticking.start(range.group_id, &fsm.ticks_seen);
            }
            assert!(mailboxes.register(range.group_id, Box::new(fsm)).is_ok(), "group {} twice", range.group_id);
        }
        Ok(Replicas {
            options: options.clone(),
            log: Arc::clone(log),
            kv: Arc::clone(kv),
            mailboxes,
            transport: Arc::clone(transport),
            ticking: Arc::clone(ticking),
            // Held now or before: every group whose descriptor this node's state machine stores.
            held: kv
                .ranges()
                .map_err(|e| flotilla_raft::Error::Storage(flotilla_raft::StorageError::Other(e.to_string())))?
                .into_iter()
                .map(|(group, _)| group)
                .collect(),
            failure: Arc::clone(failure),
            local_reader: Arc::clone(local_reader),
            claims: Arc::clone(claims),
            split_triggers,
            merge_checks: replicas::MergeChecks::default(),
            checkpoint_asked: false,
            checkpoint_tick: None,
            merged_logs: Vec::new(),
            awaiting_split: awaiting_split::AwaitingSplit::new(options.split_message_wait_ticks),
            checkpoint_queued: Arc::clone(checkpoint_queued),
            opening: Arc::clone(opening),
        })
    }
}

impl Store {
    /// Starts the groups in `ranges` (this node's replica of each) over the given engines. Each replica restarts
    /// from what the engines hold.
    pub fn start(
        options: StoreOptions,
        ranges: &[RangeDescriptor],
        log: Arc<dyn LogEngine>,
        kv: Arc<dyn KvEngine>,
        checkpointer: Arc<dyn Checkpointer>,
        transport: Arc<dyn Transport>,
    ) -> Result<Store, flotilla_raft::Error> {
        let clock = Arc::new(ticks::IntervalClock::new(options.tick_interval));
        let core = StoreCore::new(&options, Arc::clone(&log), Arc::clone(&kv), checkpointer, transport, clock);
        let system = BatchSystem::start("flotilla-poller", options.batch.clone(), |_| core.handler.clone());
        let router = system.router().clone();
        let mailboxes: Arc<dyn Mailboxes> = Arc::new(router.clone());
        let replicas = core.open_groups(&options, ranges, Arc::clone(&mailboxes))?;
        let StoreCore { handler, persisted, tasks } = core;
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let mut threads = Vec::new();
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(body).expect("spawning a store thread")
        };
        {
            let stopped = stopped.clone();
            threads.push(spawn("flotilla-replicas", Box::new(move || replicas.run(tasks, stopped))));
        }
        {
            // From the log's writer thread: the responses that waited for each write, and `Persisted` back to
            // the groups that need it.
            let (mailboxes, transport) = (Arc::clone(&mailboxes), Arc::clone(&handler.transport));
            spawn("flotilla-persisted", Box::new(move || handler::forward_persisted(persisted, mailboxes, transport)));
        }
        {
            // Log compaction and purge (`log_gc.rs`).
            let (mailboxes, kv, log, stopped) = (Arc::clone(&mailboxes), Arc::clone(&kv), log, stopped.clone());
            let (interval, bytes_max) = (options.log_gc_interval, options.log_bytes_max);
            threads.push(spawn(
                "flotilla-log-gc",
                Box::new(move || {
                    let mut gc = log_gc::LogGc::default();
                    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                        if gc.pass(kv.as_ref(), log.as_ref(), bytes_max, mailboxes.as_ref()).is_err() {
                            return; // the log failed: the node stops through it
                        }
                    }
                }),
            ));
        }
        {
            // Ticks only the groups that need time (see `Peer::needs_ticks`): idle single-replica groups cost
            // nothing; and sends a `Tick` only to those no poller handled during the last interval (`ticks.rs`).
            let (mailboxes, ticking) = (Arc::clone(&mailboxes), Arc::clone(&handler.ticking));
            let interval = options.tick_interval;
            threads.push(spawn(
                "flotilla-ticker",
                Box::new(move || {
                    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                        let sent = ticks::tick(&ticking, mailboxes.as_ref());
                        metrics::counter!("flotilla_tick_messages_total").increment(sent as u64);
                    }
                }),
            ));
        }
        Ok(Store {
            node_id: options.node_id,
            system: Some(system),
            router,
            mailboxes,
            ticking: handler.ticking,
            failure: handler.failure,
            local_reader: handler.local_reader,
            opening: handler.opening,
            tasks: handler.tasks,
            stop: Some(stop),
            threads,
        })
    }

    pub fn router(&self) -> &Router<PeerFsm> {
        &self.router
    }

    /// Where a transport delivers this node's replica messages (including those for groups it does not hold).
    pub fn inbox(&self) -> StoreInbox {
        StoreInbox { mailboxes: Arc::clone(&self.mailboxes), tasks: self.tasks.clone() }
    }

    /// Why the node stopped, if an engine failed (it then refuses every request with this reason).
    pub fn failure(&self) -> Option<String> {
        self.failure.reason()
    }

    /// Where callers learn whether a read may be served on their own thread (`local_reader.rs`).
    pub fn local_reader(&self) -> &Arc<LocalReader> {
        &self.local_reader
    }

    /// Whether a split applied here made group `group_id` and its replica is not open yet (the replicas thread
    /// opens it in a moment): a request for it may wait for it rather than go elsewhere.
    pub fn opening(&self, group_id: u64) -> bool {
        self.opening.contains(group_id)
    }

    /// Marks group `group_id` as opening here, or not (`opening`), as a split's apply and the replicas thread do:
    /// for tests of callers that wait on it.
    #[doc(hidden)]
    pub fn set_opening(&self, group_id: u64, opening: bool) {
        match opening {
            true => self.opening.insert(group_id),
            false => self.opening.remove(group_id),
        }
    }

    /// Calls `listener` with the reason once the node stops on a failure (at once if it has). It runs on the
    /// thread that met the failure: it must be quick and must not wait for the node.
    pub fn on_failure(&self, listener: flotilla_engine::contract::FailureListener) {
        self.failure.listen(listener);
    }

    /// Stops the node for a failure met outside it (an engine error on a read that bypasses the replicas).
    pub fn fail(&self, reason: String) {
        self.failure.fail(self.node_id, reason);
    }

    /// How many of the node's replicas the ticker visits now (the others hibernate, or lead alone and idle).
    pub fn ticking_groups(&self) -> usize {
        self.ticking.len()
    }

    /// Node liveness: node `node_id` is down. Every replica here hears it; those hibernating under a leader on
    /// that node wake, to elect another leader. (The in-process transport's nodes fail only when a test removes
    /// them; the network router of a later issue calls this from its node-to-node heartbeats.)
    pub fn node_down(&self, node_id: u64) {
        mailboxes::node_down(self.mailboxes.as_ref(), node_id);
    }

    /// Asks every group to elect itself (a single-replica store's groups lead at once).
    pub fn campaign_all(&self, group_ids: impl IntoIterator<Item = u64>) {
        for group_id in group_ids {
            mailboxes::deliver(self.mailboxes.as_ref(), group_id, PeerMsg::Campaign);
        }
    }
}

/// The groups a split applied on this node made whose replicas the replicas thread has not opened yet: noted by
/// the poller that applied the split, forgotten once the open is done (or failed). Few at a time, briefly.
#[derive(Default)]
pub(crate) struct OpeningGroups(parking_lot::Mutex<std::collections::HashSet<u64>>);

impl OpeningGroups {
    pub(crate) fn insert(&self, group_id: u64) {
        self.0.lock().insert(group_id);
    }

    pub(crate) fn remove(&self, group_id: u64) {
        self.0.lock().remove(&group_id);
    }

    fn contains(&self, group_id: u64) -> bool {
        self.0.lock().contains(&group_id)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        drop(self.stop.take()); // the ticker and the replicas thread see it closed and stop
        drop(self.system.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
