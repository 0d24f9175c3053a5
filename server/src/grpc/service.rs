//! The `slotd.v1.Slotd` service: converts, calls the driver, maps errors. No scheduling logic here.

use std::{pin::Pin, time::Duration};

use futures::Stream;
use slotd_proto::v1::{self as pb, slotd_server::Slotd};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    driver::{DriverHandle, Outbound},
    grpc::{convert, limits::StreamLimits, session::SessionStream},
    scheduler::PoolId,
};

/// The metadata key a client sets to keep its leases across a reconnect, e.g. `slotd-resume-grace: 5s`.
pub use slotd_proto::RESUME_GRACE_HEADER;

/// The agent-facing service.
#[derive(Clone, Debug)]
pub struct SlotdService {
    driver: DriverHandle,
    stream_buffer: usize,
    max_resume_grace: Duration,
    limits: Option<StreamLimits>,
    /// With high availability: the role and epoch Status reports in its metadata.
    role: Option<crate::ha::RoleReader>,
}

impl SlotdService {
    /// A service that talks to this driver.
    pub fn new(driver: DriverHandle, stream_buffer: usize, max_resume_grace: Duration) -> Self {
        Self { driver, stream_buffer, max_resume_grace, limits: None, role: None }
    }

    /// Reports the role and epoch (`slotd-role`, `slotd-epoch`) in Status's response metadata.
    pub fn with_role(mut self, role: Option<crate::ha::RoleReader>) -> Self {
        self.role = role;
        self
    }

    /// Bounds the open Acquire streams (in all and per connection).
    pub fn with_stream_limits(mut self, limits: StreamLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    fn resume_grace<T>(&self, req: &Request<T>) -> Result<Duration, Status> {
        let Some(v) = req.metadata().get(RESUME_GRACE_HEADER) else {
            return Ok(Duration::ZERO);
        };
        let grace =
            v.to_str().ok().and_then(|s| humantime::parse_duration(s.trim()).ok()).ok_or_else(|| {
                Status::invalid_argument(format!("{RESUME_GRACE_HEADER}: want a duration like \"5s\""))
            })?;
        Ok(grace.min(self.max_resume_grace))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Slotd for SlotdService {
    type AcquireStream = EventStream;

    async fn acquire(
        &self,
        req: Request<Streaming<pb::ClientMessage>>,
    ) -> Result<Response<EventStream>, Status> {
        let grace = self.resume_grace(&req)?;
        // Held by the response stream: the stream's place is given back when it ends.
        let permit = match &self.limits {
            Some(l) => Some(l.admit(req.remote_addr())?),
            None => None,
        };
        let (tx, rx) = mpsc::channel::<Outbound>(self.stream_buffer);
        let session = self.driver.open(tx, grace)?;
        let out = SessionStream::new(req.into_inner(), rx, self.driver.clone(), session, permit);
        Ok(Response::new(Box::pin(out)))
    }

    async fn report_rate_limit(
        &self,
        req: Request<pb::ReportRateLimitRequest>,
    ) -> Result<Response<pb::ReportRateLimitResponse>, Status> {
        let r = req.into_inner();
        let pool = PoolId::parse(&r.pool)?;
        let retry_after = convert::duration("retry_after", r.retry_after)?;
        let reason = crate::scheduler::ids::truncate(&r.reason, 256).to_owned();
        let applied = match r.outcome {
            // Unset is the 429 this RPC was first made for.
            0 => self.driver.report_rate_limit(pool, retry_after, reason).await?,
            code => {
                let outcome = convert::outcome(code, r.retry_after)?;
                self.driver.report_outcome(pool, outcome, reason).await?
            }
        };
        Ok(Response::new(pb::ReportRateLimitResponse {
            paused_until: Some(convert::timestamp(applied.until)),
            effective_limit: applied.effective_limit,
        }))
    }

    async fn report_usage(
        &self,
        req: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        let r = req.into_inner();
        let pool = PoolId::parse(&r.pool)?;
        let usage = r.usage.map(convert::usage).transpose()?;
        let limits = convert::provider_limits(r.provider_limits)?;
        let budget = self.driver.report_usage(pool, usage, limits).await?;
        Ok(Response::new(pb::ReportUsageResponse { budget: budget.map(convert::budget_status) }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let r = req.into_inner();
        let pool = if r.pool.is_empty() { None } else { Some(PoolId::parse(&r.pool)?) };
        let snap = self.driver.status(pool).await?;
        // Converting 10,000 leases takes milliseconds: off the runtime's worker threads, so the streams
        // they serve (grants, releases) do not wait behind it. The lock was held only for the copy.
        let resp = tokio::task::spawn_blocking(move || convert::status_response(snap))
            .await
            .map_err(|e| Status::internal(format!("building the status failed: {e}")))?;
        let mut resp = Response::new(resp);
        if let Some(role) = &self.role {
            let st = role.get();
            let md = resp.metadata_mut();
            md.insert(slotd_proto::ROLE_HEADER, tonic::metadata::MetadataValue::from_static(st.role.label()));
            md.insert(slotd_proto::EPOCH_HEADER, st.epoch.into());
        }
        Ok(resp)
    }
}
