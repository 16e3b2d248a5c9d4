//! Joining a running cluster: `flotilla serve --join ADDR --raft-addr HOST:PORT …` starts a node that gets an id
//! from the cluster and a learner replica of every group, filled by snapshot. (Moving replicas and leaders onto it
//! — promotion, balancing — is placement's work, a later issue; until then a joined node holds a copy of all data
//! and serves any key by forwarding to the leaders.)
//!
//! How, in order:
//! 1. The new node sends `JOIN cluster-id raft-addr` to any running node (`ADDR`, its RESP address; after `AUTH`
//!    if the cluster has a password). That node ([`join`]) picks the next free node id and adds a learner on it
//!    to the group of the first range — through that group's log, so that two joins never get the same id: a
//!    group lists a node once, and a membership change of an id already listed is refused (then the next id is
//!    tried). The added replica carries the new node's address (`Replica::addr`): descriptors are where the
//!    cluster records joined nodes, and every node's transport learns them as its replicas apply the change
//!    (`Transport::node_listed`; a restarted node reads them from its stored descriptors).
//! 2. The same node adds a learner on the new node to every other group, then answers with a [`JoinedNode`]: the
//!    id, the nodes and where they listen, and the ranges.
//! 3. The new node stores the answer durably (`JOINED` in its data directory) before it starts, and from then on
//!    a restart with the same command reads it and never joins again. Its replicas are created by the first
//!    messages of their groups' leaders and filled by snapshot.
//!
//! A join repeated with the same raft address (the new node stopped before it stored the answer) gets the same id
//! back and changes nothing: each step is idempotent.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flotilla_engine::disk::Disk;
use flotilla_raftstore::range::RangeDescriptor;
use flotilla_router::route::RouteError;
use prost::Message as _;

use super::requests::{Requests, Routes};
use crate::db::DbError;
use crate::layout;
use crate::resp::{encode_request, parse_reply, Reply};

/// In a joined node's data directory: what the cluster told it when it joined.
pub const JOINED_FILE: &str = "JOINED";
/// The largest `JOINED` file read (a cluster of many ranges); larger is damage.
const JOINED_BYTES_MAX: u64 = 64 << 20;

/// What a node that joined a running cluster knows of itself: the answer to its `JOIN`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JoinedNode {
    #[prost(uint64, tag = "1")]
    pub node_id: u64,
    #[prost(string, tag = "2")]
    pub cluster_id: String,
    /// Every node at the time of the join, this one included, and where it listens for the others.
    #[prost(message, repeated, tag = "3")]
    pub nodes: Vec<NodeAddr>,
    /// The nodes the cluster was created with (numbered `1..=n`): where group leaders are looked for.
    #[prost(uint64, tag = "4")]
    pub bootstrap_nodes: u64,
    /// The ranges in key order.
    #[prost(message, repeated, tag = "5")]
    pub ranges: Vec<RangeDescriptor>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeAddr {
    #[prost(uint64, tag = "1")]
    pub node_id: u64,
    #[prost(string, tag = "2")]
    pub addr: String,
}

impl JoinedNode {
    pub fn node_map(&self) -> BTreeMap<u64, String> {
        self.nodes.iter().map(|node| (node.node_id, node.addr.clone())).collect()
    }

    /// The file's bytes: a CRC-32C of the message, then the message.
    fn encode_file(&self) -> Vec<u8> {
        let message = self.encode_to_vec();
        [crc32c::crc32c(&message).to_le_bytes().as_slice(), &message].concat()
    }

    fn decode_file(bytes: &[u8]) -> Result<JoinedNode, String> {
        let (checksum, message) = bytes.split_at_checked(4).ok_or("too short")?;
        if crc32c::crc32c(message).to_le_bytes() != checksum {
            return Err("checksum mismatch".into());
        }
        JoinedNode::decode(message).map_err(|e| e.to_string())
    }
}

/// The identity a joined node stored in `dir`, if it joined a cluster.
pub fn stored(disk: &dyn Disk, dir: &Path) -> Result<Option<JoinedNode>, DbError> {
    let path = dir.join(JOINED_FILE);
    let files = disk.list(dir).map_err(|e| DbError::Storage(format!("listing {}: {e}", dir.display())))?;
    if !files.contains(&path) {
        return Ok(None);
    }
    let bytes = layout::read_file(disk, &path, JOINED_BYTES_MAX)?;
    JoinedNode::decode_file(&bytes)
        .map(Some)
        .map_err(|why| DbError::Storage(format!("{} is damaged: {why}", path.display())))
}

/// Records the answer to this node's join in `dir`, durably, before the node starts.
pub fn store(disk: &dyn Disk, dir: &Path, joined: &JoinedNode) -> Result<(), DbError> {
    layout::write_durably(disk, dir, JOINED_FILE, &joined.encode_file())
}

