//! The whole-store simulator: several nodes, each hosting a replica of several groups, run in one thread with the
//! **production** per-group logic — the sans-IO `Peer` (apply included), the real WAL (`SyncWal` on a
//! fault-injecting `SimDisk`) and the real redb state machine (on a backend that loses unsynced writes) — over a
//! simulated network and clock. One seed fixes everything; a failing seed replays exactly.
//!
//! **Fault phase**: message loss, duplication and reordering, one-way partitions and isolated nodes, slow disks (a Ready's write
//! waits before it is durable), node crashes (sometimes in the middle of a write, tearing it) and restarts,
//! clock-rate differences of a few percent, state machine checkpoints at random, leadership transfers, log
//! compactions that leave lagging replicas to catch up by snapshot streams (small chunks, so that streams lose,
//! duplicate and reorder chunks too). **Calm phase**: the network
//! heals, every node runs, clients finish; then every group must elect a leader, serve a write, and all its
//! replicas must converge on the same data.
//!
//! Clients issue puts and deletes of unique values, gets and compare-and-sets on a few keys per group. A client
//! retries only after a definite "nothing happened" (not leader, dropped, busy); an operation without an answer
//! by its deadline is recorded as **unknown**, never as failed. The history is checked by the linearizability
//! checker; Raft invariants (one leader per term and group; every replica applies the same entry at an index) are
//! checked after every step.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use std::path::Path;
use std::sync::Arc;

use crossbeam_channel::{unbounded, Receiver, Sender};
use flotilla_engine::disk::SimDisk;
use flotilla_engine::log_engine::{LogEngine, SyncWal};
use flotilla_engine::redb_sim::SimRedbBackend;
use flotilla_engine::state_machine::{StateMachine, StateMachineOptions};
use flotilla_engine::wal::group_commit::{Persisted, WriteRequest};
use flotilla_engine::wal::record::LogOp;
use flotilla_engine::wal::{Wal, WalOptions};
use flotilla_raft::{Config, ReadMode};
use flotilla_raftstore::command::{Command, Op, Outcome as Applied};
use flotilla_raftstore::message::ReplicaMessage;
use flotilla_raftstore::peer::{
    destroy_replica, finish_interrupted_destroys, prepare_groups, LogWrite, MembershipChange, Peer, PeerError,
    PeerOptions, Response, SnapshotOptions, Token,
};
use flotilla_raftstore::range::{initial_ranges, RangeDescriptor, Replica};

use crate::linearizability::{check, Call, Operation, Outcome, Verdict};
use crate::sim_rng::SimRng;

/// Knobs of one run; everything else derives from the seed.
#[derive(Clone, Debug)]
pub struct StoreSimOptions {
    pub seed: u64,
    pub fault_steps: u64,
    pub calm_steps: u64,
    /// Print every message delivered (for replaying one seed).
    pub trace: bool,
}

impl StoreSimOptions {
    pub fn new(seed: u64) -> StoreSimOptions {
        StoreSimOptions { seed, fault_steps: 4000, calm_steps: 6000, trace: false }
    }
}

/// What a clean run did.
#[derive(Clone, Debug, Default)]
pub struct StoreSimReport {
    pub nodes: usize,
    pub groups: usize,
    pub operations: usize,
    pub unknown: usize,
    pub crashes: u64,
    pub torn_writes: u64,
    pub transfers: u64,
    pub messages: u64,
    pub compactions: u64,
    /// Membership changes proposed (during faults some do not complete), and those that applied.
    pub membership_changes: u64,
    pub membership_changes_applied: u64,
    /// Removed replicas whose nodes destroyed them (data and log dropped).
    pub replicas_destroyed: u64,
    /// Destroys a crash interrupted, finished when the node reopened.
    pub interrupted_destroys_finished: u64,
    /// Ticks replicas slept through (hibernating).
    pub ticks_slept: u64,
    /// Snapshots installed (streams that ended in a replica taking the snapshot).
    pub snapshot_installs: u64,
}

impl StoreSimReport {
    /// Adds another run's counts (for totals over many seeds).
    pub fn add(&mut self, other: &StoreSimReport) {
        self.operations += other.operations;
        self.unknown += other.unknown;
        self.crashes += other.crashes;
        self.torn_writes += other.torn_writes;
        self.transfers += other.transfers;
        self.messages += other.messages;
        self.compactions += other.compactions;
        self.membership_changes += other.membership_changes;
        self.membership_changes_applied += other.membership_changes_applied;
        self.replicas_destroyed += other.replicas_destroyed;
        self.interrupted_destroys_finished += other.interrupted_destroys_finished;
        self.ticks_slept += other.ticks_slept;
        self.snapshot_installs += other.snapshot_installs;
    }
}

#[derive(Debug)]
pub struct StoreSimFailure {
    pub seed: u64,
    pub step: u64,
    pub reason: String,
}

type SimResult<T> = Result<T, String>;

/// A node's running state (gone while it is down).
struct Running {
    log: Arc<SyncWal>,
    kv: StateMachine,
    peers: BTreeMap<u64, Peer>,
    /// Ready writes waiting for the (slow) disk, in order.
    disk_queue: VecDeque<(u64, LogWrite)>,
    /// Committed entries waiting to be applied (apply lags commit, as in a busy store), in order.
    apply_queue: VecDeque<(u64, Vec<flotilla_raft::Entry>)>,
    /// Groups whose removed replica this node destroyed.
    destroyed: BTreeSet<u64>,
    reply: Sender<Persisted>,
    persisted: Receiver<Persisted>,
}

struct Node {
    id: u64,
    disk: SimDisk,
    redb: SimRedbBackend,
    running: Option<Running>,
    /// Clock rate in per mille of nominal, and the tick accumulator.
    rate_per_mille: u64,
    clock: u64,
}

/// One client operation of the history, with what the simulation needs to drive it.
struct ClientOp {
    operation: Operation,
    group: usize,
    /// For writes: the command (resent as is on retries).
    command: Option<Command>,
    deadline: u64,
    /// When to send the next attempt (`None`: one is out).
    retry_at: Option<u64>,
    done: bool,
}

