//! Splitting a range by request (`Db::split_at`): the new range is served by a new group on the same nodes, every
//! key stays readable and writable on both sides, scans cross the boundary in key order, a reopened database keeps
//! its ranges, on one node and on three. (A table that learns of a split only from a group's refusal: `db.rs`'s
//! unit tests.)

use flotilla::{AsyncDb, Config, Db};

pub(crate) fn key(i: u32) -> Vec<u8> {
    format!("user:{i:06}").into_bytes()
}

/// Every key reads `value`, and one scan across every range returns them all, in key order.
pub(crate) fn check_all(db: &Db, count: u32, value: &str) {
    for i in 0..count {
        assert_eq!(db.get(&key(i)).unwrap().as_deref(), Some(value.as_bytes()), "key {i}");
    }
    let pairs = db.scan(b"user:", b"user;", usize::MAX).unwrap();
    assert_eq!(pairs.len(), count as usize, "one scan across every range");
    assert!(pairs.windows(2).all(|pair| pair[0].0 < pair[1].0), "in key order");
}

fn split_and_serve(config: Config) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), config.clone()).unwrap();
    let groups = db.groups();
    // All these keys share their first bytes: one range holds them all.
    for i in 0..300 {
        db.put(&key(i), b"before").unwrap();
    }
    db.split_at(&key(100)).unwrap();
    db.split_at(&key(200)).unwrap();
    assert_eq!(db.groups(), groups + 2);
    db.split_at(&key(200)).unwrap(); // already a boundary: nothing to do
    assert_eq!(db.groups(), groups + 2);
    check_all(&db, 300, "before");
    for i in 0..300 {
        db.put(&key(i), b"after").unwrap();
    }
    check_all(&db, 300, "after");
    // A write batch that crosses the new boundary is refused, saying where to cut.
    let mut batch = flotilla::WriteBatch::new();
    batch.put(key(99), b"x".to_vec());
    batch.put(key(100), b"x".to_vec());
    assert!(matches!(db.write_batch(batch), Err(flotilla::DbError::BatchSpansRanges { .. })));
    db.close().unwrap();
    // Reopened, the database keeps its ranges and data.
    let db = Db::open_with(dir.path(), config).unwrap();
    assert_eq!(db.groups(), groups + 2);
    check_all(&db, 300, "after");
    db.close().unwrap();
}

#[test]
fn a_split_range_serves_both_sides_and_survives_a_reopen() {
    split_and_serve(Config { groups: 2, ..Config::default() });
}

#[test]
fn a_split_range_serves_both_sides_on_three_nodes() {
    split_and_serve(Config { groups: 2, nodes: 3, ..Config::default() });
}

#[test]
fn the_async_api_serves_both_sides_after_a_split() {
    let dir = tempfile::tempdir().unwrap();
    let db = AsyncDb::new(Db::open_with(dir.path(), Config { groups: 1, ..Config::default() }).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        for i in 0..50 {
            db.put(&key(i), b"v").await.unwrap();
        }
        db.blocking().split_at(&key(25)).unwrap();
        for i in 0..50 {
            db.put(&key(i), b"w").await.unwrap();
            assert_eq!(db.get(&key(i)).await.unwrap().as_deref(), Some(&b"w"[..]));
        }
        assert_eq!(db.scan(b"", b"", usize::MAX).await.unwrap().len(), 50);
    });
    db.close().unwrap();
}

/// The size trigger: a database created with one range, written with sequential keys, splits as its data grows
/// (the leaders ask, the `Db`'s splitter proposes): every range ends within twice the bound, every key stays
/// readable, and a reopen keeps the ranges.
#[test]
fn ranges_split_by_size_as_the_data_grows() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config { groups: 1, ..Config::default() };
    config.store.split.size_bytes_max = 64 << 10;
    config.store.split.size_check_written_bytes = 8 << 10;
    config.store.split.merge_size_bytes_max = 0; // the ranges as split (`merge.rs` tests the merge trigger)
    let db = Db::open_with(dir.path(), config.clone()).unwrap();
    let value = vec![b'v'; 200];
    let count = 3_000u32; // about 640 KB of keys and values: ten times the bound
    for i in 0..count {
        db.put(&key(i), &value).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db.groups() < 6 {
        assert!(std::time::Instant::now() < deadline, "only {} ranges", db.groups());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ranges = db.ranges();
    for range in &ranges {
        let bytes: usize =
            db.scan(&range.start, &range.end, usize::MAX).unwrap().iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes <= 2 * (64 << 10), "range {:?}..{:?} holds {bytes} B", range.start, range.end);
    }
    for i in 0..count {
        assert_eq!(db.get(&key(i)).unwrap().as_deref(), Some(value.as_slice()), "key {i}");
    }
    db.close().unwrap();
    let db = Db::open_with(dir.path(), config).unwrap();
    assert_eq!(db.ranges(), ranges, "a reopen keeps the ranges");
    assert_eq!(db.scan(b"user:", b"user;", usize::MAX).unwrap().len(), count as usize);
    db.close().unwrap();
}

/// The load trigger counts reads served locally — on the caller's thread, never reaching the group's replica
/// (`store/local_reader.rs`) — so a range only read, however hard, splits by load like one written.
#[test]
fn a_range_read_hard_only_locally_splits_by_load() {
    for nodes in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config { groups: 1, nodes, ..Config::default() };
        config.store.split.size_bytes_max = 0;
        config.store.split.merge_size_bytes_max = 0;
        config.store.split.load_window_ticks = 3;
        config.store.split.load.requests_per_window_max = 500;
        config.store.split.load.hot_windows = 2;
        config.store.peer.hibernate_idle_ticks = 2;
        let db = Db::open_with(dir.path(), config).unwrap();
        let groups = db.groups();
        for i in 0..200 {
            db.put(&key(i), b"v").unwrap();
        }
        // The leader falls asleep (no ticks: its load windows would never close) before the reads begin; every
        // so many local reads wake it.
        std::thread::sleep(std::time::Duration::from_millis(800));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        while db.groups() == groups {
            assert!(std::time::Instant::now() < deadline, "{nodes} node(s): no split by the reads' load");
            for _ in 0..1000 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                assert_eq!(db.get(&key((rng % 200) as u32)).unwrap().as_deref(), Some(&b"v"[..]));
            }
        }
        check_all(&db, 200, "v");
        db.close().unwrap();
    }
}
