//! [`AsyncDb`]: the embedded database for async code on tokio. The same operations as [`Db`], awaiting instead of
//! blocking a thread: requests wait on oneshot replies (futures), and timeouts and back-offs use tokio's timer.
//!
//! ```no_run
//! # async fn example() -> Result<(), flotilla::DbError> {
//! let db = flotilla::AsyncDb::new(flotilla::Db::open("/tmp/flotilla-async")?);
//! db.put(b"hello", b"world").await?;
//! assert_eq!(db.get(b"hello").await?, Some(b"world".to_vec()));
//! db.close()?;
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::Instant;

use flotilla_engine::state_machine::KeyValue;
use flotilla_raftstore::peer::PeerError;
use flotilla_raftstore::store::{PeerMsg, ReadRequest};

use crate::db::{judged, pairs, value, written, Db, DbError, WriteBatch};
use crate::db_routes::DbRoutes;

/// A cheaply cloned async handle on a [`Db`].
#[derive(Clone)]
pub struct AsyncDb {
    db: Arc<Db>,
}

impl AsyncDb {
    pub fn new(db: Db) -> AsyncDb {
        AsyncDb { db: Arc::new(db) }
    }

    /// The blocking API of the same database (for code outside the runtime).
    pub fn blocking(&self) -> &Db {
        &self.db
    }

    /// As [`Db::call`], awaiting instead of blocking.
    async fn call<T>(
        &self,
        routes: &DbRoutes,
        position: usize,
        deadline: Instant,
        mut make: impl FnMut(oneshot::Sender<Result<T, PeerError>>) -> PeerMsg,
    ) -> Result<Option<T>, DbError> {
        loop {
            let attempt = match self.db.send_attempt(routes, position, &mut make) {
                Ok((node, answer)) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    Ok((node, tokio::time::timeout(remaining, answer).await.ok().and_then(Result::ok)))
                }
                Err(pause) => Err(pause),
            };
            match judged(routes, position, deadline, attempt) {
                Ok(done) => return done,
                Err(pause) => tokio::time::sleep(pause).await,
            }
        }
    }

    pub async fn write_batch(&self, batch: WriteBatch) -> Result<(), DbError> {
        let command = self.db.write_command(batch)?;
        let deadline = self.db.deadline();
        loop {
            let routes = self.db.routes();
            let position = routes.route_write(&command).map_err(|e| self.db.users_error(e))?;
            let make = |reply| PeerMsg::Write { command: command.clone(), reply };
            match self.call(&routes, position, deadline, make).await.map_err(|e| self.db.users_error(e))? {
                Some(outcome) => return written(outcome),
                None => tokio::time::sleep(self.db.rerouted(&routes, deadline)?).await,
            }
        }
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        let mut batch = WriteBatch::new();
        batch.put(key, value);
        self.write_batch(batch).await
    }

    pub async fn delete(&self, key: &[u8]) -> Result<(), DbError> {
        let mut batch = WriteBatch::new();
        batch.delete(key);
        self.write_batch(batch).await
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.db.check_key(key)?;
        let key = &*self.db.stored(key);
        let deadline = self.db.deadline();
        loop {
            let routes = self.db.routes();
            let position = routes.table.position_of(key);
            if let Some(local) = self.db.local_get(&routes, position, key) {
                return local;
            }
            let make = |reply| PeerMsg::Read { request: ReadRequest::Get(key.to_vec()), reply };
            match self.call(&routes, position, deadline, make).await? {
                Some(result) => return value(result),
                None => tokio::time::sleep(self.db.rerouted(&routes, deadline)?).await,
            }
        }
    }

    pub async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, DbError> {
        let (start, end) = self.db.keys().stored_bounds(start, end);
        let (start, end) = (&*start, &*end);
        let deadline = self.db.deadline();
        let mut out = Vec::new();
        let mut from = start.to_vec();
        'routes: loop {
            let routes = self.db.routes();
            for position in routes.table.scan_positions(&from, end)? {
                if out.len() >= limit {
                    break;
                }
                let part = match self.db.local_scan(&routes, position, &from, end, limit - out.len()) {
                    Some(local) => local?,
                    None => {
                        let request = routes.scan_request(position, &from, end, limit - out.len());
                        let make = |reply| PeerMsg::Read { request: request.clone(), reply };
                        match self.call(&routes, position, deadline, make).await? {
                            Some(result) => pairs(result)?,
                            None => {
                                tokio::time::sleep(self.db.rerouted(&routes, deadline)?).await;
                                continue 'routes;
                            }
                        }
                    }
                };
                out.extend(part);
                from = routes.table.range(position).end.clone();
            }
            return Ok(self.db.keys().users_pairs(out));
        }
    }

    /// Closes the database once this is the last handle (it blocks briefly: threads stop, the state machine
    /// flushes); with other handles alive it refuses.
    pub fn close(self) -> Result<(), DbError> {
        match Arc::try_unwrap(self.db) {
            Ok(db) => db.close(),
            Err(_) => Err(DbError::InvalidArgument("other handles to the database are still alive".into())),
        }
    }
}