struct Sim {
    rng: SimRng,
    step: u64,
    nodes: Vec<Node>,
    ranges: Vec<RangeDescriptor>,
    keys: Vec<Vec<Vec<u8>>>,
    /// Packets in flight, with the step they are due.
    network: Vec<(u64, Packet)>,
    /// Node liveness: when node `.0` last heard anything from node `.1` (a node heartbeat or any message).
    heard: HashMap<(u64, u64), u64>,
    /// Where each replica lives: (group, replica id) → node (the directory a real cluster keeps).
    replica_nodes: HashMap<(u64, u64), u64>,
    /// Replica ids for added replicas (above every node id).
    next_replica_id: u64,
    /// Tokens of membership proposals (their answers are counted, not checked).
    membership_tokens: BTreeSet<Token>,
    /// One-way cuts: (from node, to node).
    cuts: BTreeSet<(u64, u64)>,
    ops: Vec<ClientOp>,
    /// Attempt token → operation.
    attempts: HashMap<Token, usize>,
    next_token: Token,
    next_value: u64,
    clients: Vec<Option<usize>>,
    /// Per (client, group): the node believed to lead.
    hints: HashMap<(usize, usize), u64>,
    /// Invariants: the leader of each (group, term); the entry applied at each (group, index).
    leaders: HashMap<(u64, u64), u64>,
    applied: HashMap<(u64, u64), (u64, u64)>,
    /// Every replica's Raft settings but its id and seed, drawn per seed: the read mode, and each of
    /// `commit_broadcast`, `heartbeats_skip_after_append` and `persisted_messages_in_ready` (the raftstore's
    /// defaults are false, true and true; both values of each are checked).
    raft: Config,
    report: StoreSimReport,
    faults: bool,
    trace: bool,
    /// Strictly increasing timestamps for the history's calls and returns (steps would tie).
    now: u64,
}

fn wal_options() -> WalOptions {
    WalOptions { segment_bytes_max: 16 << 10, ..WalOptions::default() }
}

fn machine_options() -> StateMachineOptions {
    StateMachineOptions {
        memtable_bytes_max: 4 << 10,
        block_bytes_max: 512,
        compaction_fanout: 2,
        runs_max: 4,
        cache_bytes: 1 << 20,
        ..Default::default()
    }
}

/// Chunks of a few pairs: streams of many chunks, so that the window, resends and timeouts all run. Groups
/// hibernate after a few idle ticks (or never, in some runs), so that they sleep and wake all through the faults.
fn peer_options(rng: &mut SimRng) -> PeerOptions {
    let snapshot = SnapshotOptions { chunk_bytes_max: 256, chunks_inflight_max: 2, resend_ticks: 3, timeout_ticks: 20 };
    let hibernate_idle_ticks = if rng.chance_per_mille(100) { 0 } else { rng.range(3, 15) as u32 };
    // Logs kept for laggards up to a few entries (or none): replicas further behind catch up by snapshot.
    PeerOptions { snapshot, hibernate_idle_ticks, log_lag_entries_max: rng.below(16) }
}

/// A node not heard from for this many steps (about five ticks) is declared down by the others.
const NODE_DOWN_STEPS: u64 = 35;

/// What travels between simulated nodes.
#[derive(Clone)]
enum Packet {
    /// A message between replicas of a group, between their nodes (boxed: far larger than a node heartbeat).
    Replica { group: u64, from_node: u64, to_node: u64, message: Box<ReplicaMessage> },
    /// Node liveness: one per node pair and tick, whatever the number of groups.
    NodeHeartbeat { from: u64, to: u64 },
}

impl Packet {
    fn ends(&self) -> (u64, u64) {
        match self {
            Packet::Replica { from_node, to_node, .. } => (*from_node, *to_node),
            Packet::NodeHeartbeat { from, to } => (*from, *to),
        }
    }
}

fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

impl Sim {
    fn new(options: &StoreSimOptions) -> SimResult<Sim> {
        let mut rng = SimRng::new(options.seed);
        let node_count = if rng.chance_per_mille(700) { 3 } else { 5 };
        let group_count = rng.range(1, 4) as usize;
        // Five-node runs start every group on nodes 1-3: membership changes move them onto 4 and 5.
        let replicas: Vec<Replica> =
            (1..=node_count.min(3)).map(|id| Replica { node_id: id, replica_id: id, learner: false }).collect();
        let ranges = initial_ranges(group_count as u64, 1, &replicas);
        let replica_nodes = ranges
            .iter()
            .flat_map(|r| r.replicas.iter().map(|replica| ((r.group_id, replica.replica_id), replica.node_id)))
            .collect();
        let keys = ranges
            .iter()
            .map(|range| {
                (0..3u8)
                    .map(|k| {
                        [if range.start.is_empty() { vec![0] } else { range.start.clone() }, vec![b'k', k]].concat()
                    })
                    .collect()
            })
            .collect();
        let raft = Config {
            read_mode: if rng.chance_per_mille(500) { ReadMode::LeaseBased } else { ReadMode::Safe },
            commit_broadcast: rng.chance_per_mille(300),
            heartbeats_skip_after_append: rng.chance_per_mille(700),
            persisted_messages_in_ready: rng.chance_per_mille(700),
            ..Config::default()
        };
        let nodes = (1..=node_count)
            .map(|id| Node {
                id,
                disk: SimDisk::new(),
                redb: SimRedbBackend::new(),
                running: None,
                rate_per_mille: 0,
                clock: 0,
            })
            .collect();
        let clients = vec![None; rng.range(2, 5) as usize];
        let mut sim = Sim {
            rng,
            step: 0,
            nodes,
            ranges,
            keys,
            network: Vec::new(),
            heard: HashMap::new(),
            replica_nodes,
            next_replica_id: 100,
            membership_tokens: BTreeSet::new(),
            cuts: BTreeSet::new(),
            ops: Vec::new(),
            attempts: HashMap::new(),
            next_token: 1,
            next_value: 1,
            clients,
            hints: HashMap::new(),
            leaders: HashMap::new(),
            applied: HashMap::new(),
            raft,
            report: StoreSimReport { nodes: node_count as usize, groups: group_count, ..Default::default() },
            faults: true,
            trace: options.trace,
            now: 0,
        };
        for position in 0..sim.nodes.len() {
            // Within the lease's drift bound (the core documents ±4 %).
            sim.nodes[position].rate_per_mille = sim.rng.range(970, 1030);
            sim.start(position)?;
        }
        Ok(sim)
    }

