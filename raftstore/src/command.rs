//! What a group's log carries, and what applying it does.
//!
//! A client write becomes one [`Command`] (one Raft entry): a request id, the range epoch the client routed with,
//! and its operations — puts, deletes and compare-and-sets on keys of the group's range. A command is atomic: its
//! compare-and-sets are preconditions checked at apply time against the applied state, and if any fails the
//! command changes nothing (the client learns which failed). The epoch and the keys are checked again at apply,
//! because a split or membership change may have committed between proposal and apply: a command that no longer
//! fits is refused with a typed error, never applied to the wrong range.
//!
//! [`apply_entries`] turns a run of committed entries into one [`GroupApply`] for the state machine (so many groups'
//! entries can share one write) and one [`Applied`] per command for the waiting clients. Empty entries (a new
//! leader's no-op) and membership entries only move the applied index here.

use std::collections::BTreeMap;

use bytes::Bytes;
use flotilla_engine::contract::{GroupApply, KvEngine, KvOp, StateMachineError};
use flotilla_raft::Entry;
use prost::Message as _;

use crate::peer::{BOOTSTRAP_INDEX, BOOTSTRAP_TERM};
use crate::range::{MergeLock, MergeState, RangeDescriptor, RangeEpoch, RangeError, SplitRequest};

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum OpKind {
    Put = 0,
    Delete = 1,
    /// Sets `value` if the key's current value is `expected` (or the key is absent, with `expect_absent`).
    CompareAndSet = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Op {
    #[prost(enumeration = "OpKind", tag = "1")]
    pub kind: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub value: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub expected: Vec<u8>,
    #[prost(bool, tag = "5")]
    pub expect_absent: bool,
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op { kind: OpKind::Put as i32, key: key.into(), value: value.into(), ..Default::default() }
    }

    pub fn delete(key: impl Into<Vec<u8>>) -> Op {
        Op { kind: OpKind::Delete as i32, key: key.into(), ..Default::default() }
    }

    /// Sets `value` if the current value is `expected` (`None`: the key must be absent).
    pub fn compare_and_set(key: impl Into<Vec<u8>>, expected: Option<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        let expect_absent = expected.is_none();
        Op {
            kind: OpKind::CompareAndSet as i32,
            key: key.into(),
            value: value.into(),
            expected: expected.unwrap_or_default(),
            expect_absent,
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    /// Chosen by the proposer to find its waiting client (unique per proposer while it waits).
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(message, optional, tag = "2")]
    pub epoch: Option<RangeEpoch>,
    #[prost(message, repeated, tag = "3")]
    pub ops: Vec<Op>,
    /// An administrative command instead of operations: split the group's range (applied on every replica:
    /// `RangeDescriptor::split`). Routed with the whole epoch: a split proposed under one membership must not
    /// apply under another.
    #[prost(message, optional, boxed, tag = "4")]
    pub split: Option<Box<SplitRequest>>,
    /// An administrative command instead of operations: one step of a merge (`peer/merge.rs`), routed with the
    /// whole epoch of the group it is proposed to.
    #[prost(message, optional, boxed, tag = "5")]
    pub merge: Option<Box<MergeCommand>>,
    /// A command of the meta group instead of operations: a group's leader publishes its descriptor in the
    /// range table (`meta.rs`; unrouted: any epoch of the meta range takes it).
    #[prost(message, optional, boxed, tag = "6")]
    pub publish: Option<Box<RangeDescriptor>>,
    /// Instead of everything above: plain writes a leader proposed together as one entry (those that reached it
    /// in one handling, `peer/propose.rs`), each applied in order as a command of its own, with its own
    /// outcome and client. One entry for many writes: the log, replication and apply pay their per-entry costs
    /// once. (A batch holds no administrative command, and no batch.)
    #[prost(message, repeated, tag = "7")]
    pub batch: Vec<Command>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum MergeStep {
    /// On the left range: lock it for taking `right` in (its epoch stays as it is until the merge ends).
    Prepare = 0,
    /// On the right range: freeze it for a merge into `left`, which is locked for it (no more writes; its data is
    /// final).
    Freeze = 1,
    /// On the frozen right range: the merge will commit (every replica holds the freeze). Final.
    Decide = 2,
    /// On the locked left range: take the decided `right` in (its replicas here end).
    Commit = 3,
    /// On the frozen right range, not decided: the merge is given up; the range takes writes again.
    Unfreeze = 4,
    /// On the locked left range: the lock is given up (the right range will never freeze for it).
    Cancel = 5,
    /// On a range neither frozen nor locked: its version moves on, so that a freeze routed with the old epoch
    /// never applies (a locked left range ends a wait for a freeze that may never come).
    Fence = 6,
}

/// One step of a merge, carried through a group's log.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MergeCommand {
    #[prost(enumeration = "MergeStep", tag = "1")]
    pub step: i32,
    /// `Freeze`: the left range, locked for this one.
    #[prost(message, optional, tag = "2")]
    pub left: Option<RangeDescriptor>,
    /// `Prepare`: the right range as the lock is taken; `Commit`: the right range as it was decided.
    #[prost(message, optional, tag = "3")]
    pub right: Option<RangeDescriptor>,
}

impl MergeCommand {
    pub fn new(step: MergeStep, left: Option<RangeDescriptor>, right: Option<RangeDescriptor>) -> MergeCommand {
        MergeCommand { step: step as i32, left, right }
    }
}

impl Command {
    /// A write of `ops`, routed with `epoch` (`None`: unchecked).
    pub fn write(epoch: Option<RangeEpoch>, ops: Vec<Op>) -> Command {
        Command { request_id: 0, epoch, ops, ..Command::default() }
    }

    /// A split of the range, routed with its whole current epoch.
    pub fn split(epoch: RangeEpoch, split: SplitRequest) -> Command {
        Command { epoch: Some(epoch), split: Some(Box::new(split)), ..Command::default() }
    }

    /// A step of a merge, proposed to a group at its whole epoch `epoch`.
    pub fn merge(epoch: RangeEpoch, merge: MergeCommand) -> Command {
        Command { epoch: Some(epoch), merge: Some(Box::new(merge)), ..Command::default() }
    }

    /// A publication of `range` in the meta range's table, for the meta group (`meta.rs`).
    pub fn publish(range: RangeDescriptor) -> Command {
        Command { publish: Some(Box::new(range)), ..Command::default() }
    }

    /// Plain writes proposed as one entry (see [`Command::batch`]).
    pub fn batch(writes: Vec<Command>) -> Command {
        Command { batch: writes, ..Command::default() }
    }

    /// A write of operations only: no administrative command, no batch (what a batch may hold).
    pub fn is_plain_write(&self) -> bool {
        self.split.is_none() && self.merge.is_none() && self.publish.is_none() && self.batch.is_empty()
    }

    pub fn encode_entry(&self) -> Bytes {
        Bytes::from(self.encode_to_vec())
    }
}

/// What applying one command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every operation took effect.
    Done,
    /// A compare-and-set's precondition failed (the position of the first that did): nothing took effect.
    PreconditionFailed { op: usize, current: Option<Vec<u8>> },
    /// The command no longer fits the range (a split came first): nothing took effect. (Its client is answered
    /// `PeerError::Range`, as if refused when proposed.)
    Refused(RangeError),
    /// A membership change that no longer fit the configuration when it applied: skipped on every replica.
    InvalidMembership,
    /// The range was split; the new group took `right`.
    Split { right: Box<RangeDescriptor> },
    /// A split that did not fit the range when it applied (the reason): skipped on every replica.
    InvalidSplit(String),
    /// A merge step took effect: the range as it now is (after a commit, the left range with the right one in).
    Merge { range: Box<RangeDescriptor> },
    /// A merge step that did not fit the range when it applied (the reason): skipped on every replica.
    InvalidMerge(String),
}

