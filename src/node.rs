//! One in-process node of the embedded database: its engines (WAL, state machine, flusher) and its running store,
//! opened and stopped in one place. What opening checks: a state file a failure marked is verified whole first
//! (`CHECK-STATE`), a WAL that vanished under a state file listing groups is refused, and the groups are created
//! at the first open (the initial layout, stored durably) and read back after.

use std::path::Path;
use std::sync::Arc;

use flotilla_engine::disk::Disk;
use flotilla_engine::flusher::BackgroundFlusher;
use flotilla_engine::log_engine::LogEngine;
use flotilla_engine::state_machine::{StateMachine, StateMachineOptions};
use flotilla_engine::wal::group_commit::{GroupCommitOptions, GroupCommitWal};
use flotilla_engine::wal::Wal;
use flotilla_raftstore::range::{initial_layout, initial_ranges, RangeDescriptor, Replica};
use flotilla_raftstore::store::{Store, StoreOptions, Transport};

use crate::db::{storage, Config, DbError};
use crate::layout::Layout;

/// In a node's directory while its state file must be verified at the next open (the node stopped on a failure).
const CHECK_FILE: &str = "CHECK-STATE";

/// One in-process node: its engines and its running store.
pub(crate) struct Node {
    pub(crate) id: u64,
    pub(crate) store: Option<Store>,
    pub(crate) log: Arc<GroupCommitWal>,
    pub(crate) kv: Arc<StateMachine>,
    pub(crate) flusher: Arc<BackgroundFlusher>,
}

impl Node {
    /// The running store (a node's store runs from open until close).
    pub(crate) fn store(&self) -> &Store {
        self.store.as_ref().expect("a node's store runs until the database closes")
    }

    /// Stops the node for an engine failure met outside its replicas; the error to answer with.
    pub(crate) fn fail(&self, reason: String) -> DbError {
        if let Some(store) = &self.store {
            store.fail(reason.clone());
        }
        DbError::Storage(format!("node {} stopped: {reason}", self.id))
    }

    /// Opens node `id` in `dir`: its state file (verified first if a failure marked it), its WAL (refused if
    /// lost), its groups (created at the first open as `bootstrap`'s layout says; a node that joined a running
    /// cluster, `None`, gets its replicas from the others instead) and its store; returns it with the ranges it stores (those it holds and those it left; not those merged away).
    pub(crate) fn open(
        id: u64,
        disk: &Arc<dyn Disk>,
        dir: &Path,
        config: &Config,
        transport: Arc<dyn Transport>,
        bootstrap: Option<&Layout>,
    ) -> Result<(Node, Vec<RangeDescriptor>), DbError> {
        // Every directory entry is made durable before anything is acknowledged: the directories as they are
        // created, the WAL's segments by the WAL, the state file here.
        disk.create_dir_all(dir).map_err(storage)?;
        // After the node stopped on a failure, the whole state file is verified before it is trusted again.
        let check_marker = dir.join(CHECK_FILE);
        let check = disk.list(dir).map_err(storage)?.contains(&check_marker);
        let options = StateMachineOptions {
            check_integrity_on_open: check || config.state_machine.check_integrity_on_open,
            ..config.state_machine.clone()
        };
        let kv = Arc::new(StateMachine::open_on(disk.as_ref(), &dir.join("state.redb"), options).map_err(storage)?);
        if check {
            disk.remove(&check_marker).map_err(storage)?;
        }
        disk.sync_dir(dir).map_err(|e| storage(format!("syncing {}: {e}", dir.display())))?;
        let wal_dir = dir.join("wal");
        // The WAL's first segment is durable before the groups are recorded in the state file: groups without a
        // WAL mean the WAL was lost, with every write after the last checkpoint.
        let has_segments =
            disk.list(&wal_dir).is_ok_and(|files| files.iter().any(|f| f.extension().is_some_and(|e| e == "wal")));
        if !has_segments && !kv.ranges().map_err(storage)?.is_empty() {
            return Err(DbError::Storage(format!(
                "{} holds no WAL segment, but {} lists groups: the WAL was lost, and with it the writes after the state \
                 file's last checkpoint",
                wal_dir.display(),
                dir.join("state.redb").display()
            )));
        }
        let (wal, _report) = Wal::open(&wal_dir, Arc::clone(disk), config.wal.clone()).map_err(storage)?;
        let log = Arc::new(GroupCommitWal::start(wal, GroupCommitOptions::default()));
        let flusher = Arc::new(BackgroundFlusher::start(Arc::clone(&kv)));
        let ranges = load_or_create_ranges(&kv, config, bootstrap)?;
        let options = StoreOptions { node_id: id, ..config.store.clone() };
        let store = Store::start(
            options,
            &ranges,
            Arc::clone(&log) as Arc<dyn LogEngine>,
            Arc::clone(&kv) as Arc<dyn flotilla_engine::contract::KvEngine>,
            Arc::clone(&flusher) as Arc<dyn flotilla_engine::flusher::Checkpointer>,
            transport,
        )
        .map_err(storage)?;
        {
            // A failure leaves a mark, so that the next open verifies the state file first (best effort: the disk
            // may be what failed).
            let (disk, dir) = (Arc::clone(disk), dir.to_path_buf());
            store.on_failure(Box::new(move |_| {
                if let Ok(mut file) = disk.open(&dir.join(CHECK_FILE), true) {
                    let _ = file.sync_data().and_then(|()| disk.sync_dir(&dir));
                }
            }));
        }
        // Not the records of groups a merge ended here: their keys are the merged group's.
        let held = ranges.into_iter().filter(|range| range.merged_into == 0).collect();
        Ok((Node { id, store: Some(store), log, kv, flusher }, held))
    }

