//! Stores of one process over the in-process transport, with the production poll handler, group-commit WAL and
//! redb state machines on disk: a replica cut off while the others compacted their logs catches up by a
//! snapshot stream that crosses mailboxes and poller threads; idle groups hibernate (the ticker visits none), a
//! request wakes them, and followers elect a new leader once node liveness says the leader's node is down; replicas
//! join and leave by membership change (one cut off while it was removed learns it from a member's removal
//! notice); a split opens the new group on every node — also where a replica lagged, heard from the new group
//! first, was cut off past the split, or was a removed learner still holding the old range; a failed log stops
//! the node with the reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_engine::disk::{SimDisk, StdDisk};
use flotilla_engine::flusher::BackgroundFlusher;
use flotilla_engine::log_engine::LogEngine;
use flotilla_engine::redb_sim::SimRedbBackend;
use flotilla_engine::state_machine::{StateMachine, StateMachineOptions};
use flotilla_engine::wal::group_commit::{GroupCommitOptions, GroupCommitWal, WriteRequest};
use flotilla_engine::wal::record::LogOp;
use flotilla_engine::wal::{Wal, WalOptions};
use flotilla_raftstore::command::{Command, MergeCommand, MergeStep, Op, Outcome};
use flotilla_raftstore::message::{Envelope, ReplicaMessage};
use flotilla_raftstore::peer::{MembershipChange, PeerError, PeerOptions, SnapshotOptions, BOOTSTRAP_INDEX};
use flotilla_raftstore::range::{initial_ranges, RangeDescriptor, RangeEpoch, RangeError, Replica, SplitRequest};
use flotilla_raftstore::store::fsm::WriteReply;
use flotilla_raftstore::store::local_reader::{LocalReader, ReadLease};
use flotilla_raftstore::store::{
    InProcessTransport, NoTransport, PeerMsg, ReadRequest, ReadResult, Store, StoreOptions, Transport,
};

struct Node {
    id: u64,
    store: Store,
    log: Arc<GroupCommitWal>,
    kv: Arc<StateMachine>,
}

fn start_node(id: u64, dir: &std::path::Path, ranges: &[RangeDescriptor], transport: &Arc<InProcessTransport>) -> Node {
    start_node_sending(id, dir, ranges, Arc::clone(transport) as Arc<dyn Transport>, transport)
}

/// [`start_node`] with the node's outgoing messages going through `sending` (its incoming still come from
/// `transport`).
fn start_node_sending(
    id: u64,
    dir: &std::path::Path,
    ranges: &[RangeDescriptor],
    sending: Arc<dyn Transport>,
    transport: &Arc<InProcessTransport>,
) -> Node {
    start_node_with(id, dir, ranges, sending, transport, |_| {})
}

/// [`start_node_sending`] with the test's store options adjusted by `adjust`.
fn start_node_with(
    id: u64,
    dir: &std::path::Path,
    ranges: &[RangeDescriptor],
    sending: Arc<dyn Transport>,
    transport: &Arc<InProcessTransport>,
    adjust: impl FnOnce(&mut StoreOptions),
) -> Node {
    let (wal, _) = Wal::open(&dir.join(format!("wal-{id}")), Arc::new(StdDisk), WalOptions::default()).unwrap();
    let log = Arc::new(GroupCommitWal::start(wal, GroupCommitOptions::default()));
    let kv =
        Arc::new(StateMachine::open(&dir.join(format!("state-{id}.redb")), StateMachineOptions::default()).unwrap());
    let flusher = Arc::new(BackgroundFlusher::start(Arc::clone(&kv)));
    let mut options = StoreOptions {
        node_id: id,
        tick_interval: Duration::from_millis(10),
        // Small chunks: the stream runs through many mailbox deliveries and poll rounds.
        peer: PeerOptions {
            snapshot: SnapshotOptions { chunk_bytes_max: 512, ..SnapshotOptions::default() },
            ..PeerOptions::default()
        },
        ..StoreOptions::default()
    };
    adjust(&mut options);
    let store =
        Store::start(options, ranges, Arc::clone(&log) as Arc<dyn LogEngine>, Arc::clone(&kv) as _, flusher, sending)
            .unwrap();
    transport.add_node(id, store.inbox());
    Node { id, store, log, kv }
}

