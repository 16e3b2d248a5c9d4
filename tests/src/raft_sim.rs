//! The seeded, replayable randomized simulation of the Raft core.
//!
//! One seed fixes everything: the group size (3–7 replicas, some starting outside the configuration), each
//! replica's settings (pre-vote, check-quorum, ReadIndex or lease reads) and clock rate, and every action. A run
//! has a **fault phase** — message loss, duplication and reordering, partitions (also one-way), crashes that keep
//! a random prefix of unsynced writes, proposals, membership changes (simple and joint), leadership transfers,
//! log compactions with snapshots, followers asking for a snapshot over their whole log, reads — and a **calm phase**: the network heals, faults stop, and within a
//! bounded number of ticks the group must elect a leader and commit a new entry on every voter. After every step
//! the [`Invariants`] are checked, and every confirmed read must reflect every entry committed before it began.

use std::collections::BTreeMap;

use bytes::Bytes;
use flotilla_raft::prelude::*;

use crate::invariants::Invariants;
use crate::network::{Delivery, FaultRates, SimNetwork};
use crate::sim_node::SimNode;
use crate::sim_rng::SimRng;

#[derive(Clone, Copy, Debug)]
enum Action {
    Deliver,
    Persist,
    Tick,
    Propose,
    Read,
    Crash,
    Partition,
    Membership,
    Transfer,
    Compact,
    Unreachable,
    RequestSnapshot,
}

/// Knobs of one run; everything else derives from the seed.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    /// Steps of the fault phase.
    pub fault_steps: u64,
    /// Global ticks the calm phase may take to elect a leader and commit on every voter.
    pub calm_ticks_max: u64,
    /// Print every delivered message to stderr.
    pub trace: bool,
}

impl SimOptions {
    pub fn new(seed: u64) -> SimOptions {
        SimOptions { seed, fault_steps: 3000, calm_ticks_max: 400, trace: false }
    }
}

/// What a clean run did.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub nodes: usize,
    pub steps: u64,
    pub committed: u64,
    pub elections: usize,
    pub crashes: u64,
    pub conf_changes: u64,
    pub transfers: u64,
    pub snapshots_requested: u64,
    pub snapshots_sent: u64,
    pub reads_confirmed: u64,
    pub messages_delivered: u64,
    pub messages_dropped: u64,
    pub calm_ticks: u64,
}

/// A violated invariant or a liveness failure, with the step at which it happened.
#[derive(Clone, Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub step: u64,
    pub reason: String,
}

/// How hard each kind of fault hits in a run. Most seeds get the general mix; "lease duel" seeds (one in five
/// with leases) keep leadership stable, then cut the leader off and read from it while the majority elects and
/// commits: the window in which a too-long lease would serve a stale read.
#[derive(Clone, Copy, Debug)]
struct Flavor {
    crash_per_mille: u64,
    partition_per_mille: u64,
    read_per_mille: u64,
    lease_duel: bool,
}

struct Simulation {
    flavor: Flavor,
    rng: SimRng,
    nodes: BTreeMap<u64, SimNode>,
    /// Per-replica clock rate in per-mille of the global tick and the fractional tick accumulated.
    clocks: BTreeMap<u64, (u64, u64)>,
    /// Per-replica chance (per mille) that a chance to persist is skipped: a slow disk.
    disk_slowness: BTreeMap<u64, u32>,
    network: SimNetwork<Message>,
    invariants: Invariants,
    /// Outstanding reads: context → the highest index committed anywhere when the read began.
    reads: BTreeMap<Bytes, u64>,
    next_value: u64,
    step: u64,
    /// Print every message delivery to stderr (`--trace`).
    pub trace: bool,
    report: SimReport,
}

