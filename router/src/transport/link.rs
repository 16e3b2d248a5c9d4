//! One outbound link: this node's queue of messages for one other node, and the writer task that owns the
//! connection to it — dials, says hello, then drains the queue into frames, one write per drain (batching by
//! draining, never by sleeping), and dials again with backoff when the connection fails.
//!
//! The queue is bounded in bytes (`TcpTransportOptions::queue_bytes_max`). Raft messages that do not fit are
//! dropped and counted (Raft retries: heartbeats, appends and votes are resent on the groups' own clocks).
//! Snapshot chunks have room up to twice the bound — a stream keeps at most its window in flight, so they are
//! rarely the ones refused — and a chunk that is dropped anyway is counted apart and resent by its stream after
//! `resend_ticks` (`peer/snapshot.rs`): slower, never silently lost. While the node is unreachable nothing is
//! queued: its messages are dropped at once (and counted), so that a reconnection does not start with a backlog
//! of stale ones.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::frame::{decode_frame, decode_message, encode_message, FrameError};
use super::wire::{Batch, Body, ForwardReply, ForwardRequest, Hello, HelloReply, WireEnvelope, PROTOCOL_VERSION};
use super::TcpTransportOptions;

/// What waits to go to one node.
#[derive(Default)]
struct Queue {
    envelopes: Vec<WireEnvelope>,
    bytes: usize,
    heartbeat: bool,
    requests: Vec<ForwardRequest>,
    replies: Vec<ForwardReply>,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.envelopes.is_empty() && !self.heartbeat && self.requests.is_empty() && self.replies.is_empty()
    }
}

pub(super) struct Link {
    pub(super) to_node: u64,
    addr: String,
    queue: Mutex<Queue>,
    wake: Notify,
    connected: AtomicBool,
}

impl Link {
    pub(super) fn new(to_node: u64, addr: String) -> Link {
        Link { to_node, addr, queue: Mutex::default(), wake: Notify::new(), connected: AtomicBool::new(false) }
    }

    pub(super) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Queues one round's envelopes for the node (see the module docs for what is dropped).
    pub(super) fn push(&self, envelopes: Vec<WireEnvelope>, queue_bytes_max: usize) {
        if !self.is_connected() {
            metrics::counter!("flotilla_transport_dropped_total", "reason" => "unreachable")
                .increment(envelopes.len() as u64);
            return;
        }
        let mut queue = self.queue.lock();
        let mut dropped = 0u64;
        let mut chunks_dropped = 0u64;
        for envelope in envelopes {
            let bytes = envelope.encoded_len();
            let is_chunk = matches!(envelope.body, Some(Body::Chunk(_)));
            let room = if is_chunk { 2 * queue_bytes_max } else { queue_bytes_max };
            if queue.bytes + bytes > room {
                if is_chunk {
                    chunks_dropped += 1;
                } else {
                    dropped += 1;
                }
                continue;
            }
            queue.bytes += bytes;
            queue.envelopes.push(envelope);
        }
        drop(queue);
        if dropped > 0 {
            metrics::counter!("flotilla_transport_dropped_total", "reason" => "queue_full").increment(dropped);
        }
        if chunks_dropped > 0 {
            metrics::counter!("flotilla_transport_chunks_dropped_total").increment(chunks_dropped);
        }
        self.wake.notify_one();
    }

    /// Queues a forwarded client request; false if it cannot go now (the node is unreachable, or its queue is
    /// full): the caller answers its client at once instead of waiting out a deadline.
    pub(super) fn push_request(&self, request: ForwardRequest, queue_bytes_max: usize) -> bool {
        let bytes = request.encoded_len();
        let mut queue = self.queue.lock();
        if !self.is_connected() || queue.bytes + bytes > queue_bytes_max {
            return false;
        }
        queue.bytes += bytes;
        queue.requests.push(request);
        drop(queue);
        self.wake.notify_one();
        true
    }

    /// Queues the answer to a request the node forwarded here (dropped if it cannot go: the node's request then
    /// times out, as one whose connection broke would).
    pub(super) fn push_reply(&self, reply: ForwardReply, queue_bytes_max: usize) {
        let bytes = reply.encoded_len();
        let mut queue = self.queue.lock();
        if !self.is_connected() || queue.bytes + bytes > 2 * queue_bytes_max {
            metrics::counter!("flotilla_transport_dropped_total", "reason" => "reply").increment(1);
            return;
        }
        queue.bytes += bytes;
        queue.replies.push(reply);
        drop(queue);
        self.wake.notify_one();
    }

    /// Asks for a liveness heartbeat in the next frame (sent even with nothing else queued).
    pub(super) fn heartbeat(&self) {
        if self.is_connected() {
            self.queue.lock().heartbeat = true;
            self.wake.notify_one();
        }
    }

    fn take(&self) -> Queue {
        std::mem::take(&mut *self.queue.lock())
    }

