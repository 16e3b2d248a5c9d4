//! Publishing a range's descriptor in the meta range (`meta.rs`): after a split, a merge or a membership change,
//! the group's leader tells the meta group its new descriptor until its node's replica of the meta range shows
//! it. The ask travels as a proposal of the meta group through its replica on this node, which hands it to
//! whichever member leads (as merge steps do); applying it is idempotent and guarded by epoch, so asking again
//! is harmless, and a stale ask changes nothing. A node with no live replica of the meta range hands the ask to
//! its host, which routes it and tells the leader once it applied (`PeerMsg::Published`). A leader with a
//! publication pending does not fall asleep.

use flotilla_engine::contract::KvEngine;
use prost::Message as _;

use super::Peer;
use crate::command::Command;
use crate::meta;
use crate::range::{RangeDescriptor, RangeEpoch};

/// Ticks between a leader's asks while its node's meta replica does not show its descriptor (1 s at the store's
/// default 100 ms tick).
pub const PUBLISH_RETRY_TICKS: u64 = 10;

/// Where this replica's descriptor stands in the meta range.
#[derive(Debug, Default)]
pub(super) struct Publication {
    /// The key space has a meta range: a leader publishes (`PeerOptions::publishes`).
    publishes: bool,
    /// The epoch the node's meta replica last showed for this range (nothing to publish while it is current).
    shown: Option<RangeEpoch>,
    /// Ticks since the last ask, if one was made for the current epoch.
    since_ask: Option<u64>,
}

impl Publication {
    pub(super) fn new(publishes: bool) -> Publication {
        Publication { publishes, ..Publication::default() }
    }
}

impl Peer {
    /// As the leader of a user range, `ticks` of time having passed: the publication to ask of the meta group,
    /// if this node's replica of the meta range (in `kv`) does not show the range's current descriptor — asked
    /// at once, then again every [`PUBLISH_RETRY_TICKS`] until it does. Nothing where the key space has no meta
    /// range.
    pub fn publish_due(&mut self, ticks: u64, kv: &dyn KvEngine) -> Option<Command> {
        if !self.publication.publishes || !self.is_leader() || self.removed || !meta::publishable(&self.descriptor) {
            return None;
        }
        let epoch = self.descriptor.epoch();
        if self.publication.shown == Some(epoch) {
            return None;
        }
        if let Some(since) = &mut self.publication.since_ask {
            *since += ticks;
            if *since < PUBLISH_RETRY_TICKS {
                return None;
            }
        }
        // The piece that ends where this range ends: this group's at this epoch once published, or a newer
        // group's if this descriptor is stale already.
        let shown = kv.get(&meta::range_key(&self.descriptor.end)).ok()?;
        let piece = shown.and_then(|bytes| RangeDescriptor::decode(bytes.as_slice()).ok());
        if piece.is_some_and(|piece| shows(&piece, &self.descriptor)) {
            self.publication.shown = Some(epoch);
            self.publication.since_ask = None;
            return None;
        }
        self.publication.since_ask = Some(0);
        Some(Command::publish(self.descriptor.clone()))
    }

    /// The host published the descriptor at `epoch` (this node holds no replica of the meta range to show it).
    pub fn on_published(&mut self, epoch: RangeEpoch) {
        if self.descriptor.epoch() == epoch {
            self.publication.shown = Some(epoch);
            self.publication.since_ask = None;
        }
    }

    /// A leader whose range's descriptor the meta range does not show yet (it stays awake to publish it).
    pub(super) fn publication_pending(&self) -> bool {
        self.publication.publishes
            && self.is_leader()
            && meta::publishable(&self.descriptor)
            && self.publication.shown != Some(self.descriptor.epoch())
    }
}

/// Whether `piece` (the meta range's, at `range`'s end) shows `range` as published: it is that group's at that
/// epoch or later, or a later range's (`range` is stale: publishing it would change nothing).
fn shows(piece: &RangeDescriptor, range: &RangeDescriptor) -> bool {
    let newness = |r: &RangeDescriptor| (r.epoch().version, r.epoch().conf_version);
    match piece.group_id == range.group_id {
        true => newness(piece) >= newness(range),
        false => piece.epoch().version > range.epoch().version,
    }
}
