//! A linearizability checker for key-value histories: the store simulator's judge of what clients saw.
//!
//! A history is every client operation with its call time, and its outcome and return time if the client got an
//! answer. Operations on different keys are independent, so each key's sub-history is checked alone (with
//! single-key operations, a history is linearizable iff every key's is). Each key is a register holding
//! `Option<Value>` (values are unique per write, so a read names the write it saw): `Get`, `Put`, `Delete`, and a
//! compare-and-set.
//!
//! **Unknown outcomes.** A client that timed out does not know whether its operation took effect. Such an operation
//! is recorded with no outcome and no return time: a write may take effect at any point after its call, or never;
//! a timed-out read constrains nothing and is dropped; an unknown compare-and-set takes effect iff its comparison
//! holds at the point chosen. Never record a timeout as a failure: that would accuse the store of losing writes it
//! may well have made.
//!
//! **Search.** Wing & Gong's algorithm with Lowe's memoisation: walk the events in time order, tentatively
//! linearizing any operation whose call has been seen and that the model accepts, backtracking when a return is
//! reached whose operation was not linearized; states already explored (the set of linearized operations plus the
//! register's value) are cut. Exponential in the worst case, so a step budget bounds it: running out is reported
//! as inconclusive, never as success. [`check_brute_force`] tries every order, for cross-checking on tiny histories.

use std::collections::{BTreeMap, HashSet};

pub type Value = u64;

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Get,
    Put(Value),
    Delete,
    /// Sets `new` if the current value is `expected` (`None`: absent).
    CompareAndSet {
        expected: Option<Value>,
        new: Option<Value>,
    },
}

/// What the client was told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Got(Option<Value>),
    /// A put or delete took effect.
    Done,
    /// Whether a compare-and-set's comparison held (and so its write took effect).
    Swapped(bool),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub client: u64,
    pub key: Vec<u8>,
    pub call: Call,
    pub call_time: u64,
    /// `None`: the client never learned the outcome (timeout, lost connection, crash).
    pub result: Option<(Outcome, u64)>,
}

/// Why a history is not known to be linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order of this key's operations explains what the clients saw.
    Violation {
        key: Vec<u8>,
        operations: Vec<Operation>,
    },
    /// The search ran out of its step budget on this key.
    Inconclusive {
        key: Vec<u8>,
        operations: usize,
    },
}

/// The register: `Some(next state)` if `operation` may take effect in `state`.
fn step(state: Option<Value>, operation: &Operation) -> Option<Option<Value>> {
    let outcome = operation.result.as_ref().map(|(outcome, _)| outcome);
    match (&operation.call, outcome) {
        (Call::Get, Some(Outcome::Got(seen))) => (*seen == state).then_some(state),
        (Call::Get, None) => Some(state),
        (Call::Put(value), None | Some(Outcome::Done)) => Some(Some(*value)),
        (Call::Delete, None | Some(Outcome::Done)) => Some(None),
        (Call::CompareAndSet { expected, new }, Some(Outcome::Swapped(true))) => (state == *expected).then_some(*new),
        (Call::CompareAndSet { expected, .. }, Some(Outcome::Swapped(false))) => (state != *expected).then_some(state),
        (Call::CompareAndSet { expected, new }, None) => Some(if state == *expected { *new } else { state }),
        _ => None, // an outcome that does not fit the call cannot be explained
    }
}

fn return_time(operation: &Operation) -> u64 {
    operation.result.as_ref().map_or(u64::MAX, |(_, time)| *time)
}

/// Checks every key's sub-history; `steps_per_key_max` bounds the search on each key.
pub fn check(history: &[Operation], steps_per_key_max: u64) -> Verdict {
    let mut by_key: BTreeMap<&[u8], Vec<Operation>> = BTreeMap::new();
    for operation in history {
        // A read without an outcome constrains nothing.
        if operation.call == Call::Get && operation.result.is_none() {
            continue;
        }
        by_key.entry(&operation.key).or_default().push(operation.clone());
    }
    for (key, operations) in by_key {
        match check_key(&operations, steps_per_key_max) {
            Some(true) => {}
            Some(false) => return Verdict::Violation { key: key.to_vec(), operations },
            None => return Verdict::Inconclusive { key: key.to_vec(), operations: operations.len() },
        }
    }
    Verdict::Linearizable
}

/// One call or return event in the doubly linked list the search lifts events out of.
#[derive(Clone, Copy)]
struct Event {
    operation: usize,
    is_call: bool,
    /// For a call: the index of its return event.
    matching: usize,
    previous: usize,
    next: usize,
}