/// One applied command, for its waiting client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub request_id: u64,
    pub index: u64,
    pub term: u64,
    pub outcome: Outcome,
}

/// Why entries cannot be applied: the log holds something this code did not write (a bug or corruption: the
/// replica must stop), or the state machine failed.
#[derive(Debug)]
pub enum ApplyError {
    Undecodable {
        index: u64,
        reason: String,
    },
    /// A merge committed while this node's replica of the range it takes in can never apply the decision (it
    /// ended, or moved past: every replica's log holds the decision before the merge is proposed — a bug).
    MergeNotReady {
        index: u64,
        reason: String,
    },
    Engine(StateMachineError),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Undecodable { index, reason } => {
                write!(f, "committed entry {index} is not a command: {reason}")
            }
            ApplyError::MergeNotReady { index, reason } => write!(f, "the merge at entry {index}: {reason}"),
            ApplyError::Engine(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for ApplyError {}

/// Applies the group's committed `entries` (in order): returns the state machine batch and each command's outcome.
/// Reads for compare-and-set see the engine's applied state overlaid with the writes of earlier entries here, so
/// call it only once the group's previous batch is in the engine (apply is sequential per group; many groups'
/// batches may still share one `KvEngine::apply`). Membership changes are skipped: a replica applies those with
/// `Peer::apply_committed`, which uses [`ApplyBatch`] around them.
pub fn apply_entries(
    engine: &dyn KvEngine,
    descriptor: &RangeDescriptor,
    entries: &[Entry],
) -> Result<(GroupApply, Vec<Applied>), ApplyError> {
    let mut batch = ApplyBatch::new(descriptor.group_id);
    batch.apply(engine, &mut descriptor.clone(), entries)?;
    let (mut groups, applied) = batch.finish();
    Ok((groups.remove(0), applied))
}

/// A group a split applied here made: its range, and its replica appointed to lead it first
/// (`SplitRequest::first_leader`).
#[derive(Clone, Debug, PartialEq)]
pub struct SplitOff {
    pub range: RangeDescriptor,
    pub first_leader: Option<crate::range::Replica>,
}

/// One group's committed entries being applied, possibly in several steps (around membership changes).
pub struct ApplyBatch {
    pub group: GroupApply,
    pub applied: Vec<Applied>,
    /// The ranges of the groups its splits made here: each one's first state (its descriptor, applied at the
    /// bootstrap index) is written with the group's batch (its data is already there: the range's keys), and the
    /// node opens their replicas.
    pub split_off: Vec<SplitOff>,
    /// The groups its merges ended here (their records are written with the batch; the node stops their
    /// replicas).
    pub merged: Vec<u64>,
    /// The records of the groups in `merged`, written with the batch.
    merged_records: Vec<GroupApply>,
    /// This batch's writes so far, for the compare-and-sets of later entries.
    overlay: Overlay,
    /// The range table writes of this batch's publications so far (the meta group's), for the later ones.
    published: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// A merge commit this batch stopped at, by index, with the range it takes in: this node's replica of that
    /// range has not applied the decision yet (it has not heard that it committed, or a crash; see
    /// `Peer::apply_committed`). Nothing from it on is applied.
    pub waits_at: Option<(u64, RangeDescriptor)>,
    /// The first entry after this range's merge decision, where the batch stopped: a range decided for a merge
    /// applies nothing after its decision (`peer/merge.rs`; a new leader's no-op would move its applied index
    /// past the one the left group's commit writes in its record — `store-sim` seeds 342 and 9874).
    pub held_after_decision: Option<u64>,
}

/// Where each key written so far in a batch was last written (its position among the batch's operations). Built
/// only when a compare-and-set asks: a batch of plain puts and deletes never pays for it.
#[derive(Default)]
struct Overlay {
    last_write: BTreeMap<Vec<u8>, usize>,
    /// How many of the batch's operations are indexed.
    indexed: usize,
}

impl Overlay {
    /// What `ops` (the batch's operations so far) leave at `key`: `None` if they do not write it, `Some(None)` if
    /// they delete it.
    fn get<'a>(&mut self, ops: &'a [KvOp], key: &[u8]) -> Option<Option<&'a [u8]>> {
        for (position, op) in ops.iter().enumerate().skip(self.indexed) {
            let (KvOp::Put { key, .. } | KvOp::Delete { key }) = op;
            self.last_write.insert(key.clone(), position);
        }
        self.indexed = ops.len();
        self.last_write.get(key).map(|&position| match &ops[position] {
            KvOp::Put { value, .. } => Some(value.as_slice()),
            KvOp::Delete { .. } => None,
        })
    }
}

