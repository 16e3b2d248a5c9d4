//! The embedded `Db`: operations across groups, atomic batches within one group's range, typed refusals, and
//! durability across close, drop and reopen.

use std::sync::Arc;

use flotilla::{Config, Db, DbError, WriteBatch};

mod linearizable;
mod merge;
mod meta;
mod misuse;
mod split;

fn small_config() -> Config {
    let mut config = Config::default();
    // Small budgets so flushes, compactions and purges happen in a short test.
    config.state_machine.memtable_bytes_max = 64 << 10;
    config.wal.segment_bytes_max = 256 << 10;
    config.store.log_gc_interval = std::time::Duration::from_millis(50);
    config
}

#[test]
fn puts_gets_deletes_and_scans_across_groups() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), small_config()).unwrap();
    assert_eq!(db.groups(), 16);
    // Keys whose first bytes spread over every group.
    let keys: Vec<Vec<u8>> = (0..=255u8).step_by(5).map(|b| vec![b, b'k']).collect();
    for key in &keys {
        db.put(key, b"v1").unwrap();
    }
    for key in &keys {
        assert_eq!(db.get(key).unwrap(), Some(b"v1".to_vec()));
    }
    db.delete(&keys[3]).unwrap();
    assert_eq!(db.get(&keys[3]).unwrap(), None);
    assert_eq!(db.get(b"never written").unwrap(), None);
    let all = db.scan(b"", b"", usize::MAX).unwrap();
    assert_eq!(all.len(), keys.len() - 1);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "in key order across groups");
    let limited = db.scan(&keys[10], &keys[20], 4).unwrap();
    assert_eq!(limited.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), keys[10..14].to_vec());
    db.close().unwrap();
}

#[test]
fn batches_are_atomic_within_a_range_and_refused_across_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), small_config()).unwrap();
    let mut batch = WriteBatch::new();
    batch.put(&b"\x10a"[..], &b"1"[..]).put(&b"\x10b"[..], &b"2"[..]).delete(&b"\x10c"[..]);
    db.write_batch(batch).unwrap();
    assert_eq!(db.get(b"\x10b").unwrap(), Some(b"2".to_vec()));
    let mut spanning = WriteBatch::new();
    spanning.put(&b"\x10z"[..], &b"1"[..]).put(&b"\xf0z"[..], &b"2"[..]);
    assert!(
        matches!(db.write_batch(spanning), Err(DbError::BatchSpansRanges { first_outside, cut_at }) if first_outside == b"\xf0z" && !cut_at.is_empty() && cut_at.as_slice() > &b"\x10z"[..] && cut_at.as_slice() <= &b"\xf0z"[..])
    );
    assert_eq!(db.get(b"\x10z").unwrap(), None, "nothing of a refused batch happened");
    assert!(matches!(db.write_batch(WriteBatch::new()), Err(DbError::InvalidArgument(_))));
    assert!(matches!(db.put(&vec![b'k'; 5000], b"v"), Err(DbError::InvalidArgument(_))));
    assert!(matches!(db.scan(b"b", b"a", 10), Err(DbError::InvalidArgument(_))));
}

#[test]
fn acknowledged_writes_survive_close_and_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open_with(dir.path(), small_config()).unwrap();
        for i in 0..500u32 {
            db.put(&i.to_be_bytes(), format!("value {i}").as_bytes()).unwrap();
        }
        db.close().unwrap();
    }
    {
        let db = Db::open_with(dir.path(), small_config()).unwrap();
        for i in 0..500u32 {
            assert_eq!(
                db.get(&i.to_be_bytes()).unwrap(),
                Some(format!("value {i}").into_bytes()),
                "key {i} after close"
            );
        }
        db.close().unwrap();
    }
    // A child process writes more and exits abruptly (no close, no flush): what it was told is durable must be.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writes_then_exits_abruptly", "--test-threads=1"])
        .env("FLOTILLA_TEST_CHILD_DIR", dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let db = Db::open_with(dir.path(), small_config()).unwrap();
    for i in 0..800u32 {
        let expected = if i < 500 { format!("value {i}").into_bytes() } else { b"late".to_vec() };
        assert_eq!(db.get(&i.to_be_bytes()).unwrap(), Some(expected), "key {i} after an unclean stop");
    }
}

