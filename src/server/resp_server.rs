//! The RESP (Redis protocol) front end: connections, and what each command does (the commands and their
//! semantics are listed in `docs/resp.md`).
//!
//! The requests read in one go run in order, in waves: plain `SET`s in a row together (one command per range for
//! all of them, `Requests::put_each`), `GET`s in a row together, anything else alone; all answers of the batch
//! leave in one write. Bounded: connections (`resp_connections_max`), the bytes and arguments of a request
//! (`resp.rs`), and requests in flight per connection (`resp_inflight_max`: reading waits while that many are
//! unanswered). A bad request gets `-ERR …` and the server serves on; a request it cannot parse closes that
//! connection after the error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use flotilla_raftstore::command::{Op, Outcome};
use flotilla_router::route::RouteError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::requests::Requests;
use crate::resp::{parse_request, Reply, RequestLimits};

/// Settings of the RESP front end.
#[derive(Clone, Debug)]
pub struct RespOptions {
    /// Connections at once at most; more are closed at once. Default 1,024.
    pub connections_max: usize,
    /// Requests read ahead of their answers per connection (pipelining). Default 1,024.
    pub inflight_max: usize,
    pub limits: RequestLimits,
    /// If set, a connection must `AUTH` with it before anything but `PING`, `AUTH`, `QUIT`, `COMMAND`.
    pub password: Option<String>,
    /// Keys in one `RANGE` answer at most. Default 10,000.
    pub scan_count_max: usize,
    /// How long a `JOIN` (a node joining the cluster, `join.rs`) may take before it is answered `TRYAGAIN`.
    /// Default 30 s.
    pub join_timeout: std::time::Duration,
}

