//! Group commit: one writer thread makes the writes of many groups durable with one `fdatasync`.
//!
//! Requests (one per group `Ready`) wait in a bounded queue. The writer takes one, then everything else already
//! waiting — up to `batch_bytes_max` — and writes it all in one go: batching comes from what queued up during the
//! previous sync, never from sleeping. After the sync it updates the shared index and completes each request by
//! calling the request's [`Completion`] (the submitter's type: a channel of [`Persisted`], or what the raftstore
//! carries back — the messages that may go only once the write is durable). A request with no operations writes
//! nothing and completes once everything queued before it is durable, in order.
//!
//! A disk error is fatal: the writer stops, every waiting and later request fails with the stored reason, and
//! the node must stop (what was written may or may not be durable). So is anything else that stops the writer —
//! a request the WAL refuses (a bug above it), a panic: [`GroupCommitWal::on_failure`] tells the node at once.
//!
//! Metrics: `flotilla_wal_write_seconds` (encode + write + fdatasync + index update per batch),
//! `flotilla_wal_batch_requests`, `flotilla_wal_batch_bytes` (histograms); the counters
//! `flotilla_wal_segments_recycled_total` and `flotilla_wal_zeroed_bytes_total` (zeros written ahead in new
//! segments, `segment_writer.rs`); after each purge the gauges
//! `flotilla_wal_bytes`, `flotilla_wal_pinned_bytes_max`, `flotilla_wal_pinned_bytes_max_group`, and
//! `flotilla_wal_pinned_bytes{group}` for the [`PINNED_GROUPS_EXPORTED`] groups pinning the most (a gauge per group
//! for all of a node's groups would be up to 100K series; a group leaving that list is set back to 0).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::RwLock;

use super::record::LogOp;
use super::{PurgeReport, SegmentWriter, Wal, WalError, WalState};

/// Told once a write — and every write submitted before it — is durable. Called on the log's writer thread: it
/// must be quick (hand the news on; do not work there). The submitter's own type: what it gets back is typed.
pub trait Completion: Send {
    fn complete(self: Box<Self>, group_id: u64, ready_number: u64);
}

/// A group's `Ready` is durable (what a channel completion sends).
#[derive(Debug, PartialEq, Eq)]
pub struct Persisted {
    pub group_id: u64,
    pub ready_number: u64,
}

/// The plain completion: [`Persisted`] sent on a channel (a requester that went away no longer needs it).
impl Completion for Sender<Persisted> {
    fn complete(self: Box<Self>, group_id: u64, ready_number: u64) {
        let _ = self.send(Persisted { group_id, ready_number });
    }
}

/// What one group's `Ready` asks the WAL to persist.
pub struct WriteRequest {
    pub group_id: u64,
    pub ready_number: u64,
    pub ops: Vec<LogOp>,
    pub completion: Box<dyn Completion>,
}

impl WriteRequest {
    /// A request completed by [`Persisted`] on `reply`.
    pub fn new(group_id: u64, ready_number: u64, ops: Vec<LogOp>, reply: Sender<Persisted>) -> WriteRequest {
        WriteRequest::with_completion(group_id, ready_number, ops, Box::new(reply))
    }

    pub fn with_completion(
        group_id: u64,
        ready_number: u64,
        ops: Vec<LogOp>,
        completion: Box<dyn Completion>,
    ) -> WriteRequest {
        WriteRequest { group_id, ready_number, ops, completion }
    }

    /// Tells the requester its writes are durable.
    pub fn complete(self) {
        self.completion.complete(self.group_id, self.ready_number);
    }
}

/// What the writer thread is asked to do.
enum Command {
    Write(WriteRequest),
    /// Purge down to `bytes_max` of WAL (see `WalState::suggest_horizon`), replying with what it did.
    Purge {
        bytes_max: u64,
        reply: Sender<Result<PurgeReport, String>>,
    },
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

use crate::failure::Failure;
pub use crate::failure::FailureListener;

pub struct GroupCommitWal {
    state: Arc<RwLock<WalState>>,
    sender: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    failure: Arc<Failure>,
    stats: Arc<GroupCommitStats>,
}

impl GroupCommitWal {
    pub fn start(wal: Wal, options: GroupCommitOptions) -> GroupCommitWal {
        let (state, writer) = wal.into_parts();
        let state = Arc::new(RwLock::new(state));
        let (sender, receiver) = crossbeam_channel::bounded::<Command>(options.queue_capacity);
        let failure: Arc<Failure> = Arc::default();
        let stats = Arc::new(GroupCommitStats::default());
        let thread = {
            let (state, failure, stats) = (Arc::clone(&state), Arc::clone(&failure), Arc::clone(&stats));
            std::thread::Builder::new()
                .name("wal-writer".into())
                .spawn(move || {
                    // A panic (a bug) stops the writer like a disk error: with its reason, never silently.
                    let writer_failure = Arc::clone(&failure);
                    if let Err(reason) = crate::panics::catch("the WAL writer", move || {
                        run_writer(writer, state, receiver, options, writer_failure, stats)
                    }) {
                        failure.set(reason);
                    }
                })
                .expect("spawning the WAL writer thread")
        };
        GroupCommitWal { state, sender: Some(sender), thread: Some(thread), failure, stats }
    }

    /// Queues a request; blocks while the queue is full. Fails once the writer has stopped on a disk error.
    pub fn submit(&self, request: WriteRequest) -> Result<(), WalError> {
        if let Some(reason) = self.failure.get() {
            return Err(WalError::Invalid(format!("the WAL writer has stopped: {reason}")));
        }
        let sender = self.sender.as_ref().expect("sender lives until drop");
        match sender.try_send(Command::Write(request)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(command)) => sender.send(command).map_err(|_| self.stopped_error()),
            Err(TrySendError::Disconnected(_)) => Err(self.stopped_error()),
        }
    }

