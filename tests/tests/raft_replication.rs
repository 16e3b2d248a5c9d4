//! Log replication: Raft §5.3 and §5.4.2 (Figures 7 and 8), §7 (snapshots), flow control, backpressure and the
//! numbered-persistence contract; design-note scenarios (d), (f), (g).

use bytes::Bytes;
use flotilla_raft::prelude::*;
use flotilla_raft::{DropReason, Error};
use flotilla_tests::cluster::Cluster;

/// Proposes `count` values at `leader`, delivers everything, then snapshots and compacts the leader's log at its
/// applied index, which it returns.
fn propose_and_compact(c: &mut Cluster, leader: u64, count: usize) -> u64 {
    for i in 0..count {
        c.propose(leader, &format!("v{i}")).unwrap();
    }
    c.stabilize();
    let applied = c.applied_index(leader);
    c.node_mut(leader).snapshot_and_compact(applied);
    applied
}

/// Delivers every waiting message; those to `held` are stepped there without persisting anything.
fn deliver_holding_back(c: &mut Cluster, held: u64) -> Vec<Message> {
    let messages = c.take_messages();
    let (to_held, rest): (Vec<Message>, Vec<Message>) = messages.iter().cloned().partition(|m| m.to == held);
    c.deliver(rest);
    c.deliver_unpersisted(held, to_held);
    messages
}

const FIGURE_7_LEADER: [u64; 10] = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6];

