//! Linearizable reads by ReadIndex: the leader confirms it still leads (a heartbeat round, or its lease when
//! the core runs in lease mode), which yields a read index; once the state machine has applied up to it, the
//! read may be served from it.

use bytes::Bytes;
use flotilla_raft::Error as RaftError;

use super::{Peer, PeerError, PendingRead, Response, Token};

impl Peer {
    /// Asks for a linearizable read for `token`: `Response::ReadReady` once it may be served.
    pub fn read(&mut self, token: Token) {
        self.on_request();
        if !self.is_leader() {
            let refusal = self.not_leader();
            return self.responses.push((token, Response::Failed(refusal)));
        }
        match self.raw.read_index(Bytes::copy_from_slice(&token.to_le_bytes())) {
            Ok(()) => self.reads.push_back(PendingRead { token, index: None }),
            Err(RaftError::ProposalDropped(reason)) => {
                self.responses.push((token, Response::Failed(PeerError::Busy(reason))))
            }
            Err(other) => unreachable!("a read on a leader fails only by being dropped, not with {other:?}"),
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
