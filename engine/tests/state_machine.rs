//! redb state machine specifics: merged scans, refused applies, range descriptors, and the background flusher
//! and compactor under load and power loss. The behaviour every engine shares is in `kv_engine_conformance.rs`.

use flotilla_engine::redb_sim::SimRedbBackend;
use flotilla_engine::state_machine::{GroupApply, KvOp, StateMachine, StateMachineError, StateMachineOptions};

mod common;

use common::{all, apply_to_model, random_apply, Data};

#[test]
fn scans_merge_the_memtable_over_redb_with_bounds_limits_and_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let machine = StateMachine::open(&dir.path().join("s.redb"), StateMachineOptions::default()).unwrap();
    let put = |key: &str, value: &str| KvOp::Put { key: key.into(), value: value.into() };
    machine
        .apply(vec![GroupApply {
            group_id: 1,
            ops: vec![put("a", "1"), put("b", "1"), put("c", "1"), put("d", "1")],
            applied_index: 1,
            applied_term: 1,
            range: None,
        }])
        .unwrap();
    machine.flush().unwrap();
    machine
        .apply(vec![GroupApply {
            group_id: 1,
            ops: vec![put("b", "2"), KvOp::Delete { key: "c".into() }, put("bb", "2")],
            applied_index: 2,
            applied_term: 1,
            range: None,
        }])
        .unwrap();
    let scan = |start: &str, end: &str, limit: usize| -> Vec<(String, String)> {
        machine
            .scan(start.as_bytes(), end.as_bytes(), limit)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    };
    let pairs = |list: &[(&str, &str)]| list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    assert_eq!(scan("", "", 100), pairs(&[("a", "1"), ("b", "2"), ("bb", "2"), ("d", "1")]));
    assert_eq!(scan("b", "d", 100), pairs(&[("b", "2"), ("bb", "2")]));
    assert_eq!(scan("", "", 2), pairs(&[("a", "1"), ("b", "2")]));
    assert_eq!(machine.get(b"c").unwrap(), None, "a deletion in the memtable hides the stored value");
    assert_eq!((machine.applied(1), machine.durable_applied(1)), ((2, 1), (1, 1)));
}

#[test]
fn applying_backwards_is_refused_and_ranges_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let machine = StateMachine::open(&dir.path().join("s.redb"), StateMachineOptions::default()).unwrap();
    machine
        .apply(vec![GroupApply { group_id: 3, ops: vec![], applied_index: 10, applied_term: 2, range: None }])
        .unwrap();
    let backwards =
        machine.apply(vec![GroupApply { group_id: 3, ops: vec![], applied_index: 9, applied_term: 2, range: None }]);
    assert!(matches!(backwards, Err(StateMachineError::Invalid(_))));
    machine.put_range(3, b"descriptor").unwrap();
    assert_eq!(machine.ranges().unwrap(), vec![(3, b"descriptor".to_vec())]);
}

#[test]
fn the_background_flusher_keeps_data_exact_and_memory_bounded() {
    use flotilla_engine::flusher::BackgroundFlusher;
    use std::sync::Arc;
    let disk = SimRedbBackend::new();
    let budget = 4096;
    let machine = Arc::new(
        StateMachine::open_with_backend(
            disk.clone(),
            // Tiny blocks and a low fanout: compactions run on their thread while flushes and applies go on.
            StateMachineOptions {
                memtable_bytes_max: budget,
                block_bytes_max: 256,
                compaction_fanout: 2,
                runs_max: 4,
                ..StateMachineOptions::default()
            },
        )
        .unwrap(),
    );
    let flusher = BackgroundFlusher::start(Arc::clone(&machine));
    let mut model = Data::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut index = 0;
    for _ in 0..2000 {
        index += 1;
        let apply = random_apply(&mut rng, 1 + index % 5, index);
        let over_budget = machine.apply(vec![apply.clone()]).unwrap();
        apply_to_model(&mut model, &apply);
        flusher.after_apply(over_budget).unwrap();
        assert!(machine.memtable_bytes() <= 2 * budget + 1024, "bounded: {} bytes", machine.memtable_bytes());
        assert!(machine.run_count() <= 4 + 1, "runs bounded: {}", machine.run_count());
    }
    assert_eq!(all(machine.as_ref()), model, "reads during background flushes see every apply");
    flusher.flush_now().unwrap();
    drop(flusher);
    for group in 1..=5 {
        assert_eq!(machine.durable_applied(group), machine.applied(group), "everything durable after flush_now");
    }
    disk.power_off();
    drop(machine);
    disk.crash();
    disk.power_on();
    let machine = StateMachine::open_with_backend(disk, StateMachineOptions::default()).unwrap();
    assert_eq!(all(&machine), model);
}

