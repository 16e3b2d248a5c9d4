//! [`Client`]: a Rust client of a Flotilla cluster (async, on tokio), and [`BlockingClient`] around it. It speaks
//! RESP to the nodes, learns the ranges and where each range's leader serves clients (the `ROUTES` command), and
//! sends each request straight to that node — any node would forward it, at the cost of a hop. Routes are
//! learned again every few seconds and after a connection fails; a request whose node cannot be reached is
//! tried once more on the node the client was given.
//!
//! ```no_run
//! # fn main() -> Result<(), flotilla::client::ClientError> {
//! let client = flotilla::BlockingClient::connect("127.0.0.1:6381")?;
//! client.put(b"hello", b"world")?;
//! assert_eq!(client.get(b"hello")?, Some(b"world".to_vec()));
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::resp::{encode_request, parse_reply, Reply};

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// No node could be reached (the reason).
    Unreachable(String),
    /// The server refused or failed the request (its error reply).
    Server(String),
    /// The server's reply was not what the command returns.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable(reason) => write!(f, "unreachable: {reason}"),
            ClientError::Server(reply) => write!(f, "the server answered: {reply}"),
            ClientError::Protocol(what) => write!(f, "an unexpected reply: {what}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// One range, as `ROUTES` says (and as the server builds its answer): its bounds, its group, the node believed
/// to lead it, and where that node serves clients.
#[derive(Clone, Debug)]
pub struct Route {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub group_id: u64,
    pub leader: u64,
    /// Where the leader serves clients (unknown until that node has connected to the one asked).
    pub leader_addr: Option<String>,
}

impl Route {
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }
}

/// How long routes are trusted before they are asked again.
const ROUTES_TTL: Duration = Duration::from_secs(5);
/// Idle connections kept per node.
const IDLE_CONNECTIONS_MAX: usize = 16;
/// Largest bulk string accepted in a reply.
const REPLY_BULK_BYTES_MAX: usize = 64 << 20;

/// A client of a cluster (cheap to share: every method takes `&self`).
pub struct Client {
    seed: String,
    routes: Mutex<(Vec<Route>, Instant)>,
    idle: Mutex<HashMap<String, Vec<TcpStream>>>,
    timeout: Duration,
}

