//! The simulator's clients: operations issued (gets, puts, deletes, compare-and-sets), attempts sent to the
//! node believed to lead — most gets first on that node's local read path — answers taken and judged, retries
//! after a definite "nothing happened", and every operation recorded in the history the checker reads.

use flotilla_raftstore::command::{Command, Op};
use flotilla_raftstore::peer::PeerError;
use flotilla_raftstore::store::{Mailboxes, PeerMsg, ReadRequest, ReadResult};

use super::ranges::route;
use super::{Answered, Applied, Attempt, ClientOp, Reply, Sim, SimResult};
use crate::linearizability::{Call, Operation, Outcome};

impl Sim {
    pub(super) fn timestamp(&mut self) -> u64 {
        self.now += 1;
        self.now
    }

    pub(super) fn issue(&mut self, client: usize) {
        // Mostly a key of the focused group, if any (as the simulation knows its range).
        let focused: Vec<&Vec<u8>> = match self.focus {
            Some((group, until)) if until > self.step && self.rng.chance_per_mille(800) => (self.keys.iter())
                .filter(|key| route(&self.ranges, key).is_some_and(|range| range.group_id == group))
                .collect(),
            _ => Vec::new(),
        };
        let key = match focused.is_empty() {
            false => focused[self.rng.below(focused.len() as u64) as usize].clone(),
            true => self.keys[self.rng.below(self.keys.len() as u64) as usize].clone(),
        };
        let value = self.next_value;
        self.next_value += 1;
        let (call, command_op) = match self.rng.below(10) {
            0..=3 => (Call::Get, None),
            4..=6 => (Call::Put(value), Some(Op::put(key.clone(), value.to_le_bytes().to_vec()))),
            7 => (Call::Delete, Some(Op::delete(key.clone()))),
            _ => {
                // Compare against a value recently written (or absence), so both outcomes happen.
                let expected =
                    (self.rng.below(3) > 0 && value > 1).then(|| value - 1 - self.rng.below(value.min(4) - 1));
                let op = Op::compare_and_set(
                    key.clone(),
                    expected.map(|v| v.to_le_bytes().to_vec()),
                    value.to_le_bytes().to_vec(),
                );
                (Call::CompareAndSet { expected, new: Some(value) }, Some(op))
            }
        };
        let command = command_op.map(|op| Command::write(None, vec![op]));
        let operation = Operation { client: client as u64, key, call, call_time: self.timestamp(), result: None };
        self.ops.push(ClientOp {
            operation,
            command,
            deadline: self.step + 600,
            retry_at: Some(self.step),
            done: false,
        });
        self.clients[client] = Some(self.ops.len() - 1);
    }

