//! Frames on a node-to-node connection: `[payload length: u32 LE][CRC-32C of the payload: u32 LE][payload]`, the
//! payload a prost message (`wire.rs`). Format and limits in `docs/wire-format.md`.
//!
//! The decoder never trusts the length it reads: a frame longer than the connection's limit is refused before
//! a byte of it is buffered beyond the header, and a checksum mismatch or an undecodable payload closes the
//! connection. Nothing here panics on any input (fuzzed: `tests/fuzz/fuzz_targets/frame.rs`, and a proptest in
//! the default tests).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes before the payload: its length and its checksum.
pub const HEADER_BYTES: usize = 8;

/// Why a connection's byte stream is not a sequence of frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The header announces more than the connection accepts.
    TooLarge { bytes: u64, max: usize },
    /// The payload is not what was sent (its checksum differs).
    Checksum { expected: u32, actual: u32 },
    /// The payload is not the message this point of the connection expects.
    Malformed(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { bytes, max } => write!(f, "a frame of {bytes} bytes, over the limit of {max}"),
            FrameError::Checksum { expected, actual } => {
                write!(f, "a frame whose checksum is {actual:#010x}, not {expected:#010x}")
            }
            FrameError::Malformed(what) => write!(f, "a malformed frame: {what}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Appends `payload` as one frame to `out`.
pub fn encode_frame(payload: &[u8], out: &mut BytesMut) {
    let length = u32::try_from(payload.len()).expect("a frame's payload is bounded far below 4 GiB");
    out.reserve(HEADER_BYTES + payload.len());
    out.put_u32_le(length);
    out.put_u32_le(crc32c::crc32c(payload));
    out.put_slice(payload);
}

/// Appends prost message `message` as one frame to `out`.
pub fn encode_message(message: &impl prost::Message, out: &mut BytesMut) {
    let length = message.encoded_len();
    out.reserve(HEADER_BYTES + length);
    let mut payload = Vec::with_capacity(length);
    message.encode(&mut payload).expect("a Vec grows as needed");
    encode_frame(&payload, out);
}

/// Takes one whole frame's payload off the front of `buffer`: `Ok(None)` until a whole frame is there (read more
/// and call again).
pub fn decode_frame(buffer: &mut BytesMut, payload_bytes_max: usize) -> Result<Option<Bytes>, FrameError> {
    if buffer.len() < HEADER_BYTES {
        return Ok(None);
    }
    let length = u32::from_le_bytes(buffer[0..4].try_into().expect("4 bytes")) as usize;
    if length > payload_bytes_max {
        return Err(FrameError::TooLarge { bytes: length as u64, max: payload_bytes_max });
    }
    if buffer.len() < HEADER_BYTES + length {
        buffer.reserve(HEADER_BYTES + length - buffer.len());
        return Ok(None);
    }
    let expected = u32::from_le_bytes(buffer[4..8].try_into().expect("4 bytes"));
    buffer.advance(HEADER_BYTES);
    let payload = buffer.split_to(length).freeze();
    let actual = crc32c::crc32c(&payload);
    if actual != expected {
        return Err(FrameError::Checksum { expected, actual });
    }
    Ok(Some(payload))
}

/// Decodes a frame's payload as prost message `M`.
pub fn decode_message<M: prost::Message + Default>(payload: Bytes) -> Result<M, FrameError> {
    M::decode(payload).map_err(|error| FrameError::Malformed(error.to_string()))
}

/// A connection's whole byte stream, decoded as the reader does (frames, then every message kind a frame may
/// hold), with a small frame limit: the entry point of the fuzz target and the proptest. Returns the frames
/// decoded before the stream ended or broke the rules. Never panics.
pub fn decode_stream(bytes: &[u8]) -> usize {
    let mut buffer = BytesMut::from(bytes);
    let mut frames = 0;
    while let Ok(Some(payload)) = decode_frame(&mut buffer, 1 << 16) {
        frames += 1;
        let _ = decode_message::<super::wire::Hello>(payload.clone());
        let _ = decode_message::<super::wire::HelloReply>(payload.clone());
        if let Ok(batch) = decode_message::<super::wire::Batch>(payload) {
            for envelope in batch.envelopes {
                let _ = envelope.into_envelope(1, 2);
            }
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_back_whole_from_any_split_of_the_stream() {
        let payloads: Vec<Vec<u8>> = vec![vec![], b"one".to_vec(), vec![7; 1000]];
        let mut stream = BytesMut::new();
        for payload in &payloads {
            encode_frame(payload, &mut stream);
        }
        for split in 0..stream.len() {
            let mut buffer = BytesMut::from(&stream[..split]);
            let mut got = Vec::new();
            while let Some(payload) = decode_frame(&mut buffer, 4096).unwrap() {
                got.push(payload.to_vec());
            }
            buffer.extend_from_slice(&stream[split..]);
            while let Some(payload) = decode_frame(&mut buffer, 4096).unwrap() {
                got.push(payload.to_vec());
            }
            assert_eq!(got, payloads, "split at {split}");
            assert!(buffer.is_empty());
        }
    }

    #[test]
    fn an_oversized_or_damaged_frame_is_an_error() {
        let mut stream = BytesMut::new();
        encode_frame(&[1; 100], &mut stream);
        assert_eq!(
            decode_frame(&mut stream.clone(), 99),
            Err(FrameError::TooLarge { bytes: 100, max: 99 }),
            "refused from its header alone"
        );
        let mut header_only = BytesMut::from(&stream[..HEADER_BYTES]);
        assert!(matches!(decode_frame(&mut header_only, 99), Err(FrameError::TooLarge { .. })));
        stream[HEADER_BYTES + 50] ^= 1;
        assert!(matches!(decode_frame(&mut stream, 4096), Err(FrameError::Checksum { .. })));
    }
}