#[test]
fn figure_7_every_follower_log_converges_to_the_leaders() {
    let cases: [&[u64]; 6] = [
        &[1, 1, 1, 4, 4, 5, 5, 6, 6],
        &[1, 1, 1, 4],
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
        &[1, 1, 1, 4, 4, 4, 4],
        &[1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
    ];
    for (case, follower) in cases.iter().enumerate() {
        let logs = [(1, FIGURE_7_LEADER.to_vec()), (2, follower.to_vec()), (3, FIGURE_7_LEADER.to_vec())];
        let mut c = Cluster::from_logs(&[1, 2, 3], &logs, 7, |_| {});
        c.elect(1);
        assert_eq!(c.raft(1).term, 8, "case {case}");
        let mut expected = FIGURE_7_LEADER.to_vec();
        expected.push(8);
        assert_eq!(c.log_terms(2), expected, "case ({}) did not converge", (b'a' + case as u8) as char);
        assert_eq!(c.raft(2).raft_log.committed, 11);
    }
}

#[test]
fn fast_backtracking_skips_a_whole_term_per_round_trip() {
    // The follower holds 100 entries of terms 2 and 3 that the leader (terms 1 and 5) never had: walking back one
    // index per rejection would take ~100 round trips; the term hints take at most a few.
    let mut follower = vec![1, 1, 1];
    follower.extend(std::iter::repeat_n(2, 50));
    follower.extend(std::iter::repeat_n(3, 50));
    let mut leader = vec![1, 1, 1];
    leader.extend(std::iter::repeat_n(5, 60));
    let logs = [(1, leader.clone()), (2, follower), (3, leader.clone())];
    let mut c = Cluster::from_logs(&[1, 2, 3], &logs, 5, |_| {});
    c.elect(1);
    let rejections =
        c.take_trace().iter().filter(|line| line.starts_with("2->1 AppendResponse") && line.contains("reject")).count();
    assert!(rejections <= 3, "{rejections} rejections: backtracking is not by term");
    leader.push(6);
    assert_eq!(c.log_terms(2), leader);
}

#[test]
fn figure_8_and_scenario_f_earlier_term_entries_commit_only_through_a_current_term_entry() {
    // S1 holds 2@2, also on S2; S1 becomes leader of a later term.
    let logs = [(1, vec![1, 2]), (2, vec![1, 2]), (3, vec![1]), (4, vec![1]), (5, vec![1, 3])];
    let mut c = Cluster::from_logs(&[1, 2, 3, 4, 5], &logs, 4, |_| {});
    c.dropped_types.insert(MessageType::Append); // the new leader's appends are lost
    c.elect(1);
    c.dropped_types.clear();
    let term = c.raft(1).term;
    // S2 and S3 acknowledge 2@2: it is now on a majority (S1, S2, S3) but of an earlier term.
    let ack = |from: u64, index: u64| {
        let mut m = Message::new(MessageType::AppendResponse, from, 1, term);
        m.index = index;
        m
    };
    c.deliver(vec![ack(2, 2), ack(3, 2)]);
    assert_eq!(c.raft(1).raft_log.committed, 0, "2@2 must not commit by counting replicas (Figure 8)");
    // Once the leader's own no-op (3@term) is on a majority, both commit.
    c.deliver(vec![ack(2, 3), ack(3, 3)]);
    assert_eq!(c.raft(1).raft_log.committed, 3);
}

#[test]
fn scenario_d_commits_with_all_or_a_majority_never_with_a_minority() {
    for (answering, commits) in [(4, true), (2, true), (1, false), (0, false)] {
        let mut c = Cluster::new(&[1, 2, 3, 4, 5], &[], |_| {});
        c.elect(1);
        for silent in (2 + answering)..=5 {
            c.isolate(silent);
        }
        c.propose(1, "x").unwrap();
        c.stabilize();
        let committed = c.raft(1).raft_log.committed == 2;
        assert_eq!(committed, commits, "{answering} of 4 followers answering");
    }
}

#[test]
fn follower_acknowledges_an_append_only_after_persisting_it() {
    for in_ready in [false, true] {
        let mut c = Cluster::new(&[1, 2, 3], &[], |config| config.persisted_messages_in_ready = in_ready);
        c.elect(1);
        c.propose(1, "x").unwrap();
        let appends: Vec<Message> = c.take_messages().into_iter().filter(|m| m.to == 2).collect();
        c.deliver_unpersisted(2, appends);
        let node = c.node_mut(2);
        assert!(node.take_outbox().is_empty(), "no AppendResponse before the entry is durable (in Ready: {in_ready})");
        node.persist_all();
        let responses = node.take_outbox();
        assert_eq!(responses.len(), 1, "in Ready: {in_ready}");
        assert_eq!((responses[0].kind(), responses[0].index), (Some(MessageType::AppendResponse), 2));
    }
}

#[test]
fn with_persisted_messages_in_ready_a_response_comes_with_the_write_it_acknowledges_and_only_there() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |config| config.persisted_messages_in_ready = true);
    c.elect(1);
    c.propose(1, "x").unwrap();
    let append: Vec<Message> = c.take_messages().into_iter().filter(|m| m.to == 2).collect();
    let follower = &mut c.node_mut(2).raw;
    follower.step(append[0].clone()).unwrap();
    let first = follower.ready();
    assert_eq!(first.entries.len(), 1);
    assert!(first.messages.is_empty(), "nothing may go before the entry is durable");
    assert_eq!(first.messages_after_persist.len(), 1);
    assert_eq!(
        (first.messages_after_persist[0].kind(), first.messages_after_persist[0].index),
        (Some(MessageType::AppendResponse), 2)
    );
    // The same append again, while the first write is still under way: nothing new to persist, but its answer
    // claims what that write makes durable, so it too waits for it.
    follower.step(append[0].clone()).unwrap();
    let second = follower.ready();
    assert!(!second.must_sync && second.entries.is_empty() && second.messages.is_empty());
    assert_eq!(second.messages_after_persist.len(), 1, "held for the earlier write");
    follower.on_persisted(second.number);
    assert!(!follower.has_ready() || follower.ready().messages.is_empty(), "handed out once: never released again");
    assert!(!follower.needs_prompt_persisted(), "a follower with nothing waiting to apply");
}

#[test]
fn leader_sends_before_persisting_but_counts_itself_only_after() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.isolate(3);
    let leader = c.node_mut(1);
    leader.raw.propose(Bytes::from_static(b"x")).unwrap();
    leader.process_ready(false);
    let appends = leader.take_outbox();
    assert!(appends.iter().any(|m| m.to == 2 && !m.entries.is_empty()), "sent before its own write is durable");
    c.deliver(appends);
    c.stabilize();
    assert_eq!(c.raft(1).raft_log.committed, 1, "follower 2 alone is no majority: the leader must count itself");
    c.node_mut(1).persist_all();
    assert_eq!(c.raft(1).raft_log.committed, 2, "counted once persisted");
}

