//! Membership (learners, simple and joint changes, replacing the leader: scenario (h)) and leadership transfer.

use bytes::Bytes;
use flotilla_raft::prelude::*;
use flotilla_raft::{DropReason, Error};
use flotilla_tests::cluster::Cluster;

fn change(kind: ConfChangeType, id: u64) -> ConfChangeSingle {
    ConfChangeSingle::new(kind, id)
}

fn settle_rounds(c: &mut Cluster, rounds: usize) {
    for _ in 0..rounds {
        c.tick_all(1);
        c.stabilize();
    }
}

#[test]
fn a_learner_receives_the_log_but_does_not_count_toward_commit() {
    let mut c = Cluster::new(&[1, 2, 3], &[4], |_| {});
    c.elect(1);
    c.propose(1, "x").unwrap();
    c.stabilize();
    assert_eq!(c.raft(4).raft_log.committed, 2, "the learner gets the log");
    c.isolate(2);
    c.isolate(3);
    c.propose(1, "y").unwrap();
    c.stabilize();
    assert_eq!(c.raft(4).raft_log.last_index(), 3);
    assert_eq!(c.raft(1).raft_log.committed, 2, "leader + learner is no quorum");
}

#[test]
fn adding_a_learner_then_promoting_it() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.add_node(4, &[1, 2, 3], |_| {});
    c.elect(1);
    let add = ConfChangeV2::new(vec![change(ConfChangeType::AddLearnerNode, 4)]);
    c.with_node(1, |raw| raw.propose_conf_change(&add)).unwrap();
    c.stabilize();
    assert_eq!(c.node(4).machine.conf_state.learners, vec![4]);
    let promote = ConfChangeV2::new(vec![change(ConfChangeType::AddNode, 4)]);
    c.with_node(1, |raw| raw.propose_conf_change(&promote)).unwrap();
    c.stabilize();
    for id in 1..=4 {
        assert_eq!(c.node(id).machine.conf_state.voters, vec![1, 2, 3, 4], "node {id}");
    }
    c.with_node(1, |raw| raw.transfer_leader(4));
    c.stabilize();
    assert_eq!(c.raft(4).role, StateRole::Leader, "the promoted learner can lead");
}

#[test]
fn one_membership_change_at_a_time() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.isolate(2);
    c.isolate(3);
    let add = ConfChangeV2::new(vec![change(ConfChangeType::AddLearnerNode, 4)]);
    c.with_node(1, |raw| raw.propose_conf_change(&add)).unwrap();
    let another = ConfChangeV2::new(vec![change(ConfChangeType::AddLearnerNode, 5)]);
    assert_eq!(
        c.with_node(1, |raw| raw.propose_conf_change(&another)),
        Err(Error::ProposalDropped(DropReason::ConfChangePending))
    );
    let invalid = ConfChangeV2::leave_joint();
    c.heal();
    c.stabilize();
    assert_eq!(
        c.with_node(1, |raw| raw.propose_conf_change(&invalid)),
        Err(Error::ProposalDropped(DropReason::InvalidConfChange)),
        "leaving a joint configuration we are not in"
    );
}

#[test]
fn scenario_h_joint_consensus_replaces_the_leader() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.add_node(4, &[1, 2, 3], |_| {});
    c.elect(1);
    let replace = ConfChangeV2 {
        transition: ConfChangeTransition::JointImplicit as i32,
        changes: vec![change(ConfChangeType::RemoveNode, 1), change(ConfChangeType::AddNode, 4)],
        context: Bytes::new(),
    };
    c.with_node(1, |raw| raw.propose_conf_change(&replace)).unwrap();
    c.stabilize();
    // The joint configuration was entered and (automatically) left.
    for id in 2..=4 {
        let cs = &c.node(id).machine.conf_state;
        assert_eq!((cs.voters.clone(), cs.voters_outgoing.clone()), (vec![2, 3, 4], vec![]), "node {id}");
    }
    // The removed leader handed over rather than leave the group leaderless.
    settle_rounds(&mut c, 30);
    let leader = c.leader().expect("a leader");
    assert!([2, 3, 4].contains(&leader), "leader {leader} must be a member");
    assert_ne!(c.raft(1).role, StateRole::Leader);
    c.propose(leader, "after the change").unwrap();
    c.stabilize();
    assert!([2, 3, 4].iter().all(|&id| c.raft(id).raft_log.committed == c.raft(leader).raft_log.committed));
}

