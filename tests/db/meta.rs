//! The meta range in the embedded `Db`: its table follows splits and merges (each group's leader publishes its
//! descriptor) and survives a reopen; keys starting with `ff` are the users' like any other (stored below the
//! system's keys, in order); a database of format 1 opens as before, without a meta range.

use std::time::{Duration, Instant};

use flotilla::raftstore::range::RangeDescriptor;
use flotilla::{Config, Db};

use super::split::key;

/// Waits until the meta range's table is exactly the ranges the groups hold.
fn meta_table_converges(db: &Db) -> Vec<RangeDescriptor> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (table, ranges) = (db.meta_range_table().unwrap(), db.ranges());
        if table == ranges {
            return table;
        }
        assert!(Instant::now() < deadline, "the meta range shows {table:#?}\nthe groups hold {ranges:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn meta_follows(config: Config) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), config.clone()).unwrap();
    assert_eq!(meta_table_converges(&db).len(), config.groups as usize, "the initial layout, as bootstrapped");
    for i in 0..200 {
        db.put(&key(i), b"v").unwrap();
    }
    for at in [50, 100, 150] {
        db.split_at(&key(at)).unwrap();
    }
    assert_eq!(meta_table_converges(&db).len(), config.groups as usize + 3);
    db.merge_left(&key(120)).unwrap();
    let table = meta_table_converges(&db);
    assert_eq!(table.len(), config.groups as usize + 2);
    assert!(table.iter().any(|piece| piece.contains(&key(50)) && piece.contains(&key(149))), "merged: {table:?}");
    db.close().unwrap();
    let db = Db::open_with(dir.path(), config).unwrap();
    assert_eq!(meta_table_converges(&db), table, "kept by a reopen");
    assert_eq!(db.scan(b"", b"", usize::MAX).unwrap().len(), 200, "the table's keys are not the users'");
    db.close().unwrap();
}

#[test]
fn the_meta_range_follows_splits_and_merges_on_one_node() {
    meta_follows(Config { groups: 2, ..Config::default() });
}

#[test]
fn the_meta_range_follows_splits_and_merges_on_three_nodes() {
    meta_follows(Config { groups: 1, nodes: 3, ..Config::default() });
}

#[test]
fn keys_starting_with_ff_are_the_users_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { groups: 4, ..Config::default() };
    let db = Db::open_with(dir.path(), config.clone()).unwrap();
    let mut keys: Vec<Vec<u8>> =
        vec![vec![0xfe], vec![0xfe, 0xff], vec![0xff], vec![0xff, 0x00], vec![0xff, 0xfe], vec![0xff, 0xff]];
    keys.extend([vec![0xff, 0xff, b'r'], vec![0xff, 0xff, 0xff], vec![0xff; 40]]);
    for key in &keys {
        db.put(key, key).unwrap();
    }
    db.split_at(&[0xff, 0xff]).unwrap();
    for key in &keys {
        assert_eq!(db.get(key).unwrap().as_ref(), Some(key), "{key:?}");
    }
    let scanned: Vec<Vec<u8>> = db.scan(b"", b"", usize::MAX).unwrap().into_iter().map(|(key, _)| key).collect();
    assert_eq!(scanned, keys, "every key, in order");
    let tail: Vec<Vec<u8>> = db.scan(&[0xff], &[0xff, 0xff, 0xff], 100).unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(tail, keys[2..7].to_vec());
    db.delete(&[0xff, 0xff]).unwrap();
    assert_eq!(db.get(&[0xff, 0xff]).unwrap(), None);
    assert_eq!(meta_table_converges(&db).len(), 5, "the table is not the users' to write");
    db.close().unwrap();
    let db = Db::open_with(dir.path(), config).unwrap();
    assert_eq!(db.get(&[0xff; 40]).unwrap(), Some(vec![0xff; 40]));
    db.close().unwrap();
}

#[test]
fn a_database_of_format_1_opens_without_a_meta_range() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { groups: 2, ..Config::default() };
    let layout = flotilla::layout::Layout { format_version: 1, nodes: 1, groups: 2, meta_range: false };
    std::fs::create_dir_all(dir.path()).unwrap();
    layout.record(&flotilla::engine::disk::StdDisk, dir.path()).unwrap();
    let db = Db::open_with(dir.path(), config.clone()).unwrap();
    assert_eq!(db.ranges().len(), 2);
    assert!(db.ranges().iter().all(|range| !range.is_meta()) && db.ranges()[1].end.is_empty());
    assert!(db.meta_range_table().unwrap().is_empty());
    db.put(&[0xff, 0xff, 0xff], b"raw").unwrap();
    db.split_at(&key(10)).unwrap();
    db.close().unwrap();
    // Upgraded to the current format at the first open, still without a meta range.
    let stored =
        flotilla::layout::read_file(&flotilla::engine::disk::StdDisk, &dir.path().join("LAYOUT"), 4096).unwrap();
    let stored = flotilla::layout::Layout::decode(&stored).unwrap();
    assert_eq!((stored.format_version, stored.meta_range), (flotilla::layout::FORMAT_VERSION, false));
    let db = Db::open_with(dir.path(), config).unwrap();
    assert_eq!(db.get(&[0xff, 0xff, 0xff]).unwrap().as_deref(), Some(&b"raw"[..]));
    assert_eq!(db.groups(), 3);
    assert!(db.ranges().iter().all(|range| !range.is_meta()));
    db.close().unwrap();
}
