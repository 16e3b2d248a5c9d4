//! Writes held by a replica while a merge it takes part in moves on, instead of refused at once.
//!
//! A merge's frozen window lasts a round or two (`peer/merge.rs`): the right range takes no writes from its freeze
//! until its decision, and the left leader takes the writes handed over to it (`Peer::takes_behind_commit`) only
//! once it proposed the merge's commit, which the right leader asks for a moment after the decision applies.
//! Refused there, a write's caller waits a while and asks again — often more than once, and each time the merge
//! may have moved on just after the refusal. Held instead ([`ParkedWrites`]), a write is handled again as soon as
//! the replica's state lets it through: a frozen right replica that applied the decision hands it over, one that
//! unfroze proposes it (or refuses it: not the leader); a left leader that proposed the commit takes the writes
//! handed over to it. Bounded in number ([`PARKED_WRITES_MAX`]) and in time (`StoreOptions::
//! frozen_write_wait_ticks`): past either, a write is refused as it was before (`RangeError::Merging`).

use crate::peer::{Peer, PeerError};
use crate::range::RangeError;

use super::fsm::PeerMsg;

/// Writes a replica holds at most; one more is refused at once, and its caller asks again.
pub const PARKED_WRITES_MAX: usize = 4096;

/// The writes one replica holds (see the module docs): [`PeerMsg::Write`]s and [`PeerMsg::HandedOver`]s, in the
/// order they came.
#[derive(Default)]
pub(crate) struct ParkedWrites {
    held: Vec<PeerMsg>,
    /// Ticks since the oldest write held came (those still held when they are up are refused together).
    ticks: u64,
}

impl ParkedWrites {
    /// Holds `message` if `peer` would refuse it only for a merge that is moving on, and there is room; else
    /// gives it back, to be handled now.
    pub(crate) fn park(&mut self, peer: &Peer, message: PeerMsg) -> Option<PeerMsg> {
        if self.held.len() >= PARKED_WRITES_MAX || !waits(peer, &message) {
            return Some(message);
        }
        metrics::counter!("flotilla_writes_parked_total").increment(1);
        if self.held.is_empty() {
            self.ticks = 0;
        }
        self.held.push(message);
        None
    }

    /// The writes to handle again now, `ticks` more having passed: those `peer` would no longer refuse for its
    /// merge, in their order. Once the held writes waited `wait_ticks_max` ticks, the rest are refused as the
    /// merge refuses them (the answers are sent here).
    pub(crate) fn release(&mut self, peer: &Peer, ticks: u64, wait_ticks_max: u64) -> Vec<PeerMsg> {
        if self.held.is_empty() {
            return Vec::new();
        }
        self.ticks += ticks;
        let (kept, released): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.held).into_iter().partition(|message| waits(peer, message));
        if self.ticks >= wait_ticks_max {
            for message in kept {
                refuse_as_merging(peer, message);
            }
        } else {
            self.held = kept;
        }
        released
    }

    /// Refuses every held write with `refusal` (the node stopped).
    pub(crate) fn refuse_all(&mut self, refusal: &PeerError) {
        for message in self.held.drain(..) {
            if let PeerMsg::Write { reply, .. } | PeerMsg::HandedOver { reply, .. } = message {
                let _ = reply.send(Err(refusal.clone()));
            }
        }
    }
}

impl Drop for ParkedWrites {
    /// A replica that ends holding writes (a snapshot of the left group ended it, say) tells their callers they
    /// did not take effect: they ask again, elsewhere.
    fn drop(&mut self) {
        self.refuse_all(&PeerError::Dropped);
    }
}

/// Whether `peer` refuses `message` now only because its merge has not moved far enough yet.
fn waits(peer: &Peer, message: &PeerMsg) -> bool {
    match message {
        PeerMsg::Write { .. } => peer.holds_writes(),
        // (A leader that awaits its commit cannot take the write yet: `Peer::takes_behind_commit` needs it proposed.)
        PeerMsg::HandedOver { decided, .. } => peer.awaits_commit_for(decided.group_id),
        _ => false,
    }
}

/// Answers a held write as the merge refuses it: the range is being merged.
fn refuse_as_merging(peer: &Peer, message: PeerMsg) {
    let refusal = |current| Err(PeerError::Range(RangeError::Merging { current }));
    match message {
        PeerMsg::Write { reply, .. } => {
            let _ = reply.send(refusal(Box::new(peer.descriptor().clone())));
        }
        PeerMsg::HandedOver { reply, decided, .. } => {
            let _ = reply.send(refusal(decided));
        }
        _ => unreachable!("only writes are held"),
    }
}
