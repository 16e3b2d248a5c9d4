//! Failover time of a cluster of `flotilla serve` processes: a client writes to one key without pause through a
//! node that does not lead it; the node leading the key's group is killed (SIGKILL); the time from the kill to
//! the first write acknowledged after it is one sample. The node is started again and the next round kills the
//! key's new leader. Prints each sample and the median.
//!
//! ```sh
//! cargo build --release && cargo run --release -p flotilla-benches --bin failover-bench
//! cargo run --release -p flotilla-benches --bin failover-bench -- --tick-ms 100
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The `flotilla` binary.
    #[arg(long, default_value = "target/release/flotilla")]
    bin: String,
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// The servers' tick (elections after 10–20 ticks without a leader).
    #[arg(long, default_value_t = 50)]
    tick_ms: u64,
}

/// A free port below the system's ephemeral range (a `bind(0)` pick may be taken by an outgoing connection before
/// the server binds it), distinct within this run.
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let port = 20_000 + ((std::process::id().wrapping_mul(97).wrapping_add(n)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One RESP request; the raw reply (first line, or a whole bulk string) or an error.
fn call(addr: &str, args: &[&[u8]], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr.parse().unwrap(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut request = Vec::new();
    flotilla::resp::encode_request(args, &mut request);
    stream.write_all(&request)?;
    let mut buffer = bytes::BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some(reply)) = flotilla::resp::parse_reply(&mut buffer, 1 << 20) {
            let mut out = Vec::new();
            reply.encode(&mut out);
            return Ok(out);
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

struct Cluster {
    args: Args,
    dir: tempfile::TempDir,
    cluster: String,
    resp: Vec<String>,
    children: Vec<Option<Child>>,
}

impl Cluster {
    fn spawn(&mut self, node: usize) {
        let child = Command::new(&self.args.bin)
            .args(["serve", "--id", &node.to_string(), "--cluster", &self.cluster, "--groups", "8"])
            .args(["--resp-addr", &self.resp[node - 1], "--tick-ms", &self.args.tick_ms.to_string()])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("node-{node}")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("flotilla serve starts (build it first: cargo build --release)");
        self.children[node - 1] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while call(&self.resp[node - 1], &[b"PING"], Duration::from_secs(1)).is_err() {
            assert!(Instant::now() < deadline, "node {node} did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.children[node - 1].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The node leading `key`'s group, as node `asked` believes after a write through it.
    fn leader_of(&self, key: &[u8], asked: usize) -> usize {
        let client = flotilla::BlockingClient::connect(&self.resp[asked - 1]).expect("the node answers ROUTES");
        let route = client.routes().into_iter().find(|route| route.contains(key)).expect("a route for the key");
        route.leader as usize
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in 1..=3 {
            self.kill(node);
        }
    }
}

fn main() {
    let args = Args::parse();
    let cluster = (1..=3).map(|id| format!("{id}=127.0.0.1:{}", free_port())).collect::<Vec<_>>().join(",");
    let resp = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let rounds = args.rounds;
    let tick_ms = args.tick_ms;
    let mut cluster =
        Cluster { args, dir: tempfile::tempdir().unwrap(), cluster, resp, children: vec![None, None, None] };
    for node in 1..=3 {
        cluster.spawn(node);
    }
    let key = b"failover-key";
    let mut samples = Vec::new();
    for round in 0..rounds {
        // Settle: a write through node 1, then find the key's leader and a node that is not it.
        let settle = Instant::now();
        while !matches!(call(&cluster.resp[0], &[b"SET", key, b"x"], Duration::from_secs(5)).as_deref(), Ok(b"+OK\r\n"))
        {
            assert!(settle.elapsed() < Duration::from_secs(30), "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(50));
        }
        let leader = cluster.leader_of(key, 1);
        let through = (1..=3).find(|&node| node != leader).unwrap();
        // Let the others' leases and heartbeats run on a little, then kill the leader.
        std::thread::sleep(Duration::from_millis(500));
        cluster.kill(leader);
        let killed = Instant::now();
        let mut value = 0u64;
        loop {
            value += 1;
            let reply =
                call(&cluster.resp[through - 1], &[b"SET", key, value.to_string().as_bytes()], Duration::from_secs(20));
            if matches!(reply.as_deref(), Ok(b"+OK\r\n")) {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(60), "no write succeeded after the kill");
        }
        let took = killed.elapsed();
        println!("round {round}: killed node {leader}, writes through node {through} resumed after {took:?}");
        samples.push(took);
        cluster.spawn(leader);
    }
    samples.sort();
    println!(
        "failover-bench: tick {tick_ms} ms, {} rounds: median {:?}, min {:?}, max {:?}",
        samples.len(),
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1]
    );
}
