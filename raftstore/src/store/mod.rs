//! A store: one node's group replicas hosted in the batch system over the node's shared log (group commit) and
//! state machine (redb), with a ticker and the path that brings `Persisted` back to each group.
//!
//! - [`fsm`]: the FSM around a peer, its messages, and the waiting clients;
//! - [`handler`]: the poll round (writes of all groups to the log, one state machine apply per round);
//! - [`replicas`]: replicas created (on a message for a group the node does not hold) and destroyed (once
//!   removed) while the node runs;
//! - [`ticks`]: the node's tick count, and which replicas need ticks (busy ones take theirs inline);
//! - `log_gc.rs`: log compaction asked of the replicas as their state machine checkpoints, and the log purged;
//! - [`transport`]: the transport seam — the outbound [`Transport`] (flushed once per round), the inbound
//!   [`StoreInbox`], and stores in one process reaching each other;
//! - `failure.rs`: why the node stopped, and what stopping does (waiting clients refused, listeners told);
//! - this file: [`Store`], which opens the engines and groups, and routes requests.

mod failure;
pub mod fsm;
pub mod handler;
mod log_gc;
pub mod replicas;
pub mod ticks;
pub mod transport;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use flotilla_engine::flusher::BackgroundFlusher;
use flotilla_engine::log_engine::LogEngine;
use flotilla_engine::state_machine::StateMachine;
use flotilla_engine::wal::group_commit::Persisted;
use flotilla_raft::{Config, ReadMode};

pub use fsm::{PeerFsm, PeerMsg, ReadRequest, ReadResult};
pub use handler::StoreHandler;
pub use transport::{InProcessTransport, NoTransport, StoreInbox, Transport};

use crate::batch::{BatchOptions, BatchSystem, Router, SendError};
use crate::peer::PeerOptions;
use crate::range::RangeDescriptor;
use replicas::{ReplicaTask, Replicas};
use ticks::Ticking;

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
        }
    }
}

/// A node's groups, running. Dropping it stops its threads (the engines are flushed by their owners).
pub struct Store {
    node_id: u64,
    system: Option<BatchSystem<PeerFsm>>,
    router: Router<PeerFsm>,
    ticking: Arc<Ticking>,
    failure: Arc<failure::NodeFailure>,
    tasks: crossbeam_channel::Sender<ReplicaTask>,
    /// Dropped to stop the ticker and the replicas thread.
    stop: Option<crossbeam_channel::Sender<()>>,
    /// The replicas thread and the ticker, joined on drop. (The persisted forwarder is not: it ends when the
    /// log's writer drops its last sender, which the log's owner does after the store.)
    threads: Vec<JoinHandle<()>>,
}