impl ApplyBatch {
    pub fn new(group_id: u64) -> ApplyBatch {
        ApplyBatch {
            group: GroupApply { group_id, ..Default::default() },
            applied: Vec::new(),
            split_off: Vec::new(),
            merged: Vec::new(),
            merged_records: Vec::new(),
            overlay: Overlay::default(),
            published: BTreeMap::new(),
            waits_at: None,
            held_after_decision: None,
        }
    }

    /// Whether the batch stopped before the end of its entries: at a merge commit that waits (`waits_at`), or
    /// after its range's merge decision (`held_after_decision`).
    pub fn stopped(&self) -> bool {
        self.waits_at.is_some() || self.held_after_decision.is_some()
    }

    /// Applies the commands among `entries` (no-ops and membership changes only advance the applied index); a
    /// split changes `descriptor` (and the batch records it), so the commands after it see the shrunk range.
    pub fn apply(
        &mut self,
        engine: &dyn KvEngine,
        descriptor: &mut RangeDescriptor,
        entries: &[Entry],
    ) -> Result<(), ApplyError> {
        for entry in entries {
            if self.stopped() {
                return Ok(());
            }
            if descriptor.merge.is_some_and(|state| state.decided_index != 0 && entry.index > state.decided_index) {
                self.held_after_decision = Some(entry.index);
                return Ok(());
            }
            let before = (self.group.applied_index, self.group.applied_term);
            (self.group.applied_index, self.group.applied_term) = (entry.index, entry.term);
            if entry.is_conf_change() || entry.data.is_empty() {
                continue;
            }
            // Decoded from the entry's `Bytes` (a cheap clone): each key and value is copied once, into its `Vec`,
            // where decoding from a slice copies it twice (prost takes a slice's field out as `Bytes` first).
            let mut command = Command::decode(entry.data.clone())
                .map_err(|e| ApplyError::Undecodable { index: entry.index, reason: e.to_string() })?;
            if !command.batch.is_empty() {
                self.apply_writes(engine, descriptor, std::mem::take(&mut command.batch), entry)?;
                continue;
            }
            let request_id = command.request_id;
            let outcome = match (command.split.take(), command.merge.take(), command.publish.take()) {
                (Some(split), _, _) => self.apply_split(engine, descriptor, command.epoch, &split),
                (None, Some(merge), _) => self.apply_merge(engine, descriptor, command.epoch, *merge, entry)?,
                (None, None, Some(range)) => self.apply_publish(engine, descriptor, &range)?,
                (None, None, None) => {
                    apply_command(engine, descriptor, command, &mut self.overlay, &mut self.group.ops)?
                }
            };
            if self.waits_at.is_some() {
                (self.group.applied_index, self.group.applied_term) = before; // this entry waits
                return Ok(());
            }
            self.applied.push(Applied { request_id, index: entry.index, term: entry.term, outcome });
        }
        Ok(())
    }

    /// The writes of one batch entry ([`Command::batch`]), in order, each with its own outcome.
    fn apply_writes(
        &mut self,
        engine: &dyn KvEngine,
        descriptor: &RangeDescriptor,
        writes: Vec<Command>,
        entry: &Entry,
    ) -> Result<(), ApplyError> {
        for write in writes {
            if !write.is_plain_write() {
                let reason = "a batch of writes holds an administrative command".to_string();
                return Err(ApplyError::Undecodable { index: entry.index, reason });
            }
            let request_id = write.request_id;
            let outcome = apply_command(engine, descriptor, write, &mut self.overlay, &mut self.group.ops)?;
            self.applied.push(Applied { request_id, index: entry.index, term: entry.term, outcome });
        }
        Ok(())
    }

    /// A split: the range shrinks to its left part here (recorded with the batch), and the right part's group
    /// is created with the batch — unless this node's state machine has a state for that group already (a
    /// snapshot of the new group reached this replica before the split did: it is newer). Refused unless routed
    /// with the range's whole current epoch.
    fn apply_split(
        &mut self,
        engine: &dyn KvEngine,
        descriptor: &mut RangeDescriptor,
        sent: Option<RangeEpoch>,
        split: &SplitRequest,
    ) -> Outcome {
        if let Some(refused) = whole_epoch_refusal(descriptor, sent) {
            return refused;
        }
        if descriptor.is_merging() {
            return Outcome::Refused(RangeError::Merging { current: Box::new(descriptor.clone()) });
        }
        let (left, right) = match descriptor.split(split) {
            Ok(parts) => parts,
            Err(reason) => return Outcome::InvalidSplit(reason),
        };
        *descriptor = left;
        self.group.range = Some(descriptor.encode());
        if engine.applied(right.group_id) == (0, 0) {
            let first_leader = split.first_leader(&right).cloned();
            self.split_off.push(SplitOff { range: right.clone(), first_leader });
        }
        Outcome::Split { right: Box::new(right) }
    }

