//! The `slotd.v1.Slotd` service: converts, calls the driver, maps errors. No scheduling logic here.

use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use slotd_proto::v1::{self as pb, slotd_server::Slotd};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::debug;

use crate::{
    driver::{DriverHandle, Outbound},
    grpc::{convert, limits::StreamLimits, status::to_status},
    scheduler::{Error, PoolId, SessionId},
};

/// The metadata key a client sets to keep its leases across a reconnect, e.g. `slotd-resume-grace: 5s`.
pub const RESUME_GRACE_HEADER: &str = "slotd-resume-grace";

/// The agent-facing service.
#[derive(Clone, Debug)]
pub struct SlotdService {
    driver: DriverHandle,
    stream_buffer: usize,
    max_resume_grace: Duration,
    limits: Option<StreamLimits>,
}

impl SlotdService {
    /// A service that talks to this driver.
    pub fn new(driver: DriverHandle, stream_buffer: usize, max_resume_grace: Duration) -> Self {
        Self { driver, stream_buffer, max_resume_grace, limits: None }
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

/// Closes the session when the response stream is dropped (the client went away).
struct CloseOnDrop {
    driver: DriverHandle,
    session: SessionId,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.driver.close(self.session, None);
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
        let session = self.driver.open(tx, grace).await?;
        let guard = CloseOnDrop { driver: self.driver.clone(), session };
        let mut inbound = req.into_inner();
        let driver = self.driver.clone();
        // Dropped with the response stream. Once the daemon has ended the stream (shutdown, a client
        // that fell behind), stop reading the request side too: holding it open would keep the
        // connection busy, and graceful shutdown would wait for the client forever.
        let (response_alive, mut response_gone) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let error = loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = &mut response_gone => break None,
                };
                match next {
                    Ok(Some(msg)) => {
                        if driver.op(session, convert::stream_op(msg)).await.is_err() {
                            break None;
                        }
                    }
                    Ok(None) => break None,
                    Err(status) => {
                        debug!(session = session.0, %status, "inbound stream error");
                        break Some(match status.code() {
                            Code::ResourceExhausted | Code::OutOfRange => {
                                Error::LimitExceeded(status.message().into())
                            }
                            Code::Cancelled | Code::Unknown | Code::Unavailable | Code::Internal => {
                                break None;
                            }
                            _ => Error::InvalidArgument(status.message().into()),
                        });
                    }
                }
            };
            driver.close(session, error);
        });
        let out = ReceiverStream::new(rx).map(move |item| {
            let _keep = (&guard, &response_alive, &permit);
            item.map(convert::server_message).map_err(|e| to_status(&e))
        });
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
        let applied = self.driver.report_rate_limit(pool, retry_after, reason).await?;
        Ok(Response::new(pb::ReportRateLimitResponse {
            paused_until: Some(convert::timestamp(applied.until)),
            effective_limit: applied.effective_limit,
        }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let r = req.into_inner();
        let pool = if r.pool.is_empty() { None } else { Some(PoolId::parse(&r.pool)?) };
        let snap = self.driver.status(pool).await?;
        Ok(Response::new(convert::status_response(snap)))
    }
}
