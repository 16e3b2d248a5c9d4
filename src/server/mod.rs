//! `flotilla serve`: one node of a cluster in a process of its own — its engines and store (`node.rs`, as the
//! embedded `Db` opens them), the TCP transport to the other nodes (`router/src/transport/`), and a RESP front end
//! that serves any key on any node (requests for groups led elsewhere are forwarded, `requests.rs`).
//!
//! - `requests.rs`: routing a request to its group's leader — this node's store, or forwarded to another node;
//! - `resp_server.rs`: RESP connections and commands;
//! - `config.rs`: `flotilla serve`'s flags and TOML file, resolved into [`ServeOptions`];
//! - `join.rs`: a node joining a running cluster (`--join`), and the `JOIN` it asks a running node;
//! - `http.rs`: the HTTP front end (the demo's `/get` and `/set`, a JSON API, `/status`, `/metrics`);
//! - this file: [`ServeOptions`] and [`Server`] (start, addresses, shutdown).
//!
//! The cluster is created by its first nodes (`--cluster 1=addr,2=addr,3=addr`): they are numbered 1..=n, and
//! each holds a voting replica of every group; group `i`'s first leader is node `i mod n + 1`. More nodes join
//! later (`--join`, `join.rs`) with a learner replica of every group. A node restarted with the same command
//! reopens its data (its directory's `LAYOUT` must match the cluster's size and groups; a joined node's `JOINED`
//! says who it is).

pub mod config;
mod http;
pub mod join;
mod put_combiner;
pub mod requests;
mod resp_server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_engine::disk::{Disk, StdDisk};
use flotilla_engine::state_machine::StateMachineOptions;
use flotilla_raftstore::store::mailboxes;
use flotilla_raftstore::store::Transport;
use flotilla_router::transport::{NodeEvent, TcpTransport, TcpTransportOptions};

pub use resp_server::RespOptions;

use crate::db::{Config, DbError};
use crate::layout::{self, DirLock};
use crate::node::Node;
use crate::splitter::Splitter;
use flotilla_raftstore::split_trigger::AskReason;
use flotilla_raftstore::split_trigger::SplitOptions;
use requests::{Forwarded, Requests};

/// Settings of one server node.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// This node's id: a key of `cluster` (a joining node's comes from the cluster).
    pub node_id: u64,
    /// Where the node keeps its data (created at the first start).
    pub data_dir: PathBuf,
    /// Nodes of another cluster are refused. Default `flotilla`.
    pub cluster_id: String,
    /// Every node the cluster was created with, numbered 1..=n, and the address it listens on for the other
    /// nodes (empty for a joining node).
    pub cluster: BTreeMap<u64, String>,
    /// The RESP address of a running node of the cluster to join (then `raft_addr` is required, and `node_id` and
    /// `cluster` come from the cluster). Ignored once the node has joined (its data directory says who it is).
    pub join: Option<String>,
    /// Where this node listens for the other nodes, if not at its address in `cluster` (behind a proxy or a
    /// NAT). Default none.
    pub raft_addr: Option<String>,
    /// Where this node serves RESP (Redis protocol) clients.
    pub resp_addr: String,
    /// Where this node serves HTTP (none: no HTTP).
    pub http_addr: Option<String>,
    /// Largest HTTP request body accepted. Default 16 MiB.
    pub http_body_bytes_max: usize,
    /// Groups the key space is split into when the cluster is created. Default 64.
    pub groups: u64,
    /// How long a request may take (following leaders, waiting for a majority) before it fails. Default 10 s.
    pub request_timeout: Duration,
    /// The store's tick: elections come after 10–20 ticks without a leader, heartbeats every tick, leases last
    /// 8. Default 50 ms: a failed leader is replaced in about 0.6 s (`failover-bench`, docs/benchmarks.md).
    pub tick_interval: Duration,
    /// Threads running the replicas (the store's pollers). Default 2.
    pub pollers: usize,
    /// Threads serving the network: clients (RESP, forwarding) and the other nodes. Default 2. (HTTP has a thread
    /// of its own.)
    pub net_threads: usize,
    /// When ranges split on their own (`raftstore::split_trigger`): by size (default over 64 MiB) and by load
    /// (default a range's leader taking over 2,500 requests a second for 10 s in a row; its windows are one
    /// second whatever the tick). The splits are proposed by this node's splitter, as `flotilla split` does.
    pub split: SplitOptions,
    /// How long a range must stay cold (no request at all) before it is measured for a merge
    /// (`SplitOptions::merge_cold_ticks`, in time). Default 60 s.
    pub merge_cold_wait: Duration,
    pub resp: RespOptions,
    /// The state machine's memtable, page cache and read cache (`StateMachineOptions`; its defaults).
    pub state_machine: StateMachineOptions,
}