    /// A merge step (`peer/merge.rs`), refused unless routed with the range's whole current epoch. `Commit`
    /// checks that this node's replica of the right range is the decided range the command carries and has
    /// applied through the decision; one that has not yet (its log holds the decision: the commit was proposed
    /// only then) is waited for (`waits_at`), and anything else — it ended, or moved past — is a bug that stops
    /// the node rather than a divergence between replicas.
    fn apply_merge(
        &mut self,
        engine: &dyn KvEngine,
        descriptor: &mut RangeDescriptor,
        sent: Option<RangeEpoch>,
        merge: MergeCommand,
        entry: &Entry,
    ) -> Result<Outcome, ApplyError> {
        let index = entry.index;
        if let Some(refused) = whole_epoch_refusal(descriptor, sent) {
            return Ok(refused);
        }
        let step = MergeStep::try_from(merge.step)
            .map_err(|_| ApplyError::Undecodable { index, reason: format!("unknown merge step {}", merge.step) })?;
        let next = match merge_step(descriptor, step, merge, (index, entry.term)) {
            Ok(next) => next,
            Err(reason) => return Ok(Outcome::InvalidMerge(reason)),
        };
        if step == MergeStep::Commit {
            let right = next.1.expect("a commit takes a range in");
            let here = match frozen_here(engine, &right) {
                Ok(here) => here,
                Err(_) if may_catch_up(engine, &right) => {
                    self.waits_at = Some((index, right));
                    return Ok(Outcome::Done); // (not reported: the entry is applied again later)
                }
                Err(reason) => return Err(ApplyError::MergeNotReady { index, reason }),
            };
            self.merged.push(right.group_id);
            self.merged_records.push(GroupApply {
                group_id: right.group_id,
                ops: Vec::new(),
                applied_index: here.0,
                applied_term: here.1,
                range: Some(right.merged_record(descriptor.group_id).encode()),
            });
        }
        *descriptor = next.0;
        self.group.range = Some(descriptor.encode());
        Ok(Outcome::Merge { range: Box::new(descriptor.clone()) })
    }

    /// A publication of `range` in the range table, on the meta range only (`meta::publish_ops`: stale or
    /// repeated ones change nothing).
    fn apply_publish(
        &mut self,
        engine: &dyn KvEngine,
        descriptor: &RangeDescriptor,
        range: &RangeDescriptor,
    ) -> Result<Outcome, ApplyError> {
        if !descriptor.is_meta() {
            let key = crate::meta::range_key(&range.end);
            return Ok(Outcome::Refused(RangeError::KeyNotInRange { key, current: Box::new(descriptor.clone()) }));
        }
        for op in crate::meta::publish_ops(engine, &self.published, range).map_err(ApplyError::Engine)? {
            match &op {
                KvOp::Put { key, value } => self.published.insert(key.clone(), Some(value.clone())),
                KvOp::Delete { key } => self.published.insert(key.clone(), None),
            };
            self.group.ops.push(op);
        }
        Ok(Outcome::Done)
    }

    /// The state machine batch — this group's, then the groups its splits made — and each command's outcome.
    pub fn finish(self) -> (Vec<GroupApply>, Vec<Applied>) {
        self.finish_with_splits().0
    }

    /// [`ApplyBatch::finish`], and the ranges of the groups its splits made here.
    pub fn finish_with_splits(self) -> ((Vec<GroupApply>, Vec<Applied>), Vec<SplitOff>) {
        let created = self.split_off.iter().map(|right| GroupApply {
            group_id: right.range.group_id,
            ops: Vec::new(),
            applied_index: BOOTSTRAP_INDEX,
            applied_term: BOOTSTRAP_TERM,
            range: Some(right.range.encode()),
        });
        // (No state machine batch of this group if nothing of it applied: a merge commit first waits.)
        let own = Some(self.group).filter(|group| group.applied_index != 0);
        let groups = own.into_iter().chain(created).chain(self.merged_records).collect();
        ((groups, self.applied), self.split_off)
    }
}

/// A refusal unless `sent` is the range's whole current epoch (administrative commands: a split or merge step
/// proposed under one range or membership must not apply under another).
fn whole_epoch_refusal(descriptor: &RangeDescriptor, sent: Option<RangeEpoch>) -> Option<Outcome> {
    (sent != Some(descriptor.epoch())).then(|| {
        let sent = sent.unwrap_or_default();
        Outcome::Refused(RangeError::StaleEpoch { sent, current: Box::new(descriptor.clone()) })
    })
}

