//! The semaphores the bench can drive: slotd's Acquire stream, or a Redis list semaphore for comparison.

use std::sync::Arc;

use clap::ValueEnum;
use futures::future::try_join_all;
use serde::Serialize;

use crate::{
    BoxError,
    modes::Ctx,
    wire::{self, Session},
};

/// The semaphore a mode drives.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// slotd's Acquire stream.
    Slotd,
    /// K tokens in a Redis list: BLPOP to acquire, RPUSH to release (no leases: a crashed holder
    /// leaks its token).
    RedisList,
}

/// One session's handle on the semaphore.
pub enum Sem {
    Slotd { s: Session, pool: Arc<str>, n: u64 },
    Redis { conn: redis::aio::MultiplexedConnection, key: Arc<str> },
}

impl Sem {
    /// Waits for a slot; returns what releases it.
    pub async fn acquire(&mut self) -> Result<String, BoxError> {
        match self {
            Sem::Slotd { s, pool, n } => {
                *n += 1;
                let id = n.to_string();
                s.send(wire::request(&id, pool, None)).await?;
                Ok(s.answer(&id, false).await?.expect("answer waits for the grant"))
            }
            Sem::Redis { conn, key } => {
                let (_, token): (String, String) =
                    redis::cmd("BLPOP").arg(&**key).arg(0).query_async(conn).await?;
                Ok(token)
            }
        }
    }

    /// Gives the slot back without waiting for the daemon's `Released` (Redis answers RPUSH anyway).
    pub async fn release(&mut self, token: String) -> Result<(), BoxError> {
        match self {
            Sem::Slotd { s, .. } => s.send(wire::release(token)).await,
            Sem::Redis { conn, key } => {
                redis::cmd("RPUSH").arg(&**key).arg(token).query_async::<()>(conn).await?;
                Ok(())
            }
        }
    }

    /// Gives the slot back and waits until the server has applied it (slotd: `Released`).
    pub async fn release_confirmed(&mut self, token: String) -> Result<(), BoxError> {
        match self {
            Sem::Slotd { s, .. } => {
                s.send(wire::release(token.clone())).await?;
                s.released(&token).await
            }
            Sem::Redis { .. } => self.release(token).await,
        }
    }

    /// `n` sessions on separate connections to `ctx`'s endpoint. Redis gets a fresh list of `slots`
    /// tokens, which the returned [`Cleanup`] deletes.
    pub async fn open_all(
        backend: Backend,
        ctx: &Ctx<'_>,
        n: usize,
        slots: u32,
    ) -> Result<(Vec<Sem>, Cleanup), BoxError> {
        let endpoint = ctx.daemon.endpoint.as_str();
        let pool: Arc<str> = Arc::from(ctx.pool.as_str());
        match backend {
            Backend::Slotd => {
                let sessions = try_join_all((0..n).map(|_| async {
                    let s = Session::open(wire::connect(endpoint).await?).await?;
                    Ok::<_, BoxError>(Sem::Slotd { s, pool: pool.clone(), n: 0 })
                }))
                .await?;
                Ok((sessions, Cleanup(None)))
            }
            Backend::RedisList => {
                let client = redis::Client::open(endpoint)?;
                let key: Arc<str> = format!("slotd-bench:{}:{}", std::process::id(), pool).into();
                let mut admin = redis_conn(&client).await?;
                redis::cmd("DEL").arg(&*key).query_async::<()>(&mut admin).await?;
                for i in 0..slots {
                    redis::cmd("RPUSH").arg(&*key).arg(i).query_async::<()>(&mut admin).await?;
                }
                let sessions = try_join_all((0..n).map(|_| async {
                    Ok::<_, BoxError>(Sem::Redis { conn: redis_conn(&client).await?, key: key.clone() })
                }))
                .await?;
                Ok((sessions, Cleanup(Some((admin, key)))))
            }
        }
    }
}

/// Removes what [`Sem::open_all`] set up on Redis.
pub struct Cleanup(Option<(redis::aio::MultiplexedConnection, Arc<str>)>);

impl Cleanup {
    /// Deletes the token list, if any.
    pub async fn run(self) -> Result<(), BoxError> {
        if let Some((mut admin, key)) = self.0 {
            redis::cmd("DEL").arg(&*key).query_async::<()>(&mut admin).await?;
        }
        Ok(())
    }
}

/// A Redis connection of its own (BLPOP blocks the connection), with no response timeout.
async fn redis_conn(client: &redis::Client) -> Result<redis::aio::MultiplexedConnection, BoxError> {
    let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    Ok(client.get_multiplexed_async_connection_with_config(&cfg).await?)
}
