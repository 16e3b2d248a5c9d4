//! Linearizable reads by ReadIndex: the leader confirms it still leads (a heartbeat round, or its lease when
//! the core runs in lease mode), which yields a read index; once the state machine has applied up to it, the
//! read may be served from it. And [`Peer::local_read_grant`]: for how long reads may be served without asking
//! the replica at all (the store publishes it for the callers' threads, `store/local_reader.rs`).

use bytes::Bytes;
use flotilla_raft::Error as RaftError;

use super::{Peer, PeerError, PendingRead, Response, Token};

/// Whether, and for how long, reads of this replica's group may be served from the node's state machine without
/// asking the replica (see [`Peer::local_read_grant`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalReadGrant {
    No,
    /// Until the replica is next handled: it is its group's only voter, leads, and applied its term's first entry.
    UntilChanged,
    /// For this many more of the replica's ticks (its lease), and until it is next handled.
    Ticks(u64),
}

impl Peer {
    /// Asks for a linearizable read for `token`: `Response::ReadReady` once it may be served.
    pub fn read(&mut self, token: Token) {
        self.on_request();
        if !self.is_leader() {
            let refusal = self.not_leader();
            return self.responses.push((token, Response::Failed(refusal)));
        }
        if self.is_frozen() {
            // Its keys may be another group's any moment now (`merge.rs`).
            let merging = crate::range::RangeError::Merging { current: Box::new(self.descriptor.clone()) };
            return self.responses.push((token, Response::Failed(PeerError::Range(merging))));
        }
        match self.raw.read_index(Bytes::copy_from_slice(&token.to_le_bytes())) {
            Ok(()) => self.reads.push_back(PendingRead { token, index: None }),
            Err(RaftError::ProposalDropped(reason)) => {
                self.responses.push((token, Response::Failed(PeerError::Busy(reason))))
            }
            Err(other) => unreachable!("a read on a leader fails only by being dropped, not with {other:?}"),
        }
    }

    /// Whether reads may be served, now and until this replica is next handled, from the node's state machine
    /// as it stands, without asking the replica: it leads, has applied the first entry of its term (so every write
    /// an earlier leader acknowledged is applied here), and either is its group's only voter or holds a lease —
    /// for the lease's remaining ticks. Every write this leader acknowledges is applied before it is answered, so
    /// such a read reflects every write acknowledged before it began. The store publishes this after every
    /// handling, before any of the handling's messages leave (a TimeoutNow ends the lease before its target can
    /// campaign); see `store/local_reader.rs`.
    pub fn local_read_grant(&mut self) -> LocalReadGrant {
        if !self.is_leader()
            || self.removed
            || self.is_hibernating()
            || self.storage_failure.is_some()
            || self.is_frozen()
        {
            return LocalReadGrant::No;
        }
        let raft = &self.raw.raft;
        if self.lead_start.0 != raft.term {
            // First seen leading in this term: its first entry is at or before the log's end now.
            self.lead_start = (raft.term, raft.raft_log.last_index());
        }
        if self.applied_index < self.lead_start.1 {
            return LocalReadGrant::No;
        }
        if raft.tracker.config.voters.is_only_voter(raft.id) {
            return LocalReadGrant::UntilChanged;
        }
        match raft.lease_end_tick() {
            Some(end) if raft.read_mode() == flotilla_raft::ReadMode::LeaseBased => {
                LocalReadGrant::Ticks(end - raft.tick_count())
            }
            _ => LocalReadGrant::No,
        }
    }

    /// Records the read indexes the core confirmed.
    pub(super) fn on_read_states(&mut self, states: Vec<flotilla_raft::ReadState>) {
        for state in states {
            let Ok(token) = <[u8; 8]>::try_from(state.context.as_ref()).map(Token::from_le_bytes) else { continue };
            if let Some(read) = self.reads.iter_mut().find(|read| read.token == token) {
                read.index = Some(state.index);
            }
        }
        self.answer_ready_reads();
    }

    /// Answers the confirmed reads the state machine has caught up with.
    pub(super) fn answer_ready_reads(&mut self) {
        let applied = self.applied_index;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            self.reads.drain(..).partition(|read| read.index.is_some_and(|index| index <= applied));
        self.reads = waiting.into();
        self.responses.extend(ready.into_iter().map(|read| (read.token, Response::ReadReady)));
    }

    /// On losing leadership: the core forgets reads it had not confirmed, so their clients hear it now.
    pub(super) fn fail_unconfirmed_reads(&mut self) {
        let refusal = self.not_leader();
        let (unconfirmed, confirmed): (Vec<_>, Vec<_>) = self.reads.drain(..).partition(|read| read.index.is_none());
        self.reads = confirmed.into();
        self.responses.extend(unconfirmed.into_iter().map(|read| (read.token, Response::Failed(refusal.clone()))));
    }
}
