//! The inbound side: the listener, and one reader task per connection another node dialed. A connection starts
//! with the dialer's [`Hello`]; it is refused — with the reason in the reply, a log line and a metric — unless it
//! names this cluster, this node and this protocol version, and comes from a node of the cluster whose listening
//! address is the one the cluster's list gives (a second process started with a node's id elsewhere is refused).
//! Then every frame is a [`Batch`]: its envelopes go to the store's inbox (a full mailbox drops the message, as
//! Raft allows), and anything from the node counts as hearing from it (node liveness). A frame that is oversized,
//! damaged or undecodable closes the connection, with a log line and a metric: never a panic, and never more
//! buffered than one frame's limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use flotilla_raftstore::store::liveness::Liveness;
use flotilla_raftstore::store::StoreInbox;
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::frame::{decode_frame, decode_message, encode_message, FrameError};
use super::link::read_one;
use super::wire::{Batch, Hello, HelloReply, PROTOCOL_VERSION};
use super::{ForwardHandler, TcpTransportOptions};

/// What every reader task shares.
pub(super) struct Inbound {
    pub(super) options: Arc<TcpTransportOptions>,
    pub(super) inbox: StoreInbox,
    /// Node liveness, and the transport's heartbeat count (its clock).
    pub(super) liveness: Arc<Mutex<Liveness>>,
    pub(super) heartbeats: Arc<std::sync::atomic::AtomicU64>,
    /// Where forwarded client requests and their answers go.
    pub(super) forwarded: Option<Arc<dyn ForwardHandler>>,
    /// Where each node that dialed here serves clients, as its hello said.
    client_addrs: Arc<Mutex<HashMap<u64, String>>>,
    /// The nodes of the cluster and where they listen (the transport's list, growing as nodes join).
    addrs: Arc<RwLock<BTreeMap<u64, String>>>,
    active: AtomicUsize,
}

impl Inbound {
    pub(super) fn new(
        options: Arc<TcpTransportOptions>,
        inbox: StoreInbox,
        liveness: Arc<Mutex<Liveness>>,
        heartbeats: Arc<std::sync::atomic::AtomicU64>,
        forwarded: Option<Arc<dyn ForwardHandler>>,
        client_addrs: Arc<Mutex<HashMap<u64, String>>>,
        addrs: Arc<RwLock<BTreeMap<u64, String>>>,
    ) -> Inbound {
        Inbound { options, inbox, liveness, heartbeats, forwarded, client_addrs, addrs, active: AtomicUsize::new(0) }
    }