    /// Sends a new attempt of operation `index` to the node its client believes leads the group its table routes
    /// the key to: a request in the replica's mailbox, routed with the range's epoch, as the `Db` sends it.
    pub(super) fn attempt(&mut self, index: usize) -> SimResult<()> {
        let client = self.ops[index].operation.client as usize;
        let key = self.ops[index].operation.key.clone();
        let Some(range) = route(&self.tables[client], &key).or_else(|| route(&self.ranges, &key)).cloned() else {
            self.ops[index].retry_at = Some(self.step + self.rng.range(2, 5)); // a split's part not learned yet
            return Ok(());
        };
        let (group, version) = (range.group_id, range.epoch().version);
        let steered = match self.focus {
            Some((focused, until)) if focused == group && until > self.step => {
                self.steered.get(client).copied().flatten()
            }
            _ => None,
        };
        // To a node whose pollers alone stand still only reads are steered (served locally, or not at all):
        // writes look for the new leader, so that there is something new for a stale read to miss.
        let steered = steered.filter(|&node| {
            let node = &self.nodes[node as usize - 1];
            self.ops[index].command.is_none() || !(node.pollers_only && node.paused_until > self.step)
        });
        let node = match steered.or_else(|| self.hints.get(&(client, group)).copied()) {
            Some(node) => node,
            None => self.rng.range(1, self.nodes.len() as u64),
        };
        self.ops[index].retry_at = None;
        let position = (node - 1) as usize;
        if self.trace {
            println!(
                "step {} client {client}: op {index} {:?} on key {key:?} -> node {node}, group {group} version {version}",
                self.step, self.ops[index].operation.call
            );
        }
        // Most reads first try the node's local read path, as the `Db` does: served at once if the replica's
        // published grant holds on the node's clock.
        if self.ops[index].command.is_none() && self.rng.chance_per_mille(700) {
            if let Some(value) = self.local_read(position, group, version, &key)? {
                self.report.local_reads += 1;
                self.report.local_reads_stalled += u64::from(!self.is_up(position));
                let value = value.map(|v| u64::from_le_bytes(v.as_slice().try_into().expect("8-byte values")));
                let at = self.timestamp();
                self.ops[index].operation.result = Some((Outcome::Got(value), at));
                self.finish(index);
                return Ok(());
            }
        }
        let (message, reply) = match &self.ops[index].command {
            Some(command) => {
                let (reply, answer) = oneshot::channel();
                let command = Command { epoch: Some(range.epoch()), ..command.clone() };
                (PeerMsg::Write { command, reply }, Reply::Write(answer))
            }
            None => {
                let (reply, answer) = oneshot::channel();
                let request = ReadRequest::Get(key);
                (PeerMsg::Read { request, reply }, Reply::Read(answer))
            }
        };
        // Down, or no replica of the group there: try another node a little later.
        let sent = self.nodes[position]
            .running
            .as_ref()
            .is_some_and(|running| running.store.mailboxes().send(group, message).is_ok());
        if !sent {
            self.hints.insert((client, group), self.rng.range(1, self.nodes.len() as u64));
            self.ops[index].retry_at = Some(self.step + self.rng.range(2, 5));
            return Ok(());
        }
        self.attempts.push(Attempt { op: index, node, group_id: group, reply });
        // Half the time the node is busy: the request waits in the mailbox for the node's next round, with what
        // else comes meanwhile — a leader then takes several writes in one handling (one entry for them all:
        // `peer/propose.rs`).
        if self.rng.chance_per_mille(500) {
            return Ok(());
        }
        self.drive(position)
    }

    /// Whether node `position`'s published grant for group `group_id` holds now for a caller routing by version
    /// `version` of its range (it runs, and has not failed).
    pub(super) fn grant_holds(&self, position: usize, group_id: u64, version: u64) -> bool {
        self.nodes[position].running.as_ref().is_some_and(|running| {
            let reader = running.store.local_reader();
            reader.holds(&reader.lease(group_id), version) && running.store.failure().is_none()
        })
    }

    /// A read of `key` served by node `position`'s local read path, if its grant for the group holds now for
    /// version `version` of its range (a stopped node serves nothing, nor a paused one unless only its pollers
    /// stand still).
    pub(super) fn local_read(
        &self,
        position: usize,
        group_id: u64,
        version: u64,
        key: &[u8],
    ) -> SimResult<Option<Option<Vec<u8>>>> {
        let node = &self.nodes[position];
        let callers_run = node.paused_until <= self.step || node.pollers_only;
        if !callers_run || !self.grant_holds(position, group_id, version) {
            return Ok(None);
        }
        let running = node.running.as_ref().expect("a grant holds only on a running node");
        // Counted toward the group's load, as the `Db`'s and a server's local reads are.
        let reader = running.store.local_reader();
        reader.count_read(&reader.lease(group_id), group_id, key, running.store.mailboxes());
        running.kv.get(key).map(Some).map_err(|error| format!("node {}: a local read failed: {error}", node.id))
    }

    /// Takes every answer that came: to client attempts (an attempt whose node went down, its reply channel
    /// closed, has an unknown outcome) and to membership proposals.
    pub(super) fn take_replies(&mut self) {
        let mut at = 0;
        while at < self.attempts.len() {
            let outcome = match &self.attempts[at].reply {
                Reply::Write(answer) => match answer.try_recv() {
                    Ok(result) => Some(Some(result.map(Answered::Written))),
                    Err(oneshot::TryRecvError::Empty) => None,
                    Err(oneshot::TryRecvError::Disconnected) => Some(None),
                },
                Reply::Read(answer) => match answer.try_recv() {
                    Ok(result) => Some(Some(result.map(Answered::Read))),
                    Err(oneshot::TryRecvError::Empty) => None,
                    Err(oneshot::TryRecvError::Disconnected) => Some(None),
                },
            };
            match outcome {
                None => at += 1,
                Some(answer) => {
                    let attempt = self.attempts.swap_remove(at);
                    self.on_answer(attempt.op, attempt.node, attempt.group_id, answer);
                }
            }
        }
        let mut applied = 0;
        self.membership_replies.retain(|answer| match answer.try_recv() {
            Ok(result) => {
                applied += (result == Ok(Applied::Done)) as u64;
                false
            }
            Err(oneshot::TryRecvError::Empty) => true,
            Err(oneshot::TryRecvError::Disconnected) => false,
        });
        self.report.membership_changes_applied += applied;
        self.take_split_replies();
        self.take_merge_replies();
    }

