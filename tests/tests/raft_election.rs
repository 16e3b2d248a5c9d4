//! Elections: Raft §5.1, §5.2, §5.4.1, pre-vote and check-quorum (thesis §9.6), and the design-note scenarios
//! (a), (b), (c), (e). Each test asserts the exact messages or the exact state the rule demands.

use bytes::Bytes;
use flotilla_raft::prelude::*;
use flotilla_tests::cluster::Cluster;

fn no_pre_vote(config: &mut Config) {
    config.pre_vote = false;
}

#[test]
fn election_exchanges_exactly_pre_vote_vote_and_first_append() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    assert_eq!(
        c.take_trace(),
        [
            "1->2 RequestPreVote t1",
            "1->3 RequestPreVote t1",
            "2->1 RequestPreVoteResponse t1",
            "3->1 RequestPreVoteResponse t1",
            "1->2 RequestVote t1",
            "1->3 RequestVote t1",
            "2->1 RequestVoteResponse t1",
            "3->1 RequestVoteResponse t1",
            // The no-op of the new term (§8), then the commit that it carries.
            "1->2 Append t1 ents=[1@1]",
            "1->3 Append t1 ents=[1@1]",
            "2->1 AppendResponse t1 idx=1",
            "3->1 AppendResponse t1 idx=1",
            "1->2 Append t1 idx=1 logt=1 commit=1",
            "1->3 Append t1 idx=1 logt=1 commit=1",
            "2->1 AppendResponse t1 idx=1",
            "3->1 AppendResponse t1 idx=1",
        ]
    );
    for id in [1, 2, 3] {
        assert_eq!(c.raft(id).term, 1);
        assert_eq!(c.raft(id).leader_id, 1);
        assert_eq!(c.raft(id).raft_log.committed, 1);
    }
}

#[test]
fn follower_election_timeout_is_randomized_in_t_to_2t() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..40 {
        let mut c = Cluster::new(&[1, 2, 3], &[], |config| config.random_seed = seed);
        let mut ticks = 0;
        while c.raft(1).role == StateRole::Follower {
            c.node_mut(1).raw.tick();
            ticks += 1;
            c.take_messages();
            c.node_mut(1).process_ready(true);
            assert!(ticks < 20, "no campaign within 2T ticks");
        }
        assert!(ticks >= 10, "campaigned after {ticks} ticks, before T");
        seen.insert(ticks);
    }
    assert!(seen.len() >= 5, "timeouts are not spread over [T, 2T): {seen:?}");
}

#[test]
fn higher_term_turns_anyone_into_follower_and_lower_term_is_answered_with_ours() {
    // §5.1: a replica that sees a higher term adopts it and becomes follower.
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.take_trace();
    let mut heartbeat = Message::new(MessageType::Heartbeat, 2, 1, 5);
    heartbeat.commit = 0;
    c.deliver(vec![heartbeat]);
    assert_eq!((c.raft(1).role, c.raft(1).term, c.raft(1).leader_id), (StateRole::Follower, 5, 2));
    // A stale leader's append gets our newer term back (so that it steps down).
    c.take_messages();
    c.deliver(vec![Message::new(MessageType::Append, 3, 1, 2)]);
    let replies = c.take_messages();
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].kind(), replies[0].term, replies[0].to), (Some(MessageType::AppendResponse), 5, 3));
}

#[test]
fn a_replica_votes_at_most_once_per_term_and_persists_the_vote_first() {
    let mut c = Cluster::new(&[1, 2, 3], &[], no_pre_vote);
    let mut request = Message::new(MessageType::RequestVote, 1, 3, 1);
    c.deliver(vec![request.clone()]);
    assert_eq!(c.raft(3).vote, 1);
    assert_eq!(c.node(3).storage().hard_state().vote, 1, "the vote is durable before it is answered");
    request.from = 2;
    c.deliver(vec![request]);
    let replies = c.take_messages();
    assert_eq!(replies.len(), 2);
    assert!(!replies[0].reject && replies[0].to == 1, "first candidate granted");
    assert!(replies[1].reject && replies[1].to == 2, "second candidate in the same term refused");
}

#[test]
fn vote_response_is_held_until_the_vote_is_persisted() {
    let mut c = Cluster::new(&[1, 2, 3], &[], no_pre_vote);
    let node = c.node_mut(3);
    node.raw.step(Message::new(MessageType::RequestVote, 1, 3, 1)).unwrap();
    node.process_ready(false);
    assert!(node.take_outbox().is_empty(), "no answer while the vote is not durable");
    node.persist_all();
    let replies = node.take_outbox();
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].kind(), replies[0].reject), (Some(MessageType::RequestVoteResponse), false));
}