#[test]
fn a_candidate_leads_only_once_its_own_vote_and_term_are_durable() {
    // raft-sim seed 219192: a candidate that led on the other voters' votes before its own term was durable could
    // crash back into the previous term, be elected again in the same term by the same voters, and lead one term
    // twice with two different logs.
    for in_ready in [false, true] {
        candidate_leads_only_once_durable(in_ready);
    }
}

fn candidate_leads_only_once_durable(persisted_messages_in_ready: bool) {
    let mut c = Cluster::new(&[1, 2, 3], &[], |config| {
        config.pre_vote = false;
        config.check_quorum = false;
        config.persisted_messages_in_ready = persisted_messages_in_ready;
    });
    c.elect(2);
    c.propose(2, "x").unwrap();
    let appends: Vec<Message> = c.take_messages().into_iter().filter(|m| m.to == 1).collect();
    c.deliver_unpersisted(1, appends);
    let votes = c.campaign_unpersisted(1);
    assert_eq!(votes.iter().filter(|m| !m.reject).count(), 2);
    assert_eq!(c.raft(1).role, StateRole::Candidate, "won on others' votes, but its own vote is not durable yet");
    assert!(c.node(1).raw.needs_prompt_persisted(), "a candidate must learn at once that its vote is durable");
    // Crash now: nothing of term 2 was durable, and 1 never led it.
    c.node_mut(1).crash_and_restart(0).unwrap();
    assert_eq!((c.raft(1).term, c.raft(1).role), (1, StateRole::Follower));
    // Again, and this time the write lands: 1 leads with everything before its vote durable.
    c.campaign_unpersisted(1);
    assert_eq!(c.raft(1).role, StateRole::Candidate);
    c.node_mut(1).persist_all();
    assert_eq!(c.raft(1).role, StateRole::Leader);
    let raft = c.raft(1);
    assert_eq!(raft.tracker.progress[&1].matched, raft.raft_log.persisted, "it counts only what is durable");
}

#[test]
fn replicate_state_pipelines_within_the_inflight_window() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |config| {
        config.inflight_messages_max = 2;
        config.append_message_bytes_max = 1;
    });
    c.elect(1);
    for i in 0..10 {
        c.propose(1, &format!("entry {i}")).unwrap();
    }
    let messages = c.take_messages();
    let to_2 = messages.iter().filter(|m| m.to == 2 && m.kind() == Some(MessageType::Append)).count();
    assert_eq!(to_2, 2, "at most inflight_messages_max appends in flight");
    c.deliver(messages);
    c.stabilize();
    assert_eq!(c.raft(2).raft_log.last_index(), 11, "the window refills as acks arrive");
}

#[test]
fn uncommitted_bytes_bound_turns_into_backpressure() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |config| config.uncommitted_bytes_max = 100);
    c.elect(1);
    c.isolate(2);
    c.isolate(3);
    let big = "x".repeat(60);
    assert!(c.propose(1, &big).is_ok(), "one proposal is always accepted when nothing is uncommitted");
    assert_eq!(c.propose(1, &big), Err(Error::ProposalDropped(DropReason::UncommittedBytesFull)));
    c.heal();
    c.stabilize();
    assert_eq!(c.raft(1).raft_log.committed, 2);
    assert!(c.propose(1, &big).is_ok(), "room again once committed");
    assert_eq!(c.propose(2, "x"), Err(Error::ProposalDropped(DropReason::NotLeader { leader_id: 1 })));
}

#[test]
fn scenario_g_a_follower_behind_compaction_catches_up_by_snapshot() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.isolate(3);
    let applied = propose_and_compact(&mut c, 1, 20);
    assert_eq!(c.raft(1).raft_log.first_index(), applied + 1);
    c.heal();
    c.take_trace();
    c.tick_all(3);
    c.stabilize();
    let snapshots: Vec<String> = c.take_trace().into_iter().filter(|l| l.contains("Snapshot")).collect();
    assert_eq!(snapshots, [format!("1->3 Snapshot t1 snap={applied}@1")]);
    c.node_mut(1).raw.report_snapshot(3, true);
    c.tick_all(3);
    c.stabilize();
    c.propose(1, "after").unwrap();
    c.stabilize();
    assert_eq!(c.applied_index(3), applied + 1);
    assert_eq!(c.node(3).machine.hash, c.node(1).machine.hash, "same state after snapshot and replay");
}

