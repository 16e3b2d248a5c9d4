//! The whole-store simulator: several nodes, each running the **production** store by hand (`SteppedStore`: the
//! poll rounds of `StoreHandler`, the persisted forwarding, replicas created and destroyed, ticks, node liveness
//! and log collection — the node's code, not a copy) over the real WAL (`SyncWal` on a fault-injecting `SimDisk`,
//! behind a queue that models a slow disk) and the real redb state machine (on a backend that loses unsynced
//! writes), with a simulated network and clock. One thread; one seed fixes everything; a failing seed replays
//! exactly. What it does not run: the batch system's threads and bounded mailboxes, the WAL's writer thread and
//! the flusher's (the simulator completes writes and takes checkpoints itself), and real time.
//!
//! **Fault phase**: message loss, duplication and reordering, one-way partitions and isolated nodes, slow disks (a
//! Ready's write waits before it is durable), apply lagging commit (a round ends without applying), node crashes
//! (sometimes in the middle of a write, tearing it) and restarts, **paused nodes** (their rounds and ticker stop
//! while the others run on and messages pile up for them; half the time only the pollers stop and callers still
//! read locally; sometimes cut off too, with clients sent to them), clock
//! rates differing by a few percent, checkpoints at random, leadership transfers, log collection (compactions
//! that leave lagging replicas to catch up by snapshot streams of small chunks, and WAL purges that rewrite
//! laggards), membership changes. **Calm phase**: the network heals, every node runs, clients finish; then every
//! group must elect a leader, serve a write, and all its replicas must converge on the same data.
//!
//! Clients issue puts and deletes of unique values, gets and compare-and-sets on a few keys per group, as
//! `PeerMsg` requests to a node's mailboxes, answered on their reply channels as the `Db`'s are; most gets first
//! try the node's local read path (`store/local_reader.rs`), served at once while the replica's grant holds on
//! the node's clock. A client retries
//! only after a definite "nothing happened" (not leader, dropped, busy); an operation without an answer by its
//! deadline, or whose node went down, is recorded as **unknown**, never as failed. The history is checked by the
//! linearizability checker; Raft invariants (one leader per term and group; every replica commits the same entry
//! at an index) are checked after every step, and a node that stops on a failure fails the run.
//!
//! The clients live in `clients.rs`; this file has the nodes, the network, the faults and the checks.

use std::collections::HashMap;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use flotilla_engine::disk::SimDisk;
use flotilla_engine::log_engine::{LogEngine, SyncWal};
use flotilla_engine::redb_sim::SimRedbBackend;
use flotilla_engine::state_machine::{StateMachine, StateMachineOptions};
use flotilla_engine::wal::{Wal, WalOptions};
use flotilla_raft::{Config, ReadMode};
use flotilla_raftstore::command::{Command, Op, Outcome as Applied};
use flotilla_raftstore::message::{Envelope, ReplicaMessage};
use flotilla_raftstore::peer::{MembershipChange, PeerError, PeerOptions, SnapshotOptions};
use flotilla_raftstore::range::{initial_layout, RangeDescriptor, Replica};
use flotilla_raftstore::split_trigger::{RangeAsk, SplitOptions};
use flotilla_raftstore::store::liveness::{Liveness, NodeMessage};
use flotilla_raftstore::store::stepped::SteppedStore;
use flotilla_raftstore::store::ticks::ManualClock;
use flotilla_raftstore::store::Transport;
use flotilla_raftstore::store::{Mailboxes, PeerMsg, ReadResult, StoreOptions};

use crate::linearizability::{check, Call, Operation, Verdict};
use crate::network::{FaultRates, Routed, SimNetwork};
use crate::sim_engines::{SimCheckpoints, SimLog, SimOutbox};
use crate::sim_rng::SimRng;

mod clients;
mod ranges;

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
    /// Torn writes whose bytes reached the disk unsynced (the crash then keeps a random prefix of them, or none).
    pub torn_writes_written: u64,
    pub pauses: u64,
    pub transfers: u64,
    pub messages: u64,
    /// Log compactions written (asked by log collection, or dropping a destroyed replica's log).
    pub compactions: u64,
    /// Membership changes proposed (during faults some do not complete), and those that applied.
    pub membership_changes: u64,
    pub membership_changes_applied: u64,
    /// Removed replicas whose nodes destroyed them (data and log dropped).
    pub replicas_destroyed: u64,
    /// Ticks replicas slept through (hibernating).
    pub ticks_slept: u64,
    /// Snapshots installed (log records of installs written).
    pub snapshot_installs: u64,
    /// Reads served on the client's side from a leader's published grant (`store/local_reader.rs`), and of
    /// them those served while the node's pollers stood still.
    pub local_reads: u64,
    pub local_reads_stalled: u64,
    /// Calm phases with a stall duel (see `Sim::stall_duel`).
    pub stall_duels: u64,
    /// Splits proposed (during faults some do not complete, or are refused), and those that applied.
    pub splits: u64,
    pub splits_applied: u64,
    /// Client attempts refused because the client's table was stale (the key had moved to another group).
    pub reroutes: u64,
    /// Splits the triggers asked for (proposed, among `splits`, during the faults).
    pub splits_asked: u64,
    /// Merges asked (a left range locked for its right neighbour), of them the right ranges frozen, and the
    /// merges that committed (groups ended by one, counted from the nodes' records at the end).
    pub merges: u64,
    /// Merges the trigger asked for (asked, among `merges`, during the faults).
    pub merges_asked_by_trigger: u64,
    pub merges_frozen: u64,
    pub merges_committed: u64,
    /// Publications in the meta range that leaders on nodes without a replica of it asked of the host.
    pub publications_by_host: u64,
}

