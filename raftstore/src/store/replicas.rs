//! Replicas created and destroyed while a node runs (membership changes), on the node's `flotilla-replicas`
//! thread, off the pollers.
//!
//! **Created** when a message arrives for a group the node does not hold: the replica opens empty (no range, no
//! members) under the message's replica id and is registered; the leader then catches it up by snapshot, which
//! brings the range. A group the node held before is not created again: a replica id is never reused, and the
//! node keeps the group's last descriptor as the record that it held it.
//!
//! **Destroyed** once it applies its own removal (`Peer::is_removed`): unregistered (no more messages, ticks or
//! requests reach it), forgotten by the ticker, its range's data dropped and its log compacted away
//! (`peer::destroy_replica`).

use std::collections::HashSet;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use flotilla_engine::contract::{KvEngine, LogEngine};
use flotilla_raft::Config;

use super::fsm::{PeerFsm, PeerMsg};
use super::mailboxes::Mailboxes;
use super::ticks::Ticking;
use super::StoreOptions;
use crate::message::Envelope;
use crate::peer::Peer;
use crate::range::RangeDescriptor;

/// Work for the replicas thread.
pub(crate) enum ReplicaTask {
    /// A message for a group this node does not hold.
    Create(Box<Envelope>),
    /// The group's replica here applied its own removal (the descriptor it applied: without this node).
    Destroy(Box<RangeDescriptor>),
}

/// How many tasks may wait; beyond, messages for unknown groups are dropped (Raft resends).
pub(crate) const TASKS_MAX: usize = 1024;

/// Opens the replica of `range` held by node `options.node_id` (its configuration is the descriptor's).
pub(crate) fn open_replica(
    options: &StoreOptions,
    range: &RangeDescriptor,
    log: &Arc<dyn LogEngine>,
    kv: &dyn KvEngine,
) -> Result<Peer, flotilla_raft::Error> {
    let replica =
        range.replicas.iter().find(|r| r.node_id == options.node_id).map_or(options.node_id, |r| r.replica_id);
    open_with_id(options, replica, range.clone(), log, kv)
}

fn open_with_id(
    options: &StoreOptions,
    replica: u64,
    range: RangeDescriptor,
    log: &Arc<dyn LogEngine>,
    kv: &dyn KvEngine,
) -> Result<Peer, flotilla_raft::Error> {
    let config = Config {
        id: replica,
        // Per replica, varied by the configured seed (a simulator's runs differ so).
        random_seed: options.raft.random_seed ^ range.group_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ replica,
        ..options.raft.clone()
    };
    Peer::open(config, options.peer.clone(), range, Arc::clone(log), kv)
}

pub(crate) struct Replicas {
    pub(crate) options: StoreOptions,
    pub(crate) log: Arc<dyn LogEngine>,
    pub(crate) kv: Arc<dyn KvEngine>,
    pub(crate) mailboxes: Arc<dyn Mailboxes>,
    pub(crate) ticking: Arc<Ticking>,
    /// Every group this node has held (opened at start, or created since).
    pub(crate) held: HashSet<u64>,
    pub(crate) failure: Arc<super::failure::NodeFailure>,
    pub(crate) local_reader: Arc<super::local_reader::LocalReader>,
}

impl Replicas {
    /// The replicas thread's loop, until the store stops.
    pub(crate) fn run(mut self, tasks: Receiver<ReplicaTask>, stopped: Receiver<()>) {
        loop {
            crossbeam_channel::select! {
                recv(tasks) -> task => match task {
                    Ok(task) => self.handle(task),
                    Err(_) => return,
                },
                recv(stopped) -> _ => return,
            }
        }
    }

    /// Carries out one task; a panic in it stops the node.
    pub(crate) fn handle(&mut self, task: ReplicaTask) {
        let done = match task {
            ReplicaTask::Create(envelope) => {
                flotilla_engine::panics::catch("creating a replica", || self.create(*envelope))
            }
            ReplicaTask::Destroy(descriptor) => {
                flotilla_engine::panics::catch("destroying a replica", || self.destroy(&descriptor))
            }
        };
        if let Err(reason) = done {
            self.failure.fail(self.options.node_id, reason);
        }
    }

    fn destroy(&mut self, descriptor: &RangeDescriptor) {
        self.mailboxes.unregister(descriptor.group_id);
        self.local_reader.lease(descriptor.group_id).withdraw();
        self.ticking.stop(descriptor.group_id);
        // A failure here is the engines' (the node's pollers meet it too); the data stays until a later try.
        if let Err(error) = crate::peer::destroy_replica(self.log.as_ref(), self.kv.as_ref(), descriptor) {
            eprintln!("flotilla: destroying the replica of group {} failed: {error:?}", descriptor.group_id);
            return;
        }
        metrics::counter!("flotilla_replicas_destroyed_total").increment(1);
    }

    fn create(&mut self, envelope: Envelope) {
        let group_id = envelope.group_id;
        if self.failure.reason().is_some() {
            return; // the node stopped
        }
        if self.held.contains(&group_id) {
            // Held now (created by an earlier message) or before (removed): deliver, or drop.
            let _ = self.mailboxes.send(group_id, PeerMsg::Replica(Box::new(envelope)));
            return;
        }
        let empty = RangeDescriptor { group_id, ..RangeDescriptor::default() };
        let peer = match open_with_id(&self.options, envelope.message.to(), empty, &self.log, self.kv.as_ref()) {
            Ok(peer) => peer,
            Err(error) => {
                self.failure
                    .fail(self.options.node_id, format!("opening an empty replica of group {group_id}: {error:?}"));
                return;
            }
        };
        let fsm = PeerFsm::new(peer, self.local_reader.lease(group_id));
        // Settled before a poller can see it: a fresh replica owes no ticks for the time before it existed.
        self.ticking.settle(&fsm.ticks_seen);
        let (ticking, seen) = (fsm.ticking, Arc::clone(&fsm.ticks_seen));
        if self.mailboxes.register(group_id, Box::new(fsm)).is_ok() {
            self.held.insert(group_id);
            if ticking {
                self.ticking.start(group_id, &seen);
            }
            metrics::counter!("flotilla_replicas_created_total").increment(1);
            let _ = self.mailboxes.send(group_id, PeerMsg::Replica(Box::new(envelope)));
        }
    }
}
