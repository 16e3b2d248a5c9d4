//! Elections: pre-vote, campaigns, answering vote requests and counting votes (Raft §5.2, §5.4.1; thesis §9.6).

use bytes::Bytes;

use super::{Raft, StateRole};
use crate::error::Result;
use crate::message::{Message, MessageType, CAMPAIGN_TRANSFER_CONTEXT};
use crate::quorum::VoteResult;
use crate::storage::Storage;

impl<S: Storage> Raft<S> {
    /// Starts an election if this replica may: with a pre-vote first unless `transfer` (a TimeoutNow from the
    /// leader, which must not wait).
    pub fn hup(&mut self, transfer: bool) {
        if self.role == StateRole::Leader || !self.promotable() {
            return;
        }
        if self.has_unapplied_conf_changes() {
            // Our configuration may be out of date until those are applied; someone else will campaign.
            return;
        }
        if self.config.pre_vote && !transfer {
            self.campaign_pre_vote();
        } else {
            self.campaign(transfer);
        }
    }

    fn has_unapplied_conf_changes(&self) -> bool {
        let mut low = self.raft_log.applied + 1;
        let high = self.raft_log.committed + 1;
        while low < high {
            let Ok(entries) = self.raft_log.slice(low, high, 1 << 20) else { return false };
            if entries.iter().any(|e| e.is_conf_change()) {
                return true;
            }
            low += entries.len() as u64;
        }
        false
    }

    /// Takes the leadership of the current term without an election, where this replica's own durable vote of
    /// this term is for itself and every other voter's first state is known to hold the same vote: a split's
    /// new group, whose replicas all start in the term after the bootstrap term having voted for the replica the
    /// split appoints (`docs/architecture.md`, "Splits"). Nobody else can win this term: every voter's vote in it
    /// is cast before it can hear a candidate. Refused (false) unless this replica is a follower of that term
    /// that knows no leader and holds no entry of it (a restarted replica may have led this term already:
    /// leading it twice could write two different entries at one index and term — the caller appoints only at
    /// the group's first open, whose vote it has just made durable).
    pub fn lead_as_appointed(&mut self) -> bool {
        if self.role != StateRole::Follower
            || self.vote != self.id
            || self.leader_id != 0
            || !self.promotable()
            || self.raft_log.last_term() >= self.term
            || self.has_unapplied_conf_changes()
        {
            return false;
        }
        self.role = StateRole::Candidate;
        self.boot_quiet = false;
        self.become_leader();
        self.broadcast_append();
        true
    }

    fn campaign_pre_vote(&mut self) {
        self.become_pre_candidate();
        self.tracker.record_vote(self.id, true);
        if self.tracker.tally_votes() == VoteResult::Won {
            self.campaign(false);
            return;
        }
        self.send_vote_requests(MessageType::RequestPreVote, self.term + 1, Bytes::new());
    }

    fn campaign(&mut self, transfer: bool) {
        self.become_candidate();
        // Our own vote counts only once it is persisted: it is a response to ourselves, held like any other.
        let mut own_vote = self.message(MessageType::RequestVoteResponse, self.id);
        own_vote.from = self.id;
        self.msgs_after_persist.push(own_vote);
        let context = if transfer { Bytes::from_static(CAMPAIGN_TRANSFER_CONTEXT) } else { Bytes::new() };
        self.send_vote_requests(MessageType::RequestVote, self.term, context);
    }

    fn send_vote_requests(&mut self, kind: MessageType, term: u64, context: Bytes) {
        let (last_index, last_term) = (self.raft_log.last_index(), self.raft_log.last_term());
        let voters: Vec<u64> = self.tracker.config.voters.ids().into_iter().filter(|&id| id != self.id).collect();
        let (commit, commit_term) = self.commit_info();
        for id in voters {
            let mut request = self.message(kind, id);
            request.term = term;
            request.index = last_index;
            request.log_term = last_term;
            request.context = context.clone();
            // What we know to be committed travels with the request too (see `maybe_commit_by_vote`).
            request.commit = commit;
            request.commit_term = commit_term;
            self.msgs.push(request);
        }
    }

