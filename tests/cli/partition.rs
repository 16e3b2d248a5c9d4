//! One node cut off from the others (a proxy between the nodes drops their connections, `processes.rs`) while
//! clients write and read through every node: the cut-off node acknowledges no write, the majority elects and
//! goes on, and once healed the node catches up. The clients' whole history — including every read the cut-off
//! node answered — goes through the linearizability checker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_tests::linearizability::{check, Call, Verdict};

use crate::history::{client, History};
use crate::processes::{call, Cluster};

#[test]
fn a_node_cut_off_acknowledges_no_write_serves_no_stale_read_and_catches_up() {
    let cluster = Cluster::start_with(3, true, &["--request-timeout-ms", "2000"]);
    // Keys of the groups nodes 1 and 2 lead first (ranges start at first bytes 0x00 and 0x20 with 8 groups).
    let keys: Vec<Vec<u8>> =
        [0u8, 0x20].iter().flat_map(|&first| (0..2).map(move |i| vec![first, b'-', b'0' + i])).collect();
    let history = Arc::new(History::default());
    for key in &keys {
        let call_time = history.now();
        cluster.call_until_ok(1, &[b"SET", key, b"0"]);
        let done = Some((flotilla_tests::linearizability::Outcome::Done, history.now()));
        history.record(flotilla_tests::linearizability::Operation {
            client: 99,
            key: key.clone(),
            call: Call::Put(0),
            call_time,
            result: done,
        });
    }
    let proxy = cluster.proxy.as_ref().expect("proxied");
    let stop = Arc::new(AtomicBool::new(false));
    let (cut_from, cut_to) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    std::thread::scope(|scope| {
        // Clients on the majority, and one on the node that will be cut off.
        for id in 0..2 {
            let (cluster, keys, history, stop) = (&cluster, &keys, &history, &stop);
            scope.spawn(move || client(id, cluster, &[2, 3], keys, history, stop));
        }
        {
            let (cluster, keys, history, stop) = (&cluster, &keys, &history, &stop);
            scope.spawn(move || client(5, cluster, &[1], keys, history, stop));
        }
        std::thread::sleep(Duration::from_millis(700));
        let isolated_at = history.now();
        cut_from.store(true, Ordering::SeqCst);
        proxy.isolate(1, 3);
        std::thread::sleep(Duration::from_secs(5));
        proxy.heal();
        let healed_at = history.now();
        cut_to.store(true, Ordering::SeqCst);
        // After healing, node 1 catches up: a read through it sees the majority's last write.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let majority = call(&cluster.resp[1], &[b"GET", &keys[0]]);
            let through_1 = call(&cluster.resp[0], &[b"GET", &keys[0]]);
            if let (Ok(a), Ok(b)) = (&majority, &through_1) {
                if a == b && !a.starts_with(b"-") {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "node 1 did not catch up: {majority:?} {through_1:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::SeqCst);
        // No write that node 1's client sent while it was cut off was acknowledged (its calls, made and answered
        // inside the cut, are refused: the minority cannot commit).
        let operations = history.operations.lock().unwrap();
        let acknowledged_in_cut = operations.iter().filter(|o| {
            o.client == 5
                && matches!(o.call, Call::Put(_))
                && o.call_time > isolated_at
                && o.result.as_ref().is_some_and(|(_, at)| *at < healed_at)
        });
        assert_eq!(acknowledged_in_cut.count(), 0, "the cut-off node acknowledged a write");
        let in_cut = |o: &&flotilla_tests::linearizability::Operation| {
            o.call_time > isolated_at && o.result.as_ref().is_some_and(|(_, at)| *at < healed_at)
        };
        // Meanwhile the majority took writes to both groups, the one node 1 led included (a new leader).
        let majority_in_cut: Vec<_> =
            operations.iter().filter(|o| o.client < 2 && matches!(o.call, Call::Put(_))).filter(in_cut).collect();
        assert!(majority_in_cut.iter().any(|o| o.key[0] == 0), "no write to node 1's group during the cut");
        let refused =
            operations.iter().filter(|o| o.client == 5 && o.call_time > isolated_at && o.result.is_none()).count();
        eprintln!("during the cut: {} majority writes, {refused} of node 1's calls refused", majority_in_cut.len());
        assert!(refused >= 1, "node 1's client called through the whole cut and was never refused");
    });
    let operations = history.operations.lock().unwrap().clone();
    let majority_writes =
        operations.iter().filter(|o| o.client < 2 && matches!(o.call, Call::Put(_)) && o.result.is_some());
    assert!(majority_writes.count() > 20, "the majority went on writing");
    match check(&operations, 5_000_000) {
        Verdict::Linearizable => {}
        other => panic!("{other:?}\n{}", cluster.log(1)),
    }
}
