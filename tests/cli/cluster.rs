//! Real `flotilla serve` processes on loopback ports (chosen free per test, so parallel runs do not collide),
//! driven over RESP: any node serves any key; a node killed with SIGKILL while clients write loses nothing
//! acknowledged, the others go on, and it catches up when started again with the same command; SIGTERM stops
//! a node cleanly. Every process is ended by its id when the test ends, on failure too.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A cluster of server processes; dropping it kills every one still running.
struct Cluster {
    dir: tempfile::TempDir,
    cluster: String,
    resp: Vec<String>,
    http: Vec<String>,
    children: Vec<Option<Child>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    fn start(nodes: usize) -> Cluster {
        let raft: Vec<String> = (0..nodes).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let cluster =
            raft.iter().enumerate().map(|(i, addr)| format!("{}={addr}", i + 1)).collect::<Vec<_>>().join(",");
        let resp = (0..nodes).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let http = (0..nodes).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let mut cluster = Cluster { dir: tempfile::tempdir().unwrap(), cluster, resp, http, children: Vec::new() };
        for node in 1..=nodes {
            let child = cluster.spawn(node);
            cluster.children.push(Some(child));
        }
        for node in 1..=nodes {
            cluster.wait_ready(node);
        }
        cluster
    }

    fn spawn(&self, node: usize) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("node-{node}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["serve", "--id", &node.to_string(), "--cluster", &self.cluster, "--groups", "8"])
            .args(["--resp-addr", &self.resp[node - 1], "--http-addr", &self.http[node - 1]])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("node-{node}")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("flotilla serve starts")
    }

    /// Waits until node `node` answers PING.
    fn wait_ready(&self, node: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !call(&self.resp[node - 1], &[b"PING"]).is_ok_and(|reply| reply == b"+PONG") {
            assert!(Instant::now() < deadline, "node {node} did not come up: {}", self.log(node));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self, node: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{node}.log"))).unwrap_or_default()
    }

    fn kill(&mut self, node: usize, signal: &str) {
        let mut child = self.children[node - 1].take().expect("running");
        let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = child.wait().unwrap();
        if signal == "-TERM" {
            assert!(exit.success(), "node {node} did not stop cleanly: {exit:?}\n{}", self.log(node));
        }
    }

    fn restart(&mut self, node: usize) {
        let child = self.spawn(node);
        self.children[node - 1] = Some(child);
        self.wait_ready(node);
    }

    /// `args` on node `node` until it succeeds (a node may be electing, or forwarding to one that is gone),
    /// within 20 s; the reply.
    fn call_until_ok(&self, node: usize, args: &[&[u8]]) -> Vec<u8> {
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
fn call(addr: &str, args: &[&[u8]]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg);
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request)?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        reply.extend_from_slice(&chunk[..read]);
        if complete(&reply) {
            reply.truncate(reply.len() - 2);
            return Ok(reply);
        }
    }
}

/// Whether `reply` is one whole simple reply or bulk string.
fn complete(reply: &[u8]) -> bool {
    let Some(line_end) = reply.windows(2).position(|pair| pair == b"\r\n") else { return false };
    if reply[0] != b'$' {
        return true;
    }
    match std::str::from_utf8(&reply[1..line_end]).unwrap().parse::<i64>().unwrap() {
        -1 => true,
        length => reply.len() >= line_end + 2 + length as usize + 2,
    }
}

/// `GET path` over HTTP/1.0; the status code and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
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
fn key(i: u32) -> Vec<u8> {
    let mut key = vec![(i * 37 % 256) as u8];
    key.extend_from_slice(format!("-key-{i}").as_bytes());
    key
}

fn bulk(value: &[u8]) -> Vec<u8> {
    [format!("${}\r\n", value.len()).as_bytes(), value].concat()
}