pub fn run(options: &SimOptions) -> Result<SimReport, SimFailure> {
    let mut sim = Simulation::new(options.seed);
    sim.trace = options.trace;
    let fail = |sim: &Simulation, reason: String| SimFailure { seed: options.seed, step: sim.step, reason };
    for _ in 0..options.fault_steps {
        sim.step += 1;
        sim.fault_step().map_err(|reason| fail(&sim, reason))?;
    }
    sim.calm(options.calm_ticks_max).map_err(|reason| fail(&sim, reason))?;
    sim.report.steps = sim.step;
    sim.report.committed = sim.invariants.max_committed();
    sim.report.messages_delivered = sim.network.delivered;
    sim.report.messages_dropped = sim.network.dropped;
    sim.report.nodes = sim.nodes.len();
    Ok(sim.report)
}

impl Simulation {
    fn new(seed: u64) -> Simulation {
        let mut rng = SimRng::new(seed);
        let pool = rng.range(3, 7);
        let initial_voters: Vec<u64> = (1..=rng.range(1, pool.min(5)).max(3.min(pool))).collect();
        let lease = rng.chance_per_mille(400);
        let lease_duel = lease && rng.chance_per_mille(500);
        let flavor = if lease_duel {
            Flavor { crash_per_mille: 2, partition_per_mille: 3, read_per_mille: 100, lease_duel }
        } else {
            Flavor { crash_per_mille: 8, partition_per_mille: 4, read_per_mille: 40, lease_duel }
        };
        let pre_vote = lease || rng.chance_per_mille(800);
        let check_quorum = lease || !pre_vote || rng.chance_per_mille(600);
        let commit_broadcast = rng.chance_per_mille(500);
        let heartbeats_skip_after_append = rng.chance_per_mille(500);
        let persisted_messages_in_ready = rng.chance_per_mille(500);
        let mut nodes = BTreeMap::new();
        let mut clocks = BTreeMap::new();
        let mut disk_slowness = BTreeMap::new();
        for id in 1..=pool {
            disk_slowness.insert(id, if rng.chance_per_mille(300) { rng.range(700, 950) as u32 } else { 0 });
            let config = Config {
                id,
                random_seed: rng.next_u64(),
                election_timeout_ticks: 10,
                heartbeat_interval_ticks: rng.range(1, 3),
                pre_vote,
                check_quorum,
                read_mode: if lease { ReadMode::LeaseBased } else { ReadMode::Safe },
                lease_margin_ticks: 2,
                append_message_bytes_max: rng.range(40, 400),
                inflight_messages_max: rng.range(1, 8) as usize,
                inflight_bytes_max: rng.range(100, 4000),
                uncommitted_bytes_max: rng.range(200, 5000),
                committed_bytes_max_per_ready: rng.range(40, 1000),
                pending_reads_max: 16,
                commit_broadcast,
                heartbeats_skip_after_append,
                persisted_messages_in_ready,
                ..Config::default()
            };
            let storage = MemStorage::new_with_voters(&initial_voters);
            nodes.insert(id, SimNode::new(config, storage).expect("simulator configs are valid"));
            // Clock rates within ±4 %: inside the lease margin's documented drift bound (about 11 %).
            clocks.insert(id, (rng.range(960, 1040), rng.below(1000)));
        }
        let network = SimNetwork::new(FaultRates {
            drop_per_mille: if lease_duel { rng.range(0, 10) } else { rng.range(0, 150) } as u32,
            duplicate_per_mille: rng.range(0, 50) as u32,
        });
        Simulation {
            flavor,
            rng,
            nodes,
            clocks,
            disk_slowness,
            network,
            invariants: Invariants::default(),
            reads: BTreeMap::new(),
            next_value: 0,
            step: 0,
            trace: false,
            report: SimReport::default(),
        }
    }

    fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    fn random_node(&mut self) -> u64 {
        let ids = self.ids();
        *self.rng.pick(&ids).expect("nodes exist")
    }

    fn leaders(&self) -> Vec<u64> {
        self.nodes.values().filter(|n| n.role() == StateRole::Leader).map(|n| n.id).collect()
    }

