//! Membership changes: a leader proposes one [`MembershipChange`] at a time (the core then applies it directly,
//! without a joint configuration); every replica applies it in log order with the commands around it
//! (`apply.rs`).
//!
//! Applying a change updates the core's configuration and the range descriptor (which restarts read) —
//! replicas and their nodes, `conf_version` + 1 — which goes into the same state machine batch as the entry, so
//! the descriptor on disk always matches the durable applied index. The proposal carries what the descriptor
//! needs beyond the core's ids: the new replica's node, and the proposer's token (to answer it).
//!
//! A new replica is added as a learner on its node, where it is created empty (no range, no configuration):
//! since groups start from a bootstrap snapshot (`bootstrap.rs`), no append can match its log, and the leader
//! catches it up by snapshot, which carries the descriptor. Once caught up it may be promoted to voter. A replica
//! that applies its own removal stops ([`Peer::is_removed`]); its node then destroys it. One that missed the news
//! (cut off at the time) learns it from a member it messages later: members answer unlisted senders with a
//! removal notice ([`Peer::on_removal_notice`]).

use bytes::Bytes;
use flotilla_raft::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, Error as RaftError};
use prost::Message as _;

use super::{Peer, PeerError, PendingWrite, Response, Token};
use crate::command::{Applied, ApplyError, Outcome};
use crate::message::{RemovalNotice, ReplicaMessage};
use crate::range::{RangeDescriptor, RangeEpoch, Replica};

/// One change of a group's membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// A new replica on node `node_id`, following without a vote (caught up by snapshot first).
    AddLearner {
        node_id: u64,
        replica_id: u64,
        /// Where its node listens for the other nodes, if the cluster's list does not say (a node that joined
        /// later); recorded in the descriptor (`Replica::addr`). Empty otherwise.
        addr: String,
    },
    /// A learner becomes a voter.
    Promote {
        replica_id: u64,
    },
    Remove {
        replica_id: u64,
    },
}

/// What a membership change entry carries beyond the core's `ConfChangeV2`.
#[derive(Clone, PartialEq, prost::Message)]
struct ChangeContext {
    /// The proposer's token for its client.
    #[prost(uint64, tag = "1")]
    request_id: u64,
    /// For an added replica: its node.
    #[prost(uint64, tag = "2")]
    node_id: u64,
    /// For an added replica: its node's address, if the change names one.
    #[prost(string, tag = "3")]
    addr: String,
}

impl MembershipChange {
    fn to_conf_change(&self, request_id: u64) -> ConfChangeV2 {
        let (single, node_id, addr) = match self {
            MembershipChange::AddLearner { node_id, replica_id, addr } => {
                (ConfChangeSingle::new(ConfChangeType::AddLearnerNode, *replica_id), *node_id, addr.clone())
            }
            MembershipChange::Promote { replica_id } => {
                (ConfChangeSingle::new(ConfChangeType::AddNode, *replica_id), 0, String::new())
            }
            MembershipChange::Remove { replica_id } => {
                (ConfChangeSingle::new(ConfChangeType::RemoveNode, *replica_id), 0, String::new())
            }
        };
        let mut change = ConfChangeV2::new(vec![single]);
        change.context = Bytes::from(ChangeContext { request_id, node_id, addr }.encode_to_vec());
        change
    }
}

/// The descriptor after a change: replicas as the new configuration has them, each on its node and at its address
/// (known, or the ones the change names), and the membership version moved on.
fn next_descriptor(current: &RangeDescriptor, conf_state: &ConfState, context: &ChangeContext) -> RangeDescriptor {
    let replica = |replica_id: u64, learner: bool| {
        let listed = current.replicas.iter().find(|r| r.replica_id == replica_id);
        let (node_id, addr) = listed.map_or((context.node_id, &context.addr), |r| (r.node_id, &r.addr));
        Replica { node_id, replica_id, learner, addr: addr.clone() }
    };
    let voters = conf_state.voters.iter().map(|&id| replica(id, false));
    let learners = conf_state.learners.iter().map(|&id| replica(id, true));
    let mut replicas: Vec<Replica> = voters.chain(learners).collect();
    replicas.sort_by_key(|r| r.replica_id);
    let epoch = current.epoch();
    RangeDescriptor {
        replicas,
        epoch: Some(RangeEpoch { conf_version: epoch.conf_version + 1, ..epoch }),
        ..current.clone()
    }
}

