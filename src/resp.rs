//! The Redis protocol (RESP2): requests parsed with bounds and replies encoded (the server's side), and replies
//! parsed and requests encoded (the client's side, [`parse_reply`], [`encode_request`]).
//!
//! A request is what Redis servers accept: an array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`), or an
//! inline command (`PING\r\n`, words separated by spaces, as `redis-cli` in a terminal and `telnet` send). Nothing
//! else — no nested arrays, no other frame kinds — so there is no nesting to bound. The bounds: arguments per
//! request (`args_max`), bytes per argument (`arg_bytes_max`) and bytes of one request (`request_bytes_max`),
//! checked from the headers before anything is buffered: an oversized request is refused with an error and the
//! connection closed (its bytes cannot be skipped safely), never buffered.

use bytes::{Buf, BytesMut};

/// Bounds of one request.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    pub args_max: usize,
    pub arg_bytes_max: usize,
    pub request_bytes_max: usize,
}

impl Default for RequestLimits {
    fn default() -> RequestLimits {
        RequestLimits { args_max: 1 << 16, arg_bytes_max: 16 << 20, request_bytes_max: 64 << 20 }
    }
}

/// Why the bytes are not a request (the connection is answered with `-ERR` and closed).
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// Takes one whole request off the front of `buffer`: `Ok(None)` until it is all there.
pub fn parse_request(buffer: &mut BytesMut, limits: &RequestLimits) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
    let Some(&first) = buffer.first() else { return Ok(None) };
    if first != b'*' {
        return parse_inline(buffer, limits);
    }
    let mut at = 0;
    let Some(count) = header(buffer, &mut at, b'*')? else { return Ok(None) };
    if count < 0 {
        buffer.advance(at);
        return Ok(Some(Vec::new())); // a null array: nothing to do
    }
    let count = count as usize;
    if count > limits.args_max {
        return Err(ProtocolError(format!("a request of {count} arguments, over the limit of {}", limits.args_max)));
    }
    let mut spans = Vec::with_capacity(count);
    let mut total = 0usize;
    for _ in 0..count {
        let Some(length) = header(buffer, &mut at, b'$')? else { return Ok(None) };
        let length = usize::try_from(length).map_err(|_| ProtocolError("a null bulk string as an argument".into()))?;
        if length > limits.arg_bytes_max {
            return Err(ProtocolError(format!(
                "an argument of {length} bytes, over the limit of {}",
                limits.arg_bytes_max
            )));
        }
        total += length;
        if total > limits.request_bytes_max {
            return Err(ProtocolError(format!("a request over the limit of {} bytes", limits.request_bytes_max)));
        }
        if buffer.len() < at + length + 2 {
            buffer.reserve(at + length + 2 - buffer.len());
            return Ok(None);
        }
        if &buffer[at + length..at + length + 2] != b"\r\n" {
            return Err(ProtocolError("a bulk string not ended by CRLF".into()));
        }
        spans.push(at..at + length);
        at += length + 2;
    }
    let request = spans.into_iter().map(|span| buffer[span].to_vec()).collect();
    buffer.advance(at);
    Ok(Some(request))
}

/// Reads `<kind><integer>\r\n` at `*at` (the integer at least -1); `Ok(None)` if the line is not all there yet.
fn header(buffer: &[u8], at: &mut usize, kind: u8) -> Result<Option<i64>, ProtocolError> {
    let rest = &buffer[*at..];
    let Some(&found) = rest.first() else { return Ok(None) };
    if found != kind {
        return Err(ProtocolError(format!("expected '{}', got {:?}", kind as char, found as char)));
    }
    let Some(end) = rest.windows(2).position(|pair| pair == b"\r\n") else {
        // A header is a short line: one that does not end soon is not a header.
        return if rest.len() > 32 { Err(ProtocolError("a header line too long".into())) } else { Ok(None) };
    };
    let text = std::str::from_utf8(&rest[1..end]).map_err(|_| ProtocolError("a header that is not a number".into()))?;
    let value: i64 = text.parse().map_err(|_| ProtocolError(format!("{text:?} is not a length")))?;
    if value < -1 {
        return Err(ProtocolError(format!("a length of {value}")));
    }
    *at += end + 2;
    Ok(Some(value))
}

