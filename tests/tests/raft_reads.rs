//! Linearizable reads: ReadIndex (confirmed by a heartbeat quorum, only after the leader's first commit in its
//! term), follower reads through the leader, and leader leases with their exact expiry.

use bytes::Bytes;
use flotilla_raft::prelude::*;
use flotilla_raft::{DropReason, Error, ReadState};
use flotilla_tests::cluster::Cluster;

fn read(c: &mut Cluster, id: u64, context: &'static str) {
    c.with_node(id, |raw| raw.read_index(Bytes::from_static(context.as_bytes()))).unwrap();
}

fn take_reads(c: &mut Cluster, id: u64) -> Vec<ReadState> {
    std::mem::take(&mut c.node_mut(id).read_states)
}

#[test]
fn read_index_is_confirmed_by_one_heartbeat_round() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.take_trace();
    read(&mut c, 1, "r1");
    assert!(take_reads(&mut c, 1).is_empty(), "not before a quorum confirms leadership");
    c.stabilize();
    assert_eq!(
        c.take_trace(),
        [
            "1->2 Heartbeat t1 commit=1 ctx=r1",
            "1->3 Heartbeat t1 commit=1 ctx=r1",
            "2->1 HeartbeatResponse t1 ctx=r1",
            "3->1 HeartbeatResponse t1 ctx=r1",
        ]
    );
    assert_eq!(take_reads(&mut c, 1), [ReadState { index: 1, context: Bytes::from_static(b"r1") }]);
}

#[test]
fn a_leader_that_lost_its_quorum_confirms_no_read() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.isolate(1);
    read(&mut c, 1, "stale?");
    c.stabilize();
    assert!(take_reads(&mut c, 1).is_empty());
}

#[test]
fn reads_wait_for_the_new_leaders_first_commit_in_its_term() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.dropped_types.insert(MessageType::Append);
    c.elect(1);
    read(&mut c, 1, "early");
    c.stabilize();
    assert!(take_reads(&mut c, 1).is_empty(), "the no-op is not committed: the commit index is not known yet");
    c.dropped_types.clear();
    c.tick_all(2);
    c.stabilize();
    assert_eq!(take_reads(&mut c, 1), [ReadState { index: 1, context: Bytes::from_static(b"early") }]);
}

#[test]
fn a_follower_reads_through_the_leaders_read_index() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    c.propose(1, "x").unwrap();
    c.stabilize();
    c.take_trace();
    read(&mut c, 3, "f");
    c.stabilize();
    let trace = c.take_trace();
    assert_eq!(trace.first().map(String::as_str), Some("3->1 ReadIndex t1 ctx=f"));
    assert_eq!(trace.last().map(String::as_str), Some("1->3 ReadIndexResponse t1 idx=2 ctx=f"));
    assert_eq!(take_reads(&mut c, 3), [ReadState { index: 2, context: Bytes::from_static(b"f") }]);
    assert_eq!(
        c.with_node(2, |raw| {
            raw.raft.become_follower(5, 0);
            raw.read_index(Bytes::from_static(b"nobody"))
        }),
        Err(Error::ProposalDropped(DropReason::NotLeader { leader_id: 0 }))
    );
}

fn lease_config(config: &mut Config) {
    config.read_mode = ReadMode::LeaseBased;
}

/// Three replicas in lease mode, past the quiet period of their start, led by replica 1 with a valid lease.
fn lease_cluster_led_by_1() -> Cluster {
    let mut c = Cluster::new(&[1, 2, 3], &[], lease_config);
    c.tick(2, 10);
    c.tick(3, 10);
    c.elect(1);
    assert!(c.raft(1).lease_valid());
    c
}

#[test]
fn lease_read_needs_no_round_trip_and_expires_exactly_at_election_timeout_minus_margin() {
    let mut c = Cluster::new(&[1, 2, 3], &[], lease_config);
    // Lease mode starts every replica quiet for an election timeout (it may have promised a lease before a
    // restart): ticking past it lets the election proceed.
    c.tick(2, 10);
    c.tick(3, 10);
    c.elect(1);
    c.take_trace();
    read(&mut c, 1, "now");
    assert_eq!(take_reads(&mut c, 1).len(), 1, "answered at once");
    assert!(c.take_messages().is_empty(), "without any message");
    // The last acknowledged message was sent at tick s; the lease lasts 10 - 2 = 8 ticks from s.
    c.isolate(1);
    let sent_at = c.raft(1).tick_count();
    c.tick(1, 7);
    assert!(c.raft(1).lease_valid(), "7 ticks after the acknowledged send: still inside the lease");
    c.tick(1, 1);
    assert!(!c.raft(1).lease_valid(), "8 ticks after: expired");
    assert_eq!(c.raft(1).tick_count(), sent_at + 8);
    read(&mut c, 1, "late");
    c.stabilize();
    assert!(take_reads(&mut c, 1).is_empty(), "falls back to ReadIndex, which the cut-off leader cannot confirm");
}