impl ServeOptions {
    /// The defaults for node `node_id` of `cluster`, keeping its data in `data_dir` and serving RESP at
    /// `resp_addr`.
    pub fn new(node_id: u64, data_dir: PathBuf, cluster: BTreeMap<u64, String>, resp_addr: String) -> ServeOptions {
        ServeOptions {
            node_id,
            data_dir,
            cluster_id: "flotilla".into(),
            cluster,
            join: None,
            raft_addr: None,
            resp_addr,
            http_addr: None,
            http_body_bytes_max: 16 << 20,
            groups: 64,
            request_timeout: Duration::from_secs(10),
            tick_interval: Duration::from_millis(50),
            pollers: 2,
            net_threads: 2,
            split: SplitOptions::default(),
            merge_cold_wait: Duration::from_secs(60),
            resp: RespOptions::default(),
            state_machine: StateMachineOptions::default(),
        }
    }

    fn validate(&self) -> Result<u64, DbError> {
        let nodes = self.cluster.len() as u64;
        let numbered = self.cluster.keys().copied().eq(1..=nodes);
        if nodes == 0 || !numbered {
            return Err(DbError::InvalidArgument(format!(
                "the cluster's nodes must be numbered 1..=n, not {:?}",
                self.cluster.keys().collect::<Vec<_>>()
            )));
        }
        if !self.cluster.contains_key(&self.node_id) {
            return Err(DbError::InvalidArgument(format!("node {} is not in the cluster", self.node_id)));
        }
        Ok(nodes)
    }
}

/// What `/status` reports: this node, the others (connected or not), and each group's range and the node
/// believed to lead it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    pub node_id: u64,
    pub raft_addr: String,
    pub resp_addr: String,
    pub nodes: Vec<NodeStatus>,
    pub groups: Vec<GroupStatus>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub addr: String,
    /// Where it serves RESP clients, once known (a node tells the others when it connects).
    pub resp_addr: Option<String>,
    /// This node's link to it is up (always true for this node itself).
    pub connected: bool,
    /// The node is in the meta range's node registry (as this node's replica of it shows).
    pub registered: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GroupStatus {
    pub group_id: u64,
    /// The range's bounds, in hex (`end` empty: to the end of the key space).
    pub start: String,
    pub end: String,
    /// The node believed to lead it (routing learns it from answers).
    pub leader: u64,
    /// Nodes holding a voting replica, and nodes holding a learner (a node that joined), as this node's replica
    /// of the group last applied (the cluster's first layout where this node holds none yet).
    pub replicas: Vec<u64>,
    pub learners: Vec<u64>,
}

/// The process's Prometheus recorder, installed by the first server (`None` if another recorder was installed).
fn prometheus() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().ok()).clone()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A running server node. [`Server::shutdown`] stops it cleanly; dropping it stops it too.
pub struct Server {
    node: Node,
    /// Stopped first: no split is proposed once the node stops.
    splitter: Splitter,
    requests: Arc<Requests>,
    resp_addr: SocketAddr,
    raft_addr: SocketAddr,
    /// Dropped before the node: no connection is served once the node stops.
    resp_task: tokio::task::JoinHandle<()>,
    http: Option<(actix_web::dev::ServerHandle, std::thread::JoinHandle<()>, SocketAddr)>,
    /// Its tasks end with the runtime.
    _transport: Arc<TcpTransport>,
    runtime: Option<tokio::runtime::Runtime>,
    _lock: DirLock,
}

