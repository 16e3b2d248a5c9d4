//! Quorum arithmetic over a single majority configuration and over a joint one (both majorities must agree).
//! The same "k-th largest" computation gives the commit index (over match indexes) and the lease's confirmed tick
//! (over echoed ticks).

use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    Pending,
    Lost,
    Won,
}

/// A set of voters deciding by simple majority.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MajorityConfig {
    pub voters: BTreeSet<u64>,
}

impl MajorityConfig {
    pub fn new(voters: impl IntoIterator<Item = u64>) -> MajorityConfig {
        MajorityConfig { voters: voters.into_iter().collect() }
    }

    /// The largest value that a majority has reached (`acked` gives each voter's value; unknown counts as 0).
    /// An empty configuration imposes no constraint: `u64::MAX`.
    pub fn committed_value(&self, acked: impl Fn(u64) -> u64) -> u64 {
        if self.voters.is_empty() {
            return u64::MAX;
        }
        let mut values: Vec<u64> = self.voters.iter().map(|&id| acked(id)).collect();
        values.sort_unstable_by(|a, b| b.cmp(a));
        values[self.voters.len() / 2]
    }

    pub fn vote_result(&self, votes: &BTreeMap<u64, bool>) -> VoteResult {
        if self.voters.is_empty() {
            return VoteResult::Won;
        }
        let (mut granted, mut missing) = (0, 0);
        for id in &self.voters {
            match votes.get(id) {
                Some(true) => granted += 1,
                Some(false) => {}
                None => missing += 1,
            }
        }
        let quorum = self.voters.len() / 2 + 1;
        if granted >= quorum {
            VoteResult::Won
        } else if granted + missing >= quorum {
            VoteResult::Pending
        } else {
            VoteResult::Lost
        }
    }
}

/// The voters of a configuration: `incoming` always, `outgoing` only while joint (empty otherwise).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JointConfig {
    pub incoming: MajorityConfig,
    pub outgoing: MajorityConfig,
}

impl JointConfig {
    pub fn committed_value(&self, acked: impl Fn(u64) -> u64 + Copy) -> u64 {
        self.incoming.committed_value(acked).min(self.outgoing.committed_value(acked))
    }

    pub fn vote_result(&self, votes: &BTreeMap<u64, bool>) -> VoteResult {
        match (self.incoming.vote_result(votes), self.outgoing.vote_result(votes)) {
            (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
            (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
            _ => VoteResult::Pending,
        }
    }

    pub fn contains(&self, id: u64) -> bool {
        self.incoming.voters.contains(&id) || self.outgoing.voters.contains(&id)
    }

    /// Whether `id` is the only voter (of both halves, if joint), without building the voter set.
    pub fn is_only_voter(&self, id: u64) -> bool {
        let only = |set: &BTreeSet<u64>| set.len() == 1 && set.contains(&id);
        only(&self.incoming.voters) && (self.outgoing.voters.is_empty() || only(&self.outgoing.voters))
    }

    pub fn ids(&self) -> BTreeSet<u64> {
        self.incoming.voters.union(&self.outgoing.voters).copied().collect()
    }

    pub fn is_joint(&self) -> bool {
        !self.outgoing.voters.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_value_is_the_majority_minimum() {
        let config = MajorityConfig::new([1, 2, 3, 4, 5]);
        let acked = |id: u64| [0, 10, 9, 8, 2, 1][id as usize];
        assert_eq!(config.committed_value(acked), 8);
        let even = MajorityConfig::new([1, 2, 3, 4]);
        assert_eq!(even.committed_value(acked), 8, "4 voters need 3");
        assert_eq!(MajorityConfig::default().committed_value(acked), u64::MAX);
    }

    #[test]
    fn joint_needs_both_majorities() {
        let joint = JointConfig { incoming: MajorityConfig::new([1, 2, 3]), outgoing: MajorityConfig::new([3, 4, 5]) };
        let acked = |id: u64| [0, 10, 10, 1, 1, 1][id as usize];
        assert_eq!(joint.committed_value(acked), 1);
        let votes: BTreeMap<u64, bool> = [(1, true), (2, true), (3, false)].into();
        assert_eq!(joint.vote_result(&votes), VoteResult::Pending);
        let votes: BTreeMap<u64, bool> = [(1, true), (2, true), (4, false), (5, false)].into();
        assert_eq!(joint.vote_result(&votes), VoteResult::Lost);
        let votes: BTreeMap<u64, bool> = [(1, true), (3, true), (4, true)].into();
        assert_eq!(joint.vote_result(&votes), VoteResult::Won);
    }
}
