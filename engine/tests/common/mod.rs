//! Model helpers shared by the state machine tests: random applies of disjoint group ranges and a model to replay
//! them on.

use std::collections::BTreeMap;

use flotilla_engine::kv_engine::KvEngine;
use flotilla_engine::state_machine::{GroupApply, KvOp};

pub type Data = BTreeMap<Vec<u8>, Vec<u8>>;

pub fn apply_to_model(model: &mut Data, apply: &GroupApply) {
    for op in &apply.ops {
        match op {
            KvOp::Put { key, value } => {
                model.insert(key.clone(), value.clone());
            }
            KvOp::Delete { key } => {
                model.remove(key);
            }
        }
    }
}

pub fn all(machine: &dyn KvEngine) -> Data {
    machine.scan(b"", b"", usize::MAX).unwrap().into_iter().collect()
}

pub fn random_apply(rng: &mut u64, group: u64, index: u64) -> GroupApply {
    let mut next = |bound: u64| {
        *rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*rng >> 33) % bound
    };
    let ops = (0..1 + next(6))
        .map(|_| {
            // Each group owns the keys with its prefix: ranges are disjoint, as in the store.
            let key = format!("g{group:02}/k{:03}", next(40)).into_bytes();
            if next(4) == 0 {
                KvOp::Delete { key }
            } else {
                KvOp::Put { key, value: format!("v{index}-{}", next(1000)).into_bytes() }
            }
        })
        .collect();
    // Now and then a membership change that rewrites the group's descriptor.
    let range = (next(5) == 0).then(|| format!("range of g{group} at {index}").into_bytes());
    GroupApply { group_id: group, ops, applied_index: index, applied_term: 1 + index / 10, range }
}
