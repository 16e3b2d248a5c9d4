//! Computing the next configuration from a [`ConfChangeV2`] (joint consensus, Raft thesis §4.3, with the
//! etcd-style refinement of learners). Pure: it returns a new [`Configuration`] or an error, and changes nothing.
//!
//! - A **simple** change alters at most one voter and is applied directly (any two majorities of configurations
//!   differing by one voter overlap).
//! - A **joint** change enters `C_old,new`: decisions need a majority of both. Leaving it (an empty change)
//!   installs `C_new`; outgoing voters demoted to learners move from `learners_next` to `learners` then.

use crate::message::{ConfChangeTransition, ConfChangeType, ConfChangeV2};
use crate::tracker::Configuration;

/// Why a change is not valid from the current configuration.
pub type ChangeError = &'static str;

/// Whether `cc` must go through a joint configuration; `None` for an unknown transition or change type.
pub fn needs_joint(cc: &ConfChangeV2) -> Option<bool> {
    if cc.changes.iter().any(|c| c.kind().is_none()) {
        return None;
    }
    Some(match cc.transition_kind()? {
        ConfChangeTransition::Auto => cc.changes.len() > 1,
        ConfChangeTransition::JointImplicit | ConfChangeTransition::JointExplicit => true,
    })
}

/// The configuration after applying `cc` to `current`.
pub fn next_configuration(current: &Configuration, cc: &ConfChangeV2) -> Result<Configuration, ChangeError> {
    if cc.is_leave_joint() {
        return leave_joint(current);
    }
    let joint = needs_joint(cc).ok_or("unknown change type or transition")?;
    if current.voters.is_joint() {
        return Err("already in a joint configuration");
    }
    let mut next = current.clone();
    if joint {
        next.voters.outgoing = current.voters.incoming.clone();
        next.auto_leave = cc.transition_kind() != Some(ConfChangeTransition::JointExplicit);
    }
    for change in &cc.changes {
        let id = change.node_id;
        if id == 0 {
            return Err("node id 0");
        }
        match change.kind().ok_or("unknown change type")? {
            ConfChangeType::AddNode => {
                next.voters.incoming.voters.insert(id);
                next.learners.remove(&id);
                next.learners_next.remove(&id);
            }
            ConfChangeType::AddLearnerNode => {
                next.voters.incoming.voters.remove(&id);
                next.learners.remove(&id);
                next.learners_next.remove(&id);
                if next.voters.outgoing.voters.contains(&id) {
                    next.learners_next.insert(id);
                } else {
                    next.learners.insert(id);
                }
            }
            ConfChangeType::RemoveNode => {
                next.voters.incoming.voters.remove(&id);
                next.learners.remove(&id);
                next.learners_next.remove(&id);
            }
        }
    }
    if next.voters.incoming.voters.is_empty() {
        return Err("removes every voter");
    }
    if !joint {
        let changed = next.voters.incoming.voters.symmetric_difference(&current.voters.incoming.voters).count();
        if changed > 1 {
            return Err("more than one voter changes without a joint configuration");
        }
    }
    next.validate();
    Ok(next)
}

fn leave_joint(current: &Configuration) -> Result<Configuration, ChangeError> {
    if !current.voters.is_joint() {
        return Err("not in a joint configuration");
    }
    let mut next = current.clone();
    next.learners.extend(std::mem::take(&mut next.learners_next));
    next.voters.outgoing.voters.clear();
    next.auto_leave = false;
    next.validate();
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ConfChangeSingle, ConfState};

    fn config(voters: &[u64], learners: &[u64]) -> Configuration {
        Configuration::from_conf_state(&ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            ..Default::default()
        })
    }

    fn change(kind: ConfChangeType, id: u64) -> ConfChangeSingle {
        ConfChangeSingle::new(kind, id)
    }

    #[test]
    fn simple_change_adds_one_voter_and_rejects_two() {
        let current = config(&[1, 2, 3], &[]);
        let next = next_configuration(&current, &ConfChangeV2::new(vec![change(ConfChangeType::AddNode, 4)])).unwrap();
        assert_eq!(next.to_conf_state().voters, vec![1, 2, 3, 4]);
        let mut two = ConfChangeV2::new(vec![change(ConfChangeType::AddNode, 4), change(ConfChangeType::AddNode, 5)]);
        two.transition = ConfChangeTransition::Auto as i32;
        let joint = next_configuration(&current, &two).unwrap();
        assert!(joint.voters.is_joint(), "two voters at once goes through joint consensus");
        assert!(joint.auto_leave);
    }

    #[test]
    fn demoting_a_voter_in_joint_makes_it_a_learner_on_leave() {
        let current = config(&[1, 2, 3], &[]);
        let cc = ConfChangeV2 {
            transition: ConfChangeTransition::JointExplicit as i32,
            changes: vec![change(ConfChangeType::AddLearnerNode, 1), change(ConfChangeType::AddNode, 4)],
            context: Default::default(),
        };
        let joint = next_configuration(&current, &cc).unwrap();
        let cs = joint.to_conf_state();
        assert_eq!((cs.voters, cs.voters_outgoing, cs.learners_next), (vec![2, 3, 4], vec![1, 2, 3], vec![1]));
        assert!(!joint.auto_leave);
        assert_eq!(next_configuration(&joint, &cc), Err("already in a joint configuration"));
        let left = next_configuration(&joint, &ConfChangeV2::leave_joint()).unwrap().to_conf_state();
        assert_eq!((left.voters, left.learners, left.voters_outgoing), (vec![2, 3, 4], vec![1], vec![]));
    }

    #[test]
    fn invalid_changes_are_errors() {
        let current = config(&[1], &[2]);
        assert!(next_configuration(&current, &ConfChangeV2::leave_joint()).is_err());
        let remove_all = ConfChangeV2::new(vec![change(ConfChangeType::RemoveNode, 1)]);
        assert_eq!(next_configuration(&current, &remove_all), Err("removes every voter"));
        let unknown = ConfChangeV2 { transition: 9, ..ConfChangeV2::new(vec![change(ConfChangeType::AddNode, 3)]) };
        assert!(next_configuration(&current, &unknown).is_err());
        let zero = ConfChangeV2::new(vec![change(ConfChangeType::AddNode, 0)]);
        assert!(next_configuration(&current, &zero).is_err());
    }
}
