//! Three stores in one process, connected by the TCP transport over loopback (production WAL, redb state
//! machines, poll handler): writes replicate and reads are served; a node that stops is reported unreachable and
//! then down, and when it starts again it is dialed again and catches up; a connection from another cluster, for another node or from a node at the wrong address
//! is refused with the reason; damaged and oversized frames close their connection and the node serves on.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flotilla_engine::disk::StdDisk;
use flotilla_engine::flusher::BackgroundFlusher;
use flotilla_engine::log_engine::LogEngine;
use flotilla_engine::state_machine::{StateMachine, StateMachineOptions};
use flotilla_engine::wal::group_commit::{GroupCommitOptions, GroupCommitWal};
use flotilla_engine::wal::{Wal, WalOptions};
use flotilla_raftstore::command::{Command, Op, Outcome};
use flotilla_raftstore::range::{initial_ranges, RangeDescriptor, Replica};
use flotilla_raftstore::store::{PeerMsg, Store, StoreOptions};
use flotilla_router::transport::frame::{decode_frame, decode_message, encode_frame, encode_message};
use flotilla_router::transport::wire::{Hello, HelloReply, PROTOCOL_VERSION};
use flotilla_router::transport::{NodeEvent, TcpTransport, TcpTransportOptions};

const CLUSTER: &str = "test-cluster";

struct Node {
    store: Arc<Store>,
    kv: Arc<StateMachine>,
    // Dropped after the store (fields drop in order): its log outlives it.
    transport: Arc<TcpTransport>,
    _log: Arc<GroupCommitWal>,
}

struct Cluster {
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    addrs: BTreeMap<u64, String>,
    ranges: Vec<RangeDescriptor>,
    nodes: BTreeMap<u64, Node>,
    /// What each node's transport reported: (the node, the event).
    events: Arc<std::sync::Mutex<Vec<(u64, NodeEvent)>>>,
}

impl Cluster {
    /// Three nodes on loopback ports the system chose, holding two groups of three replicas each.
    fn start() -> Cluster {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listeners: Vec<std::net::TcpListener> =
            (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: BTreeMap<u64, String> =
            (1..=3).zip(&listeners).map(|(id, l)| (id, l.local_addr().unwrap().to_string())).collect();
        let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
        let ranges = initial_ranges(2, 1, &replicas);
        let mut cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            runtime,
            addrs,
            ranges,
            nodes: BTreeMap::new(),
            events: Arc::default(),
        };
        for (id, listener) in (1..=3).zip(listeners) {
            cluster.start_node(id, Some(listener));
        }
        cluster
    }

    fn options(&self, id: u64) -> TcpTransportOptions {
        TcpTransportOptions {
            heartbeat_interval: Duration::from_millis(10),
            reconnect_backoff_max: Duration::from_millis(100),
            ..TcpTransportOptions::new(CLUSTER, id, self.addrs.clone())
        }
    }

    fn start_node(&mut self, id: u64, listener: Option<std::net::TcpListener>) {
        let dir = self.dir.path();
        let (wal, _) = Wal::open(&dir.join(format!("wal-{id}")), Arc::new(StdDisk), WalOptions::default()).unwrap();
        let log = Arc::new(GroupCommitWal::start(wal, GroupCommitOptions::default()));
        let path = dir.join(format!("state-{id}.redb"));
        let kv = Arc::new(StateMachine::open(&path, StateMachineOptions::default()).unwrap());
        let flusher = Arc::new(BackgroundFlusher::start(Arc::clone(&kv)));
        let options = self.options(id);
        let transport = match listener {
            Some(listener) => TcpTransport::with_listener(options, listener, self.runtime.handle().clone()),
            None => TcpTransport::bind(options, self.runtime.handle().clone()),
        }
        .unwrap();
        let store_options =
            StoreOptions { node_id: id, tick_interval: Duration::from_millis(10), ..Default::default() };
        let store = Arc::new(
            Store::start(
                store_options,
                &self.ranges,
                Arc::clone(&log) as Arc<dyn LogEngine>,
                Arc::clone(&kv) as _,
                flusher,
                Arc::clone(&transport) as _,
            )
            .unwrap(),
        );
        let weak = Arc::downgrade(&store);
        let events = Arc::clone(&self.events);
        transport
            .start(
                store.inbox(),
                Box::new(move |event| {
                    events.lock().unwrap().push((id, event));
                    if let (Some(store), NodeEvent::Down(node)) = (weak.upgrade(), event) {
                        store.node_down(node);
                    }
                }),
                None,
            )
            .unwrap();
        self.nodes.insert(id, Node { store, kv, transport, _log: log });
    }

