//! Where a range should split by load (issue 14's load trigger, after CockroachDB's and TiKV's load-based
//! splitting): the requests of a group counted per window, a uniform sample of their keys kept (reservoir
//! sampling, so memory is bounded whatever the rate), and — once the load has stayed over the bound for enough
//! windows in a row — the sampled key that halves it.
//!
//! Sans I/O and deterministic: the caller records each request's key ([`LoadSampler::record`]) and closes each
//! window on its own clock ([`LoadSampler::end_window`]); the sampler's random choices come from a seed. Which
//! requests count (writes, linearizable reads — served by the replica or locally) is the caller's: it records
//! where it routes them.

/// Settings of the load trigger.
#[derive(Clone, Debug)]
pub struct LoadSplitOptions {
    /// A window's requests over this make it a hot window. Default 2,500 (per 1 s window).
    pub requests_per_window_max: u64,
    /// Hot windows in a row before a split is proposed (a short burst does not split). Default 10.
    pub hot_windows: u32,
    /// Keys sampled per window at most. Default 256.
    pub samples_max: usize,
    /// The split must leave at least this share of the sampled requests on each side, in percent (a key
    /// hot on its own cannot be split off usefully). Default 25.
    pub side_share_min_percent: u64,
}

impl Default for LoadSplitOptions {
    fn default() -> LoadSplitOptions {
        LoadSplitOptions {
            requests_per_window_max: 2_500,
            hot_windows: 10,
            samples_max: 256,
            side_share_min_percent: 25,
        }
    }
}

/// One group's load, window by window.
#[derive(Clone, Debug)]
pub struct LoadSampler {
    options: LoadSplitOptions,
    /// Requests in the current window, and a uniform sample of their keys.
    requests: u64,
    samples: Vec<Vec<u8>>,
    hot_in_a_row: u32,
    rng: u64,
}

impl LoadSampler {
    pub fn new(options: LoadSplitOptions, seed: u64) -> LoadSampler {
        // Allocated as requests come: a node may hold 100,000 idle groups, each with a sampler.
        let samples = Vec::new();
        LoadSampler { options, requests: 0, samples, hot_in_a_row: 0, rng: seed | 1 }
    }

    /// One request for `key` in the current window.
    pub fn record(&mut self, key: &[u8]) {
        self.requests += 1;
        if self.samples.len() < self.options.samples_max {
            self.samples.push(key.to_vec());
            return;
        }
        // Reservoir sampling: the n-th request replaces a sample with probability samples_max / n.
        let slot = self.next_random() % self.requests;
        if let Some(sample) = self.samples.get_mut(slot as usize) {
            sample.clear();
            sample.extend_from_slice(key);
        }
    }

    /// `requests` requests in the current window, of which `keys` were sampled evenly (each standing for about
    /// `requests / keys.len()` of them): the keys join the sample, and every request counts.
    pub fn record_sampled(&mut self, requests: u64, keys: &[Vec<u8>]) {
        for key in keys {
            self.record(key);
        }
        self.requests += requests.saturating_sub(keys.len() as u64);
    }

    /// Closes the window: a split key if this was the last of `hot_windows` hot windows in a row and a sampled
    /// key leaves at least the minimum share of the requests on each side (it starts the right part). The
    /// count of hot windows starts again after a split key is returned.
    pub fn end_window(&mut self) -> Option<Vec<u8>> {
        let hot = self.requests > self.options.requests_per_window_max;
        self.hot_in_a_row = if hot { self.hot_in_a_row + 1 } else { 0 };
        let mut samples = std::mem::take(&mut self.samples);
        self.requests = 0;
        let split_key =
            (self.hot_in_a_row >= self.options.hot_windows).then(|| self.halving_key(&mut samples)).flatten();
        if split_key.is_some() {
            self.hot_in_a_row = 0;
        }
        // The buffer is kept for the next window only while the group is hot.
        samples.clear();
        if hot {
            self.samples = samples;
        }
        split_key
    }

    /// The sampled key nearest the middle that leaves at least the minimum share on each side.
    fn halving_key(&self, samples: &mut [Vec<u8>]) -> Option<Vec<u8>> {
        samples.sort_unstable();
        let n = samples.len();
        let min = (n as u64 * self.options.side_share_min_percent).div_ceil(100).max(1) as usize;
        // A key starts the right part: the left holds the samples before its first occurrence.
        let mut candidates: Vec<usize> = (1..n).filter(|&i| samples[i] != samples[i - 1]).collect();
        candidates.sort_by_key(|&i| i.abs_diff(n / 2));
        candidates.into_iter().find(|&i| i >= min && n - i >= min).map(|i| samples[i].clone())
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> LoadSplitOptions {
        LoadSplitOptions {
            requests_per_window_max: 1_000,
            hot_windows: 3,
            samples_max: 128,
            side_share_min_percent: 25,
        }
    }

    fn key(i: u64) -> Vec<u8> {
        format!("user:{i:010}").into_bytes()
    }

    #[test]
    fn sustained_load_over_the_bound_splits_where_it_halves() {
        let mut sampler = LoadSampler::new(options(), 7);
        let mut rng = 12345u64;
        for window in 1..=3 {
            for _ in 0..5_000 {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                sampler.record(&key((rng >> 33) % 1_000_000));
            }
            let split = sampler.end_window();
            if window < 3 {
                assert_eq!(split, None, "window {window}: not yet sustained");
            } else {
                // Keys drawn uniformly from user:0 … user:999999: the halving key is near user:0000500000.
                let split = String::from_utf8(split.expect("three hot windows")).unwrap();
                let at: u64 = split["user:".len()..].parse().unwrap();
                assert!((350_000..=650_000).contains(&at), "split at {split}");
            }
        }
        assert!(sampler.samples.capacity() <= 128 * 2, "bounded memory");
    }

    #[test]
    fn a_cool_window_resets_the_count() {
        let mut sampler = LoadSampler::new(options(), 7);
        // Hot, hot, cool, hot, hot: never three hot windows in a row.
        for window in 0..5 {
            let requests = if window == 2 { 10 } else { 5_000 };
            for i in 0..requests {
                sampler.record(&key(i));
            }
            assert_eq!(sampler.end_window(), None, "window {window}");
            if window == 2 {
                assert_eq!(sampler.samples.capacity(), 0, "a cool window frees the sample buffer");
            }
        }
        // The third hot window in a row splits.
        for i in 0..5_000 {
            sampler.record(&key(i));
        }
        assert!(sampler.end_window().is_some());
    }

    #[test]
    fn a_hot_key_is_not_split_off() {
        let hot_windows = |record: &dyn Fn(&mut LoadSampler, u64)| {
            let mut sampler = LoadSampler::new(options(), 9);
            let mut split = None;
            for _ in 0..3 {
                for i in 0..5_000u64 {
                    record(&mut sampler, i);
                }
                split = sampler.end_window();
            }
            split
        };
        assert_eq!(hot_windows(&|sampler, _| sampler.record(&key(42))), None, "one key");
        // 90 % of the requests to one key: no key leaves a quarter of them on each side.
        let mostly_one =
            |sampler: &mut LoadSampler, i: u64| sampler.record(&key(if i.is_multiple_of(10) { i } else { 42 }));
        assert_eq!(hot_windows(&mostly_one), None, "one key and a few others");
    }
}