    /// Opens a node from what its disks hold (a first start or a restart after a crash).
    fn start(&mut self, position: usize) -> SimResult<()> {
        let node = &mut self.nodes[position];
        let (wal, _report) = Wal::open(Path::new("/wal"), Arc::new(node.disk.clone()), wal_options())
            .map_err(|e| format!("node {}: {e}", node.id))?;
        let log = Arc::new(SyncWal::new(wal));
        let kv = StateMachine::open_with_backend(node.redb.clone(), machine_options())
            .map_err(|e| format!("node {}: {e}", node.id))?;
        // What it holds: the descriptors it stored (the initial layout at a first start). A replica it holds no
        // more (removed) stays closed; one created empty and never caught up is created again by the next message.
        // A destroy a crash interrupted (between the removal's apply and the end of the destroy) is finished.
        let finished =
            finish_interrupted_destroys(node.id, log.as_ref(), &kv).map_err(|e| format!("node {}: {e:?}", node.id))?;
        self.report.interrupted_destroys_finished += finished as u64;
        let stored = kv.ranges().map_err(|e| e.to_string())?;
        let held: Vec<RangeDescriptor> = if stored.is_empty() {
            self.ranges.iter().filter(|r| r.lists_node(node.id)).cloned().collect()
        } else {
            stored
                .iter()
                .map(|(_, bytes)| RangeDescriptor::decode_stored(bytes).expect("stored descriptors decode"))
                .collect()
        };
        prepare_groups(log.as_ref(), &kv, &held).map_err(|e| format!("node {}: {e:?}", node.id))?;
        let mut peers = BTreeMap::new();
        for range in held {
            let Some(replica) = range.replicas.iter().find(|replica| replica.node_id == node.id) else { continue };
            let config = Config { id: replica.replica_id, random_seed: self.rng.next_u64(), ..self.raft.clone() };
            let group_id = range.group_id;
            let peer =
                Peer::open(config, peer_options(&mut self.rng), range, Arc::clone(&log) as Arc<dyn LogEngine>, &kv)
                    .map_err(|e| format!("node {}: {e:?}", node.id))?;
            peers.insert(group_id, peer);
        }
        let (reply, persisted) = unbounded();
        node.running = Some(Running {
            log,
            kv,
            peers,
            disk_queue: VecDeque::new(),
            apply_queue: VecDeque::new(),
            destroyed: BTreeSet::new(),
            reply,
            persisted,
        });
        // A fresh start has heard from nobody yet: it gives every node time before judging it down.
        let id = node.id;
        for other in 1..=self.nodes.len() as u64 {
            self.heard.insert((id, other), self.step);
        }
        Ok(())
    }

    fn crash(&mut self, position: usize) {
        let torn = self.rng.chance_per_mille(500);
        let keep_seed = self.rng.next_u64();
        let node = &mut self.nodes[position];
        let Some(mut running) = node.running.take() else { return };
        if torn {
            // The power goes in the middle of the next write: it fails, and a prefix of it may reach the disk.
            if let Some((group, write)) = running.disk_queue.pop_front() {
                node.disk.power_off();
                let request = WriteRequest::new(group, write.ready_number, write.ops, running.reply.clone());
                let _ = running.log.submit(request);
                self.report.torn_writes += 1;
            }
        }
        node.disk.power_off();
        node.redb.power_off();
        drop(running);
        let mut keep = SimRng::new(keep_seed);
        node.disk.crash(|_, unsynced| keep.below(unsynced as u64 + 1) as usize);
        node.redb.crash();
        node.redb.power_on();
        self.report.crashes += 1;
    }

    /// Carries out everything the node's peers ask, until they are quiet.
    fn drive(&mut self, position: usize) -> SimResult<()> {
        // Slow disks only while faults last: after them every write completes at once.
        let slow_disk = self.faults && self.rng.chance_per_mille(300);
        loop {
            let mut moved = false;
            let groups: Vec<u64> = match &self.nodes[position].running {
                Some(running) => running.peers.keys().copied().collect(),
                None => return Ok(()),
            };
            for group in groups {
                let output = {
                    let running = self.nodes[position].running.as_mut().expect("running");
                    running.peers.get_mut(&group).expect("peer").take_output(&running.kv)
                };
                if let Some(reason) = self.nodes[position]
                    .running
                    .as_ref()
                    .and_then(|r| r.peers[&group].storage_failure().map(str::to_string))
                {
                    return Err(format!("node {} group {group}: {reason}", self.nodes[position].id));
                }
                if self.nodes[position].running.as_ref().is_some_and(|r| r.peers[&group].is_removed()) {
                    // Removed: its last answers go out, and its node destroys it (once); nothing else.
                    for (token, response) in output.responses {
                        self.on_response(position, token, response);
                    }
                    self.destroy(position, group)?;
                    continue;
                }
                if output.is_empty() {
                    continue;
                }
                moved = true;
                if let Some(write) = output.write {
                    if write.ops.iter().any(|op| matches!(op, LogOp::Snapshot { .. })) {
                        self.report.snapshot_installs += 1;
                    }
                    self.nodes[position].running.as_mut().expect("running").disk_queue.push_back((group, write));
                    if !slow_disk {
                        self.persist_one(position)?;
                    }
                }
                for message in output.messages {
                    self.send(group, message);
                }
                if !output.committed.is_empty() {
                    self.nodes[position]
                        .running
                        .as_mut()
                        .expect("running")
                        .apply_queue
                        .push_back((group, output.committed));
                    if !(self.faults && self.rng.chance_per_mille(300)) {
                        self.apply_queued(position)?;
                    }
                }
                for (token, response) in output.responses {
                    self.on_response(position, token, response);
                }
            }
            if !moved {
                return Ok(());
            }
        }
    }

