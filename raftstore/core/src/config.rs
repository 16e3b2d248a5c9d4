//! Configuration of one Raft replica. Every knob has a default and a reason; `validate()` rejects nonsense with a
//! typed error instead of misbehaving later.

use crate::error::{Error, Result};

/// How a leader confirms that it is still the leader before serving a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// ReadIndex: every read (or batch of reads) is confirmed by a heartbeat round acknowledged by a quorum.
    Safe,
    /// Leader lease: while a quorum has acknowledged a heartbeat or append sent less than
    /// `election_timeout_ticks - lease_margin_ticks` ticks ago, the leader answers reads without a round trip.
    /// Requires `check_quorum`. Safe only if tick rates of the replicas differ by less than the margin allows
    /// (see the crate docs, "Leases and clocks"); otherwise falls back to `Safe` for that read.
    LeaseBased,
}

/// Configuration of one replica of one group.
#[derive(Clone, Debug)]
pub struct Config {
    /// This replica's id; non-zero, unique within the group.
    pub id: u64,
    /// A follower that hears nothing from a leader for a random number of ticks in
    /// `[election_timeout_ticks, 2 * election_timeout_ticks)` starts an election. Default 10.
    pub election_timeout_ticks: u64,
    /// A leader sends heartbeats every this many ticks. Must be below `election_timeout_ticks`. Default 2.
    pub heartbeat_interval_ticks: u64,
    /// The index the state machine had applied when this replica was (re)started. Default 0.
    pub applied_index: u64,
    /// Upper bound on the entry bytes of one append message (at least one entry is always sent). Default 1 MiB.
    pub append_message_bytes_max: u64,
    /// Upper bound on append messages in flight to one follower while replicating. Default 256.
    pub inflight_messages_max: usize,
    /// Upper bound on entry bytes in flight to one follower while replicating. Default 16 MiB.
    pub inflight_bytes_max: u64,
    /// Upper bound on the bytes of entries the leader has appended but not yet committed; proposals beyond it are
    /// dropped with `DropReason::UncommittedBytesFull` (backpressure, bounded memory). Default 64 MiB.
    pub uncommitted_bytes_max: u64,
    /// Upper bound on committed-entry bytes handed out in one `Ready`. Default 16 MiB.
    pub committed_bytes_max_per_ready: u64,
    /// Reads that wait for a new leader's first commit in its term; more are dropped. Default 4096.
    pub pending_reads_max: usize,
    /// A leader that has not heard from a quorum within an election timeout steps down; followers that heard from a
    /// leader within an election timeout ignore vote requests. Default true.
    pub check_quorum: bool,
    /// Candidates first ask whether they could win (without raising terms), so a partitioned node that rejoins
    /// does not depose a healthy leader. Default true.
    pub pre_vote: bool,
    /// How reads are confirmed. Default `Safe`.
    pub read_mode: ReadMode,
    /// How much shorter than an election timeout a leader lease is, in ticks, to absorb clock-rate drift.
    /// Default 2 (of 10): safe while tick rates differ by less than about 10 %. Must be below
    /// `election_timeout_ticks`.
    pub lease_margin_ticks: u64,
    /// With leases: whether the replica sits out votes for an election timeout after it starts, as if in a
    /// leader's lease (before stopping it may have acknowledged a leader that still counts on it). Default true.
    /// Set it false only for a replica whose durable term has never had a leader it could have acknowledged
    /// (a fresh one): acknowledgements are sent only once their term is durable, so such a replica made no
    /// promise.
    pub quiet_on_start: bool,
    /// When the commit index moves, the leader sends every follower an append even if it has no new entries
    /// for it, so followers learn the commit index (and apply) at once. Default true. With false, followers
    /// learn it from the next append or heartbeat instead (within `heartbeat_interval_ticks`), which nearly
    /// halves the messages of a write when each group has one write in flight (thousands of active groups);
    /// clients are unaffected, as the leader applies and answers at once. The raftstore sets it false.
    pub commit_broadcast: bool,
    /// A leader's periodic heartbeat skips a follower it sent an append to within the last
    /// `heartbeat_interval_ticks`: that append did a heartbeat's work (it resets the follower's election timer,
    /// carries the commit index, and its answer counts for check-quorum and the lease). Never while reads wait
    /// for a heartbeat round to confirm them. Default false. With every group busy, heartbeats and their answers
    /// were a fifth of the messages; the raftstore sets it true.
    pub heartbeats_skip_after_append: bool,
    /// Responses that may be sent only once a `Ready` is persisted (append and vote responses) are handed out in
    /// that Ready's `messages_after_persist`, for the caller to send when its write is durable, instead of being
    /// held by the core until `on_persisted` and released in a later Ready. Default false. With true, the thread
    /// that completes the write can send them at once, and a follower need not be scheduled just to release
    /// its answer (see `RawNode::needs_prompt_persisted`); the raftstore sets it true.
    pub persisted_messages_in_ready: bool,
    /// Seed of the generator that randomizes election timeouts. Give each replica a different one.
    pub random_seed: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            id: 0,
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 2,
            applied_index: 0,
            append_message_bytes_max: 1 << 20,
            inflight_messages_max: 256,
            inflight_bytes_max: 16 << 20,
            uncommitted_bytes_max: 64 << 20,
            committed_bytes_max_per_ready: 16 << 20,
            pending_reads_max: 4096,
            check_quorum: true,
            pre_vote: true,
            read_mode: ReadMode::Safe,
            lease_margin_ticks: 2,
            quiet_on_start: true,
            commit_broadcast: true,
            heartbeats_skip_after_append: false,
            persisted_messages_in_ready: false,
            random_seed: 0,
        }
    }
}

