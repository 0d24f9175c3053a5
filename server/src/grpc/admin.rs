//! The `slotd.v1.Admin` service: converts, calls the driver, persists pool changes, maps errors.
//! No scheduling logic here.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use slotd_proto::v1::{self as pb, admin_server::Admin};
use tokio::{
    sync::{broadcast::error::RecvError, mpsc},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    driver::{DrainCounts, DriverHandle},
    grpc::{convert, status},
    scheduler::{Error, LeaseId, PoolId},
    state::StateFile,
};

/// The operator-facing service.
#[derive(Clone, Debug)]
pub struct AdminService {
    driver: DriverHandle,
    state: Option<Arc<StateFile>>,
    max_pools: usize,
}

impl AdminService {
    /// How often Drain checks whether the leases have ended.
    pub const DRAIN_POLL: Duration = Duration::from_millis(50);
    /// Snapshot interval of a Watch that does not choose one.
    pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);
    /// Shortest snapshot interval honoured (a tiny one would turn Watch into a Status busy loop).
    pub const MIN_SNAPSHOT_INTERVAL: Duration = Duration::from_millis(100);

    /// A service that talks to this driver, persists pool changes to `state` (when set), and lets
    /// the pool count grow to `max_pools`.
    pub fn new(driver: DriverHandle, state: Option<Arc<StateFile>>, max_pools: usize) -> Self {
        Self { driver, state, max_pools }
    }

    /// Runs a pool change and writes the resulting pool set, under the state file's lock so writes
    /// land in the order the changes were applied. It runs in its own task: once the driver has
    /// applied a change, the write must happen even if the client goes away.
    async fn change_pools<T: Send + 'static>(
        &self,
        change: impl Future<Output = Result<(T, crate::state::Pools), Error>> + Send + 'static,
    ) -> Result<T, Status> {
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            let _guard = match &state {
                Some(s) => Some(s.lock().await),
                None => None,
            };
            let (out, pools) = change.await?;
            if let Some(s) = &state {
                s.save(pools).await.map_err(|e| status::persist_failed(&e))?;
            }
            Ok::<_, Status>(out)
        });
        task.await.map_err(|e| status::internal(&format!("admin task failed: {e}")))?
    }
}

