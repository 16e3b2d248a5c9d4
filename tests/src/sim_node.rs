//! One simulated replica: a [`RawNode`] over [`MemStorage`] (the durable log), a tiny state machine, and a queue
//! of writes handed out by `Ready`s but not yet durable. Persisting, crashing (with a random prefix of the unsynced
//! record stream surviving, torn inside a `Ready`) and restarting follow the core's Ready contract exactly.

use std::collections::VecDeque;

use bytes::Bytes;
use flotilla_raft::prelude::*;
use flotilla_raft::{ReadState, Result};
use prost::Message as _;

/// The replicated state machine: a hash chain over every applied command, so two replicas that applied the same
/// commands in the same order have the same `hash`, and a snapshot is just `(index, hash)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    pub applied_index: u64,
    pub hash: u64,
    pub conf_state: ConfState,
    /// Entries applied since the checker last looked: (index, hash after applying it).
    pub applied: Vec<(u64, u64)>,
}

pub fn chain_hash(previous: u64, index: u64, data: &[u8]) -> u64 {
    // FNV-1a over (previous, index, data): deterministic across runs and platforms.
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ previous;
    for byte in index.to_le_bytes().iter().chain(data) {
        hash ^= *byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

impl Machine {
    fn snapshot_data(&self) -> Bytes {
        let mut data = Vec::with_capacity(16);
        data.extend_from_slice(&self.applied_index.to_le_bytes());
        data.extend_from_slice(&self.hash.to_le_bytes());
        Bytes::from(data)
    }

    fn install(&mut self, snapshot: &Snapshot) {
        let data = &snapshot.data;
        assert_eq!(data.len(), 16, "snapshot data of the simulated machine is (index, hash)");
        let index = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        assert_eq!(index, snapshot.index(), "snapshot data does not match its metadata");
        self.applied_index = index;
        self.hash = u64::from_le_bytes(data[8..].try_into().expect("8 bytes"));
        self.conf_state = snapshot.conf_state();
    }
}

/// What one `Ready` asked to make durable.
#[derive(Clone, Debug)]
struct PendingWrite {
    number: u64,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
    hard_state: Option<HardState>,
    /// Sent once the write is durable (`Config::persisted_messages_in_ready`).
    messages_after_persist: Vec<Message>,
}

pub struct SimNode {
    pub id: u64,
    pub raw: RawNode<MemStorage>,
    pub machine: Machine,
    config: Config,
    unpersisted: VecDeque<PendingWrite>,
    /// Messages produced and not yet taken by the network.
    pub outbox: Vec<Message>,
    pub read_states: Vec<ReadState>,
    /// Highest commit index seen in this life (commit must never move back within one).
    pub max_committed: u64,
}

impl SimNode {
    pub fn new(config: Config, storage: MemStorage) -> Result<SimNode> {
        let snapshot = flotilla_raft::Storage::snapshot(&storage, 0)?;
        let mut machine = Machine::default();
        if snapshot.index() > 0 {
            machine.install(&snapshot);
        } else {
            machine.conf_state = snapshot.conf_state();
        }
        let config = Config { applied_index: machine.applied_index, ..config };
        let raw = RawNode::new(config.clone(), storage)?;
        let max_committed = raw.raft.raft_log.committed;
        Ok(SimNode {
            id: config.id,
            raw,
            machine,
            config,
            unpersisted: VecDeque::new(),
            outbox: Vec::new(),
            read_states: Vec::new(),
            max_committed,
        })
    }

    pub fn storage(&self) -> &MemStorage {
        &self.raw.raft.raft_log.storage
    }

    fn storage_mut(&mut self) -> &mut MemStorage {
        &mut self.raw.raft.raft_log.storage
    }

    /// Handles every `Ready`: sends messages to the outbox, queues writes (persisting them at once if `sync`),
    /// applies committed entries.
    pub fn process_ready(&mut self, sync: bool) {
        while self.raw.has_ready() {
            let ready = self.raw.ready();
            self.outbox.extend(ready.messages);
            self.read_states.extend(ready.read_states);
            let must_write = ready.snapshot.is_some()
                || !ready.entries.is_empty()
                || ready.hard_state.is_some()
                || !ready.messages_after_persist.is_empty();
            if must_write || !self.unpersisted.is_empty() {
                self.unpersisted.push_back(PendingWrite {
                    number: ready.number,
                    snapshot: ready.snapshot,
                    entries: ready.entries,
                    hard_state: ready.hard_state,
                    messages_after_persist: ready.messages_after_persist,
                });
            } else {
                self.raw.on_persisted(ready.number);
            }
            if let Some(state) = &ready.installed_state {
                // A snapshot's state over the kept log (asked for: `RawNode::request_snapshot`).
                self.machine.install(state);
                self.machine.applied.push((state.index(), self.machine.hash));
            }
            self.apply(ready.committed_entries);
            if sync {
                self.persist_all();
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        let Some(last) = entries.last().map(|e| e.index) else { return };
        for entry in entries {
            assert_eq!(entry.index, self.machine.applied_index + 1, "node {}: applied out of order", self.id);
            if entry.is_conf_change() {
                let change = ConfChangeV2::decode(entry.data.as_ref()).expect("conf change entries decode");
                if let Ok(conf_state) = self.raw.apply_conf_change(&change) {
                    self.machine.conf_state = conf_state;
                }
            } else if !entry.data.is_empty() {
                self.machine.hash = chain_hash(self.machine.hash, entry.index, &entry.data);
            }
            self.machine.applied_index = entry.index;
            self.machine.applied.push((entry.index, self.machine.hash));
        }
        self.raw.on_applied(last);
    }

    pub fn has_unpersisted(&self) -> bool {
        !self.unpersisted.is_empty()
    }

    /// Makes the oldest pending write durable and reports it.
    pub fn persist_one(&mut self) {
        let Some(mut write) = self.unpersisted.pop_front() else { return };
        let number = write.number;
        let messages = std::mem::take(&mut write.messages_after_persist);
        self.write_records(write, usize::MAX);
        self.outbox.extend(messages); // durable now: what acknowledges it may go
        self.raw.on_persisted(number);
    }

    pub fn persist_all(&mut self) {
        while self.has_unpersisted() {
            self.persist_one();
        }
        self.process_ready(false);
    }

    /// Writes a write's records (snapshot, entries, hard state) to storage, at most `record_limit` of them.
    /// Returns how many were written.
    fn write_records(&mut self, write: PendingWrite, record_limit: usize) -> usize {
        let mut written = 0;
        if let Some(snapshot) = write.snapshot {
            if written == record_limit {
                return written;
            }
            self.machine.install(&snapshot);
            self.storage_mut().apply_snapshot(snapshot).expect("snapshot from the core is newer than storage");
            written += 1;
        }
        let entry_count = write.entries.len().min(record_limit - written);
        if entry_count > 0 {
            self.storage_mut().append(&write.entries[..entry_count]).expect("append");
            written += entry_count;
        }
        if entry_count < write.entries.len() {
            return written;
        }
        if let Some(hard_state) = write.hard_state {
            if written == record_limit {
                return written;
            }
            self.storage_mut().set_hard_state(hard_state);
            written += 1;
        }
        written
    }

    /// Total records in unsynced writes (what a crash may partially keep).
    pub fn unpersisted_record_count(&self) -> usize {
        self.unpersisted
            .iter()
            .map(|w| w.snapshot.is_some() as usize + w.entries.len() + w.hard_state.is_some() as usize)
            .sum()
    }

    /// Crash and restart: the first `surviving_records` of the unsynced record stream reach the disk (a torn
    /// write keeps a prefix), the rest and all volatile state are lost. The replica restarts from storage, with
    /// its state machine rebuilt from the storage's snapshot (committed entries after it are applied again).
    pub fn crash_and_restart(&mut self, surviving_records: usize) -> Result<()> {
        let mut budget = surviving_records;
        while budget > 0 {
            let Some(write) = self.unpersisted.pop_front() else { break };
            budget -= self.write_records(write, budget);
        }
        let storage = self.storage().clone();
        *self = SimNode::new(self.config.clone(), storage)?;
        Ok(())
    }

    /// Takes a snapshot of the state machine at its applied index and compacts the log up to `compact_index`
    /// (at most the snapshot's index). Only what is durable is compacted.
    pub fn snapshot_and_compact(&mut self, compact_index: u64) {
        let applied = self.machine.applied_index;
        let storage_last = flotilla_raft::Storage::last_index(self.storage()).expect("last index");
        let storage_first = flotilla_raft::Storage::first_index(self.storage()).expect("first index");
        if applied < storage_first || applied > storage_last {
            return;
        }
        let data = self.machine.snapshot_data();
        let conf_state = self.machine.conf_state.clone();
        let _ = self.storage_mut().create_snapshot(applied, conf_state, data);
        let compact_index = compact_index.min(applied);
        if compact_index > storage_first {
            self.storage_mut().compact(compact_index).expect("compact below applied");
        }
    }

    pub fn take_outbox(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    pub fn role(&self) -> StateRole {
        self.raw.raft.role
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn committed(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }
}