    /// Settles one replica after an input: handles its Readies, ships its messages, checks invariants.
    fn settle(&mut self, id: u64) -> Result<(), String> {
        let node = self.nodes.get_mut(&id).expect("node exists");
        node.process_ready(false);
        let outbox = node.take_outbox();
        self.network.send(outbox);
        for read in std::mem::take(&mut node.read_states) {
            let Some(committed_at_start) = self.reads.remove(&read.context) else { continue };
            if read.index < committed_at_start {
                return Err(format!(
                    "stale read: node {id} confirmed read index {} but {committed_at_start} was committed before the read began",
                    read.index
                ));
            }
            self.report.reads_confirmed += 1;
        }
        let node = self.nodes.get_mut(&id).expect("node exists");
        self.invariants.check(node)
    }

    fn settle_all(&mut self) -> Result<(), String> {
        for id in self.ids() {
            self.settle(id)?;
        }
        Ok(())
    }

    fn fault_step(&mut self) -> Result<(), String> {
        let flavor = self.flavor;
        let mut roll = self.rng.below(1000);
        // Fixed shares first, then the flavor's fault shares; what is left delivers messages.
        for (share, action) in [
            // Enough deliveries and disk writes per tick that a healthy group keeps its leader: a starved
            // network only churns elections and hides everything else.
            (450, Action::Deliver),
            (200, Action::Persist),
            (60, Action::Tick),
            (90, Action::Propose),
            (flavor.read_per_mille, Action::Read),
            (flavor.crash_per_mille, Action::Crash),
            (flavor.partition_per_mille, Action::Partition),
            (20, Action::Membership),
            (10, Action::Transfer),
            (25, Action::Compact),
            (5, Action::Unreachable),
            (3, Action::RequestSnapshot),
        ] {
            if roll < share {
                return self.act(action);
            }
            roll -= share;
        }
        self.act(Action::Deliver)
    }

    fn act(&mut self, action: Action) -> Result<(), String> {
        match action {
            Action::Deliver => self.deliver(false),
            Action::Persist => self.persist_some(),
            Action::Tick => self.tick_all(),
            Action::Propose => self.propose(),
            Action::Read => self.read(),
            Action::Crash => self.crash(),
            Action::Partition => {
                self.change_partitions();
                Ok(())
            }
            Action::Membership if !self.flavor.lease_duel => self.change_membership(),
            Action::Membership => Ok(()),
            Action::Transfer => self.transfer(),
            Action::Compact => self.compact(),
            Action::RequestSnapshot => {
                let id = self.random_node();
                if self.nodes.get_mut(&id).expect("exists").raw.request_snapshot() {
                    self.report.snapshots_requested += 1;
                }
                self.settle(id)
            }
            Action::Unreachable => {
                let (id, to) = (self.random_node(), self.random_node());
                self.nodes.get_mut(&id).expect("exists").raw.report_unreachable(to);
                self.settle(id)
            }
        }
    }

    fn deliver(&mut self, oldest: bool) -> Result<(), String> {
        let (message, delivered) = match self.network.take_one(&mut self.rng, oldest) {
            Delivery::Empty => return Ok(()),
            Delivery::Lost(message) => (message, false),
            Delivery::Delivered(message) => (message, true),
        };
        let (from, to) = (message.from, message.to);
        let is_snapshot = message.kind() == Some(MessageType::Snapshot);
        if self.trace {
            let fate = if delivered { "" } else { " (lost)" };
            eprintln!("step {}: {}{fate}", self.step, crate::cluster::describe(&message));
        }
        if delivered {
            if let Some(node) = self.nodes.get_mut(&to) {
                let _ = node.raw.step(message);
                self.settle(to)?;
            }
        }
        if is_snapshot {
            // The sender's transport reports how sending the snapshot went.
            self.report.snapshots_sent += delivered as u64;
            if let Some(sender) = self.nodes.get_mut(&from) {
                sender.raw.report_snapshot(to, delivered);
                self.settle(from)?;
            }
        }
        Ok(())
    }

