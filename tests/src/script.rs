//! Scenario scripts for the Raft core, in the style of etcd's `testdata/*.txt`: each block is a command, a line
//! `----`, and the exact output the command must produce, ended by a blank line. `tests/raft_scripts.rs` runs
//! every file in `testdata/raft/`; with `REWRITE=1` in the environment it writes the actual output back instead
//! of comparing (review the diff before committing it).
//!
//! Commands (ids are replica ids):
//!
//! | command | effect; output |
//! | --- | --- |
//! | `cluster voters=1,2,3 [learners=4] [pre_vote=false] [check_quorum=false] [lease=true]` | a new cluster |
//! | `campaign ID` / `tick ID N` / `tick-all N` | inputs; no output |
//! | `propose ID TEXT` | a proposal; `ok` or the error |
//! | `read ID CONTEXT` | a read-index request; `ok` or the error |
//! | `transfer ID TARGET` | leadership transfer requested at ID |
//! | `stabilize` | deliver until quiet; every delivered message, one per line |
//! | `deliver` | deliver only the messages waiting now; their lines |
//! | `isolate ID` / `cut FROM TO` / `heal` / `drop KIND` | network faults; no output |
//! | `compact ID` | snapshot and compact ID's log at its applied index |
//! | `add-node ID` | a replica outside the configuration, bootstrapped like the first ones |
//! | `conf-change ID [auto\|joint-implicit\|joint-explicit] vN lN rN …` | propose: voter N, learner N, remove N (none: leave joint); `ok` or the error |
//! | `config ID` | the configuration ID has applied |
//! | `status` | per replica: role, term, leader, commit, applied, last index |
//! | `reads ID` | read states confirmed at ID since the last `reads` |

use flotilla_raft::prelude::*;

use crate::cluster::Cluster;

/// Runs a script and returns it with the actual outputs in place of the expected ones.
pub fn run_script(text: &str) -> Result<String, String> {
    let mut cluster: Option<Cluster> = None;
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim().is_empty() || line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let command = line.trim();
        match lines.next() {
            Some("----") => {}
            other => return Err(format!("command `{command}` must be followed by `----`, found {other:?}")),
        }
        // Skip the expected output: up to a blank line or the end.
        while lines.peek().is_some_and(|l| !l.trim().is_empty()) {
            lines.next();
        }
        let output = execute(&mut cluster, command)?;
        out.push_str(command);
        out.push_str("\n----\n");
        for produced in output {
            out.push_str(&produced);
            out.push('\n');
        }
    }
    Ok(out)
}

fn ids(list: &str) -> Result<Vec<u64>, String> {
    list.split(',').map(|id| id.parse().map_err(|_| format!("bad id list `{list}`"))).collect()
}

fn number(word: Option<&str>, what: &str) -> Result<u64, String> {
    word.and_then(|w| w.parse().ok()).ok_or_else(|| format!("{what}: a number is needed"))
}