    /// Stops the node's replicas; `Err` if the node had stopped on a failure.
    pub(crate) fn stop(&mut self) -> Result<(), DbError> {
        match self.store.take().and_then(|store| store.failure()) {
            Some(reason) => Err(DbError::Storage(format!("node {} stopped: {reason}", self.id))),
            None => Ok(()),
        }
    }

    /// After `stop`: reports a failed log; makes everything applied durable if `flush` (nothing is written after a
    /// failure).
    pub(crate) fn finish(&self, flush: bool) -> Result<(), DbError> {
        if let Some(reason) = self.log.failure() {
            return Err(DbError::Storage(format!("node {}: {reason}", self.id)));
        }
        if flush {
            self.flusher.flush_now().map_err(storage)?;
        }
        Ok(())
    }
}

/// The node's ranges: those its state file stores, or, at the first open of a node that bootstraps, the initial
/// layout (stored durably): `config.groups` ranges over the users' keys, and the meta range (the meta group's
/// first data, its table of the initial ranges, is written as it bootstraps: `peer::prepare_groups`) — or, in
/// a database of format 1, ranges over every key and no meta range.
fn load_or_create_ranges(
    kv: &StateMachine,
    config: &Config,
    bootstrap: Option<&Layout>,
) -> Result<Vec<RangeDescriptor>, DbError> {
    let mut ranges = stored_ranges(kv)?;
    if let (true, Some(layout)) = (ranges.is_empty(), bootstrap) {
        let replicas: Vec<Replica> = (1..=config.nodes).map(|id| Replica::voter(id, id)).collect();
        ranges = match layout.has_meta_range() {
            true => initial_layout(config.groups, &replicas),
            false => initial_ranges(config.groups, 1, &replicas),
        };
        let encoded: Vec<(u64, Vec<u8>)> = ranges.iter().map(|range| (range.group_id, range.encode())).collect();
        kv.put_ranges(&encoded).map_err(storage)?;
    }
    ranges.sort_by(|a, b| a.start.cmp(&b.start));
    Ok(ranges)
}

/// The ranges the state file stores but the records of groups a merge ended here (their keys are the merged
/// group's): what routing learns from.
pub(crate) fn routable_ranges(kv: &StateMachine) -> Result<Vec<RangeDescriptor>, DbError> {
    let mut ranges = stored_ranges(kv)?;
    ranges.retain(|range| range.merged_into == 0);
    Ok(ranges)
}

/// Every range descriptor the state file stores (the groups this node holds, and those it left), as last applied.
pub(crate) fn stored_ranges(kv: &StateMachine) -> Result<Vec<RangeDescriptor>, DbError> {
    let stored = kv.ranges().map_err(storage)?;
    let decode = |(group_id, bytes): (u64, Vec<u8>)| {
        RangeDescriptor::decode_stored(&bytes).map_err(|e| storage(format!("range of group {group_id}: {e}")))
    };
    stored.into_iter().map(decode).collect()
}