#[test]
fn joint_configuration_needs_both_majorities() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    for id in [4, 5] {
        c.add_node(id, &[1, 2, 3], |_| {});
    }
    c.elect(1);
    let to_new = ConfChangeV2 {
        transition: ConfChangeTransition::JointExplicit as i32,
        changes: vec![
            change(ConfChangeType::RemoveNode, 2),
            change(ConfChangeType::RemoveNode, 3),
            change(ConfChangeType::AddNode, 4),
            change(ConfChangeType::AddNode, 5),
        ],
        context: Bytes::new(),
    };
    c.with_node(1, |raw| raw.propose_conf_change(&to_new)).unwrap();
    c.stabilize();
    assert_eq!(c.node(1).machine.conf_state.voters_outgoing, vec![1, 2, 3], "joint, and explicit: not left");
    // Old majority {1, 2, 3} cut off from 2 and 3: with only the new majority {1, 4, 5} nothing commits.
    c.isolate(2);
    c.isolate(3);
    let before = c.raft(1).raft_log.committed;
    c.propose(1, "needs both").unwrap();
    c.stabilize();
    assert_eq!(c.raft(1).raft_log.committed, before);
    c.heal();
    settle_rounds(&mut c, 3);
    assert!(c.raft(1).raft_log.committed > before);
    c.with_node(1, |raw| raw.propose_conf_change(&ConfChangeV2::leave_joint())).unwrap();
    c.stabilize();
    assert_eq!(c.node(4).machine.conf_state.voters, vec![1, 4, 5]);
    assert!(c.node(4).machine.conf_state.voters_outgoing.is_empty());
}

#[test]
fn leadership_transfer_to_an_up_to_date_follower_is_exactly_timeout_now_then_a_forced_vote() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.take_trace();
    c.with_node(1, |raw| raw.transfer_leader(3));
    c.dropped_types.insert(MessageType::Append);
    c.stabilize();
    let trace = c.take_trace();
    assert_eq!(
        &trace[..5],
        [
            "1->3 TimeoutNow t1",
            "3->1 RequestVote t2 idx=1 logt=1 commit=1 ctx=transfer",
            "3->2 RequestVote t2 idx=1 logt=1 commit=1 ctx=transfer",
            "1->3 RequestVoteResponse t2",
            "2->3 RequestVoteResponse t2",
        ]
    );
    assert_eq!((c.raft(3).role, c.raft(3).term), (StateRole::Leader, 2));
    assert_eq!(c.raft(1).role, StateRole::Follower);
}

#[test]
fn transfer_catches_the_target_up_first_and_refuses_proposals_meanwhile() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.isolate(3);
    for i in 0..5 {
        c.propose(1, &format!("v{i}")).unwrap();
    }
    c.stabilize();
    c.with_node(1, |raw| raw.transfer_leader(3));
    assert_eq!(c.propose(1, "during"), Err(Error::ProposalDropped(DropReason::Transferring)));
    c.heal();
    settle_rounds(&mut c, 3);
    assert_eq!(c.raft(3).role, StateRole::Leader);
    assert_eq!(c.log_terms(3)[..6], c.log_terms(1)[..6], "target was caught up before it campaigned");
}

#[test]
fn transfer_aborts_after_an_election_timeout() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.isolate(3);
    c.with_node(1, |raw| raw.transfer_leader(3));
    assert!(c.propose(1, "x").is_err());
    c.heal();
    c.isolate(3);
    settle_rounds(&mut c, 11);
    assert_eq!(c.raft(1).role, StateRole::Leader);
    assert_eq!(c.raft(1).lead_transferee, 0);
    assert!(c.propose(1, "x").is_ok(), "proposals resume once the transfer is aborted");
}

#[test]
fn a_vote_request_tells_a_leaderless_voter_what_is_committed() {
    // raft-sim seed 322: the voter with the longest log had not learned that the joint configuration making it a
    // voter was committed, so it never campaigned. The candidate's request carries its commit index and term.
    let logs = [(1, vec![1, 1, 1]), (2, vec![1, 1, 1, 1]), (3, vec![1])];
    let mut c = Cluster::from_logs(&[1, 2, 3], &logs, 1, |config| config.pre_vote = false);
    assert_eq!(c.raft(2).raft_log.committed, 0);
    let mut request = Message::new(MessageType::RequestVote, 1, 2, 2);
    request.index = 3;
    request.log_term = 1;
    request.commit = 3;
    request.commit_term = 1;
    c.deliver(vec![request.clone()]);
    assert_eq!(c.raft(2).raft_log.committed, 3, "2 holds 3@1, so it knows 1..=3 are committed");
    assert!(c.take_messages()[0].reject, "and still refuses the less up-to-date candidate");
    request.commit_term = 7;
    request.commit = 4;
    request.term = 3;
    c.deliver(vec![request]);
    assert_eq!(c.raft(2).raft_log.committed, 3, "an entry we do not hold with that term teaches nothing");
}

#[test]
fn without_commit_broadcast_a_removed_voter_still_hears_that_its_removal_committed() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |config| config.commit_broadcast = false);
    c.elect(1);
    let remove = ConfChangeV2::new(vec![change(ConfChangeType::RemoveNode, 3)]);
    c.with_node(1, |raw| raw.propose_conf_change(&remove)).unwrap();
    c.stabilize();
    // No heartbeat will reach replica 3 again (the leader applied its removal): the commit went out at once.
    assert_eq!(c.node(1).machine.conf_state.voters, vec![1, 2]);
    assert_eq!(c.raft(3).raft_log.committed, c.raft(1).raft_log.committed, "replica 3 learned the commit");
    assert_eq!(c.node(3).machine.conf_state.voters, vec![1, 2], "and applied its own removal");
}