    fn persist_some(&mut self) -> Result<(), String> {
        let pending: Vec<u64> = self.nodes.values().filter(|n| n.has_unpersisted()).map(|n| n.id).collect();
        let Some(&id) = self.rng.pick(&pending) else { return Ok(()) };
        if self.rng.chance_per_mille(self.disk_slowness[&id]) {
            return Ok(());
        }
        let node = self.nodes.get_mut(&id).expect("exists");
        let writes = self.rng.range(1, 3);
        for _ in 0..writes {
            node.persist_one();
        }
        self.settle(id)
    }

    /// One global tick: each replica's clock advances by its own rate.
    fn tick_all(&mut self) -> Result<(), String> {
        for id in self.ids() {
            let (rate, accumulated) = self.clocks[&id];
            let mut accumulated = accumulated + rate;
            while accumulated >= 1000 {
                accumulated -= 1000;
                self.nodes.get_mut(&id).expect("exists").raw.tick();
            }
            self.clocks.insert(id, (rate, accumulated));
            self.settle(id)?;
        }
        self.report.elections = (1..=self.nodes.values().map(|n| n.term()).max().unwrap_or(0))
            .filter(|&t| self.invariants.leader_of(t).is_some())
            .count();
        Ok(())
    }

    fn propose(&mut self) -> Result<(), String> {
        let leaders = self.leaders();
        let id = match self.rng.pick(&leaders) {
            Some(&leader) if !self.rng.chance_per_mille(100) => leader,
            _ => self.random_node(),
        };
        let count = self.rng.range(1, 4);
        let mut batch = Vec::new();
        for _ in 0..count {
            self.next_value += 1;
            let size = self.rng.range(1, 60) as usize;
            let mut value = format!("v{}-", self.next_value).into_bytes();
            value.resize(size.max(value.len()), b'.');
            batch.push(Bytes::from(value));
        }
        let _ = self.nodes.get_mut(&id).expect("exists").raw.propose_batch(batch);
        self.settle(id)
    }

    fn read(&mut self) -> Result<(), String> {
        // Reads at a replica that believes it leads are the interesting ones, most of all at a stale leader.
        let mut leaders: Vec<(u64, u64)> = self.leaders().into_iter().map(|id| (self.nodes[&id].term(), id)).collect();
        leaders.sort();
        let id = match leaders.first() {
            Some(&(_, stale_most)) if self.rng.chance_per_mille(600) => stale_most,
            _ => self.random_node(),
        };
        self.next_value += 1;
        let context = Bytes::from(format!("read-{}", self.next_value));
        let committed_now = self.invariants.max_committed();
        if self.nodes.get_mut(&id).expect("exists").raw.read_index(context.clone()).is_ok() {
            self.reads.insert(context, committed_now);
        }
        self.settle(id)
    }

    fn crash(&mut self) -> Result<(), String> {
        let id = self.random_node();
        let node = self.nodes.get_mut(&id).expect("exists");
        let records = node.unpersisted_record_count() as u64;
        let surviving = self.rng.below(records + 1) as usize;
        node.crash_and_restart(surviving).map_err(|e| format!("node {id} failed to restart: {e}"))?;
        self.report.crashes += 1;
        self.settle(id)?;
        for lost in self.network.drop_to(id) {
            if lost.kind() == Some(MessageType::Snapshot) {
                if let Some(sender) = self.nodes.get_mut(&lost.from) {
                    sender.raw.report_snapshot(id, false);
                    self.settle(lost.from)?;
                }
            }
        }
        Ok(())
    }

    fn change_partitions(&mut self) {
        let ids = self.ids();
        let choice = self.rng.below(4);
        match choice {
            0 => self.network.heal(),
            1 => {
                // Isolate the replica that believes it leads (with the highest term): the lease's test.
                let mut leaders: Vec<(u64, u64)> =
                    self.leaders().into_iter().map(|id| (self.nodes[&id].term(), id)).collect();
                leaders.sort();
                if let Some(&(_, leader)) = leaders.last() {
                    self.network.heal();
                    let others: Vec<u64> = ids.iter().copied().filter(|&id| id != leader).collect();
                    self.network.partition(&[leader], &others);
                }
            }
            2 => {
                let mut side_a = Vec::new();
                let mut side_b = Vec::new();
                for &id in &ids {
                    if self.rng.chance_per_mille(500) {
                        side_a.push(id);
                    } else {
                        side_b.push(id);
                    }
                }
                self.network.partition(&side_a, &side_b);
            }
            _ => {
                let (from, to) = (self.random_node(), self.random_node());
                if from != to {
                    self.network.cut_one_way(from, to);
                }
            }
        }
    }

