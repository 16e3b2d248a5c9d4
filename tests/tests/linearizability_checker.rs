//! The linearizability checker against a brute-force one on small random histories: both must agree on every
//! history, and the generator must produce plenty of both verdicts (a cross-check that only ever sees "yes" proves
//! nothing).

use flotilla_tests::linearizability::{check, check_brute_force, Call, Operation, Outcome, Verdict};
use proptest::prelude::*;

/// A history of up to 7 operations on two keys: clients run against a real register (each operation takes
/// effect at a random point inside its interval; an unknown one possibly never), then, sometimes, one outcome is
/// falsified.
/// Also says whether an outcome was falsified (if not, the history came from a real register: linearizable).
fn random_history(seed: u64) -> (Vec<Operation>, bool) {
    history_of(seed, 7, 3)
}

/// Up to `count_max` operations on two keys; each operation's interval spans about `overlap` others (how many
/// clients run at once).
fn history_of(seed: u64, count_max: u64, overlap: u64) -> (Vec<Operation>, bool) {
    let mut rng = seed | 1;
    let mut next = |bound: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % bound
    };
    let count = 1 + next(count_max) as usize;
    // Unique times: 2 per operation plus its linearization point, each drawn near the operation's place in the
    // history (within `overlap` operations), so intervals overlap about that much.
    let mut times: Vec<u64> = (0..3 * count as u64).collect();
    let window = (3 * overlap).max(1) as usize;
    for i in (1..times.len()).rev() {
        let j = i.saturating_sub(next(window as u64) as usize);
        times.swap(i, j);
    }
    let mut operations = Vec::new();
    let mut points = Vec::new();
    for i in 0..count {
        let mut triple = [times[3 * i], times[3 * i + 1], times[3 * i + 2]];
        triple.sort_unstable();
        let call = match next(4) {
            0 => Call::Get,
            1 => Call::Put(i as u64 + 1),
            2 => Call::Delete,
            _ => Call::CompareAndSet { expected: [None, Some(1), Some(2)][next(3) as usize], new: Some(i as u64 + 1) },
        };
        let key = if next(3) == 0 { b"b".to_vec() } else { b"a".to_vec() };
        let unknown = next(5) == 0;
        let takes_effect = !unknown || next(2) == 0;
        operations.push(Operation {
            client: i as u64,
            key,
            call,
            call_time: triple[0],
            result: if unknown { None } else { Some((Outcome::Done, triple[2])) },
        });
        points.push(takes_effect.then_some(triple[1]));
    }
    // Run the operations at their points against real registers to get truthful outcomes.
    let mut order: Vec<usize> = (0..count).filter(|&i| points[i].is_some()).collect();
    order.sort_by_key(|&i| points[i]);
    let mut registers: std::collections::HashMap<Vec<u8>, Option<u64>> = Default::default();
    for i in order {
        let state = registers.entry(operations[i].key.clone()).or_default();
        let outcome = match operations[i].call {
            Call::Get => Outcome::Got(*state),
            Call::Put(value) => {
                *state = Some(value);
                Outcome::Done
            }
            Call::Delete => {
                *state = None;
                Outcome::Done
            }
            Call::CompareAndSet { expected, new } => {
                let swapped = *state == expected;
                if swapped {
                    *state = new;
                }
                Outcome::Swapped(swapped)
            }
        };
        if let Some((recorded, _)) = &mut operations[i].result {
            *recorded = outcome;
        }
    }
    // Sometimes a lie: a read of another value, or a flipped compare-and-set.
    let lied = next(3) == 0;
    if lied {
        let i = next(count as u64) as usize;
        if let Some((outcome, _)) = &mut operations[i].result {
            *outcome = match outcome {
                Outcome::Got(seen) => {
                    Outcome::Got(if seen.is_some() && next(2) == 0 { None } else { Some(1 + next(count as u64)) })
                }
                Outcome::Swapped(swapped) => Outcome::Swapped(!*swapped),
                Outcome::Done => Outcome::Done,
            };
        }
    }
    (operations, lied)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, .. ProptestConfig::default() })]

    #[test]
    fn the_checker_agrees_with_brute_force(seed in any::<u64>()) {
        let (history, lied) = random_history(seed);
        let fast = check(&history, 1_000_000);
        if !lied {
            prop_assert_eq!(&fast, &Verdict::Linearizable, "a real register's history {:?}", history);
        }
        let inconclusive = matches!(fast, Verdict::Inconclusive { .. });
        prop_assert!(!inconclusive, "a 7-operation history needs few steps");
        prop_assert_eq!(fast == Verdict::Linearizable, check_brute_force(&history), "history {:?}", history);
    }
}

#[test]
fn the_generator_produces_both_verdicts() {
    let linearizable = (0..2000u64)
        .filter(|seed| check_brute_force(&random_history(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).0))
        .count();
    assert!(
        (400..1900).contains(&linearizable),
        "{linearizable} of 2000 linearizable: the cross-check needs both kinds"
    );
}

#[test]
fn store_sized_histories_resolve_within_the_step_budget() {
    // What the store simulator produces per key: hundreds of operations, several clients at once, some unknown.
    for seed in 1..40u64 {
        let (history, lied) = history_of(seed.wrapping_mul(0x2545_F491_4F6C_DD1D), 400, 6);
        let verdict = check(&history, 2_000_000);
        assert!(
            !matches!(verdict, Verdict::Inconclusive { .. }),
            "seed {seed}: {} operations ran out of steps",
            history.len()
        );
        if !lied {
            assert_eq!(verdict, Verdict::Linearizable, "seed {seed}");
        }
    }
}