/// An inline command: one line, words separated by spaces.
fn parse_inline(buffer: &mut BytesMut, limits: &RequestLimits) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
    let Some(end) = buffer.iter().position(|&byte| byte == b'\n') else {
        if buffer.len() > limits.arg_bytes_max.min(64 << 10) {
            return Err(ProtocolError("an inline request too long".into()));
        }
        return Ok(None);
    };
    let line = buffer.split_to(end + 1);
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let words: Vec<Vec<u8>> = line.split(|&byte| byte == b' ').filter(|w| !w.is_empty()).map(<[u8]>::to_vec).collect();
    if words.len() > limits.args_max {
        return Err(ProtocolError("an inline request with too many arguments".into()));
    }
    Ok(Some(words))
}

/// A reply, encoded as RESP2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(std::borrow::Cow<'static, str>),
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    Null,
    Array(Vec<Reply>),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    pub fn error(message: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {message}"))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(text) => {
                out.push(b'+');
                out.extend_from_slice(text.as_bytes());
            }
            Reply::Error(text) => {
                out.push(b'-');
                // One line: a CR or LF inside would end the error early.
                out.extend(text.bytes().map(|byte| if byte == b'\r' || byte == b'\n' { b' ' } else { byte }));
            }
            Reply::Integer(value) => out.extend_from_slice(format!(":{value}").as_bytes()),
            Reply::Bulk(bytes) => {
                out.extend_from_slice(format!("${}\r\n", bytes.len()).as_bytes());
                out.extend_from_slice(bytes);
            }
            Reply::Null => out.extend_from_slice(b"$-1"),
            Reply::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    item.encode(out);
                }
                return;
            }
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Encodes a request (an array of bulk strings) into `out`.
pub fn encode_request(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Arrays nest this deep at most in a reply a client accepts.
const REPLY_DEPTH_MAX: usize = 4;

/// Takes one whole reply off the front of `buffer`: `Ok(None)` until it is all there. Bulk strings are bounded
/// by `bulk_bytes_max`, arrays by `REPLY_DEPTH_MAX` levels.
pub fn parse_reply(buffer: &mut BytesMut, bulk_bytes_max: usize) -> Result<Option<Reply>, ProtocolError> {
    let mut at = 0;
    let Some(reply) = reply_at(buffer, &mut at, bulk_bytes_max, 0)? else { return Ok(None) };
    buffer.advance(at);
    Ok(Some(reply))
}

fn reply_at(
    buffer: &[u8],
    at: &mut usize,
    bulk_bytes_max: usize,
    depth: usize,
) -> Result<Option<Reply>, ProtocolError> {
    let rest = &buffer[*at..];
    let Some(&kind) = rest.first() else { return Ok(None) };
    let Some(end) = rest.windows(2).position(|pair| pair == b"\r\n") else {
        return if rest.len() > bulk_bytes_max.max(1 << 16) {
            Err(ProtocolError("a line too long".into()))
        } else {
            Ok(None)
        };
    };
    let line = &rest[1..end];
    let number = || -> Result<i64, ProtocolError> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| ProtocolError("not a number".into()))
    };
    let after_line = *at + end + 2;
    let reply = match kind {
        b'+' => Reply::Simple(String::from_utf8_lossy(line).into_owned().into()),
        b'-' => Reply::Error(String::from_utf8_lossy(line).into_owned()),
        b':' => Reply::Integer(number()?),
        b'$' => {
            let length = number()?;
            if length < 0 {
                *at = after_line;
                return Ok(Some(Reply::Null));
            }
            let length = length as usize;
            if length > bulk_bytes_max {
                return Err(ProtocolError(format!("a bulk string of {length} bytes, over {bulk_bytes_max}")));
            }
            if buffer.len() < after_line + length + 2 {
                return Ok(None);
            }
            *at = after_line + length + 2;
            return Ok(Some(Reply::Bulk(buffer[after_line..after_line + length].to_vec())));
        }
        b'*' => {
            let count = number()?;
            if count < 0 {
                *at = after_line;
                return Ok(Some(Reply::Null));
            }
            if depth >= REPLY_DEPTH_MAX {
                return Err(ProtocolError("arrays nested too deep".into()));
            }
            let mut items = Vec::new();
            let mut cursor = after_line;
            for _ in 0..count {
                match reply_at(buffer, &mut cursor, bulk_bytes_max, depth + 1)? {
                    Some(item) => items.push(item),
                    None => return Ok(None),
                }
            }
            *at = cursor;
            return Ok(Some(Reply::Array(items)));
        }
        other => return Err(ProtocolError(format!("a reply starting with {:?}", other as char))),
    };
    *at = after_line;
    Ok(Some(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut buffer = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(request) = parse_request(&mut buffer, &RequestLimits::default())? {
            out.push(request);
        }
        Ok(out)
    }

    #[test]
    fn requests_parse_from_any_split_and_pipelined() {
        let stream = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\nPING\r\n";
        let expected: Vec<Vec<Vec<u8>>> = vec![
            vec![b"GET".to_vec(), b"k".to_vec()],
            vec![b"SET".to_vec(), b"k".to_vec(), vec![]],
            vec![b"PING".to_vec()],
        ];
        assert_eq!(parse_all(stream).unwrap(), expected);
        for split in 0..stream.len() {
            let mut buffer = BytesMut::from(&stream[..split]);
            let mut got = Vec::new();
            while let Some(request) = parse_request(&mut buffer, &RequestLimits::default()).unwrap() {
                got.push(request);
            }
            buffer.extend_from_slice(&stream[split..]);
            while let Some(request) = parse_request(&mut buffer, &RequestLimits::default()).unwrap() {
                got.push(request);
            }
            assert_eq!(got, expected, "split at {split}");
        }
    }

    #[test]
    fn oversized_and_malformed_requests_are_refused_before_they_are_buffered() {
        let limits = RequestLimits { args_max: 3, arg_bytes_max: 10, request_bytes_max: 15 };
        let refused = |bytes: &[u8]| parse_request(&mut BytesMut::from(bytes), &limits).is_err();
        assert!(refused(b"*4\r\n"), "too many arguments, from the header alone");
        assert!(refused(b"*1\r\n$11\r\n"), "an argument too long, from its header alone");
        assert!(refused(b"*2\r\n$8\r\n12345678\r\n$8\r\n"), "the request too long");
        assert!(refused(b"*1\r\n*1\r\n"), "nested arrays");
        assert!(refused(b"*x\r\n"));
        assert!(refused(b"*1\r\n$1\r\nab\r\n"), "a bulk string longer than it said");
        assert!(refused(b"*99999999999999999999\r\n"));
        assert!(refused(&[b'*'; 100]), "a header that never ends");
    }

    #[test]
    fn replies_parse_back_from_any_split() {
        let replies = vec![
            Reply::ok(),
            Reply::Error("ERR no".into()),
            Reply::Integer(-3),
            Reply::Bulk(b"v\r\nw".to_vec()),
            Reply::Null,
            Reply::Array(vec![Reply::Array(vec![Reply::Bulk(vec![]), Reply::Integer(1)]), Reply::Null]),
        ];
        let mut stream = Vec::new();
        for reply in &replies {
            reply.encode(&mut stream);
        }
        for split in 0..stream.len() {
            let mut buffer = BytesMut::from(&stream[..split]);
            let mut got = Vec::new();
            while let Some(reply) = parse_reply(&mut buffer, 1 << 20).unwrap() {
                got.push(reply);
            }
            buffer.extend_from_slice(&stream[split..]);
            while let Some(reply) = parse_reply(&mut buffer, 1 << 20).unwrap() {
                got.push(reply);
            }
            assert_eq!(got, replies, "split at {split}");
        }
        assert!(parse_reply(&mut BytesMut::from(&b"$100\r\n"[..]), 10).is_err(), "over the bulk bound");
        assert!(parse_reply(&mut BytesMut::from(&b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n"[..]), 10).is_err(), "too deep");
    }

    #[test]
    fn replies_encode_as_resp2() {
        let mut out = Vec::new();
        Reply::Array(vec![Reply::Bulk(b"v".to_vec()), Reply::Null, Reply::Integer(3)]).encode(&mut out);
        Reply::error("bad\r\nthing").encode(&mut out);
        Reply::ok().encode(&mut out);
        assert_eq!(out, b"*3\r\n$1\r\nv\r\n$-1\r\n:3\r\n-ERR bad  thing\r\n+OK\r\n".to_vec());
    }
}
