//! Messages for a group this node does not hold, kept a moment in case a split is about to make the group here
//! ([`AwaitingSplit`], used by the replicas thread: `replicas.rs`).
//!
//! A split's new group starts on each replica of the group that split when that replica applies the split. The
//! first to apply it (the old leader's node, as a rule) campaigns at once and may lead the new group before the
//! others have applied the split: its vote requests and appends then reach nodes that do not hold the group yet.
//! An empty replica created for such a message would vote, then refuse the appends (its log is empty), and the
//! leader would stream it a snapshot — while the split, applied here a moment later, brings the same state for
//! nothing and replaces that replica (which then refuses the snapshot until the split is durable): hundreds of
//! milliseconds in which the new range took no writes. So a message for a group the node does not hold waits, up
//! to `StoreOptions::split_message_wait_ticks` after the first such message of its group: a split that opens the
//! group meanwhile is handed the messages (its replica answers them at once); otherwise the replica is created
//! empty, as it always was for a replica added by a membership change (caught up by snapshot), and handed them. TiKV keeps such messages too
//! (its pending messages, recognised by range overlap); our messages carry no range, so we wait instead.
//!
//! Bounded: at most [`GROUPS_MAX`] groups wait (a message of another group is not kept: its replica is created at
//! once) and [`MESSAGES_PER_GROUP_MAX`] messages each (later ones are dropped; Raft sends again).

use std::collections::BTreeMap;

use crate::message::Envelope;

/// Groups whose messages may wait at once.
pub(crate) const GROUPS_MAX: usize = 1024;
/// Messages kept per waiting group.
pub(crate) const MESSAGES_PER_GROUP_MAX: usize = 16;

struct Waiting {
    /// The node tick of the group's first message kept.
    since_tick: u64,
    envelopes: Vec<Envelope>,
}

/// Messages for groups not held here, by group.
pub(crate) struct AwaitingSplit {
    groups: BTreeMap<u64, Waiting>,
    wait_ticks: u64,
}

impl AwaitingSplit {
    /// Messages of a group wait `wait_ticks` node ticks at most.
    pub(crate) fn new(wait_ticks: u64) -> AwaitingSplit {
        AwaitingSplit { groups: BTreeMap::new(), wait_ticks }
    }

    /// Keeps `envelope` for its group, unless the group has waited `wait_ticks` already or too many groups wait:
    /// then `Err` with it and every message kept before it, in order — the replica is to be created now.
    pub(crate) fn hold(&mut self, envelope: Envelope, now_tick: u64) -> Result<(), Vec<Envelope>> {
        let group_id = envelope.group_id;
        if !self.groups.contains_key(&group_id) && self.groups.len() >= GROUPS_MAX {
            return Err(vec![envelope]);
        }
        let waiting = self.groups.entry(group_id).or_insert(Waiting { since_tick: now_tick, envelopes: Vec::new() });
        if now_tick >= waiting.since_tick + self.wait_ticks {
            let mut envelopes = self.take(group_id);
            envelopes.push(envelope);
            return Err(envelopes);
        }
        if waiting.envelopes.len() < MESSAGES_PER_GROUP_MAX {
            waiting.envelopes.push(envelope);
        }
        Ok(())
    }

    /// The messages kept for `group_id`, in order (its replica opens now, or the wait is given up).
    pub(crate) fn take(&mut self, group_id: u64) -> Vec<Envelope> {
        self.groups.remove(&group_id).map(|waiting| waiting.envelopes).unwrap_or_default()
    }

    /// The groups whose wait is over at `now_tick`, each with its messages.
    pub(crate) fn take_expired(&mut self, now_tick: u64) -> Vec<(u64, Vec<Envelope>)> {
        let expired: Vec<u64> = (self.groups.iter())
            .filter(|(_, waiting)| now_tick >= waiting.since_tick + self.wait_ticks)
            .map(|(group_id, _)| *group_id)
            .collect();
        expired.into_iter().map(|group_id| (group_id, self.take(group_id))).collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ReplicaMessage;
    use flotilla_raft::{Message, MessageType};

    fn envelope(group_id: u64, index: u64) -> Envelope {
        let mut message = Message::new(MessageType::Append, 1, 2, 6);
        message.index = index;
        Envelope { group_id, from_node: 1, to_node: 2, message: ReplicaMessage::Raft(message) }
    }

    fn indexes(envelopes: &[Envelope]) -> Vec<u64> {
        (envelopes.iter())
            .map(|envelope| match &envelope.message {
                ReplicaMessage::Raft(message) => message.index,
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn messages_wait_for_their_group_until_taken_or_the_wait_is_over() {
        let mut awaiting = AwaitingSplit::new(3);
        assert!(awaiting.hold(envelope(7, 1), 10).is_ok());
        assert!(awaiting.hold(envelope(7, 2), 11).is_ok());
        assert!(awaiting.hold(envelope(8, 1), 12).is_ok());
        assert!(awaiting.take_expired(12).is_empty(), "group 7 waits until tick 13");
        // The split opens group 7: it is handed its messages, in order.
        assert_eq!(indexes(&awaiting.take(7)), vec![1, 2]);
        assert!(awaiting.take(7).is_empty());
        // Group 8's wait ends at tick 15: a later message is handed back with the ones kept, to create the replica.
        assert!(awaiting.hold(envelope(8, 2), 14).is_ok());
        let created = awaiting.hold(envelope(8, 3), 15).unwrap_err();
        assert_eq!(indexes(&created), vec![1, 2, 3]);
        // With no later message, the expired wait is found by time.
        assert!(awaiting.hold(envelope(9, 1), 20).is_ok());
        let expired = awaiting.take_expired(23);
        assert_eq!(expired.len(), 1);
        assert_eq!((expired[0].0, indexes(&expired[0].1)), (9, vec![1]));
        assert!(awaiting.is_empty());
    }

    #[test]
    fn waiting_is_bounded() {
        let mut awaiting = AwaitingSplit::new(3);
        for index in 0..(MESSAGES_PER_GROUP_MAX as u64 + 5) {
            assert!(awaiting.hold(envelope(1, index), 0).is_ok());
        }
        assert_eq!(awaiting.take(1).len(), MESSAGES_PER_GROUP_MAX, "later messages are dropped");
        for group_id in 0..GROUPS_MAX as u64 {
            assert!(awaiting.hold(envelope(group_id, 0), 0).is_ok());
        }
        let refused = awaiting.hold(envelope(GROUPS_MAX as u64, 0), 0).unwrap_err();
        assert_eq!(refused.len(), 1, "a group beyond the bound does not wait");
    }
}