#[test]
fn installing_a_snapshot_discards_a_conflicting_log() {
    let logs = [(1, vec![1, 1, 1]), (2, vec![1, 1, 1]), (3, vec![1, 2, 2, 2, 2])];
    let mut c = Cluster::from_logs(&[1, 2, 3], &logs, 2, |_| {});
    c.isolate(3);
    c.elect(1);
    let applied = propose_and_compact(&mut c, 1, 5);
    c.heal();
    c.tick_all(3);
    c.stabilize();
    let log = &c.raft(3).raft_log;
    assert_eq!((log.first_index(), log.last_index()), (applied + 1, applied), "only the snapshot remains");
    assert_eq!(c.node(3).machine.hash, c.node(1).machine.hash);
}

#[test]
fn persisting_out_of_order_is_impossible_by_contract_and_numbers_release_in_order() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    let node = c.node_mut(2);
    let mut append = Message::new(MessageType::Append, 1, 2, 1);
    append.index = 1;
    append.log_term = 1;
    append.entries = vec![Entry { index: 2, term: 1, data: Bytes::from_static(b"a"), ..Default::default() }];
    node.raw.step(append.clone()).unwrap();
    let first = node.raw.ready();
    append.index = 2;
    append.entries = vec![Entry { index: 3, term: 1, data: Bytes::from_static(b"b"), ..Default::default() }];
    node.raw.step(append).unwrap();
    let second = node.raw.ready();
    assert_eq!(second.number, first.number + 1);
    assert!(first.must_sync && second.must_sync);
    node.raw.raft.raft_log.storage.append(&first.entries).unwrap();
    node.raw.on_persisted(first.number);
    let released = node.raw.ready().messages;
    assert_eq!(released.len(), 1, "only the first response is released");
    assert_eq!(released[0].index, 2);
}

#[test]
fn a_candidate_holding_an_unpersisted_snapshot_leads_once_durable_and_snapshots_lagging_followers() {
    // raft-sim seed 91853: replica 4 installs a snapshot and wins an election on other voters' votes before the
    // install is durable. It leads only once its vote (and, before it, the snapshot) is durable, then snapshots a
    // lagging follower.
    let mut c = Cluster::new(&[1, 2, 3, 4, 5], &[], |config| {
        config.pre_vote = false;
        config.check_quorum = false;
    });
    c.elect(1);
    c.isolate(4);
    c.isolate(5);
    let applied = propose_and_compact(&mut c, 1, 5);
    c.heal();
    c.isolate(5);
    c.tick(1, 2);
    // Deliver to 4 without persisting until the leader sends it the snapshot.
    for _ in 0..10 {
        deliver_holding_back(&mut c, 4);
        if c.raft(4).raft_log.unstable.snapshot.is_some() {
            break;
        }
    }
    assert!(c.raft(4).raft_log.unstable.snapshot.is_some(), "4 holds an unpersisted snapshot");
    c.node_mut(1).raw.report_snapshot(4, true);
    c.heal();
    c.campaign_unpersisted(4);
    assert_eq!(c.raft(4).role, StateRole::Candidate, "three other votes are a majority, but its own is not durable");
    c.node_mut(4).persist_all();
    assert_eq!(c.raft(4).role, StateRole::Leader);
    assert!(c.raft(4).raft_log.unstable.snapshot.is_none(), "the snapshot became durable before the vote did");
    // Lagging 5 needs entries before 4's first index: it gets 4's snapshot.
    for _ in 0..20 {
        let delivered = deliver_holding_back(&mut c, 4);
        if let Some(snapshot) = delivered.iter().find(|m| m.kind() == Some(MessageType::Snapshot) && m.from == 4) {
            assert_eq!(snapshot.snapshot.as_ref().unwrap().index(), applied);
            return;
        }
        c.node_mut(4).raw.tick();
        c.node_mut(4).process_ready(false);
    }
    panic!("4 never sent 5 a snapshot");
}

