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

/// Asserts that an open was refused with an error of `kind` whose text holds `needle`.
fn assert_refused(opened: Result<Db, DbError>, kind: fn(String) -> DbError, needle: &str) {
    match opened {
        Ok(_) => panic!("opened; expected a refusal saying {needle:?}"),
        Err(error) => {
            assert_eq!(std::mem::discriminant(&error), std::mem::discriminant(&kind(String::new())), "{error:?}");
            assert!(error.to_string().contains(needle), "{error}");
        }
    }
}

/// A database in `dir` with keys 0..100 written, `value` each.
fn open_with_keys(dir: &Path, value: &[u8]) -> Db {
    let db = Db::open_with(dir, small_config()).unwrap();
    for i in 0..100u32 {
        db.put(&i.to_be_bytes(), value).unwrap();
    }
    db
}

#[test]
fn a_second_open_in_this_process_is_refused_before_it_touches_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_with_keys(dir.path(), b"first");
    let before = files(dir.path());
    assert_refused(Db::open_with(dir.path(), small_config()), DbError::AlreadyOpen, "LOCK");
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
    let db = open_with_keys(dir.path(), b"parent");
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
    let refused = |config: Config, expected: &str| {
        assert_refused(Db::open_with(dir.path(), config), DbError::InvalidArgument, expected)
    };
    refused(one.clone(), "created with nodes = 3 and groups = 4");
    refused(Config { groups: 16, ..three.clone() }, "created with nodes = 3 and groups = 4");
    let db = Db::open_with(dir.path(), three.clone()).unwrap();
    assert_eq!(db.get(b"k").unwrap(), Some(b"v".to_vec()));
    db.close().unwrap();

    // The reverse: created with one node, opened with three.
    let other = tempfile::tempdir().unwrap();
    Db::open_with(other.path(), one.clone()).unwrap().put(b"k", b"v").unwrap();
    assert_refused(Db::open_with(other.path(), three.clone()), DbError::InvalidArgument, "nodes = 1");

    // A database from before layouts were recorded (format 0, without checksums) is refused, not read as empty.
    std::fs::remove_file(dir.path().join("LAYOUT")).unwrap();
    for config in [one, three] {
        assert_refused(Db::open_with(dir.path(), config), DbError::Storage, "before format 1");
    }
    assert!(!dir.path().join("LAYOUT").exists());
}

#[test]
fn a_damaged_layout_is_reported_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    Db::open_with(dir.path(), small_config()).unwrap().close().unwrap();
    let path = dir.path().join("LAYOUT");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert_refused(Db::open_with(dir.path(), small_config()), DbError::Storage, "LAYOUT is damaged");
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
        std::thread::sleep(config.store.log_gc_interval * 6); // a few maintenance passes: compaction and purge
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

