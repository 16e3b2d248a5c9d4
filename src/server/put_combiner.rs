//! A node's plain puts to one group, combined across its connections (group commit where requests are routed):
//! while one combined write of a group is on its way, the puts for that group that arrive meanwhile queue up and
//! go together as the next one — one route, one forward, one proposal for all of them, however many
//! connections they came from. Under load each group has one combined write on its way from each node and the
//! next gathering; a lone put goes at once.
//!
//! Combining plain puts is safe: applying them together, in their order, takes effect at one moment within every
//! one's request. The queue of a group holds at most one batch's worth (`Config::batch_ops_max`,
//! `batch_bytes_max`); puts that do not fit go on their own.

use std::collections::HashMap;

use flotilla_raftstore::command::Op;
use flotilla_router::route::RouteError;
use parking_lot::Mutex;

/// The answers of one caller's puts, in their order.
pub type Answers = Vec<Result<(), RouteError>>;

/// The queues of puts per group.
pub struct PutCombiner {
    queues: Mutex<HashMap<u64, Queue>>,
    ops_max: usize,
    bytes_max: usize,
}

/// Puts waiting for a group's combined write on its way to finish.
#[derive(Default)]
struct Queue {
    /// A flusher is writing this group's batches (it takes the queue when its write is answered).
    flushing: bool,
    ops: Vec<Op>,
    bytes: usize,
    /// Each caller's count of `ops` (in order) and where its answers go.
    waiters: Vec<(usize, oneshot::Sender<Answers>)>,
}

/// What a caller does with its puts after [`PutCombiner::join`].
pub enum Joined {
    /// Queued: wait for the answers; `start_flusher` — no flusher runs for the group, start one.
    Queued { answers: oneshot::Receiver<Answers>, start_flusher: bool },
    /// They do not fit in the group's queue: write them on their own.
    Alone(Vec<Op>),
}

/// The callers whose puts a batch taken from a group's queue holds, in order: each with its count of puts.
pub struct Waiters(Vec<(usize, oneshot::Sender<Answers>)>);

impl PutCombiner {
    /// At most `ops_max` puts of `bytes_max` bytes of keys and values in one combined write.
    pub fn new(ops_max: usize, bytes_max: usize) -> PutCombiner {
        PutCombiner { queues: Mutex::new(HashMap::new()), ops_max, bytes_max }
    }

    /// Queues `ops` (plain puts whose keys the range of `group_id` holds, as routed) for the group's next
    /// combined write.
    pub fn join(&self, group_id: u64, ops: Vec<Op>) -> Joined {
        let bytes: usize = ops.iter().map(|op| op.key.len() + op.value.len()).sum();
        let mut queues = self.queues.lock();
        let queue = queues.entry(group_id).or_default();
        if queue.ops.len() + ops.len() > self.ops_max || queue.bytes + bytes > self.bytes_max {
            return Joined::Alone(ops);
        }
        let (sender, answers) = oneshot::channel();
        queue.waiters.push((ops.len(), sender));
        queue.ops.extend(ops);
        queue.bytes += bytes;
        let start_flusher = !std::mem::replace(&mut queue.flushing, true);
        Joined::Queued { answers, start_flusher }
    }

    /// The flusher of `group_id` takes what its queue holds; `None` when it is empty, and then the group has no
    /// flusher until the next [`PutCombiner::join`] starts one.
    pub fn take(&self, group_id: u64) -> Option<(Vec<Op>, Waiters)> {
        let mut queues = self.queues.lock();
        let queue = queues.get_mut(&group_id).expect("a flusher's group has a queue");
        if queue.ops.is_empty() {
            queues.remove(&group_id);
            return None;
        }
        queue.bytes = 0;
        Some((std::mem::take(&mut queue.ops), Waiters(std::mem::take(&mut queue.waiters))))
    }
}

impl Waiters {
    /// Gives each waiter its puts' answers (`answers`: one per put of the batch, in order).
    pub fn answer(self, answers: Answers) {
        assert_eq!(answers.len(), self.0.iter().map(|(count, _)| count).sum::<usize>(), "one answer per put");
        let mut answers = answers.into_iter();
        for (count, waiter) in self.0 {
            // (A waiter that gave up has dropped its receiver: nothing to do.)
            let _ = waiter.send(answers.by_ref().take(count).collect());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn puts(keys: &[&str]) -> Vec<Op> {
        keys.iter().map(|key| Op::put(key.as_bytes().to_vec(), b"v".to_vec())).collect()
    }

    #[test]
    fn puts_queued_meanwhile_go_as_one_batch_and_each_caller_gets_its_own_answers() {
        let combiner = PutCombiner::new(100, 1 << 20);
        let Joined::Queued { answers: first, start_flusher: true } = combiner.join(7, puts(&["a"])) else {
            panic!("the first put starts the flusher")
        };
        let (ops, waiters) = combiner.take(7).unwrap();
        assert_eq!(ops, puts(&["a"]));
        // While that batch is on its way, two callers queue for the next one; no second flusher.
        let Joined::Queued { answers: second, start_flusher: false } = combiner.join(7, puts(&["b", "c"])) else {
            panic!("queued behind the flusher")
        };
        let Joined::Queued { answers: third, start_flusher: false } = combiner.join(7, puts(&["d"])) else {
            panic!("queued behind the flusher")
        };
        waiters.answer(vec![Ok(())]);
        assert_eq!(first.recv().unwrap(), vec![Ok(())]);
        let (ops, waiters) = combiner.take(7).unwrap();
        assert_eq!(ops, puts(&["b", "c", "d"]));
        waiters.answer(vec![Ok(()), Err(RouteError::Timeout), Ok(())]);
        assert_eq!(second.recv().unwrap(), vec![Ok(()), Err(RouteError::Timeout)]);
        assert_eq!(third.recv().unwrap(), vec![Ok(())]);
        assert!(combiner.take(7).is_none(), "empty: the flusher ends");
        // The next put starts a flusher again.
        assert!(matches!(combiner.join(7, puts(&["e"])), Joined::Queued { start_flusher: true, .. }));
    }

    #[test]
    fn puts_that_do_not_fit_the_queue_go_alone_and_groups_queue_apart() {
        let combiner = PutCombiner::new(3, 1 << 20);
        assert!(matches!(combiner.join(1, puts(&["a", "b"])), Joined::Queued { start_flusher: true, .. }));
        assert!(matches!(combiner.join(1, puts(&["c", "d"])), Joined::Alone(ops) if ops == puts(&["c", "d"])));
        assert!(matches!(combiner.join(2, puts(&["c", "d"])), Joined::Queued { start_flusher: true, .. }));
        let bytes = PutCombiner::new(100, 5);
        assert!(matches!(bytes.join(1, puts(&["ab"])), Joined::Queued { .. }), "3 bytes");
        assert!(matches!(bytes.join(1, puts(&["cd"])), Joined::Alone(_)), "6 bytes: over 5");
    }
}
