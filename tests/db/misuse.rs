//! The embedded `Db` under misuse and damage (issue 11): a second open of a directory in use, a configuration
//! that does not match the database, a power cut soon after creation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla::engine::disk::{Disk, SimDisk};
use flotilla::{Config, Db, DbError};

use super::small_config;

/// Every file under `dir` with its bytes (the `LOCK` file aside: an open's lock attempt creates it).
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n != "LOCK") {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_second_open_in_this_process_is_refused_before_it_touches_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), small_config()).unwrap();
    for i in 0..100u32 {
        db.put(&i.to_be_bytes(), b"first").unwrap();
    }
    let before = files(dir.path());
    match Db::open_with(dir.path(), small_config()) {
        Err(DbError::AlreadyOpen(message)) => assert!(message.contains("LOCK"), "{message}"),
        other => panic!("a second open of a directory in use: {:?}", other.map(|_| "opened")),
    }
    assert_eq!(files(dir.path()), before, "the refused open changed files");
    for i in 100..200u32 {
        db.put(&i.to_be_bytes(), b"first").unwrap();
    }
    db.close().unwrap();
    // Once closed, the directory opens again, with every acknowledged write.
    let db = Db::open_with(dir.path(), small_config()).unwrap();
    assert_eq!(db.scan(b"", b"", usize::MAX).unwrap().len(), 200);
}

#[test]
fn a_second_open_from_another_process_is_refused_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), small_config()).unwrap();
    for i in 0..100u32 {
        db.put(&i.to_be_bytes(), b"parent").unwrap();
    }
    let before = files(dir.path());
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "misuse::child_opens_and_reports", "--test-threads=1", "--nocapture"])
        .env("FLOTILLA_TEST_OPEN_DIR", dir.path())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("child open: AlreadyOpen"), "the child was not refused: {printed}");
    assert_eq!(files(dir.path()), before, "the refused open changed files");
    for i in 100..200u32 {
        db.put(&i.to_be_bytes(), b"parent").unwrap();
    }
    drop(db);
    let db = Db::open_with(dir.path(), small_config()).unwrap();
    assert_eq!(db.scan(b"", b"", usize::MAX).unwrap().len(), 200, "acknowledged writes lost");
}

/// Run only as the child of the test above: tries to open the directory and prints what happened.
#[test]
fn child_opens_and_reports() {
    let Ok(dir) = std::env::var("FLOTILLA_TEST_OPEN_DIR") else { return };
    match Db::open_with(dir, small_config()) {
        Ok(db) => {
            // What a second writer did before the lock existed: write, and so overwrite the other's segment.
            let _ = db.put(b"child", b"child");
            println!("child open: opened");
        }
        Err(DbError::AlreadyOpen(_)) => println!("child open: AlreadyOpen"),
        Err(other) => println!("child open: {other}"),
    }
}

#[test]
fn a_database_opens_only_with_the_node_count_and_groups_it_was_created_with() {
    let dir = tempfile::tempdir().unwrap();
    let three = Config { nodes: 3, groups: 4, ..small_config() };
    let one = Config { nodes: 1, groups: 4, ..small_config() };
    {
        let db = Db::open_with(dir.path(), three.clone()).unwrap();
        db.put(b"k", b"v").unwrap();
        db.close().unwrap();
    }
    let refused = |config: Config, expected: &str| match Db::open_with(dir.path(), config) {
        Err(DbError::InvalidArgument(message)) => assert!(message.contains(expected), "{message}"),
        other => panic!("an open with another layout: {:?}", other.map(|_| "opened")),
    };
    refused(one.clone(), "created with nodes = 3 and groups = 4");
    refused(Config { groups: 16, ..three.clone() }, "created with nodes = 3 and groups = 4");
    let db = Db::open_with(dir.path(), three.clone()).unwrap();
    assert_eq!(db.get(b"k").unwrap(), Some(b"v".to_vec()));
    db.close().unwrap();

    // The reverse: created with one node, opened with three.
    let other = tempfile::tempdir().unwrap();
    Db::open_with(other.path(), one.clone()).unwrap().put(b"k", b"v").unwrap();
    match Db::open_with(other.path(), three.clone()) {
        Err(DbError::InvalidArgument(message)) => assert!(message.contains("nodes = 1"), "{message}"),
        result => panic!("{:?}", result.map(|_| "opened")),
    }

    // A database from before layouts were recorded: the node count is read off its files, and recorded.
    std::fs::remove_file(dir.path().join("LAYOUT")).unwrap();
    match Db::open_with(dir.path(), one) {
        Err(DbError::InvalidArgument(message)) => assert!(message.contains("3 node(s)"), "{message}"),
        result => panic!("{:?}", result.map(|_| "opened")),
    }
    assert!(!dir.path().join("LAYOUT").exists());
    let db = Db::open_with(dir.path(), three).unwrap();
    assert_eq!(db.get(b"k").unwrap(), Some(b"v".to_vec()));
    assert!(dir.path().join("LAYOUT").exists(), "recorded at the first open");
}

#[test]
fn a_damaged_layout_is_reported_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    Db::open_with(dir.path(), small_config()).unwrap().close().unwrap();
    let path = dir.path().join("LAYOUT");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    match Db::open_with(dir.path(), small_config()) {
        Err(DbError::Storage(message)) => assert!(message.contains("LAYOUT is damaged"), "{message}"),
        result => panic!("{:?}", result.map(|_| "opened")),
    }
}

/// A power cut soon after creation keeps every acknowledged write: every directory entry the database created
/// (its directory, `wal/`, `state.redb`, the node directories) was durable before anything was acknowledged. The
/// writes outgrow the memtable, so the state file checkpoints them and the WAL is compacted and purged behind it:
/// only the state file holds the first writes when the power goes.
fn power_cut_soon_after_creation_keeps_acknowledged_writes(config: Config) {
    let disk = SimDisk::new();
    let dir = Path::new("/data/deeper/db");
    let key = |i: u32| i.wrapping_mul(2_654_435_761).to_be_bytes();
    let value = |i: u32| [i.to_be_bytes().as_slice(), &[b'v'; 1020]].concat();
    let keys = 3_000;
    {
        let db = Db::open_on(Arc::new(disk.clone()), dir, config.clone()).unwrap();
        for i in 0..keys {
            db.put(&key(i), &value(i)).unwrap();
        }
        std::thread::sleep(config.maintenance_interval * 6); // a few maintenance passes: compaction and purge
        disk.power_off();
        drop(db);
    }
    disk.crash(|_, _| 0);
    let db = Db::open_on(Arc::new(disk.clone()), dir, config).unwrap();
    for i in 0..keys {
        assert_eq!(db.get(&key(i)).unwrap(), Some(value(i)), "key {i} lost");
    }
    assert!(disk.list(dir).unwrap().iter().any(|p| p.ends_with("LAYOUT")));
}

#[test]
fn a_power_cut_soon_after_creation_loses_nothing_acknowledged() {
    power_cut_soon_after_creation_keeps_acknowledged_writes(Config { groups: 4, ..small_config() });
}

#[test]
fn a_power_cut_soon_after_creation_loses_nothing_acknowledged_on_three_nodes() {
    power_cut_soon_after_creation_keeps_acknowledged_writes(Config { nodes: 3, groups: 2, ..small_config() });
}