#[test]
fn many_threads_write_and_read_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open_with(dir.path(), small_config()).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let db = Arc::clone(&db);
            std::thread::spawn(move || {
                for i in 0..200u32 {
                    let key = [&[t.wrapping_mul(61)], &i.to_be_bytes()[..]].concat();
                    db.put(&key, &[t]).unwrap();
                    assert_eq!(db.get(&key).unwrap(), Some(vec![t]));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(db.scan(b"", b"", usize::MAX).unwrap().len(), 800);
}

/// Run only as the child of the test above: acknowledged writes, then an abrupt exit.
#[test]
fn child_writes_then_exits_abruptly() {
    let Ok(dir) = std::env::var("FLOTILLA_TEST_CHILD_DIR") else { return };
    let db = Db::open_with(dir, small_config()).unwrap();
    for i in 500..800u32 {
        db.put(&i.to_be_bytes(), b"late").unwrap();
    }
    std::process::exit(0);
}

#[test]
fn three_in_process_replicas_per_group_replicate_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { nodes: 3, groups: 8, ..small_config() };
    {
        let db = Db::open_with(dir.path(), config.clone()).unwrap();
        for i in 0..300u32 {
            db.put(&(i.wrapping_mul(2_654_435_761)).to_be_bytes(), &i.to_be_bytes()).unwrap();
        }
        for i in 0..300u32 {
            assert_eq!(db.get(&(i.wrapping_mul(2_654_435_761)).to_be_bytes()).unwrap(), Some(i.to_be_bytes().to_vec()));
        }
        let mut batch = WriteBatch::new();
        batch.put(&b"\x01a"[..], &b"1"[..]).put(&b"\x01b"[..], &b"2"[..]);
        db.write_batch(batch).unwrap();
        // Followers learn the last commits from the next heartbeats: wait until every replica applied the same.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while db.applied_indexes().windows(2).any(|w| w[0] != w[1]) {
            assert!(std::time::Instant::now() < deadline, "replicas did not converge: {:?}", db.applied_indexes());
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        db.close().unwrap();
    }
    // Every node's own state machine holds every key: replicated, not just served by leaders.
    for node in 1..=3 {
        use flotilla::engine::state_machine::{StateMachine, StateMachineOptions};
        let path = dir.path().join(format!("node-{node}/state.redb"));
        let machine = StateMachine::open(&path, StateMachineOptions::default()).unwrap();
        // (The users' keys: past them, the meta range's table.)
        assert_eq!(machine.scan(b"", b"\xff\xff", usize::MAX).unwrap().len(), 302, "node {node}");
    }
    let db = Db::open_with(dir.path(), config).unwrap();
    assert_eq!(db.scan(b"", b"", usize::MAX).unwrap().len(), 302);
    assert_eq!(db.get(b"\x01b").unwrap(), Some(b"2".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_api_does_the_same_from_many_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let db = flotilla::AsyncDb::new(Db::open_with(dir.path(), small_config()).unwrap());
    let tasks: Vec<_> = (0..32u32)
        .map(|t| {
            let db = db.clone();
            tokio::spawn(async move {
                for i in 0..20u32 {
                    let key = [t.to_be_bytes(), i.to_be_bytes()].concat();
                    db.put(&key, b"v").await.unwrap();
                    assert_eq!(db.get(&key).await.unwrap(), Some(b"v".to_vec()));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(db.scan(b"", b"", usize::MAX).await.unwrap().len(), 640);
    db.delete(&[0, 0, 0, 0, 0, 0, 0, 0]).await.unwrap();
    assert_eq!(db.blocking().get(&[0, 0, 0, 0, 0, 0, 0, 0]).unwrap(), None, "one database, two APIs");
    let mut spanning = WriteBatch::new();
    spanning.put(&b"\x00"[..], &b"1"[..]).put(&b"\xff"[..], &b"2"[..]);
    assert!(matches!(db.write_batch(spanning).await, Err(DbError::BatchSpansRanges { .. })));
    db.close().unwrap();
}

#[test]
fn stale_reads_see_applied_state_without_a_leader_round() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), Config { nodes: 3, groups: 4, ..small_config() }).unwrap();
    db.put(b"\x40key", b"v1").unwrap();
    // The leader applied it before answering; followers soon after. No stale read shows what was never written.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for node in 1..=3 {
        while db.get_stale(node, b"\x40key").unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "node {node} never applied the write");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(db.get_stale(node, b"\x40key").unwrap(), Some(b"v1".to_vec()));
        assert_eq!(db.scan_stale(node, b"", b"", 10).unwrap(), vec![(b"\x40key".to_vec(), b"v1".to_vec())]);
    }
    assert_eq!(db.get_stale(1, b"\x40other").unwrap(), None);
    assert!(matches!(db.get_stale(4, b"k"), Err(DbError::InvalidArgument(_))));
}

#[test]
fn a_groups_leadership_can_be_moved_to_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), Config { nodes: 3, groups: 1, ..small_config() }).unwrap();
    db.put(b"k", b"1").unwrap();
    let before = db.leader_nodes()[0];
    let target = before % 3 + 1;
    db.transfer_leader(b"k", target).unwrap();
    // Requests follow the new leader once the move is done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db.leader_nodes()[0] != target {
        assert!(std::time::Instant::now() < deadline, "leadership did not move to node {target}");
        db.put(b"k", b"2").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(db.get(b"k").unwrap(), Some(b"2".to_vec()));
    assert!(matches!(db.transfer_leader(b"k", 9), Err(DbError::InvalidArgument(_))));
}
