//! ReadIndex requests a leader is confirming. Each request remembers the commit index when it arrived; a heartbeat
//! round carrying the request's context confirms it once a quorum acknowledges. Requests are answered in arrival
//! order: confirming one confirms every earlier one too (the later heartbeat round proves leadership at a later
//! moment).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

#[derive(Clone, Debug)]
pub struct ReadRequest {
    pub context: Bytes,
    /// The replica that asked (the leader itself, or a follower that forwarded a read).
    pub from: u64,
    pub index: u64,
    pub acks: BTreeSet<u64>,
}

#[derive(Default)]
pub struct ReadOnly {
    pending: BTreeMap<Bytes, usize>,
    queue: VecDeque<ReadRequest>,
    /// Number of requests popped from the front of `queue` so far; `pending` stores absolute positions.
    popped: usize,
}

impl ReadOnly {
    pub fn add_request(&mut self, index: u64, context: Bytes, from: u64, self_id: u64) {
        if self.pending.contains_key(&context) {
            return;
        }
        let position = self.popped + self.queue.len();
        self.pending.insert(context.clone(), position);
        self.queue.push_back(ReadRequest { context, from, index, acks: BTreeSet::from([self_id]) });
    }

    /// Records `from`'s acknowledgement of the heartbeat that carried `context`; returns the acks so far.
    pub fn receive_ack(&mut self, from: u64, context: &Bytes) -> Option<&BTreeSet<u64>> {
        let position = *self.pending.get(context)?;
        let request = &mut self.queue[position - self.popped];
        request.acks.insert(from);
        Some(&request.acks)
    }

    /// Removes and returns every request up to and including the one with `context`.
    pub fn advance(&mut self, context: &Bytes) -> Vec<ReadRequest> {
        let Some(&position) = self.pending.get(context) else { return Vec::new() };
        let count = position - self.popped + 1;
        let done: Vec<ReadRequest> = self.queue.drain(..count).collect();
        self.popped += count;
        for request in &done {
            self.pending.remove(&request.context);
        }
        done
    }

    /// The context of the newest request, carried by the next heartbeat round.
    pub fn last_pending_context(&self) -> Option<Bytes> {
        self.queue.back().map(|r| r.context.clone())
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirming_a_request_confirms_every_earlier_one() {
        let mut reads = ReadOnly::default();
        reads.add_request(5, Bytes::from_static(b"a"), 1, 1);
        reads.add_request(6, Bytes::from_static(b"b"), 2, 1);
        reads.add_request(7, Bytes::from_static(b"c"), 1, 1);
        assert_eq!(reads.receive_ack(2, &Bytes::from_static(b"b")).unwrap().len(), 2);
        let done = reads.advance(&Bytes::from_static(b"b"));
        assert_eq!(done.iter().map(|r| r.index).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(reads.len(), 1);
        assert!(reads.receive_ack(2, &Bytes::from_static(b"a")).is_none(), "already answered");
        let done = reads.advance(&Bytes::from_static(b"c"));
        assert_eq!(done.len(), 1);
        assert_eq!(reads.len(), 0);
    }
}