#[test]
fn election_restriction_refuses_candidates_with_less_up_to_date_logs() {
    // §5.4.1: voter 2 has [1, 2]; candidate 1 with [1, 1, 1] (older last term) and candidate 3 with [1] (same
    // last term... shorter) are refused; candidate 4 with [1, 2, 2] is granted.
    let logs = [(1, vec![1, 1, 1]), (2, vec![1, 2]), (3, vec![1]), (4, vec![1, 2, 2])];
    let mut c = Cluster::from_logs(&[1, 2, 3, 4], &logs, 2, no_pre_vote);
    let vote = |from: u64, index: u64, log_term: u64| {
        let mut m = Message::new(MessageType::RequestVote, from, 2, 3);
        m.index = index;
        m.log_term = log_term;
        m
    };
    c.deliver(vec![vote(1, 3, 1)]);
    c.deliver(vec![vote(3, 1, 1)]);
    let replies = c.take_messages();
    assert!(replies.iter().all(|m| m.reject), "{replies:?}");
    let mut shorter_same_term = vote(3, 1, 2);
    shorter_same_term.term = 4;
    c.deliver(vec![shorter_same_term]);
    assert!(c.take_messages()[0].reject, "same last term but shorter: refused");
    let mut granted = vote(4, 3, 2);
    granted.term = 5;
    c.deliver(vec![granted]);
    assert!(!c.take_messages()[0].reject, "later log: granted");
}

#[test]
fn scenario_a_without_majority_terms_grow_without_pre_vote_and_not_with_it() {
    for pre_vote in [false, true] {
        let mut c = Cluster::new(&[1, 2, 3], &[], |config| config.pre_vote = pre_vote);
        c.isolate(1);
        for _ in 0..10 {
            c.tick(1, 25);
            c.stabilize();
        }
        let term = c.raft(1).term;
        if pre_vote {
            assert_eq!(term, 0, "pre-vote: an isolated replica never raises its term");
            assert_eq!(c.raft(1).role, StateRole::PreCandidate);
        } else {
            assert!(term >= 5, "without pre-vote the isolated candidate's term keeps growing (got {term})");
            assert_eq!(c.raft(1).role, StateRole::Candidate);
        }
    }
}

#[test]
fn scenario_b_majority_elects_a_leader_that_keeps_office_by_heartbeats() {
    let mut c = Cluster::new(&[1, 2, 3, 4, 5], &[], |_| {});
    c.isolate(5);
    c.isolate(4);
    c.heal();
    c.isolate(5);
    c.elect(1);
    for _ in 0..100 {
        c.tick_all(1);
        c.stabilize();
    }
    for id in [1, 2, 3, 4] {
        assert_eq!((c.raft(id).term, c.raft(id).leader_id), (1, 1), "node {id} kept leader 1 in term 1");
    }
    assert_eq!(c.raft(1).role, StateRole::Leader);
}

#[test]
fn scenario_c_leader_that_loses_its_majority_steps_down() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.isolate(1);
    c.tick(1, 10);
    c.stabilize();
    assert_eq!(c.raft(1).role, StateRole::Leader, "one election timeout may pass with acks from before");
    c.tick(1, 10);
    assert_eq!(c.raft(1).role, StateRole::Follower, "check-quorum: no quorum heard for an election timeout");
    assert_eq!(c.raft(1).term, 1, "stepping down does not raise the term");
}

#[test]
fn scenario_e_rejoining_partitioned_node_does_not_depose_a_healthy_leader() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.isolate(3);
    for _ in 0..50 {
        c.tick_all(1);
        c.stabilize();
    }
    assert_eq!(c.raft(3).term, 1, "pre-vote kept the isolated node's term");
    c.heal();
    c.propose(1, "after heal").unwrap();
    for _ in 0..50 {
        c.tick_all(1);
        c.stabilize();
    }
    assert_eq!((c.raft(1).role, c.raft(1).term), (StateRole::Leader, 1));
    assert_eq!(c.raft(3).leader_id, 1);
    assert_eq!(c.raft(3).raft_log.committed, c.raft(1).raft_log.committed);
}

#[test]
fn check_quorum_followers_ignore_votes_while_they_hear_from_a_leader() {
    let mut c = Cluster::new(&[1, 2, 3], &[], no_pre_vote);
    c.elect(1);
    c.take_trace();
    let mut disruptive = Message::new(MessageType::RequestVote, 3, 2, 7);
    disruptive.index = 100;
    disruptive.log_term = 7;
    c.deliver(vec![disruptive]);
    assert_eq!((c.raft(2).term, c.raft(2).leader_id), (1, 1), "in lease: ignored, term unchanged");
    assert!(c.take_messages().is_empty());
}

#[test]
fn pre_vote_grants_do_not_change_terms_or_votes() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.campaign(1);
    let requests = c.take_messages();
    c.deliver(requests);
    assert_eq!((c.raft(2).term, c.raft(2).vote), (0, 0));
    assert_eq!(c.raft(1).term, 0, "pre-candidate does not raise its own term before winning the pre-vote");
}

