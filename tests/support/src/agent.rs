//! [`Agent`]: one simulated agent process, a raw Acquire stream driven message by message.

use std::{future::Future, panic::Location, time::Duration};

use slotd_proto::v1::{
    self as pb, client_message::Msg as Up, server_message::Msg, slotd_client::SlotdClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, Streaming, transport::Channel};

use crate::{bounded, daemon::status_at, dur};

/// A resume of the lease `g` granted, as its grantee would send it: with the grant's resume credential,
/// and `holder`, the name the lease was asked with (the credential covers it; [`Agent::req`] asks with
/// the agent's name).
pub fn resume_of(g: &pb::Granted, holder: &str) -> pb::ResumeLease {
    pb::ResumeLease {
        lease_id: g.lease_id.clone(),
        fencing_token: g.fencing_token,
        pool: g.pool.clone(),
        holder: holder.into(),
        credential: g.resume_credential.clone(),
        ..Default::default()
    }
}

/// One simulated agent process: a raw Acquire stream on its own connection.
pub struct Agent {
    /// Shown in failures and sent as the holder name.
    pub name: String,
    tx: Option<mpsc::Sender<pb::ClientMessage>>,
    rx: Streaming<pb::ServerMessage>,
    client: SlotdClient<Channel>,
}

impl Agent {
    /// An agent on the daemon at `url` (a child process, say), on its own connection, with an
    /// optional resume grace; the error when the daemon refuses the stream.
    #[track_caller]
    pub fn connect<'a>(
        url: &'a str,
        name: &'a str,
        grace: Option<&'a str>,
    ) -> impl Future<Output = Result<Agent, Status>> + 'a {
        let at = Location::caller();
        async move {
            let endpoint = Channel::from_shared(url.to_owned()).expect("valid url");
            let channel = bounded(at, "connect", endpoint.connect())
                .await
                .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
            Agent::open(at, SlotdClient::new(channel), name, grace).await
        }
    }

    pub(crate) async fn open(
        at: &'static Location<'static>,
        mut client: SlotdClient<Channel>,
        name: &str,
        grace: Option<&str>,
    ) -> Result<Agent, Status> {
        let (tx, rx) = mpsc::channel(64);
        let mut req = Request::new(ReceiverStream::new(rx));
        if let Some(g) = grace {
            req.metadata_mut()
                .insert(slotd::grpc::service::RESUME_GRACE_HEADER, g.parse().expect("ascii metadata"));
        }
        let rx = bounded(at, "Acquire to open", client.acquire(req)).await?.into_inner();
        Ok(Agent { name: name.to_owned(), tx: Some(tx), rx, client })
    }

    /// A request for one slot on `pool` with every optional field unset, holder = this agent's name.
    pub fn req(&self, request_id: &str, pool: &str) -> pb::LeaseRequest {
        pb::LeaseRequest {
            request_id: request_id.into(),
            pool: pool.into(),
            holder: self.name.clone(),
            ..Default::default()
        }
    }

    /// A clone of the request side, to send from another task (the stream stays open while it lives).
    #[track_caller]
    pub fn sender(&self) -> mpsc::Sender<pb::ClientMessage> {
        self.tx
            .clone()
            .unwrap_or_else(|| panic!("{}: {}: sending side closed", Location::caller(), self.name))
    }

    /// Sends one raw client message (`msg: None` is a message with no body).
    #[track_caller]
    pub fn send_raw(&self, msg: Option<Up>) -> impl Future<Output = ()> + '_ {
        let at = Location::caller();
        async move {
            let tx = self.tx.as_ref().unwrap_or_else(|| panic!("{at}: {}: sending side closed", self.name));
            bounded(at, "send", tx.send(pb::ClientMessage { msg }))
                .await
                .unwrap_or_else(|_| panic!("{at}: {}: request stream closed", self.name));
        }
    }

    /// Sends one client message.
    #[track_caller]
    pub fn send(&self, msg: Up) -> impl Future<Output = ()> + '_ {
        self.send_raw(Some(msg))
    }

    /// Sends a lease request.
    #[track_caller]
    pub fn request(&self, r: pb::LeaseRequest) -> impl Future<Output = ()> + '_ {
        self.send(Up::Request(r))
    }

    /// Cancels a queued request.
    #[track_caller]
    pub fn cancel(&self, request_id: &str) -> impl Future<Output = ()> + '_ {
        self.send(Up::Cancel(pb::CancelRequest { request_id: request_id.into() }))
    }

    /// Heartbeats the listed leases (all of this stream's when empty).
    #[track_caller]
    pub fn heartbeat(&self, lease_ids: &[&str]) -> impl Future<Output = ()> + '_ {
        self.send(Up::Heartbeat(pb::Heartbeat {
            lease_ids: lease_ids.iter().map(|s| (*s).to_owned()).collect(),
        }))
    }

    /// Releases a lease with outcome OK.
    #[track_caller]
    pub fn release(&self, lease_id: &str) -> impl Future<Output = ()> + '_ {
        self.release_with(lease_id, pb::Outcome::Ok, None)
    }

    /// Releases a lease with an outcome (and a retry_after for rate-limited ones).
    #[track_caller]
    pub fn release_with(
        &self,
        lease_id: &str,
        outcome: pb::Outcome,
        retry_after: Option<Duration>,
    ) -> impl Future<Output = ()> + '_ {
        self.send(Up::Release(pb::ReleaseLease {
            lease_id: lease_id.into(),
            outcome: outcome as i32,
            retry_after: retry_after.map(dur),
            ..Default::default()
        }))
    }

    /// Resumes a lease granted on another stream (see [`resume_of`] for a resume that presents the
    /// grant's credential).
    #[track_caller]
    pub fn resume(&self, r: pb::ResumeLease) -> impl Future<Output = ()> + '_ {
        self.send(Up::Resume(r))
    }

    /// Closes the sending half (the client says it is done), keeping the receiving half.
    pub fn close_sending(&mut self) {
        self.tx = None;
    }

    async fn next_at(&mut self, at: &Location<'_>) -> Msg {
        let what = format!("{}'s next message", self.name);
        match bounded(at, &what, self.rx.message()).await {
            Ok(Some(pb::ServerMessage { msg: Some(m) })) => m,
            Ok(Some(pb::ServerMessage { msg: None })) => {
                panic!("{at}: {}: server message with no body", self.name)
            }
            Ok(None) => panic!("{at}: {}: stream ended while a message was expected", self.name),
            Err(s) => panic!("{at}: {}: stream failed while a message was expected: {s}", self.name),
        }
    }

    /// The next server message, within [`TIMEOUT`].
    #[track_caller]
    #[allow(clippy::should_implement_trait, reason = "an async step of a test, not an iterator")]
    pub fn next(&mut self) -> impl Future<Output = Msg> + '_ {
        let at = Location::caller();
        async move { self.next_at(at).await }
    }

    /// The next server message if one arrives within `d`.
    #[track_caller]
    pub fn next_within(&mut self, d: Duration) -> impl Future<Output = Option<Msg>> + '_ {
        let at = Location::caller();
        async move {
            match tokio::time::timeout(d, self.rx.message()).await {
                Err(_) => None,
                Ok(Ok(Some(m))) => m.msg,
                Ok(Ok(None)) => panic!("{at}: {}: stream ended", self.name),
                Ok(Err(s)) => panic!("{at}: {}: stream failed: {s}", self.name),
            }
        }
    }

    /// Asserts that no message arrives for `d`.
    #[track_caller]
    pub fn expect_silence(&mut self, d: Duration) -> impl Future<Output = ()> + '_ {
        let at = Location::caller();
        async move {
            if let Ok(r) = tokio::time::timeout(d, self.rx.message()).await {
                panic!("{at}: {}: expected no message for {d:?}, got {r:?}", self.name);
            }
        }
    }

    /// Reads until the stream ends (within [`TIMEOUT`]); returns the messages before the end and its
    /// error status (None if clean).
    #[track_caller]
    pub fn until_end(&mut self) -> impl Future<Output = (Vec<Msg>, Option<Status>)> + '_ {
        let at = Location::caller();
        async move {
            let what = format!("{}'s stream to end", self.name);
            let rx = &mut self.rx;
            bounded(at, &what, async move {
                let mut seen = Vec::new();
                loop {
                    match rx.message().await {
                        Ok(Some(m)) => seen.extend(m.msg),
                        Ok(None) => return (seen, None),
                        Err(s) => return (seen, Some(s)),
                    }
                }
            })
            .await
        }
    }

    /// Waits for the stream to end without another message; returns its error status (None if clean).
    #[track_caller]
    pub fn expect_end(&mut self) -> impl Future<Output = Option<Status>> + '_ {
        let at = Location::caller();
        async move {
            let what = format!("{}'s stream to end", self.name);
            match bounded(at, &what, self.rx.message()).await {
                Ok(None) => None,
                Err(s) => Some(s),
                Ok(Some(m)) => panic!("{at}: {}: expected the stream to end, got {m:?}", self.name),
            }
        }
    }

    /// Expects `Granted` for `request_id` as the very next message.
    #[track_caller]
    pub fn expect_granted<'a>(&'a mut self, request_id: &'a str) -> impl Future<Output = pb::Granted> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Granted(g) if g.request_id == request_id => g,
                other => panic!("{at}: {}: expected Granted for {request_id:?}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `Queued` for `request_id` as the very next message.
    #[track_caller]
    pub fn expect_queued<'a>(&'a mut self, request_id: &'a str) -> impl Future<Output = pb::Queued> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Queued(q) if q.request_id == request_id => q,
                other => panic!("{at}: {}: expected Queued for {request_id:?}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `Rejected` for `request_id` with `code` as the very next message.
    #[track_caller]
    pub fn expect_rejected<'a>(
        &'a mut self,
        request_id: &'a str,
        code: Code,
    ) -> impl Future<Output = pb::Rejected> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Rejected(r) if r.request_id == request_id => {
                    assert_eq!(
                        Code::from_i32(r.code),
                        code,
                        "{at}: {}: Rejected {request_id:?} with the wrong code: {r:?}",
                        self.name
                    );
                    assert!(!r.message.is_empty(), "{at}: Rejected without a reason: {r:?}");
                    r
                }
                other => panic!(
                    "{at}: {}: expected Rejected({code:?}) for {request_id:?}, got {other:?}",
                    self.name
                ),
            }
        }
    }

    /// Expects `Released` for `lease_id`.
    #[track_caller]
    pub fn expect_released<'a>(&'a mut self, lease_id: &'a str) -> impl Future<Output = ()> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Released(r) if r.lease_id == lease_id => {}
                other => panic!("{at}: {}: expected Released for {lease_id}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `LeaseError` for `lease_id` with `code`.
    #[track_caller]
    pub fn expect_lease_error<'a>(
        &'a mut self,
        lease_id: &'a str,
        code: Code,
    ) -> impl Future<Output = pb::LeaseError> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::LeaseError(e) if e.lease_id == lease_id => {
                    assert_eq!(
                        Code::from_i32(e.code),
                        code,
                        "{at}: {}: LeaseError for {lease_id:?} with the wrong code: {e:?}",
                        self.name
                    );
                    assert!(!e.message.is_empty(), "{at}: LeaseError without a reason: {e:?}");
                    e
                }
                other => panic!(
                    "{at}: {}: expected LeaseError({code:?}) for {lease_id:?}, got {other:?}",
                    self.name
                ),
            }
        }
    }

    /// Expects `Paused` for `pool`.
    #[track_caller]
    pub fn expect_paused<'a>(&'a mut self, pool: &'a str) -> impl Future<Output = pb::Paused> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Paused(p) if p.pool == pool => p,
                other => panic!("{at}: {}: expected Paused for {pool}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `Resumed` for `pool`.
    #[track_caller]
    pub fn expect_resumed<'a>(&'a mut self, pool: &'a str) -> impl Future<Output = ()> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Resumed(r) if r.pool == pool => {}
                other => panic!("{at}: {}: expected Resumed for {pool}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `Expired` for `lease_id`.
    #[track_caller]
    pub fn expect_expired<'a>(&'a mut self, lease_id: &'a str) -> impl Future<Output = pb::Expired> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Expired(e) if e.lease_id == lease_id => e,
                other => panic!("{at}: {}: expected Expired for {lease_id}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `HeartbeatAck` renewing `renewed` leases.
    #[track_caller]
    pub fn expect_heartbeat_ack(&mut self, renewed: u32) -> impl Future<Output = ()> + '_ {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::HeartbeatAck(a) if a.renewed == renewed => {}
                other => panic!("{at}: {}: expected HeartbeatAck({renewed}), got {other:?}", self.name),
            }
        }
    }

    /// Expects `Cancelled` for `request_id`.
    #[track_caller]
    pub fn expect_cancelled<'a>(&'a mut self, request_id: &'a str) -> impl Future<Output = ()> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Cancelled(c) if c.request_id == request_id => {}
                other => panic!("{at}: {}: expected Cancelled for {request_id:?}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `LeaseResumed` for `lease_id`.
    #[track_caller]
    pub fn expect_lease_resumed<'a>(
        &'a mut self,
        lease_id: &'a str,
    ) -> impl Future<Output = pb::LeaseResumed> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::LeaseResumed(r) if r.lease_id == lease_id => r,
                other => panic!("{at}: {}: expected LeaseResumed for {lease_id}, got {other:?}", self.name),
            }
        }
    }

    /// Sends `r` and waits for its grant, accepting a `Queued` first.
    #[track_caller]
    pub fn acquire_with(&mut self, r: pb::LeaseRequest) -> impl Future<Output = pb::Granted> + '_ {
        let at = Location::caller();
        async move {
            let id = r.request_id.clone();
            self.send_raw(Some(Up::Request(r))).await;
            match self.next_at(at).await {
                Msg::Granted(g) if g.request_id == id => g,
                Msg::Queued(q) if q.request_id == id => match self.next_at(at).await {
                    Msg::Granted(g) if g.request_id == id => g,
                    other => panic!("{at}: {}: expected Granted for {id:?}, got {other:?}", self.name),
                },
                other => panic!("{at}: {}: expected Granted or Queued for {id:?}, got {other:?}", self.name),
            }
        }
    }

    /// Requests a slot on `pool` with defaults and waits for the grant (accepting a `Queued` first).
    #[track_caller]
    pub fn acquire<'a>(&'a mut self, request_id: &str, pool: &str) -> impl Future<Output = pb::Granted> + 'a {
        let r = self.req(request_id, pool);
        self.acquire_with(r)
    }

    /// Releases a lease (OK) and waits for `Released`.
    #[track_caller]
    pub fn release_ok<'a>(&'a mut self, lease_id: &'a str) -> impl Future<Output = ()> + 'a {
        let at = Location::caller();
        async move {
            self.send_raw(Some(Up::Release(pb::ReleaseLease {
                lease_id: lease_id.into(),
                outcome: pb::Outcome::Ok as i32,
                ..Default::default()
            })))
            .await;
            match self.next_at(at).await {
                Msg::Released(r) if r.lease_id == lease_id => {}
                other => panic!("{at}: {}: expected Released for {lease_id}, got {other:?}", self.name),
            }
        }
    }

    /// A Status snapshot through this agent's own connection.
    #[track_caller]
    pub fn status(&self) -> impl Future<Output = pb::StatusResponse> + '_ {
        let at = Location::caller();
        async move { status_at(at, &self.client).await }
    }

    /// A unary client on this agent's connection.
    pub fn client(&self) -> SlotdClient<Channel> {
        self.client.clone()
    }
}
