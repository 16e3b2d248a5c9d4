//! `flotilla demo`: the README's main job. Opens the embedded default store in a directory, loads keys from many
//! client threads, reads every one back, checks a scan, closes, reopens and checks again — printing what it did.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use flotilla::{Db, DbError};

/// Key `i`: a scrambled 4-byte prefix (so keys spread over every group's range) and the index.
fn key(i: u64) -> Vec<u8> {
    let scrambled = (i.wrapping_mul(2_654_435_761) % (1 << 32)) as u32;
    [&scrambled.to_be_bytes()[..], format!("/key{i:010}").as_bytes()].concat()
}

fn value(i: u64, bytes: usize) -> Vec<u8> {
    let mut value = format!("value-{i}-").into_bytes();
    value.resize(bytes.max(value.len()), b'.');
    value
}

/// Runs `work(i)` for every `i < count` on `threads` threads; prints progress once a second.
fn in_parallel(
    what: &str,
    count: u64,
    threads: usize,
    work: impl Fn(u64) -> Result<bool, DbError> + Sync,
) -> Result<(f64, u64), DbError> {
    let (next, done, bad) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<(), DbError> {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<(), DbError> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok(());
                        }
                        if !work(i)? {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let mut last = 0;
        while workers.iter().any(|w| !w.is_finished()) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let seconds = started.elapsed().as_secs();
            if seconds > last {
                last = seconds;
                let n = done.load(Ordering::Relaxed);
                println!("  {what}: {n} of {count} ({:.0}/s)", n as f64 / started.elapsed().as_secs_f64());
            }
        }
        workers.into_iter().try_for_each(|w| w.join().expect("a worker panicked"))
    })?;
    Ok((started.elapsed().as_secs_f64(), bad.load(Ordering::Relaxed)))
}

pub fn run(dir: &Path, keys: u64, value_bytes: usize, clients: usize) -> Result<bool, DbError> {
    let opened = Instant::now();
    let db = Arc::new(Db::open(dir)?);
    println!(
        "opened the embedded store in {} ({} groups) in {:.2} s",
        dir.display(),
        db.groups(),
        opened.elapsed().as_secs_f64()
    );
    let (load_seconds, _) =
        in_parallel("loaded", keys, clients, |i| db.put(&key(i), &value(i, value_bytes)).map(|()| true))?;
    println!("loaded {keys} keys of {value_bytes} B from {clients} client threads in {load_seconds:.2} s: {:.0} writes/s, each durable", keys as f64 / load_seconds);
    let (read_seconds, wrong) =
        in_parallel("read back", keys, clients, |i| Ok(db.get(&key(i))? == Some(value(i, value_bytes))))?;
    println!(
        "read back {keys} keys in {read_seconds:.2} s: {:.0} linearizable reads/s; {wrong} wrong or missing",
        keys as f64 / read_seconds
    );
    let scanned = db.scan(b"", b"", usize::MAX)?.len() as u64;
    println!("a full scan sees {scanned} keys");
    Arc::into_inner(db).expect("the only handle").close()?;
    let reopened = Db::open(dir)?;
    let sample = (0..keys).step_by((keys / 1000).max(1) as usize);
    let mut missing = 0;
    for i in sample.clone() {
        if reopened.get(&key(i))? != Some(value(i, value_bytes)) {
            missing += 1;
        }
    }
    println!("closed and reopened: {} sampled keys checked, {missing} wrong or missing", sample.count());
    reopened.close()?;
    let healthy = wrong == 0 && missing == 0 && scanned >= keys;
    println!("{}", if healthy { "all good" } else { "MISMATCHES FOUND" });
    Ok(healthy)
}
