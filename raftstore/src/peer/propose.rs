//! Client writes and range splits: checked against the range and leadership, proposed as one entry each, tracked
//! until applied.

use flotilla_engine::contract::ENTRY_DATA_BYTES_MAX;
use flotilla_raft::Error as RaftError;
use prost::Message as _;

use super::{Peer, PeerError, PendingWrite, Response, Token};
use crate::command::Command;
use crate::range::SplitRequest;

impl Peer {
    /// Proposes `command` for the client `token`; the outcome arrives as a response once the entry applies (or
    /// at once, if it cannot be proposed here).
    pub fn propose(&mut self, token: Token, mut command: Command) {
        self.on_request();
        let keys: Vec<&[u8]> = command.ops.iter().map(|op| op.key.as_slice()).collect();
        if let Err(refusal) = self.descriptor.check(&keys, command.epoch) {
            if !self.takes_behind_commit(&keys, command.epoch, &refusal) {
                return self.responses.push((token, Response::Failed(PeerError::Range(refusal))));
            }
        }
        if !self.is_leader() {
            let refusal = self.not_leader();
            return self.responses.push((token, Response::Failed(refusal)));
        }
        command.request_id = token;
        let bytes = command.encoded_len();
        if bytes > ENTRY_DATA_BYTES_MAX {
            return self
                .responses
                .push((token, Response::Failed(PeerError::TooLarge { bytes, max: ENTRY_DATA_BYTES_MAX })));
        }
        self.propose_entry(token, command);
    }

    /// Proposes a split of this group's range for the client `token` (`RangeDescriptor::split` says what it
    /// makes): answered `Written(Split { right })` once applied, or refused now (not the leader; a request that
    /// does not fit the range). Every replica applies it at the same point of the log.
    pub fn propose_split(&mut self, token: Token, mut split: SplitRequest) {
        self.on_request();
        if !self.is_leader() {
            let refusal = self.not_leader();
            return self.responses.push((token, Response::Failed(refusal)));
        }
        if self.descriptor.is_merging() {
            let merging = crate::range::RangeError::Merging { current: Box::new(self.descriptor.clone()) };
            return self.responses.push((token, Response::Failed(PeerError::Range(merging))));
        }
        let key = &split.split_key;
        if !self.descriptor.contains(key) {
            // Routed by a table older than a split or merge of this range: the caller routes it again.
            let current = Box::new(self.descriptor.clone());
            let refusal = crate::range::RangeError::KeyNotInRange { key: key.clone(), current };
            return self.responses.push((token, Response::Failed(PeerError::Range(refusal))));
        }
        if let Err(reason) = self.descriptor.split(&split) {
            return self.responses.push((token, Response::Failed(PeerError::InvalidSplit(reason))));
        }
        if split.led_where_proposed {
            split.first_leader_node = self.descriptor.node_of(self.raw.raft.id).unwrap_or(0);
        }
        let mut command = Command::split(self.descriptor.epoch(), split);
        command.request_id = token;
        self.propose_entry(token, command);
    }

    /// Proposes `command` as one entry and tracks it for `token`. Returns the entry's index, if proposed (a
    /// dropped proposal is answered `Busy`).
    pub(super) fn propose_entry(&mut self, token: Token, command: Command) -> Option<u64> {
        match self.raw.propose(command.encode_entry()) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                self.writes.entry(index).or_default().push(PendingWrite { term: self.raw.raft.term, token });
                Some(index)
            }
            Err(RaftError::ProposalDropped(reason)) => {
                self.responses.push((token, Response::Failed(PeerError::Busy(reason))));
                None
            }
            Err(other) => unreachable!("a proposal on a leader fails only by being dropped, not with {other:?}"),
        }
    }
}
