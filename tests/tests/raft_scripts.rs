//! Runs every scenario script in `testdata/raft/` (see `flotilla_tests::script` for the format).
//! `REWRITE=1 cargo test -p flotilla-tests --test raft_scripts` writes the actual outputs back.

use std::path::Path;

#[test]
fn raft_scenario_scripts() {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/raft");
    let rewrite = std::env::var_os("REWRITE").is_some();
    let mut files: Vec<_> =
        std::fs::read_dir(&directory).expect("testdata/raft exists").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no scripts in {}", directory.display());
    let mut failures = Vec::new();
    for path in files {
        let expected = std::fs::read_to_string(&path).expect("readable script");
        let actual =
            flotilla_tests::script::run_script(&expected).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if rewrite {
            std::fs::write(&path, &actual).expect("writable script");
        } else if actual != expected {
            let first_difference = expected
                .lines()
                .zip(actual.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(expected.lines().count().min(actual.lines().count()));
            failures.push(format!(
                "{}: output differs from line {}:\n  expected: {:?}\n  actual:   {:?}\n(REWRITE=1 to accept)",
                path.display(),
                first_difference + 1,
                expected.lines().nth(first_difference),
                actual.lines().nth(first_difference)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
