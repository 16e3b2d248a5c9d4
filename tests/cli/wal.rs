//! The `flotilla wal-check` / `wal-repair` commands against a real WAL directory with a flipped bit.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_engine::disk::StdDisk;
use flotilla_engine::wal::record::LogOp;
use flotilla_engine::wal::{segment_path, Wal, WalOptions, SEGMENT_HEADER_BYTES};
use flotilla_raft::Entry;

fn flotilla(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla")).args(args).output().expect("runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn wal_check_reports_corruption_with_the_repair_command_and_repair_makes_it_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    let (mut wal, _) = Wal::open(&wal_dir, Arc::new(StdDisk), WalOptions::default()).unwrap();
    for index in 1..=5u64 {
        let entry = Entry { index, term: 1, data: Bytes::from(format!("entry {index}")), ..Default::default() };
        wal.write(&[(1, LogOp::Append(vec![entry]))]).unwrap();
    }
    drop(wal);
    let dir_arg = wal_dir.to_str().unwrap();
    let (code, text) = flotilla(&["wal-check", "--dir", dir_arg]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("healthy") && text.contains("5 records"), "{text}");
    // Flip a bit inside the second record (the second write's frame follows the header and the first frame).
    let path = segment_path(&wal_dir, 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[SEGMENT_HEADER_BYTES as usize + 4096 + 40] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let (code, text) = flotilla(&["wal-check", "--dir", dir_arg]);
    assert_eq!(code, 2, "{text}");
    let repair =
        text.lines().find_map(|l| l.split(": ").nth(1).filter(|c| c.starts_with("flotilla wal-repair"))).expect(&text);
    let args: Vec<&str> = repair.split_whitespace().skip(1).collect();
    let (code, text) = flotilla(&args);
    assert_eq!(code, 0, "{text}");
    let (code, text) = flotilla(&["wal-check", "--dir", dir_arg]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1 records"), "only the record before the damage remains: {text}");
    assert!(Path::new(&path).exists());
}

#[test]
fn the_wal_tools_refuse_a_database_that_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let db = flotilla::Db::open(dir.path()).unwrap();
    db.put(b"k", b"v").unwrap();
    let wal_dir = dir.path().join("wal");
    let (code, text) = flotilla(&["wal-check", "--dir", wal_dir.to_str().unwrap()]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("already open"), "{text}");
    let (code, text) =
        flotilla(&["wal-repair", "--dir", wal_dir.to_str().unwrap(), "--segment", "1", "--offset", "4096"]);
    assert_eq!(code, 2, "{text}");
    db.close().unwrap();
    let (code, text) = flotilla(&["wal-check", "--dir", wal_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
}
