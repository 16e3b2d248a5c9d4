//! A deterministic cluster for scenario tests: every replica persists synchronously, messages move only when the
//! test says so, and every delivered message can be read back as one line of text (see [`describe`]), so tests
//! assert the exact message flow of a scenario. Invariants are checked after every delivery.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use flotilla_raft::prelude::*;
use flotilla_raft::Result;

use crate::invariants::Invariants;
use crate::sim_node::SimNode;

pub struct Cluster {
    pub nodes: BTreeMap<u64, SimNode>,
    pub invariants: Invariants,
    blocked: BTreeSet<(u64, u64)>,
    /// Message types dropped wherever they go.
    pub dropped_types: BTreeSet<MessageType>,
    /// Every message delivered (or dropped, marked so) since the last `take_trace`.
    trace: Vec<String>,
    /// The voters the cluster was bootstrapped with (new replicas start from the same configuration).
    pub initial_voters: Vec<u64>,
}

/// One line per message: `1->2 Append t2 idx=3 logt=1 ents=[4@2] commit=3`, fields shown only when set.
pub fn describe(m: &Message) -> String {
    let kind = m.kind().map_or_else(|| format!("Unknown({})", m.msg_type), |k| format!("{k:?}"));
    let mut line = format!("{}->{} {kind} t{}", m.from, m.to, m.term);
    if m.index != 0 {
        line += &format!(" idx={}", m.index);
    }
    if m.log_term != 0 {
        line += &format!(" logt={}", m.log_term);
    }
    if !m.entries.is_empty() {
        let entries: Vec<String> = m.entries.iter().map(|e| format!("{}@{}", e.index, e.term)).collect();
        line += &format!(" ents=[{}]", entries.join(","));
    }
    if m.commit != 0 {
        line += &format!(" commit={}", m.commit);
    }
    if m.reject {
        line += &format!(" reject hint={}", m.reject_hint);
    }
    if let Some(snapshot) = &m.snapshot {
        line += &format!(" snap={}@{}", snapshot.index(), snapshot.term());
    }
    if !m.context.is_empty() {
        line += &format!(" ctx={}", String::from_utf8_lossy(&m.context));
    }
    line
}

impl Cluster {
    /// A cluster whose voters are `voters` and learners `learners`, each replica configured by `configure`.
    pub fn new(voters: &[u64], learners: &[u64], configure: impl Fn(&mut Config)) -> Cluster {
        let mut nodes = BTreeMap::new();
        for &id in voters.iter().chain(learners) {
            let mut storage = MemStorage::new_with_voters(voters);
            storage.set_conf_state(ConfState {
                voters: voters.to_vec(),
                learners: learners.to_vec(),
                ..Default::default()
            });
            let mut config = Config::new(id);
            configure(&mut config);
            nodes.insert(id, SimNode::new(config, storage).expect("valid test config"));
        }
        Cluster {
            nodes,
            invariants: Invariants::default(),
            blocked: BTreeSet::new(),
            dropped_types: BTreeSet::new(),
            trace: Vec::new(),
            initial_voters: voters.to_vec(),
        }
    }

    /// A cluster of `voters` whose replicas all start in `term` having voted for `appointee` (a split's new group
    /// as the store makes it: see `Raft::lead_as_appointed`).
    pub fn appointed(voters: &[u64], term: u64, appointee: u64, configure: impl Fn(&mut Config)) -> Cluster {
        let mut cluster = Cluster::new(&[], &[], |_| {});
        cluster.initial_voters = voters.to_vec();
        for &id in voters {
            let mut storage = MemStorage::new_with_voters(voters);
            storage.set_hard_state(HardState { term, vote: appointee, commit: 0 });
            let mut config = Config::new(id);
            configure(&mut config);
            cluster.nodes.insert(id, SimNode::new(config, storage).expect("valid test config"));
        }
        cluster
    }

    /// A cluster of `voters` whose replicas start with the given logs: `logs[i] = (id, terms)` gives the term of
    /// each entry from index 1 on; each replica's term is its last entry's term (or `term_floor`, if larger).
    pub fn from_logs(
        voters: &[u64],
        logs: &[(u64, Vec<u64>)],
        term_floor: u64,
        configure: impl Fn(&mut Config),
    ) -> Cluster {
        let mut cluster = Cluster::new(&[], &[], |_| {});
        cluster.initial_voters = voters.to_vec();
        for (id, terms) in logs {
            let mut storage = MemStorage::new_with_voters(voters);
            let entries: Vec<Entry> = terms
                .iter()
                .enumerate()
                .map(|(i, &term)| Entry {
                    index: i as u64 + 1,
                    term,
                    data: Bytes::from(format!("{i}@{term}")),
                    ..Default::default()
                })
                .collect();
            storage.append(&entries).expect("fresh storage");
            let term = terms.last().copied().unwrap_or(0).max(term_floor);
            storage.set_hard_state(HardState { term, vote: 0, commit: 0 });
            let mut config = Config::new(*id);
            configure(&mut config);
            cluster.nodes.insert(*id, SimNode::new(config, storage).expect("valid test config"));
        }
        cluster
    }

    /// Adds a replica that is not (yet) in the configuration, bootstrapped from the same initial configuration.
    pub fn add_node(&mut self, id: u64, initial_voters: &[u64], configure: impl Fn(&mut Config)) {
        let storage = MemStorage::new_with_voters(initial_voters);
        let mut config = Config::new(id);
        configure(&mut config);
        self.nodes.insert(id, SimNode::new(config, storage).expect("valid test config"));
    }

