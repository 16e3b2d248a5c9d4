//! Shared drivers for the benchmarks in `benches/`.
//!
//! [`CoreCluster`] drives three in-memory replicas of the Raft core in one thread with synchronous persistence
//! into [`MemStorage`] and direct message delivery: nothing but the core's own work (and the minimum of storage
//! and message plumbing) is measured. It deliberately does no invariant checking; `tests/` does that.

pub mod metric_summary;

use bytes::Bytes;
use flotilla_raft::prelude::*;

pub struct CoreCluster {
    pub nodes: Vec<RawNode<MemStorage>>,
    pending: Vec<Message>,
}

impl CoreCluster {
    /// Three replicas; replica 1 is elected leader.
    pub fn new_three() -> CoreCluster {
        let voters = [1, 2, 3];
        let nodes = voters
            .iter()
            .map(|&id| {
                let config = Config { inflight_messages_max: 4096, uncommitted_bytes_max: 1 << 30, ..Config::new(id) };
                RawNode::new(config, MemStorage::new_with_voters(&voters)).expect("valid config")
            })
            .collect();
        let mut cluster = CoreCluster { nodes, pending: Vec::new() };
        cluster.nodes[0].campaign();
        cluster.run_until_quiet();
        assert_eq!(cluster.nodes[0].raft.role, StateRole::Leader);
        cluster
    }

    fn handle_ready(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        while node.has_ready() {
            let ready = node.ready();
            let storage = &mut node.raft.raft_log.storage;
            if let Some(snapshot) = ready.snapshot {
                storage.apply_snapshot(snapshot).expect("snapshot");
            }
            storage.append(&ready.entries).expect("append");
            if let Some(hard_state) = ready.hard_state {
                storage.set_hard_state(hard_state);
            }
            self.pending.extend(ready.messages);
            node.on_persisted(ready.number);
            if let Some(last) = ready.committed_entries.last() {
                node.on_applied(last.index);
            }
        }
    }

    /// Delivers messages and handles readies until nothing moves.
    pub fn run_until_quiet(&mut self) {
        loop {
            for index in 0..self.nodes.len() {
                self.handle_ready(index);
            }
            if self.pending.is_empty() {
                return;
            }
            for message in std::mem::take(&mut self.pending) {
                let to = (message.to - 1) as usize;
                self.nodes[to].step(message).expect("valid message");
            }
        }
    }

    /// Proposes `batch` entries of `payload` on the leader and runs until they are committed everywhere.
    pub fn propose_and_commit(&mut self, batch: usize, payload: &Bytes) {
        self.nodes[0].propose_batch(std::iter::repeat_n(payload.clone(), batch)).expect("leader accepts");
        self.run_until_quiet();
    }

    pub fn committed(&self) -> u64 {
        self.nodes[0].raft.raft_log.committed
    }

    /// Compacts every replica's log up to its applied index, keeping memory bounded over long runs.
    pub fn compact(&mut self) {
        for node in &mut self.nodes {
            let applied = node.raft.raft_log.applied;
            let storage = &mut node.raft.raft_log.storage;
            if applied > Storage::first_index(storage).expect("first") {
                storage.compact(applied).expect("compact");
            }
        }
    }
}