impl Default for RespOptions {
    fn default() -> RespOptions {
        RespOptions {
            connections_max: 1024,
            inflight_max: 1024,
            limits: RequestLimits::default(),
            password: None,
            scan_count_max: 10_000,
            join_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Accepts RESP connections until the task is aborted.
pub async fn serve(listener: TcpListener, requests: Arc<Requests>, options: Arc<RespOptions>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        if active.load(Ordering::Acquire) >= options.connections_max {
            metrics::counter!("flotilla_resp_connections_refused_total").increment(1);
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (requests, options, active) = (Arc::clone(&requests), Arc::clone(&options), Arc::clone(&active));
        connections.spawn(async move {
            let _ = Connection { requests, options, authenticated: false }.run(stream).await;
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

struct Connection {
    requests: Arc<Requests>,
    options: Arc<RespOptions>,
    authenticated: bool,
}

/// What to do after a request.
enum Then {
    Continue,
    Close,
}

impl Connection {
    async fn run(mut self, mut stream: TcpStream) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut buffer = BytesMut::with_capacity(16 << 10);
        let mut out = Vec::new();
        loop {
            if stream.read_buf(&mut buffer).await? == 0 {
                return Ok(());
            }
            let mut batch = Vec::new();
            let mut broken = None;
            while batch.len() < self.options.inflight_max {
                match parse_request(&mut buffer, &self.options.limits) {
                    Ok(Some(request)) => batch.push(request),
                    Ok(None) => break,
                    Err(error) => {
                        broken = Some(error.0);
                        break;
                    }
                }
            }
            // In waves, in order: a wave's requests run together (concurrently on this connection's task), the
            // next wave starts when it is answered. Plain `SET`s in a row are one wave (`Requests::put_each`: one
            // command per range for all of them), `GET`s in a row one; any other request is a wave of its own. So a
            // pipeline executes as sent (a `GET` after a `SET` of its key reads it), and a pipeline of one kind
            // runs all at once.
            let mut then = Then::Continue;
            let mut wave = Wave::default();
            for request in batch {
                let kind = Kind::of(&request);
                if wave.kind.is_some_and(|current| current != kind || kind == Kind::Other) {
                    then = self.answer(std::mem::take(&mut wave), &mut out).await;
                    if let Then::Close = then {
                        break;
                    }
                }
                wave.kind = Some(kind);
                wave.slots.push(match self.start(request, kind) {
                    Started::Ready(reply, after) => Slot::Ready(reply, after),
                    Started::Running(future) => {
                        wave.running.push(future);
                        Slot::Running
                    }
                    Started::Put(key, value) => {
                        wave.puts.push((key, value));
                        Slot::Put
                    }
                    Started::Get(key) => {
                        wave.gets.push(key);
                        Slot::Get
                    }
                });
            }
            if let Then::Continue = then {
                then = self.answer(wave, &mut out).await;
            }
            if let Some(error) = &broken {
                Reply::error(format!("Protocol error: {error}")).encode(&mut out);
            }
            stream.write_all(&out).await?;
            out.clear();
            if broken.is_some() || matches!(then, Then::Close) {
                return Ok(());
            }
        }
    }

    /// Runs the started requests of `wave` together and encodes their answers in order into `out`; whether the
    /// connection closes after them.
    async fn answer(&self, wave: Wave, out: &mut Vec<u8>) -> Then {
        let Wave { slots, running, puts, gets, .. } = wave;
        let put_each = async {
            match puts.is_empty() {
                true => Vec::new(),
                false => self.requests.put_each(puts).await,
            }
        };
        let get_each = async {
            match gets.is_empty() {
                true => Vec::new(),
                false => self.requests.get_each(gets).await,
            }
        };
        let (finished, put, got) =
            futures_util::future::join3(futures_util::future::join_all(running), put_each, get_each).await;
        let (mut finished, mut put, mut got) = (finished.into_iter(), put.into_iter(), got.into_iter());
        for slot in slots {
            let (reply, after) = match slot {
                Slot::Ready(reply, after) => (reply, after),
                Slot::Running => (finished.next().expect("one answer per running request"), Then::Continue),
                Slot::Put => match put.next().expect("one answer per put") {
                    Ok(()) => (Reply::ok(), Then::Continue),
                    Err(error) => (failed(error), Then::Continue),
                },
                Slot::Get => (value_reply(got.next().expect("one answer per get")), Then::Continue),
            };
            reply.encode(out);
            if let Then::Close = after {
                return Then::Close;
            }
        }
        Then::Continue
    }

    /// Starts one request: answered at once (connection commands, refusals, a GET served locally), joined to its
    /// wave's puts or reads (a plain `SET`, a `GET`), or run as a future on the connection's task.
    fn start(&mut self, request: Vec<Vec<u8>>, kind: Kind) -> Started {
        let Some(name) = request.first() else { return Started::Ready(Reply::error("empty command"), Then::Continue) };
        let name = String::from_utf8_lossy(name).to_ascii_uppercase();
        let args = &request[1..];
        let ready = |reply| Started::Ready(reply, Then::Continue);
        match name.as_str() {
            "PING" => {
                return ready(args.first().map_or(Reply::Simple("PONG".into()), |message| Reply::Bulk(message.clone())))
            }
            "QUIT" => return Started::Ready(Reply::ok(), Then::Close),
            "COMMAND" => return ready(Reply::Array(Vec::new())),
            "AUTH" => {
                let given = args.last().map(|password| String::from_utf8_lossy(password).into_owned());
                return ready(match (&self.options.password, given) {
                    (None, _) => Reply::error("AUTH called without any password configured for the default user"),
                    (Some(expected), Some(given)) if *expected == given => {
                        self.authenticated = true;
                        Reply::ok()
                    }
                    _ => Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into()),
                });
            }
            _ => {}
        }
        if self.options.password.is_some() && !self.authenticated {
            return ready(Reply::Error("NOAUTH Authentication required.".into()));
        }
        match kind {
            Kind::Put => {
                let [_, key, value] = <[Vec<u8>; 3]>::try_from(request).expect("a SET of three parts");
                return Started::Put(key, value);
            }
            Kind::Get => {
                // Served here and now while this node may read locally (most GETs on a leader): no task.
                if let Some(local) = self.requests.get_local(&args[0]) {
                    return ready(value_reply(local));
                }
                let [_, key] = <[Vec<u8>; 2]>::try_from(request).expect("a GET of two parts");
                return Started::Get(key);
            }
            Kind::Other => {}
        }
        let requests = Arc::clone(&self.requests);
        let options = Arc::clone(&self.options);
        Started::Running(Box::pin(async move { command(&requests, &options, &name, args_of(request)).await }))
    }
}

enum Started {
    Ready(Reply, Then),
    /// A plain `SET key value`: written with the batch's others (`Requests::put_each`).
    Put(Vec<u8>, Vec<u8>),
    /// A `GET key` this node cannot serve locally: read with the wave's others (`Requests::get_each`).
    Get(Vec<u8>),
    /// Run on the connection's task with the rest of its batch (no task of its own: a spawn and a join per
    /// request cost more than the request's own work on the forwarding node).
    Running(Running),
}

/// A request running on the connection's task.
type Running = std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>;

/// Requests of a pipeline that may run together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `SET key value`.
    Put,
    /// `GET key`.
    Get,
    /// Anything else (runs alone).
    Other,
}

impl Kind {
    fn of(request: &[Vec<u8>]) -> Kind {
        match request {
            [name, _, _] if name.eq_ignore_ascii_case(b"SET") => Kind::Put,
            [name, _] if name.eq_ignore_ascii_case(b"GET") => Kind::Get,
            _ => Kind::Other,
        }
    }
}

/// Started requests that run together, in the order they came.
#[derive(Default)]
struct Wave {
    kind: Option<Kind>,
    slots: Vec<Slot>,
    running: Vec<Running>,
    /// The plain `SET`s' keys and values.
    puts: Vec<(Vec<u8>, Vec<u8>)>,
    /// The keys of the `GET`s not served locally.
    gets: Vec<Vec<u8>>,
}

/// Where a request's answer comes from.
enum Slot {
    Ready(Reply, Then),
    Running,
    Put,
    Get,
}

fn args_of(mut request: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    request.remove(0);
    request
}

fn arity(name: &str) -> Reply {
    Reply::error(format!("wrong number of arguments for '{}' command", name.to_ascii_lowercase()))
}

/// A read's answer: the value, nil for none, or the error.
fn value_reply(read: Result<Option<Vec<u8>>, RouteError>) -> Reply {
    match read {
        Ok(value) => value.map_or(Reply::Null, Reply::Bulk),
        Err(error) => failed(error),
    }
}

fn failed(error: RouteError) -> Reply {
    match error {
        RouteError::BatchSpansRanges { cut_at, .. } => Reply::Error(format!(
            "CROSSSLOT Keys in request don't hash to the same slot (they lie in more than one range; the first \
             key's range ends at {})",
            String::from_utf8_lossy(&cut_at).escape_default()
        )),
        other => Reply::error(format!("{other:?}")),
    }
}

/// One data command.
async fn command(requests: &Requests, options: &RespOptions, name: &str, args: Vec<Vec<u8>>) -> Reply {
    match (name, args.len()) {
        ("ECHO", 1) => Reply::Bulk(args[0].clone()),
        ("SET", n) if n >= 2 => set(requests, args).await,
        ("DEL", n) if n >= 1 => {
            let mut deleted = 0;
            for key in args {
                match delete_counted(requests, key).await {
                    Ok(true) => deleted += 1,
                    Ok(false) => {}
                    Err(error) => return failed(error),
                }
            }
            Reply::Integer(deleted)
        }
        ("EXISTS", n) if n >= 1 => {
            let mut found = 0;
            for key in &args {
                match requests.get(key).await {
                    Ok(Some(_)) => found += 1,
                    Ok(None) => {}
                    Err(error) => return failed(error),
                }
            }
            Reply::Integer(found)
        }
        ("MGET", n) if n >= 1 => {
            let mut values = Vec::with_capacity(n);
            for key in &args {
                match requests.get(key).await {
                    Ok(value) => values.push(value.map_or(Reply::Null, Reply::Bulk)),
                    Err(error) => return failed(error),
                }
            }
            Reply::Array(values)
        }
        ("MSET", n) if n >= 2 && n % 2 == 0 => {
            let ops = args.chunks(2).map(|pair| Op::put(pair[0].clone(), pair[1].clone())).collect();
            match requests.write(ops).await {
                Ok(_) => Reply::ok(),
                Err(error) => failed(error),
            }
        }
        ("INCR", 1) => incr(requests, &args[0]).await,
        ("SPLIT", 1) => match requests.split_at(&args[0], true).await {
            Ok(()) => Reply::ok(),
            Err(error) => failed(error),
        },
        ("MERGE", 1) => match requests.merge_left(&args[0]).await {
            Ok(()) => Reply::ok(),
            Err(error) => failed(error),
        },
        ("JOIN", 2) => {
            if args[0] != requests.cluster_id().as_bytes() {
                let asked = String::from_utf8_lossy(&args[0]);
                return Reply::error(format!("this is cluster {:?}, not {asked:?}", requests.cluster_id()));
            }
            let deadline = std::time::Instant::now() + options.join_timeout;
            match super::join::join(requests, &String::from_utf8_lossy(&args[1]), deadline).await {
                Ok(joined) => Reply::Bulk(prost::Message::encode_to_vec(&joined)),
                // Nothing is lost by asking again (each step is idempotent): the joining node retries.
                Err(error @ (RouteError::Busy(_) | RouteError::Timeout)) => {
                    Reply::Error(format!("TRYAGAIN the join did not finish: {error:?}"))
                }
                Err(error) => failed(error),
            }
        }
        ("DBSIZE", 0) => match count_keys(requests).await {
            Ok(count) => Reply::Integer(count as i64),
            Err(error) => failed(error),
        },
        ("INFO", _) => Reply::Bulk(info(requests).into_bytes()),
        ("RANGE", 3) => {
            let Some(count) = std::str::from_utf8(&args[2]).ok().and_then(|c| c.parse::<usize>().ok()) else {
                return Reply::error("value is not an integer or out of range");
            };
            if count > options.scan_count_max {
                return Reply::error(format!("count {count} is over the limit of {}", options.scan_count_max));
            }
            match requests.scan(&args[0], &args[1], count).await {
                Ok(pairs) => Reply::Array(
                    pairs.into_iter().flat_map(|(key, value)| [Reply::Bulk(key), Reply::Bulk(value)]).collect(),
                ),
                Err(error) => failed(error),
            }
        }
        ("ROUTES", 0) => Reply::Array(
            requests
                .routes()
                .into_iter()
                .map(|route| {
                    Reply::Array(vec![
                        Reply::Bulk(route.start),
                        Reply::Bulk(route.end),
                        Reply::Integer(route.group_id as i64),
                        Reply::Integer(route.leader as i64),
                        route.leader_addr.map_or(Reply::Null, |addr| Reply::Bulk(addr.into_bytes())),
                    ])
                })
                .collect(),
        ),
        (
            "ECHO" | "GET" | "SET" | "DEL" | "EXISTS" | "MGET" | "MSET" | "INCR" | "RANGE" | "ROUTES" | "DBSIZE"
            | "JOIN" | "SPLIT" | "MERGE",
            _,
        ) => arity(name),
        _ => Reply::error(format!("unknown command '{}'", name.to_ascii_lowercase())),
    }
}

/// Keys in the whole key space: every range scanned in pages (linearizable per range; it reads every value too,
/// so it costs as much as a full scan).
async fn count_keys(requests: &Requests) -> Result<usize, RouteError> {
    const PAGE: usize = 10_000;
    let (mut count, mut start) = (0, Vec::new());
    loop {
        let page = requests.scan(&start, b"", PAGE).await?;
        count += page.len();
        match page.last() {
            Some((last, _)) if page.len() == PAGE => start = [last.as_slice(), &[0]].concat(),
            _ => return Ok(count),
        }
    }
}

/// `INFO`: what this node is, in Redis's `key:value` lines.
fn info(requests: &Requests) -> String {
    let routes = requests.routes();
    let node_id = requests.node_id();
    let led = routes.iter().filter(|route| route.leader == node_id).count();
    format!(
        "# Server\r\nflotilla_version:{}\r\nredis_version:7.0.0\r\nnode_id:{node_id}\r\n# Cluster\r\ngroups:{}\r\ngroups_led_here:{led}\r\n",
        env!("CARGO_PKG_VERSION"),
        routes.len()
    )
}

/// Deletes `key`; whether it was there. A read, then one command that deletes the key only if it still holds
/// what was read (a compare-and-set to the same value, then a delete: a failed precondition makes the whole
/// command a no-op); retried if it changed in between, so the count is exact.
async fn delete_counted(requests: &Requests, key: Vec<u8>) -> Result<bool, RouteError> {
    loop {
        let Some(current) = requests.get(&key).await? else { return Ok(false) };
        let ops = vec![Op::compare_and_set(key.clone(), Some(current.clone()), current), Op::delete(key.clone())];
        if let Outcome::Done = requests.write(ops).await? {
            return Ok(true);
        }
    }
}

/// `SET key value [NX | XX]`: `NX` only if absent, `XX` only if present (`$-1` when not set). No expiry.
async fn set(requests: &Requests, args: Vec<Vec<u8>>) -> Reply {
    let mut args = args.into_iter();
    let (key, value) = (args.next().expect("arity checked"), args.next().expect("arity checked"));
    let mut condition = None;
    for option in args {
        match String::from_utf8_lossy(&option).to_ascii_uppercase().as_str() {
            flag @ ("NX" | "XX") if condition.is_none() => condition = Some(flag == "NX"),
            "EX" | "PX" | "EXAT" | "PXAT" | "KEEPTTL" => return Reply::error("expiry is not supported"),
            _ => return Reply::error("syntax error"),
        }
    }
    let outcome = match condition {
        None => requests.write(vec![Op::put(key, value)]).await,
        Some(true) => requests.write(vec![Op::compare_and_set(key, None, value)]).await,
        Some(false) => loop {
            let current = match requests.get(&key).await {
                Ok(Some(current)) => current,
                Ok(None) => return Reply::Null,
                Err(error) => return failed(error),
            };
            match requests.write(vec![Op::compare_and_set(key.clone(), Some(current), value.clone())]).await {
                Ok(Outcome::PreconditionFailed { .. }) => continue, // changed in between: look again
                other => break other,
            }
        },
    };
    match outcome {
        Ok(Outcome::Done) => Reply::ok(),
        Ok(Outcome::PreconditionFailed { .. }) => Reply::Null,
        Ok(other) => Reply::error(format!("{other:?}")),
        Err(error) => failed(error),
    }
}

/// `INCR key`: a read, then a compare-and-set of the incremented value (retried if the key changed between).
async fn incr(requests: &Requests, key: &[u8]) -> Reply {
    loop {
        let current = match requests.get(key).await {
            Ok(current) => current,
            Err(error) => return failed(error),
        };
        let number = match &current {
            None => 0i64,
            Some(bytes) => match std::str::from_utf8(bytes).ok().and_then(|text| text.parse::<i64>().ok()) {
                Some(number) => number,
                None => return Reply::error("value is not an integer or out of range"),
            },
        };
        let Some(next) = number.checked_add(1) else { return Reply::error("increment or decrement would overflow") };
        let op = Op::compare_and_set(key.to_vec(), current, next.to_string().into_bytes());
        match requests.write(vec![op]).await {
            Ok(Outcome::Done) => return Reply::Integer(next),
            Ok(Outcome::PreconditionFailed { .. }) => continue,
            Ok(other) => return Reply::error(format!("{other:?}")),
            Err(error) => return failed(error),
        }
    }
}
