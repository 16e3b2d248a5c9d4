#![no_main]
//! A stored range descriptor (the raftstore's) and a database's `LAYOUT` file, on arbitrary bytes: never a panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(range) = flotilla_raftstore::range::RangeDescriptor::decode_stored(data) {
        let _ = range.contains(data);
        let _ = range.check(&[data], None);
    }
    let _ = flotilla::layout::Layout::decode(data);
});