#[test]
fn without_commit_broadcast_followers_learn_the_commit_index_from_the_next_heartbeat_not_an_empty_append() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |config| config.commit_broadcast = false);
    c.elect(1);
    c.tick(1, 2); // a heartbeat round: everyone learns the no-op's commit
    c.stabilize();
    c.take_trace();
    c.propose(1, "x").unwrap();
    c.stabilize();
    // One append and one answer per follower; the commit it causes sends nothing by itself.
    assert_eq!(
        c.take_trace(),
        [
            "1->2 Append t1 idx=1 logt=1 ents=[2@1] commit=1",
            "1->3 Append t1 idx=1 logt=1 ents=[2@1] commit=1",
            "2->1 AppendResponse t1 idx=2",
            "3->1 AppendResponse t1 idx=2"
        ]
    );
    assert_eq!(c.raft(1).raft_log.committed, 2);
    assert_eq!([c.raft(2).raft_log.committed, c.raft(3).raft_log.committed], [1, 1], "not told yet");
    // The next heartbeat carries it.
    c.tick(1, 2);
    c.stabilize();
    assert_eq!([c.raft(2).raft_log.committed, c.raft(3).raft_log.committed], [2, 2]);
    // A second write's append carries the first one's commit as well.
    c.propose(1, "y").unwrap();
    c.stabilize();
    assert_eq!([c.raft(2).raft_log.committed, c.raft(3).raft_log.committed], [2, 2]);
    c.propose(1, "z").unwrap();
    c.stabilize();
    assert_eq!([c.raft(2).raft_log.committed, c.raft(3).raft_log.committed], [3, 3], "learned from the append of z");
}

#[test]
fn with_heartbeats_skipped_after_appends_a_follower_that_just_got_one_gets_no_heartbeat() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |config| config.heartbeats_skip_after_append = true);
    c.elect(1);
    c.tick(1, 2);
    c.stabilize();
    c.take_trace();
    // An append to both followers, then the heartbeat tick comes: the append did its work.
    c.propose(1, "x").unwrap();
    c.stabilize();
    c.take_trace();
    c.tick(1, 1);
    c.stabilize();
    assert_eq!(c.take_trace(), Vec::<String>::new(), "no heartbeat right after an append");
    // A whole interval without appends: heartbeats go out again (carrying the commit index).
    c.tick(1, 2);
    c.stabilize();
    let trace = c.take_trace();
    assert!(
        trace.contains(&"1->2 Heartbeat t1 commit=2".to_string())
            && trace.contains(&"1->3 Heartbeat t1 commit=2".to_string()),
        "{trace:?}"
    );
    // A read waiting for confirmation is never left without its heartbeat round.
    c.propose(1, "y").unwrap();
    c.stabilize();
    c.take_trace();
    c.with_node(1, |raw| raw.read_index(bytes::Bytes::from_static(b"r1"))).unwrap();
    c.stabilize();
    let trace = c.take_trace();
    assert!(trace.iter().any(|m| m.starts_with("1->2 Heartbeat")), "{trace:?}");
}

/// Three replicas, 1 leading, node 3 holding its applies, five values proposed at 1 (not yet delivered); and
/// node 3's applied index before.
fn three_with_node_3_holding_apply_and_five_proposed() -> (Cluster, u64) {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    let before = c.applied_index(3);
    c.with_node(3, |node| node.hold_apply(true));
    for i in 0..5 {
        c.propose(1, &format!("v{i}")).unwrap();
    }
    (c, before)
}

#[test]
fn a_replica_holding_apply_persists_and_acknowledges_entries_but_applies_none_until_let_go() {
    let (mut c, before) = three_with_node_3_holding_apply_and_five_proposed();
    c.isolate(2); // node 3's acknowledgements alone make the quorum
    c.stabilize();
    let committed = c.raft(1).raft_log.committed;
    assert!(committed >= before + 5, "committed through node 3's acknowledgements");
    assert_eq!(c.raft(3).raft_log.committed, committed, "node 3 learns the commit index");
    assert_eq!(c.applied_index(3), before, "nothing handed out for applying");
    c.with_node(3, |node| node.hold_apply(false));
    c.tick_all(1);
    c.stabilize();
    assert_eq!(c.applied_index(3), committed, "let go: the held entries apply");
}