    fn change_membership(&mut self) -> Result<(), String> {
        let leaders = self.leaders();
        let Some(&leader) = self.rng.pick(&leaders) else { return Ok(()) };
        let config = self.nodes[&leader].raw.raft.tracker.config.clone();
        let change = if config.voters.is_joint() {
            if config.auto_leave {
                return Ok(());
            }
            ConfChangeV2::leave_joint()
        } else {
            let voters: Vec<u64> = config.voters.incoming.voters.iter().copied().collect();
            let learners: Vec<u64> = config.learners.iter().copied().collect();
            let outsiders: Vec<u64> = self.ids().into_iter().filter(|id| !config.member_ids().contains(id)).collect();
            let single = |kind, id| ConfChangeSingle::new(kind, id);
            match self.rng.below(6) {
                0 => match self.rng.pick(&outsiders) {
                    Some(&id) => ConfChangeV2::new(vec![single(ConfChangeType::AddLearnerNode, id)]),
                    None => return Ok(()),
                },
                1 => match self.rng.pick(&learners) {
                    Some(&id) if voters.len() < 5 => ConfChangeV2::new(vec![single(ConfChangeType::AddNode, id)]),
                    _ => return Ok(()),
                },
                2 if voters.len() > 1 => {
                    let id = *self.rng.pick(&voters).expect("non-empty");
                    ConfChangeV2::new(vec![single(ConfChangeType::RemoveNode, id)])
                }
                3 if voters.len() > 1 => {
                    let id = *self.rng.pick(&voters).expect("non-empty");
                    ConfChangeV2::new(vec![single(ConfChangeType::AddLearnerNode, id)])
                }
                4 | 5 => {
                    // Replace a voter (possibly the leader) through a joint configuration.
                    let Some(&new_voter) = self.rng.pick(&outsiders).or(self.rng.pick(&learners)) else {
                        return Ok(());
                    };
                    let old_voter = *self.rng.pick(&voters).expect("non-empty");
                    let transition = *self
                        .rng
                        .pick(&[
                            ConfChangeTransition::Auto,
                            ConfChangeTransition::JointImplicit,
                            ConfChangeTransition::JointExplicit,
                        ])
                        .expect("non-empty");
                    ConfChangeV2 {
                        transition: transition as i32,
                        changes: vec![
                            single(ConfChangeType::RemoveNode, old_voter),
                            single(ConfChangeType::AddNode, new_voter),
                        ],
                        context: Bytes::new(),
                    }
                }
                _ => return Ok(()),
            }
        };
        if self.nodes.get_mut(&leader).expect("exists").raw.propose_conf_change(&change).is_ok() {
            self.report.conf_changes += 1;
        }
        self.settle(leader)
    }

    fn transfer(&mut self) -> Result<(), String> {
        let leaders = self.leaders();
        let Some(&leader) = self.rng.pick(&leaders) else { return Ok(()) };
        let target = self.random_node();
        self.nodes.get_mut(&leader).expect("exists").raw.transfer_leader(target);
        self.report.transfers += 1;
        self.settle(leader)
    }

    fn compact(&mut self) -> Result<(), String> {
        let id = self.random_node();
        let node = self.nodes.get_mut(&id).expect("exists");
        let applied = node.machine.applied_index;
        let keep = self.rng.below(20);
        node.snapshot_and_compact(applied.saturating_sub(keep));
        self.settle(id)
    }