/// What merge step `step` makes of `descriptor` (applied at the entry at `(index, term)`), and for a commit the
/// range it takes in; `Err` says why the step does not fit the range as it is (skipped alike on every replica).
fn merge_step(
    descriptor: &RangeDescriptor,
    step: MergeStep,
    merge: MergeCommand,
    (index, term): (u64, u64),
) -> Result<(RangeDescriptor, Option<RangeDescriptor>), String> {
    let (frozen, locked) = (descriptor.merge, descriptor.merge_lock);
    let decided = frozen.is_some_and(|state| state.decided_index != 0);
    let next = descriptor.next_version();
    match (step, merge.left, merge.right) {
        (MergeStep::Prepare, _, Some(right)) if !descriptor.is_merging() && !right.is_merging() => {
            descriptor.check_merge(&right)?;
            let lock = MergeLock { right_group_id: right.group_id, right_epoch: right.epoch };
            Ok((RangeDescriptor { merge_lock: Some(lock), ..next }, None))
        }
        (MergeStep::Freeze, Some(left), _) if !descriptor.is_merging() => {
            let lock = MergeLock { right_group_id: descriptor.group_id, right_epoch: descriptor.epoch };
            if left.merge_lock != Some(lock) {
                return Err(format!("group {} is not locked for this range at its epoch", left.group_id));
            }
            left.check_merge(descriptor)?;
            let state = MergeState {
                into_group_id: left.group_id,
                into_epoch: left.epoch,
                frozen_index: index,
                decided_index: 0,
                decided_term: 0,
            };
            Ok((RangeDescriptor { merge: Some(state), ..next }, None))
        }
        (MergeStep::Decide, _, _) if frozen.is_some() && !decided => {
            let state = MergeState { decided_index: index, decided_term: term, ..frozen.expect("frozen") };
            Ok((RangeDescriptor { merge: Some(state), ..descriptor.clone() }, None))
        }
        (MergeStep::Unfreeze, _, _) if frozen.is_some() && !decided => {
            Ok((RangeDescriptor { merge: None, ..next }, None))
        }
        (MergeStep::Cancel, _, _) if locked.is_some() => Ok((RangeDescriptor { merge_lock: None, ..next }, None)),
        (MergeStep::Fence, _, _) if !descriptor.is_merging() => Ok((next, None)),
        (MergeStep::Commit, _, Some(right)) if locked.is_some_and(|lock| lock.right_group_id == right.group_id) => {
            let state = right.merge.filter(|state| state.decided_index != 0).ok_or("the right range is not decided")?;
            if state.into_group_id != descriptor.group_id || state.into_epoch != descriptor.epoch {
                return Err("the right range was frozen for another merge".to_string());
            }
            descriptor.check_merge(&right)?;
            Ok((descriptor.merged_with(&right), Some(right)))
        }
        (step, _, _) => {
            let state = match (frozen, locked) {
                (Some(_), _) => "frozen",
                (None, Some(_)) => "locked",
                (None, None) => "neither frozen nor locked",
            };
            Err(format!("{step:?} does not fit a range {state}"))
        }
    }
}

/// Whether this node's replica of the decided range `right` is ready to be taken in by a merge commit (see
/// `frozen_here`).
pub fn ready_to_take(engine: &dyn KvEngine, right: &RangeDescriptor) -> bool {
    frozen_here(engine, right).is_ok()
}

/// Group `group_id`'s descriptor as this node's state machine holds it (a merged group's record included), if
/// any can be read.
pub fn stored_range(engine: &dyn KvEngine, group_id: u64) -> Option<RangeDescriptor> {
    let bytes = engine.range(group_id).ok().flatten()?;
    RangeDescriptor::decode_stored(&bytes).ok()
}

/// Whether this node's replica of the decided range `right`, not ready to be taken in, may yet be: it is that
/// group, not ended, and not past `right` (it has the decision to apply still: it has not heard that it
/// committed, or its node crashed and applies its groups' logs again in no set order). Anything else at a commit
/// is a bug.
fn may_catch_up(engine: &dyn KvEngine, right: &RangeDescriptor) -> bool {
    stored_range(engine, right.group_id)
        .is_some_and(|here| here.merged_into == 0 && here.epoch().version <= right.epoch().version)
}

