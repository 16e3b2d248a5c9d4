//! The simulators' seeded generator: the core's own SplitMix64 ([`SeededRng`]) with the draws the simulators
//! need. One seed determines a whole run.

use flotilla_raft::SeededRng;

#[derive(Clone, Debug)]
pub struct SimRng {
    inner: SeededRng,
}

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        // Decorrelated from the replicas' own election-timeout generators, which are seeded from small numbers.
        SimRng { inner: SeededRng::new(seed ^ 0x5DEE_CE66_D1CE_4E5B) }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// A value in `[0, bound)`; 0 if `bound` is 0.
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }

    pub fn range(&mut self, low: u64, high_inclusive: u64) -> u64 {
        low + self.below(high_inclusive - low + 1)
    }

    pub fn chance_per_mille(&mut self, per_mille: u32) -> bool {
        self.below(1000) < per_mille as u64
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }
}
