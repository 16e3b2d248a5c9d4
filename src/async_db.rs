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

use flotilla_engine::state_machine::KeyValue;
use flotilla_raftstore::peer::PeerError;
use flotilla_raftstore::store::{PeerMsg, ReadRequest};

use flotilla_router::route::Attempt;

use crate::db::{pairs, value, written, Db, DbError, WriteBatch};

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
        position: usize,
        mut make: impl FnMut(oneshot::Sender<Result<T, PeerError>>) -> PeerMsg,
    ) -> Result<T, DbError> {
        let deadline = self.db.deadline();
        loop {
            let pause = match self.db.send_attempt(position, &mut make) {
                Ok((node, answer)) => {
                    let remaining = deadline.saturating_duration_since(std::time::Instant::now());
                    let got = tokio::time::timeout(remaining, answer).await.ok().and_then(Result::ok);
                    match self.db.table().judge(position, node, got, deadline) {
                        Attempt::Done(value) => return Ok(value),
                        Attempt::Fail(error) => return Err(error.into()),
                        Attempt::Retry(pause) => pause,
                    }
                }
                Err(_) if std::time::Instant::now() >= deadline => {
                    return Err(DbError::Busy("the group's mailbox stayed full".into()))
                }
                Err(pause) => pause,
            };
            tokio::time::sleep(pause).await;
        }
    }

    pub async fn write_batch(&self, batch: WriteBatch) -> Result<(), DbError> {
        let (position, command) = self.db.write_request(batch)?;
        written(self.call(position, |reply| PeerMsg::Write { command: command.clone(), reply }).await?)
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
        let position = self.db.get_request(key)?;
        if let Some(local) = self.db.local_get(position, key) {
            return local;
        }
        let request = |reply| PeerMsg::Read { request: ReadRequest::Get(key.to_vec()), reply };
        value(self.call(position, request).await?)
    }

    pub async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, DbError> {
        let mut out = Vec::new();
        for position in self.db.scan_positions(start, end)? {
            if out.len() >= limit {
                break;
            }
            if let Some(local) = self.db.local_scan(position, start, end, limit - out.len()) {
                out.extend(local?);
                continue;
            }
            let request = self.db.scan_request(position, start, end, limit - out.len());
            out.extend(pairs(self.call(position, |reply| PeerMsg::Read { request: request.clone(), reply }).await?)?);
        }
        Ok(out)
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