impl Client {
    /// Connects through the node at `addr` (its RESP address) and learns the routes.
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        let client = Client {
            seed: addr.to_string(),
            routes: Mutex::new((Vec::new(), Instant::now())),
            idle: Mutex::default(),
            timeout: Duration::from_secs(15),
        };
        client.refresh_routes().await?;
        Ok(client)
    }

    /// The ranges, in key order, and their leaders, as last learned.
    pub fn routes(&self) -> Vec<Route> {
        self.routes.lock().0.clone()
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        match self.call_for(key, &[b"GET", key]).await? {
            Reply::Bulk(value) => Ok(Some(value)),
            Reply::Null => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Writes `value` at `key`, durably on a majority before it returns.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        match self.call_for(key, &[b"SET", key, value]).await? {
            Reply::Simple(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Writes every pair, each as its own `SET` (not atomic together: each is durable on a majority of its
    /// range's group once this returns `Ok`; after an error some may have been written). The pairs are grouped
    /// by the node leading their range and pipelined to each such node at once — a bulk load's fast path, one
    /// round trip per node rather than per pair. The first error is returned, after every pair was sent.
    pub async fn put_many<K: AsRef<[u8]>, V: AsRef<[u8]>>(&self, pairs: &[(K, V)]) -> Result<(), ClientError> {
        self.refresh_if_stale().await;
        let mut by_node: HashMap<String, (Vec<u8>, usize)> = HashMap::new();
        {
            let routes = self.routes.lock();
            for (key, value) in pairs {
                let (key, value) = (key.as_ref(), value.as_ref());
                let addr = leader_addr(&routes.0, key).unwrap_or(&self.seed);
                let (requests, count) = by_node.entry(addr.clone()).or_default();
                encode_request(&[b"SET", key, value], requests);
                *count += 1;
            }
        }
        let parts = by_node
            .into_iter()
            .map(|(addr, (requests, count))| async move { self.exchange_or_seed(&addr, &requests, count).await });
        for replies in futures_util::future::join_all(parts).await {
            for reply in replies? {
                match reply {
                    Reply::Simple(_) => {}
                    other => return Err(unexpected(other)),
                }
            }
        }
        Ok(())
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, ClientError> {
        match self.call_for(key, &[b"DEL", key]).await? {
            Reply::Integer(count) => Ok(count > 0),
            other => Err(unexpected(other)),
        }
    }

    /// Up to `limit` pairs with `start <= key < end` (`end` empty: to the end), in key order.
    pub async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, ClientError> {
        let count = limit.to_string();
        match self.call_for(start, &[b"RANGE", start, end, count.as_bytes()]).await? {
            Reply::Array(items) => {
                let mut items = items.into_iter();
                let mut pairs = Vec::new();
                while let (Some(Reply::Bulk(key)), Some(Reply::Bulk(value))) = (items.next(), items.next()) {
                    pairs.push((key, value));
                }
                Ok(pairs)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Splits the range holding `key` so that `key` starts a range of its own, served by a new group on the same
    /// nodes (`SPLIT`); done once applied where the range's group leads. Sent through the node first given, whose
    /// routes then hold the split, and learned from it.
    pub async fn split(&self, key: &[u8]) -> Result<(), ClientError> {
        match self.call(&self.seed.clone(), &[b"SPLIT", key]).await? {
            Reply::Simple(_) => self.refresh_routes().await,
            Reply::Error(text) => Err(ClientError::Server(text)),
            other => Err(unexpected(other)),
        }
    }

    /// Merges the range holding `key` into its left neighbour, one group then serving both (`MERGE`); done once
    /// committed. Sent through the node first given, and the routes learned from it.
    pub async fn merge_left(&self, key: &[u8]) -> Result<(), ClientError> {
        match self.call(&self.seed.clone(), &[b"MERGE", key]).await? {
            Reply::Simple(_) => self.refresh_routes().await,
            Reply::Error(text) => Err(ClientError::Server(text)),
            other => Err(unexpected(other)),
        }
    }

    /// Asks for the routes again (from the node first given).
    pub async fn refresh_routes(&self) -> Result<(), ClientError> {
        let reply = self.call(&self.seed.clone(), &[b"ROUTES"]).await?;
        let Reply::Array(items) = reply else { return Err(unexpected(reply)) };
        let mut routes = Vec::with_capacity(items.len());
        for item in items {
            let Reply::Array(fields) = item else {
                return Err(ClientError::Protocol("a route that is not an array".into()));
            };
            let mut fields = fields.into_iter();
            let (
                Some(Reply::Bulk(start)),
                Some(Reply::Bulk(end)),
                Some(Reply::Integer(group)),
                Some(Reply::Integer(leader)),
            ) = (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(ClientError::Protocol("a route without its fields".into()));
            };
            let leader_addr = match fields.next() {
                Some(Reply::Bulk(addr)) => Some(String::from_utf8_lossy(&addr).into_owned()),
                _ => None,
            };
            routes.push(Route { start, end, group_id: group as u64, leader: leader as u64, leader_addr });
        }
        *self.routes.lock() = (routes, Instant::now());
        Ok(())
    }

    /// Asks for the routes again if they are older than `ROUTES_TTL` (a failure keeps the old ones).
    async fn refresh_if_stale(&self) {
        let stale = self.routes.lock().1.elapsed() > ROUTES_TTL;
        if stale {
            let _ = self.refresh_routes().await;
        }
    }

    /// Sends `args` to the node that leads `key`'s range (or the seed), once more to the seed if that fails.
    async fn call_for(&self, key: &[u8], args: &[&[u8]]) -> Result<Reply, ClientError> {
        self.refresh_if_stale().await;
        let addr = leader_addr(&self.routes.lock().0, key).unwrap_or(&self.seed).clone();
        let mut request = Vec::new();
        encode_request(args, &mut request);
        let reply = self.exchange_or_seed(&addr, &request, 1).await?.pop().expect("one reply read");
        match reply {
            Reply::Error(text) => Err(ClientError::Server(text)),
            reply => Ok(reply),
        }
    }

    /// [`Client::exchange`] with `addr`; if it cannot be reached (and is not the seed), the routes are asked
    /// again and the requests sent to the seed instead, which forwards them.
    async fn exchange_or_seed(&self, addr: &str, requests: &[u8], count: usize) -> Result<Vec<Reply>, ClientError> {
        match self.exchange(addr, requests, count).await {
            Err(ClientError::Unreachable(_)) if addr != self.seed => {
                let _ = self.refresh_routes().await;
                self.exchange(&self.seed, requests, count).await
            }
            other => other,
        }
    }

    /// One request on a pooled connection to `addr`.
    async fn call(&self, addr: &str, args: &[&[u8]]) -> Result<Reply, ClientError> {
        let mut request = Vec::new();
        encode_request(args, &mut request);
        let mut replies = self.exchange(addr, &request, 1).await?;
        Ok(replies.pop().expect("one reply read"))
    }

    /// Writes `requests` (`count` encoded requests, pipelined) on a pooled connection to `addr` and reads their
    /// `count` replies, in order.
    async fn exchange(&self, addr: &str, requests: &[u8], count: usize) -> Result<Vec<Reply>, ClientError> {
        let pooled = self.idle.lock().get_mut(addr).and_then(Vec::pop);
        let mut stream = match pooled {
            Some(stream) => stream,
            None => {
                let connect = tokio::time::timeout(self.timeout, TcpStream::connect(addr));
                let stream = connect
                    .await
                    .map_err(|_| ClientError::Unreachable(format!("{addr}: connect timed out")))?
                    .map_err(|e| ClientError::Unreachable(format!("{addr}: {e}")))?;
                let _ = stream.set_nodelay(true);
                stream
            }
        };
        let exchange = async {
            stream.write_all(requests).await?;
            let mut buffer = BytesMut::with_capacity(256);
            let mut replies = Vec::with_capacity(count);
            while replies.len() < count {
                match parse_reply(&mut buffer, REPLY_BULK_BYTES_MAX)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.0))?
                {
                    Some(reply) => replies.push(reply),
                    None if stream.read_buf(&mut buffer).await? == 0 => {
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
                    }
                    None => {}
                }
            }
            Ok::<Vec<Reply>, std::io::Error>(replies)
        };
        let replies = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Unreachable(format!("{addr}: no answer in time")))?
            .map_err(|e| ClientError::Unreachable(format!("{addr}: {e}")))?;
        let mut idle = self.idle.lock();
        let connections = idle.entry(addr.to_string()).or_default();
        if connections.len() < IDLE_CONNECTIONS_MAX {
            connections.push(stream);
        }
        Ok(replies)
    }
}

/// Where the leader of `key`'s range serves clients, if the routes know.
fn leader_addr<'a>(routes: &'a [Route], key: &[u8]) -> Option<&'a String> {
    routes.iter().find(|route| route.contains(key)).and_then(|route| route.leader_addr.as_ref())
}

fn unexpected(reply: Reply) -> ClientError {
    match reply {
        Reply::Error(text) => ClientError::Server(text),
        other => ClientError::Protocol(format!("{other:?}")),
    }
}

/// [`Client`] for code that does not run on tokio: each call blocks on a runtime of its own.
pub struct BlockingClient {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl BlockingClient {
    pub fn connect(addr: &str) -> Result<BlockingClient, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Unreachable(format!("starting a runtime: {e}")))?;
        let client = runtime.block_on(Client::connect(addr))?;
        Ok(BlockingClient { runtime, client })
    }

    pub fn routes(&self) -> Vec<Route> {
        self.client.routes()
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.runtime.block_on(self.client.get(key))
    }

    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        self.runtime.block_on(self.client.put(key, value))
    }

    pub fn put_many<K: AsRef<[u8]>, V: AsRef<[u8]>>(&self, pairs: &[(K, V)]) -> Result<(), ClientError> {
        self.runtime.block_on(self.client.put_many(pairs))
    }

    pub fn delete(&self, key: &[u8]) -> Result<bool, ClientError> {
        self.runtime.block_on(self.client.delete(key))
    }

    pub fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, ClientError> {
        self.runtime.block_on(self.client.scan(start, end, limit))
    }

    pub fn split(&self, key: &[u8]) -> Result<(), ClientError> {
        self.runtime.block_on(self.client.split(key))
    }

    pub fn merge_left(&self, key: &[u8]) -> Result<(), ClientError> {
        self.runtime.block_on(self.client.merge_left(key))
    }
}
