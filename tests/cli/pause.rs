//! A leader stopped (SIGSTOP) past the election timeout while clients write, then resumed (SIGCONT): the others
//! elect a new leader and take writes; the resumed node's lease ended with the time that passed, so a read it
//! receives at once — one that waited in its socket through the pause included — is no stale read. The clients'
//! whole history goes through the linearizability checker.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_tests::linearizability::{check, Call, Operation, Outcome, Verdict};

use crate::history::{client, got, History};
use crate::processes::{call, complete, Cluster};

#[test]
fn a_leader_resumed_after_a_pause_serves_no_stale_read_and_the_history_is_linearizable() {
    let cluster = Cluster::start(3);
    // Three keys of the group node 1 leads first (range position 0: first byte 0).
    let keys: Vec<Vec<u8>> = (0..3).map(|i| [&[0u8][..], format!("-paused-{i}").as_bytes()].concat()).collect();
    for k in &keys {
        cluster.call_until_ok(1, &[b"SET", k, b"0"]);
    }

    let history = Arc::new(History::default());
    // Values written before the clients start are part of the history too.
    for k in &keys {
        let call_time = history.now();
        history.record(Operation {
            client: 99,
            key: k.clone(),
            call: Call::Put(0),
            call_time,
            result: Some((Outcome::Done, history.now())),
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let pid = cluster.children[0].as_ref().unwrap().id().to_string();
    std::thread::scope(|scope| {
        // Clients on nodes 2 and 3 all along.
        for id in 0..3 {
            let (cluster, keys, history, stop) = (&cluster, &keys, &history, &stop);
            scope.spawn(move || client(id, cluster, &[2, 3], keys, history, stop));
        }
        std::thread::sleep(Duration::from_millis(500));
        assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
        // A read sent to the stopped node waits in its socket.
        let mut queued = TcpStream::connect(&cluster.resp[0]).unwrap();
        queued.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let queued_call = history.now();
        queued.write_all(format!("*2\r\n$3\r\nGET\r\n${}\r\n", keys[0].len()).as_bytes()).unwrap();
        queued.write_all(&keys[0]).unwrap();
        queued.write_all(b"\r\n").unwrap();
        // Past the election timeout (1–2 s) and node liveness: the others elect and take writes meanwhile.
        std::thread::sleep(Duration::from_secs(4));
        assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
        // At once: a read on the resumed node, from a client of its own.
        let resumed_call = history.now();
        let resumed = call(&cluster.resp[0], &[b"GET", &keys[0]]);
        let resumed = resumed.ok().and_then(|reply| got(&reply)).map(|value| (Outcome::Got(value), history.now()));
        history.record(Operation {
            client: 10,
            key: keys[0].clone(),
            call: Call::Get,
            call_time: resumed_call,
            result: resumed,
        });
        let mut reply = Vec::new();
        let mut chunk = [0u8; 256];
        while !complete(&reply) {
            let read = queued.read(&mut chunk).unwrap();
            assert!(read > 0, "the queued read's connection closed");
            reply.extend_from_slice(&chunk[..read]);
        }
        reply.truncate(reply.len() - 2);
        let result = got(&reply).map(|value| (Outcome::Got(value), history.now()));
        history.record(Operation { client: 11, key: keys[0].clone(), call: Call::Get, call_time: queued_call, result });
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::SeqCst);
    });
    let operations = history.operations.lock().unwrap().clone();
    let writes_done = operations.iter().filter(|o| matches!(o.call, Call::Put(_)) && o.result.is_some()).count();
    assert!(writes_done > 20, "the clients wrote through the pause ({writes_done} writes acknowledged)");
    match check(&operations, 5_000_000) {
        Verdict::Linearizable => {}
        other => panic!("{other:?}\n{}", cluster.log(1)),
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while call(&cluster.resp[0], &[b"PING"]).ok().as_deref() != Some(b"+PONG".as_slice()) {
        assert!(Instant::now() < deadline);
    }
}