#[test]
fn a_follower_that_asks_for_a_snapshot_keeps_acknowledging_and_installs_the_state_over_its_kept_log() {
    // A replica whose log is whole but whose state is lost (applies held) asks its leader for a snapshot. It goes
    // on acknowledging entries (its group may need it for a quorum), and the snapshot's state is installed with
    // its log kept: entries after the snapshot that it acknowledged must not be lost.
    let (mut c, before) = three_with_node_3_holding_apply_and_five_proposed();
    c.stabilize();
    let snapshot_index = c.applied_index(1);
    c.node_mut(1).snapshot_and_compact(snapshot_index - 2);
    assert_eq!(c.applied_index(3), before, "nothing applied on node 3 since");
    assert!(!c.with_node(1, |node| node.request_snapshot()), "a leader does not ask");
    assert!(c.with_node(3, |node| node.request_snapshot()), "a follower with a leader asks");
    assert!(c.with_node(3, |node| node.snapshot_requested()));
    // Node 2 cut off: node 3's acknowledgements alone make the quorum, while it asks.
    c.isolate(2);
    c.take_trace();
    c.propose(1, "more").unwrap();
    c.stabilize();
    let trace = c.take_trace();
    assert!(trace.iter().any(|l| l.starts_with("1->3 Snapshot")), "{trace:?}");
    let last = c.raft(1).raft_log.last_index();
    assert_eq!(c.raft(1).raft_log.committed, last, "committed through node 3");
    assert!(!c.with_node(3, |node| node.snapshot_requested()), "installed");
    let log = &c.raft(3).raft_log;
    assert_eq!((log.first_index(), log.last_index()), (1, last), "the log kept whole");
    assert_eq!(c.applied_index(3), snapshot_index, "the snapshot's state, and nothing after it (held)");
    c.node_mut(1).raw.report_snapshot(3, true);
    c.heal();
    c.with_node(3, |node| node.hold_apply(false));
    c.propose(1, "after").unwrap();
    c.tick_all(3);
    c.stabilize();
    assert_eq!(c.applied_index(3), c.applied_index(1), "the kept entries after the snapshot applied");
    assert_eq!(c.node(3).machine.hash, c.node(1).machine.hash, "same state");
}

/// A commit learned from outside the group (`RawNode::learn_committed`: a merge's decision, which the commit in
/// the left group's log vouches for) counts only for an entry this log holds with that term — then everything up
/// to it is the group's committed log — and the entries it commits apply as any others.
#[test]
fn a_commit_learned_from_outside_the_group_counts_only_for_an_entry_the_log_holds_with_its_term() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.propose(1, "decision").unwrap();
    let appends = c.take_messages();
    c.deliver(appends);
    c.cut(1, 3); // node 3 holds the entry, and hears nothing of its commit
    c.stabilize();
    let (last, term) = (c.raft(1).raft_log.last_index(), c.raft(1).term);
    assert_eq!(c.raft(1).raft_log.committed, last);
    assert_eq!(c.raft(3).raft_log.last_index(), last, "node 3's log holds it");
    let before = c.raft(3).raft_log.committed;
    assert!(before < last, "node 3 has not heard of the commit");
    assert!(!c.with_node(3, |node| node.learn_committed(last, term + 1)), "not the entry node 3 holds");
    assert!(!c.with_node(3, |node| node.learn_committed(last + 1, term)), "not in node 3's log");
    assert_eq!(c.raft(3).raft_log.committed, before);
    assert!(c.with_node(3, |node| node.learn_committed(last, term)));
    assert_eq!(c.raft(3).raft_log.committed, last);
    c.stabilize();
    assert_eq!(c.applied_index(3), last, "applied");
    assert_eq!(c.node(3).machine.hash, c.node(1).machine.hash, "the same state as the leader's");
}