impl StoreSimReport {
    /// Adds another run's counts (for totals over many seeds).
    pub fn add(&mut self, other: &StoreSimReport) {
        self.operations += other.operations;
        self.unknown += other.unknown;
        self.crashes += other.crashes;
        self.torn_writes += other.torn_writes;
        self.torn_writes_written += other.torn_writes_written;
        self.pauses += other.pauses;
        self.transfers += other.transfers;
        self.messages += other.messages;
        self.compactions += other.compactions;
        self.membership_changes += other.membership_changes;
        self.membership_changes_applied += other.membership_changes_applied;
        self.replicas_destroyed += other.replicas_destroyed;
        self.ticks_slept += other.ticks_slept;
        self.snapshot_installs += other.snapshot_installs;
        self.local_reads += other.local_reads;
        self.local_reads_stalled += other.local_reads_stalled;
        self.stall_duels += other.stall_duels;
        self.splits += other.splits;
        self.splits_applied += other.splits_applied;
        self.reroutes += other.reroutes;
        self.splits_asked += other.splits_asked;
        self.merges += other.merges;
        self.merges_frozen += other.merges_frozen;
        self.merges_asked_by_trigger += other.merges_asked_by_trigger;
        self.merges_committed += other.merges_committed;
        self.publications_by_host += other.publications_by_host;
    }
}

#[derive(Debug)]
pub struct StoreSimFailure {
    pub seed: u64,
    pub step: u64,
    pub reason: String,
}

type SimResult<T> = Result<T, String>;

/// A node's running process (gone while it is down).
struct Running {
    log: Arc<SimLog>,
    kv: Arc<StateMachine>,
    outbox: Arc<SimOutbox>,
    clock: Arc<ManualClock>,
    /// Which other nodes it has heard from lately (a fresh start has heard from nobody: every node gets time).
    liveness: Liveness,
    store: SteppedStore,
    /// The splits its leaders ask for (`split_trigger.rs`).
    asks: crossbeam_channel::Receiver<RangeAsk>,
}

struct Node {
    id: u64,
    disk: SimDisk,
    redb: SimRedbBackend,
    running: Option<Running>,
    /// Clock rate in per mille of nominal, the tick accumulator, and the ticks counted since the process started.
    rate_per_mille: u64,
    clock: u64,
    ticks: u64,
    /// Paused until this step: its rounds, persisted forwarding and ticker stand still, its clock runs on, and
    /// messages for it pile up.
    paused_until: u64,
    /// The pause stops only its poll rounds (a starved poll loop): its callers still serve local reads.
    pollers_only: bool,
    /// Deaf until this step: every message to it is lost (its own still go out).
    deaf_until: u64,
}

/// Where a client attempt's answer comes.
enum Reply {
    Write(oneshot::Receiver<Result<Applied, PeerError>>),
    Read(oneshot::Receiver<Result<ReadResult, PeerError>>),
}

/// An attempt under way: which operation, at which node.
struct Attempt {
    op: usize,
    node: u64,
    group_id: u64,
    reply: Reply,
}

