//! Benchmarks live in `benches/` (criterion); shared helpers for them live here.
