//! `flotilla demo`, the README's main job, on a small load: it must report every key read back, twice.

use std::process::Command;

#[test]
fn the_demo_loads_reads_back_reopens_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["demo", "--dir", data.to_str().unwrap(), "--keys", "3000", "--clients", "8"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("loaded 3000 keys"), "{text}");
    assert!(text.contains("read back 3000 keys") && text.contains("0 wrong or missing"), "{text}");
    assert!(text.contains("a full scan sees 3000 keys"), "{text}");
    assert!(text.contains("all good"), "{text}");
}
