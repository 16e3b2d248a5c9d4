//! The settings of `flotilla serve`, from flags and an optional TOML file (`--config node.toml`). Every key of the
//! file is a flag's name with underscores, and takes what the flag takes; a flag given on the command line wins
//! over the file. For example:
//!
//! ```toml
//! id = 1
//! cluster = "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003"
//! data_dir = "data-1"
//! resp_addr = "127.0.0.1:6381"
//! http_addr = "127.0.0.1:8081"
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::ServeOptions;

/// `flotilla serve`'s flags (all optional here: a file may give them).
#[derive(Clone, Debug, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    /// This node's id (its entry in --cluster). Required unless --join.
    #[arg(long)]
    pub id: Option<u64>,
    /// Every node the cluster is created with as id=host:port,… (where the others reach it), numbered 1..=n.
    /// Required unless --join.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Join a running cluster through the node serving RESP at this address (with --raft-addr, where the others
    /// reach this node): the node gets an id and a learner replica of every group, filled by snapshot (with
    /// --requirepass, the cluster's password, which the join uses too). Only at the first start; a restart reads
    /// who it is from --data-dir.
    #[arg(long)]
    pub join: Option<String>,
    /// Where this node keeps its data. Required.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Where this node listens for the other nodes, if not at its --cluster address (behind a proxy); with
    /// --join, where it listens and the others reach it.
    #[arg(long)]
    pub raft_addr: Option<String>,
    /// Where this node serves Redis-protocol (RESP) clients. Default 127.0.0.1:6379.
    #[arg(long)]
    pub resp_addr: Option<String>,
    /// Where this node serves HTTP (the demo's /get and /set, a JSON API, /status, /metrics). Default: no HTTP.
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Nodes of another cluster id are refused. Default "flotilla".
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// Groups the key space is split into when the cluster is created. Default 64.
    #[arg(long)]
    pub groups: Option<u64>,
    /// Clients must AUTH with this password. Default: none.
    #[arg(long)]
    pub requirepass: Option<String>,
    /// How long a request may take (following leaders, waiting for a majority) before it fails, in ms.
    /// Default 10000.
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// The store's tick in ms: elections after 10–20 ticks without a leader, heartbeats every tick. Default 50.
    #[arg(long)]
    pub tick_ms: Option<u64>,
    /// Threads running the replicas. Default 2.
    #[arg(long)]
    pub pollers: Option<usize>,
    /// Threads serving clients and the other nodes. Default 2.
    #[arg(long)]
    pub net_threads: Option<usize>,
    /// RESP connections at once at most (more are closed at accept). Default 1024.
    #[arg(long)]
    pub resp_connections_max: Option<usize>,
    /// Requests read ahead of their answers per RESP connection (pipelining). Default 1024.
    #[arg(long)]
    pub resp_inflight_max: Option<usize>,
    /// A range whose keys and values add up to more than this splits near the middle of its bytes; 0: never by
    /// size. Default 67108864 (64 MiB).
    #[arg(long)]
    pub split_size_bytes_max: Option<u64>,
    /// A range whose leader takes more than this many requests a second, for --split-load-seconds in a row,
    /// splits at the sampled key that halves its load; 0: never by load. Default 2500.
    #[arg(long)]
    pub split_load_requests_per_second_max: Option<u64>,
    /// Seconds in a row a range's load must stay over the bound before it splits. Default 10.
    #[arg(long)]
    pub split_load_seconds: Option<u32>,
    /// A range split off by a trigger that goes cold (its group hibernates) under this many bytes merges into its
    /// left neighbour, if the two together stay under half of --split-size-bytes-max; 0: never. Ranges of the
    /// initial layout and ranges split by request (`flotilla split`) are never merged on their own. Default
    /// 16777216 (16 MiB).
    #[arg(long)]
    pub merge_size_bytes_max: Option<u64>,
    /// How long a range must stay cold (no request at all) before it is measured for a merge: a pause in a
    /// range's load shorter than this never merges it back. Default 60.
    #[arg(long, alias = "merge-check-seconds")]
    #[serde(alias = "merge_check_seconds")]
    pub merge_cold_seconds: Option<u64>,
    /// The memtable (each node's applied writes not yet flushed) is flushed as a new run once it holds this many
    /// bytes; larger means fewer runs and compactions, more memory (up to about three times this) and a longer
    /// log replay after a crash. Default 67108864 (64 MiB).
    #[arg(long)]
    pub memtable_bytes_max: Option<u64>,
    /// The state file's page cache (redb's). Default 1073741824 (1 GiB).
    #[arg(long)]
    pub page_cache_bytes: Option<usize>,
    /// The answers of recent point reads of flushed data, so that a key read again costs a hash lookup; 0 turns
    /// it off. Default 67108864 (64 MiB).
    #[arg(long)]
    pub read_cache_bytes: Option<u64>,
    /// A TOML file with any of the above (flags win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