    /// The writer task: until the runtime stops, keeps a connection to the node and writes what is queued.
    pub(super) async fn run(
        self: Arc<Link>,
        options: Arc<TcpTransportOptions>,
        on_event: Arc<dyn Fn(super::NodeEvent) + Send + Sync>,
    ) {
        let mut backoff = options.reconnect_backoff_min;
        let mut last_error = String::new();
        loop {
            match self.dial(&options).await {
                Ok(stream) => {
                    eprintln!(
                        "flotilla: node {}: connected to node {} at {}",
                        options.node_id, self.to_node, self.addr
                    );
                    metrics::counter!("flotilla_transport_connects_total").increment(1);
                    backoff = options.reconnect_backoff_min;
                    last_error.clear();
                    self.connected.store(true, Ordering::Release);
                    let error = self.write_until_failure(stream, &options).await;
                    self.connected.store(false, Ordering::Release);
                    let lost = self.take().envelopes.len() as u64;
                    metrics::counter!("flotilla_transport_dropped_total", "reason" => "unreachable").increment(lost);
                    eprintln!("flotilla: node {}: connection to node {} lost: {error}", options.node_id, self.to_node);
                    on_event(super::NodeEvent::Unreachable(self.to_node));
                }
                Err(error) => {
                    // Logged when the reason changes, not at every retry of an unreachable node.
                    let error = error.to_string();
                    if error != last_error {
                        eprintln!(
                            "flotilla: node {}: cannot reach node {} at {}: {error} (retrying)",
                            options.node_id, self.to_node, self.addr
                        );
                        last_error = error;
                    }
                }
            }
            metrics::counter!("flotilla_transport_reconnects_total").increment(1);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(options.reconnect_backoff_max);
        }
    }

    /// Connects and says hello; the node must accept.
    async fn dial(&self, options: &TcpTransportOptions) -> std::io::Result<TcpStream> {
        let timeout = options.handshake_timeout;
        let within = |what: &'static str| move |_| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(within("connect timed out"))??;
        stream.set_nodelay(true)?;
        let hello = Hello {
            cluster_id: options.cluster_id.clone(),
            from_node: options.node_id,
            to_node: self.to_node,
            protocol_version: PROTOCOL_VERSION,
            listen_addr: options.listen_addr().to_string(),
            client_addr: options.client_addr.clone(),
        };
        let mut out = BytesMut::new();
        encode_message(&hello, &mut out);
        stream.write_all(&out).await?;
        let reply: HelloReply = tokio::time::timeout(timeout, read_one(&mut stream, 64 << 10))
            .await
            .map_err(within("no answer to hello"))??;
        if !reply.accepted {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("refused: {}", reply.reason),
            ));
        }
        Ok(stream)
    }

    /// Drains the queue into frames, one write per drain, until a write fails; returns why.
    async fn write_until_failure(&self, mut stream: TcpStream, options: &TcpTransportOptions) -> std::io::Error {
        let mut out = BytesMut::new();
        // The acceptor sends nothing after its hello reply: a read that ends means the connection closed.
        let (mut reader, mut writer) = stream.split();
        let mut probe = [0u8; 1];
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                read = reader.read(&mut probe) => {
                    return match read {
                        Ok(0) => std::io::Error::new(std::io::ErrorKind::ConnectionReset, "closed by the other node"),
                        Ok(_) => std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected bytes from the acceptor"),
                        Err(error) => error,
                    };
                }
            }
            let queue = self.take();
            if queue.is_empty() {
                continue;
            }
            let frames = encode_batches(queue, options.frame_bytes_max / 2, &mut out);
            metrics::counter!("flotilla_transport_frames_sent_total").increment(frames);
            metrics::counter!("flotilla_transport_bytes_sent_total").increment(out.len() as u64);
            if let Err(error) = writer.write_all(&out).await {
                return error;
            }
            out.clear();
        }
    }
}

/// Encodes a drained queue (its heartbeat flag, requests and replies in the first batch) as batches of at most
/// about `batch_bytes_max` each — one frame unless a drain holds more — into `out`; returns the number of frames.
fn encode_batches(queue: Queue, batch_bytes_max: usize, out: &mut BytesMut) -> u64 {
    let Queue { envelopes, heartbeat, requests, replies, .. } = queue;
    let mut frames = 0;
    let mut batch = Batch { envelopes: Vec::new(), heartbeat, requests, replies };
    let mut bytes = 0;
    for envelope in envelopes {
        let size = envelope.encoded_len();
        if !batch.envelopes.is_empty() && bytes + size > batch_bytes_max {
            encode_message(&batch, out);
            frames += 1;
            batch = Batch::default();
            bytes = 0;
        }
        bytes += size;
        batch.envelopes.push(envelope);
    }
    encode_message(&batch, out);
    frames + 1
}

/// Reads exactly one frame from `stream` and decodes it as `M` (the handshake's messages).
pub(super) async fn read_one<M: prost::Message + Default>(
    stream: &mut TcpStream,
    payload_bytes_max: usize,
) -> std::io::Result<M> {
    let mut buffer = BytesMut::with_capacity(256);
    loop {
        match decode_frame(&mut buffer, payload_bytes_max) {
            Ok(Some(payload)) => return decode_message(payload).map_err(invalid),
            Ok(None) => {}
            Err(error) => return Err(invalid(error)),
        }
        if stream.read_buf(&mut buffer).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed during the handshake"));
        }
    }
}

pub(super) fn invalid(error: FrameError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::frame::decode_frame;

    #[test]
    fn a_drain_is_one_frame_unless_it_outgrows_the_batch_bound() {
        let envelope = |n: u64| WireEnvelope { group_id: n, body: None };
        let mut out = BytesMut::new();
        let queue = |heartbeat| Queue { envelopes: (0..100).map(envelope).collect(), heartbeat, ..Queue::default() };
        assert_eq!(encode_batches(queue(true), 1 << 20, &mut out), 1);
        let batch: Batch = decode_message(decode_frame(&mut out, 1 << 20).unwrap().unwrap()).unwrap();
        assert_eq!(batch.envelopes.len(), 100);
        assert!(batch.heartbeat);
        assert!(out.is_empty());
        let frames = encode_batches(queue(false), 40, &mut out);
        assert!(frames > 1, "{frames} frames");
        let mut total = 0;
        while let Some(payload) = decode_frame(&mut out, 1 << 20).unwrap() {
            total += decode_message::<Batch>(payload).unwrap().envelopes.len();
        }
        assert_eq!(total, 100);
    }
}
