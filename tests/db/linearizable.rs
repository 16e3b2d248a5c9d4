//! Client histories of the embedded `Db`, checked for linearizability (the store simulator's checker): many
//! threads writing, reading and scanning a few keys, across a power cut and a reopen — where a read served before
//! the replicas had replayed their logs would miss acknowledged writes. A scan counts as one read of each key
//! within its interval (each group's part of a scan is linearizable on its own).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flotilla::engine::disk::SimDisk;
use flotilla::{Config, Db};
use flotilla_tests::linearizability::{check, Call, Operation, Outcome, Verdict};

use super::small_config;

const KEYS: u64 = 64;

/// `threads` clients, `operations` each, of puts (unique values) and gets on `KEYS` keys spread over the groups.
fn run_clients(
    db: &Arc<Db>,
    history: &Arc<Mutex<Vec<Operation>>>,
    epoch: Instant,
    threads: u64,
    operations: u64,
    round: u64,
) {
    let workers: Vec<_> = (0..threads)
        .map(|client| {
            let (db, history) = (Arc::clone(db), Arc::clone(history));
            std::thread::spawn(move || {
                let mut rng = (client + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round;
                for n in 0..operations {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let key = ((rng % KEYS) * (u64::MAX / KEYS)).to_be_bytes().to_vec();
                    let call_time = epoch.elapsed().as_nanos() as u64;
                    if rng.is_multiple_of(7) {
                        // A scan of everything: each key's part is a read within the scan's interval.
                        let pairs = db.scan(b"", b"", usize::MAX).unwrap();
                        let return_time = epoch.elapsed().as_nanos() as u64;
                        let mut history = history.lock().unwrap();
                        for k in 0..KEYS {
                            let key = (k * (u64::MAX / KEYS)).to_be_bytes().to_vec();
                            let seen = pairs
                                .iter()
                                .find(|(stored, _)| *stored == key)
                                .map(|(_, v)| u64::from_be_bytes(v.as_slice().try_into().unwrap()));
                            let result = Some((Outcome::Got(seen), return_time));
                            history.push(Operation {
                                client: round * 100 + client,
                                key,
                                call: Call::Get,
                                call_time,
                                result,
                            });
                        }
                        continue;
                    }
                    let (call, outcome) = if rng.is_multiple_of(3) {
                        let value = (round << 40) | (client << 20) | n;
                        db.put(&key, &value.to_be_bytes()).unwrap();
                        (Call::Put(value), Outcome::Done)
                    } else {
                        let seen = db.get(&key).unwrap().map(|v| u64::from_be_bytes(v.try_into().unwrap()));
                        (Call::Get, Outcome::Got(seen))
                    };
                    let result = Some((outcome, epoch.elapsed().as_nanos() as u64));
                    history.lock().unwrap().push(Operation {
                        client: round * 100 + client,
                        key,
                        call,
                        call_time,
                        result,
                    });
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
}

/// Reads every key once, from this thread, into the history.
fn read_every_key(db: &Db, history: &Mutex<Vec<Operation>>, epoch: Instant, round: u64) {
    for k in 0..KEYS {
        let key = (k * (u64::MAX / KEYS)).to_be_bytes().to_vec();
        let call_time = epoch.elapsed().as_nanos() as u64;
        let seen = db.get(&key).unwrap().map(|v| u64::from_be_bytes(v.try_into().unwrap()));
        let result = Some((Outcome::Got(seen), epoch.elapsed().as_nanos() as u64));
        history.lock().unwrap().push(Operation { client: round * 100 + 99, key, call: Call::Get, call_time, result });
    }
}

#[test]
fn reads_and_writes_are_linearizable_across_a_power_cut_and_reopen() {
    let disk = SimDisk::new();
    let dir = Path::new("/db");
    // A large memtable: nothing is checkpointed, so after the cut every acknowledged write lives only in the WAL
    // and is applied again as the groups replay it.
    let mut config = Config { groups: 4, ..small_config() };
    config.state_machine.memtable_bytes_max = 64 << 20;
    let history = Arc::new(Mutex::new(Vec::new()));
    let epoch = Instant::now();
    for round in 0..3 {
        let db = Arc::new(Db::open_on(Arc::new(disk.clone()), dir, config.clone()).unwrap());
        // At once after the reopen, while the groups may still be replaying their logs: every key read back.
        read_every_key(&db, &history, epoch, round);
        run_clients(&db, &history, epoch, 8, 600, round);
        disk.power_off();
        drop(Arc::into_inner(db).expect("the only handle"));
        disk.crash(|_, _| 0);
    }
    let history = history.lock().unwrap();
    match check(&history, 5_000_000) {
        Verdict::Linearizable => {}
        other => panic!("{other:?}"),
    }
}