fn execute(cluster: &mut Option<Cluster>, command: &str) -> Result<Vec<String>, String> {
    let mut words = command.split_whitespace();
    let verb = words.next().unwrap_or_default();
    if verb == "cluster" {
        let (mut voters, mut learners) = (Vec::new(), Vec::new());
        let (mut pre_vote, mut check_quorum, mut lease) = (true, true, false);
        for word in words {
            match word.split_once('=') {
                Some(("voters", list)) => voters = ids(list)?,
                Some(("learners", list)) => learners = ids(list)?,
                Some(("pre_vote", value)) => pre_vote = value == "true",
                Some(("check_quorum", value)) => check_quorum = value == "true",
                Some(("lease", value)) => lease = value == "true",
                _ => return Err(format!("unknown cluster option `{word}`")),
            }
        }
        *cluster = Some(Cluster::new(&voters, &learners, |config| {
            config.pre_vote = pre_vote;
            config.check_quorum = check_quorum;
            if lease {
                config.read_mode = ReadMode::LeaseBased;
            }
        }));
        return Ok(Vec::new());
    }
    let c = cluster.as_mut().ok_or("the script must start with `cluster`")?;
    let mut id = || number(words.next(), verb);
    let result = match verb {
        "campaign" => {
            c.campaign(id()?);
            Vec::new()
        }
        "tick" => {
            let (node, ticks) = (id()?, id()?);
            c.tick(node, ticks);
            Vec::new()
        }
        "tick-all" => {
            c.tick_all(id()?);
            Vec::new()
        }
        "propose" | "read" => {
            let node = id()?;
            let text = words.collect::<Vec<_>>().join(" ");
            let bytes = bytes::Bytes::from(text);
            let result =
                c.with_node(node, |raw| if verb == "propose" { raw.propose(bytes) } else { raw.read_index(bytes) });
            vec![match result {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error: {e}"),
            }]
        }
        "transfer" => {
            let (node, target) = (id()?, id()?);
            c.with_node(node, |raw| raw.transfer_leader(target));
            Vec::new()
        }
        "stabilize" => {
            c.stabilize();
            c.take_trace()
        }
        "deliver" => {
            let messages = c.take_messages();
            c.deliver(messages);
            c.take_trace()
        }
        "isolate" => {
            c.isolate(id()?);
            Vec::new()
        }
        "cut" => {
            let (from, to) = (id()?, id()?);
            c.cut(from, to);
            Vec::new()
        }
        "heal" => {
            c.heal();
            Vec::new()
        }
        "drop" => {
            let kind = words.next().ok_or("drop: a message kind is needed")?;
            let kind = (0..=12)
                .filter_map(|n| MessageType::try_from(n).ok())
                .find(|k| format!("{k:?}") == kind)
                .ok_or_else(|| format!("unknown message kind `{kind}`"))?;
            c.dropped_types.insert(kind);
            Vec::new()
        }
        "compact" => {
            let node = id()?;
            let applied = c.applied_index(node);
            c.node_mut(node).snapshot_and_compact(applied);
            Vec::new()
        }
        "add-node" => {
            let node = id()?;
            let initial: Vec<u64> = c.initial_voters.clone();
            c.add_node(node, &initial, |_| {});
            Vec::new()
        }
        "conf-change" => {
            let node = id()?;
            let mut change = ConfChangeV2::leave_joint();
            for word in words {
                let transition = match word {
                    "auto" => Some(ConfChangeTransition::Auto),
                    "joint-implicit" => Some(ConfChangeTransition::JointImplicit),
                    "joint-explicit" => Some(ConfChangeTransition::JointExplicit),
                    _ => None,
                };
                if let Some(transition) = transition {
                    change.transition = transition as i32;
                    continue;
                }
                let (kind, target) = word.split_at(1);
                let kind = match kind {
                    "v" => ConfChangeType::AddNode,
                    "l" => ConfChangeType::AddLearnerNode,
                    "r" => ConfChangeType::RemoveNode,
                    _ => return Err(format!("conf-change: unknown change `{word}`")),
                };
                change.changes.push(ConfChangeSingle::new(kind, number(Some(target), "conf-change")?));
            }
            vec![match c.with_node(node, |raw| raw.propose_conf_change(&change)) {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error: {e}"),
            }]
        }
        "config" => {
            let cs = &c.node(id()?).machine.conf_state;
            vec![format!(
                "voters={:?} outgoing={:?} learners={:?} learners_next={:?} auto_leave={}",
                cs.voters, cs.voters_outgoing, cs.learners, cs.learners_next, cs.auto_leave
            )]
        }
        "status" => c
            .nodes
            .values()
            .map(|n| {
                let raft = &n.raw.raft;
                format!(
                    "{}: {:?} term={} leader={} commit={} applied={} last={}",
                    n.id,
                    raft.role,
                    raft.term,
                    raft.leader_id,
                    raft.raft_log.committed,
                    n.machine.applied_index,
                    raft.raft_log.last_index()
                )
            })
            .collect(),
        "reads" => {
            let node = id()?;
            std::mem::take(&mut c.node_mut(node).read_states)
                .into_iter()
                .map(|r| format!("index={} context={}", r.index, String::from_utf8_lossy(&r.context)))
                .collect()
        }
        _ => return Err(format!("unknown command `{verb}`")),
    };
    Ok(result)
}
