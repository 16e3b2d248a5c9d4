//! Real `flotilla serve` processes (3 and 5) on loopback ports (chosen free per test, so parallel runs do not
//! collide), driven over RESP: any node serves any key; a node killed with SIGKILL while clients write loses nothing
//! acknowledged, the others go on, and it catches up when started again with the same command; SIGTERM stops
//! a node cleanly. Every process is ended by its id when the test ends, on failure too.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::processes::{bulk, call, http_get, key, pipeline, Cluster};

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
    // A GET forwarded to a leader that may read locally is served at once, as its own clients' are (once the
    // leaders' read grants hold: read again until one was).
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&cluster, "flotilla_forwarded_reads_local_total") == 0 {
        assert!(Instant::now() < deadline, "no forwarded read was served locally");
        for i in 0..60u32 {
            let node = (i as usize + 2) % 3 + 1;
            assert_eq!(cluster.call_until_ok(node, &[b"GET", &key(i)]), bulk(format!("v{i}").as_bytes()));
        }
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
    assert_eq!(cluster.call_until_ok(3, &[b"DBSIZE"]), b":60");
    assert_eq!(cluster.call_until_ok(3, &[b"INCR", b"counter"]), b":1");
    assert_eq!(cluster.call_until_ok(1, &[b"INCR", b"counter"]), b":2");
}

/// A counter of every node's `/metrics`, summed.
fn counter(cluster: &Cluster, name: &str) -> u64 {
    let count = |addr: &String| {
        let (_, metrics) = http_get(addr, "/metrics");
        let line = metrics.lines().find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '));
        line.map_or(0, |line| line.split(' ').nth(1).unwrap().parse::<f64>().unwrap() as u64)
    };
    cluster.http.iter().map(count).sum()
}

#[test]
fn five_nodes_write_on_with_two_killed_and_the_two_catch_up() {
    let mut cluster = Cluster::start(5);
    for i in 0..50u32 {
        let node = i as usize % 5 + 1;
        assert_eq!(cluster.call_until_ok(node, &[b"SET", &key(i), b"a"]), b"+OK");
    }
    // Two of five down (the first leaders of two fifths of the groups): a majority of three remains.
    cluster.kill(1, "-KILL");
    cluster.kill(2, "-KILL");
    for i in 0..50u32 {
        let node = i as usize % 3 + 3;
        assert_eq!(cluster.call_until_ok(node, &[b"SET", &key(i), b"b"]), b"+OK");
    }
    cluster.restart(1);
    cluster.restart(2);
    for i in 0..50u32 {
        let node = i as usize % 2 + 1;
        assert_eq!(cluster.call_until_ok(node, &[b"GET", &key(i)]), bulk(b"b"));
    }
}

#[test]
fn bad_requests_get_errors_and_the_server_serves_on() {
    let cluster = Cluster::start(1);
    let node = &cluster.resp[0];
    assert!(call(node, &[b"NOSUCH"]).unwrap().starts_with(b"-ERR unknown command"));
    assert!(call(node, &[b"GET"]).unwrap().starts_with(b"-ERR wrong number of arguments"));
    assert!(call(node, &[b"SET", b"k", b"v", b"EX", b"10"]).unwrap().starts_with(b"-ERR expiry is not supported"));
    assert!(call(node, &[b"MSET", &key(1), b"a", &key(2), b"b"]).unwrap().starts_with(b"-CROSSSLOT"));
    // The embedded `Db`'s limits hold here too (a key of at most 4 KiB).
    let long_key = vec![b'k'; 5000];
    assert!(call(node, &[b"SET", &long_key, b"v"]).unwrap().starts_with(b"-ERR InvalidArgument"));
    assert!(call(node, &[b"GET", &long_key]).unwrap().starts_with(b"-ERR InvalidArgument"));
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
    assert!(call(node, &[b"INFO"]).unwrap().windows(9).any(|w| w == b"node_id:1"));
}