    /// Drops the data and log of the node's removed replica of `group`, once.
    fn destroy(&mut self, position: usize, group: u64) -> SimResult<()> {
        if self.nodes[position].running.as_ref().expect("running").destroyed.contains(&group) {
            return Ok(());
        }
        // As a node's log takes requests in order, the writes queued before the destroy's go first (a replica
        // told of its removal may still have some under way).
        while self.nodes[position].running.as_ref().expect("running").disk_queue.iter().any(|(g, _)| *g == group) {
            self.persist_one(position)?;
        }
        let running = self.nodes[position].running.as_mut().expect("running");
        running.destroyed.insert(group);
        let descriptor = running.peers[&group].descriptor().clone();
        destroy_replica(running.log.as_ref(), &running.kv, &descriptor)
            .map_err(|e| format!("node {}: {e:?}", self.nodes[position].id))?;
        self.report.replicas_destroyed += 1;
        Ok(())
    }

    /// Applies every committed batch waiting on the node, in order.
    fn apply_queued(&mut self, position: usize) -> SimResult<()> {
        let node_id = self.nodes[position].id;
        loop {
            let Some(running) = self.nodes[position].running.as_mut() else { return Ok(()) };
            let Some((group, entries)) = running.apply_queue.pop_front() else { return Ok(()) };
            if running.peers[&group].is_removed() {
                continue; // it takes part in nothing any more (and its data may be gone)
            }
            for entry in &entries {
                let seen = (entry.term, hash(&entry.data));
                if let Some(previous) = self.applied.insert((group, entry.index), seen) {
                    if previous != seen {
                        return Err(format!(
                            "group {group}: node {node_id} applied a different entry at index {}",
                            entry.index
                        ));
                    }
                }
            }
            let last = entries.last().expect("non-empty").index;
            let running = self.nodes[position].running.as_mut().expect("running");
            let peer = running.peers.get_mut(&group).expect("peer");
            let (batch, outcomes) = peer.apply_committed(&running.kv, &entries).map_err(|e| e.to_string())?;
            if self.trace {
                for applied in &outcomes {
                    println!(
                        "step {} group {group}: node {node_id} applied {} term {} token {} -> {:?}",
                        self.step, applied.index, applied.term, applied.request_id, applied.outcome
                    );
                }
            }
            running.kv.apply(vec![batch]).map_err(|e| e.to_string())?;
            peer.on_applied(last, outcomes);
        }
    }

    /// The node's disk completes its oldest waiting write.
    fn persist_one(&mut self, position: usize) -> SimResult<()> {
        let node_id = self.nodes[position].id;
        let Some(running) = self.nodes[position].running.as_mut() else { return Ok(()) };
        let Some((group, write)) = running.disk_queue.pop_front() else { return Ok(()) };
        let request = WriteRequest::new(group, write.ready_number, write.ops, running.reply.clone());
        running.log.submit(request).map_err(|e| format!("node {node_id}: {e}"))?;
        let done: Vec<Persisted> = running.persisted.try_iter().collect();
        for persisted in done {
            // A removed replica takes nothing more (as its node's handler drops its messages).
            let peer = running.peers.get_mut(&persisted.group_id).expect("peer");
            if peer.is_removed() {
                continue;
            }
            peer.on_write_durable(persisted.ready_number, write.prompt);
        }
        // Durable: the answers that waited for it go.
        for message in write.messages {
            self.send(group, message);
        }
        Ok(())
    }

    fn send(&mut self, group: u64, message: ReplicaMessage) {
        if self.trace {
            println!("step {} group {group}: sent {}", self.step, describe_message(&message));
        }
        let Some(&to_node) = self.replica_nodes.get(&(group, message.to())) else { return };
        let from_node = self.replica_nodes[&(group, message.from())];
        self.transmit(Packet::Replica { group, from_node, to_node, message: Box::new(message) });
    }

    fn transmit(&mut self, packet: Packet) {
        if self.faults && self.rng.chance_per_mille(30) {
            return; // lost
        }
        // A delay of a few steps (ticks come every few steps): reordering comes from differing delays; during
        // faults some messages take much longer.
        let delay = |rng: &mut SimRng, faults: bool| {
            if faults && rng.chance_per_mille(50) {
                rng.range(10, 80)
            } else {
                rng.range(1, 6)
            }
        };
        if self.faults && self.rng.chance_per_mille(20) {
            let due = self.step + delay(&mut self.rng, self.faults);
            self.network.push((due, packet.clone()));
        }
        let due = self.step + delay(&mut self.rng, self.faults);
        self.network.push((due, packet));
    }

    /// Delivers every message due by now, in random order.
    fn deliver_due(&mut self) -> SimResult<()> {
        let mut due = Vec::new();
        let mut at = 0;
        while at < self.network.len() {
            if self.network[at].0 <= self.step {
                due.push(self.network.swap_remove(at));
            } else {
                at += 1;
            }
        }
        while !due.is_empty() {
            let (_, packet) = due.swap_remove(self.rng.below(due.len() as u64) as usize);
            self.deliver(packet)?;
        }
        Ok(())
    }