/// WGL with memoisation on one key. `None`: out of steps.
fn check_key(operations: &[Operation], steps_max: u64) -> Option<bool> {
    // Events in time order; at equal times calls come first, so operations meeting at an instant count as
    // concurrent (never a false violation; an operation answered in the instant it was called stays valid).
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * operations.len());
    for (i, operation) in operations.iter().enumerate() {
        order.push((operation.call_time, true, i));
        order.push((return_time(operation), false, i));
    }
    order.sort_by_key(|&(time, is_call, i)| (time, !is_call, i));
    // Slot 0 is the list's head sentinel; events live at 1..=2n.
    let head = 0;
    let mut events = vec![Event { operation: usize::MAX, is_call: false, matching: 0, previous: 0, next: 1 }];
    let mut return_slot = vec![0; operations.len()];
    for (position, &(_, is_call, operation)) in order.iter().enumerate() {
        let slot = position + 1;
        events.push(Event { operation, is_call, matching: 0, previous: slot - 1, next: slot + 1 });
        if !is_call {
            return_slot[operation] = slot;
        }
    }
    let end = events.len();
    events.last_mut().expect("at least the head").next = end;
    for event in events.iter_mut().skip(1) {
        if event.is_call {
            event.matching = return_slot[event.operation];
        }
    }
    let lift = |events: &mut Vec<Event>, call: usize| {
        for slot in [call, events[call].matching] {
            let Event { previous, next, .. } = events[slot];
            events[previous].next = next;
            if next < end {
                events[next].previous = previous;
            }
        }
    };
    let unlift = |events: &mut Vec<Event>, call: usize| {
        for slot in [events[call].matching, call] {
            let Event { previous, next, .. } = events[slot];
            events[previous].next = slot;
            if next < end {
                events[next].previous = slot;
            }
        }
    };
    let words = operations.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Option<Value>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<Value>)> = Vec::new();
    let mut state: Option<Value> = None;
    let mut entry = events[head].next;
    let mut steps = 0u64;
    loop {
        if events[head].next == end {
            return Some(true);
        }
        steps += 1;
        if steps > steps_max {
            return None;
        }
        if entry == end {
            // Cannot happen: every call's return follows it in the list, and reaching a return backtracks.
            unreachable!("walked past the last event without meeting a return");
        }
        let event = events[entry];
        if event.is_call {
            if let Some(next_state) = step(state, &operations[event.operation]) {
                let (word, bit) = (event.operation / 64, 1u64 << (event.operation % 64));
                linearized[word] |= bit;
                if seen.insert((linearized.clone(), next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    lift(&mut events, entry);
                    entry = events[head].next;
                    continue;
                }
                linearized[word] &= !bit;
            }
            entry = event.next;
        } else {
            // A return whose operation is not linearized: undo the last choice and try the next candidate.
            let Some((call, previous_state)) = stack.pop() else { return Some(false) };
            state = previous_state;
            let operation = events[call].operation;
            linearized[operation / 64] &= !(1u64 << (operation % 64));
            unlift(&mut events, call);
            entry = events[call].next;
        }
    }
}

/// Tries every subset of the unknown-outcome operations and every order that respects real time. Only for tiny
/// histories (it is factorial): the cross-check of [`check`].
pub fn check_brute_force(history: &[Operation]) -> bool {
    let operations: Vec<&Operation> = history.iter().filter(|o| !(o.call == Call::Get && o.result.is_none())).collect();
    let mut by_key: BTreeMap<&[u8], Vec<&Operation>> = BTreeMap::new();
    for operation in operations {
        by_key.entry(&operation.key).or_default().push(operation);
    }
    by_key.values().all(|operations| {
        let mut used = vec![false; operations.len()];
        let mut order = Vec::new();
        explore(operations, &mut used, &mut order)
    })
}

/// Runs operations one after another on a register, checking each outcome: the brute force's own model, written
/// apart from [`step`] so that the cross-check also covers the model.
fn replay<'a>(operations: impl Iterator<Item = &'a Operation>) -> bool {
    let mut register: Option<Value> = None;
    for operation in operations {
        let outcome = operation.result.as_ref().map(|(outcome, _)| outcome.clone());
        match &operation.call {
            Call::Get => {
                if outcome.is_some_and(|seen| seen != Outcome::Got(register)) {
                    return false;
                }
            }
            Call::Put(_) | Call::Delete => {
                if outcome.is_some_and(|o| o != Outcome::Done) {
                    return false;
                }
                register = match operation.call {
                    Call::Put(value) => Some(value),
                    _ => None,
                };
            }
            Call::CompareAndSet { expected, new } => {
                let holds = register == *expected;
                if outcome.is_some_and(|o| o != Outcome::Swapped(holds)) {
                    return false;
                }
                if holds {
                    register = *new;
                }
            }
        }
    }
    true
}