/// A pipeline runs as sent: its plain `SET`s in a row go together (one command per range) and are answered each in
/// its place, a bad one refused alone; a `GET` after a `SET` of its key reads it; `INCR`s count up in order; its
/// `GET`s in a row are read together (one request per range), each answered in its place.
/// Through node 2, which forwards most of the groups' requests.
#[test]
fn a_pipeline_runs_in_order_and_its_sets_and_gets_are_answered_each_in_its_place() {
    let cluster = Cluster::start(3);
    assert_eq!(cluster.call_until_ok(2, &[b"SET", b"warm", b"up"]), b"+OK");
    let keys: Vec<Vec<u8>> = (0..60).map(key).collect();
    let values: Vec<Vec<u8>> = (0..60).map(|i| format!("v{i}").into_bytes()).collect();
    let too_long = vec![b'k'; 5000];
    let mut requests: Vec<Vec<&[u8]>> = Vec::new();
    let mut expected: Vec<Vec<u8>> = Vec::new();
    for i in 0..30 {
        requests.push(vec![b"SET", &keys[i], &values[i]]);
        expected.push(b"+OK".to_vec());
    }
    requests.push(vec![b"SET", &too_long, b"v"]);
    expected.push(b"-ERR InvalidArgument".to_vec());
    requests.push(vec![b"GET", &keys[3]]);
    expected.push(bulk(b"v3"));
    requests.push(vec![b"SET", &keys[3], b"again"]);
    expected.push(b"+OK".to_vec());
    requests.push(vec![b"GET", &keys[3]]);
    expected.push(bulk(b"again"));
    for count in 1..=3 {
        requests.push(vec![b"INCR", b"pipelined"]);
        expected.push(format!(":{count}").into_bytes());
    }
    requests.push(vec![b"SET", &keys[4], b"not", b"NX"]);
    expected.push(b"$-1".to_vec());
    for i in 30..60 {
        requests.push(vec![b"SET", &keys[i], &values[i]]);
        expected.push(b"+OK".to_vec());
    }
    // A wave of GETs, most forwarded (several keys of one range as one request): each answered in its place.
    for i in (0..60).step_by(3) {
        requests.push(vec![b"GET", &keys[i]]);
        expected.push(bulk(if i == 3 { b"again" } else { &values[i] }));
    }
    requests.push(vec![b"GET", b"absent"]);
    expected.push(b"$-1".to_vec());
    requests.push(vec![b"GET", &too_long]);
    expected.push(b"-ERR InvalidArgument".to_vec());
    requests.push(vec![b"GET", &keys[59]]);
    expected.push(bulk(b"v59"));
    let requests: Vec<&[&[u8]]> = requests.iter().map(Vec::as_slice).collect();
    let replies = pipeline(&cluster.resp[1], &requests).unwrap();
    for (at, (reply, expected)) in replies.iter().zip(&expected).enumerate() {
        let (reply_text, expected_text) = (String::from_utf8_lossy(reply), String::from_utf8_lossy(expected));
        assert!(reply.starts_with(expected), "reply {at}: {reply_text:?}, not {expected_text:?}");
    }
    for (i, key) in keys.iter().enumerate() {
        let value = if i == 3 { b"again".to_vec() } else { values[i].clone() };
        assert_eq!(cluster.call_until_ok(3, &[b"GET", key]), bulk(&value));
    }
    // Keys of one range, read as one pipeline through every node (two of the three forward them as one request).
    let near: Vec<Vec<u8>> = (0..12).map(|i| format!("near:{i:02}").into_bytes()).collect();
    let sets: Vec<Vec<&[u8]>> = near.iter().map(|key| vec![&b"SET"[..], key, key]).collect();
    let sets: Vec<&[&[u8]]> = sets.iter().map(Vec::as_slice).collect();
    assert!(pipeline(&cluster.resp[0], &sets).unwrap().iter().all(|reply| reply == b"+OK"));
    let mut gets: Vec<Vec<&[u8]>> = near.iter().map(|key| vec![&b"GET"[..], key]).collect();
    gets.insert(5, vec![b"GET", b"near:absent"]);
    let gets: Vec<&[&[u8]]> = gets.iter().map(Vec::as_slice).collect();
    for node in 0..3 {
        let mut replies = pipeline(&cluster.resp[node], &gets).unwrap();
        assert_eq!(replies.remove(5), b"$-1", "node {}", node + 1);
        assert_eq!(replies, near.iter().map(|key| bulk(key)).collect::<Vec<_>>(), "node {}", node + 1);
    }
    // Every plain SET went through a combined write (`flotilla_combined_puts`: the puts of each).
    assert!(counter(&cluster, "flotilla_combined_puts_sum") >= 60 + 12);
}