#[test]
fn a_batch_over_its_byte_bound_is_refused_at_once_and_the_database_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { request_timeout: std::time::Duration::from_secs(30), ..small_config() };
    let db = Db::open_with(dir.path(), config.clone()).unwrap();
    // Eight values within the per-value limit, 64 MiB together: more than one log record holds.
    let value = vec![7u8; config.value_bytes_max];
    let mut batch = flotilla::WriteBatch::new();
    for i in 0..8u8 {
        batch.put(vec![0x10, i], value.clone());
    }
    let started = std::time::Instant::now();
    match db.write_batch(batch) {
        Err(DbError::InvalidArgument(message)) => assert!(message.contains("batch_bytes_max"), "{message}"),
        other => panic!("an oversized batch: {other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "refused before anything was proposed");
    db.put(b"\x10after", &value).unwrap();
    assert_eq!(db.get(b"\x10after").unwrap(), Some(value));
    db.close().unwrap();
}

#[test]
fn limits_that_cannot_hold_together_are_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let open = |config: Config| match Db::open_with(dir.path(), config) {
        Err(DbError::InvalidArgument(message)) => message,
        other => panic!("{:?}", other.map(|_| "opened")),
    };
    // A value over what one log record holds, even with the batch bound raised to match.
    let message = open(Config { value_bytes_max: 65 << 20, batch_bytes_max: 66 << 20, ..small_config() });
    assert!(message.contains("lower batch_bytes_max"), "{message}");
    // A value that could never be written alone.
    let message = open(Config { value_bytes_max: 40 << 20, ..small_config() });
    assert!(message.contains("must fit in batch_bytes_max"), "{message}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "a refused configuration created files");
}

/// A value whose bytes are easy to find in the state file.
fn marked_value(i: u32) -> Vec<u8> {
    format!("MARKED-VALUE-{i:06}-").repeat(20).into_bytes()
}

/// Writes keys with marked values and closes (checkpointing them into `state.redb`); returns the keys.
fn database_with_marked_values(dir: &Path) -> Vec<Vec<u8>> {
    let db = Db::open_with(dir, small_config()).unwrap();
    let keys: Vec<Vec<u8>> = (0..200u32).map(|i| [&[0x20], &i.to_be_bytes()[..]].concat()).collect();
    for (i, key) in keys.iter().enumerate() {
        db.put(key, &marked_value(i as u32)).unwrap();
    }
    db.close().unwrap();
    keys
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

#[test]
fn a_damaged_value_block_is_reported_as_storage_failure_promptly_and_the_node_stops() {
    let dir = tempfile::tempdir().unwrap();
    let keys = database_with_marked_values(dir.path());
    let path = dir.path().join("state.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = find(&bytes, &marked_value(100)).expect("the value is in the state file");
    bytes[at + 5] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let db =
        Db::open_with(dir.path(), Config { request_timeout: std::time::Duration::from_secs(30), ..small_config() })
            .unwrap();
    let started = std::time::Instant::now();
    match db.get(&keys[100]) {
        Err(DbError::Storage(message)) => {
            assert!(message.contains("checksum") || message.contains("corrupt"), "{message}")
        }
        other => panic!("a read of a damaged block: {other:?}"),
    }
    // The node stopped with the reason: every later request is refused at once, never left to time out.
    for key in &keys[..20] {
        assert!(matches!(db.get(key), Err(DbError::Storage(_))));
        assert!(matches!(db.put(key, b"v"), Err(DbError::Storage(_))));
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(matches!(db.close(), Err(DbError::Storage(_))), "close reports the failure");
    // The failure left a mark: the next open verifies the whole state file first, and finds the damage there.
    assert!(dir.path().join("CHECK-STATE").exists());
    match Db::open_with(dir.path(), small_config()) {
        Err(DbError::Storage(message)) => assert!(message.to_lowercase().contains("corrupt"), "{message}"),
        result => panic!("a damaged state file opened after a failure: {:?}", result.map(|_| "opened")),
    }
}

/// Every key reads back its value or the read fails with a storage error; a scan returns everything or fails.
/// Never a wrong answer, never a panic, never a wait for the timeout.
fn reads_are_right_or_refused(db: &Db, keys: &[Vec<u8>]) -> usize {
    let mut refused = 0;
    for (i, key) in keys.iter().enumerate() {
        match db.get(key) {
            Ok(value) => assert_eq!(value, Some(marked_value(i as u32)), "key {i}: a wrong answer"),
            Err(DbError::Storage(_)) => refused += 1,
            Err(other) => panic!("key {i}: {other:?}"),
        }
    }
    match db.scan(b"", b"", usize::MAX) {
        Ok(pairs) => assert_eq!(pairs.len(), keys.len(), "a scan with missing pairs"),
        Err(DbError::Storage(_)) => refused += 1,
        Err(other) => panic!("scan: {other:?}"),
    }
    refused
}

#[test]
fn a_zeroed_region_of_the_state_file_is_reported_never_a_panic_or_a_wrong_answer() {
    let dir = tempfile::tempdir().unwrap();
    let keys = database_with_marked_values(dir.path());
    let path = dir.path().join("state.redb");
    let original = std::fs::read(&path).unwrap();
    let mut outcomes = Vec::new();
    // Each 64 KiB region of the file in turn (the header, B-tree pages, data blocks, free space).
    for start in (0..original.len()).step_by(64 << 10) {
        let mut bytes = original.clone();
        let end = (start + (64 << 10)).min(bytes.len());
        bytes[start..end].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let config = Config { request_timeout: std::time::Duration::from_secs(30), ..small_config() };
        let outcome = match Db::open_with(dir.path(), config) {
            Err(DbError::Storage(message)) => format!("open refused: {message}"),
            Err(other) => panic!("region at {start}: {other:?}"),
            Ok(db) => {
                let refused = reads_are_right_or_refused(&db, &keys);
                let _ = db.close();
                format!("{refused} reads refused")
            }
        };
        outcomes.push((start, outcome));
    }
    eprintln!("{outcomes:#?}");
    let refused = outcomes
        .iter()
        .filter(|(_, outcome)| outcome.starts_with("open refused") || !outcome.starts_with("0 "))
        .count();
    assert!(refused * 2 >= outcomes.len(), "most regions hold something a read needs: {outcomes:?}");
}

/// A database on a simulated disk with acknowledged writes only in the WAL (no checkpoint since), the power cut.
fn acknowledged_in_the_wal_only(keys: u32) -> (SimDisk, &'static Path, Config) {
    let disk = SimDisk::new();
    let dir = Path::new("/db");
    let config = Config {
        groups: 2,
        wal: flotilla::engine::wal::WalOptions { segment_bytes_max: 64 << 10, ..Default::default() },
        ..small_config()
    };
    let config = Config {
        state_machine: flotilla::engine::state_machine::StateMachineOptions {
            memtable_bytes_max: 64 << 20,
            ..config.state_machine.clone()
        },
        ..config
    };
    let db = Db::open_on(Arc::new(disk.clone()), dir, config.clone()).unwrap();
    for i in 0..keys {
        db.put(&i.to_be_bytes(), &[b'v'; 100]).unwrap();
    }
    disk.power_off();
    drop(db);
    disk.crash(|_, _| 0);
    (disk, dir, config)
}

fn newest_segment(disk: &SimDisk, dir: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = disk
        .list(&dir.join("wal"))
        .unwrap()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "wal") && !p.to_string_lossy().contains("recycle"))
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

/// A reopen after a lost WAL suffix: refused as `needle` says — or, when the power went in the middle of a
/// rotation, the newest segment was the successor with nothing in it yet (recovery finishes such a rotation off):
/// then nothing acknowledged is lost. (The engine's `lost_suffix` tests check each detection deterministically.)
fn refused_or_whole(disk: &SimDisk, dir: &Path, config: Config, needle: &str) {
    let opened = Db::open_on(Arc::new(disk.clone()), dir, config);
    let Ok(db) = opened else { return assert_refused(opened, DbError::Storage, needle) };
    for i in 0..2_000u32 {
        assert_eq!(db.get(&i.to_be_bytes()).unwrap(), Some(vec![b'v'; 100]), "key {i} lost silently");
    }
}

#[test]
fn a_wal_that_lost_its_newest_segment_or_its_end_is_refused_as_corruption() {
    // The newest segment cut to 60 %.
    let (disk, dir, config) = acknowledged_in_the_wal_only(2_000);
    let newest = newest_segment(&disk, dir);
    let mut file = disk.open(&newest, false).unwrap();
    let len = file.len_bytes().unwrap();
    file.truncate(len * 6 / 10).unwrap();
    drop(file);
    refused_or_whole(&disk, dir, config, "shorter than");
    // The newest segment deleted.
    let (disk, dir, config) = acknowledged_in_the_wal_only(2_000);
    disk.remove(&newest_segment(&disk, dir)).unwrap();
    refused_or_whole(&disk, dir, config, "is missing");
    // Every segment deleted.
    let (disk, dir, config) = acknowledged_in_the_wal_only(200);
    for file in disk.list(&dir.join("wal")).unwrap() {
        disk.remove(&file).unwrap();
    }
    for _ in 0..2 {
        assert_refused(Db::open_on(Arc::new(disk.clone()), dir, config.clone()), DbError::Storage, "the WAL was lost");
    }
}
