//! Splits and merges on a cluster of real `flotilla serve` processes: `flotilla split KEY` (RESP `SPLIT`) cuts the
//! range that holds every `user:…` key, and every node's routing follows — writes, reads and scans across the new
//! boundary through any node, a second split proposed through another node, a node killed and restarted after
//! both; `flotilla merge KEY` (RESP `MERGE`) undoes a split, and the merged range is served the same way.

use std::process::Command;

use crate::processes::{bulk, call, Cluster};

fn user(i: u32) -> Vec<u8> {
    format!("user:{i:04}").into_bytes()
}

/// Runs the `flotilla` command against node `node`'s RESP address; its standard output.
fn flotilla(cluster: &Cluster, node: usize, args: &[&str]) -> String {
    let addr = &cluster.resp[node - 1];
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla")).args(args).args(["--addr", addr]).output().unwrap();
    assert!(output.status.success(), "flotilla {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// How many ranges node `node` routes by (`ROUTES` answers an array of one entry per range).
fn ranges(cluster: &Cluster, node: usize) -> usize {
    let reply = cluster.call_until_ok(node, &[b"ROUTES"]);
    let header = String::from_utf8_lossy(&reply).lines().next().unwrap().to_string();
    header.strip_prefix('*').unwrap().parse().unwrap()
}

/// The keys `flotilla scan` lists through node `node`, in order.
fn scanned(cluster: &Cluster, node: usize) -> Vec<String> {
    let listed = flotilla(cluster, node, &["scan", "--start", "user:", "--end", "user;", "--limit", "1000"]);
    listed.lines().map(|line| line.split('\t').next().unwrap().to_string()).collect()
}

#[test]
fn split_and_merged_ranges_are_served_through_every_node_and_survive_restarts() {
    let mut cluster = Cluster::start(3);
    for i in 0..100u32 {
        let node = i as usize % 3 + 1;
        assert_eq!(cluster.call_until_ok(node, &[b"SET", &user(i), b"a"]), b"+OK");
    }
    let before = ranges(&cluster, 1);
    // Split through node 2 (whichever node leads the range proposes it).
    let status = flotilla(&cluster, 2, &["split", "user:0050"]);
    assert!(status.contains("\"user:0050\""), "a range starts at the split key:\n{status}");
    assert_eq!(ranges(&cluster, 2), before + 1, "one range more");
    // Every node serves both sides, writes and reads alike (nodes whose tables predate the split are refused by
    // the group and route again).
    for i in 0..100u32 {
        let node = (i as usize + 1) % 3 + 1;
        assert_eq!(cluster.call_until_ok(node, &[b"SET", &user(i), b"b"]), b"+OK");
    }
    for i in 0..100u32 {
        let node = i as usize % 3 + 1;
        assert_eq!(cluster.call_until_ok(node, &[b"GET", &user(i)]), bulk(b"b"), "user:{i:04} on node {node}");
    }
    let expected: Vec<String> = (0..100).map(|i| format!("user:{i:04}")).collect();
    for node in 1..=3 {
        assert_eq!(scanned(&cluster, node), expected, "a scan across the boundary through node {node}");
    }
    // A second split through node 3; splitting at a range's start again changes nothing.
    flotilla(&cluster, 3, &["split", "user:0025"]);
    flotilla(&cluster, 1, &["split", "user:0025"]);
    assert_eq!(ranges(&cluster, 1), before + 2);
    // A node killed and started again serves every side, with what was written while it was down.
    cluster.kill(1, "-KILL");
    for i in (0..100u32).step_by(7) {
        assert_eq!(cluster.call_until_ok(2, &[b"SET", &user(i), b"c"]), b"+OK");
    }
    cluster.restart(1);
    for i in 0..100u32 {
        let value: &[u8] = if i % 7 == 0 { b"c" } else { b"b" };
        assert_eq!(cluster.call_until_ok(1, &[b"GET", &user(i)]), bulk(value), "user:{i:04} after the restart");
    }
    assert_eq!(scanned(&cluster, 1), expected);
    // The second split undone through node 3: one group serves [user:0025, user:0050) and more again; every node
    // routes by it (its table learns once the right group is gone), also after a kill -9 and restart.
    let status = flotilla(&cluster, 3, &["merge", "user:0030"]);
    assert!(!status.contains("\"user:0025\""), "no range starts at user:0025 any more:\n{status}");
    assert_eq!(ranges(&cluster, 3), before + 1, "one range less");
    for i in 0..100u32 {
        let node = (i as usize + 2) % 3 + 1;
        assert_eq!(cluster.call_until_ok(node, &[b"SET", &user(i), b"d"]), b"+OK", "user:{i:04} on node {node}");
    }
    cluster.kill(2, "-KILL");
    cluster.restart(2);
    for node in 1..=3 {
        assert_eq!(cluster.call_until_ok(node, &[b"GET", &user(30)]), bulk(b"d"));
        assert_eq!(scanned(&cluster, node), expected, "a scan across the merged range through node {node}");
    }
    assert_eq!(ranges(&cluster, 2), before + 1);
    // Bad requests: no key, a key over the limit, the first range (nothing to merge it into).
    assert!(call(&cluster.resp[0], &[b"MERGE"]).unwrap().starts_with(b"-ERR wrong number"));
    assert!(call(&cluster.resp[0], &[b"MERGE", b""]).unwrap().starts_with(b"-ERR InvalidArgument"));
    assert!(call(&cluster.resp[0], &[b"SPLIT"]).unwrap().starts_with(b"-ERR wrong number"));
    let long_key = vec![b'k'; 5000];
    assert!(call(&cluster.resp[0], &[b"SPLIT", &long_key]).unwrap().starts_with(b"-ERR InvalidArgument"));
}

/// The triggers on a cluster (bounds set low): writes of `user:…` keys make their range split by size — and, once
/// deleted, the ranges merge back — and a sustained load over the bound makes it split by load; the new ranges'
/// leaders spread over the nodes (`split_leader`), and every key written stays readable through every node.
#[test]
fn ranges_split_by_size_and_by_load_on_their_own() {
    let sized = Cluster::start_with(
        3,
        false,
        &["--split-size-bytes-max", "16384", "--split-load-requests-per-second-max", "0", "--merge-cold-seconds", "1"],
    );
    let before = ranges(&sized, 1);
    let value = vec![b'v'; 100];
    for i in 0..1_000u32 {
        assert_eq!(sized.call_until_ok(i as usize % 3 + 1, &[b"SET", &user(i), &value]), b"+OK");
    }
    wait_for(|| ranges(&sized, 1) >= before + 3, "splits by size");
    for i in (0..1_000u32).step_by(13) {
        assert_eq!(sized.call_until_ok(i as usize % 3 + 1, &[b"GET", &user(i)]), bulk(&value));
    }
    // Emptied and cold, the ranges the size trigger made merge back into the layout's range.
    for i in 0..1_000u32 {
        assert_eq!(sized.call_until_ok(i as usize % 3 + 1, &[b"DEL", &user(i)]), b":1");
    }
    wait_for(|| ranges(&sized, 1) == before, "merges of the emptied ranges");
    assert_eq!(sized.call_until_ok(2, &[b"SET", &user(5), b"back"]), b"+OK");
    assert_eq!(sized.call_until_ok(3, &[b"GET", &user(5)]), bulk(b"back"));
    drop(sized);
    let loaded = Cluster::start_with(
        3,
        false,
        &["--split-size-bytes-max", "0", "--split-load-requests-per-second-max", "50", "--split-load-seconds", "2"],
    );
    let before = ranges(&loaded, 1);
    let started = std::time::Instant::now();
    let mut i = 0u32;
    while ranges(&loaded, 1) < before + 2 {
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "no split by load");
        for _ in 0..50 {
            i = (i + 7919) % 1_000;
            assert_eq!(loaded.call_until_ok(i as usize % 3 + 1, &[b"SET", &user(i), b"x"]), b"+OK");
        }
    }
    let leaders: std::collections::BTreeSet<String> = flotilla(&loaded, 1, &["status"])
        .lines()
        .filter(|line| line.contains("\"user:"))
        .filter_map(|line| line.split_whitespace().nth(3).map(str::to_string))
        .collect();
    assert!(leaders.len() >= 2, "the new ranges' leaders spread over the nodes: {leaders:?}");
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Requests of the users' ranges every node has forwarded to another to run (`flotilla_requests_forwarded_total`
/// of `range="data"`, summed; the meta range's background publications are counted apart).
fn forwarded(cluster: &Cluster) -> u64 {
    let count = |addr: &String| {
        let (_, metrics) = crate::processes::http_get(addr, "/metrics");
        let line = metrics.lines().find(|line| line.starts_with("flotilla_requests_forwarded_total{range=\"data\"} "));
        line.map_or(0, |line| line.split(' ').nth(1).unwrap().parse::<f64>().unwrap() as u64)
    };
    cluster.http.iter().map(count).sum()
}

/// Three nodes with `user:0000` … `user:0039` written through node `node`, then split at `user:0020` through node 2.
fn split_cluster(node: usize) -> Cluster {
    let cluster = Cluster::start(3);
    for i in 0..40u32 {
        assert_eq!(cluster.call_until_ok(node, &[b"SET", &user(i), b"a"]), b"+OK");
    }
    flotilla(&cluster, 2, &["split", "user:0020"]);
    cluster
}

/// A node's `ROUTES` names, for each range, the leader its own replica of the group knows — not the guess its
/// routing table holds until it routes one of that group's requests itself: after splits, a client routing by
/// any node's answer sends each write straight to its leader, and no node forwards any.
#[test]
fn after_splits_every_nodes_routes_name_the_leaders_so_routed_writes_are_not_forwarded() {
    let cluster = split_cluster(1);
    flotilla(&cluster, 3, &["split", "user:0030"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // Every node's answer, once each applied both splits and all three name the same leaders (the leader's own
    // node names itself as soon as it leads: an answer that agrees with it is no guess).
    let agreed_clients = || loop {
        let clients: Vec<flotilla::BlockingClient> =
            cluster.resp.iter().map(|addr| flotilla::BlockingClient::connect(addr).unwrap()).collect();
        let views: Vec<Vec<(Vec<u8>, u64)>> = (clients.iter())
            .map(|client| client.routes().into_iter().map(|route| (route.start, route.leader)).collect())
            .collect();
        let split = |view: &Vec<(Vec<u8>, u64)>, key: &[u8]| view.iter().any(|(start, _)| start == key);
        let whole = views.iter().all(|view| split(view, b"user:0020") && split(view, b"user:0030"));
        let addressed = clients.iter().all(|client| client.routes().iter().all(|route| route.leader_addr.is_some()));
        if whole && addressed && views.iter().all(|view| *view == views[0]) {
            return clients;
        }
        assert!(std::time::Instant::now() < deadline, "the nodes' routes: {views:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Each node's routes, used by a client: no write forwarded. (A round may meet a new group's leadership moving —
    // an election on a loaded machine — so a few rounds are allowed; routes that guess forward in every one.)
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..40u32).map(|i| (user(i), b"b".to_vec())).collect();
    let mut forwarded_per_node = Vec::new();
    for _round in 0..5 {
        forwarded_per_node = (agreed_clients().iter())
            .map(|client| {
                let before = forwarded(&cluster);
                client.put_many(&pairs).unwrap();
                forwarded(&cluster) - before
            })
            .collect();
        if forwarded_per_node.iter().all(|&count| count == 0) {
            break;
        }
    }
    assert_eq!(forwarded_per_node, vec![0, 0, 0], "writes forwarded, routing by each node's routes");
    for i in 0..40u32 {
        assert_eq!(cluster.call_until_ok(i as usize % 3 + 1, &[b"GET", &user(i)]), bulk(b"b"));
    }
}

/// A node routes by the splits it applied as soon as it applied them, not only after a request is refused: after a
/// split through node 2, nodes 1 and 3 (which routed nothing since) show the new range in their status, and a write
/// of the new range sent to each is forwarded only by the one that does not lead the new range, once, straight
/// to its leader. (Without it, both waited for a refusal: the status never showed the split.)
#[test]
fn a_node_routes_by_a_split_it_applied_without_first_being_refused() {
    let cluster = split_cluster(2);
    // Nodes 1 and 3 have applied it, and route by it: their status lists a range starting at the split key (hex).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for node in [1, 3] {
        while !crate::processes::http_get(&cluster.http[node - 1], "/status").1.contains("757365723a30303230") {
            assert!(std::time::Instant::now() < deadline, "node {node}'s status never showed the split");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let routes = flotilla::BlockingClient::connect(&cluster.resp[1]).unwrap().routes();
    let leader = routes.iter().find(|route| route.start == b"user:0020").expect("the new range").leader;
    let before = forwarded(&cluster);
    for node in [1, 3] {
        assert_eq!(cluster.call_until_ok(node, &[b"SET", &user(25), b"b"]), b"+OK");
    }
    let expected = [1, 3].iter().filter(|&&node| node != leader).count() as u64;
    assert_eq!(forwarded(&cluster) - before, expected, "the new range's leader is node {leader}");
}