/// Sends the request `make` builds to each node in turn until one answers `Done` (following refusals until
/// `deadline`); returns the node that did. A refused membership change fails the test.
fn until_done(
    nodes: &[Node],
    group_id: u64,
    deadline: Instant,
    what: &str,
    make: impl Fn(WriteReply) -> PeerMsg,
) -> u64 {
    loop {
        for node in nodes {
            let (reply, answer) = oneshot::channel();
            if node.store.router().send(group_id, make(reply)).is_err() {
                continue; // the node holds no replica of the group
            }
            match answer.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(Outcome::Done)) => return node.id,
                Ok(Err(PeerError::Membership(why))) => panic!("{what} refused: {why}"),
                _ => {}
            }
        }
        assert!(Instant::now() < deadline, "no node took {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes through whichever node leads; returns the node that took it.
fn put(nodes: &[Node], group_id: u64, key: &[u8], value: &[u8], deadline: Instant) -> u64 {
    until_done(nodes, group_id, deadline, &format!("the write of {key:?}"), |reply| {
        let command = Command::write(None, vec![Op::put(key.to_vec(), value.to_vec())]);
        PeerMsg::Write { command, reply }
    })
}

/// Checkpoints the node's state machine and drops its log up to what that made durable.
fn compact(node: &Node, group_id: u64) -> u64 {
    node.kv.flush().unwrap();
    let durable = node.kv.durable_applied(group_id).0;
    let base_term = node.log.term(group_id, durable).unwrap();
    let (reply, done) = crossbeam_channel::bounded(1);
    let ops = vec![LogOp::Compact { first_kept_index: durable + 1, base_term }];
    node.log.submit(WriteRequest::new(group_id, 0, ops, reply)).unwrap();
    done.recv().unwrap();
    durable
}

/// Three nodes holding one group, its leader elected and a first write (`first` = `1`) done.
struct OneGroup {
    _dir: tempfile::TempDir,
    transport: Arc<InProcessTransport>,
    nodes: Vec<Node>,
    group_id: u64,
    /// The test's deadline for everything it waits on.
    deadline: Instant,
}

fn one_group_on_three_nodes() -> OneGroup {
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
    let range = initial_ranges(1, 1, &replicas).remove(0);
    let group_id = range.group_id;
    let transport = Arc::new(InProcessTransport::new());
    let nodes: Vec<Node> =
        (1..=3).map(|id| start_node(id, dir.path(), std::slice::from_ref(&range), &transport)).collect();
    nodes[0].store.campaign_all([group_id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    put(&nodes, group_id, b"first", b"1", deadline);
    OneGroup { _dir: dir, transport, nodes, group_id, deadline }
}

#[test]
fn a_replica_cut_off_while_the_others_compacted_catches_up_by_snapshot() {
    let OneGroup { _dir, transport, nodes, group_id, deadline } = one_group_on_three_nodes();
    // Node 3 is cut off; 300 writes later the others have compacted their logs past everything it has.
    transport.remove_node(3);
    let value = vec![b'v'; 100];
    for i in 0..300u32 {
        put(&nodes[..2], group_id, format!("key-{i:04}").as_bytes(), &value, deadline);
    }
    let compacted = nodes[..2].iter().map(|node| compact(node, group_id)).min().unwrap();
    assert!(compacted > 300, "both logs compacted past the cut-off writes (to {compacted})");
    transport.add_node(3, nodes[2].store.inbox());
    let node = &nodes[2];
    // Caught up by a snapshot, not replayed entries: the data is there, and its log restarts after the snapshot
    // (a moment later: the install is durable in the state machine before its log record is written).
    wait_until(deadline, "node 3 caught up by snapshot", || {
        node.kv.get(b"key-0299").unwrap().is_some() && node.log.first_index(group_id) > 300
    });
    let pairs = node.kv.scan(b"key-", b"key.", usize::MAX).unwrap();
    assert_eq!(pairs.len(), 300);
    assert!(pairs.iter().all(|pair| pair.1 == value));
    // And it replicates from there.
    put(&nodes, group_id, b"last", b"2", deadline);
    while node.kv.get(b"last").unwrap().is_none() {
        assert!(Instant::now() < deadline, "node 3 did not replicate after the snapshot");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Node 1's outgoing messages, watched: a `TimeoutNow` must never leave while node 1 still grants local reads
/// (its target may win an election at once, inside the lease).
struct GrantWatch {
    inner: Arc<InProcessTransport>,
    grant: std::sync::OnceLock<(Arc<LocalReader>, Arc<ReadLease>)>,
    timeout_nows: std::sync::atomic::AtomicU64,
    violations: std::sync::atomic::AtomicU64,
}

impl Transport for GrantWatch {
    fn send(&self, envelope: Envelope) {
        if matches!(&envelope.message, ReplicaMessage::Raft(m) if m.msg_type() == flotilla_raft::MessageType::TimeoutNow)
        {
            self.timeout_nows.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.grant.get().is_some_and(|(reader, lease)| reader.holds(lease, 1)) {
                self.violations.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        self.inner.send(envelope);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[test]
fn a_leader_withdraws_its_local_read_grant_before_its_timeout_now_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
    let range = initial_ranges(1, 1, &replicas).remove(0);
    let group_id = range.group_id;
    let transport = Arc::new(InProcessTransport::new());
    let watch = Arc::new(GrantWatch {
        inner: Arc::clone(&transport),
        grant: std::sync::OnceLock::new(),
        timeout_nows: Default::default(),
        violations: Default::default(),
    });
    let ranges = std::slice::from_ref(&range);
    let mut nodes = vec![start_node_sending(1, dir.path(), ranges, Arc::clone(&watch) as _, &transport)];
    nodes.extend((2..=3).map(|id| start_node(id, dir.path(), ranges, &transport)));
    let reader = Arc::clone(nodes[0].store.local_reader());
    let lease = reader.lease(group_id);
    let _ = watch.grant.set((Arc::clone(&reader), Arc::clone(&lease)));
    nodes[0].store.campaign_all([group_id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    for round in 0..5 {
        put(&nodes, group_id, b"k", format!("{round}").as_bytes(), deadline);
        wait_until(deadline, "node 1 leads and grants local reads", || reader.holds(&lease, 1));
        nodes[0].store.router().send(group_id, PeerMsg::TransferLeader { replica_id: 2 }).ok().unwrap();
        wait_until(deadline, "node 1 no longer grants", || !reader.holds(&lease, 1));
        // Back to node 1 for the next round.
        wait_until(deadline, "node 2 leads", || put_on(&nodes[1], group_id, b"k", b"2"));
        nodes[1].store.router().send(group_id, PeerMsg::TransferLeader { replica_id: 1 }).ok().unwrap();
        wait_until(deadline, "node 1 leads again", || put_on(&nodes[0], group_id, b"k", b"1"));
    }
    assert!(watch.timeout_nows.load(std::sync::atomic::Ordering::SeqCst) >= 5, "the transfers ran");
    assert_eq!(watch.violations.load(std::sync::atomic::Ordering::SeqCst), 0, "a TimeoutNow left under a grant");
}

/// One write on `node` only; whether it was done.
fn put_on(node: &Node, group_id: u64, key: &[u8], value: &[u8]) -> bool {
    let (reply, answer) = oneshot::channel();
    let command = Command::write(None, vec![Op::put(key.to_vec(), value.to_vec())]);
    node.store.router().send(group_id, PeerMsg::Write { command, reply }).is_ok()
        && matches!(answer.recv_timeout(Duration::from_secs(5)), Ok(Ok(Outcome::Done)))
}

/// Waits until `done` holds, failing after `deadline`.
fn wait_until(deadline: Instant, what: &str, mut done: impl FnMut() -> bool) {
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn idle_groups_hibernate_wake_on_requests_and_elect_anew_once_the_leaders_node_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
    let ranges = initial_ranges(8, 1, &replicas);
    let transport = Arc::new(InProcessTransport::new());
    let mut nodes: Vec<Node> = (1..=3).map(|id| start_node(id, dir.path(), &ranges, &transport)).collect();
    nodes[0].store.campaign_all(ranges.iter().map(|r| r.group_id));
    let deadline = Instant::now() + Duration::from_secs(60);
    let leaders: Vec<u64> =
        ranges.iter().map(|range| put(&nodes, range.group_id, &range.start, b"1", deadline)).collect();
    // 20 idle ticks of 10 ms later every replica sleeps: the ticker visits no group on any node.
    wait_until(deadline, "every group hibernates", || nodes.iter().all(|n| n.store.ticking_groups() == 0));
    // A write wakes its group (and only it), and is served.
    put(&nodes, ranges[3].group_id, &ranges[3].start, b"2", deadline);
    assert!(nodes.iter().any(|n| n.store.ticking_groups() > 0));
    wait_until(deadline, "the group sleeps again", || nodes.iter().all(|n| n.store.ticking_groups() == 0));
    // The node leading group 0 stops. Its followers hear nothing, which is what sleep looks like: for as long as
    // that node is believed alive, nobody campaigns (50 election timeouts here).
    let victim = leaders[0];
    transport.remove_node(victim);
    nodes.retain(|node| node.id != victim);
    std::thread::sleep(Duration::from_millis(500));
    let (reply, answer) = oneshot::channel();
    let command = Command::write(None, vec![Op::put(ranges[0].start.clone(), b"3".to_vec())]);
    nodes[0].store.router().send(ranges[0].group_id, PeerMsg::Write { command, reply }).ok().expect("room");
    assert_eq!(answer.recv().unwrap(), Err(PeerError::NotLeader { leader: victim }), "still following node {victim}");
    // Node liveness declares it down: the followers wake and elect new leaders among themselves.
    for node in &nodes {
        node.store.node_down(victim);
    }
    for range in &ranges {
        put(&nodes, range.group_id, &range.start, b"4", deadline);
    }
}

/// Proposes a membership change wherever the group leads.
fn change(nodes: &[Node], group_id: u64, change: MembershipChange, deadline: Instant) {
    until_done(nodes, group_id, deadline, &format!("{change:?}"), |reply| PeerMsg::ChangeMembership {
        change: change.clone(),
        reply,
    });
}

#[test]
fn a_new_node_gets_a_replica_by_membership_change_and_a_removed_one_is_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
    let range = initial_ranges(1, 1, &replicas).remove(0);
    let group_id = range.group_id;
    let transport = Arc::new(InProcessTransport::new());
    // Node 4 starts holding nothing.
    let nodes: Vec<Node> =
        (1..=4).map(|id| start_node(id, dir.path(), std::slice::from_ref(&range), &transport)).collect();
    assert!(nodes[3].store.router().is_empty());
    nodes[0].store.campaign_all([group_id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..50u32 {
        put(&nodes, group_id, format!("key-{i:03}").as_bytes(), b"v", deadline);
    }
    // Replica 7 on node 4: created there by the leader's first message, caught up by snapshot, then a voter.
    change(&nodes, group_id, MembershipChange::AddLearner { node_id: 4, replica_id: 7, addr: String::new() }, deadline);
    wait_until(deadline, "node 4 caught up", || nodes[3].kv.get(b"key-049").unwrap().is_some());
    assert_eq!(nodes[3].store.router().len(), 1, "node 4 holds the group now");
    change(&nodes, group_id, MembershipChange::Promote { replica_id: 7 }, deadline);
    // Replica 3 leaves: node 3 destroys it (unregisters it) once it applies its removal.
    change(&nodes, group_id, MembershipChange::Remove { replica_id: 3 }, deadline);
    wait_until(deadline, "node 3 destroyed its replica", || nodes[2].store.router().is_empty());
    // Destroyed: its data and its log entries are gone; its last descriptor (without it) stays as the record.
    wait_until(deadline, "node 3 dropped the data and the log", || {
        nodes[2].kv.scan(b"key-", b"key.", 1).unwrap().is_empty()
            && nodes[2].log.first_index(group_id) > nodes[2].log.last_index(group_id)
    });
    let kept = RangeDescriptor::decode_stored(&nodes[2].kv.ranges().unwrap()[0].1).unwrap();
    assert!(!kept.replicas.iter().any(|r| r.node_id == 3));
    put(&nodes, group_id, b"after", b"1", deadline);
    wait_until(deadline, "node 4 replicates", || nodes[3].kv.get(b"after").unwrap().is_some());
    let stored = RangeDescriptor::decode_stored(&nodes[3].kv.ranges().unwrap()[0].1).unwrap();
    let members: Vec<(u64, u64)> = stored.replicas.iter().map(|r| (r.node_id, r.replica_id)).collect();
    assert!(members.contains(&(4, 7)) && !members.contains(&(3, 3)), "node 4 stored the members: {members:?}");
}

#[test]
fn a_replica_cut_off_while_it_was_removed_is_told_by_a_member_once_reachable_and_destroyed() {
    let OneGroup { _dir, transport, nodes, group_id, deadline } = one_group_on_three_nodes();
    wait_until(deadline, "node 3 has the first write", || nodes[2].kv.get(b"first").unwrap().is_some());
    // Node 3 is unreachable while replica 3 is removed: it never hears of it.
    transport.remove_node(3);
    change(&nodes[..2], group_id, MembershipChange::Remove { replica_id: 3 }, deadline);
    put(&nodes[..2], group_id, b"second", b"2", deadline);
    assert_eq!(nodes[2].store.router().len(), 1, "node 3 still runs its replica");
    // Reachable again: its replica, hearing from no leader, campaigns; a member answers with a removal notice,
    // and node 3 destroys the replica.
    transport.add_node(3, nodes[2].store.inbox());
    wait_until(deadline, "node 3 destroyed its replica", || nodes[2].store.router().is_empty());
    wait_until(deadline, "node 3 dropped the data", || nodes[2].kv.scan(b"", b"", 1).unwrap().is_empty());
    let kept = RangeDescriptor::decode_stored(&nodes[2].kv.ranges().unwrap()[0].1).unwrap();
    assert!(!kept.replicas.iter().any(|r| r.node_id == 3), "the members' descriptor kept as the record");
    put(&nodes[..2], group_id, b"third", b"3", deadline);
}

/// A message for a replica its node destroyed after applying its own removal is answered with the last entry that
/// replica applied, as committed (a `DecisionNotice`): a leader that lost its commit index in a crash, whose
/// configuration (not yet applied again) still counts the removed replica, may have no other way to commit
/// (`store-sim` seed 9518; `Replicas::answer_ended`).
#[test]
fn a_node_whose_replica_was_removed_answers_its_group_with_the_last_entry_that_replica_applied() {
    let dir = tempfile::tempdir().unwrap();
    let notices = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let noted = Arc::clone(&notices);
    let filter = DropWhere::new(move |envelope, _| {
        if let ReplicaMessage::Decided(notice) = &envelope.message {
            noted.lock().push((envelope.from_node, envelope.to_node, notice.decided_index, notice.decided_term));
        }
        false
    });
    let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
    let ranges = initial_ranges(1, 1, &replicas);
    let nodes: Vec<Node> = (1..=3)
        .map(|id| start_node_with(id, dir.path(), &ranges, Arc::clone(&filter) as _, &filter.inner, |_| {}))
        .collect();
    nodes[0].store.campaign_all([1]);
    let deadline = Instant::now() + Duration::from_secs(60);
    put(&nodes, 1, b"a", b"1", deadline);
    change(&nodes, 1, MembershipChange::Remove { replica_id: 3 }, deadline);
    wait_until(deadline, "node 3 destroyed its replica", || nodes[2].store.router().is_empty());
    let (index, term) = nodes[2].kv.applied(1);
    assert!(index > BOOTSTRAP_INDEX && term > 0, "the record keeps what the replica applied: {index}@{term}");
    // A heartbeat to replica 3, as a leader that still counts it sends one: node 3 answers with that entry. (The
    // leader's own last messages to it may have been answered so already.)
    notices.lock().clear();
    let mut probe = flotilla_raftstore::raft::Message { from: 1, to: 3, term, ..Default::default() };
    probe.set_msg_type(flotilla_raftstore::raft::MessageType::Heartbeat);
    filter.inner.send(Envelope { group_id: 1, from_node: 1, to_node: 3, message: ReplicaMessage::Raft(probe) });
    filter.inner.flush();
    wait_until(deadline, "node 3 answers", || !notices.lock().is_empty());
    assert_eq!(notices.lock()[0], (3, 1, index, term), "the last entry replica 3 applied, to the sender");
    assert_eq!(nodes[2].kv.applied(1), (index, term), "what node 3 keeps of the group does not move");
    put(&nodes[..2], 1, b"b", b"2", deadline);
}

/// A single-node store whose WAL and state machine live on simulated disks that a test can switch off.
fn store_on_sim_disks() -> (Store, u64, SimDisk, SimRedbBackend) {
    let disk = SimDisk::new();
    let (wal, _) = Wal::open(std::path::Path::new("/wal"), Arc::new(disk.clone()), WalOptions::default()).unwrap();
    let log = Arc::new(GroupCommitWal::start(wal, GroupCommitOptions::default()));
    let redb = SimRedbBackend::new();
    let kv = Arc::new(
        StateMachine::open_with_backend(
            redb.clone(),
            StateMachineOptions { memtable_bytes_max: 4 << 10, ..StateMachineOptions::default() },
        )
        .unwrap(),
    );
    let flusher = Arc::new(BackgroundFlusher::start(Arc::clone(&kv)));
    let range = initial_ranges(1, 1, &[Replica::voter(1, 1)]).remove(0);
    let options = StoreOptions { node_id: 1, tick_interval: Duration::from_millis(10), ..StoreOptions::default() };
    let store = Store::start(
        options,
        std::slice::from_ref(&range),
        log as Arc<dyn LogEngine>,
        kv,
        flusher,
        Arc::new(NoTransport),
    )
    .unwrap();
    store.campaign_all([range.group_id]);
    (store, range.group_id, disk, redb)
}

/// Writes until one is refused as stopped (writes under way when the failure happened have no answer: their
/// fate is unknown); returns the reason.
fn refusal_after_failure(store: &Store, group_id: u64) -> String {
    let write = |key: Vec<u8>| {
        let (reply, answer) = oneshot::channel();
        let command = Command::write(None, vec![Op::put(key, vec![b'v'; 1000])]);
        store.router().send(group_id, PeerMsg::Write { command, reply }).ok().expect("room");
        answer.recv_timeout(Duration::from_secs(2))
    };
    (0..50)
        .find_map(|attempt| match write(format!("k{attempt}").into_bytes()) {
            Ok(Err(PeerError::Stopped(reason))) => Some(reason),
            _ => None,
        })
        .expect("requests refused once the node stopped")
}

#[test]
fn a_failed_log_stops_the_node_and_requests_are_refused_with_the_reason() {
    let (store, group_id, disk, _) = store_on_sim_disks();
    let first = refusal_after_first_write(&store, group_id, || disk.power_off());
    assert!(first.contains("the log failed"), "{first}");
    assert_eq!(store.failure(), Some(first));
}

#[test]
fn a_write_waiting_when_the_log_fails_is_answered_at_once_not_left_to_time_out() {
    let (store, group_id, disk, _) = store_on_sim_disks();
    first_write(&store, group_id);
    disk.power_off();
    // The very write whose log write fails: the writer thread stops the node, which wakes the replica, which
    // refuses the client waiting on it.
    let (reply, answer) = oneshot::channel();
    let command = Command::write(None, vec![Op::put(b"b".to_vec(), b"v".to_vec())]);
    store.router().send(group_id, PeerMsg::Write { command, reply }).ok().expect("room");
    match answer.recv_timeout(Duration::from_secs(5)) {
        Ok(Err(PeerError::Stopped(reason))) => assert!(reason.contains("the log failed"), "{reason}"),
        other => panic!("the waiting write: {other:?}"),
    }
}

#[test]
fn a_failed_state_machine_stops_the_node_too() {
    let (store, group_id, _, redb) = store_on_sim_disks();
    let reason = refusal_after_first_write(&store, group_id, || redb.fail());
    assert!(reason.contains("state machine"), "{reason}");
}

/// Waits until a first write succeeds (the group has elected its leader).
fn first_write(store: &Store, group_id: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_until(deadline, "a first write", || {
        let (reply, answer) = oneshot::channel();
        let command = Command::write(None, vec![Op::put(b"a".to_vec(), b"v".to_vec())]);
        store.router().send(group_id, PeerMsg::Write { command, reply }).ok().expect("room");
        matches!(answer.recv_timeout(Duration::from_secs(2)), Ok(Ok(Outcome::Done)))
    });
    assert_eq!(store.failure(), None);
}

/// A first write succeeds; then `break_it` breaks an engine, and writes go on until one is refused.
fn refusal_after_first_write(store: &Store, group_id: u64, break_it: impl Fn()) -> String {
    first_write(store, group_id);
    break_it();
    refusal_after_failure(store, group_id)
}

/// Sends `make`'s request for `group_id` to each node until one answers with an outcome `accept` takes.
fn until_outcome(
    nodes: &[Node],
    group_id: u64,
    deadline: Instant,
    make: impl Fn(WriteReply) -> PeerMsg,
    accept: impl Fn(&Outcome) -> bool,
) -> Outcome {
    loop {
        for node in nodes {
            let (reply, answer) = oneshot::channel();
            if node.store.router().send(group_id, make(reply)).is_ok() {
                if let Ok(Ok(outcome)) = answer.recv_timeout(Duration::from_secs(5)) {
                    if accept(&outcome) {
                        return outcome;
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "no node of group {group_id} took the request");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_split_opens_the_new_group_on_every_node_and_it_serves_its_range() {
    let cluster = one_group_on_three_nodes();
    let (nodes, group_id, deadline) = (&cluster.nodes, cluster.group_id, cluster.deadline);
    put(nodes, group_id, b"m1", b"before", deadline);
    let split = SplitRequest::new(b"m".to_vec(), (2, 11), 3);
    let make = |reply| PeerMsg::Split { split: split.clone(), reply };
    let outcome = until_outcome(nodes, group_id, deadline, make, |o| matches!(o, Outcome::Split { .. }));
    let Outcome::Split { right } = outcome else { unreachable!() };
    assert_eq!((right.group_id, right.start.as_slice()), (2, &b"m"[..]));
    // Every node opens the new group; the replica `split_leader` names campaigns at once and leads it (group 2 of
    // voters on nodes 1–3: node 3, while node 1 leads the group that split), and it takes writes for its range
    // and serves what the range held before the split.
    assert_eq!(put(nodes, group_id, b"a0", b"x", deadline), 1);
    assert_eq!(put(nodes, 2, b"m2", b"after", deadline), 3, "the new group is led where split_leader says");
    for key in [&b"m1"[..], b"m2"] {
        let read = |reply| PeerMsg::Read { request: ReadRequest::Get(key.to_vec()), reply };
        let value = loop {
            let answers: Vec<_> = nodes
                .iter()
                .filter_map(|node| {
                    let (reply, answer) = oneshot::channel();
                    node.store.router().send(2, read(reply)).ok()?;
                    answer.recv_timeout(Duration::from_secs(5)).ok()?.ok()
                })
                .collect();
            if let Some(ReadResult::Value(value)) = answers.into_iter().next() {
                break value;
            }
            assert!(Instant::now() < deadline, "no leader of group 2 served {key:?}");
        };
        assert_eq!(value.as_deref(), Some(if key == b"m1" { &b"before"[..] } else { &b"after"[..] }));
    }
    for node in nodes {
        assert!(node.kv.ranges().unwrap().iter().any(|(id, _)| *id == 2), "node {} stores group 2", node.id);
        wait_until(deadline, "every node's replica of group 2 is open", || {
            node.store.router().send(2, PeerMsg::CheckMembership).is_ok()
        });
        assert!(!node.store.opening(2), "node {}: open, no longer opening", node.id);
    }
    // The left group refuses keys of the right range now — writes, reads, and scans routed with the range as it
    // was before the split — and still serves its own.
    let leader = put(nodes, group_id, b"a", b"left", deadline);
    let left = &nodes[leader as usize - 1].store;
    let (reply, answer) = oneshot::channel();
    let write = Command::write(None, vec![Op::put(b"m3".to_vec(), b"x".to_vec())]);
    left.router().send(group_id, PeerMsg::Write { command: write, reply }).ok().unwrap();
    assert!(matches!(answer.recv().unwrap(), Err(PeerError::Range(RangeError::KeyNotInRange { .. }))));
    let (reply, answer) = oneshot::channel();
    left.router().send(group_id, PeerMsg::Read { request: ReadRequest::Get(b"m1".to_vec()), reply }).ok().unwrap();
    assert!(matches!(answer.recv().unwrap(), Err(PeerError::Range(RangeError::KeyNotInRange { .. }))));
    let before = RangeEpoch { version: 1, conf_version: 1 };
    let scan = |epoch| ReadRequest::Scan { start: Vec::new(), end: Vec::new(), limit: 10, epoch: Some(epoch) };
    let (reply, answer) = oneshot::channel();
    left.router().send(group_id, PeerMsg::Read { request: scan(before), reply }).ok().unwrap();
    assert!(matches!(answer.recv().unwrap(), Err(PeerError::Range(RangeError::StaleEpoch { .. }))));
    let (reply, answer) = oneshot::channel();
    left.router()
        .send(group_id, PeerMsg::Read { request: scan(RangeEpoch { version: 2, ..before }), reply })
        .ok()
        .unwrap();
    let Ok(ReadResult::Pairs(pairs)) = answer.recv().unwrap() else { panic!("the left group's scan failed") };
    let keys: Vec<&[u8]> = pairs.iter().map(|(key, _)| key.as_slice()).collect();
    assert_eq!(keys, [&b"a"[..], b"a0", b"first"], "only the left range's keys");
    // The left leader's local read grant is for the range's new version only.
    let lease = left.local_reader().lease(group_id);
    wait_until(deadline, "the left leader grants local reads", || left.local_reader().holds(&lease, 2));
    assert!(!left.local_reader().holds(&lease, 1), "a caller routing by the range before the split is sent on");
}

/// Nodes 1 and 2's outgoing messages, with those of one group to node 3 dropped while `held`, and another
/// group's snapshot chunks to node 3 while `chunks_held` (Raft and the snapshot streams resend them once let
/// through).
struct HoldGroupToNode3 {
    inner: Arc<InProcessTransport>,
    group_id: u64,
    held: std::sync::atomic::AtomicBool,
    chunks_of: u64,
    chunks_held: std::sync::atomic::AtomicBool,
    /// Chunks of group `chunks_of` let through to node 3.
    chunks_passed: std::sync::atomic::AtomicU64,
}

impl Transport for HoldGroupToNode3 {
    fn send(&self, envelope: Envelope) {
        let is = |flag: &std::sync::atomic::AtomicBool| flag.load(std::sync::atomic::Ordering::SeqCst);
        let to_3 = envelope.to_node == 3;
        let group = to_3 && envelope.group_id == self.group_id && is(&self.held);
        let chunk = matches!(envelope.message, ReplicaMessage::Chunk(_));
        let chunks = to_3 && envelope.group_id == self.chunks_of && chunk && is(&self.chunks_held);
        if !group && !chunks {
            if to_3 && envelope.group_id == self.chunks_of && chunk {
                self.chunks_passed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            self.inner.send(envelope);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[test]
fn a_node_that_hears_from_the_new_group_before_it_applies_the_split_replaces_its_empty_replica() {
    new_group_heard_before_the_split(false);
}

#[test]
fn a_node_that_gets_the_new_groups_snapshot_before_it_applies_the_split_refuses_it() {
    new_group_heard_before_the_split(true);
}

/// Three nodes of group 1; node 3 stops hearing from group 1 (nodes 1 and 2 send through the returned hold),
/// then nodes 1 and 2 split it at `m` into group 2, which takes the write `m2` without node 3. Node 3's store
/// options are adjusted by `adjust_node_3`; with `snapshots_sent` false, group 2's snapshot chunks to node 3 are
/// held too.
struct SplitWithoutNode3 {
    _dir: tempfile::TempDir,
    transport: Arc<InProcessTransport>,
    hold: Arc<HoldGroupToNode3>,
    nodes: Vec<Node>,
    group_id: u64,
    deadline: Instant,
}

impl SplitWithoutNode3 {
    fn start(snapshots_sent: bool, adjust_node_3: impl FnOnce(&mut StoreOptions)) -> SplitWithoutNode3 {
        let dir = tempfile::tempdir().unwrap();
        let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
        let range = initial_ranges(1, 1, &replicas).remove(0);
        let group_id = range.group_id;
        let transport = Arc::new(InProcessTransport::new());
        let hold = Arc::new(HoldGroupToNode3 {
            inner: Arc::clone(&transport),
            group_id,
            held: Default::default(),
            chunks_of: 2,
            chunks_held: Default::default(),
            chunks_passed: Default::default(),
        });
        let ranges = std::slice::from_ref(&range);
        let mut nodes: Vec<Node> =
            (1..=2).map(|id| start_node_sending(id, dir.path(), ranges, Arc::clone(&hold) as _, &transport)).collect();
        nodes.push(start_node_with(3, dir.path(), ranges, Arc::clone(&transport) as _, &transport, adjust_node_3));
        nodes[0].store.campaign_all([group_id]);
        let deadline = Instant::now() + Duration::from_secs(60);
        put(&nodes, group_id, b"m1", b"before", deadline);
        hold.held.store(true, std::sync::atomic::Ordering::SeqCst);
        hold.chunks_held.store(!snapshots_sent, std::sync::atomic::Ordering::SeqCst);
        let split = SplitRequest::new(b"m".to_vec(), (2, 11), 3);
        let make = |reply| PeerMsg::Split { split: split.clone(), reply };
        until_outcome(&nodes[..1], group_id, deadline, make, |o| matches!(o, Outcome::Split { .. }));
        put(&nodes[..2], 2, b"m2", b"after", deadline);
        SplitWithoutNode3 { _dir: dir, transport, hold, nodes, group_id, deadline }
    }

    fn chunks_passed(&self) -> u64 {
        self.hold.chunks_passed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Node 3's group 2 catches up with `m2`; then, with node 1 gone, group 2 takes writes through nodes 2 and 3.
    fn node_3_becomes_a_full_member(&self) {
        let (nodes, deadline) = (&self.nodes, self.deadline);
        wait_until(deadline, "node 3's group 2 has the write made before it applied the split", || {
            nodes[2].kv.get(b"m2").unwrap().as_deref() == Some(&b"after"[..])
        });
        self.transport.remove_node(1);
        nodes[1].store.node_down(1);
        nodes[2].store.node_down(1);
        put(&nodes[1..], 2, b"m3", b"without node 1", deadline);
        assert_eq!(nodes[2].kv.get(b"m1").unwrap().as_deref(), Some(&b"before"[..]));
    }
}

/// Node 3 hears from the new group before it applies the split (group 1's messages to it held back), within its
/// wait for a split (`awaiting_split.rs`; made long here): it creates no empty replica for those messages — which
/// would vote, refuse the appends and be streamed a snapshot — and once it applies the split, the replica the split
/// opens is handed the messages that waited and catches up from the log.
#[test]
fn a_node_that_hears_from_the_new_group_shortly_before_it_applies_the_split_hands_the_messages_to_its_replica() {
    let long_wait = |options: &mut StoreOptions| options.split_message_wait_ticks = 1_000_000;
    let cluster = SplitWithoutNode3::start(true, long_wait);
    std::thread::sleep(Duration::from_millis(300)); // 30 ticks: heartbeats and probes of group 2 reach node 3
    let node_3 = &cluster.nodes[2];
    assert!(node_3.store.router().send(2, PeerMsg::Tick).is_err(), "node 3 created no empty replica of group 2");
    assert_eq!(node_3.kv.applied(2), (0, 0));
    cluster.hold.held.store(false, std::sync::atomic::Ordering::SeqCst);
    cluster.node_3_becomes_a_full_member();
    assert_eq!(cluster.chunks_passed(), 0, "no snapshot of group 2 was streamed to node 3");
}

/// Node 3 stops hearing from group 1 while nodes 1 and 2 apply a split; the new group's messages reach node 3,
/// which creates an empty replica of it once its wait for a split is over (`awaiting_split.rs`). With
/// `snapshots_sent`, the new group's snapshots reach node 3 too, and are refused there: node 3's group 1 still
/// holds those keys, and its entries from before the split would overwrite the snapshot's newer data
/// (`range_claims.rs`); without, the snapshots are held. Either way the split, once node 3 applies it, replaces
/// the empty replica, and node 3 ends a full member of the new group.
fn new_group_heard_before_the_split(snapshots_sent: bool) {
    let cluster = SplitWithoutNode3::start(snapshots_sent, |_| {});
    let (hold, group_id, deadline) = (&cluster.hold, cluster.group_id, cluster.deadline);
    let node_3 = &cluster.nodes[2];
    wait_until(deadline, "node 3 holds a replica of group 2", || node_3.store.router().send(2, PeerMsg::Tick).is_ok());
    if snapshots_sent {
        // The first stream, refused, and the one its leader sent after.
        wait_until(deadline, "group 2's snapshots reach node 3 again and again", || cluster.chunks_passed() >= 3);
    }
    assert_eq!(node_3.kv.applied(2), (0, 0), "node 3 has neither applied the split nor installed a snapshot");
    assert_eq!(node_3.kv.get(b"m2").unwrap(), None);
    // Let group 1 through: node 3 applies the split, which replaces the empty replica — the one it opens has a
    // log that starts at the bootstrap index (the empty one's could only start with a snapshot, never taken) —
    // and group 2 catches it up.
    hold.chunks_held.store(true, std::sync::atomic::Ordering::SeqCst);
    hold.held.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_until(deadline, "node 3 applies the split", || {
        node_3.kv.ranges().unwrap().iter().any(|(id, bytes)| {
            *id == group_id && RangeDescriptor::decode_stored(bytes).is_ok_and(|range| range.end == b"m")
        })
    });
    wait_until(deadline, "node 3 opens group 2 from the split", || node_3.log.last_index(2) >= BOOTSTRAP_INDEX);
    hold.chunks_held.store(false, std::sync::atomic::Ordering::SeqCst);
    cluster.node_3_becomes_a_full_member();
}

/// Node 3 is cut off while the others split the group, write on both sides and compact both logs past the split:
/// when it is back, its replica of the old group never applies the split — a snapshot of the shrunk range
/// replaces it — and the new group's snapshot, refused while the old group held those keys there, is taken once
/// the shrunk snapshot freed them. Node 3 ends a full member of both, serving with node 1 gone.
#[test]
fn a_replica_cut_off_during_a_split_catches_up_on_both_groups_by_snapshot() {
    let cluster = one_group_on_three_nodes();
    let (nodes, group_id, deadline) = (&cluster.nodes, cluster.group_id, cluster.deadline);
    cluster.transport.remove_node(3);
    for i in 0..50u32 {
        put(&nodes[..2], group_id, format!("{}{i:02}", if i % 2 == 0 { 'a' } else { 'x' }).as_bytes(), b"1", deadline);
    }
    let split = SplitRequest::new(b"m".to_vec(), (2, 11), 3);
    let make = |reply| PeerMsg::Split { split: split.clone(), reply };
    until_outcome(&nodes[..2], group_id, deadline, make, |o| matches!(o, Outcome::Split { .. }));
    for i in 0..50u32 {
        let (group, key) = if i % 2 == 0 { (group_id, format!("a{i:02}")) } else { (2, format!("x{i:02}")) };
        put(&nodes[..2], group, key.as_bytes(), b"2", deadline);
    }
    for node in &nodes[..2] {
        for group in [group_id, 2] {
            assert!(compact(node, group) > BOOTSTRAP_INDEX, "node {}'s log of group {group} compacted", node.id);
        }
    }
    cluster.transport.add_node(3, nodes[2].store.inbox());
    let node_3 = &nodes[2];
    wait_until(deadline, "node 3 has every write of both groups", || {
        (0..50u32).all(|i| {
            let key = format!("{}{i:02}", if i % 2 == 0 { 'a' } else { 'x' });
            node_3.kv.get(key.as_bytes()).unwrap().as_deref() == Some(&b"2"[..])
        })
    });
    let stored = |group: u64| {
        node_3.kv.ranges().unwrap().into_iter().find(|(id, _)| *id == group).map(|(_, bytes)| {
            let range = RangeDescriptor::decode_stored(&bytes).unwrap();
            (range.start, range.end)
        })
    };
    assert_eq!(stored(group_id), Some((Vec::new(), b"m".to_vec())), "the old group shrank by its snapshot");
    assert_eq!(stored(2), Some((b"m".to_vec(), Vec::new())));
    // A full member of both: with node 1 gone, each group takes writes through nodes 2 and 3.
    cluster.transport.remove_node(1);
    nodes[1].store.node_down(1);
    node_3.store.node_down(1);
    put(&nodes[1..], group_id, b"a99", b"3", deadline);
    put(&nodes[1..], 2, b"x99", b"3", deadline);
}

/// A learner on node 4 is removed while node 4 is cut off, then the group splits: node 4's replica keeps the old,
/// whole range and, a learner, never campaigns — it would never hear of its removal. When the new group adds a
/// learner on node 4, its snapshot is refused there (the stale replica holds those keys); the refusal wakes the
/// stale replica, which tells the members where it stands, gets a removal notice and is destroyed, and the new
/// group's snapshot is taken (`store-sim` seed 685 found this).
#[test]
fn a_removed_learner_holding_a_split_groups_keys_is_found_out_when_the_new_group_needs_them() {
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
    let range = initial_ranges(1, 1, &replicas).remove(0);
    let group_id = range.group_id;
    let transport = Arc::new(InProcessTransport::new());
    let nodes: Vec<Node> =
        (1..=4).map(|id| start_node(id, dir.path(), std::slice::from_ref(&range), &transport)).collect();
    nodes[0].store.campaign_all([group_id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    put(&nodes, group_id, b"m1", b"before", deadline);
    change(&nodes, group_id, MembershipChange::AddLearner { node_id: 4, replica_id: 4, addr: String::new() }, deadline);
    let node_4 = &nodes[3];
    wait_until(deadline, "node 4's learner caught up", || node_4.kv.get(b"m1").unwrap().is_some());
    transport.remove_node(4);
    change(&nodes[..3], group_id, MembershipChange::Remove { replica_id: 4 }, deadline);
    let split = SplitRequest::new(b"m".to_vec(), (2, 11), 3);
    let make = |reply| PeerMsg::Split { split: split.clone(), reply };
    until_outcome(&nodes[..3], group_id, deadline, make, |o| matches!(o, Outcome::Split { .. }));
    put(&nodes[..3], 2, b"m2", b"after", deadline);
    transport.add_node(4, node_4.store.inbox());
    assert_eq!(node_4.store.router().len(), 1, "node 4 still runs its stale learner of group 1");
    change(&nodes[..3], 2, MembershipChange::AddLearner { node_id: 4, replica_id: 14, addr: String::new() }, deadline);
    wait_until(deadline, "node 4 takes group 2's snapshot", || {
        node_4.kv.get(b"m2").unwrap().as_deref() == Some(&b"after"[..])
    });
    let stored = |group: u64| {
        let (_, bytes) = node_4.kv.ranges().unwrap().into_iter().find(|(id, _)| *id == group).unwrap();
        RangeDescriptor::decode_stored(&bytes).unwrap()
    };
    assert!(!stored(group_id).lists_node(4), "the stale learner was destroyed, its members' descriptor kept");
    assert!(stored(2).lists_replica(14));
    assert_eq!(node_4.kv.get(b"m1").unwrap().as_deref(), Some(&b"before"[..]), "group 2's data, as it was");
}

/// A group's descriptor as node `node` stores it.
fn stored_range(node: &Node, group_id: u64) -> Option<RangeDescriptor> {
    let (_, bytes) = node.kv.ranges().unwrap().into_iter().find(|(id, _)| *id == group_id)?;
    Some(RangeDescriptor::decode_stored(&bytes).unwrap())
}

/// Asks for the merge of group `right` into group `left` as the host does: locks the left range for it, then
/// freezes the right one (the groups carry it on from there). Returns the left range as locked.
fn ask_merge(nodes: &[Node], left: u64, right: u64, deadline: Instant) -> RangeDescriptor {
    let is_merge = |o: &Outcome| matches!(o, Outcome::Merge { .. });
    let right_range = stored_range(&nodes[0], right).unwrap();
    let prepare = MergeCommand::new(MergeStep::Prepare, None, Some(right_range));
    let make = |reply| PeerMsg::Merge { merge: Box::new(prepare.clone()), reply };
    let Outcome::Merge { range: locked } = until_outcome(nodes, left, deadline, make, is_merge) else { unreachable!() };
    let freeze = MergeCommand::new(MergeStep::Freeze, Some(locked.as_ref().clone()), None);
    let make = |reply| PeerMsg::Merge { merge: Box::new(freeze.clone()), reply };
    until_outcome(nodes, right, deadline, make, is_merge);
    *locked
}

/// How many merge commit entries node `node`'s log of group `group_id` holds.
fn merge_commits_in_log(node: &Node, group_id: u64) -> usize {
    let (first, last) = (node.log.first_index(group_id), node.log.last_index(group_id));
    let entries = node.log.entries(group_id, first, last + 1, u64::MAX).unwrap();
    let is_commit = |command: Command| command.merge.is_some_and(|merge| merge.step == MergeStep::Commit as i32);
    let commands = entries.iter().filter(|entry| !entry.is_conf_change() && !entry.data.is_empty());
    commands
        .map(|entry| <Command as prost::Message>::decode(entry.data.as_ref()).unwrap())
        .filter(|c| is_commit(c.clone()))
        .count()
}

/// A split undone by a merge: the right group's replicas end on every node (their records say where the keys
/// went, their logs are dropped), the left group serves the whole range again — the right range's writes
/// included — and takes writes for it; requests for the right group find no replica.
#[test]
fn a_merge_gives_the_right_range_back_to_the_left_group_on_every_node() {
    let cluster = one_group_on_three_nodes();
    let (nodes, group_id, deadline) = (&cluster.nodes, cluster.group_id, cluster.deadline);
    let split = SplitRequest::new(b"m".to_vec(), (2, 11), 3);
    let make = |reply| PeerMsg::Split { split: split.clone(), reply };
    until_outcome(nodes, group_id, deadline, make, |o| matches!(o, Outcome::Split { .. }));
    put(nodes, group_id, b"a1", b"left", deadline);
    put(nodes, 2, b"x1", b"right", deadline);
    let merging = std::sync::atomic::AtomicBool::new(true);
    let locked = std::thread::scope(|scope| {
        // Reads of the right range keep its replicas busy throughout (refused once it is frozen): each handling of
        // its leader is one where it could ask for the commit again.
        scope.spawn(|| {
            while merging.load(std::sync::atomic::Ordering::Relaxed) {
                for node in nodes {
                    let (reply, _answer) = oneshot::channel();
                    let _ =
                        node.store.router().send(2, PeerMsg::Read { request: ReadRequest::Get(b"x1".to_vec()), reply });
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let locked = ask_merge(nodes, group_id, 2, deadline);
        wait_until(deadline, "every node ended its replica of group 2 and dropped its log", || {
            nodes.iter().all(|node| node.store.router().len() == 1 && node.log.last_index(2) < node.log.first_index(2))
        });
        merging.store(false, std::sync::atomic::Ordering::Relaxed);
        locked
    });
    assert_eq!(locked.merge_lock.map(|lock| lock.right_group_id), Some(2));
    for node in nodes {
        let record = stored_range(node, 2).unwrap();
        assert_eq!((record.merged_into, record.replicas.len()), (group_id, 0), "node {}", node.id);
        let left = stored_range(node, group_id).unwrap();
        assert_eq!((left.start.as_slice(), left.end.as_slice()), (&b""[..], &b""[..]), "node {}", node.id);
        assert!(left.merge_lock.is_none() && left.epoch().version > locked.epoch().version);
        assert!(node.log.last_index(2) < node.log.first_index(2), "node {}'s log of group 2 dropped", node.id);
    }
    // The right leader asked for the commit once, not on every handling (each ask is an entry of the left log).
    for node in nodes {
        assert_eq!(merge_commits_in_log(node, group_id), 1, "node {}", node.id);
    }
    put(nodes, group_id, b"x2", b"merged", deadline);
    let leader = put(nodes, group_id, b"a2", b"merged", deadline);
    let (reply, answer) = oneshot::channel();
    let scan = ReadRequest::Scan { start: Vec::new(), end: Vec::new(), limit: 10, epoch: None };
    nodes[leader as usize - 1].store.router().send(group_id, PeerMsg::Read { request: scan, reply }).ok().unwrap();
    let Ok(ReadResult::Pairs(pairs)) = answer.recv().unwrap() else { panic!("the merged range's scan failed") };
    let keys: Vec<&[u8]> = pairs.iter().map(|(key, _)| key.as_slice()).collect();
    assert_eq!(keys, [&b"a1"[..], b"a2", b"first", b"x1", b"x2"]);
    let (reply, _answer) = oneshot::channel();
    let write = Command::write(None, vec![Op::put(b"x3".to_vec(), b"x".to_vec())]);
    assert!(nodes[0].store.router().send(2, PeerMsg::Write { command: write, reply }).is_err(), "group 2 is gone");
}

/// Three nodes holding one group, split at `m` into group `right` (led by the node `split_leader` names), with
/// nodes 1 and 2 sending through `hold`.
fn split_on_three_nodes_holding(dir: &std::path::Path, hold: &Arc<HoldGroupToNode3>, right: u64) -> Vec<Node> {
    split_on_three_nodes_holding_with(dir, hold, right, |_| {})
}

/// [`split_on_three_nodes_holding`] with every node's store options adjusted by `adjust`.
fn split_on_three_nodes_holding_with(
    dir: &std::path::Path,
    hold: &Arc<HoldGroupToNode3>,
    right: u64,
    adjust: impl Fn(&mut StoreOptions),
) -> Vec<Node> {
    let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
    let ranges = initial_ranges(1, 1, &replicas);
    let mut nodes: Vec<Node> =
        (1..=2).map(|id| start_node_with(id, dir, &ranges, Arc::clone(hold) as _, &hold.inner, &adjust)).collect();
    nodes.push(start_node_with(3, dir, &ranges, Arc::clone(&hold.inner) as _, &hold.inner, &adjust));
    nodes[0].store.campaign_all([1]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let split = SplitRequest::new(b"m".to_vec(), (right, right * 10 + 1), 3);
    let make = |reply| PeerMsg::Split { split: split.clone(), reply };
    until_outcome(&nodes, 1, deadline, make, |o| matches!(o, Outcome::Split { .. }));
    put(&nodes, 1, b"a1", b"left", deadline);
    put(&nodes, right, b"x1", b"right", deadline);
    nodes
}

fn hold_group_to_node_3(transport: &Arc<InProcessTransport>, group_id: u64) -> Arc<HoldGroupToNode3> {
    Arc::new(HoldGroupToNode3 {
        inner: Arc::clone(transport),
        group_id,
        held: Default::default(),
        chunks_of: 0,
        chunks_held: Default::default(),
        chunks_passed: Default::default(),
    })
}

/// Node 3 stops hearing from group 1 (the left range) while group 2 is merged into it: node 3's replica of group 2
/// still takes part (it confirms the decision), group 1 commits on nodes 1 and 2, takes writes over the whole
/// range and compacts its log. When group 1 reaches node 3 again, its replica there catches up by a snapshot
/// taken after the commit — and the install ends node 3's decided replica of group 2 (a claim on the same keys,
/// which no commit entry will ever end there). Node 3 ends a full member of the merged group.
#[test]
fn a_left_replica_behind_a_merge_catches_up_by_snapshot_and_ends_the_decided_right_replica() {
    let dir = tempfile::tempdir().unwrap();
    let transport = Arc::new(InProcessTransport::new());
    let hold = hold_group_to_node_3(&transport, 1);
    let nodes = split_on_three_nodes_holding(dir.path(), &hold, 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    hold.held.store(true, std::sync::atomic::Ordering::SeqCst);
    ask_merge(&nodes, 1, 2, deadline);
    wait_until(deadline, "nodes 1 and 2 take group 2 in", || {
        nodes[..2].iter().all(|node| node.store.router().len() == 1)
    });
    let node_3 = &nodes[2];
    let decided = stored_range(node_3, 2).unwrap();
    assert!(decided.merge.is_some_and(|state| state.decided_index != 0), "node 3's replica decided: {decided:?}");
    assert_eq!(node_3.store.router().len(), 2, "node 3 still runs its replica of group 2");
    for i in 0..30u32 {
        put(&nodes[..2], 1, format!("x{i:02}").as_bytes(), b"merged", deadline);
    }
    for node in &nodes[..2] {
        compact(node, 1);
    }
    hold.held.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_until(deadline, "node 3 catches up on group 1 and ends its replica of group 2", || {
        node_3.store.router().len() == 1 && node_3.kv.get(b"x29").unwrap().as_deref() == Some(&b"merged"[..])
    });
    let record = stored_range(node_3, 2).unwrap();
    assert_eq!((record.merged_into, record.replicas.len()), (1, 0));
    let left = stored_range(node_3, 1).unwrap();
    assert!(left.end.is_empty() && left.merge_lock.is_none(), "node 3 holds the merged range: {left:?}");
    assert_eq!(node_3.kv.get(b"x1").unwrap().as_deref(), Some(&b"right"[..]), "the right range's data stayed");
    transport.remove_node(1);
    nodes[1].store.node_down(1);
    node_3.store.node_down(1);
    put(&nodes[1..], 1, b"x99", b"without node 1", deadline);
}

/// A replica of the right range cannot confirm (its node is cut off): the right leader gives the merge up after
/// its timeout (an unfreeze in its own log), the left leader, seeing that in its node's replica of the right
/// group, cancels its lock, and both ranges take writes and splits again; node 3 catches up when it is back.
/// A write that reached the frozen range meanwhile was held, not refused, and is taken once it unfroze.
#[test]
fn a_merge_that_cannot_get_every_confirmation_is_given_up_and_both_ranges_serve_again() {
    let dir = tempfile::tempdir().unwrap();
    let transport = Arc::new(InProcessTransport::new());
    let hold = hold_group_to_node_3(&transport, 0);
    // Group 4's leader is on node 2 (`split_leader`): the freeze can be proposed with node 3 cut off. Writes that
    // reach a frozen range there wait for as long as it takes (3 ticks by default, as on the other nodes).
    let long_wait = |options: &mut StoreOptions| {
        if options.node_id == 2 {
            options.frozen_write_wait_ticks = 1_000_000;
        }
    };
    let nodes = split_on_three_nodes_holding_with(dir.path(), &hold, 4, long_wait);
    let deadline = Instant::now() + Duration::from_secs(60);
    transport.remove_node(3);
    let locked = ask_merge(&nodes[..2], 1, 4, deadline);
    // A write to the frozen range's leader (node 2), which gives the merge up only after 200 ticks (2 s).
    let (reply, held) = oneshot::channel();
    let command = Command::write(None, vec![Op::put(b"x4".to_vec(), b"held".to_vec())]);
    nodes[1].store.router().send(4, PeerMsg::Write { command, reply }).ok().unwrap();
    let early = held.recv_timeout(Duration::from_millis(200));
    assert!(early.is_err(), "a write reaching the frozen range was answered at once: {early:?}");
    // On node 1, whose writes wait 3 ticks (30 ms), one is refused as the frozen range refuses writes, long
    // before the merge is given up.
    wait_until(deadline, "node 1 applies the freeze", || stored_range(&nodes[0], 4).unwrap().merge.is_some());
    let (reply, refused) = oneshot::channel();
    let command = Command::write(None, vec![Op::put(b"x5".to_vec(), b"refused".to_vec())]);
    nodes[0].store.router().send(4, PeerMsg::Write { command, reply }).ok().unwrap();
    let refused = refused.recv_timeout(Duration::from_secs(1));
    assert!(matches!(refused, Ok(Err(PeerError::Range(RangeError::Merging { .. })))), "{refused:?}");
    wait_until(deadline, "the merge is given up on nodes 1 and 2", || {
        nodes[..2].iter().all(|node| {
            let (left, right) = (stored_range(node, 1).unwrap(), stored_range(node, 4).unwrap());
            left.merge_lock.is_none() && right.merge.is_none() && right.epoch().version > locked.epoch().version
        })
    });
    // The held write: proposed once the range unfroze.
    let answer = held.recv_timeout(Duration::from_secs(10));
    assert!(matches!(answer, Ok(Ok(Outcome::Done))), "{answer:?}");
    wait_until(deadline, "node 1 applies it", || nodes[0].kv.get(b"x4").unwrap().as_deref() == Some(&b"held"[..]));
    put(&nodes[..2], 4, b"x2", b"again", deadline);
    put(&nodes[..2], 1, b"a2", b"again", deadline);
    assert_eq!(nodes[0].store.router().len(), 2, "both groups live on");
    transport.add_node(3, nodes[2].store.inbox());
    wait_until(deadline, "node 3 catches up", || nodes[2].kv.get(b"x2").unwrap().as_deref() == Some(&b"again"[..]));
    // A merge asked again, with every replica there, commits.
    ask_merge(&nodes, 1, 4, deadline);
    wait_until(deadline, "the second merge commits everywhere", || {
        nodes.iter().all(|node| node.store.router().len() == 1)
    });
    put(&nodes, 1, b"x3", b"merged", deadline);
}

/// Which envelopes a [`DropWhere`] drops, given its flags.
type Drops = Box<dyn Fn(&Envelope, [bool; 2]) -> bool + Send + Sync>;

/// Sends through `inner`, dropping the envelopes `drops` picks (given the flags `held`).
struct DropWhere {
    inner: Arc<InProcessTransport>,
    held: [std::sync::atomic::AtomicBool; 2],
    drops: Drops,
}

impl DropWhere {
    /// Over a new in-process transport, both flags down.
    fn new(drops: impl Fn(&Envelope, [bool; 2]) -> bool + Send + Sync + 'static) -> Arc<DropWhere> {
        Arc::new(DropWhere {
            inner: Arc::new(InProcessTransport::new()),
            held: Default::default(),
            drops: Box::new(drops),
        })
    }

    fn set(&self, flag: usize, on: bool) {
        self.held[flag].store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Transport for DropWhere {
    fn send(&self, envelope: Envelope) {
        let held = self.held.each_ref().map(|flag| flag.load(std::sync::atomic::Ordering::SeqCst));
        if !(self.drops)(&envelope, held) {
            self.inner.send(envelope);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Whether `envelope` tells group `group_id`'s replica on node 3 a commit index and nothing else — a heartbeat,
/// or an append without entries: how a follower of a frozen range learns that its decision committed (the
/// append carrying the decision carries an older commit index).
fn commit_news_to_node_3(envelope: &Envelope, group_id: u64) -> bool {
    use flotilla_raftstore::raft::MessageType;
    let commit_only = |m: &ReplicaMessage| {
        matches!(m, ReplicaMessage::Raft(m) if m.msg_type() == MessageType::Heartbeat
            || (m.msg_type() == MessageType::Append && m.entries.is_empty()))
    };
    envelope.to_node == 3 && envelope.group_id == group_id && commit_only(&envelope.message)
}

/// Three nodes of one group sending through `filter`, split at `m` into group 2, which node 1 then leads.
fn split_on_three_nodes_dropping(dir: &std::path::Path, filter: &Arc<DropWhere>) -> Vec<Node> {
    split_on_three_nodes_dropping_with(dir, filter, |_| {})
}

/// [`split_on_three_nodes_dropping`] with every node's store options adjusted by `adjust`.
fn split_on_three_nodes_dropping_with(
    dir: &std::path::Path,
    filter: &Arc<DropWhere>,
    adjust: impl Fn(&mut StoreOptions),
) -> Vec<Node> {
    let replicas: Vec<Replica> = (1..=3).map(|id| Replica::voter(id, id)).collect();
    let ranges = initial_ranges(1, 1, &replicas);
    let nodes: Vec<Node> =
        (1..=3).map(|id| start_node_with(id, dir, &ranges, Arc::clone(filter) as _, &filter.inner, &adjust)).collect();
    nodes[0].store.campaign_all([1]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let split = SplitRequest::new(b"m".to_vec(), (2, 21), 3);
    let make = |reply| PeerMsg::Split { split: split.clone(), reply };
    until_outcome(&nodes, 1, deadline, make, |o| matches!(o, Outcome::Split { .. }));
    put(&nodes, 1, b"a1", b"left", deadline);
    wait_until(deadline, "node 1 leads group 2", || {
        let leader = put(&nodes, 2, b"x1", b"right", deadline);
        let transfer = PeerMsg::TransferLeader { replica_id: 21 };
        leader == 1 || nodes[leader as usize - 1].store.router().send(2, transfer).is_err()
    });
    nodes
}

/// Node 3's replica of the right range holds the decision in its log but never hears that it committed (its
/// group's commit news to node 3 is lost, and so are the notices of nodes where the group ended). The right
/// leader asks for the commit all the same — every log holds the decision — and node 3's left replica, meeting
/// the commit in its log, waits for its node's right replica and tells it the decision committed: it applies
/// it, and the merge ends on node 3 too.
#[test]
fn a_right_replica_that_never_heard_its_decision_committed_learns_it_from_the_commit_on_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let notices = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Arc::clone(&notices);
    let filter = DropWhere::new(move |envelope, [held, _]| {
        let notice = matches!(envelope.message, ReplicaMessage::Decided(_));
        if notice {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        held && (commit_news_to_node_3(envelope, 2) || (notice && envelope.to_node == 3))
    });
    let nodes = split_on_three_nodes_dropping(dir.path(), &filter);
    let deadline = Instant::now() + Duration::from_secs(60);
    filter.set(0, true);
    ask_merge(&nodes, 1, 2, deadline);
    wait_until(deadline, "every node takes group 2 in", || nodes.iter().all(|node| node.store.router().len() == 1));
    let record = stored_range(&nodes[2], 2).unwrap();
    assert_eq!((record.merged_into, record.replicas.len()), (1, 0));
    assert!(record.merge.is_some_and(|state| state.decided_index != 0 && state.decided_term != 0), "{record:?}");
    assert_eq!(nodes[2].kv.get(b"x1").unwrap().as_deref(), Some(&b"right"[..]), "the right range's data stayed");
    put(&nodes, 1, b"x2", b"merged", deadline);
    // A message of the ended group, from node 3 to node 1: node 1 answers it with a notice, and node 3, where the
    // group ended too, does not answer that (two nodes that did would answer each other's forever).
    filter.set(0, false);
    std::thread::sleep(Duration::from_millis(100));
    let before = notices.load(std::sync::atomic::Ordering::SeqCst);
    let mut probe = flotilla_raftstore::raft::Message { from: 23, to: 21, term: 1, ..Default::default() };
    probe.set_msg_type(flotilla_raftstore::raft::MessageType::HeartbeatResponse);
    let message = ReplicaMessage::Raft(probe);
    filter.inner.send(Envelope { group_id: 2, from_node: 3, to_node: 1, message });
    filter.inner.flush();
    std::thread::sleep(Duration::from_millis(300));
    let answered = notices.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(answered, 1, "one notice answers the message, and nothing answers the notice");
}

/// Node 3's replica of the right range holds the decision but hears nothing of its commit, and node 3's left
/// replica hears nothing of group 1 while nodes 1 and 2 commit the merge, split the merged range again at the
/// same key (group 3 takes the right range's keys) and compact the log. Node 3's left replica then catches up
/// by a snapshot past both, which leaves the right range's keys alone — node 3's right replica, not decided
/// there, is not ended by it, and its claim keeps group 3's snapshot out. Once node 3's right replica hears from
/// a node where its group ended that the decision committed (a `DecisionNotice`, answering its messages), it
/// applies the decision, finds its left replica past the merge and ends itself; group 3 then installs on node 3.
#[test]
fn a_right_replica_left_behind_by_its_left_groups_snapshot_learns_its_decision_from_another_node_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    let filter = DropWhere::new(|envelope, [decision_held, left_held]| {
        let notice = envelope.to_node == 3 && matches!(envelope.message, ReplicaMessage::Decided(_));
        let left = envelope.to_node == 3 && envelope.group_id == 1;
        commit_news_to_node_3(envelope, 2) || (decision_held && notice) || (left_held && left)
    });
    let nodes = split_on_three_nodes_dropping(dir.path(), &filter);
    let deadline = Instant::now() + Duration::from_secs(60);
    filter.set(0, true);
    filter.set(1, true);
    ask_merge(&nodes, 1, 2, deadline);
    wait_until(deadline, "nodes 1 and 2 take group 2 in", || {
        nodes[..2].iter().all(|node| node.store.router().len() == 1)
    });
    let node_3 = &nodes[2];
    let frozen = stored_range(node_3, 2).unwrap();
    assert!(frozen.merge.is_some_and(|state| state.decided_index == 0), "not decided on node 3: {frozen:?}");
    let split = SplitRequest::new(b"m".to_vec(), (3, 31), 3);
    let make = |reply| PeerMsg::Split { split: split.clone(), reply };
    until_outcome(&nodes[..2], 1, deadline, make, |o| matches!(o, Outcome::Split { .. }));
    put(&nodes[..2], 3, b"x3", b"group 3", deadline);
    put(&nodes[..2], 1, b"a3", b"group 1", deadline);
    for node in &nodes[..2] {
        compact(node, 1);
    }
    filter.set(1, false);
    wait_until(deadline, "node 3's left replica catches up past the merge", || {
        node_3.kv.get(b"a3").unwrap().as_deref() == Some(&b"group 1"[..])
    });
    assert_eq!(node_3.kv.get(b"x3").unwrap(), None, "group 3's snapshot waits for the right range's keys");
    filter.set(0, false);
    wait_until(deadline, "node 3's right replica ends and group 3 installs there", || {
        node_3.kv.get(b"x3").unwrap().as_deref() == Some(&b"group 3"[..])
    });
    let record = stored_range(node_3, 2).unwrap();
    assert_eq!((record.merged_into, record.replicas.len()), (1, 0));
    assert!(node_3.store.router().send(2, PeerMsg::Tick).is_err(), "node 3's replica of group 2 stopped");
}

/// A write handed over by the decided right range before the left leader proposed the merge's commit waits
/// there for the commit, and is taken behind it. Here node 3 does not get group 2's decision (its appends that
/// carry it are dropped), so the right leader, which asks for the commit only once every replica holds the
/// decision, cannot ask yet.
#[test]
fn a_write_handed_over_before_the_merge_commit_is_proposed_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let filter = DropWhere::new(|envelope, [held, _]| {
        let decides = |entry: &flotilla_raftstore::raft::Entry| {
            let command = <Command as prost::Message>::decode(entry.data.as_ref());
            command.is_ok_and(|c| c.merge.is_some_and(|merge| merge.step == MergeStep::Decide as i32))
        };
        let carries_decision = matches!(&envelope.message, ReplicaMessage::Raft(m)
                if !m.entries.is_empty() && m.entries.iter().any(|entry| !entry.is_conf_change() && decides(entry)));
        held && envelope.group_id == 2 && envelope.to_node == 3 && carries_decision
    });
    // Writes that wait for a merge wait for as long as it takes here (3 ticks by default).
    let long_wait = |options: &mut StoreOptions| options.frozen_write_wait_ticks = 1_000_000;
    let nodes = split_on_three_nodes_dropping_with(dir.path(), &filter, long_wait);
    let deadline = Instant::now() + Duration::from_secs(60);
    assert_eq!(put(&nodes, 1, b"a2", b"left", deadline), 1, "node 1 leads group 1");
    filter.set(0, true);
    ask_merge(&nodes, 1, 2, deadline);
    wait_until(deadline, "node 1's replica of group 2 applies the decision", || {
        stored_range(&nodes[0], 2).unwrap().merge.is_some_and(|state| state.decided_index != 0)
    });
    let (reply, answer) = oneshot::channel();
    let command = Command::write(None, vec![Op::put(b"x9".to_vec(), b"handed over".to_vec())]);
    nodes[0].store.router().send(2, PeerMsg::Write { command, reply }).ok().unwrap();
    let early = answer.recv_timeout(Duration::from_millis(200));
    assert!(early.is_err(), "a write handed over before the commit was proposed was answered: {early:?}");
    assert_eq!(merge_commits_in_log(&nodes[0], 1), 0, "the commit was not asked for");
    filter.set(0, false);
    assert!(matches!(answer.recv_timeout(Duration::from_secs(30)), Ok(Ok(Outcome::Done))), "the write applied");
    let grown = stored_range(&nodes[0], 1).unwrap();
    assert!(grown.end.is_empty() && grown.merge_lock.is_none(), "group 1 took group 2 in: {grown:?}");
    assert_eq!(nodes[0].kv.get(b"x9").unwrap().as_deref(), Some(&b"handed over"[..]));
}

/// A write that reaches the right range once it is decided is not refused: its replica hands it to its node's
/// replica of the left group, whose leader proposes it behind the merge's commit, and it applies over the grown
/// range. Here group 1's appends from node 1 are held, so the commit stays proposed but uncommitted, and the
/// write waits behind it rather than being refused; let through, both apply.
#[test]
fn a_write_for_a_decided_range_is_proposed_by_the_left_leader_behind_the_merge_commit() {
    let dir = tempfile::tempdir().unwrap();
    let filter = DropWhere::new(|envelope, [held, _]| {
        let append = matches!(&envelope.message, ReplicaMessage::Raft(m)
                if m.msg_type() == flotilla_raftstore::raft::MessageType::Append && !m.entries.is_empty());
        held && envelope.group_id == 1 && envelope.from_node == 1 && append
    });
    let nodes = split_on_three_nodes_dropping(dir.path(), &filter);
    let deadline = Instant::now() + Duration::from_secs(60);
    assert_eq!(put(&nodes, 1, b"a2", b"left", deadline), 1, "node 1 leads group 1");
    let is_merge = |o: &Outcome| matches!(o, Outcome::Merge { .. });
    let prepare = MergeCommand::new(MergeStep::Prepare, None, Some(stored_range(&nodes[0], 2).unwrap()));
    let make = |reply| PeerMsg::Merge { merge: Box::new(prepare.clone()), reply };
    let Outcome::Merge { range: locked } = until_outcome(&nodes, 1, deadline, make, is_merge) else { unreachable!() };
    filter.set(0, true);
    let freeze = MergeCommand::new(MergeStep::Freeze, Some(locked.as_ref().clone()), None);
    let make = |reply| PeerMsg::Merge { merge: Box::new(freeze.clone()), reply };
    until_outcome(&nodes, 2, deadline, make, is_merge);
    // The write goes to group 2's leader (node 1) until it is taken: refused while the range is only frozen, or
    // before the left leader proposed the commit.
    let answer = loop {
        let (reply, answer) = oneshot::channel();
        let command = Command::write(None, vec![Op::put(b"x9".to_vec(), b"behind the commit".to_vec())]);
        nodes[0].store.router().send(2, PeerMsg::Write { command, reply }).ok().unwrap();
        match answer.recv_timeout(Duration::from_millis(300)) {
            Ok(Err(PeerError::Range(RangeError::Merging { .. }))) => std::thread::sleep(Duration::from_millis(10)),
            Ok(other) => panic!("a write for the frozen range answered {other:?}"),
            Err(_) => break answer, // waiting: proposed behind the commit, which cannot commit yet
        }
        assert!(Instant::now() < deadline, "the write was never taken");
    };
    assert_eq!(nodes[0].kv.get(b"x9").unwrap(), None, "not applied before the commit");
    filter.set(0, false);
    assert!(matches!(answer.recv_timeout(Duration::from_secs(30)), Ok(Ok(Outcome::Done))), "the write applied");
    let grown = stored_range(&nodes[0], 1).unwrap();
    assert!(grown.end.is_empty() && grown.merge_lock.is_none(), "group 1 took group 2 in: {grown:?}");
    assert_eq!(nodes[0].kv.get(b"x9").unwrap().as_deref(), Some(&b"behind the commit"[..]));
    wait_until(deadline, "every node applies it", || {
        nodes.iter().all(|node| node.kv.get(b"x9").unwrap().as_deref() == Some(&b"behind the commit"[..]))
    });
}