impl Server {
    /// Opens the node's data (created at the first start; joining the cluster first with `--join`), connects it
    /// to the cluster and serves RESP.
    pub fn start(mut options: ServeOptions) -> Result<Server, DbError> {
        let disk: Arc<dyn Disk> = Arc::new(StdDisk);
        let dir = options.data_dir.clone();
        let lock = layout::lock(disk.as_ref(), &dir)?;
        let joined = joined(&mut options, disk.as_ref())?;
        let nodes = match &joined {
            Some(joined) => joined.bootstrap_nodes,
            None => options.validate()?,
        };
        let groups = joined.as_ref().map_or(options.groups, |joined| joined.ranges.len() as u64);
        let mut config = Config { nodes, groups, request_timeout: options.request_timeout, ..Config::default() };
        config.store.node_id = options.node_id;
        config.store.tick_interval = options.tick_interval;
        config.store.batch.pollers = options.pollers.max(1);
        config.store.split = options.split.clone();
        config.state_machine = options.state_machine.clone();
        if config.store.split.load_window_ticks > 0 {
            // One-second windows, whatever the tick.
            let ticks = Duration::from_secs(1).as_millis() / options.tick_interval.as_millis().max(1);
            config.store.split.load_window_ticks = ticks.max(1) as u32;
        }
        // Groups a split made have ids from node id × 2³² up (`Requests::split_request`): any below are the initial
        // layout's, never merged away on their own.
        config.store.split.initial_groups = u64::from(u32::MAX);
        // A range's cold wait before a merge in time, whatever the tick.
        let ticks = options.merge_cold_wait.as_millis() / options.tick_interval.as_millis().max(1);
        config.store.split.merge_cold_ticks = ticks.max(1) as u64;
        let (ask, asks) = crate::splitter::asks();
        config.store.range_asks = Some(ask);
        config.validate()?;
        let dir = &dir;
        let layout = layout::open(disk.as_ref(), dir, &config)?;
        // A joined node's cluster has a meta range if the ranges it was told include one.
        config.store.meta_range = match &joined {
            Some(joined) => joined.ranges.iter().any(|range| range.is_meta()),
            None => layout.has_meta_range(),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.net_threads.max(1))
            .thread_name("flotilla-net")
            .enable_all()
            .build()
            .map_err(|e| DbError::Storage(format!("starting the network runtime: {e}")))?;
        let resp_listener = std::net::TcpListener::bind(&options.resp_addr).map_err(|e| {
            DbError::InvalidArgument(format!("listening for RESP clients on {}: {e}", options.resp_addr))
        })?;
        let resp_addr = resp_listener.local_addr().map_err(|e| DbError::Storage(e.to_string()))?;
        let transport_options = TcpTransportOptions {
            bind_addr: options.raft_addr.clone(),
            client_addr: resp_addr.to_string(),
            // Node liveness in the store's ticks: a node is down after 10 silent ticks, an election timeout.
            heartbeat_interval: options.tick_interval,
            ..TcpTransportOptions::new(options.cluster_id.clone(), options.node_id, options.cluster.clone())
        };
        let raft_addr = transport_options.bind_addr.clone().unwrap_or_else(|| transport_options.listen_addr().into());
        let transport = TcpTransport::bind(transport_options, runtime.handle().clone())
            .map_err(|e| DbError::InvalidArgument(format!("listening for other nodes on {raft_addr}: {e}")))?;
        let raft_addr = transport.local_addr().expect("bound");
        let bootstrap = joined.is_none().then_some(&layout);
        let (node, held) =
            Node::open(options.node_id, &disk, dir, &config, Arc::clone(&transport) as Arc<dyn Transport>, bootstrap)?;
        // Nodes that joined after this one's list was made, as its stored descriptors record them — and as its
        // replica of the meta range's node registry does (a node registers itself once it runs).
        for replica in held.iter().flat_map(|range| &range.replicas).filter(|replica| !replica.addr.is_empty()) {
            transport.add_node(replica.node_id, &replica.addr);
        }
        let (start, end) = flotilla_raftstore::meta::registry_scan();
        let registered =
            node.kv.scan(&start, &end, usize::MAX).map(|entries| flotilla_raftstore::meta::nodes(&entries));
        for entry in registered.unwrap_or_default().iter().filter(|entry| !entry.raft_addr.is_empty()) {
            transport.add_node(entry.node_id, &entry.raft_addr);
        }
        // A joined node holds no ranges until snapshots come: it routes with the ranges the cluster told it.
        let ranges = joined.map_or(held, |joined| joined.ranges);
        let store = node.store();
        let requests = Arc::new(Requests::new(
            options.node_id,
            options.cluster_id.clone(),
            ranges,
            nodes,
            store.router().clone(),
            Arc::clone(store.local_reader()),
            Arc::clone(&node.kv),
            Arc::clone(&transport),
            config.clone(),
            (Arc::clone(&disk), dir.to_path_buf()),
        ));
        let router = store.router().clone();
        transport
            .start(
                store.inbox(),
                Box::new(move |event| match event {
                    NodeEvent::Down(node) => mailboxes::node_down(&router, node),
                    NodeEvent::Unreachable(node) => mailboxes::node_unreachable(&router, node),
                }),
                Some(Arc::new(Forwarded(Arc::clone(&requests)))),
            )
            .map_err(|e| DbError::Storage(format!("starting the transport: {e}")))?;
        // Leaders spread over the nodes: each group campaigns where routing first looks for its leader (a
        // restarted node's campaign is refused while the group's leader holds its lease).
        let routes = requests.table();
        let table = &routes.table;
        let led_here = (0..table.len()).filter(|&position| table.leader(position) == options.node_id);
        store.campaign_all(led_here.map(|position| table.range(position).group_id).collect::<Vec<_>>());
        let resp_task = {
            let _guard = runtime.enter();
            resp_listener.set_nonblocking(true).map_err(|e| DbError::Storage(e.to_string()))?;
            let listener =
                tokio::net::TcpListener::from_std(resp_listener).map_err(|e| DbError::Storage(e.to_string()))?;
            runtime.spawn(resp_server::serve(listener, Arc::clone(&requests), Arc::new(options.resp.clone())))
        };
        // This node in the meta range's node registry (in the background: the meta group may have no leader yet).
        runtime.spawn({
            let requests = Arc::clone(&requests);
            let entry = flotilla_raftstore::meta::NodeEntry {
                node_id: options.node_id,
                raft_addr: raft_addr.to_string(),
                client_addr: resp_addr.to_string(),
            };
            async move { requests.register(entry).await }
        });
        // The splits and merges the groups' leaders here ask for, proposed as `flotilla split` and `flotilla merge`
        // propose them (a triggered split is not sticky: the merge trigger may undo it).
        let splitter = {
            let (requests, runtime) = (Arc::clone(&requests), runtime.handle().clone());
            Splitter::start(asks, move |wanted| {
                match wanted.reason {
                    // A neighbour in a merge of its own (merges of cold ranges come in runs) is waited for, a while.
                    AskReason::Merge { .. } => {
                        for _ in 0..20 {
                            match runtime.block_on(requests.merge_left_stored(&wanted.range.start)) {
                                Err(flotilla_router::route::RouteError::Busy(_)) => {
                                    std::thread::sleep(Duration::from_millis(50))
                                }
                                _ => break,
                            }
                        }
                    }
                    AskReason::Size | AskReason::Load => {
                        let _ = runtime.block_on(requests.split_at_stored(&wanted.split_key, false));
                    }
                    AskReason::Publish => {
                        let _ = runtime.block_on(requests.publish(wanted.range));
                    }
                }
            })
        };
        let http = match &options.http_addr {
            None => None,
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|e| DbError::InvalidArgument(format!("listening for HTTP on {addr}: {e}")))?;
                let http_addr = listener.local_addr().map_err(|e| DbError::Storage(e.to_string()))?;
                let status = {
                    let (requests, transport) = (Arc::clone(&requests), Arc::clone(&transport));
                    let node_id = options.node_id;
                    Box::new(move || status_of(node_id, &requests, &transport, raft_addr, resp_addr))
                };
                let state = Arc::new(http::HttpState {
                    requests: Arc::clone(&requests),
                    status,
                    metrics: prometheus(),
                    scan_count_max: options.resp.scan_count_max,
                });
                let (handle, thread) = http::start(listener, state, options.http_body_bytes_max)
                    .map_err(|e| DbError::Storage(format!("starting HTTP: {e}")))?;
                Some((handle, thread, http_addr))
            }
        };
        Ok(Server {
            node,
            splitter,
            requests,
            resp_addr,
            raft_addr,
            resp_task,
            http,
            _transport: transport,
            runtime: Some(runtime),
            _lock: lock,
        })
    }

    /// Where it serves RESP clients (with the port the system chose, if the options said port 0).
    pub fn resp_addr(&self) -> SocketAddr {
        self.resp_addr
    }

    /// Where it listens for the other nodes.
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft_addr
    }

    /// Where it serves HTTP, if it does.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(_, _, addr)| *addr)
    }

    /// The node believed to lead each group, by range position.
    pub fn leaders(&self) -> Vec<u64> {
        self.requests.table().table.leaders()
    }

    /// Stops serving, stops the node's replicas and makes what they applied durable; `Err` if the node had
    /// stopped on a failure.
    pub fn shutdown(mut self) -> Result<(), DbError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), DbError> {
        self.splitter.stop();
        self.resp_task.abort();
        if let Some((handle, thread, _)) = self.http.take() {
            if let Some(runtime) = &self.runtime {
                runtime.block_on(handle.stop(true));
            }
            let _ = thread.join();
        }
        let stopped = self.node.stop();
        let finished = self.node.finish(stopped.is_ok());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
        stopped.and(finished)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.runtime.is_some() {
            let _ = self.stop();
        }
    }
}

