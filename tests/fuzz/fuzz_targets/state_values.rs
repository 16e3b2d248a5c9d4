#![no_main]
//! `flotilla_engine::decoders::state_values` on arbitrary bytes: never a panic, never an unbounded allocation.
libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_engine::decoders::state_values(data));
