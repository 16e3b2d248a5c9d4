//! Client writes and range splits: checked against the range and leadership, proposed, tracked until applied.
//!
//! The plain writes a leader takes in one handling are proposed together, as one entry ([`Command::batch`]),
//! when the handling ends ([`Peer::take_output`]) — or before any other proposal, which must follow them in the
//! log. The log, replication and apply then pay their per-entry costs (an entry's record, its place in the
//! caches and in every append, its decode at apply) once for the batch, not once per write; each write still
//! applies as a command of its own, with its own outcome. A batch is cut at [`PROPOSAL_BATCH_BYTES_MAX`].
//! Metric: `flotilla_proposal_batch_writes` (histogram: the writes proposed in one entry).

use flotilla_engine::contract::ENTRY_DATA_BYTES_MAX;
use flotilla_raft::Error as RaftError;
use prost::Message as _;

use super::{Peer, PeerError, PendingWrite, Response, Token};
use crate::command::Command;
use crate::range::SplitRequest;

/// Encoded bytes of the writes proposed together as one entry, at most (a write larger than that goes alone).
pub const PROPOSAL_BATCH_BYTES_MAX: usize = 256 << 10;

/// The plain writes taken in this handling, not yet proposed (see the module docs).
#[derive(Default)]
pub(super) struct ProposalBatch {
    writes: Vec<(Token, Command)>,
    bytes: usize,
}

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
        if !command.is_plain_write() {
            self.propose_entry(token, command);
            return;
        }
        // (A few bytes of framing per write in the batch's encoding.)
        if self.proposals.bytes + bytes + 8 > PROPOSAL_BATCH_BYTES_MAX {
            self.propose_batched();
        }
        self.proposals.bytes += bytes + 8;
        self.proposals.writes.push((token, command));
    }

    /// Proposes the writes taken since the last call (see the module docs): one alone as its own entry, several
    /// as one batch entry, each tracked for its client at that entry.
    pub(super) fn propose_batched(&mut self) {
        let ProposalBatch { mut writes, .. } = std::mem::take(&mut self.proposals);
        if writes.is_empty() {
            return;
        }
        metrics::histogram!("flotilla_proposal_batch_writes").record(writes.len() as f64);
        let data = match writes.len() {
            1 => writes[0].1.encode_entry(),
            _ => Command::batch(writes.iter_mut().map(|(_, command)| std::mem::take(command)).collect()).encode_entry(),
        };
        let tokens: Vec<Token> = writes.iter().map(|(token, _)| *token).collect();
        self.propose_tracked(&tokens, data);
    }

    /// Frees the map of proposed writes once none waits: an emptied `BTreeMap` keeps a node (368 bytes), which
    /// every idle replica would hold for good (100,000 idle groups: 37 MB).
    pub(super) fn release_empty_writes(&mut self) {
        if self.writes.is_empty() {
            self.writes = std::collections::BTreeMap::new();
        }
    }

    /// No write waits here: none taken and not yet proposed, none proposed and not yet applied.
    pub(super) fn no_writes_waiting(&self) -> bool {
        self.writes.is_empty() && self.proposals.writes.is_empty()
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

    /// Proposes `command` as one entry, behind the writes taken before it, and tracks it for `token`. Returns
    /// the entry's index, if proposed (a dropped proposal is answered `Busy`).
    pub(super) fn propose_entry(&mut self, token: Token, command: Command) -> Option<u64> {
        self.propose_batched();
        self.propose_tracked(&[token], command.encode_entry())
    }

    /// Proposes `data` as one entry and tracks it for every client in `tokens`; refuses them all if this replica
    /// no longer leads (it may have lost its leadership since it took them), or if the proposal is dropped.
    fn propose_tracked(&mut self, tokens: &[Token], data: bytes::Bytes) -> Option<u64> {
        let refused = |peer: &mut Peer, refusal: PeerError| {
            peer.responses.extend(tokens.iter().map(|&token| (token, Response::Failed(refusal.clone()))));
        };
        if !self.is_leader() {
            refused(self, self.not_leader());
            return None;
        }
        match self.raw.propose(data) {
            Ok(()) => {
                let (index, term) = (self.raw.raft.raft_log.last_index(), self.raw.raft.term);
                self.writes.entry(index).or_default().extend(tokens.iter().map(|&token| PendingWrite { term, token }));
                Some(index)
            }
            Err(RaftError::ProposalDropped(reason)) => {
                refused(self, PeerError::Busy(reason));
                None
            }
            Err(other) => unreachable!("a proposal on a leader fails only by being dropped, not with {other:?}"),
        }
    }
}
