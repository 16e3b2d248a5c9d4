//! Real `flotilla serve` processes for the tests: a cluster on loopback ports chosen free per test (so parallel
//! runs do not collide), a minimal RESP and HTTP client, and every process ended by its id when the cluster is
//! dropped — on failure too.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A cluster of server processes; dropping it kills every one still running.
pub struct Cluster {
    dir: tempfile::TempDir,
    cluster: String,
    pub resp: Vec<String>,
    pub http: Vec<String>,
    pub children: Vec<Option<Child>>,
    /// With a partition proxy: where each node really listens for the others (`--raft-addr`), and the proxy.
    bound: Option<Vec<String>>,
    pub proxy: Option<Proxy>,
    /// Extra arguments for every node.
    args: Vec<String>,
    /// Nodes that joined after the cluster was created (numbered on from its nodes): their `--join` and
    /// `--raft-addr` arguments.
    joined: Vec<(String, String)>,
    /// The nodes the cluster was created with.
    created: usize,
}

/// A port for a server to listen on, below the system's ephemeral range (20000–31999): a port the system hands
/// out for `bind(0)` may be taken by an outgoing connection before the server binds it (seen: "Address already
/// in use" when many nodes start at once). Distinct within this process, spread by process id across processes,
/// and free when chosen.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + ((std::process::id().wrapping_mul(97).wrapping_add(n)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn free_addrs(nodes: usize) -> Vec<String> {
    (0..nodes).map(|_| format!("127.0.0.1:{}", free_port())).collect()
}

impl Cluster {
    pub fn start(nodes: usize) -> Cluster {
        Cluster::start_with(nodes, false, &[])
    }

