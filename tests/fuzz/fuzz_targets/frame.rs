#![no_main]
//! A node-to-node connection's byte stream (frames, then the handshake and batch messages they hold), on arbitrary
//! bytes: never a panic, never more than one frame's limit buffered.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flotilla_router::transport::frame::decode_stream(data);
});