#[test]
fn a_run_recorded_without_its_blocks_is_corruption_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let machine = StateMachine::open(&path, StateMachineOptions::default()).unwrap();
    machine
        .apply(vec![GroupApply {
            group_id: 1,
            ops: vec![KvOp::Put { key: b"k".to_vec(), value: b"v".to_vec() }],
            applied_index: 1,
            applied_term: 1,
            range: None,
        }])
        .unwrap();
    machine.flush().unwrap();
    drop(machine);
    // Lose the blocks behind the state machine's back.
    let db = redb::Database::open(&path).unwrap();
    let write = db.begin_write().unwrap();
    write.delete_table(redb::TableDefinition::<&[u8], &[u8]>::new("run_blocks")).unwrap();
    write.commit().unwrap();
    drop(db);
    match StateMachine::open(&path, StateMachineOptions::default()) {
        Err(StateMachineError::Storage(reason)) => assert!(reason.contains("no blocks"), "{reason}"),
        other => panic!("expected corruption, got {:?}", other.map(|_| "an open state machine")),
    }
}

#[test]
fn reads_racing_flushes_compactions_and_garbage_collection_never_lose_a_key() {
    race_reads_with_flushes(300);
}

/// A few keys a round: most reads miss the memtables and reach the runs, whose answers the read cache keeps, while
/// flushes keep giving the runs newer values.
#[test]
fn point_reads_racing_flushes_never_go_back_through_the_read_cache() {
    let stats = race_reads_with_flushes(7);
    assert!(stats.read_cache_bytes > 0, "the read cache served: {stats:?}");
}