    /// Grants a vote to a candidate whose log is at least as up to date as ours, at most once per term.
    pub(super) fn handle_vote_request(&mut self, m: Message, kind: MessageType) {
        let pre_vote = kind == MessageType::RequestPreVote;
        let can_vote =
            self.vote == m.from || (self.vote == 0 && self.leader_id == 0) || (pre_vote && m.term > self.term);
        let response_kind =
            if pre_vote { MessageType::RequestPreVoteResponse } else { MessageType::RequestVoteResponse };
        let mut response = self.message(response_kind, m.from);
        if can_vote && self.raft_log.is_up_to_date(m.index, m.log_term) {
            // The response carries the request's term: a pre-vote is for a term we have not entered.
            response.term = m.term;
            if !pre_vote {
                self.election_elapsed = 0;
                self.vote = m.from;
            }
        } else {
            response.reject = true;
            // Tell the candidate what we know to be committed: with configurations taking effect at apply time,
            // it may hold a committed configuration change it does not know is committed, and be unable to win
            // until it applies it (etcd #12359).
            (response.commit, response.commit_term) = self.commit_info();
        }
        self.send(response);
    }

    /// Our commit index and the term of the entry there, as carried by vote requests and rejections.
    pub(super) fn commit_info(&self) -> (u64, u64) {
        let commit = self.raft_log.committed;
        (commit, self.raft_log.term(commit).unwrap_or(0))
    }

    /// A vote request or a rejected vote told us an index is committed. If we hold that very entry (same index
    /// and term), log matching makes our whole prefix up to it committed. Configurations take effect when
    /// applied, so without this a replica can be stuck on an outdated configuration that only a commit it does
    /// not know about would move on (etcd #12359): a candidate unable to win, or a replica with the longest log
    /// that believes it is a learner and never campaigns (raft-sim seed 322). Only while no leader is known. If a
    /// candidate learns of a configuration change this way it steps down: its election ran under an outdated
    /// configuration.
    pub(super) fn maybe_commit_by_vote(&mut self, m: &Message) {
        if m.commit <= self.raft_log.committed || self.leader_id != 0 || self.role == StateRole::Leader {
            return;
        }
        if m.commit_term == 0 || !self.raft_log.match_term(m.commit, m.commit_term) {
            return;
        }
        let previous = self.raft_log.committed;
        self.raft_log.commit_to(m.commit);
        let revealed_conf_change = self
            .raft_log
            .slice(previous + 1, m.commit + 1, u64::MAX)
            .is_ok_and(|entries| entries.iter().any(|e| e.is_conf_change()));
        if revealed_conf_change && self.role != StateRole::Follower {
            self.become_follower(self.term, 0);
        }
    }

    pub(super) fn step_candidate(&mut self, m: Message, kind: MessageType) -> Result<()> {
        let own_response = match self.role {
            StateRole::PreCandidate => MessageType::RequestPreVoteResponse,
            _ => MessageType::RequestVoteResponse,
        };
        match kind {
            MessageType::Append => {
                self.become_follower(m.term, m.from);
                self.handle_append(m)?;
            }
            MessageType::Heartbeat => {
                self.become_follower(m.term, m.from);
                self.handle_heartbeat(m);
            }
            MessageType::Snapshot => {
                self.become_follower(m.term, m.from);
                self.handle_snapshot(m)?;
            }
            k if k == own_response => {
                self.tracker.record_vote(m.from, !m.reject);
                match self.tracker.tally_votes() {
                    VoteResult::Won if self.role == StateRole::PreCandidate => self.campaign(false),
                    // Lead only once our own vote — and with it our term — is durable. Otherwise a crash could
                    // restart us in the previous term, the same voters could elect us again in this one, and we
                    // would lead one term twice with two different logs (raft-sim seed 219192: two different
                    // entries at one index and term). Our vote arrives when `on_persisted` releases it.
                    VoteResult::Won if self.tracker.votes.get(&self.id) != Some(&true) => {}
                    VoteResult::Won => {
                        self.become_leader();
                        self.broadcast_append();
                    }
                    VoteResult::Lost => self.become_follower(self.term, 0),
                    VoteResult::Pending => {}
                }
            }
            // No leader to forward to; the asker retries.
            _ => {}
        }
        Ok(())
    }
}