/// This node's replica of the decided range `right`, checked ready to be taken in: its stored descriptor is
/// `right` as the command carries it, and it applied through the decision. Its applied state.
fn frozen_here(engine: &dyn KvEngine, right: &RangeDescriptor) -> Result<(u64, u64), String> {
    let stored = engine
        .range(right.group_id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no replica of group {} here", right.group_id))?;
    let here = RangeDescriptor::decode_stored(&stored).map_err(|e| e.to_string())?;
    let (applied_index, applied_term) = engine.applied(right.group_id);
    let decided_index = right.merge.map_or(u64::MAX, |state| state.decided_index);
    if here != *right || applied_index < decided_index {
        return Err(format!(
            "group {}'s replica here is {here:?} at applied index {applied_index}, not {right:?}",
            right.group_id
        ));
    }
    Ok((applied_index, applied_term))
}

fn apply_command(
    engine: &dyn KvEngine,
    descriptor: &RangeDescriptor,
    command: Command,
    overlay: &mut Overlay,
    ops: &mut Vec<KvOp>,
) -> Result<Outcome, ApplyError> {
    let keys: Vec<&[u8]> = command.ops.iter().map(|op| op.key.as_slice()).collect();
    if let Err(refusal) = descriptor.check(&keys, command.epoch) {
        return Ok(Outcome::Refused(refusal));
    }
    // Preconditions first, all of them, against the state before this command.
    for (position, op) in command.ops.iter().enumerate() {
        if op.kind == OpKind::CompareAndSet as i32 {
            let current = match overlay.get(ops, &op.key) {
                Some(value) => value.map(<[u8]>::to_vec),
                None => engine.get(&op.key).map_err(ApplyError::Engine)?,
            };
            let holds =
                if op.expect_absent { current.is_none() } else { current.as_deref() == Some(op.expected.as_slice()) };
            if !holds {
                return Ok(Outcome::PreconditionFailed { op: position, current });
            }
        }
    }
    // The decoded command is ours: its keys and values move into the batch.
    ops.extend(command.ops.into_iter().map(|op| match op.kind == OpKind::Delete as i32 {
        true => KvOp::Delete { key: op.key },
        false => KvOp::Put { key: op.key, value: op.value },
    }));
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use flotilla_engine::kv_engine::MemKvEngine;

    use super::*;

    fn range() -> RangeDescriptor {
        RangeDescriptor {
            group_id: 4,
            start: b"a".to_vec(),
            end: b"m".to_vec(),
            epoch: Some(RangeEpoch { version: 2, conf_version: 1 }),
            replicas: vec![],
            ..RangeDescriptor::default()
        }
    }

    fn entry(index: u64, command: &Command) -> Entry {
        Entry { index, term: 3, data: command.encode_entry(), ..Default::default() }
    }

    fn command(request_id: u64, ops: Vec<Op>) -> Command {
        Command { request_id, ..Command::write(Some(range().epoch()), ops) }
    }

    fn apply(engine: &MemKvEngine, entries: &[Entry]) -> Vec<Outcome> {
        let (batch, applied) = apply_entries(engine, &range(), entries).unwrap();
        engine.apply(vec![batch]).unwrap();
        applied.into_iter().map(|a| a.outcome).collect()
    }

    #[test]
    fn puts_deletes_and_the_applied_index_including_empty_entries() {
        let engine = MemKvEngine::new(u64::MAX);
        let entries = [
            entry(5, &command(1, vec![Op::put("b", "1"), Op::put("c", "1")])),
            Entry { index: 6, term: 3, ..Default::default() }, // a leader's no-op
            entry(7, &command(2, vec![Op::delete("b")])),
        ];
        assert_eq!(apply(&engine, &entries), vec![Outcome::Done, Outcome::Done]);
        assert_eq!((engine.get(b"b").unwrap(), engine.get(b"c").unwrap()), (None, Some(b"1".to_vec())));
        assert_eq!(engine.applied(4), (7, 3));
    }

    #[test]
    fn a_failed_precondition_makes_the_whole_command_a_no_op_and_later_entries_see_earlier_writes() {
        let engine = MemKvEngine::new(u64::MAX);
        let entries = [
            entry(1, &command(1, vec![Op::compare_and_set("b", None, "1")])),
            // Sees entry 1's write (same batch): the key is no longer absent.
            entry(2, &command(2, vec![Op::put("c", "x"), Op::compare_and_set("b", None, "2")])),
            entry(3, &command(3, vec![Op::compare_and_set("b", Some(b"1".to_vec()), "3"), Op::put("d", "y")])),
        ];
        let outcomes = apply(&engine, &entries);
        assert_eq!(outcomes[0], Outcome::Done);
        assert_eq!(outcomes[1], Outcome::PreconditionFailed { op: 1, current: Some(b"1".to_vec()) });
        assert_eq!(outcomes[2], Outcome::Done);
        assert_eq!(engine.get(b"c").unwrap(), None, "the failed command's put did not happen");
        assert_eq!((engine.get(b"b").unwrap(), engine.get(b"d").unwrap()), (Some(b"3".to_vec()), Some(b"y".to_vec())));
    }

    #[test]
    fn compare_and_set_sees_the_last_write_of_earlier_entries_in_the_batch_including_deletes() {
        let engine = MemKvEngine::new(u64::MAX);
        apply(&engine, &[entry(1, &command(1, vec![Op::put("b", "0")]))]);
        let entries = [
            entry(2, &command(2, vec![Op::put("b", "1")])),
            entry(3, &command(3, vec![Op::compare_and_set("b", Some(b"1".to_vec()), "2")])),
            // Written after the batch's first compare-and-set looked: later ones must still see it.
            entry(4, &command(4, vec![Op::delete("b")])),
            entry(5, &command(5, vec![Op::compare_and_set("b", None, "4")])),
            entry(6, &command(6, vec![Op::compare_and_set("b", Some(b"4".to_vec()), "5")])),
            entry(7, &command(7, vec![Op::compare_and_set("b", Some(b"4".to_vec()), "6")])),
        ];
        let outcomes = apply(&engine, &entries);
        assert_eq!(outcomes[..5], [Outcome::Done, Outcome::Done, Outcome::Done, Outcome::Done, Outcome::Done]);
        assert_eq!(outcomes[5], Outcome::PreconditionFailed { op: 0, current: Some(b"5".to_vec()) });
        assert_eq!(engine.get(b"b").unwrap(), Some(b"5".to_vec()));
    }

    #[test]
    fn commands_that_no_longer_fit_the_range_are_refused_at_apply() {
        let engine = MemKvEngine::new(u64::MAX);
        let stale = Command {
            request_id: 1,
            ..Command::write(Some(RangeEpoch { version: 1, conf_version: 1 }), vec![Op::put("b", "1")])
        };
        let outside = command(2, vec![Op::put("z", "1")]);
        let outcomes = apply(&engine, &[entry(1, &stale), entry(2, &outside)]);
        assert!(matches!(&outcomes[0], Outcome::Refused(RangeError::StaleEpoch { .. })));
        assert!(matches!(&outcomes[1], Outcome::Refused(RangeError::KeyNotInRange { .. })));
        assert_eq!(engine.scan(b"", b"", 10).unwrap(), vec![], "nothing applied");
        assert_eq!(engine.applied(4).0, 2, "but the index moved");
    }

    #[test]
    fn an_entry_that_is_not_a_command_is_an_error_not_a_guess() {
        let engine = MemKvEngine::new(u64::MAX);
        let garbage = Entry { index: 9, term: 1, data: Bytes::from_static(b"\xff\xff\xff"), ..Default::default() };
        assert!(matches!(apply_entries(&engine, &range(), &[garbage]), Err(ApplyError::Undecodable { index: 9, .. })));
    }

    /// Applies merge step `merge` to `descriptor` at `index` (routed with its epoch) on `engine`, keeping
    /// the state machine's copy of the descriptor as apply would.
    fn step(engine: &MemKvEngine, descriptor: &RangeDescriptor, merge: MergeCommand, index: u64) -> Outcome {
        let command = Command { request_id: index, ..Command::merge(descriptor.epoch(), merge) };
        let entry = Entry { index, term: 1, data: command.encode_entry(), ..Default::default() };
        let (batch, mut applied) = apply_entries(engine, descriptor, &[entry]).unwrap();
        engine.apply(vec![batch]).unwrap();
        applied.remove(0).outcome
    }

    fn merged(outcome: Outcome) -> RangeDescriptor {
        match outcome {
            Outcome::Merge { range } => *range,
            other => panic!("not a merge step: {other:?}"),
        }
    }

    #[test]
    fn each_merge_step_fits_only_the_state_it_is_for_and_a_commit_takes_the_decided_range_in() {
        let engine = MemKvEngine::new(u64::MAX);
        let replicas = vec![crate::range::Replica::voter(1, 1), crate::range::Replica::voter(2, 2)];
        let left = RangeDescriptor { end: b"m".to_vec(), replicas: replicas.clone(), ..range() };
        let right = RangeDescriptor { group_id: 5, start: b"m".to_vec(), end: Vec::new(), replicas, ..range() };
        let invalid = |outcome: Outcome| matches!(outcome, Outcome::InvalidMerge(_));
        let no_lock = MergeCommand::new(MergeStep::Freeze, Some(left.clone()), None);
        assert!(invalid(step(&engine, &right, no_lock, 1)), "a freeze needs the left range locked for it");
        assert!(invalid(step(&engine, &left, MergeCommand::new(MergeStep::Cancel, None, None), 1)), "not locked");
        let locked = merged(step(&engine, &left, MergeCommand::new(MergeStep::Prepare, None, Some(right.clone())), 2));
        assert_eq!(locked.epoch().version, left.epoch().version + 1);
        let split = Command::split(locked.epoch(), SplitRequest::new(b"c".to_vec(), (9, 90), 2));
        let entry = Entry { index: 3, term: 1, data: split.encode_entry(), ..Default::default() };
        let (_, applied) = apply_entries(&engine, &locked, &[entry]).unwrap();
        assert!(matches!(applied[0].outcome, Outcome::Refused(RangeError::Merging { .. })), "no split while locked");
        let fence = MergeCommand::new(MergeStep::Fence, None, None);
        assert!(invalid(step(&engine, &locked, fence.clone(), 3)), "a locked range's epoch stays as it is");
        let freeze = MergeCommand::new(MergeStep::Freeze, Some(locked.clone()), None);
        let frozen = merged(step(&engine, &right, freeze.clone(), 10));
        assert_eq!(frozen.merge.map(|state| (state.into_group_id, state.frozen_index)), Some((4, 10)));
        assert!(matches!(frozen.check(&[b"x"], None), Err(RangeError::Merging { .. })), "no writes once frozen");
        let early = MergeCommand::new(MergeStep::Commit, None, Some(frozen.clone()));
        assert!(invalid(step(&engine, &locked, early, 4)), "not decided yet");
        let unfrozen = merged(step(&engine, &frozen, MergeCommand::new(MergeStep::Unfreeze, None, None), 11));
        assert!(unfrozen.merge.is_none() && unfrozen.epoch().version > frozen.epoch().version);
        // Frozen again (the right range's epoch moved on with the unfreeze: a new lock first), and decided.
        let relocked = merged(step(&engine, &locked, MergeCommand::new(MergeStep::Cancel, None, None), 5));
        let prepare = MergeCommand::new(MergeStep::Prepare, None, Some(unfrozen.clone()));
        let relocked = merged(step(&engine, &relocked, prepare, 6));
        let freeze = MergeCommand::new(MergeStep::Freeze, Some(relocked.clone()), None);
        let frozen = merged(step(&engine, &unfrozen, freeze, 12));
        let decided = merged(step(&engine, &frozen, MergeCommand::new(MergeStep::Decide, None, None), 13));
        assert_eq!(decided.merge.map(|state| state.decided_index), Some(13));
        let unfreeze = Command::merge(decided.epoch(), MergeCommand::new(MergeStep::Unfreeze, None, None));
        let mut batch = ApplyBatch::new(5);
        let at_14 = Entry { index: 14, term: 1, data: unfreeze.encode_entry(), ..Default::default() };
        batch.apply(&engine, &mut decided.clone(), &[at_14]).unwrap();
        assert_eq!(batch.held_after_decision, Some(14), "final: nothing after the decision applies");
        let commit = MergeCommand::new(MergeStep::Commit, None, Some(decided.clone()));
        let (batches, applied) = {
            let command = Command { request_id: 7, ..Command::merge(relocked.epoch(), commit) };
            let entry = Entry { index: 7, term: 1, data: command.encode_entry(), ..Default::default() };
            apply_entries_all(&engine, &relocked, &[entry])
        };
        let grown = match &applied[0].outcome {
            Outcome::Merge { range } => range.as_ref().clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!((grown.start.as_slice(), grown.end.as_slice()), (&b"a"[..], &b""[..]));
        assert!(grown.epoch().version > decided.epoch().version && grown.merge_lock.is_none());
        let record = RangeDescriptor::decode_stored(batches[1].range.as_ref().unwrap()).unwrap();
        assert_eq!((batches[1].group_id, record.merged_into, record.replicas.len()), (5, 4, 0));
    }

    /// Two one-replica ranges, `[a, m)` (group 4) locked at index 2 to take in `[m, ∞)` (group 5), frozen at 3.
    fn locked_and_frozen(engine: &MemKvEngine) -> (RangeDescriptor, RangeDescriptor) {
        let replicas = vec![crate::range::Replica::voter(1, 1)];
        let left = RangeDescriptor { end: b"m".to_vec(), replicas: replicas.clone(), ..range() };
        let right = RangeDescriptor { group_id: 5, start: b"m".to_vec(), end: Vec::new(), replicas, ..range() };
        let locked = merged(step(engine, &left, MergeCommand::new(MergeStep::Prepare, None, Some(right.clone())), 2));
        let frozen = merged(step(engine, &right, MergeCommand::new(MergeStep::Freeze, Some(locked.clone()), None), 3));
        (locked, frozen)
    }

    /// A commit the left replica meets before its node's right replica applied the decision waits
    /// there (`ApplyBatch::waits_at`: nothing from it on applied), and applies once that replica applied it; one
    /// whose right replica here can never be ready (it ended) stops the node.
    #[test]
    fn a_commit_waits_for_the_right_replica_here_to_apply_the_decision_and_stops_the_node_if_it_never_can() {
        let engine = MemKvEngine::new(u64::MAX);
        // The right replica here is frozen, not decided yet; the commit carries the decided range.
        let (locked, frozen) = locked_and_frozen(&engine);
        let state = MergeState { decided_index: 4, ..frozen.merge.unwrap() };
        let decided = RangeDescriptor { merge: Some(state), ..frozen };
        let commit = Command::merge(locked.epoch(), MergeCommand::new(MergeStep::Commit, None, Some(decided.clone())));
        let put = command(1, vec![Op::put("b", "1")]);
        let entries = [entry(5, &Command { epoch: Some(locked.epoch()), ..put }), entry(6, &commit)];
        let mut batch = ApplyBatch::new(4);
        batch.apply(&engine, &mut locked.clone(), &entries).unwrap();
        assert_eq!(batch.waits_at, Some((6, decided.clone())), "the commit waits");
        let (groups, applied) = batch.finish();
        assert_eq!((groups[0].applied_index, applied.len()), (5, 1), "what came before it applied");
        // The right replica here applies the decision: the commit goes ahead.
        let decision = GroupApply {
            group_id: 5,
            ops: Vec::new(),
            applied_index: 4,
            applied_term: 1,
            range: Some(decided.encode()),
        };
        engine.apply(vec![decision]).unwrap();
        let (_, applied) = apply_entries(&engine, &locked, &entries[1..]).unwrap();
        assert!(matches!(&applied[0].outcome, Outcome::Merge { range } if range.end.is_empty()), "{applied:?}");
        // A right replica here that ended already can never be taken in: a bug, the node stops.
        let record = GroupApply { range: Some(decided.merged_record(9).encode()), ..Default::default() };
        engine.apply(vec![GroupApply { group_id: 5, applied_index: 4, applied_term: 1, ..record }]).unwrap();
        assert!(matches!(
            apply_entries(&engine, &locked, &entries[1..]),
            Err(ApplyError::MergeNotReady { index: 6, .. })
        ));
    }

    /// A range decided for a merge applies nothing after its decision — not a new leader's no-op nor a write in
    /// the same batch, nor one in a later batch — so that its applied index stays at the decision, where the left
    /// group's commit writes it in the range's record (`store-sim` seed 9874: a no-op applied at 9 after the
    /// decision at 8 stopped the node when the commit wrote 8).
    #[test]
    fn a_range_decided_for_a_merge_applies_nothing_after_its_decision() {
        let engine = MemKvEngine::new(u64::MAX);
        let (_, frozen) = locked_and_frozen(&engine);
        let decide = Command::merge(frozen.epoch(), MergeCommand::new(MergeStep::Decide, None, None));
        let no_op = Entry { index: 5, term: 4, ..Default::default() };
        let put = Command { epoch: Some(frozen.epoch()), ..command(1, vec![Op::put("x", "1")]) };
        let mut descriptor = frozen.clone();
        let mut batch = ApplyBatch::new(5);
        batch.apply(&engine, &mut descriptor, &[entry(4, &decide), no_op.clone(), entry(6, &put)]).unwrap();
        assert_eq!(descriptor.merge.map(|state| state.decided_index), Some(4), "decided");
        assert_eq!(batch.held_after_decision, Some(5), "stopped at the entry after the decision");
        let (groups, applied) = batch.finish();
        assert_eq!((groups[0].applied_index, applied.len()), (4, 1), "the decision alone applied");
        let mut batch = ApplyBatch::new(5);
        batch.apply(&engine, &mut descriptor, &[no_op]).unwrap();
        assert_eq!(batch.held_after_decision, Some(5), "a later batch holds too");
        let (groups, applied) = batch.finish();
        assert!(groups.is_empty() && applied.is_empty(), "nothing applied: {groups:?}");
    }

    /// [`apply_entries`] with every group's batch (a commit writes the merged group's record too).
    fn apply_entries_all(
        engine: &MemKvEngine,
        descriptor: &RangeDescriptor,
        entries: &[Entry],
    ) -> (Vec<GroupApply>, Vec<Applied>) {
        let mut batch = ApplyBatch::new(descriptor.group_id);
        batch.apply(engine, &mut descriptor.clone(), entries).unwrap();
        batch.finish()
    }
}
