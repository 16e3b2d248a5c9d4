//! Raft's safety properties, checked against every replica after every simulator step.
//!
//! - **Election safety**: at most one leader per term.
//! - **Log matching**: if two logs hold an entry with the same index and term, the logs are identical up to it.
//!   Checked with a prefix hash chain: `chain(i) = h(chain(i-1), i, term, data)`; the first replica to hold
//!   `(i, term)` fixes its chain value and every other must agree.
//! - **Leader completeness**: a leader of term T holds every entry known committed at a term below T.
//! - **State-machine safety**: no two replicas apply different commands at one index (their state hashes agree).
//! - **Commit never moves back** within one life of a replica, and what was committed stays committed (every
//!   replica that considers an index committed holds the same entry there).

use std::collections::{BTreeMap, HashMap};

use flotilla_raft::prelude::*;

use crate::sim_node::SimNode;

#[derive(Default)]
pub struct Invariants {
    leaders: BTreeMap<u64, u64>,
    /// (index, term) → (prefix chain, the replica that first held it, the base index its chain started from).
    chains: HashMap<(u64, u64), (u64, u64, u64)>,
    /// index → (term, chain) of committed entries.
    committed: BTreeMap<u64, (u64, u64)>,
    /// Term of the observer → highest index it saw committed: an index is known committed at a term below T if
    /// some observer at such a term saw it committed.
    max_commit_by_term: BTreeMap<u64, u64>,
    /// index → state hash after applying it.
    applied: HashMap<u64, u64>,
}

fn entry_chain(previous: u64, entry: &Entry) -> u64 {
    let mut hash = previous ^ 0x9E37_79B9_7F4A_7C15;
    for word in [entry.index, entry.term, entry.entry_type as u64] {
        hash = (hash ^ word).wrapping_mul(0x0100_0000_01b3).rotate_left(17);
    }
    crate::sim_node::chain_hash(hash, entry.index, &entry.data)
}

impl Invariants {
    /// Checks one replica; `Err` describes the first violation.
    pub fn check(&mut self, node: &mut SimNode) -> Result<(), String> {
        node.raw.raft.validate();
        let id = node.id;
        let raft = &node.raw.raft;
        if raft.role == StateRole::Leader {
            if let Some(&other) = self.leaders.get(&raft.term) {
                if other != id {
                    return Err(format!("election safety: {other} and {id} both lead term {}", raft.term));
                }
            }
            self.leaders.insert(raft.term, id);
        }
        if raft.raft_log.committed < node.max_committed {
            return Err(format!(
                "node {id}: commit moved back from {} to {}",
                node.max_committed, raft.raft_log.committed
            ));
        }
        let log = &raft.raft_log;
        let first = log.first_index();
        let last = log.last_index();
        let base_index = first - 1;
        let mut chain = if base_index == 0 {
            0
        } else {
            match self.committed.get(&base_index) {
                Some(&(_, chain)) => chain,
                None => return Err(format!("node {id}: its snapshot index {base_index} was never seen committed")),
            }
        };
        let entries = log.slice(first, last + 1, u64::MAX).map_err(|e| format!("node {id}: reading log: {e}"))?;
        let committed_index = log.committed;
        let mut leader_chain_at = BTreeMap::new();
        let leader_bound = if raft.role == StateRole::Leader {
            self.max_commit_by_term.range(..raft.term).map(|(_, &i)| i).max()
        } else {
            None
        };
        for entry in &entries {
            chain = entry_chain(chain, entry);
            match self.chains.get(&(entry.index, entry.term)) {
                Some(&(known, first_holder, first_base)) if known != chain => {
                    let terms: Vec<String> = entries.iter().map(|e| format!("{}@{}", e.index, e.term)).collect();
                    return Err(format!(
                        "log matching: node {id} holds ({}, term {}) with a different prefix than node {first_holder} \
                         had (from base {first_base}); node {id}'s log from {first} (base {base_index}): {}",
                        entry.index,
                        entry.term,
                        terms.join(" ")
                    ));
                }
                Some(_) => {}
                None => {
                    self.chains.insert((entry.index, entry.term), (chain, id, base_index));
                }
            }
            if entry.index <= committed_index {
                match self.committed.get(&entry.index) {
                    Some(&(term, known)) if (term, known) != (entry.term, chain) => {
                        return Err(format!(
                        "committed entry changed: node {id} has ({}, term {}) where ({}, term {term}) was committed",
                        entry.index, entry.term, entry.index
                    ))
                    }
                    Some(_) => {}
                    None => {
                        self.committed.insert(entry.index, (entry.term, chain));
                    }
                }
            }
            if Some(entry.index) == leader_bound {
                leader_chain_at.insert(entry.index, chain);
            }
        }
        if let Some(bound) = leader_bound {
            if bound > base_index {
                let expected = self.committed.get(&bound).map(|&(_, c)| c);
                if leader_chain_at.get(&bound).copied() != expected {
                    return Err(format!(
                        "leader completeness: leader {id} of term {} lacks the entry committed at {bound}",
                        raft.term
                    ));
                }
            }
        }
        let term = raft.term;
        let slot = self.max_commit_by_term.entry(term).or_insert(0);
        *slot = (*slot).max(committed_index);
        for (index, hash) in std::mem::take(&mut node.machine.applied) {
            match self.applied.get(&index) {
                Some(&known) if known != hash => {
                    return Err(format!("state-machine safety: node {id} applied a different command at {index}"))
                }
                Some(_) => {}
                None => {
                    self.applied.insert(index, hash);
                }
            }
        }
        node.max_committed = node.max_committed.max(committed_index);
        Ok(())
    }

    /// The highest index any replica has seen committed.
    pub fn max_committed(&self) -> u64 {
        self.committed.keys().next_back().copied().unwrap_or(0)
    }

    pub fn leader_of(&self, term: u64) -> Option<u64> {
        self.leaders.get(&term).copied()
    }

    /// The state hash after applying `index`, if any replica applied it.
    pub fn applied_hash(&self, index: u64) -> Option<u64> {
        self.applied.get(&index).copied()
    }
}
