//! The membership configuration in force and the leader's [`Progress`] for every member, plus the votes of the
//! current election. A configuration changes only through `apply_configuration` (see `conf_change.rs` for how a
//! new one is computed and the crate docs for when it takes effect).

use std::collections::{BTreeMap, BTreeSet};

use crate::message::ConfState;
use crate::progress::Progress;
use crate::progress_map::ProgressMap;
use crate::quorum::{JointConfig, MajorityConfig, VoteResult};

/// Who votes and who only learns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Configuration {
    pub voters: JointConfig,
    /// Non-voting members receiving the log. Never overlaps the voters.
    pub learners: BTreeSet<u64>,
    /// Outgoing voters that become learners when the joint configuration is left.
    pub learners_next: BTreeSet<u64>,
    pub auto_leave: bool,
}

impl Configuration {
    pub fn from_conf_state(cs: &ConfState) -> Configuration {
        Configuration {
            voters: JointConfig {
                incoming: MajorityConfig::new(cs.voters.iter().copied()),
                outgoing: MajorityConfig::new(cs.voters_outgoing.iter().copied()),
            },
            learners: cs.learners.iter().copied().collect(),
            learners_next: cs.learners_next.iter().copied().collect(),
            auto_leave: cs.auto_leave,
        }
    }

    pub fn to_conf_state(&self) -> ConfState {
        ConfState {
            voters: self.voters.incoming.voters.iter().copied().collect(),
            learners: self.learners.iter().copied().collect(),
            voters_outgoing: self.voters.outgoing.voters.iter().copied().collect(),
            learners_next: self.learners_next.iter().copied().collect(),
            auto_leave: self.auto_leave,
        }
    }

    /// Whether `id` is the only member (voter or learner), without building the member set.
    pub fn is_only_member(&self, id: u64) -> bool {
        self.voters.is_only_voter(id) && self.learners.is_empty() && self.learners_next.is_empty()
    }

    /// Every member: voters of both halves and learners (current and next).
    pub fn member_ids(&self) -> BTreeSet<u64> {
        let mut ids = self.voters.ids();
        ids.extend(&self.learners);
        ids.extend(&self.learners_next);
        ids
    }

    /// Panics if the configuration breaks its own rules.
    pub fn validate(&self) {
        for id in &self.learners {
            assert!(!self.voters.contains(*id), "{id} is both learner and voter");
        }
        for id in &self.learners_next {
            assert!(self.voters.outgoing.voters.contains(id), "learner_next {id} is not an outgoing voter");
            assert!(!self.voters.incoming.voters.contains(id), "learner_next {id} is an incoming voter");
        }
        assert!(self.voters.is_joint() || !self.auto_leave, "auto_leave set on a non-joint configuration");
    }
}

pub struct ProgressTracker {
    pub config: Configuration,
    pub progress: ProgressMap,
    pub votes: BTreeMap<u64, bool>,
    inflight_messages_max: usize,
    inflight_bytes_max: u64,
}

impl ProgressTracker {
    pub fn new(inflight_messages_max: usize, inflight_bytes_max: u64) -> ProgressTracker {
        ProgressTracker {
            config: Configuration::default(),
            progress: ProgressMap::default(),
            votes: BTreeMap::new(),
            inflight_messages_max,
            inflight_bytes_max,
        }
    }

    /// Installs `config`, creating progress (probing from `next_index`) for new members and dropping it for
    /// members that left.
    pub fn apply_configuration(&mut self, config: Configuration, next_index: u64) {
        config.validate();
        let members = config.member_ids();
        self.progress.retain(|id, _| members.contains(id));
        for id in &members {
            let (count, bytes) = (self.inflight_messages_max, self.inflight_bytes_max);
            let progress = self.progress.get_or_insert_with(*id, || {
                let mut progress = Progress::new(next_index, count, bytes);
                // A new member counts as active so that check-quorum does not depose the leader before it could
                // have heard from it.
                progress.recent_active = true;
                progress
            });
            progress.is_learner = !config.voters.contains(*id);
        }
        self.config = config;
    }

    pub fn is_voter(&self, id: u64) -> bool {
        self.config.voters.contains(id)
    }

    /// The largest index a quorum of voters has persisted.
    pub fn committed_index(&self) -> u64 {
        self.config.voters.committed_value(|id| self.progress.get(&id).map_or(0, |p| p.matched))
    }

    /// The newest leader tick a quorum has echoed back (`self_id` counts with `now_tick`).
    pub fn lease_confirmed_tick(&self, self_id: u64, now_tick: u64) -> u64 {
        self.config.voters.committed_value(|id| {
            if id == self_id {
                now_tick
            } else {
                self.progress.get(&id).map_or(0, |p| p.lease_ack_tick)
            }
        })
    }

    /// Whether a quorum was heard from since the last call; resets the marks (except `self_id`'s).
    pub fn quorum_active_and_reset(&mut self, self_id: u64) -> bool {
        let votes: BTreeMap<u64, bool> = self
            .progress
            .iter()
            .filter(|(id, _)| self.config.voters.contains(**id))
            .map(|(id, p)| (*id, p.recent_active || *id == self_id))
            .collect();
        for (id, progress) in self.progress.iter_mut() {
            progress.recent_active = *id == self_id;
        }
        self.config.voters.vote_result(&votes) == VoteResult::Won
    }

    pub fn reset_votes(&mut self) {
        self.votes.clear();
    }

    /// Records `id`'s vote (only its first vote in an election counts).
    pub fn record_vote(&mut self, id: u64, granted: bool) {
        self.votes.entry(id).or_insert(granted);
    }

    pub fn tally_votes(&self) -> VoteResult {
        self.config.voters.vote_result(&self.votes)
    }
}