#[test]
fn a_leader_resuming_after_a_pause_holds_no_lease_from_before_it() {
    let mut c = lease_cluster_led_by_1();
    // Hibernation: no ticks for a while of unknown length. The followers may have timed out meanwhile.
    c.with_node(1, |raw| raw.resume_after_pause());
    assert!(!c.raft(1).lease_valid(), "time went uncounted: the old lease may have expired");
    c.isolate(1);
    read(&mut c, 1, "after");
    c.stabilize();
    assert!(take_reads(&mut c, 1).is_empty(), "a ReadIndex round it cannot complete alone, not a lease read");
    c.heal();
    c.tick(1, 2);
    c.stabilize();
    assert_eq!(take_reads(&mut c, 1).len(), 1, "confirmed by a fresh heartbeat round");
    assert!(c.raft(1).lease_valid(), "which gives it a new lease");
}

#[test]
fn sending_timeout_now_revokes_the_lease_for_the_rest_of_the_term() {
    let mut c = lease_cluster_led_by_1();
    c.dropped_types.insert(MessageType::TimeoutNow);
    c.with_node(1, |raw| raw.transfer_leader(2));
    c.stabilize();
    assert!(!c.raft(1).lease_valid(), "the target may win a forced election inside the lease");
    c.tick_all(11);
    c.stabilize();
    assert_eq!(c.raft(1).lead_transferee, 0, "transfer aborted");
    assert!(!c.raft(1).lease_valid(), "still revoked in this term");
}

#[test]
fn a_restarted_replica_in_lease_mode_ignores_votes_for_an_election_timeout() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |config| {
        config.read_mode = ReadMode::LeaseBased;
        config.pre_vote = false;
    });
    let mut vote = Message::new(MessageType::RequestVote, 1, 2, 1);
    vote.context = Bytes::new();
    c.deliver(vec![vote.clone()]);
    assert_eq!(c.raft(2).term, 0, "ignored right after start");
    c.tick(2, 10);
    c.take_messages();
    // Node 2 may have campaigned itself meanwhile (term 1); a vote of a later term is granted now.
    vote.term = 5;
    c.deliver(vec![vote]);
    assert_eq!((c.raft(2).term, c.raft(2).vote), (5, 1), "granted once the quiet period is over");
}

#[test]
fn a_fresh_replica_that_made_no_promise_may_skip_the_quiet_period() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |config| {
        config.read_mode = ReadMode::LeaseBased;
        config.pre_vote = false;
        config.quiet_on_start = false;
    });
    let mut vote = Message::new(MessageType::RequestVote, 1, 2, 1);
    vote.context = Bytes::new();
    c.deliver(vec![vote]);
    assert_eq!((c.raft(2).term, c.raft(2).vote), (1, 1), "granted at once");
}

#[test]
fn a_heartbeat_is_acknowledged_only_in_a_durable_term() {
    // An acknowledgement feeds the leader's lease. A replica that acknowledged in a term not yet durable could
    // restart without remembering the term, and (were it allowed to skip the quiet period) vote inside the lease.
    let mut c = lease_cluster_led_by_1();
    let (term, commit) = (c.raft(1).term, c.raft(2).raft_log.committed);
    let heartbeat = |term: u64| {
        let mut heartbeat = Message::new(MessageType::Heartbeat, 1, 2, term);
        heartbeat.commit = commit;
        heartbeat
    };
    c.deliver_unpersisted(2, vec![heartbeat(term)]);
    let answers = c.node_mut(2).take_outbox();
    assert_eq!(
        answers.iter().map(|m| m.kind()).collect::<Vec<_>>(),
        vec![Some(MessageType::HeartbeatResponse)],
        "its term is durable: at once"
    );
    c.deliver_unpersisted(2, vec![heartbeat(term + 1)]);
    assert!(c.node_mut(2).take_outbox().is_empty(), "not before term {} is durable", term + 1);
    c.node_mut(2).persist_all();
    let answers = c.node_mut(2).take_outbox();
    assert_eq!(
        answers.iter().map(|m| (m.kind(), m.term)).collect::<Vec<_>>(),
        vec![(Some(MessageType::HeartbeatResponse), term + 1)]
    );
}

#[test]
fn lease_reads_require_check_quorum() {
    let config = Config { read_mode: ReadMode::LeaseBased, check_quorum: false, ..Config::new(1) };
    assert!(config.validate().is_err());
}