/// The state machine's flags reach it: one it refuses (a memtable of 0 bytes) stops the server at once, with the
/// reason (a server that started regardless is ended by its id).
#[test]
fn a_state_machine_flag_reaches_the_state_machine() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "serve",
            "--id",
            "1",
            "--cluster",
            "1=127.0.0.1:0",
            "--resp-addr",
            "127.0.0.1:0",
            "--memtable-bytes-max",
            "0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("node"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            let _ = server.wait();
            panic!("the server started with a memtable of 0 bytes");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    server.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success() && stderr.contains("memtable_bytes_max"), "{stderr}");
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

#[test]
fn the_client_routes_to_leaders_and_the_command_line_reads_writes_and_shows_the_cluster() {
    let cluster = Cluster::start(3);
    let deadline = Instant::now() + Duration::from_secs(20);
    // Node 2 knows where each node serves clients once each has connected to it.
    let client = loop {
        let client = flotilla::BlockingClient::connect(&cluster.resp[1]).unwrap();
        if client.routes().iter().all(|route| route.leader_addr.is_some()) {
            break client;
        }
        assert!(Instant::now() < deadline, "routes without a leader address: {:?}", client.routes());
        std::thread::sleep(Duration::from_millis(100));
    };
    let routes = client.routes();
    assert_eq!(routes.len(), 9, "8 ranges of the users' keys and the meta range");
    assert!(routes
        .iter()
        .all(|route| route.leader_addr.as_deref() == Some(cluster.resp[route.leader as usize - 1].as_str())));
    for i in 0..40u32 {
        client.put(&key(i), format!("c{i}").as_bytes()).unwrap();
    }
    for i in 0..40u32 {
        assert_eq!(client.get(&key(i)).unwrap(), Some(format!("c{i}").into_bytes()));
    }
    assert!(client.delete(&key(0)).unwrap());
    assert!(!client.delete(&key(0)).unwrap());
    assert_eq!(client.scan(b"", b"", 1000).unwrap().len(), 39);
    // Pipelined to each pair's leader: every range's pairs written, in one call.
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (100..300u32).map(|i| (key(i), format!("m{i}").into_bytes())).collect();
    client.put_many(&pairs).unwrap();
    for (k, v) in &pairs {
        assert_eq!(client.get(k).unwrap().as_ref(), Some(v));
    }
    let too_long = vec![b'k'; 8 << 10]; // over the 4 KiB key bound
    let refused = client.put_many(&[(&b"fine"[..], &b"v"[..]), (too_long.as_slice(), b"v")]);
    assert!(matches!(refused, Err(flotilla::client::ClientError::Server(_))), "{refused:?}");
    assert_eq!(client.get(b"fine").unwrap(), Some(b"v".to_vec()), "the other pair was written");
    // The command line, against another node.
    let flotilla = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla")).args(args).output().unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stdout).to_string())
    };
    let addr = cluster.resp[2].as_str();
    assert_eq!(flotilla(&["put", "--addr", addr, "cli-key", "cli-value"]), (true, "OK\n".into()));
    assert_eq!(flotilla(&["get", "--addr", addr, "cli-key"]), (true, "cli-value\n".into()));
    assert_eq!(flotilla(&["del", "--addr", addr, "cli-key"]), (true, "deleted\n".into()));
    assert_eq!(flotilla(&["get", "--addr", addr, "cli-key"]), (true, "(not found)\n".into()));
    let (ok, status) = flotilla(&["status", "--addr", addr]);
    // (How many each node leads is the elections' outcome: usually 3 each, as each group campaigns first where
    // routing looks for it, but an election may go another way.)
    let leads = |line: &str| line.split(' ').nth(3).and_then(|count| count.parse::<u32>().ok());
    let led: u32 = status.lines().filter(|line| line.ends_with("of 9 groups")).filter_map(leads).sum();
    assert!(ok && status.contains("leader serves at") && led == 9, "{status}");
    assert!(!flotilla(&["get", "--addr", "127.0.0.1:1", "k"]).0, "an unreachable node is an error");
}