impl Peer {
    /// Proposes a membership change for the client `token`: answered `Written(Done)` once applied, or refused now
    /// (not the leader; a change still pending; a change that makes no sense for the current members).
    pub fn propose_membership(&mut self, token: Token, change: MembershipChange) {
        self.on_request();
        if !self.is_leader() {
            let refusal = self.not_leader();
            return self.responses.push((token, Response::Failed(refusal)));
        }
        if self.descriptor.is_merging() || self.merge_step_pending() {
            // The members of a range frozen for a merge stay as they are (`merge.rs`).
            let merging = crate::range::RangeError::Merging { current: Box::new(self.descriptor.clone()) };
            return self.responses.push((token, Response::Failed(PeerError::Range(merging))));
        }
        if let MembershipChange::AddLearner { node_id, replica_id, addr } = &change {
            let node_id = *node_id;
            let same = |r: &Replica| r.replica_id == *replica_id && r.node_id == node_id && r.addr == *addr;
            if self.descriptor.replicas.iter().any(same) {
                // The same addition again (a retried join): it took effect already.
                return self.responses.push((token, Response::Written(Outcome::Done)));
            }
            if self.descriptor.lists_node(node_id) {
                let refusal = PeerError::Membership(format!(
                    "node {node_id} already holds a replica of group {}",
                    self.group_id()
                ));
                return self.responses.push((token, Response::Failed(refusal)));
            }
        }
        self.propose_batched(); // (behind the writes taken before it, as every proposal)
        match self.raw.propose_conf_change(&change.to_conf_change(token)) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                self.writes.entry(index).or_default().push(PendingWrite { term: self.raw.raft.term, token });
            }
            Err(RaftError::ProposalDropped(flotilla_raft::DropReason::InvalidConfChange)) => {
                let refusal = PeerError::Membership(format!(
                    "{change:?} does not fit the members {:?}",
                    self.descriptor.replicas
                ));
                self.responses.push((token, Response::Failed(refusal)));
            }
            Err(RaftError::ProposalDropped(reason)) => {
                self.responses.push((token, Response::Failed(PeerError::Busy(reason))))
            }
            Err(other) => {
                unreachable!("a membership proposal on a leader fails only by being dropped, not with {other:?}")
            }
        }
    }

    /// Applies one committed membership change: to the core's configuration and to the range descriptor.
    pub(super) fn apply_membership_entry(&mut self, entry: &Entry) -> Result<Applied, ApplyError> {
        let undecodable = |e: prost::DecodeError| ApplyError::Undecodable { index: entry.index, reason: e.to_string() };
        let change = ConfChangeV2::decode(entry.data.as_ref()).map_err(undecodable)?;
        let context = ChangeContext::decode(change.context.as_ref()).map_err(undecodable)?;
        let outcome = match self.raw.apply_conf_change(&change) {
            Ok(conf_state) => {
                self.descriptor = next_descriptor(&self.descriptor, &conf_state, &context);
                if !self.descriptor.lists_replica(self.raw.raft.id) {
                    self.removed = true;
                }
                metrics::counter!("flotilla_membership_changes_total").increment(1);
                Outcome::Done
            }
            // Skipped the same way on every replica (the configuration it applies to is the same everywhere).
            Err(_) => Outcome::InvalidMembership,
        };
        Ok(Applied { request_id: context.request_id, index: entry.index, term: entry.term, outcome })
    }

    /// Whether this replica applied its own removal (or learned of it, [`Peer::on_removal_notice`]): it takes
    /// part in nothing any more, and its node destroys it.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// A Raft message from a replica this member's configuration does not list: answered with a removal notice
    /// carrying this replica's descriptor. Usually the sender was removed and missed the news (it campaigns once
    /// its leader's heartbeats stop); if instead it is newer than this replica's configuration (a learner this
    /// replica has not applied the addition of yet), the receiver sees a configuration older than its own and
    /// ignores the notice.
    pub(super) fn notice_if_unlisted(&mut self, message: &ReplicaMessage) {
        let ReplicaMessage::Raft(message) = message else { return };
        if self.removed
            || !self.descriptor.lists_replica(self.raw.raft.id)
            || self.descriptor.lists_replica(message.from)
        {
            return;
        }
        let notice =
            RemovalNotice { from: self.raw.raft.id, to: message.from, descriptor: Some(self.descriptor.clone()) };
        self.outbox.push(ReplicaMessage::Removed(notice));
    }

    /// A member's descriptor, sent because this replica messaged it unlisted. This replica was removed if the
    /// notice's configuration is newer than its own and does not list it: configurations follow one history, and
    /// a replica id once removed never returns. Then it stops and its node destroys it, storing the notice's
    /// descriptor as the record. Ignored by a replica whose own descriptor does not list it (an empty replica
    /// not yet caught up: whoever sent the notice may simply not know of it yet).
    pub fn on_removal_notice(&mut self, notice: RemovalNotice) {
        let Some(descriptor) = notice.descriptor else { return };
        let me = self.raw.raft.id;
        let newer = descriptor.epoch().conf_version > self.descriptor.epoch().conf_version;
        if self.removed
            || descriptor.group_id != self.descriptor.group_id
            || !self.descriptor.lists_replica(me)
            || !newer
            || descriptor.lists_replica(me)
        {
            return;
        }
        self.descriptor = descriptor;
        self.removed = true;
        metrics::counter!("flotilla_removal_notices_taken_total").increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_follows_the_configuration_with_each_replica_on_its_node() {
        let replicas = vec![Replica::voter(10, 1), Replica::voter(20, 2)];
        let current = RangeDescriptor {
            group_id: 3,
            epoch: Some(RangeEpoch { version: 4, conf_version: 7 }),
            replicas,
            ..Default::default()
        };
        let adding = ChangeContext { request_id: 1, node_id: 30, addr: "10.0.0.30:7000".into() };
        let added = next_descriptor(
            &current,
            &ConfState { voters: vec![1, 2], learners: vec![9], ..Default::default() },
            &adding,
        );
        let learner = Replica { learner: true, addr: "10.0.0.30:7000".into(), ..Replica::voter(30, 9) };
        assert_eq!(added.replicas[2], learner);
        assert_eq!(added.epoch(), RangeEpoch { version: 4, conf_version: 8 });
        let other = ChangeContext::default();
        let promoted = next_descriptor(&added, &ConfState { voters: vec![1, 2, 9], ..Default::default() }, &other);
        assert_eq!(promoted.replicas[2], Replica { learner: false, ..learner }, "its node and address kept");
        let removed = next_descriptor(&promoted, &ConfState { voters: vec![2, 9], ..Default::default() }, &other);
        assert_eq!(
            removed.replicas.iter().map(|r| (r.replica_id, r.node_id)).collect::<Vec<_>>(),
            vec![(2, 20), (9, 30)]
        );
        assert_eq!(removed.epoch().conf_version, 10);
    }
}
