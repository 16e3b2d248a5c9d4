//! The Raft core alone: three in-memory replicas in one thread, proposals batched 64 per step, each step driven
//! until the batch is committed and applied on all three. Reports entries committed per second.
//!
//! `cargo bench -p flotilla-benches --bench raft_core`

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flotilla_benches::CoreCluster;

fn commit_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_core");
    for payload_bytes in [16usize, 128] {
        let batch = 64;
        group.throughput(Throughput::Elements(batch as u64));
        let payload = Bytes::from(vec![b'x'; payload_bytes]);
        group.bench_function(format!("3_replicas_batch_64_payload_{payload_bytes}B"), |b| {
            let mut cluster = CoreCluster::new_three();
            let mut steps = 0u64;
            b.iter(|| {
                cluster.propose_and_commit(batch, &payload);
                steps += 1;
                if steps.is_multiple_of(1024) {
                    cluster.compact();
                }
            });
            assert!(cluster.committed() >= steps * batch as u64, "every batch was committed");
        });
    }
    group.finish();
}

criterion_group!(benches, commit_throughput);
criterion_main!(benches);