    fn deliver(&mut self, packet: Packet) -> SimResult<()> {
        let (from, to) = packet.ends();
        if self.cuts.contains(&(from, to)) {
            return Ok(());
        }
        if self.nodes[(to - 1) as usize].running.is_some() {
            self.heard.insert((to, from), self.step);
        }
        let (group, message) = match packet {
            Packet::Replica { group, message, .. } => (group, *message),
            Packet::NodeHeartbeat { .. } => return Ok(()),
        };
        let position = (to - 1) as usize;
        if self.trace {
            let up = self.nodes[position].running.is_some();
            println!(
                "step {} group {group}: {}{}",
                self.step,
                describe_message(&message),
                if up { "" } else { " (to a down node)" }
            );
        }
        let Some(running) = self.nodes[position].running.as_mut() else { return Ok(()) };
        self.report.messages += 1;
        if !running.peers.contains_key(&group) {
            // A replica this node does not hold yet: create it empty (a snapshot will bring the range) — unless
            // the node held one of this group before (removed replicas are never re-added here).
            if running.kv.ranges().map_err(|e| e.to_string())?.iter().any(|(g, _)| *g == group) {
                return Ok(());
            }
            let empty = RangeDescriptor { group_id: group, ..RangeDescriptor::default() };
            let config = Config { id: message.to(), random_seed: self.rng.next_u64(), ..self.raft.clone() };
            let peer = Peer::open(
                config,
                peer_options(&mut self.rng),
                empty,
                Arc::clone(&running.log) as Arc<dyn LogEngine>,
                &running.kv,
            )
            .map_err(|e| e.to_string())?;
            running.peers.insert(group, peer);
        }
        let peer = running.peers.get_mut(&group).expect("held");
        if peer.is_removed() || peer.replica_id() != message.to() {
            return Ok(()); // for a removed replica, or another incarnation's
        }
        // An invalid message (e.g. from before a restart) is refused by the core; nothing to do.
        let _ = peer.on_message(message, &running.kv);
        self.drive(position)
    }

    /// Asks one group's replica on a node to compact its log (`Peer::compact_log`: below what its state machine
    /// holds durably, keeping a few entries for laggards): replicas further behind then catch up by snapshot.
    fn compact_log(&mut self, position: usize) -> SimResult<()> {
        let group = self.ranges[self.rng.below(self.ranges.len() as u64) as usize].group_id;
        let Some(running) = self.nodes[position].running.as_mut() else { return Ok(()) };
        let Some(peer) = running.peers.get_mut(&group) else { return Ok(()) };
        peer.compact_log(&running.kv);
        self.report.compactions += 1;
        self.drive(position)
    }

    fn tick(&mut self) -> SimResult<()> {
        for position in 0..self.nodes.len() {
            let mut ticked = false;
            let node = &mut self.nodes[position];
            node.clock += node.rate_per_mille;
            while node.clock >= 1000 {
                node.clock -= 1000;
                if let Some(running) = node.running.as_mut() {
                    self.report.ticks_slept +=
                        running.peers.values().filter(|peer| peer.is_hibernating()).count() as u64;
                    running.peers.values_mut().filter(|peer| !peer.is_removed()).for_each(Peer::on_tick);
                    ticked = true;
                }
            }
            if ticked {
                self.node_liveness(position);
            }
            self.drive(position)?;
        }
        Ok(())
    }

    /// On a node's tick: a heartbeat to every other node (one per node pair, for all groups), and the verdict on
    /// each node it has not heard from lately — down — passed to its replicas (hibernating followers under a
    /// leader there wake).
    fn node_liveness(&mut self, position: usize) {
        let id = self.nodes[position].id;
        let others: Vec<u64> = self.nodes.iter().map(|n| n.id).filter(|&other| other != id).collect();
        for &other in &others {
            self.transmit(Packet::NodeHeartbeat { from: id, to: other });
        }
        let step = self.step;
        let down: Vec<u64> = others
            .into_iter()
            .filter(|&other| step.saturating_sub(*self.heard.get(&(id, other)).unwrap_or(&0)) > NODE_DOWN_STEPS)
            .collect();
        let Some(running) = self.nodes[position].running.as_mut() else { return };
        for other in down {
            for peer in running.peers.values_mut() {
                if let Some(replica) =
                    peer.descriptor().replicas.iter().find(|r| r.node_id == other).map(|r| r.replica_id)
                {
                    peer.on_node_down(replica);
                }
            }
        }
    }

    // ---- clients ----

    fn timestamp(&mut self) -> u64 {
        self.now += 1;
        self.now
    }

    fn issue(&mut self, client: usize) {
        let group = self.rng.below(self.ranges.len() as u64) as usize;
        let key = self.keys[group][self.rng.below(self.keys[group].len() as u64) as usize].clone();
        let value = self.next_value;
        self.next_value += 1;
        let (call, command_op) = match self.rng.below(10) {
            0..=3 => (Call::Get, None),
            4..=6 => (Call::Put(value), Some(Op::put(key.clone(), value.to_le_bytes().to_vec()))),
            7 => (Call::Delete, Some(Op::delete(key.clone()))),
            _ => {
                // Compare against a value recently written (or absence), so both outcomes happen.
                let expected =
                    (self.rng.below(3) > 0 && value > 1).then(|| value - 1 - self.rng.below(value.min(4) - 1));
                let op = Op::compare_and_set(
                    key.clone(),
                    expected.map(|v| v.to_le_bytes().to_vec()),
                    value.to_le_bytes().to_vec(),
                );
                (Call::CompareAndSet { expected, new: Some(value) }, Some(op))
            }
        };
        let command = command_op.map(|op| Command { request_id: 0, epoch: None, ops: vec![op] });
        let operation = Operation { client: client as u64, key, call, call_time: self.timestamp(), result: None };
        self.ops.push(ClientOp {
            operation,
            group,
            command,
            deadline: self.step + 600,
            retry_at: Some(self.step),
            done: false,
        });
        self.clients[client] = Some(self.ops.len() - 1);
    }

    /// Sends a new attempt of operation `index` to the node its client believes leads the group.
    fn attempt(&mut self, index: usize) -> SimResult<()> {
        let (client, group) = (self.ops[index].operation.client as usize, self.ops[index].group);
        let node = match self.hints.get(&(client, group)) {
            Some(node) => *node,
            None => self.rng.range(1, self.nodes.len() as u64),
        };
        self.ops[index].retry_at = None;
        let position = (node - 1) as usize;
        let Some(running) = self.nodes[position].running.as_mut() else {
            // Down: try another node a little later.
            self.hints.insert((client, group), self.rng.range(1, self.nodes.len() as u64));
            self.ops[index].retry_at = Some(self.step + 5);
            return Ok(());
        };
        let token = self.next_token;
        self.next_token += 1;
        self.attempts.insert(token, index);
        if self.trace {
            println!(
                "step {} client {client}: op {index} {:?} on key {:?} -> node {node} as token {token}",
                self.step, self.ops[index].operation.call, self.ops[index].operation.key
            );
        }
        let Some(peer) = running.peers.get_mut(&self.ranges[group].group_id).filter(|peer| !peer.is_removed()) else {
            // This node holds no replica of the group: try another.
            self.attempts.remove(&token);
            self.hints.insert((client, group), self.rng.range(1, self.nodes.len() as u64));
            self.ops[index].retry_at = Some(self.step + 2);
            return Ok(());
        };
        match &self.ops[index].command {
            Some(command) => peer.propose(token, command.clone()),
            None => peer.read(token),
        }
        self.drive(position)
    }