    /// With `proxied`, the nodes reach each other through a [`Proxy`] that can cut them apart.
    pub fn start_with(nodes: usize, proxied: bool, args: &[&str]) -> Cluster {
        let raft = free_addrs(nodes);
        let cluster =
            raft.iter().enumerate().map(|(i, addr)| format!("{}={addr}", i + 1)).collect::<Vec<_>>().join(",");
        let (bound, proxy) = if proxied {
            let bound = free_addrs(nodes);
            let proxy = Proxy::start(&raft, &bound);
            (Some(bound), Some(proxy))
        } else {
            (None, None)
        };
        let mut cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            cluster,
            resp: free_addrs(nodes),
            http: free_addrs(nodes),
            children: Vec::new(),
            bound,
            proxy,
            args: args.iter().map(|arg| arg.to_string()).collect(),
            joined: Vec::new(),
            created: nodes,
        };
        for node in 1..=nodes {
            let child = cluster.spawn(node);
            cluster.children.push(Some(child));
        }
        for node in 1..=nodes {
            cluster.wait_ready(node);
        }
        cluster
    }

    /// Starts one more node, joining the cluster through node `through`; returns its number.
    pub fn join(&mut self, through: usize) -> usize {
        self.joined.push((self.resp[through - 1].clone(), format!("127.0.0.1:{}", free_port())));
        self.resp.push(format!("127.0.0.1:{}", free_port()));
        self.http.push(format!("127.0.0.1:{}", free_port()));
        let node = self.resp.len();
        let child = self.spawn(node);
        self.children.push(Some(child));
        self.wait_ready(node);
        node
    }

    /// Where node `node` keeps its data.
    pub fn data_dir(&self, node: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("node-{node}"))
    }

    pub fn spawn(&self, node: usize) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{node}.log")))
            .unwrap();
        let identity: Vec<String> = match node.checked_sub(self.created + 1).and_then(|at| self.joined.get(at)) {
            Some((through, raft)) => vec!["--join".into(), through.clone(), "--raft-addr".into(), raft.clone()],
            None => vec!["--id".into(), node.to_string(), "--cluster".into(), self.cluster.clone()],
        };
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .arg("serve")
            .args(identity)
            .args(["--groups", "8"])
            .args(["--resp-addr", &self.resp[node - 1], "--http-addr", &self.http[node - 1]])
            .args(self.bound.iter().flat_map(|bound| ["--raft-addr".to_string(), bound[node - 1].clone()]))
            .args(&self.args)
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("node-{node}")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("flotilla serve starts")
    }

    /// Waits until node `node` answers PING.
    pub fn wait_ready(&self, node: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !call(&self.resp[node - 1], &[b"PING"]).is_ok_and(|reply| reply == b"+PONG") {
            assert!(Instant::now() < deadline, "node {node} did not come up: {}", self.log(node));
            std::thread::sleep(Duration::from_millis(50));
        }
        // HTTP starts after RESP: a test that asks it at once must not find it closed.
        if let Some(http) = self.http.get(node - 1).filter(|addr| !addr.is_empty()) {
            while TcpStream::connect(http).is_err() {
                assert!(Instant::now() < deadline, "node {node}'s HTTP did not come up: {}", self.log(node));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn log(&self, node: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{node}.log"))).unwrap_or_default()
    }

    pub fn kill(&mut self, node: usize, signal: &str) {
        let mut child = self.children[node - 1].take().expect("running");
        let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = child.wait().unwrap();
        if signal == "-TERM" {
            assert!(exit.success(), "node {node} did not stop cleanly: {exit:?}\n{}", self.log(node));
        }
    }

    pub fn restart(&mut self, node: usize) {
        let child = self.spawn(node);
        self.children[node - 1] = Some(child);
        self.wait_ready(node);
    }

    /// `args` on node `node` until it succeeds (a node may be electing, or forwarding to one that is gone),
    /// within 20 s; the reply.
    pub fn call_until_ok(&self, node: usize, args: &[&[u8]]) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match call(&self.resp[node - 1], args) {
                Ok(reply) if !reply.starts_with(b"-") => return reply,
                other => assert!(Instant::now() < deadline, "{args:?} on node {node}: {other:?}\n{}", self.log(node)),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One request on a fresh connection; the reply without its final CRLF (a bulk string's header and data kept:
/// `$3\r\nbar`).
pub fn call(addr: &str, args: &[&[u8]]) -> std::io::Result<Vec<u8>> {
    Ok(pipeline(addr, &[args])?.remove(0))
}

/// Requests sent on a fresh connection in one write (a pipeline); their replies in order, each as [`call`]
/// gives it (of an array, only its header line).
pub fn pipeline(addr: &str, requests: &[&[&[u8]]]) -> std::io::Result<Vec<Vec<u8>>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut sent = Vec::new();
    for args in requests {
        sent.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in *args {
            sent.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            sent.extend_from_slice(arg);
            sent.extend_from_slice(b"\r\n");
        }
    }
    stream.write_all(&sent)?;
    let (mut received, mut replies) = (Vec::new(), Vec::new());
    let mut chunk = [0u8; 4096];
    loop {
        while replies.len() < requests.len() {
            let Some(length) = reply_length(&received) else { break };
            replies.push(received[..length - 2].to_vec());
            received.drain(..length);
        }
        if replies.len() == requests.len() {
            return Ok(replies);
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        received.extend_from_slice(&chunk[..read]);
    }
}

/// The length of the whole simple reply or bulk string `received` starts with, if it is all there.
fn reply_length(received: &[u8]) -> Option<usize> {
    let line_end = received.windows(2).position(|pair| pair == b"\r\n")?;
    if received[0] != b'$' {
        return Some(line_end + 2);
    }
    match std::str::from_utf8(&received[1..line_end]).unwrap().parse::<i64>().unwrap() {
        -1 => Some(line_end + 2),
        length => (received.len() >= line_end + 2 + length as usize + 2).then_some(line_end + 2 + length as usize + 2),
    }
}

/// Whether `reply` is one whole simple reply or bulk string.
pub fn complete(reply: &[u8]) -> bool {
    reply_length(reply).is_some()
}

/// `GET path` over HTTP/1.0; the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    (code, body)
}

/// Keys spread over every group (the ranges split the key space by its first bytes).
pub fn key(i: u32) -> Vec<u8> {
    let mut key = vec![(i * 37 % 256) as u8];
    key.extend_from_slice(format!("-key-{i}").as_bytes());
    key
}

pub fn bulk(value: &[u8]) -> Vec<u8> {
    [format!("${}\r\n", value.len()).as_bytes(), value].concat()
}

/// A proxy in front of every node's listener for the others: it learns who dials whom from each connection's
/// hello, and cuts (and refuses) the connections between nodes a test has partitioned.
pub struct Proxy {
    blocked: Arc<Mutex<HashSet<(u64, u64)>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens at `listen[i]` for node `i + 1`, forwarding to `to[i]`.
    fn start(listen: &[String], to: &[String]) -> Proxy {
        let proxy = Proxy { blocked: Arc::default(), stop: Arc::default() };
        for (i, (listen, to)) in listen.iter().zip(to).enumerate() {
            let listener = std::net::TcpListener::bind(listen).unwrap();
            listener.set_nonblocking(true).unwrap();
            let (blocked, stop, to, node) =
                (Arc::clone(&proxy.blocked), Arc::clone(&proxy.stop), to.clone(), i as u64 + 1);
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (blocked, stop, to) = (Arc::clone(&blocked), Arc::clone(&stop), to.clone());
                            std::thread::spawn(move || relay(stream, &to, node, &blocked, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        proxy
    }

    /// Cuts `node` off from every other node (both ways), until [`Proxy::heal`].
    pub fn isolate(&self, node: u64, nodes: u64) {
        let mut blocked = self.blocked.lock().unwrap();
        for other in (1..=nodes).filter(|&other| other != node) {
            blocked.insert((node, other));
            blocked.insert((other, node));
        }
    }

    pub fn heal(&self) {
        self.blocked.lock().unwrap().clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One proxied connection to node `to_node` (at `to`): its hello names the dialer; bytes flow both ways until
/// the pair is blocked or either side closes.
fn relay(mut from: TcpStream, to: &str, to_node: u64, blocked: &Mutex<HashSet<(u64, u64)>>, stop: &AtomicBool) {
    use flotilla::router::transport::frame::{decode_frame, decode_message, HEADER_BYTES};
    use flotilla::router::transport::wire::Hello;
    from.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buffer = bytes::BytesMut::new();
    let mut chunk = [0u8; 4096];
    let hello_bytes;
    let from_node = loop {
        let Ok(read) = from.read(&mut chunk) else { return };
        if read == 0 {
            return;
        }
        buffer.extend_from_slice(&chunk[..read]);
        let copy = buffer.clone();
        if let Ok(Some(payload)) = decode_frame(&mut buffer, 1 << 16) {
            let Ok(hello) = decode_message::<Hello>(payload.clone()) else { return };
            hello_bytes = copy[..HEADER_BYTES + payload.len()].to_vec();
            buffer = bytes::BytesMut::from(&copy[HEADER_BYTES + payload.len()..]);
            break hello.from_node;
        }
    };
    let is_blocked = || blocked.lock().unwrap().contains(&(from_node, to_node)) || stop.load(Ordering::SeqCst);
    if is_blocked() {
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(to) else { return };
    if upstream.write_all(&hello_bytes).and_then(|()| upstream.write_all(&buffer)).is_err() {
        return;
    }
    let pump = |mut reader: TcpStream, mut writer: TcpStream| {
        reader.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut chunk = [0u8; 16 << 10];
        loop {
            if is_blocked() {
                let _ = reader.shutdown(std::net::Shutdown::Both);
                let _ = writer.shutdown(std::net::Shutdown::Both);
                return;
            }
            match reader.read(&mut chunk) {
                Ok(0) => {
                    let _ = writer.shutdown(std::net::Shutdown::Both);
                    return;
                }
                Ok(read) => {
                    if writer.write_all(&chunk[..read]).is_err() {
                        return;
                    }
                }
                Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                }
                Err(_) => {
                    let _ = writer.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    };
    let (from_reader, up_writer) = (from.try_clone().unwrap(), upstream.try_clone().unwrap());
    std::thread::scope(|scope| {
        scope.spawn(|| pump(from_reader, up_writer));
        scope.spawn(|| pump(upstream, from));
    });
}
