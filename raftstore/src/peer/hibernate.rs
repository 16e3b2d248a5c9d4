//! Hibernation: a replicated group with nothing to do stops ticking and heartbeating, so idle groups cost a node
//! memory only.
//!
//! **Falling asleep.** A leader hibernates once `hibernate_idle_ticks` ticks have passed without a client request
//! while nothing is pending (writes, reads, snapshot streams, a transfer), every entry is committed and applied,
//! its last entry is of its own term, and every other replica's log matches its own. It sends each of them a
//! [`HibernateRequest`] (its term, last index and term, commit) and stops ticking. A follower whose log ends at
//! exactly that entry stops ticking too, once it knows that commit (taken from the request if it had not heard
//! it yet) and has no request or snapshot stream pending; applying what that commit hands out needs no ticks. One
//! that differs (or never gets the request) keeps ticking and in time campaigns: its vote request wakes the leader,
//! which heartbeats again. A lost request costs a wake-up, never safety: hibernation only withholds ticks, and
//! Raft's safety never depends on time.
//!
//! **Waking.** Anything but a hibernate request wakes a replica: any message (except, for a sleeping leader,
//! answers to its last heartbeats), a client request, a transfer, a campaign. Time went uncounted while it slept, so it resumes with `RawNode::resume_after_pause`: no lease from
//! before holds (a woken leader confirms reads by a heartbeat round, which also wakes its followers), and
//! check-quorum and elections start a fresh timeout.
//!
//! **Opening.** A replica opens asleep: starting many groups must not start as many elections. Whatever reaches
//! it first wakes it.
//!
//! **Silence is expected.** A hibernating follower hears nothing from its leader by design, so silence is no
//! reason to campaign; the leader's *node* being down is. The node layer watches node liveness (one heartbeat
//! per node pair, not one per group) and calls [`Peer::on_node_down`] with the replica on a down node; a follower
//! whose leader is that replica wakes, and campaigns after a full election timeout without word from it.

use flotilla_raft::{Message, MessageType, StateRole};

use super::Peer;
use crate::message::{HibernateRequest, ReplicaMessage};

/// Whether a replica is asleep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Sleep {
    #[default]
    Awake,
    /// Asleep since it sent its followers hibernate requests.
    Leader,
    /// Asleep since it agreed to its leader's request.
    Follower,
}

#[derive(Default)]
pub(super) struct Hibernation {
    /// Ticks without a client request before a leader hibernates (0: never).
    pub(super) idle_ticks_max: u32,
    pub(super) sleep: Sleep,
    /// Ticks since the last client request.
    idle_ticks: u32,
    /// Fell asleep as the leader since `take_fell_asleep` last looked.
    fell_asleep: bool,
}

impl Hibernation {
    /// A replica opens asleep (when hibernation is on): a node starting 100K groups must not tick them all and
    /// hold 100K elections at once. The first message or request wakes it; a group with no leader elects one
    /// when a request or a campaign first reaches one of its replicas.
    pub(super) fn new(idle_ticks_max: u32) -> Hibernation {
        let sleep = if idle_ticks_max == 0 { Sleep::Awake } else { Sleep::Follower };
        Hibernation { idle_ticks_max, sleep, idle_ticks: 0, fell_asleep: false }
    }
}

impl Peer {
    /// Whether the replica is hibernating (it needs no ticks until something wakes it).
    pub fn is_hibernating(&self) -> bool {
        self.hibernation.sleep != Sleep::Awake
    }

    /// The node holding replica `replica_id` of this group is down (the node layer's liveness verdict). A follower
    /// asleep under that replica's leadership wakes, to elect another leader in time.
    pub fn on_node_down(&mut self, replica_id: u64) {
        if self.hibernation.sleep == Sleep::Follower && self.raw.raft.leader_id == replica_id {
            self.wake();
        }
    }

    /// Whether `message` wakes this replica. Anything does except a hibernate request and the heartbeat traffic
    /// of the current term between a sleeping replica and its leader or followers: a heartbeat sent before the
    /// request may arrive after it, and a woken follower whose leader sleeps would campaign for nothing; a woken
    /// leader's heartbeats (a read's round) are answered without waking anyone. Such messages are still stepped.
    pub(super) fn wakes(&self, message: &ReplicaMessage) -> bool {
        let raft = &self.raw.raft;
        match (message, self.hibernation.sleep) {
            (ReplicaMessage::Hibernate(_), _) => false,
            (ReplicaMessage::Raft(m), Sleep::Leader) => {
                !(m.msg_type() == MessageType::HeartbeatResponse && m.term == raft.term)
            }
            (ReplicaMessage::Raft(m), Sleep::Follower) => {
                !(m.msg_type() == MessageType::Heartbeat && m.term == raft.term && m.from == raft.leader_id)
            }
            _ => true,
        }
    }

    /// A client request: the replica wakes and its idle count restarts.
    pub(super) fn on_request(&mut self) {
        self.hibernation.idle_ticks = 0;
        self.wake();
    }

    /// Its node served many reads locally under this replica's grant: busy like a client request (a leader does
    /// not fall asleep, and its load trigger keeps counting them).
    pub fn on_local_reads(&mut self) {
        self.on_request();
    }

    /// Something happened: a sleeping replica wakes (and stays awake at least `idle_ticks_max` ticks: long enough
    /// for its heartbeats to bring back a replica that campaigned meanwhile).
    pub(super) fn wake(&mut self) {
        if self.hibernation.sleep != Sleep::Awake {
            self.hibernation.sleep = Sleep::Awake;
            self.hibernation.idle_ticks = 0;
            self.raw.resume_after_pause();
            metrics::counter!("flotilla_wakeups_total").increment(1);
        }
    }