    /// Faults stop; within `ticks_max` global ticks a leader must emerge and commit a new entry everywhere.
    fn calm(&mut self, ticks_max: u64) -> Result<(), String> {
        self.network.heal();
        self.network.faults = FaultRates::default();
        let marker = Bytes::from(format!("calm-marker-{}", self.next_value + 1));
        let mut proposed_at: Option<(u64, u64)> = None;
        for tick in 0..ticks_max {
            self.step += 1;
            for id in self.ids() {
                let node = self.nodes.get_mut(&id).expect("exists");
                node.persist_all();
            }
            self.settle_all()?;
            while self.network.in_flight_count() > 0 {
                self.deliver(true)?;
                for id in self.ids() {
                    self.nodes.get_mut(&id).expect("exists").persist_all();
                }
                self.settle_all()?;
            }
            self.snapshot_for_requests()?;
            if let Some((leader, index)) = proposed_at {
                if self.committed_on_every_voter(leader, index) {
                    self.report.calm_ticks = tick;
                    return Ok(());
                }
            }
            let leaders = self.leaders();
            if let [leader] = leaders[..] {
                let still_ours = proposed_at.is_some_and(|(l, i)| {
                    l == leader && self.nodes[&l].raw.raft.raft_log.term(i).is_ok_and(|t| t == self.nodes[&l].term())
                });
                if !still_ours {
                    let node = self.nodes.get_mut(&leader).expect("exists");
                    if node.raw.propose(marker.clone()).is_ok() {
                        proposed_at = Some((leader, node.raw.raft.raft_log.last_index()));
                    }
                    self.settle(leader)?;
                }
            }
            self.tick_all()?;
        }
        Err(format!(
            "liveness: no leader committed a new entry on every voter within {ticks_max} ticks after faults stopped \
             (marker at {proposed_at:?})\n{}",
            self.describe_state()
        ))
    }

    /// A follower that asked for a snapshot takes no entries until it has one reaching its last index; a real
    /// store's leader sends its current state, this simulation's only what it stored at its last compaction. So
    /// while one asks, each leader stores a snapshot of what it applied.
    fn snapshot_for_requests(&mut self) -> Result<(), String> {
        if !self.nodes.values().any(|node| node.raw.snapshot_requested()) {
            return Ok(());
        }
        for leader in self.leaders() {
            let node = self.nodes.get_mut(&leader).expect("exists");
            let applied = node.machine.applied_index;
            node.snapshot_and_compact(applied);
            self.settle(leader)?;
        }
        Ok(())
    }

    /// Every replica's role, term, log and configuration, and each leader's view of its followers.
    fn describe_state(&self) -> String {
        let mut lines = Vec::new();
        for node in self.nodes.values() {
            let raft = &node.raw.raft;
            let log = &raft.raft_log;
            lines.push(format!(
                "  node {}: {:?} term {} leader {} log [{}, {}] committed {} applied {} persisted {} config {:?}",
                node.id,
                raft.role,
                raft.term,
                raft.leader_id,
                log.first_index(),
                log.last_index(),
                log.committed,
                node.machine.applied_index,
                log.persisted,
                raft.tracker.config.to_conf_state()
            ));
            if raft.role == StateRole::Leader {
                for (id, p) in &raft.tracker.progress {
                    lines.push(format!(
                        "    progress {id}: {:?} match {} next {} inflight {} active {} pending snapshot {}",
                        p.state,
                        p.matched,
                        p.next_index,
                        p.inflights.count(),
                        p.recent_active,
                        p.pending_snapshot
                    ));
                }
            }
        }
        lines.join("\n")
    }

    fn committed_on_every_voter(&self, leader: u64, index: u64) -> bool {
        let leader_node = &self.nodes[&leader];
        if leader_node.role() != StateRole::Leader || leader_node.committed() < index {
            return false;
        }
        let voters = leader_node.raw.raft.tracker.config.voters.ids();
        voters.iter().all(|id| self.nodes.get(id).is_some_and(|n| n.machine.applied_index >= index))
    }
}