    /// Accepts connections until the task is aborted (the transport dropped: its readers end with it, closing
    /// their connections, so the other nodes dial again); at most `connections_max` at once.
    pub(super) async fn accept(self: Arc<Inbound>, listener: TcpListener) {
        let mut readers = tokio::task::JoinSet::new();
        loop {
            while readers.try_join_next().is_some() {}
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    eprintln!("flotilla: node {}: accepting a connection failed: {error}", self.options.node_id);
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            if self.active.load(Ordering::Acquire) >= self.options.connections_max {
                metrics::counter!("flotilla_transport_refused_total", "reason" => "too_many").increment(1);
                continue; // dropped: closed at once
            }
            self.active.fetch_add(1, Ordering::AcqRel);
            let inbound = Arc::clone(&self);
            readers.spawn(async move {
                inbound.serve(stream, peer).await;
                inbound.active.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    /// One connection, from its hello to its end.
    async fn serve(&self, mut stream: TcpStream, peer: std::net::SocketAddr) {
        let node_id = self.options.node_id;
        let _ = stream.set_nodelay(true);
        let hello = match tokio::time::timeout(self.options.handshake_timeout, read_one::<Hello>(&mut stream, 64 << 10))
            .await
        {
            Ok(Ok(hello)) => hello,
            Ok(Err(error)) => return refused(node_id, peer, &format!("a bad hello: {error}")),
            Err(_) => return refused(node_id, peer, "no hello in time"),
        };
        let verdict = self.judge(&hello);
        let reply = HelloReply { accepted: verdict.is_ok(), reason: verdict.clone().err().unwrap_or_default() };
        let mut out = BytesMut::new();
        encode_message(&reply, &mut out);
        if stream.write_all(&out).await.is_err() {
            return;
        }
        if let Err(reason) = verdict {
            return refused(node_id, peer, &reason);
        }
        let from_node = hello.from_node;
        if !hello.client_addr.is_empty() {
            self.client_addrs.lock().insert(from_node, hello.client_addr.clone());
        }
        self.heard(from_node);
        if let ReadEnd::Bad(error) = self.read_batches(&mut stream, from_node).await {
            metrics::counter!("flotilla_transport_bad_frames_total").increment(1);
            eprintln!("flotilla: node {node_id}: closing the connection from node {from_node}: {error}");
        }
    }

    /// Whether a hello may go on: `Err` with the reason if not.
    fn judge(&self, hello: &Hello) -> Result<(), String> {
        let options = &self.options;
        if hello.cluster_id != options.cluster_id {
            return Err(format!("cluster {:?}, not {:?}", hello.cluster_id, options.cluster_id));
        }
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(format!("protocol version {}, not {PROTOCOL_VERSION}", hello.protocol_version));
        }
        if hello.to_node != options.node_id {
            return Err(format!("meant for node {}, this is node {}", hello.to_node, options.node_id));
        }
        if hello.from_node == options.node_id {
            return Err(format!("node {} is this node's own id", hello.from_node));
        }
        match self.addrs.read().get(&hello.from_node) {
            None => Err(format!("node {} is not in the cluster", hello.from_node)),
            Some(addr) if *addr != hello.listen_addr => Err(format!(
                "node {} listens at {}, not at {} (another process with its id?)",
                hello.from_node, addr, hello.listen_addr
            )),
            Some(_) => Ok(()),
        }
    }

    fn heard(&self, from_node: u64) {
        let now = self.heartbeats.load(Ordering::Acquire);
        self.liveness.lock().heard(from_node, now);
    }

    /// Reads frames until the connection ends or breaks the rules; returns which.
    async fn read_batches(&self, stream: &mut TcpStream, from_node: u64) -> ReadEnd {
        let mut buffer = BytesMut::with_capacity(64 << 10);
        loop {
            loop {
                let payload = match decode_frame(&mut buffer, self.options.frame_bytes_max) {
                    Ok(Some(payload)) => payload,
                    Ok(None) => break,
                    Err(error) => return ReadEnd::Bad(error),
                };
                metrics::counter!("flotilla_transport_frames_received_total").increment(1);
                metrics::counter!("flotilla_transport_bytes_received_total").increment(payload.len() as u64 + 8);
                match decode_message::<Batch>(payload) {
                    Ok(batch) => {
                        self.heard(from_node);
                        self.deliver(batch, from_node);
                    }
                    Err(error) => return ReadEnd::Bad(error),
                }
            }
            if !matches!(stream.read_buf(&mut buffer).await, Ok(read) if read > 0) {
                return ReadEnd::Closed;
            }
        }
    }

    fn deliver(&self, batch: Batch, from_node: u64) {
        if let Some(forwarded) = &self.forwarded {
            if !batch.requests.is_empty() {
                forwarded.on_requests(from_node, batch.requests);
            }
            for reply in batch.replies {
                forwarded.on_reply(from_node, reply);
            }
        }
        let mut dropped = 0;
        for envelope in batch.envelopes {
            let delivered = envelope
                .into_envelope(from_node, self.options.node_id)
                .is_some_and(|envelope| self.inbox.deliver(envelope));
            dropped += u64::from(!delivered);
        }
        if dropped > 0 {
            metrics::counter!("flotilla_transport_dropped_total", "reason" => "mailbox_full").increment(dropped);
        }
    }
}

/// Why a connection's reading ended.
enum ReadEnd {
    Closed,
    Bad(FrameError),
}

fn refused(node_id: u64, peer: std::net::SocketAddr, reason: &str) {
    metrics::counter!("flotilla_transport_refused_total", "reason" => "handshake").increment(1);
    eprintln!("flotilla: node {node_id}: refused a connection from {peer}: {reason}");
}