/// Who a node that joined the cluster is: what its directory says, or — at its first start with `--join` — what
/// the cluster answers (stored before anything else is written); `None` for a node the cluster was created with.
/// Sets the options' id and nodes to it.
fn joined(options: &mut ServeOptions, disk: &dyn Disk) -> Result<Option<join::JoinedNode>, DbError> {
    let dir = &options.data_dir;
    let joined = match (join::stored(disk, dir)?, &options.join) {
        (Some(joined), _) => joined,
        (None, None) => return Ok(None),
        (None, Some(addr)) => {
            if !options.cluster.is_empty() {
                return Err(DbError::InvalidArgument("--join and --cluster exclude each other".into()));
            }
            let raft_addr = options.raft_addr.clone().ok_or_else(|| {
                DbError::InvalidArgument("--join needs --raft-addr: where the other nodes reach this one".into())
            })?;
            if !layout::is_empty(disk, dir)? {
                return Err(DbError::InvalidArgument(format!(
                    "{} holds data of another node: a joining node starts with an empty directory",
                    dir.display()
                )));
            }
            let password = options.resp.password.as_deref();
            let joined = join::ask(addr, password, &options.cluster_id, &raft_addr, options.request_timeout)?;
            join::store(disk, dir, &joined)?;
            joined
        }
    };
    if joined.cluster_id != options.cluster_id {
        return Err(DbError::InvalidArgument(format!(
            "{} joined cluster {:?}, not {:?}",
            dir.display(),
            joined.cluster_id,
            options.cluster_id
        )));
    }
    options.node_id = joined.node_id;
    options.cluster = joined.node_map();
    Ok(Some(joined))
}