/// Rounds of writes (round `r` writes `keys_per_round` keys, moving on through the key space, each with value
/// `v-r`) through tiny memtables and blocks, against two readers: no key vanishes, goes back to an older value,
/// or ends other than last written; returns the stats at the end.
fn race_reads_with_flushes(keys_per_round: u64) -> flotilla_engine::state_machine::StateMachineStats {
    use flotilla_engine::flusher::BackgroundFlusher;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const KEYS: u64 = 300;
    const ROUNDS: u64 = 300;
    let key = |i: u64| format!("k{i:04}").into_bytes();
    let version_of =
        |value: &[u8]| -> u64 { String::from_utf8_lossy(value).rsplit('-').next().unwrap().parse().unwrap() };
    let dir = tempfile::tempdir().unwrap();
    // Tiny memtables and blocks, fanout 2: flushes, compactions and garbage deletions every few milliseconds.
    let options = StateMachineOptions {
        memtable_bytes_max: 2048,
        block_bytes_max: 128,
        compaction_fanout: 2,
        runs_max: 4,
        ..StateMachineOptions::default()
    };
    let machine = Arc::new(StateMachine::open(&dir.path().join("s.redb"), options).unwrap());
    let flusher = BackgroundFlusher::start(Arc::clone(&machine));
    let round_keys = |round: u64| (0..keys_per_round).map(move |k| (round * keys_per_round + k) % KEYS);
    let put = |round: u64, keys: Vec<u64>| {
        let ops =
            keys.into_iter().map(|i| KvOp::Put { key: key(i), value: format!("v-{round}").into_bytes() }).collect();
        let over = machine
            .apply(vec![GroupApply { group_id: 1, ops, applied_index: round + 1, applied_term: 1, range: None }])
            .unwrap();
        flusher.after_apply(over).unwrap();
    };
    put(0, (0..KEYS).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2u64)
        .map(|reader| {
            let (machine, stop) = (Arc::clone(&machine), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut seen = vec![0u64; KEYS as usize];
                let (mut reads, mut rng) = (0u64, reader + 1);
                while !stop.load(Ordering::Relaxed) {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let i = (rng >> 33) % KEYS;
                    let value = machine.get(&key(i)).unwrap().unwrap_or_else(|| panic!("key {i} vanished"));
                    let version = version_of(&value);
                    assert!(
                        version >= seen[i as usize],
                        "key {i} went back from version {} to {version}",
                        seen[i as usize]
                    );
                    seen[i as usize] = version;
                    if reads % 50 == 0 {
                        let all = machine.scan(b"", b"", usize::MAX).unwrap();
                        assert_eq!(all.len() as u64, KEYS, "a scan lost keys");
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let mut last_written = vec![0u64; KEYS as usize];
    for round in 1..=ROUNDS {
        let keys: Vec<u64> = round_keys(round).collect();
        keys.iter().for_each(|&i| last_written[i as usize] = round);
        put(round, keys);
        if keys_per_round < KEYS {
            std::thread::sleep(std::time::Duration::from_micros(200)); // time for reads between flushes
        }
    }
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    flusher.flush_now().unwrap();
    drop(flusher);
    let stats = machine.stats().unwrap();
    assert!(reads > 100, "the readers ran ({reads} reads)");
    assert!(stats.runs <= 4 + 1, "compaction kept up: {stats:?}");
    let last = |i: u64| last_written[i as usize];
    let scanned = machine.scan(b"", b"", usize::MAX).unwrap();
    assert!((0..KEYS).zip(&scanned).all(|(i, (k, v))| *k == key(i) && version_of(v) == last(i)));
    // Point reads too, twice (the memtable is empty now: answered by the runs or the read cache, never stale).
    for _ in 0..2 {
        assert!((0..KEYS).all(|i| version_of(&machine.get(&key(i)).unwrap().unwrap()) == last(i)));
    }
    println!("{reads} reads during {ROUNDS} rounds; {stats:?}");
    stats
}

/// Rewrites one row of one of the state machine's tables through redb itself (so redb's own checks pass), with
/// one bit of its value flipped `from_end` bytes before the end.
fn tamper(path: &std::path::Path, table: &str, from_end: usize) -> u64 {
    use redb::{ReadableTable, TableDefinition};
    let db = redb::Database::create(path).unwrap();
    let write = db.begin_write().unwrap();
    let row = {
        let definition: TableDefinition<u64, &[u8]> = TableDefinition::new(table);
        let mut rows = write.open_table(definition).unwrap();
        let (key, mut value) = {
            let (key, value) = rows.first().unwrap().expect("a row to damage");
            (key.value(), value.value().to_vec())
        };
        let at = value.len() - 1 - from_end;
        value[at] ^= 0x10;
        rows.insert(key, value.as_slice()).unwrap();
        key
    };
    write.commit().unwrap();
    row
}

#[test]
fn damaged_run_records_filters_range_deletions_and_descriptors_are_reported_never_believed() {
    let keys: Vec<Vec<u8>> = (0..2_000u32).map(|i| format!("key-{i:05}").into_bytes()).collect();
    let build = |path: &std::path::Path| {
        let machine = StateMachine::open(path, StateMachineOptions::default()).unwrap();
        let ops = keys.iter().map(|key| KvOp::Put { key: key.clone(), value: b"value".to_vec() }).collect();
        machine
            .apply(vec![GroupApply {
                group_id: 1,
                ops,
                applied_index: 7,
                applied_term: 1,
                range: Some(b"descriptor".to_vec()),
            }])
            .unwrap();
        machine.flush().unwrap();
        machine.put_range(2, b"another descriptor").unwrap();
        flotilla_engine::kv_engine::clear_group(&machine, 3, b"x", b"y", b"cleared").unwrap();
    };
    let refused = |path: &std::path::Path| -> String {
        match StateMachine::open(path, StateMachineOptions::default()).and_then(|machine| {
            machine.ranges()?;
            keys.iter().try_for_each(|key| {
                machine.get(key).map(|value| assert_eq!(value.as_deref(), Some(&b"value"[..]), "a wrong answer"))
            })
        }) {
            Err(StateMachineError::Storage(message)) => message,
            other => panic!("damage went unnoticed: {other:?}"),
        }
    };
    // The Bloom filter is the record's last field: bytes just before the checksum are filter bits. A flipped
    // filter bit made point reads miss keys that scans return.
    for (table, from_end) in [("runs", 4 + 40), ("runs", 4), ("range_tombstones", 5), ("ranges", 6)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        build(&path);
        let row = tamper(&path, table, from_end);
        let message = refused(&path);
        assert!(message.contains(&format!("table {table}, row {row}")), "{table}: {message}");
    }
    // The applied state is a fixed-size value of its own table type.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    build(&path);
    {
        use redb::{ReadableTable, TableDefinition};
        let db = redb::Database::create(&path).unwrap();
        let write = db.begin_write().unwrap();
        {
            let mut rows = write.open_table(TableDefinition::<u64, [u8; 21]>::new("apply_state")).unwrap();
            let (key, mut value) = {
                let (key, value) = rows.first().unwrap().unwrap();
                (key.value(), value.value())
            };
            value[3] ^= 1;
            rows.insert(key, value).unwrap();
        }
        write.commit().unwrap();
    }
    let message = refused(&path);
    assert!(message.contains("table apply_state, row 1"), "{message}");
}
