//! The frame decoder on arbitrary and on damaged streams (the cargo-fuzz target `tests/fuzz` `frame` runs the
//! same entry point for as long as one likes): never a panic; valid frames always come back whole; a flipped
//! bit is always caught.

use bytes::BytesMut;
use flotilla_router::transport::frame::{decode_frame, decode_stream, encode_message};
use flotilla_router::transport::wire::{Batch, WireEnvelope};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_stream(&bytes);
    }

    #[test]
    fn valid_frames_decode_and_any_flipped_bit_is_caught(
        groups in proptest::collection::vec(any::<u64>(), 1..20),
        flip in any::<prop::sample::Index>(),
    ) {
        let batch = Batch { envelopes: groups.iter().map(|&group_id| WireEnvelope { group_id, body: None }).collect(), heartbeat: true, ..Batch::default() };
        let mut stream = BytesMut::new();
        encode_message(&batch, &mut stream);
        prop_assert_eq!(decode_stream(&stream), 1);
        let at = flip.index(stream.len());
        stream[at] ^= 1;
        let mut damaged = stream.clone();
        let verdict = decode_frame(&mut damaged, 1 << 16);
        // A flip in the length makes the frame look shorter (a checksum error) or longer (still waiting, or
        // over the limit); anywhere else the checksum catches it.
        prop_assert!(!matches!(verdict, Ok(Some(_))), "flip at byte {} went unnoticed", at);
    }
}