fn pool_name(field: &str, name: &str) -> Result<PoolId, Error> {
    PoolId::parse(name).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

fn progress(c: DrainCounts) -> pb::DrainProgress {
    pb::DrainProgress {
        leases_remaining: u32::try_from(c.leases).unwrap_or(u32::MAX),
        queued: u32::try_from(c.queued).unwrap_or(u32::MAX),
        done: c.leases == 0,
    }
}

type DrainStream = Pin<Box<dyn Stream<Item = Result<pb::DrainProgress, Status>> + Send>>;
type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    type DrainStream = DrainStream;
    type WatchStream = WatchStream;

    async fn upsert_pool(
        &self,
        req: Request<pb::UpsertPoolRequest>,
    ) -> Result<Response<pb::UpsertPoolResponse>, Status> {
        let spec = req.into_inner().pool.ok_or_else(|| Error::InvalidArgument("pool: required".into()))?;
        let (id, patch) = convert::pool_patch(spec)?;
        let (driver, max_pools) = (self.driver.clone(), self.max_pools);
        let up = self
            .change_pools(async move {
                let up = driver.upsert_pool(id, patch, max_pools).await?;
                let pools = up.pools.clone();
                Ok((up, pools))
            })
            .await?;
        Ok(Response::new(pb::UpsertPoolResponse {
            pool: Some(convert::pool_status(up.status)),
            created: up.created,
        }))
    }

    async fn delete_pool(
        &self,
        req: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        let id = pool_name("name", &req.into_inner().name)?;
        let driver = self.driver.clone();
        let done = self.change_pools(async move { driver.delete_pool(id).await }).await?;
        Ok(Response::new(pb::DeletePoolResponse {
            rejected_waiters: done.rejected_waiters,
            expired_leases: done.expired_leases,
        }))
    }

    async fn pause_pool(
        &self,
        req: Request<pb::PausePoolRequest>,
    ) -> Result<Response<pb::PausePoolResponse>, Status> {
        let r = req.into_inner();
        let pool = pool_name("pool", &r.pool)?;
        let duration = convert::duration("duration", r.duration)?
            .ok_or_else(|| Error::InvalidArgument("duration: required, > 0".into()))?;
        let reason = crate::scheduler::ids::truncate(&r.reason, 256).to_owned();
        let until = self.driver.pause_pool(pool, duration, reason).await?;
        Ok(Response::new(pb::PausePoolResponse { paused_until: Some(convert::timestamp(until)) }))
    }

    async fn resume_pool(
        &self,
        req: Request<pb::ResumePoolRequest>,
    ) -> Result<Response<pb::ResumePoolResponse>, Status> {
        let pool = pool_name("pool", &req.into_inner().pool)?;
        let was_paused = self.driver.resume_pool(pool).await?;
        Ok(Response::new(pb::ResumePoolResponse { was_paused }))
    }

    async fn revoke_lease(
        &self,
        req: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        let id: LeaseId = req.into_inner().lease_id.parse()?;
        let lease = self.driver.revoke(id).await?;
        Ok(Response::new(pb::RevokeLeaseResponse {
            pool: lease.pool.to_string(),
            holder: lease.holder.to_string(),
        }))
    }

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Result<Response<DrainStream>, Status> {
        let timeout = convert::duration("timeout", req.into_inner().timeout)?;
        let first = self.driver.set_draining(true).await?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let driver = self.driver.clone();
        let (tx, rx) = mpsc::channel(16);
        // Polling is simpler than following lease ends through Watch, and 50 ms is plenty for an
        // operator waiting on leases that last seconds or minutes.
        tokio::spawn(async move {
            let mut counts = first;
            let mut last = None;
            loop {
                if last != Some(counts) {
                    if tx.send(Ok(progress(counts))).await.is_err() {
                        return;
                    }
                    last = Some(counts);
                }
                if counts.leases == 0 {
                    return;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    let _ = tx.send(Err(status::drain_timeout(counts.leases))).await;
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(AdminService::DRAIN_POLL) => {}
                    () = tx.closed() => return,
                }
                counts = match driver.counts().await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(status::to_status(&e))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn undrain(&self, _: Request<pb::UndrainRequest>) -> Result<Response<pb::UndrainResponse>, Status> {
        self.driver.set_draining(false).await?;
        Ok(Response::new(pb::UndrainResponse {}))
    }

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let r = req.into_inner();
        let pool = if r.pool.is_empty() { None } else { Some(pool_name("pool", &r.pool)?) };
        let interval = match convert::duration("snapshot_interval", r.snapshot_interval)? {
            None => Some(Self::DEFAULT_SNAPSHOT_INTERVAL),
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d.max(Self::MIN_SNAPSHOT_INTERVAL)),
        };
        let (snapshot, mut changes) = self.driver.watch(pool.clone()).await?;
        let driver = self.driver.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            if tx.send(Ok(convert::watch_snapshot(snapshot))).await.is_err() {
                return;
            }
            let mut ticker = interval.map(|d| tokio::time::interval_at(Instant::now() + d, d));
            loop {
                let periodic = async {
                    match ticker.as_mut() {
                        Some(t) => {
                            t.tick().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                let msg = tokio::select! {
                    () = tx.closed() => return,
                    () = periodic => driver.status(pool.clone()).await.map(convert::watch_snapshot),
                    change = changes.recv() => match change {
                        Ok((at, event)) => {
                            if pool.as_ref().is_some_and(|p| event.pool() != Some(p)) {
                                continue;
                            }
                            Ok(convert::watch_event(at, event))
                        }
                        // Too slow for the change rate: start over from a fresh snapshot rather than
                        // end the stream (a dashboard wants the current state, not every step).
                        Err(RecvError::Lagged(_)) => driver.watch(pool.clone()).await.map(|(s, rx)| {
                            changes = rx;
                            convert::watch_snapshot(s)
                        }),
                        Err(RecvError::Closed) => Err(Error::ShuttingDown),
                    },
                };
                let end = msg.is_err();
                if tx.send(msg.map_err(|e| status::to_status(&e))).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