#[test]
fn any_node_serves_any_key_and_a_killed_node_loses_nothing_and_catches_up() {
    let mut cluster = Cluster::start(3);
    for i in 0..60u32 {
        let node = i as usize % 3 + 1;
        assert_eq!(cluster.call_until_ok(node, &[b"SET", &key(i), format!("v{i}").as_bytes()]), b"+OK");
    }
    for i in 0..60u32 {
        let node = (i as usize + 1) % 3 + 1;
        assert_eq!(cluster.call_until_ok(node, &[b"GET", &key(i)]), bulk(format!("v{i}").as_bytes()));
    }
    // Node 1 (the first leader of a third of the groups) is killed; writes go on through the others.
    cluster.kill(1, "-KILL");
    let started = Instant::now();
    for i in 0..60u32 {
        let node = i as usize % 2 + 2;
        assert_eq!(cluster.call_until_ok(node, &[b"SET", &key(i), format!("w{i}").as_bytes()]), b"+OK");
    }
    eprintln!("60 writes after the kill took {:?}", started.elapsed());
    // Started again with the same command, it serves what was written while it was down.
    cluster.restart(1);
    for i in 0..60u32 {
        assert_eq!(cluster.call_until_ok(1, &[b"GET", &key(i)]), bulk(format!("w{i}").as_bytes()));
    }
    // SIGTERM stops a node cleanly; it comes back with its data.
    cluster.kill(2, "-TERM");
    cluster.restart(2);
    assert_eq!(cluster.call_until_ok(2, &[b"GET", &key(7)]), bulk(b"w7"));
    assert_eq!(cluster.call_until_ok(3, &[b"INCR", b"counter"]), b":1");
    assert_eq!(cluster.call_until_ok(1, &[b"INCR", b"counter"]), b":2");
}

#[test]
fn bad_requests_get_errors_and_the_server_serves_on() {
    let cluster = Cluster::start(1);
    let node = &cluster.resp[0];
    assert!(call(node, &[b"NOSUCH"]).unwrap().starts_with(b"-ERR unknown command"));
    assert!(call(node, &[b"GET"]).unwrap().starts_with(b"-ERR wrong number of arguments"));
    assert!(call(node, &[b"SET", b"k", b"v", b"EX", b"10"]).unwrap().starts_with(b"-ERR expiry is not supported"));
    assert!(call(node, &[b"MSET", &key(1), b"a", &key(2), b"b"]).unwrap().starts_with(b"-CROSSSLOT"));
    // Not RESP at all: an error, then that connection closes; others are served.
    let mut stream = TcpStream::connect(node).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(b"*1\r\n*1\r\n").unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    assert!(reply.starts_with("-ERR Protocol error"), "{reply}");
    assert_eq!(call(node, &[b"SET", b"k", b"v"]).unwrap(), b"+OK");
    assert_eq!(call(node, &[b"SET", b"k", b"w", b"NX"]).unwrap(), b"$-1");
    assert_eq!(call(node, &[b"GET", b"k"]).unwrap(), bulk(b"v"));
}

#[test]
fn http_serves_the_demo_routes_the_json_api_status_and_metrics() {
    let cluster = Cluster::start(3);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&cluster.http[0], "/set?key=fruit&value=apple") != (200, "OK\n".to_string()) {
        assert!(Instant::now() < deadline, "no leader took the write");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_get(&cluster.http[2], "/get?key=fruit"), (200, "apple".to_string()));
    assert_eq!(http_get(&cluster.http[1], "/v1/kv/fruit"), (200, r#"{"key":"fruit","value":"apple"}"#.to_string()));
    assert_eq!(http_get(&cluster.http[1], "/v1/kv/none").0, 404);
    assert_eq!(http_get(&cluster.http[1], "/get").0, 400, "no key");
    let (code, status) = http_get(&cluster.http[0], "/status");
    assert_eq!(code, 200);
    assert!(status.contains(r#""node_id":1"#) && status.contains(r#""group_id":8"#), "{status}");
    let (code, metrics) = http_get(&cluster.http[0], "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("flotilla_transport_frames_sent_total"), "{metrics}");
}
