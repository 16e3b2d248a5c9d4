//! A node joining a running cluster (`flotilla serve --join`): it gets the next id and a learner replica of every
//! group, filled by snapshot (the keys written before it joined) and by replication (those written after); it
//! serves any key; restarted with the same command it is the same node; and a second join gets the next id.

use std::time::{Duration, Instant};

use flotilla_engine::state_machine::{StateMachine, StateMachineOptions};

use crate::processes::{bulk, call, http_get, key, Cluster};

#[test]
fn a_joined_node_gets_an_id_and_every_groups_data_and_stays_itself_across_restarts() {
    let mut cluster = Cluster::start(3);
    for i in 0..80u32 {
        assert_eq!(cluster.call_until_ok(1, &[b"SET", &key(i), b"before"]), b"+OK");
    }
    let joined = cluster.join(2);
    assert_eq!(joined, 4);
    let info = String::from_utf8(cluster.call_until_ok(joined, &[b"INFO"])).unwrap();
    assert!(info.contains("node_id:4"), "{info}");
    // It serves any key (forwarding to the leaders), written before or after it joined.
    for i in 80..120u32 {
        assert_eq!(cluster.call_until_ok(joined, &[b"SET", &key(i), b"after"]), b"+OK");
    }
    assert_eq!(cluster.call_until_ok(joined, &[b"GET", &key(3)]), bulk(b"before"));
    // Every other node knows where it is, that it holds a learner of every group (8, and the meta range), and
    // finds it in the meta range's node registry.
    for node in 1..=3 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, status) = http_get(&cluster.http[node - 1], "/status");
            let learners = status.matches(r#""learners":[4]"#).count();
            let registered = status.contains(r#""node_id":4,"addr""#) && !status.contains(r#""registered":false"#);
            if registered && learners == 9 {
                break;
            }
            assert!(Instant::now() < deadline, "node {node} ({learners} groups list the learner): {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Its own replicas hold every key: stopped cleanly, its state file is read directly. Until its learners
    // have caught up it is started again with the same command, which must find it the same node.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        cluster.kill(joined, "-TERM");
        let state = StateMachine::open(&cluster.data_dir(joined).join("state.redb"), StateMachineOptions::default())
            .expect("the joined node's state file opens");
        let missing: Vec<u32> = (0..120u32)
            .filter(|&i| {
                let want: &[u8] = if i < 80 { b"before" } else { b"after" };
                state.get(&key(i)).unwrap().as_deref() != Some(want)
            })
            .collect();
        drop(state);
        cluster.restart(joined);
        let info = String::from_utf8(cluster.call_until_ok(joined, &[b"INFO"])).unwrap();
        assert!(info.contains("node_id:4"), "restarted, it is still node 4: {info}");
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "keys missing on the joined node: {missing:?}\n{}", cluster.log(joined));
    }
    // A node the cluster was created with, killed and started again, still knows where node 4 is (its stored
    // descriptors say), and so do writes it leads reach node 4.
    cluster.kill(1, "-KILL");
    cluster.restart(1);
    let (_, status) = http_get(&cluster.http[0], "/status");
    assert!(status.contains(r#""node_id":4"#), "restarted node 1: {status}");
    // A second node joins through the first joined one, and gets the next id.
    let fifth = cluster.join(joined);
    assert!(String::from_utf8(cluster.call_until_ok(fifth, &[b"INFO"])).unwrap().contains("node_id:5"));
    assert_eq!(cluster.call_until_ok(fifth, &[b"GET", &key(100)]), bulk(b"after"));
}

#[test]
fn a_join_from_another_cluster_or_without_an_address_is_refused() {
    let cluster = Cluster::start(1);
    let node = &cluster.resp[0];
    let other = call(node, &[b"JOIN", b"another", b"127.0.0.1:9"]).unwrap();
    assert!(other.starts_with(b"-ERR this is cluster"), "{}", String::from_utf8_lossy(&other));
    let no_addr = call(node, &[b"JOIN", b"flotilla", b"nowhere"]).unwrap();
    assert!(no_addr.starts_with(b"-ERR InvalidArgument"), "{}", String::from_utf8_lossy(&no_addr));
    // Nothing was added: the node still serves.
    assert_eq!(cluster.call_until_ok(1, &[b"SET", b"k", b"v"]), b"+OK");
}
