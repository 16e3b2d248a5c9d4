//! Every decoder of bytes read back from disk, fed arbitrary bytes (bounded here; the cargo-fuzz targets in
//! `tests/fuzz` run the same entry points for as long as one likes): none may panic or allocate without bound.
//! 256 cases per decoder by default; `PROPTEST_CASES` raises it.

use flotilla_engine::decoders;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), .. ProptestConfig::default() })]

    #[test]
    fn wal_records(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decoders::wal_record(&bytes);
    }

    #[test]
    fn wal_segments(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        decoders::wal_segment(&bytes);
    }

    #[test]
    fn blocks(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        decoders::block(&bytes);
    }

    #[test]
    fn damaged_blocks(
        entries in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..12), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24))),
            0..24,
        ),
        damage in proptest::collection::vec((any::<usize>(), 1..=255u8), 1..4),
    ) {
        decoders::damaged_block(&entries, &damage);
    }

    #[test]
    fn bloom_filters(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        decoders::bloom(&bytes);
    }

    #[test]
    fn run_records(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decoders::run_record(&bytes);
    }

    #[test]
    fn state_values(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        decoders::state_values(&bytes);
    }
}

/// Segments whose records are well-formed log operations in a random order (so replay goes deep), each record's
/// payload from a real encoding: recovery accepts or reports, never panics.
#[test]
fn wal_segments_of_real_operations_in_any_order() {
    use flotilla_engine::wal::record::{encode, LogOp};
    use flotilla_raft::{Entry, HardState};
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..cases() {
        let mut input = vec![(next() % 8) as u8];
        for _ in 0..next() % 12 {
            let index = [0u64, 1, 2, 5, 100, u64::MAX / 2, u64::MAX][(next() % 7) as usize].wrapping_add(next() % 3);
            let op = match next() % 5 {
                0 => LogOp::Append(
                    (0..1 + next() % 3)
                        .map(|i| Entry { index: index.wrapping_add(i), term: next() % 4, ..Default::default() })
                        .collect(),
                ),
                1 => LogOp::HardState(HardState { term: next() % 4, vote: next() % 3, commit: index }),
                2 => LogOp::Truncate { from_index: index },
                3 => LogOp::Compact { first_kept_index: index, base_term: next() % 4 },
                _ => LogOp::Snapshot { index, term: next() % 4 },
            };
            let mut record = Vec::new();
            encode(0, 0, &op, &mut record);
            let payload = &record[17..];
            let kind = record[8] | if next() % 3 == 0 { 0x80 } else { 0 };
            input.extend_from_slice(&[kind, (next() % 4) as u8]);
            input.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            input.extend_from_slice(payload);
        }
        decoders::wal_segment(&input);
    }
}
