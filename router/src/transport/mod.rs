//! The node-to-node TCP transport: the messages of **all** groups between two nodes share one connection per
//! direction (each node dials every other for what it sends, and reads what the others dialed it with), in
//! length-prefixed, checksummed frames of prost batches (`docs/wire-format.md`). Runs on tokio.
//!
//! - `frame.rs`: the frame (length, CRC-32C, payload), its decoder's bounds;
//! - `wire.rs`: the prost messages — the handshake's hello and reply, and the batches;
//! - `link.rs`: one outbound link per other node — the bounded queue, and the writer task that dials (with
//!   backoff), says hello and writes one frame per drain;
//! - `inbound.rs`: the listener and the reader tasks — the handshake's checks, frames to the store's inbox;
//! - this file: [`TcpTransport`] (the raftstore's [`Transport`]: a poll round's envelopes for a node are queued
//!   together at its `flush` and travel as one frame) and node liveness (one heartbeat per node pair and
//!   interval; a node silent for `down_after_heartbeats` intervals is reported down to the store).

pub mod frame;
mod inbound;
mod link;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_raftstore::message::Envelope;
use flotilla_raftstore::store::liveness::{Liveness, NodeMessage};
use flotilla_raftstore::store::{StoreInbox, Transport};
use parking_lot::{Mutex, RwLock};

use link::Link;
use wire::WireEnvelope;

/// Settings of a node's transport.
#[derive(Clone, Debug)]
pub struct TcpTransportOptions {
    /// Connections from another cluster are refused (and ours by theirs).
    pub cluster_id: String,
    pub node_id: u64,
    /// Every node of the cluster, this one included: its id and the address the others reach it at.
    pub nodes: BTreeMap<u64, String>,
    /// Where this node listens, if not at its address in `nodes` (behind a proxy or a NAT). Default none.
    pub bind_addr: Option<String>,
    /// Where this node serves clients, told to the others in the hello (empty: nowhere). Default empty.
    pub client_addr: String,
    /// The largest frame accepted, in payload bytes; a larger one closes the connection. Default 64 MiB.
    pub frame_bytes_max: usize,
    /// Bytes of messages queued for one node at most (see `link.rs` for what is dropped). Default 32 MiB.
    pub queue_bytes_max: usize,
    /// Inbound connections at once at most (the cluster's nodes need one each). Default 256.
    pub connections_max: usize,
    /// The wait before dialing a node again, doubling per failure up to the max. Defaults 50 ms and 1 s.
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// How long a connect and its hello may take. Default 2 s.
    pub handshake_timeout: Duration,
    /// Node liveness: one heartbeat per node pair per interval (default 100 ms, the store's tick), and a node
    /// not heard from for `down_after_heartbeats` intervals (default 10) is reported down to the store.
    pub heartbeat_interval: Duration,
    pub down_after_heartbeats: u64,
}

impl TcpTransportOptions {
    /// The defaults, for node `node_id` of `cluster_id` made of `nodes`.
    pub fn new(cluster_id: impl Into<String>, node_id: u64, nodes: BTreeMap<u64, String>) -> TcpTransportOptions {
        TcpTransportOptions {
            cluster_id: cluster_id.into(),
            node_id,
            nodes,
            bind_addr: None,
            client_addr: String::new(),
            frame_bytes_max: 64 << 20,
            queue_bytes_max: 32 << 20,
            connections_max: 256,
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(100),
            down_after_heartbeats: 10,
        }
    }

    /// Where the other nodes reach this node (its entry in `nodes`).
    pub fn listen_addr(&self) -> &str {
        self.nodes.get(&self.node_id).map(String::as_str).unwrap_or_default()
    }
}

/// What the transport learns about another node, for the store (`Store::node_down`, `node_unreachable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// Node liveness: silent for `down_after_heartbeats` intervals (repeated every interval while it stays so).
    Down(u64),
    /// The connection to it was lost (once per loss).
    Unreachable(u64),
}

/// Where a node takes the client requests other nodes forward to it, and the answers to those it forwarded
/// (called on the transport's reader tasks: quick, never blocking).
pub trait ForwardHandler: Send + Sync {
    /// The requests of one frame, together (the handler may serve them on one task).
    fn on_requests(&self, from_node: u64, requests: Vec<wire::ForwardRequest>);
    fn on_reply(&self, from_node: u64, reply: wire::ForwardReply);
}