    fn on_response(&mut self, position: usize, token: Token, response: Response) {
        if self.trace {
            println!("step {} node {}: response to token {token}: {response:?}", self.step, self.nodes[position].id);
        }
        if self.membership_tokens.remove(&token) && response == Response::Written(Applied::Done) {
            self.report.membership_changes_applied += 1;
        }
        let Some(index) = self.attempts.remove(&token) else { return };
        if self.ops[index].done {
            return;
        }
        let call = self.ops[index].operation.call.clone();
        let outcome = match (&call, response) {
            (Call::Get, Response::ReadReady) => {
                let key = &self.ops[index].operation.key;
                let running = self.nodes[position].running.as_ref().expect("answered by a running node");
                let value = running.kv.get(key).expect("reading applied state");
                Some(Outcome::Got(value.map(|v| u64::from_le_bytes(v.as_slice().try_into().expect("8-byte values")))))
            }
            (Call::CompareAndSet { .. }, Response::Written(Applied::Done)) => Some(Outcome::Swapped(true)),
            (Call::CompareAndSet { .. }, Response::Written(Applied::PreconditionFailed { .. })) => {
                Some(Outcome::Swapped(false))
            }
            (_, Response::Written(Applied::Done)) => Some(Outcome::Done),
            (_, Response::Failed(PeerError::OutcomeUnknown)) => {
                self.finish(index); // may or may not have happened: the history keeps it unknown
                return;
            }
            (_, Response::Failed(PeerError::NotLeader { leader })) => {
                let (client, group) = (self.ops[index].operation.client as usize, self.ops[index].group);
                let leader_node = self.replica_nodes.get(&(self.ranges[group].group_id, leader)).copied();
                let next = leader_node.unwrap_or_else(|| self.rng.range(1, self.nodes.len() as u64));
                self.hints.insert((client, group), next);
                None
            }
            // Definitely did not take effect (dropped, busy, refused): try again.
            _ => None,
        };
        match outcome {
            Some(outcome) => {
                let at = self.timestamp();
                self.ops[index].operation.result = Some((outcome, at));
                self.finish(index);
            }
            None => self.ops[index].retry_at = Some(self.step + self.rng.range(1, 10)),
        }
    }

    fn finish(&mut self, index: usize) {
        self.ops[index].done = true;
        let client = self.ops[index].operation.client as usize;
        if self.clients[client] == Some(index) {
            self.clients[client] = None;
        }
    }

