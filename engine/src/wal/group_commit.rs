//! Group commit: one writer thread makes the writes of many groups durable with one `fdatasync`.
//!
//! Requests (one per group `Ready`) wait in a bounded queue. The writer takes one, then everything else already
//! waiting — up to `batch_bytes_max` — and writes it all in one go: batching comes from what queued up during the
//! previous sync, never from sleeping. After the sync it updates the shared index and completes each request by
//! sending `Persisted { group_id, ready_number }` on the request's reply channel.
//!
//! A disk error is fatal: the writer stops, every waiting and later request fails with the stored reason, and
//! the node must stop (what was written may or may not be durable).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::{Mutex, RwLock};

use super::record::LogOp;
use super::{SegmentWriter, Wal, WalError, WalState};

/// A group's `Ready` is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Persisted {
    pub group_id: u64,
    pub ready_number: u64,
}

/// What one group's `Ready` asks the WAL to persist.
pub struct WriteRequest {
    pub group_id: u64,
    pub ready_number: u64,
    pub ops: Vec<LogOp>,
    pub reply: Sender<Persisted>,
}

/// Settings of the writer thread.
#[derive(Clone, Debug)]
pub struct GroupCommitOptions {
    /// Requests waiting for the writer; submitting to a full queue blocks (backpressure). Default 4096.
    pub queue_capacity: usize,
    /// Bytes of entries gathered into one write + sync at most (the first request always goes). Default 16 MiB.
    pub batch_bytes_max: u64,
}

impl Default for GroupCommitOptions {
    fn default() -> GroupCommitOptions {
        GroupCommitOptions { queue_capacity: 4096, batch_bytes_max: 16 << 20 }
    }
}

/// Counters of the writer, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct GroupCommitStats {
    pub syncs: AtomicU64,
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub sync_nanos: AtomicU64,
}

pub struct GroupCommitWal {
    state: Arc<RwLock<WalState>>,
    sender: Option<Sender<WriteRequest>>,
    thread: Option<JoinHandle<()>>,
    failure: Arc<Mutex<Option<String>>>,
    stats: Arc<GroupCommitStats>,
}

impl GroupCommitWal {
    pub fn start(wal: Wal, options: GroupCommitOptions) -> GroupCommitWal {
        let (state, writer) = wal.into_parts();
        let state = Arc::new(RwLock::new(state));
        let (sender, receiver) = crossbeam_channel::bounded(options.queue_capacity);
        let failure = Arc::new(Mutex::new(None));
        let stats = Arc::new(GroupCommitStats::default());
        let thread = {
            let (state, failure, stats) = (Arc::clone(&state), Arc::clone(&failure), Arc::clone(&stats));
            std::thread::Builder::new()
                .name("wal-writer".into())
                .spawn(move || run_writer(writer, state, receiver, options, failure, stats))
                .expect("spawning the WAL writer thread")
        };
        GroupCommitWal { state, sender: Some(sender), thread: Some(thread), failure, stats }
    }

    /// Queues a request; blocks while the queue is full. Fails once the writer has stopped on a disk error.
    pub fn submit(&self, request: WriteRequest) -> Result<(), WalError> {
        if let Some(reason) = self.failure.lock().clone() {
            return Err(WalError::Invalid(format!("the WAL writer has stopped: {reason}")));
        }
        let sender = self.sender.as_ref().expect("sender lives until drop");
        match sender.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(request)) => sender.send(request).map_err(|_| self.stopped_error()),
            Err(TrySendError::Disconnected(_)) => Err(self.stopped_error()),
        }
    }

    fn stopped_error(&self) -> WalError {
        let reason = self.failure.lock().clone().unwrap_or_else(|| "stopped".to_string());
        WalError::Invalid(format!("the WAL writer has stopped: {reason}"))
    }

    /// Shared read access to the index and the segments.
    pub fn state(&self) -> parking_lot::RwLockReadGuard<'_, WalState> {
        self.state.read()
    }

    pub fn stats(&self) -> &GroupCommitStats {
        &self.stats
    }

    /// The writer's fatal error, if it stopped on one.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }
}

impl Drop for GroupCommitWal {
    fn drop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn ops_bytes(request: &WriteRequest) -> u64 {
    request
        .ops
        .iter()
        .map(|op| match op {
            LogOp::Append(entries) => entries.iter().map(|e| e.size_bytes()).sum(),
            _ => 32,
        })
        .sum()
}

fn run_writer(
    mut writer: SegmentWriter,
    state: Arc<RwLock<WalState>>,
    receiver: Receiver<WriteRequest>,
    options: GroupCommitOptions,
    failure: Arc<Mutex<Option<String>>>,
    stats: Arc<GroupCommitStats>,
) {
    while let Ok(first) = receiver.recv() {
        let mut bytes = ops_bytes(&first);
        let mut batch = vec![first];
        while bytes < options.batch_bytes_max {
            match receiver.try_recv() {
                Ok(request) => {
                    bytes += ops_bytes(&request);
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = write_batch(&mut writer, &state, &batch);
        stats.sync_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Err(error) = result {
            *failure.lock() = Some(error.to_string());
            // Dropping the receiver fails every waiting and later submit.
            return;
        }
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        for request in batch {
            // A requester that went away no longer needs the answer.
            let _ = request.reply.send(Persisted { group_id: request.group_id, ready_number: request.ready_number });
        }
    }
}

fn write_batch(writer: &mut SegmentWriter, state: &RwLock<WalState>, batch: &[WriteRequest]) -> Result<(), WalError> {
    let operations = || batch.iter().flat_map(|r| r.ops.iter().map(move |op| (r.group_id, op)));
    state.read().validate(operations())?;
    if let Some(new_segment) = writer.rotate_if_full()? {
        state.write().add_segment(new_segment);
    }
    let prepared = writer.prepare(operations());
    writer.append_and_sync(&prepared)?;
    state.write().apply(prepared);
    Ok(())
}
