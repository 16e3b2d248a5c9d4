//! A snapshot of a range with 1 M keys streams through a fixed memory bound: resident memory grows by far less
//! than the range's size (~110 MB) while it is generated, shipped in 1 MiB chunks and installed.
//! (Its own test binary, so no other test shares the process while resident memory is sampled.)

use flotilla_engine::state_machine::{GroupApply, KvOp, StateMachine, StateMachineOptions};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).expect("resident field").parse().expect("a number");
    pages * 4096
}

#[test]
#[ignore = "heavy (1 M keys): scripts/test runs it in release mode with --ignored"]
fn a_one_million_key_snapshot_round_trip_stays_under_a_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let options =
        StateMachineOptions { memtable_bytes_max: 8 << 20, cache_bytes: 16 << 20, ..StateMachineOptions::default() };
    let source = StateMachine::open(&dir.path().join("source.redb"), options.clone()).unwrap();
    let target = StateMachine::open(&dir.path().join("target.redb"), options).unwrap();
    let value = vec![b'x'; 100];
    let keys = 1_000_000u64;
    for batch in 0..keys / 10_000 {
        let ops = (batch * 10_000..(batch + 1) * 10_000)
            .map(|i| KvOp::Put { key: format!("k{:015}", i * 7919 % keys).into_bytes(), value: value.clone() })
            .collect();
        if source
            .apply(vec![GroupApply { group_id: 1, ops, applied_index: batch + 1, applied_term: 1, range: None }])
            .unwrap()
        {
            source.flush().unwrap();
        }
    }
    source.flush().unwrap();
    let baseline = resident_bytes();
    let mut peak = baseline;
    let mut reader = source.snapshot_reader(1, b"", b"", 1 << 20).unwrap();
    target.begin_snapshot_install(1, b"", b"").unwrap();
    let mut chunks = 0;
    while let Some(chunk) = reader.next_chunk().unwrap() {
        target.receive_snapshot_chunk(1, &chunk).unwrap();
        chunks += 1;
        peak = peak.max(resident_bytes());
    }
    target.finish_snapshot_install(1, None).unwrap();
    peak = peak.max(resident_bytes());
    let growth_mib = (peak - baseline) as f64 / (1 << 20) as f64;
    println!(
        "{chunks} chunks; resident memory grew by {growth_mib:.1} MiB over {:.1} MiB",
        baseline as f64 / (1 << 20) as f64
    );
    assert!(chunks >= 100, "1 MiB chunks: {chunks}");
    assert_eq!(target.scan(b"", b"", usize::MAX).unwrap().len() as u64, keys);
    assert!(growth_mib < 64.0, "a ~110 MB range must stream in bounded memory; grew {growth_mib:.1} MiB");
}