/// A node's transport: outbound links to every other node, and (once started) the listener.
pub struct TcpTransport {
    options: Arc<TcpTransportOptions>,
    /// Every node it knows and where it listens: the options' list, and the nodes that joined later
    /// ([`TcpTransport::add_node`]).
    addrs: Arc<RwLock<BTreeMap<u64, String>>>,
    links: Arc<RwLock<HashMap<u64, Arc<Link>>>>,
    /// Envelopes sent since the last flush, per node.
    pending: Mutex<HashMap<u64, Vec<WireEnvelope>>>,
    listener: Mutex<Option<std::net::TcpListener>>,
    runtime: tokio::runtime::Handle,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Where each other node serves clients, as its hello said.
    client_addrs: Arc<Mutex<HashMap<u64, String>>>,
    /// Node liveness, and the heartbeat intervals counted (its clock); set by `start`.
    liveness: std::sync::OnceLock<(Arc<Mutex<Liveness>>, Arc<AtomicU64>)>,
    /// Where links report their events; set by `start` (links added later need it).
    on_event: std::sync::OnceLock<Arc<dyn Fn(NodeEvent) + Send + Sync>>,
}

impl TcpTransport {
    /// Binds this node's listening address (an error if it cannot: taken, or not this machine's) and makes the
    /// links; nothing runs before [`TcpTransport::start`].
    pub fn bind(options: TcpTransportOptions, runtime: tokio::runtime::Handle) -> std::io::Result<Arc<TcpTransport>> {
        let addr = options.bind_addr.clone().unwrap_or_else(|| options.listen_addr().to_string());
        if addr.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("node {} has no address in the cluster's list", options.node_id),
            ));
        }
        let listener = std::net::TcpListener::bind(&addr)?;
        TcpTransport::with_listener(options, listener, runtime)
    }

    /// [`TcpTransport::bind`] with a listener already bound (tests bind every node's port first, then list them).
    pub fn with_listener(
        options: TcpTransportOptions,
        listener: std::net::TcpListener,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Arc<TcpTransport>> {
        listener.set_nonblocking(true)?;
        let links = (options.nodes.iter())
            .filter(|(&id, _)| id != options.node_id)
            .map(|(&id, addr)| (id, Arc::new(Link::new(id, addr.clone()))))
            .collect();
        Ok(Arc::new(TcpTransport {
            addrs: Arc::new(RwLock::new(options.nodes.clone())),
            options: Arc::new(options),
            links: Arc::new(RwLock::new(links)),
            pending: Mutex::default(),
            listener: Mutex::new(Some(listener)),
            runtime,
            tasks: Mutex::default(),
            client_addrs: Arc::default(),
            liveness: std::sync::OnceLock::new(),
            on_event: std::sync::OnceLock::new(),
        }))
    }

    /// The address it listens on (with the port the system chose, if the list said port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.lock().as_ref().and_then(|listener| listener.local_addr().ok())
    }

    /// Starts the listener (messages go to `inbox`), the links' writers and node liveness: `on_event` hears each
    /// node judged down and each lost connection (see [`NodeEvent`]; called on the transport's tasks: quick,
    /// never blocking).
    pub fn start(
        &self,
        inbox: StoreInbox,
        on_event: Box<dyn Fn(NodeEvent) + Send + Sync>,
        forwarded: Option<Arc<dyn ForwardHandler>>,
    ) -> std::io::Result<()> {
        let on_event: Arc<dyn Fn(NodeEvent) + Send + Sync> = Arc::from(on_event);
        let listener = self.listener.lock().take().expect("a transport starts once");
        let _guard = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let options = &self.options;
        // Held until the links run: a node added meanwhile (`add_node`) gets its writer started once.
        let mut tasks = self.tasks.lock();
        let _ = self.on_event.set(Arc::clone(&on_event));
        let peers: Vec<u64> = self.links.read().keys().copied().collect();
        let down_after = options.down_after_heartbeats;
        let liveness = Arc::new(Mutex::new(Liveness::new(options.node_id, peers, down_after, 0)));
        let heartbeats = Arc::new(AtomicU64::new(0));
        let _ = self.liveness.set((Arc::clone(&liveness), Arc::clone(&heartbeats)));
        let inbound = Arc::new(inbound::Inbound::new(
            Arc::clone(options),
            inbox,
            Arc::clone(&liveness),
            Arc::clone(&heartbeats),
            forwarded,
            Arc::clone(&self.client_addrs),
            Arc::clone(&self.addrs),
        ));
        tasks.push(self.runtime.spawn(inbound.accept(listener)));
        for link in self.links.read().values() {
            tasks.push(self.runtime.spawn(Arc::clone(link).run(Arc::clone(options), Arc::clone(&on_event))));
        }
        let links = Arc::clone(&self.links);
        let interval = options.heartbeat_interval;
        tasks.push(self.runtime.spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let now = heartbeats.fetch_add(1, Ordering::AcqRel) + 1;
                let (messages, down) = liveness.lock().tick(now);
                let links = links.read();
                for NodeMessage::Heartbeat { to_node, .. } in messages {
                    if let Some(link) = links.get(&to_node) {
                        link.heartbeat();
                    }
                }
                drop(links);
                for node in down {
                    on_event(NodeEvent::Down(node));
                }
            }
        }));
        Ok(())
    }

    /// Sends a client request to `node_id` (see [`ForwardHandler`]); false if it cannot go now (unreachable, or
    /// its queue full).
    pub fn forward(&self, node_id: u64, request: wire::ForwardRequest) -> bool {
        self.link(node_id).is_some_and(|link| link.push_request(request, self.options.queue_bytes_max))
    }

    /// Sends the answer to a request `node_id` forwarded here.
    pub fn reply(&self, node_id: u64, reply: wire::ForwardReply) {
        if let Some(link) = self.link(node_id) {
            link.push_reply(reply, self.options.queue_bytes_max);
        }
    }

    /// The runtime its tasks run on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Where node `node_id` serves clients (this node's own from the options; another's once it dialed here).
    pub fn client_addr(&self, node_id: u64) -> Option<String> {
        if node_id == self.options.node_id {
            return Some(self.options.client_addr.clone()).filter(|addr| !addr.is_empty());
        }
        self.client_addrs.lock().get(&node_id).cloned()
    }

    /// Whether `node_id` has been heard from lately (within `down_after_heartbeats` intervals): a node that is
    /// down, stopped or cut off is not worth sending a request to.
    pub fn is_alive(&self, node_id: u64) -> bool {
        self.liveness
            .get()
            .is_none_or(|(liveness, heartbeats)| !liveness.lock().is_down(node_id, heartbeats.load(Ordering::Acquire)))
    }

    /// Whether the link to `node_id` is connected now (its hello accepted).
    pub fn is_connected(&self, node_id: u64) -> bool {
        self.link(node_id).is_some_and(|link| link.is_connected())
    }

    fn link(&self, node_id: u64) -> Option<Arc<Link>> {
        self.links.read().get(&node_id).cloned()
    }

    /// Every node it knows, this one included, and where each listens.
    pub fn nodes(&self) -> BTreeMap<u64, String> {
        self.addrs.read().clone()
    }

    /// Adds node `node_id`, listening at `addr`, to the nodes it connects to and accepts (a node that joined the
    /// cluster after this one started): false, changing nothing, if it knows that node already.
    pub fn add_node(&self, node_id: u64, addr: &str) -> bool {
        let mut addrs = self.addrs.write();
        if node_id == self.options.node_id || addrs.contains_key(&node_id) {
            return false;
        }
        addrs.insert(node_id, addr.to_string());
        let link = Arc::new(Link::new(node_id, addr.to_string()));
        let mut tasks = self.tasks.lock();
        self.links.write().insert(node_id, Arc::clone(&link));
        // Before `start`, it starts the link with the others.
        if let (Some((liveness, heartbeats)), Some(on_event)) = (self.liveness.get(), self.on_event.get()) {
            liveness.lock().add_node(node_id, heartbeats.load(Ordering::Acquire));
            tasks.push(self.runtime.spawn(link.run(Arc::clone(&self.options), Arc::clone(on_event))));
        }
        eprintln!("flotilla: node {}: node {node_id} joined the cluster, at {addr}", self.options.node_id);
        true
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }
}

impl Transport for TcpTransport {
    fn send(&self, envelope: Envelope) {
        let to_node = envelope.to_node;
        let wire = WireEnvelope::from_envelope(envelope);
        self.pending.lock().entry(to_node).or_default().push(wire);
    }

    fn node_listed(&self, node_id: u64, addr: &str) {
        self.add_node(node_id, addr);
    }

    fn flush(&self) {
        let pending = std::mem::take(&mut *self.pending.lock());
        let links = self.links.read();
        for (to_node, envelopes) in pending {
            match links.get(&to_node) {
                Some(link) => link.push(envelopes, self.options.queue_bytes_max),
                None => metrics::counter!("flotilla_transport_dropped_total", "reason" => "unknown_node")
                    .increment(envelopes.len() as u64),
            }
        }
    }
}
