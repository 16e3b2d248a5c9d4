#![no_main]
//! `flotilla_engine::decoders::block` on arbitrary bytes: never a panic, never an unbounded allocation.
libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_engine::decoders::block(data));