impl Config {
    /// The default configuration for replica `id`, seeded with its id.
    pub fn new(id: u64) -> Config {
        Config { id, random_seed: id, ..Config::default() }
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |why: &str| Err(Error::Config(why.to_string()));
        if self.id == 0 {
            return fail("id must be non-zero");
        }
        if self.heartbeat_interval_ticks == 0 {
            return fail("heartbeat_interval_ticks must be at least 1");
        }
        if self.election_timeout_ticks <= self.heartbeat_interval_ticks {
            return fail("election_timeout_ticks must be greater than heartbeat_interval_ticks");
        }
        if self.inflight_messages_max == 0 || self.inflight_bytes_max == 0 {
            return fail("inflight_messages_max and inflight_bytes_max must be at least 1");
        }
        if self.append_message_bytes_max == 0 || self.committed_bytes_max_per_ready == 0 {
            return fail("append_message_bytes_max and committed_bytes_max_per_ready must be at least 1");
        }
        if self.uncommitted_bytes_max == 0 {
            return fail("uncommitted_bytes_max must be at least 1");
        }
        if self.read_mode == ReadMode::LeaseBased && !self.check_quorum {
            return fail("read_mode LeaseBased requires check_quorum");
        }
        if self.lease_margin_ticks >= self.election_timeout_ticks {
            return fail("lease_margin_ticks must be below election_timeout_ticks");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_nonsense_is_rejected() {
        assert!(Config::new(1).validate().is_ok());
        assert!(Config::default().validate().is_err(), "id 0");
        let bad = [
            Config { heartbeat_interval_ticks: 0, ..Config::new(1) },
            Config { election_timeout_ticks: 2, ..Config::new(1) },
            Config { inflight_messages_max: 0, ..Config::new(1) },
            Config { read_mode: ReadMode::LeaseBased, check_quorum: false, ..Config::new(1) },
            Config { lease_margin_ticks: 10, ..Config::new(1) },
            Config { uncommitted_bytes_max: 0, ..Config::new(1) },
        ];
        for config in bad {
            assert!(matches!(config.validate(), Err(Error::Config(_))), "{config:?}");
        }
    }
}