    pub fn node(&self, id: u64) -> &SimNode {
        &self.nodes[&id]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut SimNode {
        self.nodes.get_mut(&id).expect("node exists")
    }

    pub fn raft(&self, id: u64) -> &flotilla_raft::Raft<MemStorage> {
        &self.nodes[&id].raw.raft
    }

    fn settle(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("node exists");
        node.process_ready(true);
        if let Err(violation) = self.invariants.check(node) {
            panic!("invariant violated: {violation}");
        }
    }

    pub fn tick(&mut self, id: u64, ticks: u64) {
        for _ in 0..ticks {
            self.node_mut(id).raw.tick();
            self.settle(id);
        }
    }

    pub fn tick_all(&mut self, ticks: u64) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for _ in 0..ticks {
            for &id in &ids {
                self.tick(id, 1);
            }
        }
    }

    pub fn campaign(&mut self, id: u64) {
        self.node_mut(id).raw.campaign();
        self.settle(id);
    }

    pub fn propose(&mut self, id: u64, data: &str) -> Result<()> {
        let result = self.node_mut(id).raw.propose(Bytes::copy_from_slice(data.as_bytes()));
        self.settle(id);
        result
    }

    pub fn with_node<T>(&mut self, id: u64, action: impl FnOnce(&mut RawNode<MemStorage>) -> T) -> T {
        let result = action(&mut self.node_mut(id).raw);
        self.settle(id);
        result
    }

    /// Messages waiting in outboxes, taken out without delivering them.
    pub fn take_messages(&mut self) -> Vec<Message> {
        self.nodes.values_mut().flat_map(|n| n.take_outbox()).collect()
    }

    /// Delivers `messages` (respecting cuts and dropped types); recorded in the trace.
    pub fn deliver(&mut self, messages: Vec<Message>) {
        for message in messages {
            let kind = message.kind();
            let lost = self.blocked.contains(&(message.from, message.to))
                || kind.is_some_and(|k| self.dropped_types.contains(&k))
                || !self.nodes.contains_key(&message.to);
            if lost {
                self.trace.push(format!("{} (dropped)", describe(&message)));
                continue;
            }
            self.trace.push(describe(&message));
            let to = message.to;
            let _ = self.node_mut(to).raw.step(message);
            self.settle(to);
        }
    }

    /// Steps `messages` into replica `to` and handles its Readies *without* persisting anything: what it sends
    /// stays in its outbox and what it must write stays pending until `persist_all`.
    pub fn deliver_unpersisted(&mut self, to: u64, messages: Vec<Message>) {
        let node = self.node_mut(to);
        for message in messages {
            node.raw.step(message).expect("valid message");
        }
        node.process_ready(false);
    }

    /// `id` campaigns without persisting anything: its vote requests are delivered (the voters persist as usual)
    /// and the responses are stepped into `id`, still unpersisted. Returns those responses.
    pub fn campaign_unpersisted(&mut self, id: u64) -> Vec<Message> {
        let node = self.node_mut(id);
        node.raw.campaign();
        node.process_ready(false);
        let requests = node.take_outbox();
        self.deliver(requests);
        let votes: Vec<Message> = self.take_messages().into_iter().filter(|m| m.to == id).collect();
        self.deliver_unpersisted(id, votes.clone());
        votes
    }

    /// Delivers messages until none are left; returns how many rounds it took.
    pub fn stabilize(&mut self) -> usize {
        let mut rounds = 0;
        loop {
            let messages = self.take_messages();
            if messages.is_empty() {
                return rounds;
            }
            rounds += 1;
            assert!(rounds < 10_000, "messages never stop flowing");
            self.deliver(messages);
        }
    }

    /// The messages delivered since the last call, one line each.
    pub fn take_trace(&mut self) -> Vec<String> {
        std::mem::take(&mut self.trace)
    }

    /// Cuts `id` off from every other replica, both ways.
    pub fn isolate(&mut self, id: u64) {
        let others: Vec<u64> = self.nodes.keys().copied().filter(|&o| o != id).collect();
        for other in others {
            self.blocked.insert((id, other));
            self.blocked.insert((other, id));
        }
    }

    pub fn cut(&mut self, from: u64, to: u64) {
        self.blocked.insert((from, to));
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
        self.dropped_types.clear();
    }

    /// Campaigns at `id` and delivers until quiet; panics unless `id` then leads.
    pub fn elect(&mut self, id: u64) {
        self.campaign(id);
        self.stabilize();
        assert_eq!(self.raft(id).role, StateRole::Leader, "node {id} did not win the election");
    }

    /// The terms of `id`'s whole log (from its first index), for comparing logs.
    pub fn log_terms(&self, id: u64) -> Vec<u64> {
        let log = &self.raft(id).raft_log;
        let entries = log.slice(log.first_index(), log.last_index() + 1, u64::MAX).expect("log readable");
        entries.iter().map(|e| e.term).collect()
    }

    pub fn leader(&self) -> Option<u64> {
        let mut leaders: Vec<(u64, u64)> =
            self.nodes.values().filter(|n| n.role() == StateRole::Leader).map(|n| (n.term(), n.id)).collect();
        leaders.sort();
        leaders.last().map(|&(_, id)| id)
    }

    /// The index `id`'s state machine has applied.
    pub fn applied_index(&self, id: u64) -> u64 {
        self.nodes[&id].machine.applied_index
    }
}
