//! Node liveness, sans I/O: one heartbeat per node pair and tick interval (not one per group), and the verdict
//! on each other node — down once nothing at all was heard from it for `down_after_ticks`. A node judged down is
//! passed to every replica (`Store::node_down`): followers hibernating under a leader there wake, to elect
//! another. Hibernation depends on this: a sleeping follower hears nothing from its leader by design, so its
//! silence means nothing; the leader's node's silence does.
//!
//! The caller owns the clock and the wire: it reports what it heard ([`Liveness::heard`]) and, each tick
//! interval, sends a [`NodeMessage::Heartbeat`] to every other node and passes on the verdicts
//! ([`Liveness::tick`]). The store simulator runs it today; the TCP transport carries the heartbeats next.

use std::collections::BTreeMap;

/// A message between nodes rather than between replicas (it travels beside the replicas' envelopes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeMessage {
    /// "I am up": sent to every other node once per tick interval.
    Heartbeat { from_node: u64, to_node: u64 },
}

impl NodeMessage {
    /// The two nodes it travels between.
    pub fn ends(&self) -> (u64, u64) {
        match self {
            NodeMessage::Heartbeat { from_node, to_node } => (*from_node, *to_node),
        }
    }
}

/// One node's view of the others.
#[derive(Clone, Debug)]
pub struct Liveness {
    node_id: u64,
    down_after_ticks: u64,
    /// Each other node, and the tick this node last heard anything from it.
    heard: BTreeMap<u64, u64>,
}

impl Liveness {
    /// Starts at tick `now` having heard from nobody: every node gets `down_after_ticks` before it is judged.
    pub fn new(node_id: u64, nodes: impl IntoIterator<Item = u64>, down_after_ticks: u64, now: u64) -> Liveness {
        let heard = nodes.into_iter().filter(|&node| node != node_id).map(|node| (node, now)).collect();
        Liveness { node_id, down_after_ticks, heard }
    }

    /// A node that joined the cluster, first counted at tick `now` (it gets `down_after_ticks` before it is
    /// judged); nothing changes for a node it knows already.
    pub fn add_node(&mut self, node: u64, now: u64) {
        if node != self.node_id {
            self.heard.entry(node).or_insert(now);
        }
    }

    /// Something (a heartbeat, a replica's message) arrived from `node` at tick `now`.
    pub fn heard(&mut self, node: u64, now: u64) {
        if let Some(at) = self.heard.get_mut(&node) {
            *at = (*at).max(now);
        }
    }

    /// Whether `node` has been silent for more than `down_after_ticks` at tick `now` (unknown nodes are not
    /// judged).
    pub fn is_down(&self, node: u64, now: u64) -> bool {
        self.heard.get(&node).is_some_and(|&at| now.saturating_sub(at) > self.down_after_ticks)
    }

    /// The tick interval's turn: the heartbeats to send, and the nodes judged down now (silent for more than
    /// `down_after_ticks`; repeated every tick while they stay silent).
    pub fn tick(&self, now: u64) -> (Vec<NodeMessage>, Vec<u64>) {
        let heartbeats =
            self.heard.keys().map(|&to_node| NodeMessage::Heartbeat { from_node: self.node_id, to_node }).collect();
        let down = self.heard.iter().filter(|(_, &at)| now.saturating_sub(at) > self.down_after_ticks);
        (heartbeats, down.map(|(&node, _)| node).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_silent_for_longer_than_the_bound_is_judged_down_until_it_is_heard_again() {
        let mut liveness = Liveness::new(1, [1, 2, 3], 5, 100);
        let (heartbeats, down) = liveness.tick(100);
        assert_eq!(heartbeats.len(), 2, "one to each other node, none to itself");
        assert!(down.is_empty());
        liveness.heard(2, 104);
        assert!(liveness.tick(105).1.is_empty(), "5 ticks of silence is the bound, not past it");
        assert_eq!(liveness.tick(106).1, vec![3], "node 3 silent since the start");
        assert!(liveness.is_down(3, 106) && !liveness.is_down(2, 106) && !liveness.is_down(9, 106));
        assert_eq!(liveness.tick(110).1, vec![2, 3]);
        liveness.heard(3, 111);
        liveness.heard(3, 90); // a late report never moves it back
        assert_eq!(liveness.tick(111).1, vec![2]);
        liveness.heard(9, 111); // not a node it knows: ignored
        assert_eq!(liveness.tick(111).0.len(), 2);
    }
}
