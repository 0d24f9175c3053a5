//! The `slotd.v1.Admin` service: converts, calls the driver (pool changes through the
//! [`PoolStore`]), maps errors. No scheduling logic here.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use slotd_proto::v1::{self as pb, admin_server::Admin};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    driver::{
        DrainCounts, DriverHandle,
        watch::{self, DrainError, WatchItem},
    },
    grpc::{convert, status},
    pool_store::{ChangeError, PoolStore},
    scheduler::{Error, LeaseId, PoolId},
    state::StateFile,
};

/// The operator-facing service.
#[derive(Clone, Debug)]
pub struct AdminService {
    driver: DriverHandle,
    store: PoolStore,
    max_pools: usize,
}

impl AdminService {
    /// Snapshot interval of a Watch that does not choose one.
    pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);
    /// Shortest snapshot interval honoured (a tiny one would turn Watch into a Status busy loop).
    pub const MIN_SNAPSHOT_INTERVAL: Duration = Duration::from_millis(100);
    /// Longest snapshot interval accepted (1 h); a longer one is refused with INVALID_ARGUMENT
    /// (zero asks for the first snapshot only).
    pub const MAX_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(3600);
    /// Longest Drain `timeout` accepted (24 h); leave it unset to wait until the leases are gone.
    pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

    /// A service that talks to this driver, persists pool changes to `state` (when set), and lets
    /// the pool count grow to `max_pools`.
    pub fn new(driver: DriverHandle, state: Option<Arc<StateFile>>, max_pools: usize) -> Self {
        Self { store: PoolStore::new(driver.clone(), state), driver, max_pools }
    }

    /// With high availability: pool changes are also written to etcd under the leader's epoch.
    pub fn with_durable(mut self, durable: Option<crate::ha::Durable>) -> Self {
        self.store = self.store.with_durable(durable);
        self
    }
}

fn change_status(e: ChangeError) -> Status {
    match e {
        ChangeError::Refused(e) => status::to_status(&e),
        ChangeError::State(e) => status::persist_failed(&e),
        ChangeError::Durable(e) => status::not_stored(&e),
        ChangeError::Task(e) => status::internal(&format!("admin task failed: {e}")),
    }
}

fn pool_name(field: &str, name: &str) -> Result<PoolId, Error> {
    PoolId::parse(name).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

fn out_of_range(field: &str, got: Duration, max: Duration) -> Error {
    Error::InvalidArgument(format!(
        "{field} = {} is above the maximum {}",
        humantime::format_duration(got),
        humantime::format_duration(max)
    ))
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
        let up = self.store.upsert(id, patch, self.max_pools).await.map_err(change_status)?;
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
        let done = self.store.delete(id).await.map_err(change_status)?;
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
        if let Some(t) = timeout.filter(|t| *t > Self::MAX_DRAIN_TIMEOUT) {
            return Err(out_of_range("timeout", t, Self::MAX_DRAIN_TIMEOUT).into());
        }
        let rx = watch::drain(self.driver.clone(), timeout).await?;
        let stream = ReceiverStream::new(rx).map(|item| match item {
            Ok(counts) => Ok(progress(counts)),
            Err(DrainError::Timeout { leases }) => Err(status::drain_timeout(leases)),
            Err(DrainError::Driver(e)) => Err(status::to_status(&e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn force_breaker(
        &self,
        req: Request<pb::BreakerForceRequest>,
    ) -> Result<Response<pb::BreakerForceResponse>, Status> {
        let r = req.into_inner();
        let pool = pool_name("pool", &r.pool)?;
        let to = convert::breaker_force(r.to)?;
        let reason = crate::scheduler::ids::truncate(&r.reason, 256).to_owned();
        let view = self.driver.force_breaker(pool, to, reason).await?;
        Ok(Response::new(pb::BreakerForceResponse { status: Some(convert::breaker_status(view, true)) }))
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
            Some(d) if d > Self::MAX_SNAPSHOT_INTERVAL => {
                return Err(out_of_range("snapshot_interval", d, Self::MAX_SNAPSHOT_INTERVAL).into());
            }
            Some(d) => Some(d.max(Self::MIN_SNAPSHOT_INTERVAL)),
        };
        let rx = watch::watch(self.driver.clone(), pool, interval).await?;
        let stream = ReceiverStream::new(rx).filter_map(|item| {
            futures::future::ready(match item {
                Ok(WatchItem::Snapshot(s)) => Some(Ok(convert::watch_snapshot(s))),
                Ok(WatchItem::Change(p)) => convert::watch_event(*p).map(Ok),
                Err(e) => Some(Err(status::to_status(&e))),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