    /// Retries due attempts; times out operations past their deadline (their outcome stays unknown).
    fn clients_step(&mut self, issue_new: bool) -> SimResult<()> {
        for client in 0..self.clients.len() {
            match self.clients[client] {
                Some(index) if self.step >= self.ops[index].deadline => {
                    self.finish(index); // no answer in time: unknown
                }
                Some(index) if self.ops[index].retry_at.is_some_and(|at| self.step >= at) => self.attempt(index)?,
                None if issue_new && self.rng.chance_per_mille(100) => {
                    self.issue(client);
                    let index = self.clients[client].expect("just issued");
                    self.attempt(index)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Each node's view of a group, for failure messages.
    fn describe(&self, group: u64) -> String {
        self.nodes
            .iter()
            .map(|node| match &node.running {
                None => format!("node {} down", node.id),
                Some(running) => match running.peers.get(&group) {
                    Some(peer) => format!(
                        "node {} (replica {}{}): {} disk queue={}",
                        node.id,
                        peer.replica_id(),
                        if peer.is_removed() { ", removed" } else { "" },
                        peer.debug_state(),
                        running.disk_queue.len()
                    ),
                    None => format!("node {}: no replica", node.id),
                },
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    // ---- invariants ----

    fn check_leaders(&mut self) -> SimResult<()> {
        for node in &self.nodes {
            let Some(running) = &node.running else { continue };
            for (group, peer) in &running.peers {
                if peer.is_leader() {
                    if let Some(other) = self.leaders.insert((*group, peer.term()), node.id) {
                        if other != node.id {
                            return Err(format!(
                                "group {group}: nodes {other} and {} both led term {}",
                                node.id,
                                peer.term()
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn fault_step(&mut self) -> SimResult<()> {
        self.deliver_due()?;
        match self.rng.below(1000) {
            0..=449 => {}
            450..=599 => self.tick()?,
            600..=749 => {
                let position = self.rng.below(self.nodes.len() as u64) as usize;
                if self.nodes[position].running.is_some() {
                    self.persist_one(position)?;
                    self.drive(position)?;
                }
            }
            750..=769 => {
                let position = self.rng.below(self.nodes.len() as u64) as usize;
                if let Some(running) = &self.nodes[position].running {
                    running.kv.flush().map_err(|e| e.to_string())?; // a checkpoint
                }
            }
            810..=899 => {
                let position = self.rng.below(self.nodes.len() as u64) as usize;
                self.apply_queued(position)?;
                self.drive(position)?;
            }
            770..=776 => {
                let position = self.rng.below(self.nodes.len() as u64) as usize;
                let down = self.nodes.iter().filter(|n| n.running.is_none()).count();
                // Keep a majority up most of the time, but not always.
                if self.nodes[position].running.is_some()
                    && (down + 1 < self.nodes.len().div_ceil(2) || self.rng.chance_per_mille(100))
                {
                    self.crash(position);
                }
            }
            777..=795 => {
                let position = self.rng.below(self.nodes.len() as u64) as usize;
                if self.nodes[position].running.is_none() {
                    self.start(position)?;
                    self.drive(position)?;
                }
            }
            796..=802 => {
                // Cut or heal a one-way link.
                let from = self.rng.range(1, self.nodes.len() as u64);
                let to = self.rng.range(1, self.nodes.len() as u64);
                if !self.cuts.remove(&(from, to)) && from != to {
                    self.cuts.insert((from, to));
                }
            }
            803..=805 => {
                // Isolate a node: every link to and from it cut (a leader so cut off may be asleep, its lease
                // frozen, while the others elect a new one).
                let isolated = self.rng.range(1, self.nodes.len() as u64);
                for other in (1..=self.nodes.len() as u64).filter(|&other| other != isolated) {
                    self.cuts.insert((isolated, other));
                    self.cuts.insert((other, isolated));
                }
            }
            806..=809 => self.cuts.clear(),
            905..=934 => {
                let position = self.rng.below(self.nodes.len() as u64) as usize;
                self.compact_log(position)?;
            }
            900..=904 => {
                // A leadership transfer, wherever a leader is found (during faults it may not complete).
                let group = self.ranges[self.rng.below(self.ranges.len() as u64) as usize].group_id;
                let target = self.rng.range(1, self.nodes.len() as u64);
                let leader = self.leader_position(group);
                if let Some(position) = leader {
                    let peer =
                        self.nodes[position].running.as_mut().expect("running").peers.get_mut(&group).expect("peer");
                    let voters: Vec<u64> =
                        peer.descriptor().replicas.iter().filter(|r| !r.learner).map(|r| r.replica_id).collect();
                    let target = voters[target as usize % voters.len()];
                    peer.transfer_leader(target);
                    self.report.transfers += 1;
                    self.drive(position)?;
                }
            }
            935..=944 => self.change_membership(),
            _ => {}
        }
        self.clients_step(true)
    }

    /// The position of a node whose replica of `group` leads (in some term), if any is up.
    fn leader_position(&self, group: u64) -> Option<usize> {
        self.nodes.iter().position(|node| {
            node.running
                .as_ref()
                .and_then(|r| r.peers.get(&group))
                .is_some_and(|peer| peer.is_leader() && !peer.is_removed())
        })
    }

    /// A membership change proposed on a leader: a learner onto a node that never held the group, a learner
    /// promoted, or a replica removed (keeping three voters). During faults it may not complete.
    fn change_membership(&mut self) {
        let group = self.ranges[self.rng.below(self.ranges.len() as u64) as usize].group_id;
        let Some(position) = self.leader_position(group) else { return };
        let descriptor = self.nodes[position].running.as_ref().expect("running").peers[&group].descriptor().clone();
        let voters: Vec<u64> = descriptor.replicas.iter().filter(|r| !r.learner).map(|r| r.replica_id).collect();
        let learner = descriptor.replicas.iter().find(|r| r.learner).map(|r| r.replica_id);
        // Nodes that never held the group (removed replicas are not re-added: their nodes keep them closed).
        let fresh: Vec<u64> = self
            .nodes
            .iter()
            .map(|n| n.id)
            .filter(|&node| !self.replica_nodes.iter().any(|((g, _), n)| *g == group && *n == node))
            .collect();
        let change = match (learner, fresh.is_empty()) {
            (Some(replica_id), _) => MembershipChange::Promote { replica_id },
            (None, false) if self.rng.chance_per_mille(600) || voters.len() <= 3 => {
                let node_id = fresh[self.rng.below(fresh.len() as u64) as usize];
                let replica_id = self.next_replica_id;
                self.next_replica_id += 1;
                self.replica_nodes.insert((group, replica_id), node_id);
                MembershipChange::AddLearner { node_id, replica_id }
            }
            (None, _) if voters.len() > 3 => {
                MembershipChange::Remove { replica_id: voters[self.rng.below(voters.len() as u64) as usize] }
            }
            _ => return,
        };
        if self.trace {
            println!("step {} group {group}: node {} proposes {change:?}", self.step, self.nodes[position].id);
        }
        let token = self.next_token;
        self.next_token += 1;
        self.membership_tokens.insert(token);
        self.nodes[position]
            .running
            .as_mut()
            .expect("running")
            .peers
            .get_mut(&group)
            .expect("peer")
            .propose_membership(token, change);
        self.report.membership_changes += 1;
    }

    fn calm_step(&mut self, issue_new: bool) -> SimResult<()> {
        self.deliver_due()?;
        if self.rng.below(100) < 20 {
            self.tick()?;
        }
        for position in 0..self.nodes.len() {
            while self.nodes[position].running.as_ref().is_some_and(|r| !r.disk_queue.is_empty()) {
                self.persist_one(position)?;
            }
            self.apply_queued(position)?;
            self.drive(position)?;
        }
        self.clients_step(issue_new)
    }

    /// After the faults: every group leads, serves a write, and every replica holds the same data.
    fn converge(&mut self, steps: u64) -> SimResult<()> {
        self.faults = false;
        self.cuts.clear();
        for position in 0..self.nodes.len() {
            if self.nodes[position].running.is_none() {
                self.start(position)?;
            }
            while self.nodes[position].running.as_ref().is_some_and(|r| !r.disk_queue.is_empty()) {
                self.persist_one(position)?;
            }
            self.drive(position)?;
        }
        for _ in 0..steps {
            self.step += 1;
            self.calm_step(self.step.is_multiple_of(2))?;
            self.check_leaders()?;
        }
        // Let every client finish, then one more write per group must succeed.
        for _ in 0..steps {
            if self.clients.iter().all(Option::is_none) {
                break;
            }
            self.step += 1;
            self.calm_step(false)?;
        }
        for (group, keys) in self.keys.clone().iter().enumerate() {
            let client = 0;
            let value = self.next_value;
            self.next_value += 1;
            let command = Command {
                request_id: 0,
                epoch: None,
                ops: vec![Op::put(keys[0].clone(), value.to_le_bytes().to_vec())],
            };
            let operation = Operation {
                client: client as u64,
                key: keys[0].clone(),
                call: Call::Put(value),
                call_time: self.timestamp(),
                result: None,
            };
            self.ops.push(ClientOp {
                operation,
                group,
                command: Some(command),
                deadline: self.step + steps,
                retry_at: Some(self.step),
                done: false,
            });
            let index = self.ops.len() - 1;
            self.clients[client] = Some(index);
            while !self.ops[index].done {
                self.step += 1;
                self.calm_step(false)?;
            }
            if self.ops[index].operation.result.is_none() {
                return Err(format!(
                    "group {} did not serve a write after the faults stopped; replicas: {}",
                    self.ranges[group].group_id,
                    self.describe(self.ranges[group].group_id)
                ));
            }
        }
        // Quiet: every write durable, every message delivered, a few rounds of heartbeats — then every replica of
        // a group must hold the same applied index and data. (An election may be under way when a round ends:
        // convergence is checked again after more calm, a bounded number of times.)
        let mut divergence = None;
        for _ in 0..10 {
            for _ in 0..400 {
                self.step += 1;
                self.calm_step(false)?;
            }
            divergence = self.divergence()?;
            if divergence.is_none() {
                return Ok(());
            }
        }
        Err(divergence.expect("diverged"))
    }

    /// The first group whose replicas differ in applied index or data, described.
    fn divergence(&self) -> SimResult<Option<String>> {
        for range in &self.ranges {
            let group = range.group_id;
            // The members: as the replica with the newest configuration knows them.
            let newest = self
                .nodes
                .iter()
                .filter_map(|node| node.running.as_ref().and_then(|r| r.peers.get(&group)))
                .map(|peer| peer.descriptor().clone())
                .max_by_key(|descriptor| descriptor.epoch().conf_version)
                .expect("some replica of every group");
            let mut views = Vec::new();
            for member in &newest.replicas {
                let running = self.nodes[(member.node_id - 1) as usize].running.as_ref().expect("all running");
                let held = running.peers.get(&group).is_some_and(|peer| peer.replica_id() == member.replica_id);
                let pairs = running.kv.scan(&range.start, &range.end, usize::MAX).map_err(|e| e.to_string())?;
                views.push((
                    member.node_id,
                    held,
                    running.kv.applied(group).0,
                    hash(&format!("{pairs:?}").into_bytes()),
                ));
            }
            if views.iter().any(|view| !view.1) || views.windows(2).any(|w| (w[0].2, w[0].3) != (w[1].2, w[1].3)) {
                return Ok(Some(format!(
                    "group {group}: replicas did not converge (node, replica held, applied, data hash): {views:?}; {}",
                    self.describe(group)
                )));
            }
        }
        Ok(None)
    }
}

fn describe_message(message: &ReplicaMessage) -> String {
    match message {
        ReplicaMessage::Raft(m) => format!(
            "{:?} {}->{} term={} index={} log_term={} commit={} reject={}",
            m.msg_type(),
            m.from,
            m.to,
            m.term,
            m.index,
            m.log_term,
            m.commit,
            m.reject
        ),
        ReplicaMessage::Chunk(c) => format!(
            "SnapshotChunk {}->{} term={} stream={} seq={} bytes={}{}",
            c.from,
            c.to,
            c.term,
            c.stream_id,
            c.sequence,
            c.data.len(),
            c.message
                .as_ref()
                .map_or(String::new(), |m| format!(" last (index {})", m.snapshot.as_ref().map_or(0, |s| s.index())))
        ),
        ReplicaMessage::Ack(a) => format!(
            "SnapshotAck {}->{} term={} stream={} received={} rejected={}",
            a.from, a.to, a.term, a.stream_id, a.received, a.rejected
        ),
        ReplicaMessage::Hibernate(h) => format!(
            "Hibernate {}->{} term={} index={} log_term={} commit={}",
            h.from, h.to, h.term, h.index, h.log_term, h.commit
        ),
        ReplicaMessage::Removed(n) => {
            format!(
                "RemovalNotice {}->{} conf_version={}",
                n.from,
                n.to,
                n.descriptor.as_ref().map_or(0, |d| d.epoch().conf_version)
            )
        }
    }
}

/// Runs one seed.
pub fn run(options: &StoreSimOptions) -> Result<StoreSimReport, StoreSimFailure> {
    let fail = |sim: &Sim, reason: String| StoreSimFailure { seed: options.seed, step: sim.step, reason };
    let mut sim = Sim::new(options).map_err(|reason| StoreSimFailure { seed: options.seed, step: 0, reason })?;
    while sim.step < options.fault_steps {
        sim.step += 1;
        if let Err(reason) = sim.fault_step().and_then(|()| sim.check_leaders()) {
            return Err(fail(&sim, reason));
        }
    }
    if let Err(reason) = sim.converge(options.calm_steps) {
        return Err(fail(&sim, reason));
    }
    let history: Vec<Operation> = sim.ops.iter().map(|op| op.operation.clone()).collect();
    match check(&history, 5_000_000) {
        Verdict::Linearizable => {}
        Verdict::Violation { key, mut operations } => {
            // Report the shortest failing prefix (by call time): its last operation is where it went wrong.
            operations.sort_by_key(|op| op.call_time);
            let (mut low, mut high) = (1, operations.len());
            while low < high {
                let middle = (low + high) / 2;
                if check(&operations[..middle], 5_000_000) == Verdict::Linearizable {
                    low = middle + 1;
                } else {
                    high = middle;
                }
            }
            let shown = &operations[low.saturating_sub(12)..low];
            let lines: Vec<String> = shown
                .iter()
                .map(|op| {
                    let result = match &op.result {
                        Some((outcome, at)) => format!("{outcome:?} at {at}"),
                        None => "unknown".to_string(),
                    };
                    format!("  client {} {:?} called at {} -> {result}", op.client, op.call, op.call_time)
                })
                .collect();
            return Err(fail(
                &sim,
                format!("not linearizable on key {key:?}; the first {low} operations already are not; the last of them:\n{}", lines.join("\n")),
            ));
        }
        Verdict::Inconclusive { key, operations } => {
            return Err(fail(&sim, format!("the checker ran out of steps on key {key:?} ({operations} operations)")));
        }
    }
    sim.report.operations = history.len();
    sim.report.unknown = history.iter().filter(|op| op.result.is_none()).count();
    Ok(sim.report)
}
