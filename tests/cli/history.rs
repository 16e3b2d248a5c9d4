//! Client histories of real-process tests, for the linearizability checker: a clock that orders every call and
//! return, the operations recorded, and a client that gets and sets unique values through chosen nodes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use flotilla_tests::linearizability::{Call, Operation, Outcome};

use crate::processes::{call, Cluster};

/// The history and the clock that orders its events.
#[derive(Default)]
pub struct History {
    clock: AtomicU64,
    pub operations: Mutex<Vec<Operation>>,
}

impl History {
    pub fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    pub fn record(&self, operation: Operation) {
        self.operations.lock().unwrap().push(operation);
    }
}

/// Parses a GET's reply (`$-1`, or a bulk string of a decimal value); `None` if it was an error.
pub fn got(reply: &[u8]) -> Option<Option<u64>> {
    if reply == b"$-1" {
        return Some(None);
    }
    let text = std::str::from_utf8(reply).ok()?;
    let (_, value) = text.strip_prefix('$')?.split_once("\r\n")?;
    Some(Some(value.parse().ok()?))
}

/// One client: gets and sets (unique values) of `keys` through the nodes in `nodes`, until `stop`.
pub fn client(id: u64, cluster: &Cluster, nodes: &[usize], keys: &[Vec<u8>], history: &History, stop: &AtomicBool) {
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let key = &keys[(n as usize * 7 + id as usize) % keys.len()];
        let node = nodes[(n as usize + id as usize) % nodes.len()];
        let addr = &cluster.resp[node - 1];
        if n.is_multiple_of(2) {
            let call_time = history.now();
            let reply = call(addr, &[b"GET", key]);
            let result = reply.ok().and_then(|reply| got(&reply)).map(|value| (Outcome::Got(value), history.now()));
            history.record(Operation { client: id, key: key.clone(), call: Call::Get, call_time, result });
        } else {
            let value = id * 1_000_000 + n;
            let call_time = history.now();
            let reply = call(addr, &[b"SET", key, value.to_string().as_bytes()]);
            // An error or no answer: the write may or may not have happened.
            let result = matches!(reply.as_deref(), Ok(b"+OK")).then(|| (Outcome::Done, history.now()));
            history.record(Operation { client: id, key: key.clone(), call: Call::Put(value), call_time, result });
        }
    }
}