    /// Writes `key` in `group_id` through whichever node leads it, within `deadline`.
    fn put(&self, group_id: u64, key: &[u8], value: &[u8], deadline: Instant) {
        loop {
            for node in self.nodes.values() {
                let (reply, answer) = oneshot::channel();
                let command = Command::write(None, vec![Op::put(key.to_vec(), value.to_vec())]);
                if node.store.router().send(group_id, PeerMsg::Write { command, reply }).is_err() {
                    continue;
                }
                if let Ok(Ok(Outcome::Done)) = answer.recv_timeout(Duration::from_secs(2)) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "no node took the write of {key:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every running node's state machine holds `value` at `key`.
    fn replicated(&self, key: &[u8], value: &[u8], deadline: Instant) {
        while !self.nodes.values().all(|node| node.kv.get(key).unwrap().as_deref() == Some(value)) {
            assert!(Instant::now() < deadline, "{key:?} did not reach every node");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

#[test]
fn writes_replicate_over_tcp_and_a_restarted_node_is_dialed_again_and_catches_up() {
    let mut cluster = Cluster::start();
    cluster.nodes[&1].store.campaign_all([cluster.ranges[0].group_id]);
    cluster.nodes[&2].store.campaign_all([cluster.ranges[1].group_id]);
    let (first, second) = (cluster.ranges[0].group_id, cluster.ranges[1].group_id);
    let key_in = |range: &RangeDescriptor, suffix: &[u8]| [range.start.as_slice(), suffix].concat();
    let (a, b) = (key_in(&cluster.ranges[0], b"a"), key_in(&cluster.ranges[1], b"b"));
    cluster.put(first, &a, b"1", deadline());
    cluster.put(second, &b, b"1", deadline());
    cluster.replicated(&a, b"1", deadline());
    cluster.replicated(&b, b"1", deadline());
    // Node 3 stops; the others go on (a majority), and it is dialed again once it is back.
    cluster.nodes.remove(&3);
    cluster.put(first, &a, b"2", deadline());
    // The others lost their connections to it, and then judged it down.
    let saw = |event: NodeEvent| {
        let deadline = deadline();
        while !cluster.events.lock().unwrap().iter().any(|(node, seen)| *node != 3 && *seen == event) {
            assert!(Instant::now() < deadline, "no {event:?} reported");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    saw(NodeEvent::Unreachable(3));
    saw(NodeEvent::Down(3));
    cluster.start_node(3, None);
    cluster.put(second, &b, b"2", deadline());
    cluster.replicated(&a, b"2", deadline());
    cluster.replicated(&b, b"2", deadline());
}

/// Sends `hello` on a new connection to `addr`; returns the reply and the connection.
fn say_hello(addr: &str, hello: &Hello) -> (HelloReply, TcpStream) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = BytesMut::new();
    encode_message(hello, &mut out);
    stream.write_all(&out).unwrap();
    let mut buffer = BytesMut::new();
    let mut chunk = [0u8; 256];
    loop {
        if let Some(payload) = decode_frame(&mut buffer, 1 << 16).unwrap() {
            return (decode_message(payload).unwrap(), stream);
        }
        let read = stream.read(&mut chunk).unwrap();
        assert!(read > 0, "closed without a reply");
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Whether the other end closed `stream` (within the read timeout).
fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0) | Err(_))
}

#[test]
fn strangers_are_refused_with_the_reason_and_bad_frames_close_only_their_connection() {
    let cluster = Cluster::start();
    let node_1 = cluster.addrs[&1].clone();
    let good = Hello {
        cluster_id: CLUSTER.into(),
        from_node: 2,
        to_node: 1,
        protocol_version: PROTOCOL_VERSION,
        listen_addr: cluster.addrs[&2].clone(),
        client_addr: String::new(),
    };
    let refusals = [
        (Hello { cluster_id: "another".into(), ..good.clone() }, "cluster"),
        (Hello { to_node: 3, ..good.clone() }, "meant for node 3"),
        (Hello { from_node: 1, ..good.clone() }, "own id"),
        (Hello { from_node: 9, ..good.clone() }, "not in the cluster"),
        (Hello { listen_addr: "127.0.0.1:1".into(), ..good.clone() }, "another process with its id"),
        (Hello { protocol_version: PROTOCOL_VERSION + 1, ..good.clone() }, "protocol version"),
    ];
    for (hello, why) in refusals {
        let (reply, mut stream) = say_hello(&node_1, &hello);
        assert!(!reply.accepted && reply.reason.contains(why), "{hello:?}: {reply:?}");
        assert!(closed(&mut stream));
    }
    // A node that joined later is accepted once its address is known (`add_node`: a descriptor listing it told
    // the transport), from that address only.
    let joined = Hello { from_node: 9, listen_addr: "127.0.0.1:9".into(), ..good.clone() };
    let transport = &cluster.nodes[&1].transport;
    assert!(transport.add_node(9, "127.0.0.1:9"));
    assert!(!transport.add_node(9, "127.0.0.1:10"), "known already: nothing changes");
    assert_eq!(transport.nodes().get(&9).map(String::as_str), Some("127.0.0.1:9"));
    let (reply, _) = say_hello(&node_1, &joined);
    assert!(reply.accepted, "{reply:?}");
    let (reply, _) = say_hello(&node_1, &Hello { listen_addr: "127.0.0.1:10".into(), ..joined });
    assert!(!reply.accepted && reply.reason.contains("another process with its id"), "{reply:?}");
    // Accepted, then a frame whose checksum is wrong: that connection closes.
    let (reply, mut stream) = say_hello(&node_1, &good);
    assert!(reply.accepted, "{reply:?}");
    let mut frame = BytesMut::new();
    encode_frame(b"not a batch", &mut frame);
    frame[4] ^= 0xff;
    stream.write_all(&frame).unwrap();
    assert!(closed(&mut stream));
    // One that announces more than the limit: closed from its header alone.
    let (_, mut stream) = say_hello(&node_1, &good);
    stream.write_all(&(u32::MAX).to_le_bytes()).unwrap();
    stream.write_all(&[0; 4]).unwrap();
    assert!(closed(&mut stream));
    // Garbage before any hello.
    let mut stream = TcpStream::connect(&node_1).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(&[0xff; 64]).unwrap();
    assert!(closed(&mut stream));
    // The node serves on.
    cluster.nodes[&1].store.campaign_all([cluster.ranges[0].group_id]);
    let key = [cluster.ranges[0].start.as_slice(), b"k"].concat();
    cluster.put(cluster.ranges[0].group_id, &key, b"v", deadline());
    cluster.replicated(&key, b"v", deadline());
}
