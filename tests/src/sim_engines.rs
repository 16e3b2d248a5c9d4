//! What the store simulator puts around the production store (`SteppedStore`) in place of a node's threads and
//! sockets: a log whose writes wait for the simulated disk ([`SimLog`]), a transport that hands every envelope
//! back to the simulated network ([`SimOutbox`]), and a checkpointer that leaves checkpoints to the simulator
//! ([`SimCheckpoints`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use flotilla_engine::disk::SimDisk;
use flotilla_engine::failure::FailureListener;
use flotilla_engine::flusher::Checkpointer;
use flotilla_engine::log_engine::{LogEngine, SyncWal};
use flotilla_engine::state_machine::StateMachineError;
use flotilla_engine::wal::group_commit::WriteRequest;
use flotilla_engine::wal::record::LogOp;
use flotilla_engine::wal::WalError;
use flotilla_raft::{Entry, HardState};
use flotilla_raftstore::message::Envelope;
use flotilla_raftstore::store::liveness::NodeMessage;
use flotilla_raftstore::store::Transport;
use parking_lot::Mutex;

/// A node's log: the real WAL, written on the caller's thread (`SyncWal`), behind a queue that holds writes while
/// the disk is slow. A write is durable — and in the log's index — only once it leaves the queue, as with the
/// group-commit writer; the queue keeps the order writes were submitted in, and a write from outside a poll round
/// (a bootstrap, a destroy, which wait for it) or a purge first lets every queued one through.
pub struct SimLog {
    wal: SyncWal,
    queue: Mutex<VecDeque<WriteRequest>>,
    /// Writes wait in the queue (a slow disk) while set.
    hold: AtomicBool,
    /// Log records written, by kind (for the report).
    pub snapshots: AtomicU64,
    pub compactions: AtomicU64,
}

impl SimLog {
    pub fn new(wal: SyncWal) -> SimLog {
        SimLog {
            wal,
            queue: Mutex::default(),
            hold: AtomicBool::new(false),
            snapshots: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
        }
    }

    /// A slow disk: writes submitted from now on wait until [`SimLog::persist_one`] (or a later write that does
    /// not wait) lets them through.
    pub fn hold(&self, hold: bool) {
        self.hold.store(hold, Ordering::SeqCst);
    }

    /// Writes waiting for the disk.
    pub fn queued(&self) -> usize {
        self.queue.lock().len()
    }

    /// The disk completes its oldest waiting write; false if none waits.
    pub fn persist_one(&self) -> Result<bool, WalError> {
        let Some(request) = self.queue.lock().pop_front() else { return Ok(false) };
        self.write(request)?;
        Ok(true)
    }

    /// The power goes in the middle of the oldest waiting write: it fails, and a prefix of it may reach the
    /// disk. True if there was one.
    pub fn tear(&self, disk: &SimDisk) -> bool {
        let Some(request) = self.queue.lock().pop_front() else { return false };
        // Its bytes are written but its sync fails: the crash that follows keeps a prefix of them, or none.
        disk.fail_next_syncs(1);
        let _ = self.wal.submit(request);
        disk.fail_next_syncs(0);
        true
    }

    fn drain(&self) -> Result<(), WalError> {
        while self.persist_one()? {}
        Ok(())
    }

    fn write(&self, request: WriteRequest) -> Result<(), WalError> {
        for op in &request.ops {
            match op {
                LogOp::Snapshot { .. } => self.snapshots.fetch_add(1, Ordering::Relaxed),
                LogOp::Compact { .. } => self.compactions.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
        }
        self.wal.submit(request)
    }
}

impl LogEngine for SimLog {
    fn submit(&self, request: WriteRequest) -> Result<(), WalError> {
        if self.hold.load(Ordering::SeqCst) {
            self.queue.lock().push_back(request);
            return Ok(());
        }
        self.drain()?;
        self.write(request)
    }

    fn hard_state(&self, group_id: u64) -> HardState {
        self.wal.hard_state(group_id)
    }

    fn first_index(&self, group_id: u64) -> u64 {
        self.wal.first_index(group_id)
    }

    fn last_index(&self, group_id: u64) -> u64 {
        self.wal.last_index(group_id)
    }

    fn term(&self, group_id: u64, index: u64) -> Option<u64> {
        self.wal.term(group_id, index)
    }

    fn entries(&self, group_id: u64, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>, WalError> {
        self.wal.entries(group_id, low, high, max_bytes)
    }

    fn on_failure(&self, listener: FailureListener) {
        self.wal.on_failure(listener);
    }

    fn purge(&self, bytes_max: u64) -> Result<(), WalError> {
        self.drain()?;
        self.wal.purge(bytes_max)
    }
}

/// A node's transport: every envelope its replicas send, and every node message, waits here until the simulator
/// takes it into its network.
#[derive(Default)]
pub struct SimOutbox {
    sent: Mutex<(Vec<Envelope>, Vec<NodeMessage>)>,
}

impl SimOutbox {
    pub fn take(&self) -> (Vec<Envelope>, Vec<NodeMessage>) {
        std::mem::take(&mut *self.sent.lock())
    }
}

impl Transport for SimOutbox {
    fn send(&self, envelope: Envelope) {
        self.sent.lock().0.push(envelope);
    }

    fn send_node(&self, message: NodeMessage) {
        self.sent.lock().1.push(message);
    }
}

/// Checkpoints are the simulator's to take (at random steps); the store's calls after each apply do nothing.
pub struct SimCheckpoints;

impl Checkpointer for SimCheckpoints {
    fn after_apply(&self, _over_budget: bool) -> Result<(), StateMachineError> {
        Ok(())
    }
}
