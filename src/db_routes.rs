//! The embedded `Db`'s routing table as it stands ([`DbRoutes`]): the ranges with the node believed to lead each
//! (`router/src/route.rs`), and each group's published local-read grant on every node. A request takes the whole
//! table once per attempt (an `Arc`), so that the range, the group and the grants it routes by belong together;
//! after a split the table is rebuilt from the ranges the nodes store and swapped in whole.

use std::path::Path;
use std::sync::Arc;

use flotilla_engine::disk::Disk;
use flotilla_engine::state_machine::StateMachine;

use flotilla_raftstore::command::Command;
use flotilla_raftstore::range::RangeDescriptor;
use flotilla_raftstore::store::local_reader::ReadLease;
use flotilla_raftstore::store::ReadRequest;
use flotilla_router::route::RangeTable;

use crate::db::{storage, DbError};
use crate::node::Node;

pub(crate) struct DbRoutes {
    pub(crate) table: RangeTable,
    /// Per range (the table's positions), per node (1-based id − 1): the group's grant there.
    leases: Vec<Vec<Arc<ReadLease>>>,
}

impl DbRoutes {
    pub(crate) fn new(table: RangeTable, nodes: &[Node]) -> DbRoutes {
        let leases = (table.ranges().iter())
            .map(|range| nodes.iter().map(|node| node.store().local_reader().lease(range.group_id)).collect())
            .collect();
        DbRoutes { table, leases }
    }

    /// The routes the nodes' stored ranges give now (a split applied since `self` was made: every node's ranges
    /// learned, `RangeTable::learned`, as a server learns its own), keeping the leader hints of the groups `self`
    /// knows.
    pub(crate) fn rebuilt(&self, nodes: &[Node]) -> Result<DbRoutes, DbError> {
        let views = nodes.iter().map(held_ranges).collect::<Result<Vec<_>, _>>()?;
        Ok(DbRoutes::new(self.table.learned(views.into_iter().flatten()), nodes))
    }

    /// The grant of the group at `position` on node `node` (1-based).
    pub(crate) fn lease(&self, position: usize, node: u64) -> &ReadLease {
        &self.leases[position][node as usize - 1]
    }

    /// The range position of `command`'s keys. The write goes without an epoch: the group checks its keys where
    /// it applies (`RangeDescriptor::check`), which is all a write needs — a range's version also moves when
    /// its keys stay (a split's left part, a merge's lock and commit of the left range), and a write routed with
    /// the older version would be refused after a whole log round, though it applies where it was sent.
    pub(crate) fn route_write(&self, command: &Command) -> Result<usize, DbError> {
        Ok(self.table.batch_position(command.ops.iter().map(|op| op.key.as_slice()))?)
    }

    /// The replica's part of a scan of `[start, end)` at range `position`, routed with the range's epoch (refused
    /// if the range changed since: its part would not be the one this table expects).
    pub(crate) fn scan_request(&self, position: usize, start: &[u8], end: &[u8], limit: usize) -> ReadRequest {
        let epoch = Some(self.table.range(position).epoch());
        ReadRequest::Scan { start: start.to_vec(), end: end.to_vec(), limit, epoch }
    }
}

/// The ranges node `node` holds a replica of, as it last applied them.
fn held_ranges(node: &Node) -> Result<Vec<RangeDescriptor>, DbError> {
    let mut ranges = crate::node::stored_ranges(&node.kv)?;
    ranges.retain(|range| range.lists_node(node.id));
    Ok(ranges)
}

/// The file where the ids splits have taken are recorded, in the database's directory.
pub(crate) const IDS_FILE: &str = "SPLIT-IDS";

/// Takes a group id and `replicas` replica ids for a split, never one taken before: past the ids the nodes' stored
/// ranges use and past those recorded in [`IDS_FILE`], which records these before the split is proposed. (A split
/// whose state a crash lost before the state file's checkpoint is applied again from its group's log at the next
/// open, under the ids it had: ids counted only from the stored ranges could be handed out again meanwhile.)
pub(crate) fn take_ids(
    disk: &dyn Disk,
    dir: &Path,
    kvs: &[Arc<StateMachine>],
    replicas: usize,
) -> Result<(u64, u64), DbError> {
    take_ids_above(disk, dir, next_ids(kvs)?, replicas)
}

/// Takes a group id and `replicas` replica ids, at or above `floor` (group, replica) and past those recorded in
/// [`IDS_FILE`] in `dir`, recording the next ones there durably before returning.
pub(crate) fn take_ids_above(
    disk: &dyn Disk,
    dir: &Path,
    floor: (u64, u64),
    replicas: usize,
) -> Result<(u64, u64), DbError> {
    let (mut group_id, mut replica_id) = floor;
    let path = dir.join(IDS_FILE);
    if disk.list(dir).map_err(storage)?.contains(&path) {
        let bytes = crate::layout::read_file(disk, &path, 64)?;
        let damaged = || DbError::Storage(format!("{} is damaged", path.display()));
        let (checksum, ids) = bytes.split_at_checked(4).ok_or_else(damaged)?;
        if crc32c::crc32c(ids).to_le_bytes() != checksum || ids.len() != 16 {
            return Err(damaged());
        }
        let recorded = |at: usize| u64::from_le_bytes(ids[at..at + 8].try_into().expect("8 bytes"));
        group_id = group_id.max(recorded(0));
        replica_id = replica_id.max(recorded(8));
    }
    let next = [(group_id + 1).to_le_bytes(), (replica_id + replicas as u64).to_le_bytes()].concat();
    let file = [crc32c::crc32c(&next).to_le_bytes().as_slice(), &next].concat();
    crate::layout::write_durably(disk, dir, IDS_FILE, &file)?;
    Ok((group_id, replica_id))
}

/// The next unused group id and replica id among every range the nodes store (a node keeps the descriptor of a
/// group it left, so ids once used stay counted).
fn next_ids(kvs: &[Arc<StateMachine>]) -> Result<(u64, u64), DbError> {
    let (mut group_id, mut replica_id) = (0, 0);
    for kv in kvs {
        for range in crate::node::stored_ranges(kv)? {
            group_id = group_id.max(range.group_id);
            replica_id = range.replicas.iter().map(|r| r.replica_id).fold(replica_id, u64::max);
        }
    }
    Ok((group_id + 1, replica_id + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_engine::disk::SimDisk;

    #[test]
    fn split_ids_are_recorded_before_use_and_never_handed_out_twice() {
        let disk = SimDisk::new();
        let dir = Path::new("/db");
        disk.create_dir_all(dir).unwrap();
        assert_eq!(take_ids(&disk, dir, &[], 3).unwrap(), (1, 1));
        assert_eq!(take_ids(&disk, dir, &[], 3).unwrap(), (2, 4), "past what the file records");
        assert_eq!(take_ids(&disk, dir, &[], 1).unwrap(), (3, 7));
        // Damage is refused, not read as "no ids taken".
        let mut file = disk.open(&dir.join(IDS_FILE), false).unwrap();
        file.write_at(5, &[0xff]).unwrap();
        assert!(matches!(take_ids(&disk, dir, &[], 1), Err(DbError::Storage(_))));
    }
}