    /// Asks the writer to purge the WAL down to `bytes_max` (rewriting laggards as needed) between two writes,
    /// and waits for the outcome. Run it periodically, e.g. after the state machine's durable checkpoints.
    pub fn purge(&self, bytes_max: u64) -> Result<PurgeReport, WalError> {
        let (reply, outcome) = crossbeam_channel::bounded(1);
        let sender = self.sender.as_ref().expect("sender lives until drop");
        sender.send(Command::Purge { bytes_max, reply }).map_err(|_| self.stopped_error())?;
        outcome
            .recv()
            .map_err(|_| self.stopped_error())?
            .map_err(|reason| WalError::Invalid(format!("purge failed: {reason}")))
    }

    fn stopped_error(&self) -> WalError {
        let reason = self.failure.get().unwrap_or_else(|| "stopped".to_string());
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
        self.failure.get()
    }

    /// Calls `listener` with the reason once the writer stops on a failure (at once if it has).
    pub fn on_failure(&self, listener: FailureListener) {
        self.failure.listen(listener);
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
    receiver: Receiver<Command>,
    options: GroupCommitOptions,
    failure: Arc<Failure>,
    stats: Arc<GroupCommitStats>,
) {
    let mut deferred: Option<Command> = None;
    let mut exported_pinned_groups = Vec::new();
    let mut batch = Vec::new(); // reused: a batch may hold thousands of requests
    loop {
        let first = match deferred.take() {
            Some(command) => command,
            None => match receiver.recv() {
                Ok(command) => command,
                Err(_) => return,
            },
        };
        let first = match first {
            Command::Purge { bytes_max, reply } => {
                let outcome = purge(&mut writer, &state, bytes_max, &mut exported_pinned_groups);
                let fatal = outcome.as_ref().err().map(ToString::to_string);
                let _ = reply.send(outcome.map_err(|e| e.to_string()));
                if let Some(reason) = fatal {
                    failure.set(reason);
                    return;
                }
                continue;
            }
            Command::Write(request) => request,
        };
        let mut bytes = ops_bytes(&first);
        batch.push(first);
        while bytes < options.batch_bytes_max {
            match receiver.try_recv() {
                Ok(Command::Write(request)) => {
                    bytes += ops_bytes(&request);
                    batch.push(request);
                }
                Ok(purge_command) => {
                    // Runs right after this batch.
                    deferred = Some(purge_command);
                    break;
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = write_operations(&mut writer, &state, || {
            batch.iter().flat_map(|r| r.ops.iter().map(move |op| (r.group_id, op)))
        });
        stats.sync_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Err(error) = result {
            failure.set(error.to_string());
            // Dropping the receiver fails every waiting and later submit.
            return;
        }
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        metrics::histogram!("flotilla_wal_write_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("flotilla_wal_batch_requests").record(batch.len() as f64);
        metrics::histogram!("flotilla_wal_batch_bytes").record(bytes as f64);
        for request in batch.drain(..) {
            request.complete();
        }
    }
}

fn write_operations<'a, I>(
    writer: &mut SegmentWriter,
    state: &RwLock<WalState>,
    operations: impl Fn() -> I,
) -> Result<(), WalError>
where
    I: Iterator<Item = (u64, &'a LogOp)>,
{
    if operations().next().is_none() {
        return Ok(()); // requests with nothing to write: every earlier batch is durable already
    }
    state.read().validate(operations())?;
    if let Some((new_segment, salt)) = writer.rotate_if_full()? {
        state.write().add_segment(new_segment, salt);
    }
    let prepared = writer.prepare(operations());
    writer.append_and_sync(&prepared)?;
    state.write().apply(prepared);
    Ok(())
}

/// How many of the groups pinning the most WAL get their own `flotilla_wal_pinned_bytes` gauge.
pub const PINNED_GROUPS_EXPORTED: usize = 8;

fn purge(
    writer: &mut SegmentWriter,
    state: &RwLock<WalState>,
    bytes_max: u64,
    exported: &mut Vec<u64>,
) -> Result<PurgeReport, WalError> {
    let plan = {
        let state = state.read();
        let horizon = state.suggest_horizon(bytes_max, writer.active_id());
        state.purge_plan(horizon, writer.active_id())?
    };
    if !plan.rewrite.is_empty() {
        write_operations(writer, state, || plan.rewrite.iter().map(|(group, op)| (*group, op)))?;
    }
    state.write().remove_segments(&plan.doomed)?;
    let most_pinned = state.read().most_pinned(PINNED_GROUPS_EXPORTED);
    let (group, pinned) = most_pinned.first().copied().unwrap_or((0, 0));
    metrics::gauge!("flotilla_wal_pinned_bytes_max").set(pinned as f64);
    metrics::gauge!("flotilla_wal_pinned_bytes_max_group").set(group as f64);
    for gone in exported.iter().filter(|g| !most_pinned.iter().any(|(group, _)| group == *g)) {
        metrics::gauge!("flotilla_wal_pinned_bytes", "group" => gone.to_string()).set(0.0);
    }
    for (group, bytes) in &most_pinned {
        metrics::gauge!("flotilla_wal_pinned_bytes", "group" => group.to_string()).set(*bytes as f64);
    }
    *exported = most_pinned.iter().map(|(group, _)| *group).collect();
    metrics::gauge!("flotilla_wal_bytes").set(state.read().total_bytes() as f64);
    Ok(plan.report)
}