    /// Another group's snapshot was refused on this node because this replica still holds its keys
    /// (`range_claims.rs`): it wakes, and tells the members it knows where its log stands (a heartbeat
    /// response), so that a leader that lists it catches it up (and it applies the split that moved the keys) —
    /// or, if it was removed and missed the news, members that do not list it answer with a removal notice (then
    /// its node destroys it, and the keys are free). A removed learner would otherwise never hear again: it
    /// never campaigns (`store-sim` seed 685).
    pub fn check_membership(&mut self) {
        self.wake();
        let (me, term) = (self.raw.raft.id, self.raw.raft.term);
        let others: Vec<u64> =
            self.descriptor.replicas.iter().map(|r| r.replica_id).filter(|&replica| replica != me).collect();
        for to in others {
            let mut probe = Message { to, from: me, term, ..Message::default() };
            probe.set_msg_type(MessageType::HeartbeatResponse);
            self.outbox.push(ReplicaMessage::Raft(probe));
        }
    }

    /// On a tick: a replica that may not campaign (a learner, or one whose applied configuration leaves it out)
    /// and has known no leader for two election timeouts asks its members where it stands
    /// (`Peer::check_membership`): one removed without hearing of it is told and destroyed, one whose leader
    /// fell asleep while it was down (it restarted knowing no leader) is caught up. It would otherwise wait
    /// forever, holding its keys and taking the asks its node routes through it (`store-sim` seed 173: a removed
    /// replica of the meta range that its node kept handing publications, which it lost).
    pub(super) fn ask_for_news_if_leaderless(&mut self) {
        let raft = &self.raw.raft;
        if raft.leader_id != 0 || raft.promotable() || raft.role != flotilla_raft::StateRole::Follower {
            self.leaderless_ticks = 0;
            return;
        }
        self.leaderless_ticks += 1;
        if self.asks_due(self.leaderless_ticks) {
            metrics::counter!("flotilla_membership_checks_leaderless_total").increment(1);
            self.check_membership();
        }
    }

    /// On a leader's tick: hibernates if it has been idle long enough and the group is settled.
    pub(super) fn maybe_hibernate(&mut self) {
        if self.hibernation.idle_ticks_max == 0
            || !self.is_leader()
            || self.descriptor.is_merging()
            || self.publication_pending()
        {
            return;
        }
        self.hibernation.idle_ticks = self.hibernation.idle_ticks.saturating_add(1);
        if self.hibernation.idle_ticks < self.hibernation.idle_ticks_max || !self.is_settled_leader() {
            return;
        }
        let raft = &self.raw.raft;
        let index = raft.raft_log.last_index();
        let log_term = raft.raft_log.term(index).expect("the last entry's term is known");
        for &to in raft.tracker.progress.keys().filter(|&&id| id != raft.id) {
            let request = HibernateRequest {
                from: raft.id,
                to,
                term: raft.term,
                index,
                log_term,
                commit: raft.raft_log.committed,
            };
            self.outbox.push(ReplicaMessage::Hibernate(request));
        }
        self.hibernation.sleep = Sleep::Leader;
        self.hibernation.fell_asleep = true;
        metrics::counter!("flotilla_hibernations_total").increment(1);
    }

    /// Whether this replica, leading, fell asleep since the last call (its group is cold: the merge trigger
    /// looks at it then).
    pub fn take_fell_asleep(&mut self) -> bool {
        std::mem::take(&mut self.hibernation.fell_asleep)
    }

    /// A leader with nothing pending whose followers all hold its whole, committed, applied log.
    fn is_settled_leader(&self) -> bool {
        let raft = &self.raw.raft;
        let log = &raft.raft_log;
        let last = log.last_index();
        self.no_writes_waiting()
            && self.reads.is_empty()
            && self.streams.is_idle()
            && raft.lead_transferee == 0
            && log.committed == last
            && log.applied == last
            && self.applied_index == last
            && log.term(last).ok() == Some(raft.term)
            && raft.tracker.progress.iter().all(|(&id, progress)| id == raft.id || progress.matched == last)
    }

    /// A leader's hibernate request: sleep too if this replica is exactly where the leader is.
    ///
    /// A follower whose log is the leader's (same last index and term) but that has not heard the latest commit
    /// index learns it from the request, as from a heartbeat: without commit broadcasts, the commit of a group's
    /// last write travels only with the next heartbeat or append, and the leader may fall asleep first (all
    /// followers hold its log). A learner, which never campaigns, would then never learn it (`store-sim` seed
    /// 752); a voter would wake the group with an election. Entries it then has to apply need no ticks: it sleeps
    /// with them handed out.
    pub(super) fn on_hibernate_request(&mut self, request: HibernateRequest) {
        let raft = &self.raw.raft;
        let log = &raft.raft_log;
        let log_is_leaders = raft.role == StateRole::Follower
            && request.term == raft.term
            && request.from == raft.leader_id
            && log.last_index() == request.index
            && log.term(request.index).ok() == Some(request.log_term);
        if log_is_leaders && log.committed < request.commit {
            let mut heartbeat = Message::new(MessageType::Heartbeat, request.from, raft.id, request.term);
            heartbeat.commit = request.commit;
            let _ = self.raw.step(heartbeat); // its answer does not wake the sleeping leader
        }
        let raft = &self.raw.raft;
        let in_step = log_is_leaders
            && raft.raft_log.committed == request.commit
            && self.no_writes_waiting()
            && self.reads.is_empty()
            && self.streams.is_idle()
            && !self.is_stranded(); // it asks for a snapshot on its ticks
        if in_step && self.hibernation.idle_ticks_max != 0 {
            self.hibernation.sleep = Sleep::Follower;
        }
    }
}