impl ServeSettings {
    /// The server's options: these flags over the file's settings over the defaults; `Err` says what is wrong.
    pub fn resolve(self) -> Result<ServeOptions, String> {
        let file = match &self.config {
            None => ServeSettings::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
        };
        let join = self.join.or(file.join);
        let (id, cluster) = match (self.id.or(file.id), self.cluster.or(file.cluster), &join) {
            (None, None, Some(_)) => (0, BTreeMap::new()),
            (_, _, Some(_)) => return Err("--join takes neither --id nor --cluster (the cluster gives them)".into()),
            (None, _, None) => return Err("--id is required (or --join)".into()),
            (_, None, None) => return Err("--cluster is required (or --join)".into()),
            (Some(id), Some(cluster), None) => (id, parse_cluster(&cluster)?),
        };
        let data_dir = self.data_dir.or(file.data_dir).ok_or("--data-dir is required")?;
        let resp_addr = self.resp_addr.or(file.resp_addr).unwrap_or_else(|| "127.0.0.1:6379".into());
        let mut options = ServeOptions::new(id, data_dir, cluster, resp_addr);
        options.join = join;
        options.raft_addr = self.raft_addr.or(file.raft_addr);
        options.http_addr = self.http_addr.or(file.http_addr);
        if let Some(cluster_id) = self.cluster_id.or(file.cluster_id) {
            options.cluster_id = cluster_id;
        }
        if let Some(groups) = self.groups.or(file.groups) {
            options.groups = groups;
        }
        options.resp.password = self.requirepass.or(file.requirepass);
        if let Some(pollers) = self.pollers.or(file.pollers) {
            options.pollers = pollers.max(1);
        }
        if let Some(threads) = self.net_threads.or(file.net_threads) {
            options.net_threads = threads.max(1);
        }
        if let Some(max) = self.resp_connections_max.or(file.resp_connections_max) {
            options.resp.connections_max = max.max(1);
        }
        if let Some(max) = self.resp_inflight_max.or(file.resp_inflight_max) {
            options.resp.inflight_max = max.max(1);
        }
        if let Some(ms) = self.request_timeout_ms.or(file.request_timeout_ms) {
            options.request_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.tick_ms.or(file.tick_ms) {
            options.tick_interval = Duration::from_millis(ms.max(1));
        }
        let split = &mut options.split;
        if let Some(bytes) = self.split_size_bytes_max.or(file.split_size_bytes_max) {
            split.size_bytes_max = bytes;
            split.size_check_written_bytes = (bytes / 8).max(1);
        }
        match self.split_load_requests_per_second_max.or(file.split_load_requests_per_second_max) {
            Some(0) => split.load_window_ticks = 0,
            Some(requests) => split.load.requests_per_window_max = requests,
            None => {}
        }
        if let Some(seconds) = self.split_load_seconds.or(file.split_load_seconds) {
            split.load.hot_windows = seconds.max(1);
        }
        if let Some(bytes) = self.merge_size_bytes_max.or(file.merge_size_bytes_max) {
            split.merge_size_bytes_max = bytes;
        }
        if let Some(seconds) = self.merge_cold_seconds.or(file.merge_cold_seconds) {
            options.merge_cold_wait = Duration::from_secs(seconds);
        }
        let state_machine = &mut options.state_machine;
        if let Some(bytes) = self.memtable_bytes_max.or(file.memtable_bytes_max) {
            state_machine.memtable_bytes_max = bytes;
        }
        if let Some(bytes) = self.page_cache_bytes.or(file.page_cache_bytes) {
            state_machine.cache_bytes = bytes;
        }
        if let Some(bytes) = self.read_cache_bytes.or(file.read_cache_bytes) {
            state_machine.read_cache_bytes = bytes;
        }
        Ok(options)
    }
}

/// `1=127.0.0.1:7001,2=127.0.0.1:7002`: node ids and their addresses.
pub fn parse_cluster(text: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut nodes = BTreeMap::new();
    for entry in text.split(',').filter(|entry| !entry.trim().is_empty()) {
        let (id, addr) = entry.split_once('=').ok_or_else(|| format!("{entry:?} is not id=host:port"))?;
        let id: u64 = id.trim().parse().map_err(|_| format!("{id:?} is not a node id"))?;
        if nodes.insert(id, addr.trim().to_string()).is_some() {
            return Err(format!("node {id} is listed twice"));
        }
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "id = 2\ncluster = \"1=a:1,2=b:2\"\ndata_dir = \"d\"\ngroups = 8\nresp_addr = \"r:1\"\n")
            .unwrap();
        let settings = ServeSettings {
            config: Some(path.clone()),
            resp_addr: Some("flag:1".into()),
            resp_inflight_max: Some(16),
            ..Default::default()
        };
        let options = settings.resolve().unwrap();
        assert_eq!((options.resp.inflight_max, options.resp.connections_max), (16, 1024));
        assert_eq!((options.node_id, options.groups, options.resp_addr.as_str()), (2, 8, "flag:1"));
        assert_eq!(options.cluster.get(&1).map(String::as_str), Some("a:1"));
        assert_eq!(options.cluster_id, "flotilla", "the default");
        std::fs::write(&path, "id = 2\nport = 7\n").unwrap();
        let unknown = ServeSettings { config: Some(path), ..Default::default() }.resolve().unwrap_err();
        assert!(unknown.contains("port"), "{unknown}");
        assert_eq!(ServeSettings::default().resolve().unwrap_err(), "--id is required (or --join)");
        let joining =
            ServeSettings { join: Some("127.0.0.1:6379".into()), data_dir: Some("d".into()), ..Default::default() };
        assert_eq!(joining.clone().resolve().unwrap().join.as_deref(), Some("127.0.0.1:6379"));
        let both = ServeSettings { id: Some(4), ..joining };
        assert!(both.resolve().unwrap_err().contains("neither"));
        assert!(parse_cluster("1=a,1=b").unwrap_err().contains("twice"));
        assert!(parse_cluster("x=a").is_err());
    }