/// Asks the node serving RESP at `addr` to let this node (listening for the others at `raft_addr`) join;
/// retried while the cluster is busy or unreachable, until `timeout`.
pub fn ask(
    addr: &str,
    password: Option<&str>,
    cluster_id: &str,
    raft_addr: &str,
    timeout: Duration,
) -> Result<JoinedNode, DbError> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = (|| -> Result<Reply, String> {
            let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            if let Some(password) = password {
                if let Reply::Error(error) = call(&mut stream, &[b"AUTH", password.as_bytes()])? {
                    return Ok(Reply::Error(error));
                }
            }
            call(&mut stream, &[b"JOIN", cluster_id.as_bytes(), raft_addr.as_bytes()])
        })();
        let failure = match attempt {
            Ok(Reply::Bulk(bytes)) => {
                return JoinedNode::decode(bytes.as_slice())
                    .map_err(|e| DbError::Storage(format!("{addr} answered JOIN with an undecodable node: {e}")))
            }
            // Refused for good (another cluster, a bad password, an address taken): said at once.
            Ok(Reply::Error(error)) if !error.starts_with("TRYAGAIN") => {
                return Err(DbError::InvalidArgument(format!("{addr} refused the join: {error}")))
            }
            Ok(other) => format!("{other:?}"),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            return Err(DbError::Busy(format!("could not join the cluster through {addr} in {timeout:?}: {failure}")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One request and its reply on a blocking connection.
fn call(stream: &mut TcpStream, args: &[&[u8]]) -> Result<Reply, String> {
    let mut request = Vec::new();
    encode_request(args, &mut request);
    stream.write_all(&request).map_err(|e| e.to_string())?;
    let mut buffer = BytesMut::new();
    loop {
        if let Some(reply) = parse_reply(&mut buffer, JOINED_BYTES_MAX as usize).map_err(|e| e.0)? {
            return Ok(reply);
        }
        let mut chunk = [0; 16 << 10];
        match stream.read(&mut chunk).map_err(|e| e.to_string())? {
            0 => return Err("the connection closed".into()),
            read => buffer.extend_from_slice(&chunk[..read]),
        }
    }
}

/// Serves a `JOIN` (the steps in the module's doc): the new node's id, the nodes and the ranges.
pub async fn join(requests: &Requests, raft_addr: &str, deadline: Instant) -> Result<JoinedNode, RouteError> {
    if raft_addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(RouteError::InvalidArgument(format!("{raft_addr:?} is not an address (host:port)")));
    }
    // Every group of the table as it stands (a split meanwhile fails the join: it is tried again).
    let routes = requests.table();
    let node_id = loop {
        let nodes = requests.nodes();
        let known = nodes.iter().find(|(_, addr)| addr.as_str() == raft_addr).map(|(&id, _)| id);
        let node_id = known.unwrap_or_else(|| nodes.keys().max().copied().unwrap_or(0) + 1);
        match add_learner_until(requests, &routes, 0, node_id, raft_addr, deadline).await {
            Ok(()) => break node_id,
            // Another join took the id meanwhile: its node is listed now (or soon), the next id is tried.
            Err(RouteError::Membership(_)) if known.is_none() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => return Err(error),
        }
    };
    for position in 1..routes.table.len() {
        add_learner_until(requests, &routes, position, node_id, raft_addr, deadline).await?;
    }
    let mut nodes = requests.nodes();
    nodes.insert(node_id, raft_addr.to_string());
    Ok(JoinedNode {
        node_id,
        cluster_id: requests.cluster_id().to_string(),
        nodes: nodes.into_iter().map(|(node_id, addr)| NodeAddr { node_id, addr }).collect(),
        bootstrap_nodes: routes.table.nodes(),
        ranges: routes.table.ranges().to_vec(),
    })
}

/// Adds the learner to the group at `position`, waiting while another membership change is pending there.
async fn add_learner_until(
    requests: &Requests,
    routes: &Arc<Routes>,
    position: usize,
    node_id: u64,
    addr: &str,
    deadline: Instant,
) -> Result<(), RouteError> {
    loop {
        match requests.add_learner(routes, position, node_id, addr).await {
            Err(RouteError::Busy(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_joined_file_round_trips_and_damage_is_refused() {
        let joined = JoinedNode {
            node_id: 4,
            cluster_id: "c".into(),
            nodes: vec![NodeAddr { node_id: 1, addr: "127.0.0.1:7001".into() }],
            bootstrap_nodes: 3,
            ranges: vec![RangeDescriptor { group_id: 1, ..Default::default() }],
        };
        let bytes = joined.encode_file();
        assert_eq!(JoinedNode::decode_file(&bytes), Ok(joined));
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert!(JoinedNode::decode_file(&damaged).is_err(), "a flipped bit at {at} went unnoticed");
        }
        assert!(JoinedNode::decode_file(&bytes[..2]).is_err());
    }
}
