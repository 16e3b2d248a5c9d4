//! Merging a range into its left neighbour by request (`Db::merge_left`): splits undone, every key still
//! readable and writable, scans across the old boundaries, the ranges kept by a reopen, on one node and on
//! three; the first range has nothing to merge into.

use flotilla::{Config, Db, DbError};

fn key(i: u32) -> Vec<u8> {
    format!("user:{i:06}").into_bytes()
}

fn check_all(db: &Db, count: u32, value: &str) {
    for i in 0..count {
        assert_eq!(db.get(&key(i)).unwrap().as_deref(), Some(value.as_bytes()), "key {i}");
    }
    let pairs = db.scan(b"user:", b"user;", usize::MAX).unwrap();
    assert_eq!(pairs.len(), count as usize, "one scan across every range");
}

fn merge_and_serve(config: Config) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), config.clone()).unwrap();
    let groups = db.groups();
    for i in 0..300 {
        db.put(&key(i), b"before").unwrap();
    }
    db.split_at(&key(100)).unwrap();
    db.split_at(&key(200)).unwrap();
    assert_eq!(db.groups(), groups + 2);
    db.merge_left(&key(250)).unwrap(); // [200, …) back into [100, 200)
    assert_eq!(db.groups(), groups + 1);
    let range = db.ranges().into_iter().find(|range| range.contains(&key(150))).unwrap();
    assert!(range.contains(&key(100)) && range.contains(&key(299)), "one range from 100 on: {range:?}");
    check_all(&db, 300, "before");
    for i in 0..300 {
        db.put(&key(i), b"after").unwrap();
    }
    check_all(&db, 300, "after");
    db.merge_left(&key(100)).unwrap();
    assert_eq!(db.groups(), groups);
    check_all(&db, 300, "after");
    let first = db.ranges()[0].start.clone();
    assert!(matches!(db.merge_left(&first), Err(DbError::InvalidArgument(_))), "nothing left of the first range");
    db.close().unwrap();
    let db = Db::open_with(dir.path(), config).unwrap();
    assert_eq!(db.groups(), groups, "a reopen keeps the merged ranges: {:?}", db.ranges());
    check_all(&db, 300, "after");
    db.put(&key(7), b"reopened").unwrap();
    assert_eq!(db.get(&key(7)).unwrap().as_deref(), Some(&b"reopened"[..]));
    db.close().unwrap();
}

#[test]
fn merged_ranges_serve_every_key_and_survive_a_reopen() {
    merge_and_serve(Config { groups: 2, ..Config::default() });
}

#[test]
fn merged_ranges_serve_every_key_on_three_nodes() {
    merge_and_serve(Config { groups: 2, nodes: 3, ..Config::default() });
}