    /// An attempt's answer (`None`: its node went away without one).
    pub(super) fn on_answer(
        &mut self,
        index: usize,
        node: u64,
        group: u64,
        answer: Option<Result<Answered, PeerError>>,
    ) {
        if self.trace {
            println!("step {} node {node}: answer to op {index}: {answer:?}", self.step);
        }
        if self.ops[index].done {
            return;
        }
        let Some(answer) = answer else {
            self.finish(index); // may or may not have happened: the history keeps it unknown
            return;
        };
        let call = self.ops[index].operation.call.clone();
        let outcome = match (&call, answer) {
            (Call::Get, Ok(Answered::Read(ReadResult::Value(value)))) => {
                Some(Outcome::Got(value.map(|v| u64::from_le_bytes(v.as_slice().try_into().expect("8-byte values")))))
            }
            (Call::CompareAndSet { .. }, Ok(Answered::Written(Applied::Done))) => Some(Outcome::Swapped(true)),
            (Call::CompareAndSet { .. }, Ok(Answered::Written(Applied::PreconditionFailed { .. }))) => {
                Some(Outcome::Swapped(false))
            }
            (_, Ok(Answered::Written(Applied::Done))) => Some(Outcome::Done),
            (_, Err(PeerError::OutcomeUnknown | PeerError::Stopped(_))) => {
                self.finish(index); // may or may not have happened: the history keeps it unknown
                return;
            }
            (_, Err(PeerError::Range(_))) => {
                // The group no longer holds the key as the client's table says (a split came first): nothing
                // happened; the client learns the ranges anew (as the `Db` rebuilds its table) and routes again.
                self.refresh_ranges();
                let client = self.ops[index].operation.client as usize;
                self.tables[client] = self.ranges.clone();
                self.report.reroutes += 1;
                None
            }
            (_, Err(PeerError::NotLeader { leader })) => {
                let client = self.ops[index].operation.client as usize;
                let leader_node = self.replica_nodes.get(&(group, leader)).copied();
                let next = leader_node.unwrap_or_else(|| self.rng.range(1, self.nodes.len() as u64));
                self.hints.insert((client, group), next);
                None
            }
            // Definitely did not take effect (dropped, busy, refused): try again.
            _ => None,
        };
        match outcome {
            Some(outcome) => {
                let at = self.timestamp();
                self.ops[index].operation.result = Some((outcome, at));
                self.finish(index);
            }
            None => self.ops[index].retry_at = Some(self.step + self.rng.range(1, 10)),
        }
    }

    pub(super) fn finish(&mut self, index: usize) {
        self.ops[index].done = true;
        let client = self.ops[index].operation.client as usize;
        if self.clients[client] == Some(index) {
            self.clients[client] = None;
        }
    }

    /// Takes the answers that came; retries due attempts; times out operations past their deadline (their
    /// outcome stays unknown).
    pub(super) fn clients_step(&mut self, issue_new: bool) -> SimResult<()> {
        self.take_replies();
        for client in 0..self.clients.len() {
            match self.clients[client] {
                Some(index) if self.step >= self.ops[index].deadline => {
                    self.finish(index); // no answer in time: unknown
                }
                Some(index) if self.ops[index].retry_at.is_some_and(|at| self.step >= at) => self.attempt(index)?,
                None if issue_new && self.rng.chance_per_mille(100) => {
                    self.issue(client);
                    let index = self.clients[client].expect("just issued");
                    self.attempt(index)?;
                }
                _ => {}
            }
        }
        self.take_replies();
        Ok(())
    }
}
