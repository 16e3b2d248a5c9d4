//! [`PeerStorage`]: the Raft core's read-only [`Storage`] for one group, answered by the node's shared log
//! ([`LogEngine`]) plus what the peer knows of its configuration and of the latest snapshot it can serve.
//!
//! The core never writes through it: the peer submits a Ready's writes to the log engine and reports them with
//! `on_persisted`. Snapshot *data* never goes through the core either: `snapshot()` answers metadata only — the
//! log's compaction point, which the state machine holds durably — and the peer streams the range itself, in
//! chunks, from the state machine's view at or after that point, with that view's index and term
//! (`peer/snapshot.rs`).

use std::sync::Arc;

use flotilla_engine::contract::LogEngine;
use flotilla_raft::{ConfState, Entry, Snapshot, SnapshotMetadata, StorageError};
use flotilla_raft::{InitialState, Storage, StorageResult};

pub struct PeerStorage {
    group_id: u64,
    log: Arc<dyn LogEngine>,
    /// The configuration as of the applied index the replica opened at (the core reads it once, at start; later
    /// changes live in the core and in the stored descriptor, which the next open reads).
    conf_state: ConfState,
}

impl PeerStorage {
    pub fn new(group_id: u64, log: Arc<dyn LogEngine>, conf_state: ConfState) -> PeerStorage {
        PeerStorage { group_id, log, conf_state }
    }

    pub fn group_id(&self) -> u64 {
        self.group_id
    }

    /// The node's log this storage reads.
    pub fn log(&self) -> &dyn LogEngine {
        self.log.as_ref()
    }
}

impl Storage for PeerStorage {
    fn initial_state(&self) -> StorageResult<InitialState> {
        Ok(InitialState { hard_state: self.log.hard_state(self.group_id), conf_state: self.conf_state.clone() })
    }

    fn entries(&self, low: u64, high: u64, max_bytes: u64) -> StorageResult<Vec<Entry>> {
        let (first, last) = (self.log.first_index(self.group_id), self.log.last_index(self.group_id));
        if low < first {
            return Err(StorageError::Compacted);
        }
        if high > last + 1 || low > high {
            return Err(StorageError::Unavailable);
        }
        if low == high {
            return Ok(Vec::new());
        }
        // A failure to read what the index says is there is the disk's (a broken environment).
        self.log.entries(self.group_id, low, high, max_bytes).map_err(|e| StorageError::Other(e.to_string()))
    }

    fn term(&self, index: u64) -> StorageResult<u64> {
        match self.log.term(self.group_id, index) {
            Some(term) => Ok(term),
            None if index + 1 < self.log.first_index(self.group_id) => Err(StorageError::Compacted),
            None => Err(StorageError::Unavailable),
        }
    }

    fn first_index(&self) -> StorageResult<u64> {
        Ok(self.log.first_index(self.group_id))
    }

    fn last_index(&self) -> StorageResult<u64> {
        Ok(self.log.last_index(self.group_id))
    }

    /// The compaction point: the state machine holds everything up to it durably (the log is compacted only
    /// below that), so a snapshot at or after it can always be streamed.
    fn snapshot(&self, request_index: u64) -> StorageResult<Snapshot> {
        let index = self.log.first_index(self.group_id) - 1;
        if index == 0 || index < request_index {
            return Err(StorageError::SnapshotTemporarilyUnavailable);
        }
        let term = self.term(index)?;
        let metadata = SnapshotMetadata { index, term, conf_state: Some(self.conf_state.clone()) };
        Ok(Snapshot { metadata: Some(metadata), data: Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use crossbeam_channel::unbounded;
    use flotilla_engine::contract::{LogOp, WriteRequest};
    use flotilla_engine::log_engine::MemLogEngine;
    use flotilla_raft::HardState;
    use flotilla_raft::MemStorage;

    use super::*;

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|index| Entry { index, term, data: Bytes::from(vec![b'x'; 10]), ..Default::default() }).collect()
    }

    /// The same history through the log engine and through `MemStorage`: every question gets the same answer.
    #[test]
    fn answers_like_mem_storage_for_the_same_history() {
        let log: Arc<dyn LogEngine> = Arc::new(MemLogEngine::new());
        let voters = ConfState { voters: vec![1, 2, 3], ..Default::default() };
        let storage = PeerStorage::new(7, Arc::clone(&log), voters.clone());
        let mut model = MemStorage::new_with_voters(&[1, 2, 3]);
        let (reply, _persisted) = unbounded();
        let write = |ops: Vec<LogOp>| log.submit(WriteRequest::new(7, 1, ops, reply.clone())).unwrap();
        write(vec![LogOp::Append(entries(1..=8, 1)), LogOp::HardState(HardState { term: 2, vote: 1, commit: 5 })]);
        model.append(&entries(1..=8, 1)).unwrap();
        model.set_hard_state(HardState { term: 2, vote: 1, commit: 5 });
        // A conflicting suffix replaced, then a compaction.
        write(vec![LogOp::Append(entries(6..=9, 2))]);
        model.append(&entries(6..=9, 2)).unwrap();
        write(vec![LogOp::Compact { first_kept_index: 4, base_term: 1 }]);
        model.compact(3).unwrap();
        assert_eq!(storage.initial_state().unwrap(), model.initial_state().unwrap());
        assert_eq!((storage.first_index(), storage.last_index()), (model.first_index(), model.last_index()));
        for index in 0..=11 {
            assert_eq!(storage.term(index), model.term(index), "term({index})");
        }
        for low in 1..=10 {
            for high in low..=11 {
                for max_bytes in [0, 40, u64::MAX] {
                    let (ours, theirs) = (storage.entries(low, high, max_bytes), model.entries(low, high, max_bytes));
                    match (&ours, &theirs) {
                        (Ok(a), Ok(b)) => assert_eq!(a, b, "entries({low}, {high}, {max_bytes})"),
                        _ => assert_eq!(
                            ours.is_err(),
                            theirs.is_err(),
                            "entries({low}, {high}, {max_bytes}): {ours:?} vs {theirs:?}"
                        ),
                    }
                }
            }
        }
    }

    #[test]
    fn snapshots_are_metadata_at_the_compaction_point() {
        let log: Arc<dyn LogEngine> = Arc::new(MemLogEngine::new());
        let voters = ConfState { voters: vec![1], ..Default::default() };
        let storage = PeerStorage::new(1, Arc::clone(&log), voters.clone());
        assert_eq!(storage.snapshot(0), Err(StorageError::SnapshotTemporarilyUnavailable), "nothing compacted yet");
        let (reply, _persisted) = unbounded();
        let write = |ops: Vec<LogOp>| log.submit(WriteRequest::new(1, 1, ops, reply.clone())).unwrap();
        write(vec![LogOp::Append(entries(1..=12, 3))]);
        write(vec![LogOp::Compact { first_kept_index: 11, base_term: 3 }]);
        let metadata = SnapshotMetadata { index: 10, term: 3, conf_state: Some(voters) };
        assert_eq!(storage.snapshot(8).unwrap().metadata, Some(metadata));
        assert_eq!(storage.snapshot(11), Err(StorageError::SnapshotTemporarilyUnavailable));
    }
}