    /// A file naming node 1 of a one-node cluster, plus `more` (TOML lines), in `dir`.
    fn one_node_file(dir: &tempfile::TempDir, more: &str) -> PathBuf {
        let path = dir.path().join("node.toml");
        std::fs::write(&path, format!("id = 1\ncluster = \"1=a:1\"\ndata_dir = \"d\"\n{more}")).unwrap();
        path
    }

    #[test]
    fn the_split_triggers_are_set_or_turned_off_by_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let settings = ServeSettings {
            config: Some(one_node_file(&dir, "split_load_seconds = 3\n")),
            split_size_bytes_max: Some(1 << 20),
            split_load_requests_per_second_max: Some(500),
            ..Default::default()
        };
        let split = settings.clone().resolve().unwrap().split;
        assert_eq!((split.size_bytes_max, split.size_check_written_bytes), (1 << 20, 1 << 17));
        assert_eq!((split.load.requests_per_window_max, split.load.hot_windows), (500, 3));
        assert!(split.load_window_ticks > 0);
        assert_eq!(split.merge_size_bytes_max, 16 << 20, "the default");
        let off = ServeSettings {
            split_size_bytes_max: Some(0),
            split_load_requests_per_second_max: Some(0),
            merge_size_bytes_max: Some(0),
            ..settings
        };
        let split = off.resolve().unwrap().split;
        assert_eq!((split.size_bytes_max, split.load_window_ticks), (0, 0), "0 turns each trigger off");
        assert_eq!(split.merge_size_bytes_max, 0);
    }

    /// The cold wait before a merge, from the file under its old name too (`merge_check_seconds`), and from the
    /// flag, which wins.
    #[test]
    fn the_merge_cold_wait_is_set_by_flag_and_file_under_either_name() {
        let dir = tempfile::tempdir().unwrap();
        let from_file = |line: &str| {
            let settings = ServeSettings { config: Some(one_node_file(&dir, line)), ..Default::default() };
            settings.resolve().unwrap().merge_cold_wait
        };
        assert_eq!(from_file("merge_cold_seconds = 7\n"), Duration::from_secs(7));
        assert_eq!(from_file("merge_check_seconds = 9\n"), Duration::from_secs(9));
        assert_eq!(from_file(""), Duration::from_secs(60), "the default");
        let settings = ServeSettings {
            config: Some(one_node_file(&dir, "merge_cold_seconds = 7\n")),
            merge_cold_seconds: Some(3),
            ..Default::default()
        };
        assert_eq!(settings.resolve().unwrap().merge_cold_wait, Duration::from_secs(3));
    }

    #[test]
    fn the_state_machine_is_sized_by_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let settings = ServeSettings {
            config: Some(one_node_file(&dir, "read_cache_bytes = 0\n")),
            memtable_bytes_max: Some(8 << 20),
            page_cache_bytes: Some(256 << 20),
            ..Default::default()
        };
        let state_machine = settings.resolve().unwrap().state_machine;
        assert_eq!(
            (state_machine.memtable_bytes_max, state_machine.cache_bytes, state_machine.read_cache_bytes),
            (8 << 20, 256 << 20, 0)
        );
        let defaults = flotilla_engine::state_machine::StateMachineOptions::default();
        let unset = ServeSettings { config: Some(one_node_file(&dir, "")), ..Default::default() };
        assert_eq!(unset.resolve().unwrap().state_machine.read_cache_bytes, defaults.read_cache_bytes);
    }
}