fn explore(operations: &[&Operation], used: &mut [bool], order: &mut Vec<usize>) -> bool {
    if operations.iter().enumerate().all(|(i, o)| used[i] || o.result.is_none()) {
        // Every operation with a known outcome is placed (unplaced unknown ones never took effect): replay.
        if replay(order.iter().map(|&i| operations[i])) {
            return true;
        }
    }
    for candidate in 0..operations.len() {
        // Next may be any unplaced operation that no other unplaced operation finished before.
        // (An operation precedes another only if it returned strictly before the other was called, as in `check`.)
        let minimal = !used[candidate]
            && (0..operations.len()).all(|other| {
                other == candidate || used[other] || return_time(operations[other]) >= operations[candidate].call_time
            });
        if minimal {
            used[candidate] = true;
            order.push(candidate);
            let found = explore(operations, used, order);
            order.pop();
            used[candidate] = false;
            if found {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, call: Call, call_time: u64, result: Option<(Outcome, u64)>) -> Operation {
        Operation { client, key: b"k".to_vec(), call, call_time, result }
    }

    fn verdict(history: &[Operation]) -> bool {
        let fast = check(history, 1_000_000);
        let slow = check_brute_force(history);
        assert_eq!(fast == Verdict::Linearizable, slow, "the checkers disagree on {history:?}");
        slow
    }

    #[test]
    fn a_read_must_see_the_latest_completed_write() {
        let write = op(1, Call::Put(1), 0, Some((Outcome::Done, 10)));
        assert!(verdict(&[write.clone(), op(2, Call::Get, 20, Some((Outcome::Got(Some(1)), 30)))]));
        assert!(
            !verdict(&[write.clone(), op(2, Call::Get, 20, Some((Outcome::Got(None), 30)))]),
            "stale read after the write returned"
        );
        assert!(verdict(&[write, op(2, Call::Get, 5, Some((Outcome::Got(None), 30)))]), "concurrent: may see either");
    }

    #[test]
    fn an_operation_answered_in_the_instant_it_was_called_is_fine() {
        let history = [
            op(1, Call::Delete, 5, Some((Outcome::Done, 151))),
            op(2, Call::Get, 387, Some((Outcome::Got(None), 387))),
        ];
        assert!(verdict(&history));
        assert!(!verdict(&[
            op(1, Call::Put(3), 0, Some((Outcome::Done, 10))),
            op(2, Call::Get, 20, Some((Outcome::Got(None), 20)))
        ]));
    }

    #[test]
    fn reads_may_not_go_back_in_time() {
        let history = [
            op(1, Call::Put(1), 0, Some((Outcome::Done, 100))),
            op(2, Call::Get, 10, Some((Outcome::Got(Some(1)), 20))),
            op(3, Call::Get, 30, Some((Outcome::Got(None), 40))),
        ];
        assert!(!verdict(&history), "once a read saw the write, a later read cannot miss it");
    }

    #[test]
    fn an_unknown_write_may_or_may_not_have_happened_but_only_after_its_call() {
        let unknown = op(1, Call::Put(7), 10, None);
        assert!(verdict(&[unknown.clone(), op(2, Call::Get, 20, Some((Outcome::Got(Some(7)), 30)))]));
        assert!(verdict(&[unknown.clone(), op(2, Call::Get, 20, Some((Outcome::Got(None), 30)))]));
        assert!(
            !verdict(&[unknown, op(2, Call::Get, 0, Some((Outcome::Got(Some(7)), 5)))]),
            "seen before it was called"
        );
    }

    #[test]
    fn compare_and_set_outcomes_must_match_the_value_at_their_point() {
        let put = op(1, Call::Put(1), 0, Some((Outcome::Done, 10)));
        let cas = |result| op(2, Call::CompareAndSet { expected: Some(1), new: Some(2) }, 20, result);
        assert!(verdict(&[
            put.clone(),
            cas(Some((Outcome::Swapped(true), 30))),
            op(3, Call::Get, 40, Some((Outcome::Got(Some(2)), 50)))
        ]));
        assert!(!verdict(&[put.clone(), cas(Some((Outcome::Swapped(false), 30)))]), "the comparison held");
        // An unknown compare-and-set whose comparison held took effect if it happened at all.
        assert!(verdict(&[put.clone(), cas(None), op(3, Call::Get, 40, Some((Outcome::Got(Some(2)), 50)))]));
        assert!(verdict(&[put.clone(), cas(None), op(3, Call::Get, 40, Some((Outcome::Got(Some(1)), 50)))]));
        // One whose comparison failed wrote nothing, wherever it is placed.
        let failing = op(2, Call::CompareAndSet { expected: Some(5), new: Some(2) }, 20, None);
        assert!(!verdict(&[put, failing, op(3, Call::Get, 40, Some((Outcome::Got(Some(2)), 50)))]));
    }

    #[test]
    fn keys_are_independent_and_a_violation_names_its_key() {
        let mut other = op(1, Call::Get, 0, Some((Outcome::Got(Some(9)), 5)));
        other.key = b"other".to_vec();
        let good = op(2, Call::Put(1), 0, Some((Outcome::Done, 5)));
        match check(&[good, other], 1000) {
            Verdict::Violation { key, operations } => assert_eq!((key, operations.len()), (b"other".to_vec(), 1)),
            verdict => panic!("expected a violation on `other`, got {verdict:?}"),
        }
    }

    #[test]
    fn running_out_of_steps_is_inconclusive_not_success() {
        let history: Vec<Operation> = (0..12)
            .map(|i| op(i, Call::Put(i), 0, None))
            .chain([op(99, Call::Get, 1, Some((Outcome::Got(Some(3)), 2)))])
            .collect();
        assert!(matches!(check(&history, 5), Verdict::Inconclusive { .. }));
        assert_eq!(check(&history, 1_000_000), Verdict::Linearizable);
    }
}