/// Delivers `message` even to a full mailbox, by waiting (for internal messages that must not be lost).
fn deliver(router: &Router<PeerFsm>, group_id: u64, mut message: PeerMsg) {
    loop {
        match router.send(group_id, message) {
            Ok(()) | Err(SendError::NotFound(_)) => return,
            Err(SendError::Full(back)) => {
                message = back;
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

impl Store {
    /// Starts the groups in `ranges` (this node's replica of each) over the given engines. Each replica restarts
    /// from what the engines hold.
    pub fn start(
        options: StoreOptions,
        ranges: &[RangeDescriptor],
        log: Arc<dyn LogEngine>,
        kv: Arc<StateMachine>,
        flusher: Arc<BackgroundFlusher>,
        transport: Arc<dyn Transport>,
    ) -> Result<Store, flotilla_raft::Error> {
        let (persisted, persisted_receiver) = crossbeam_channel::unbounded::<Persisted>();
        let (tasks, task_receiver) = crossbeam_channel::bounded::<ReplicaTask>(replicas::TASKS_MAX);
        let ticking: Arc<Ticking> = Arc::default();
        let failure: Arc<failure::NodeFailure> = Arc::default();
        let handler = StoreHandler {
            node_id: options.node_id,
            ticking: Arc::clone(&ticking),
            log: Arc::clone(&log),
            kv: Arc::clone(&kv),
            flusher,
            transport,
            persisted,
            tasks: tasks.clone(),
            failure: Arc::clone(&failure),
        };
        let system = BatchSystem::start("flotilla-poller", options.batch.clone(), |_| handler.clone());
        let router = system.router().clone();
        failure.wake_on_stop(router.clone());
        {
            // The log's writer failing on its own (a disk error, a panic) stops the node at once. (Weak: the log
            // outlives the store, and the failure holds the router, which holds the replicas, which hold the log.)
            let (failure, node_id) = (Arc::downgrade(&failure), options.node_id);
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
        for range in &held {
            let fsm = PeerFsm::new(replicas::open_replica(&options, range, &log, &kv)?);
            if fsm.ticking {
                ticking.start(range.group_id, &fsm.ticks_seen);
            }
            assert!(router.register(range.group_id, Box::new(fsm)).is_ok(), "group {} twice", range.group_id);
        }
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let mut threads = Vec::new();
        {
            let replicas = Replicas {
                options: options.clone(),
                log: Arc::clone(&log),
                kv: Arc::clone(&kv),
                router: router.clone(),
                ticking: Arc::clone(&ticking),
                // Held now or before: every group whose descriptor this node's state machine stores.
                held: kv
                    .ranges()
                    .map_err(|e| flotilla_raft::Error::Storage(flotilla_raft::StorageError::Other(e.to_string())))?
                    .into_iter()
                    .map(|(group, _)| group)
                    .collect(),
                failure: Arc::clone(&failure),
            };
            let stopped = stopped.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("flotilla-replicas".into())
                    .spawn(move || replicas.run(task_receiver, stopped))
                    .expect("spawning the replicas thread"),
            );
        }
        {
            // From the log's writer thread: the responses that waited for each write, and `Persisted` back to
            // the groups that need it.
            let (router, transport) = (router.clone(), Arc::clone(&handler.transport));
            std::thread::Builder::new()
                .name("flotilla-persisted".into())
                .spawn(move || handler::forward_persisted(persisted_receiver, router, transport))
                .expect("spawning the persisted forwarder");
        }
        {
            // Log compaction and purge (`log_gc.rs`).
            let (router, kv, log, stopped) = (router.clone(), Arc::clone(&kv), Arc::clone(&log), stopped.clone());
            let (interval, bytes_max) = (options.log_gc_interval, options.log_bytes_max);
            threads.push(
                std::thread::Builder::new()
                    .name("flotilla-log-gc".into())
                    .spawn(move || {
                        let mut gc = log_gc::LogGc::default();
                        let mut asked = 1; // a first purge after a restart
                        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                            // What the last pass asked for is written by now (or soon): purge behind it.
                            if asked > 0 && log.purge(bytes_max).is_err() {
                                return; // the log failed: the node stops through it
                            }
                            asked = gc.pass(
                                &kv,
                                || router.ids(),
                                |group_id| router.send(group_id, PeerMsg::CompactLog).is_ok(),
                            );
                        }
                    })
                    .expect("spawning the log collector"),
            );
        }
        {
            // Ticks only the groups that need time (see `Peer::needs_ticks`): idle single-replica groups cost nothing;
            // and sends a `Tick` only to those no poller handled during the last interval (`ticks.rs`).
            let (router, interval, ticking) = (router.clone(), options.tick_interval, Arc::clone(&ticking));
            threads.push(
                std::thread::Builder::new()
                    .name("flotilla-ticker".into())
                    .spawn(move || {
                        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                            let behind = ticking.advance();
                            metrics::counter!("flotilla_tick_messages_total").increment(behind.len() as u64);
                            for group_id in behind {
                                let _ = router.send(group_id, PeerMsg::Tick); // a full mailbox has work: a tick can wait
                            }
                        }
                    })
                    .expect("spawning the ticker"),
            );
        }
        Ok(Store {
            node_id: options.node_id,
            system: Some(system),
            router,
            ticking,
            failure,
            tasks,
            stop: Some(stop),
            threads,
        })
    }

    pub fn router(&self) -> &Router<PeerFsm> {
        &self.router
    }

    /// Where a transport delivers this node's replica messages (including those for groups it does not hold).
    pub fn inbox(&self) -> StoreInbox {
        StoreInbox { router: self.router.clone(), tasks: self.tasks.clone() }
    }

    /// Why the node stopped, if an engine failed (it then refuses every request with this reason).
    pub fn failure(&self) -> Option<String> {
        self.failure.reason()
    }

    /// Calls `listener` with the reason once the node stops on a failure (at once if it has). It runs on the
    /// thread that met the failure: it must be quick and must not wait for the node.
    pub fn on_failure(&self, listener: flotilla_engine::failure::FailureListener) {
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
        for group_id in self.router.ids() {
            deliver(&self.router, group_id, PeerMsg::NodeDown { node_id });
        }
    }

    /// Asks every group to elect itself (a single-replica store's groups lead at once).
    pub fn campaign_all(&self, group_ids: impl IntoIterator<Item = u64>) {
        for group_id in group_ids {
            deliver(&self.router, group_id, PeerMsg::Campaign);
        }
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