/// One client operation of the history, with what the simulation needs to drive it.
struct ClientOp {
    operation: Operation,
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
    /// The ranges at creation (what a node's first start opens), and the ranges as the simulation last learned
    /// them from the nodes (`ranges.rs`): splits move keys to new groups.
    initial: Vec<RangeDescriptor>,
    ranges: Vec<RangeDescriptor>,
    /// The clients' keys: a few in each initial range (splits cut between them).
    keys: Vec<Vec<u8>>,
    /// Per client: its routing table (a copy of `ranges` as it was when the client last learned, stale after
    /// splits until a replica refuses it).
    tables: Vec<Vec<RangeDescriptor>>,
    /// The id of the next group a split makes.
    next_group_id: u64,
    /// Publications the host was asked for (by leaders on nodes without a replica of the meta range), with the
    /// asking node's position: the leader there is told once a member's table shows them.
    host_publications: Vec<(usize, RangeDescriptor)>,
    /// Answers to split proposals (counted, not checked).
    split_replies: Vec<oneshot::Receiver<Result<Applied, PeerError>>>,
    /// The split triggers' bounds, drawn per seed (`None`: off; splits come by request only).
    split_triggers: Option<SplitOptions>,
    /// Answers to merge locks (each with the right group: frozen once locked) and to freezes.
    merge_locks: Vec<(oneshot::Receiver<Result<Applied, PeerError>>, u64)>,
    merge_freezes: Vec<oneshot::Receiver<Result<Applied, PeerError>>>,
    /// Packets in flight, with the step they are due, and the one-way cuts between nodes.
    network: SimNetwork<Packet>,
    /// Where each replica lives: (group, replica id) → node (what a client's range cache learns).
    replica_nodes: HashMap<(u64, u64), u64>,
    /// Replica ids for added replicas (above every node id).
    next_replica_id: u64,
    /// Answers to membership proposals (counted, not checked).
    membership_replies: Vec<oneshot::Receiver<Result<Applied, PeerError>>>,
    ops: Vec<ClientOp>,
    attempts: Vec<Attempt>,
    next_value: u64,
    clients: Vec<Option<usize>>,
    /// Per (client, group id): the node believed to lead.
    hints: HashMap<(usize, u64), u64>,
    /// A group (by id) most new operations go to until a step: where a fault is under way; and meanwhile, per
    /// client, the node every attempt on that group goes to.
    focus: Option<(u64, u64)>,
    steered: Vec<Option<u64>>,
    /// A pause to come at a step, of the leader of a group (by id) that gets traffic until then, and how many
    /// times it was put off (its leader held no grant yet).
    planned_pause: Option<(u64, u64, u32)>,
    /// Invariants: the leader of each (group, term); the entry committed at each (group, index).
    leaders: HashMap<(u64, u64), u64>,
    committed: HashMap<(u64, u64), (u64, u64)>,
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
/// Logs keep a few entries for laggards (or none): replicas further behind catch up by snapshot.
fn peer_options(rng: &mut SimRng) -> PeerOptions {
    let snapshot = SnapshotOptions { chunk_bytes_max: 256, chunks_inflight_max: 2, resend_ticks: 3, timeout_ticks: 20 };
    let hibernate_idle_ticks = if rng.chance_per_mille(100) { 0 } else { rng.range(3, 15) as u32 };
    PeerOptions { snapshot, hibernate_idle_ticks, log_lag_entries_max: rng.below(16), ..PeerOptions::default() }
}

/// A node not heard from for this many of its ticks is judged down by another (`store::liveness`).
const NODE_DOWN_TICKS: u64 = 5;

/// The clients' keys in each initial range (splits cut between them).
const KEYS_PER_RANGE: u8 = 4;

/// Rounds a node may take to go quiet after one event before the run fails (a livelock in the host loop).
const DRIVE_ROUNDS_MAX: usize = 10_000;

/// What travels between simulated nodes.
#[derive(Clone)]
enum Packet {
    /// A message between replicas of a group, between their nodes (boxed: far larger than a node heartbeat).
    Replica(Box<Envelope>),
    /// Node liveness: one heartbeat per node pair and tick, whatever the number of groups.
    Node(NodeMessage),
}

impl Routed for Packet {
    fn ends(&self) -> (u64, u64) {
        match self {
            Packet::Replica(envelope) => (envelope.from_node, envelope.to_node),
            Packet::Node(message) => message.ends(),
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
        let replicas: Vec<Replica> = (1..=node_count.min(3)).map(|id| Replica::voter(id, id)).collect();
        // The layout of a new database or cluster: the users' ranges and the meta range.
        let ranges = initial_layout(group_count as u64, &replicas);
        let replica_nodes = ranges
            .iter()
            .flat_map(|r| r.replicas.iter().map(|replica| ((r.group_id, replica.replica_id), replica.node_id)))
            .collect();
        let keys = ranges
            .iter()
            .filter(|range| !range.is_meta())
            .flat_map(|range| {
                let prefix = if range.start.is_empty() { vec![0] } else { range.start.clone() };
                (0..KEYS_PER_RANGE).map(move |k| [prefix.clone(), vec![b'k', k]].concat())
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
                ticks: 0,
                paused_until: 0,
                pollers_only: false,
                deaf_until: 0,
            })
            .collect();
        let clients = vec![None; rng.range(2, 5) as usize];
        let split_triggers = ranges::split_options(&mut rng, ranges.len() as u64);
        let tables = vec![ranges.clone(); clients.len()];
        let mut sim = Sim {
            rng,
            step: 0,
            nodes,
            initial: ranges.clone(),
            ranges,
            keys,
            tables,
            next_group_id: 1000,
            host_publications: Vec::new(),
            split_replies: Vec::new(),
            merge_locks: Vec::new(),
            merge_freezes: Vec::new(),
            split_triggers,
            network: SimNetwork::new(FaultRates::default()),
            replica_nodes,
            next_replica_id: 100,
            membership_replies: Vec::new(),
            ops: Vec::new(),
            attempts: Vec::new(),
            next_value: 1,
            clients,
            hints: HashMap::new(),
            focus: None,
            steered: Vec::new(),
            planned_pause: None,
            leaders: HashMap::new(),
            committed: HashMap::new(),
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

    /// Starts a node's process from what its disks hold (a first start or a restart after a crash): its engines,
    /// then the production store over them.
    fn start(&mut self, position: usize) -> SimResult<()> {
        let (ask, asks) = crossbeam_channel::bounded(64);
        let options = StoreOptions {
            raft: Config { random_seed: self.rng.next_u64(), ..self.raft.clone() },
            node_id: self.nodes[position].id,
            peer: peer_options(&mut self.rng),
            log_bytes_max: 2 * wal_options().segment_bytes_max,
            // Triggers off in some runs; asks always taken (a leader on a node without a replica of the meta range
            // publishes through the host).
            split: self.split_triggers.clone().unwrap_or(SplitOptions {
                size_bytes_max: 0,
                load_window_ticks: 0,
                merge_size_bytes_max: 0,
                ..SplitOptions::default()
            }),
            range_asks: Some(ask),
            meta_range: true,
            ..StoreOptions::default()
        };
        let node = &mut self.nodes[position];
        let id = node.id;
        let fail = |e: &dyn std::fmt::Debug| format!("node {id}: {e:?}");
        let (wal, _report) =
            Wal::open(Path::new("/wal"), Arc::new(node.disk.clone()), wal_options()).map_err(|e| fail(&e))?;
        let log = Arc::new(SimLog::new(SyncWal::new(wal)));
        let kv = Arc::new(StateMachine::open_with_backend(node.redb.clone(), machine_options()).map_err(|e| fail(&e))?);
        // What it holds: the descriptors it stored (the initial layout at a first start). The store opens those
        // that list it, finishes destroys a crash interrupted, and creates replicas for messages as they come.
        let stored = kv.ranges().map_err(|e| fail(&e))?;
        let ranges: Vec<RangeDescriptor> = if stored.is_empty() {
            self.initial.clone()
        } else {
            stored
                .iter()
                .map(|(_, bytes)| RangeDescriptor::decode_stored(bytes).expect("stored descriptors decode"))
                .collect()
        };
        let outbox = Arc::new(SimOutbox::default());
        let clock = Arc::new(ManualClock::default());
        let store = SteppedStore::open(
            &options,
            &ranges,
            Arc::clone(&log) as Arc<dyn LogEngine>,
            Arc::clone(&kv) as Arc<dyn flotilla_engine::contract::KvEngine>,
            Arc::new(SimCheckpoints),
            Arc::clone(&outbox) as Arc<dyn flotilla_raftstore::store::Transport>,
            Arc::clone(&clock) as Arc<dyn flotilla_raftstore::store::ticks::TickClock>,
        )
        .map_err(|e| fail(&e))?;
        let liveness = Liveness::new(node.id, 1..=self.report.nodes as u64, NODE_DOWN_TICKS, 0);
        node.running = Some(Running { log, kv, outbox, clock, liveness, store, asks });
        node.ticks = 0;
        node.paused_until = 0;
        if self.trace {
            println!("step {}: node {} starts", self.step, position + 1);
        }
        self.drive(position)
    }

    fn crash(&mut self, position: usize) {
        let torn = self.rng.chance_per_mille(500);
        let keep_seed = self.rng.next_u64();
        let node = &mut self.nodes[position];
        let Some(running) = node.running.take() else { return };
        // The power goes in the middle of the next write: it fails, and a prefix of it may reach the disk.
        if torn && running.log.tear(&node.disk) {
            self.report.torn_writes += 1;
            if node.disk.unsynced_bytes() > 0 {
                self.report.torn_writes_written += 1;
            }
        }
        self.report.compactions += running.log.compactions.load(Ordering::Relaxed);
        self.report.snapshot_installs += running.log.snapshots.load(Ordering::Relaxed);
        node.disk.power_off();
        node.redb.power_off();
        drop(running); // its waiting clients' reply channels close: their outcome is unknown
        let mut keep = SimRng::new(keep_seed);
        node.disk.crash(|_, unsynced| keep.below(unsynced as u64 + 1) as usize);
        node.redb.crash();
        node.redb.power_on();
        node.paused_until = 0;
        self.report.crashes += 1;
        if self.trace {
            println!(
                "step {}: node {} crashes{}",
                self.step,
                position + 1,
                if torn { " (tearing a write)" } else { "" }
            );
        }
    }

    /// Whether the node's process runs (up, and not paused).
    fn is_up(&self, position: usize) -> bool {
        self.nodes[position].running.is_some() && self.nodes[position].paused_until <= self.step
    }

    fn running(&mut self, position: usize) -> &mut Running {
        self.nodes[position].running.as_mut().expect("running")
    }

    /// Runs the node's store until it is quiet: durable writes forwarded, replica tasks done, and poll rounds over
    /// every replica with messages waiting — in a random order, sometimes with a slow disk (writes wait) or with
    /// apply lagging (rounds end without applying).
    fn drive(&mut self, position: usize) -> SimResult<()> {
        if !self.is_up(position) {
            return Ok(());
        }
        let slow_disk = self.faults && self.rng.chance_per_mille(300);
        let lag_apply = self.faults && self.rng.chance_per_mille(200);
        let mut rounds = 0;
        loop {
            let running = self.running(position);
            // (The replicas thread's writes — a destroy's — wait for their own completion: they go to the disk
            // behind the queued ones, as the log takes requests in order.)
            running.log.hold(false);
            running.store.forward_persisted();
            let destroyed = running.store.run_tasks();
            let mut waiting = running.store.waiting();
            self.report.replicas_destroyed += destroyed as u64;
            if waiting.is_empty() {
                break;
            }
            rounds += 1;
            if rounds > DRIVE_ROUNDS_MAX {
                return Err(format!("node {} does not go quiet", self.nodes[position].id));
            }
            // A poller's batch: the waiting replicas in a random order.
            for i in (1..waiting.len()).rev() {
                waiting.swap(i, self.rng.below(i as u64 + 1) as usize);
            }
            self.running(position).log.hold(slow_disk);
            self.round(position, &waiting, !lag_apply)?;
        }
        Ok(())
    }

    /// One poll round over `groups` on the node (ending with apply if `end`), then its messages into the network
    /// and the invariants checked.
    fn round(&mut self, position: usize, groups: &[u64], end: bool) -> SimResult<()> {
        let mut seen = Vec::new();
        self.running(position).store.round(groups, end, |fsm| {
            let group = fsm.peer().group_id();
            seen.extend(fsm.pending_apply().iter().map(|e| (group, e.index, e.term, hash(&e.data))));
        });
        let node_id = self.nodes[position].id;
        for (group, index, term, data) in seen {
            if let Some(previous) = self.committed.insert((group, index), (term, data)) {
                if previous != (term, data) {
                    return Err(format!("group {group}: node {node_id} committed a different entry at index {index}"));
                }
            }
        }
        self.flush_outbox(position);
        match self.running(position).store.failure() {
            Some(reason) => Err(format!("node {node_id} stopped: {reason}")),
            None => Ok(()),
        }
    }

    /// Applies what the node's replicas committed but have not applied (a round's end for each of them).
    fn apply_waiting(&mut self, position: usize) -> SimResult<()> {
        if !self.is_up(position) {
            return Ok(());
        }
        let applying = self.running(position).store.applying();
        self.round(position, &applying, true)?;
        self.drive(position)
    }

    /// The node's disk completes its oldest waiting write.
    fn persist_one(&mut self, position: usize) -> SimResult<()> {
        if !self.is_up(position) {
            return Ok(());
        }
        let node_id = self.nodes[position].id;
        self.running(position).log.persist_one().map_err(|e| format!("node {node_id}: {e}"))?;
        self.drive(position)
    }

    /// Everything the node's replicas sent goes into the network.
    fn flush_outbox(&mut self, position: usize) {
        let (sent, node_messages) = self.running(position).outbox.take();
        for message in node_messages {
            self.transmit(Packet::Node(message));
        }
        for envelope in sent {
            if self.trace {
                println!(
                    "step {} group {}: sent {}",
                    self.step,
                    envelope.group_id,
                    describe_message(&envelope.message)
                );
            }
            self.transmit(Packet::Replica(Box::new(envelope)));
        }
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
            self.network.send_at(packet.clone(), due);
        }
        let due = self.step + delay(&mut self.rng, self.faults);
        self.network.send_at(packet, due);
    }

    /// Delivers every message due by now, in random order (those a cut loses are gone).
    fn deliver_due(&mut self) -> SimResult<()> {
        for packet in self.network.take_due(self.step, &mut self.rng) {
            self.deliver(packet)?;
        }
        Ok(())
    }

    /// A packet reaches its node: a replica message goes to the node's inbox (a paused node's piles up there).
    fn deliver(&mut self, packet: Packet) -> SimResult<()> {
        let (from, to) = packet.ends();
        if self.nodes[(to - 1) as usize].deaf_until > self.step {
            return Ok(());
        }
        let position = (to - 1) as usize;
        // (A paused node reads what piled up in its sockets first thing when it resumes: heard now, as far as its
        // liveness can tell.)
        if self.nodes[position].running.is_some() {
            let ticks = self.nodes[position].ticks;
            self.running(position).liveness.heard(from, ticks);
        }
        let Packet::Replica(envelope) = packet else { return Ok(()) };
        if self.trace {
            let state = if self.nodes[position].running.is_none() {
                " (to a down node)"
            } else if !self.is_up(position) {
                " (to a paused node)"
            } else {
                ""
            };
            println!("step {} group {}: {}{state}", self.step, envelope.group_id, describe_message(&envelope.message));
        }
        let Some(running) = self.nodes[position].running.as_mut() else { return Ok(()) };
        self.report.messages += 1;
        running.store.inbox().deliver(*envelope);
        self.drive(position)
    }

    /// Time passes on every node, at its own rate: its clock runs on even while paused; a running node's ticker
    /// then takes its turn, and node liveness.
    fn tick(&mut self) -> SimResult<()> {
        for position in 0..self.nodes.len() {
            let node = &mut self.nodes[position];
            node.clock += node.rate_per_mille;
            let mut ticked = false;
            while node.clock >= 1000 {
                node.clock -= 1000;
                node.ticks += 1;
                ticked = true;
            }
            let ticks = node.ticks;
            let Some(running) = node.running.as_mut() else { continue };
            running.clock.set(ticks);
            if !ticked || !self.is_up(position) {
                continue;
            }
            let running = self.running(position);
            let mut sleeping = 0;
            running.store.each_fsm(|_, fsm| sleeping += fsm.peer().is_hibernating() as u64);
            running.store.tick();
            self.report.ticks_slept += sleeping;
            self.node_liveness(position);
            self.drive(position)?;
        }
        Ok(())
    }

    /// On a node's tick, its liveness turn (`store::liveness`): a heartbeat to every other node (one per node
    /// pair, for all groups) through its transport, and each node it has not heard from lately judged down and
    /// passed to its replicas (hibernating followers under a leader there wake).
    fn node_liveness(&mut self, position: usize) {
        let ticks = self.nodes[position].ticks;
        let running = self.running(position);
        let (heartbeats, down) = running.liveness.tick(ticks);
        for heartbeat in heartbeats {
            running.outbox.send_node(heartbeat);
        }
        for other in down {
            running.store.node_down(other);
        }
        self.flush_outbox(position);
    }

    /// Pauses a node for a while, now or after some traffic to one group (its process stands still: no rounds, no ticker, no forwarding; its clock runs
    /// on and messages for it pile up; or only its pollers stand still, and its callers go on reading locally).
    /// A leader's node, mostly — sometimes cut off as well; clients are sent to it when it is cut off or only its
    /// pollers stop: a lease that outlived the pause would answer them from stale data.
    fn pause(&mut self) {
        let group = self.any_group();
        if self.planned_pause.is_none() && self.rng.chance_per_mille(500) {
            // Traffic first, the pause a little later: the group is awake and its leader holds its lease (it may
            // serve reads locally) when the pause comes. An idle group's leader hibernates and holds none.
            self.focus = Some((group, self.step + 100));
            self.planned_pause = Some((self.step + self.rng.range(20, 60), group, 0));
            return;
        }
        let pollers_only = self.rng.chance_per_mille(500);
        self.pause_group(group, pollers_only);
    }

    /// Pauses the leader of group `group` (mostly; else any node): the whole process, or only its pollers.
    fn pause_group(&mut self, group: u64, pollers_only: bool) {
        let leader = self.leader_position(group);
        let position = match leader {
            Some(position) if self.rng.chance_per_mille(800) => position,
            _ => self.rng.below(self.nodes.len() as u64) as usize,
        };
        if !self.is_up(position) {
            return;
        }
        let id = self.nodes[position].id;
        // Mostly long enough for the others to declare it down and elect new leaders (about 100–200 steps).
        self.nodes[position].paused_until = self.step + self.rng.range(20, 400);
        self.nodes[position].pollers_only = pollers_only;
        self.report.pauses += 1;
        let cut_off = self.rng.chance_per_mille(500);
        if cut_off {
            let others: Vec<u64> = (1..=self.nodes.len() as u64).filter(|&other| other != id).collect();
            self.network.partition(&[id], &others);
        }
        if cut_off || self.nodes[position].pollers_only {
            // Until it resumes, some clients keep sending to it (their reads wait there, then meet its old lease;
            // or, while only its pollers stand still, are served locally on its grant); the others look for the
            // new leader and write there meanwhile. Most new operations go to the group.
            self.focus = Some((group, self.nodes[position].paused_until + 50));
            self.steered = (0..self.clients.len()).map(|_| self.rng.chance_per_mille(500).then_some(id)).collect();
            for client in 0..self.clients.len() {
                if self.hints.get(&(client, group)) == Some(&id) {
                    self.hints.remove(&(client, group));
                }
            }
        }
        if self.trace {
            let what = if self.nodes[position].pollers_only { "its pollers" } else { "the whole process" };
            println!("step {}: node {id} paused until step {} ({what})", self.step, self.nodes[position].paused_until);
        }
    }

    /// Each node's view of a group, for failure messages.
    fn describe(&self, group: u64) -> String {
        self.nodes
            .iter()
            .map(|node| match &node.running {
                None => format!("node {} down", node.id),
                Some(running) => running
                    .store
                    .with_fsm(group, |fsm| {
                        let peer = fsm.peer();
                        format!(
                            "node {} (replica {}{}): {} disk queue={}{}",
                            node.id,
                            peer.replica_id(),
                            if peer.is_removed() { ", removed" } else { "" },
                            peer.debug_state(),
                            running.log.queued(),
                            if node.paused_until > self.step { ", paused" } else { "" }
                        )
                    })
                    .unwrap_or_else(|| format!("node {}: no replica", node.id)),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    // ---- invariants ----

    fn check_leaders(&mut self) -> SimResult<()> {
        for node in &self.nodes {
            let Some(running) = &node.running else { continue };
            let mut leading = Vec::new();
            running.store.each_fsm(|group, fsm| {
                if fsm.peer().is_leader() {
                    leading.push((group, fsm.peer().term()));
                }
            });
            for (group, term) in leading {
                if let Some(other) = self.leaders.insert((group, term), node.id) {
                    if other != node.id {
                        return Err(format!("group {group}: nodes {other} and {} both led term {term}", node.id));
                    }
                }
            }
        }
        Ok(())
    }

    fn fault_step(&mut self) -> SimResult<()> {
        self.deliver_due()?;
        if let Some((_, group_id, waited)) = self.planned_pause.filter(|(at, _, _)| *at <= self.step) {
            // Until its leader may serve reads locally (it may have none yet, or be asleep), for a while.
            let granted = self
                .leader_position(group_id)
                .is_some_and(|leader| self.grant_holds(leader, group_id, self.known_version(group_id)));
            if granted || waited >= 5 {
                self.planned_pause = None;
                let pollers_only = self.rng.chance_per_mille(500);
                self.pause_group(group_id, pollers_only);
            } else {
                self.planned_pause = Some((self.step + 20, group_id, waited + 1));
                self.focus = Some((group_id, self.step + 60));
            }
        }
        for position in 0..self.nodes.len() {
            if self.nodes[position].running.is_some() && self.nodes[position].paused_until == self.step {
                self.drive(position)?; // resumed: what piled up is handled, on the time that passed
            }
        }
        let position = self.rng.below(self.nodes.len() as u64) as usize;
        match self.rng.below(1000) {
            0..=449 => {}
            450..=599 => self.tick()?,
            600..=749 => self.persist_one(position)?,
            750..=769 => {
                if let Some(running) = &self.nodes[position].running {
                    running.kv.flush().map_err(|e| e.to_string())?; // a checkpoint
                }
            }
            770..=776 => {
                let down = self.nodes.iter().filter(|n| n.running.is_none()).count();
                // Keep a majority up most of the time, but not always.
                if self.nodes[position].running.is_some()
                    && (down + 1 < self.nodes.len().div_ceil(2) || self.rng.chance_per_mille(100))
                {
                    self.crash(position);
                }
            }
            777..=795 if self.nodes[position].running.is_none() => self.start(position)?,
            796..=802 => {
                // Cut or heal a one-way link.
                let from = self.rng.range(1, self.nodes.len() as u64);
                let to = self.rng.range(1, self.nodes.len() as u64);
                if from != to {
                    self.network.toggle_one_way(from, to);
                }
            }
            803..=805 => {
                // Isolate a node: every link to and from it cut (a leader so cut off may be asleep, its lease
                // frozen, while the others elect a new one).
                let isolated = self.rng.range(1, self.nodes.len() as u64);
                let others: Vec<u64> = (1..=self.nodes.len() as u64).filter(|&other| other != isolated).collect();
                self.network.partition(&[isolated], &others);
            }
            806..=809 => self.network.heal(),
            810..=899 => self.apply_waiting(position)?,
            900..=904 => {
                // A leadership transfer, wherever a leader is found (during faults it may not complete).
                let group = self.any_group();
                let target = self.rng.range(1, self.nodes.len() as u64);
                if let Some(position) = self.leader_position(group) {
                    let voters = self.running(position).store.with_fsm(group, |fsm| {
                        let replicas = &fsm.peer().descriptor().replicas;
                        replicas.iter().filter(|r| !r.learner).map(|r| r.replica_id).collect::<Vec<u64>>()
                    });
                    let replica_id = voters.map_or(0, |voters| voters[target as usize % voters.len()]);
                    let _ =
                        self.running(position).store.mailboxes().send(group, PeerMsg::TransferLeader { replica_id });
                    self.report.transfers += 1;
                    self.drive(position)?;
                }
            }
            905..=934 if self.is_up(position) => {
                // The node's log collection (compactions asked, the WAL purged).
                let node_id = self.nodes[position].id;
                self.running(position).store.collect_logs().map_err(|e| format!("node {node_id}: {e}"))?;
                self.drive(position)?;
            }
            935..=944 => self.change_membership()?,
            945..=949 => self.pause(),
            950..=954 => self.transfer_from_cut_off_leader()?,
            955..=959 => self.split()?,
            960..=964 => self.merge()?,
            _ => {}
        }
        self.take_asks()?;
        self.clients_step(true)
    }

    /// A leadership transfer whose old leader then hears nothing for a while (its node deaf; its own messages,
    /// the `TimeoutNow` among them, still go out): the target leads at once, in a new term, while the old
    /// leader still believes it leads. Some clients keep sending to the old leader — a lease that held through the
    /// transfer would answer them from stale data — and the others go to the new one.
    fn transfer_from_cut_off_leader(&mut self) -> SimResult<()> {
        let group = self.any_group();
        let Some(position) = self.leader_position(group) else { return Ok(()) };
        let id = self.nodes[position].id;
        let Some(target) = self.running(position).store.with_fsm(group, |fsm| {
            let peer = fsm.peer();
            let voters: Vec<u64> = peer
                .descriptor()
                .replicas
                .iter()
                .filter(|r| !r.learner && r.replica_id != peer.replica_id())
                .map(|r| r.replica_id)
                .collect();
            voters.first().copied()
        }) else {
            return Ok(());
        };
        let Some(target) = target else { return Ok(()) };
        let _ = self.running(position).store.mailboxes().send(group, PeerMsg::TransferLeader { replica_id: target });
        self.report.transfers += 1;
        self.drive(position)?;
        // Deaf for a while (the link cuts that other faults heal at random do not touch this), and the clients'
        // attention on the group meanwhile.
        self.nodes[position].deaf_until = self.step + self.rng.range(50, 300);
        self.focus = Some((group, self.nodes[position].deaf_until));
        // While it is deaf, some clients keep sending to the old leader, the others to the new one (as if they
        // learned of it first), whatever they are answered.
        let target_node = self.replica_nodes.get(&(group, target)).copied().unwrap_or(id);
        self.steered = (0..self.clients.len())
            .map(|_| Some(if self.rng.chance_per_mille(500) { target_node } else { id }))
            .collect();
        if self.trace {
            println!(
                "step {}: group {group} transfers from node {id} to replica {target}, node {id} cut off",
                self.step
            );
        }
        Ok(())
    }

    /// The position of a node whose replica of `group` leads (in some term), if any is up.
    fn leader_position(&self, group: u64) -> Option<usize> {
        (0..self.nodes.len()).find(|&position| {
            self.is_up(position)
                && self.nodes[position].running.as_ref().is_some_and(|running| {
                    running.store.with_fsm(group, |fsm| fsm.peer().is_leader() && !fsm.peer().is_removed())
                        == Some(true)
                })
        })
    }

    /// A membership change proposed on a leader: a learner onto a node that never held the group, a learner
    /// promoted, or a replica removed (keeping three voters). During faults it may not complete.
    fn change_membership(&mut self) -> SimResult<()> {
        let group = self.any_group();
        let Some(position) = self.leader_position(group) else { return Ok(()) };
        let Some(descriptor) = self.running(position).store.with_fsm(group, |fsm| fsm.peer().descriptor().clone())
        else {
            return Ok(());
        };
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
                MembershipChange::AddLearner { node_id, replica_id, addr: String::new() }
            }
            (None, _) if voters.len() > 3 => {
                MembershipChange::Remove { replica_id: voters[self.rng.below(voters.len() as u64) as usize] }
            }
            _ => return Ok(()),
        };
        if self.trace {
            println!("step {} group {group}: node {} proposes {change:?}", self.step, self.nodes[position].id);
        }
        let (reply, answer) = oneshot::channel();
        if self.running(position).store.mailboxes().send(group, PeerMsg::ChangeMembership { change, reply }).is_ok() {
            self.membership_replies.push(answer);
            self.report.membership_changes += 1;
        }
        self.drive(position)
    }

    /// The **stall duel**, once in the calm phase: leadership is stable and leases held, then the pollers of a
    /// leader that may serve reads locally stand still long enough for the others to elect a new leader, while
    /// its callers go on reading locally and the other clients write at the new leader. A grant that outlived
    /// the lease (judged on anything but the node's clock) serves stale data here.
    fn stall_duel(&mut self) {
        let granted: Vec<u64> = (self.group_ids().into_iter())
            .filter(|&group_id| {
                self.leader_position(group_id)
                    .is_some_and(|leader| self.grant_holds(leader, group_id, self.known_version(group_id)))
            })
            .collect();
        if granted.is_empty() {
            return; // no leases (ReadIndex runs), or none held now
        }
        let group = granted[self.rng.below(granted.len() as u64) as usize];
        self.pause_group(group, true);
        self.network.heal(); // not cut off: the others hear nothing from it only because its pollers stand still
        let leader = self.leader_position(group);
        if let Some(position) = leader.filter(|&position| self.nodes[position].paused_until > self.step) {
            // Long enough for an election (calm ticks come about every five steps).
            self.nodes[position].paused_until = self.step + self.rng.range(200, 400);
            self.focus = Some((group, self.nodes[position].paused_until + 50));
        }
        self.report.stall_duels += 1;
    }

    fn calm_step(&mut self, issue_new: bool) -> SimResult<()> {
        self.deliver_due()?;
        if self.rng.below(100) < 20 {
            self.tick()?;
        }
        for position in 0..self.nodes.len() {
            if self.is_up(position) {
                while self.running(position).log.queued() > 0 {
                    self.persist_one(position)?;
                }
                self.apply_waiting(position)?;
            }
        }
        self.take_asks()?;
        self.clients_step(issue_new)
    }

    /// After the faults: every group leads, serves a write, and every replica holds the same data.
    fn converge(&mut self, steps: u64) -> SimResult<()> {
        self.faults = false;
        self.network.heal();
        for position in 0..self.nodes.len() {
            self.nodes[position].paused_until = 0;
            self.nodes[position].deaf_until = 0;
            if self.nodes[position].running.is_none() {
                self.start(position)?;
            }
            while self.running(position).log.queued() > 0 {
                self.persist_one(position)?;
            }
            self.apply_waiting(position)?;
        }
        let duel_at = self.step + steps / 4;
        for _ in 0..steps {
            self.step += 1;
            if self.step == duel_at {
                self.stall_duel();
            }
            self.calm_step(self.step.is_multiple_of(2))?;
            self.check_leaders()?;
            self.check_ranges()?;
            self.check_meta_tiling()?;
        }
        // Let every client finish, then one more write per group must succeed.
        for _ in 0..steps {
            if self.clients.iter().all(Option::is_none) {
                break;
            }
            self.step += 1;
            self.calm_step(false)?;
        }
        self.refresh_ranges();
        self.check_tiling()?;
        for range in self.ranges.clone() {
            let client = 0;
            let value = self.next_value;
            self.next_value += 1;
            // A client's key of the range, or its start (a split by size may leave a range none of their keys).
            let key = self.keys.iter().find(|key| range.contains(key)).unwrap_or(&range.start).clone();
            let command = Command::write(None, vec![Op::put(key.clone(), value.to_le_bytes().to_vec())]);
            let operation = Operation {
                client: client as u64,
                key,
                call: Call::Put(value),
                call_time: self.timestamp(),
                result: None,
            };
            self.ops.push(ClientOp {
                operation,
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
                    range.group_id,
                    self.describe(range.group_id)
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
            self.refresh_ranges();
            self.check_tiling()?;
            divergence = match self.divergence()? {
                // The replicas agree: the meta range's table must show every range as its group now has it
                // (each group's leader published it).
                None => self.meta_mismatch()?,
                diverged => diverged,
            };
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
                .filter_map(|node| node.running.as_ref()?.store.with_fsm(group, |fsm| fsm.peer().descriptor().clone()))
                .max_by_key(|descriptor| (descriptor.epoch().version, descriptor.epoch().conf_version))
                .expect("some replica of every group");
            let mut views = Vec::new();
            for member in &newest.replicas {
                let running = self.nodes[(member.node_id - 1) as usize].running.as_ref().expect("all running");
                // Held by the member's replica, at the newest version (every split applied there too).
                let held = running.store.with_fsm(group, |fsm| fsm.peer().replica_id()) == Some(member.replica_id);
                let version = running.store.with_fsm(group, |fsm| fsm.peer().descriptor().epoch().version);
                let pairs = running.kv.scan(&range.start, &range.end, usize::MAX).map_err(|e| e.to_string())?;
                views.push((
                    member.node_id,
                    held,
                    version.unwrap_or(0),
                    running.kv.applied(group).0,
                    hash(&format!("{pairs:?}").into_bytes()),
                ));
            }
            let differ = |w: &[(u64, bool, u64, u64, u64)]| (w[0].2, w[0].3, w[0].4) != (w[1].2, w[1].3, w[1].4);
            if views.iter().any(|view| !view.1) || views.windows(2).any(differ) {
                let held: Vec<String> = views
                    .iter()
                    .map(|view| format!("node {}: {}", view.0, self.held_by(view.0 as usize - 1)))
                    .collect();
                return Ok(Some(format!(
                    "group {group}: replicas did not converge (node, replica held, version, applied, data hash): {views:?}; {}; the nodes hold: {}",
                    self.describe(group),
                    held.join("; ")
                )));
            }
        }
        Ok(None)
    }
}

/// What an attempt was answered with.
#[derive(Debug)]
enum Answered {
    Written(Applied),
    Read(ReadResult),
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
        ReplicaMessage::MergeReady(r) => format!("MergeReady {}->{} frozen_index={}", r.from, r.to, r.frozen_index),
        ReplicaMessage::Ask(a) => {
            format!("Ask {}->{} {:?}", a.from, a.to, a.command.as_ref().and_then(|c| c.merge.as_ref()).map(|m| m.step))
        }
        ReplicaMessage::Decided(d) => {
            format!("Decided {}->{} at {}@{}", d.from, d.to, d.decided_index, d.decided_term)
        }
    }
}

/// Runs one seed.
pub fn run(options: &StoreSimOptions) -> Result<StoreSimReport, StoreSimFailure> {
    let fail = |sim: &Sim, reason: String| StoreSimFailure { seed: options.seed, step: sim.step, reason };
    let mut sim = Sim::new(options).map_err(|reason| StoreSimFailure { seed: options.seed, step: 0, reason })?;
    while sim.step < options.fault_steps {
        sim.step += 1;
        let checked = sim.fault_step().and_then(|()| sim.check_leaders()).and_then(|()| sim.check_ranges());
        if let Err(reason) = checked.and_then(|()| sim.check_meta_tiling()) {
            return Err(fail(&sim, reason));
        }
    }
    if let Err(reason) = sim.converge(options.calm_steps) {
        return Err(fail(&sim, reason));
    }
    for node in &sim.nodes {
        let log = &node.running.as_ref().expect("all running after the calm").log;
        sim.report.compactions += log.compactions.load(Ordering::Relaxed);
        sim.report.snapshot_installs += log.snapshots.load(Ordering::Relaxed);
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
    sim.count_merged().map_err(|reason| fail(&sim, reason))?;
    Ok(sim.report)
}