#[test]
fn a_learner_never_campaigns_and_its_vote_never_counts() {
    let mut c = Cluster::new(&[1, 2], &[3], |_| {});
    c.tick(3, 100);
    assert_eq!(c.raft(3).role, StateRole::Follower);
    assert!(c.take_messages().is_empty(), "a learner sends no vote requests");
    // 1 campaigns; learner 3 is not even asked, so without 2 there is no majority.
    c.cut(1, 2);
    c.campaign(1);
    c.stabilize();
    assert_ne!(c.raft(1).role, StateRole::Leader);
}

#[test]
fn invalid_messages_are_errors_not_panics() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    let raw = &mut c.node_mut(2).raw;
    let unknown = Message { msg_type: 99, from: 1, to: 2, term: 1, ..Default::default() };
    assert!(raw.step(unknown).is_err());
    assert!(raw.step(Message::new(MessageType::Append, 1, 3, 1)).is_err(), "wrong addressee");
    assert!(raw.step(Message::new(MessageType::Append, 0, 2, 1)).is_err(), "no sender");
    let mut gap = Message::new(MessageType::Append, 1, 2, 1);
    gap.entries = vec![Entry { index: 5, term: 1, ..Default::default() }];
    assert!(raw.step(gap).is_err(), "entries that do not follow index");
    let mut future = Message::new(MessageType::Append, 1, 2, 1);
    future.entries = vec![Entry { index: 1, term: 9, ..Default::default() }];
    assert!(raw.step(future).is_err(), "entries of a term beyond the message's");
    let snapshot_without_snapshot = Message::new(MessageType::Snapshot, 1, 2, 1);
    assert!(raw.step(snapshot_without_snapshot).is_err());
    let _ = Bytes::new();
}

#[test]
fn a_stale_vote_request_is_rejected_with_our_term_so_the_candidate_catches_up() {
    // raft-sim seed 8778: without this answer a candidate whose requests only reach replicas of higher terms
    // never learns those terms and can never win.
    let mut c = Cluster::new(&[1, 2, 3], &[], no_pre_vote);
    c.with_node(3, |raw| raw.raft.become_follower(9, 0));
    let mut stale = Message::new(MessageType::RequestVote, 1, 3, 4);
    stale.index = 100;
    stale.log_term = 4;
    c.deliver(vec![stale]);
    let replies = c.take_messages();
    assert_eq!(replies.len(), 1);
    assert_eq!(
        (replies[0].kind(), replies[0].term, replies[0].reject),
        (Some(MessageType::RequestVoteResponse), 9, true)
    );
    c.deliver(replies);
    assert_eq!((c.raft(1).term, c.raft(1).role), (9, StateRole::Follower), "the candidate adopted the newer term");
}

#[test]
fn an_appointed_replica_leads_its_groups_first_term_without_an_election() {
    // Every replica starts in term 2 having voted for replica 1 (a split's new group): 1 leads at once.
    let mut c = Cluster::appointed(&[1, 2, 3], 2, 1, |_| {});
    assert!(c.with_node(1, |raw| raw.lead_as_appointed()));
    c.stabilize();
    assert_eq!(
        c.take_trace(),
        [
            "1->2 Append t2 ents=[1@2]",
            "1->3 Append t2 ents=[1@2]",
            "2->1 AppendResponse t2 idx=1",
            "3->1 AppendResponse t2 idx=1",
            "1->2 Append t2 idx=1 logt=2 commit=1",
            "1->3 Append t2 idx=1 logt=2 commit=1",
            "2->1 AppendResponse t2 idx=1",
            "3->1 AppendResponse t2 idx=1",
        ]
    );
    for id in [1, 2, 3] {
        assert_eq!((c.raft(id).term, c.raft(id).leader_id, c.raft(id).raft_log.committed), (2, 1, 1));
    }
    c.propose(1, "x").unwrap();
    c.stabilize();
    assert_eq!(c.applied_index(3), 2);
}

#[test]
fn an_appointment_is_refused_unless_the_replica_holds_its_own_vote_of_a_term_it_has_not_led() {
    // Not the appointee: its vote is for another.
    let mut c = Cluster::appointed(&[1, 2, 3], 2, 1, |_| {});
    assert!(!c.with_node(2, |raw| raw.lead_as_appointed()));
    assert_eq!(c.raft(2).role, StateRole::Follower);
    // Already leading, or following a known leader.
    assert!(c.with_node(1, |raw| raw.lead_as_appointed()));
    assert!(!c.with_node(1, |raw| raw.lead_as_appointed()));
    c.stabilize();
    assert!(!c.with_node(2, |raw| raw.lead_as_appointed()));
    // Restarted after leading the term (its no-op durable): leading it again could write a second, different
    // entry at an index and term the others already hold.
    c.node_mut(1).crash_and_restart(0).unwrap();
    assert_eq!((c.raft(1).term, c.raft(1).vote, c.raft(1).leader_id), (2, 1, 0));
    assert!(!c.with_node(1, |raw| raw.lead_as_appointed()));
    assert_eq!(c.raft(1).role, StateRole::Follower);
}