/// This node's view of the cluster, for `/status`.
fn status_of(
    node_id: u64,
    requests: &Requests,
    transport: &TcpTransport,
    raft_addr: SocketAddr,
    resp_addr: SocketAddr,
) -> Status {
    let routes = requests.table();
    let table = &routes.table;
    let registry = requests.local_registry();
    let mut known = transport.nodes();
    for entry in &registry {
        known.entry(entry.node_id).or_insert_with(|| entry.raft_addr.clone());
    }
    let nodes = (known.into_iter())
        .map(|(id, addr)| NodeStatus {
            node_id: id,
            addr,
            resp_addr: transport.client_addr(id),
            connected: id == node_id || transport.is_connected(id),
            registered: registry.iter().any(|entry| entry.node_id == id),
        })
        .collect();
    let held = requests.descriptors();
    let groups = (0..table.len())
        .map(|position| {
            let range = table.range(position);
            let members = held.get(&range.group_id).map_or(&range.replicas, |held| &held.replicas);
            let nodes = |learner: bool| members.iter().filter(|r| r.learner == learner).map(|r| r.node_id).collect();
            GroupStatus {
                group_id: range.group_id,
                start: hex(&range.start),
                end: hex(&range.end),
                leader: table.leader(position),
                replicas: nodes(false),
                learners: nodes(true),
            }
        })
        .collect();
    Status { node_id, raft_addr: raft_addr.to_string(), resp_addr: resp_addr.to_string(), nodes, groups }
}
