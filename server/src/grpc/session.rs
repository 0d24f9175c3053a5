//! One `Acquire` stream as a single response `Stream` that also reads the request side.
//!
//! hyper polls each response body in a task of its own. Reading the client's messages from that same
//! poll, instead of from a second spawned task, saves a task (and its memory) per idle session, and a
//! task hand-off on every message the client sends: each message is decided inline, in this poll (see
//! `driver`). Whatever ends the stream (the client going away, a transport error, shutdown) drops this
//! value, which closes the session.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures::Stream;
use slotd_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};
use tracing::{debug, warn};

use crate::{
    driver::{DriverHandle, Outbound},
    grpc::{convert, limits::StreamPermit, status::to_status},
    net,
    scheduler::{Error, SessionId},
};

/// Client messages applied per poll before the events get their turn (the task is woken again).
const FORWARD_BUDGET: usize = 32;

/// The response stream of one `Acquire` call.
///
/// Each poll yields the next event if there is one; otherwise it applies what the client sent, one
/// message at a time until one of them produced an event, and yields that. Back-pressure: nothing
/// more is read from the client while its events wait to be written, so a flood stops at the client's
/// HTTP/2 window.
///
/// hyper polls a response body only while the client's flow-control window has room, so a client that
/// stops reading its events also stops being read; once its per-stream buffer fills with other
/// sessions' events it is disconnected (see `driver`), which releases its leases.
pub struct SessionStream {
    /// The request side; `None` once it ended or failed (the session was closed then).
    inbound: Option<Streaming<pb::ClientMessage>>,
    events: mpsc::Receiver<Outbound>,
    driver: DriverHandle,
    session: SessionId,
    /// The stream's place in `limits.max_streams`, given back with this value.
    _permit: Option<StreamPermit>,
}

impl SessionStream {
    /// The stream of `session`, whose events arrive on `events`.
    pub fn new(
        inbound: Streaming<pb::ClientMessage>,
        events: mpsc::Receiver<Outbound>,
        driver: DriverHandle,
        session: SessionId,
        permit: Option<StreamPermit>,
    ) -> Self {
        Self { inbound: Some(inbound), events, driver, session, _permit: permit }
    }

    /// Applies the client's messages until the client has nothing more, one of them produced an event
    /// to send, or the budget is spent. Registers the waker for the request side when it waits on it.
    /// Whether it applied any.
    fn forward_inbound(&mut self, cx: &mut Context<'_>) -> bool {
        let mut applied = false;
        for _ in 0..FORWARD_BUDGET {
            if !self.events.is_empty() {
                return applied;
            }
            let Some(inbound) = self.inbound.as_mut() else { return applied };
            match Pin::new(inbound).poll_next(cx) {
                Poll::Pending => return applied,
                Poll::Ready(Some(Ok(msg))) => {
                    applied = true;
                    // Fails only when the daemon is stopping, which ends the stream itself.
                    if self.driver.op(self.session, convert::stream_op(msg)).is_err() {
                        self.end_inbound(None);
                        return applied;
                    }
                }
                Poll::Ready(None) => {
                    self.end_inbound(None);
                    return applied;
                }
                Poll::Ready(Some(Err(status))) => {
                    let error = inbound_error(&status);
                    if matches!(error, Some(Error::InvalidArgument(_))) {
                        // The client is there but sent what no protocol version means: say why,
                        // once per stream (the stream ends here).
                        warn!(session = self.session.0, %status, "undecodable message on an Acquire stream; ending it with INVALID_ARGUMENT");
                    } else {
                        debug!(session = self.session.0, %status, "inbound stream error");
                    }
                    self.end_inbound(error);
                    return applied;
                }
            }
        }
        // Budget spent with more perhaps waiting: come back after the events had their turn.
        cx.waker().wake_by_ref();
        applied
    }

    /// The client is done sending (or failed): close the session. Its leases are released (or kept
    /// for the resume grace) and the event channel ends, which ends this stream.
    fn end_inbound(&mut self, error: Option<Error>) {
        self.inbound = None;
        self.driver.close(self.session, error);
    }
}

/// What a failed read of the request side tells the client, if anything (a vanished client is told
/// nothing).
///
/// tonic reports a message it cannot decode (bad protobuf, a bad compression flag, a frame cut short)
/// as INTERNAL with no source, and a transport failure (an HTTP/2 reset, a dropped connection) as
/// INTERNAL, UNKNOWN or CANCELLED carrying the transport error as its source. The first is the
/// client's bad input: INVALID_ARGUMENT, saying why. (Ending such a stream with OK, as before, told
/// the client nothing while its leases were released.)
fn inbound_error(status: &Status) -> Option<Error> {
    match status.code() {
        Code::Internal if std::error::Error::source(status).is_none() => {
            Some(Error::InvalidArgument(format!("undecodable message: {}", status.message())))
        }
        Code::Cancelled | Code::Unknown | Code::Unavailable | Code::Internal => None,
        // Name the setting, as the unary path does (`limits::oversize_as_exhausted`).
        Code::ResourceExhausted | Code::OutOfRange => {
            Some(Error::LimitExceeded(format!("{} (limits.max_message_bytes)", status.message())))
        }
        _ => Some(Error::InvalidArgument(status.message().into())),
    }
}

impl Stream for SessionStream {
    type Item = Result<pb::ServerMessage, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.forward_inbound(cx) && !this.events.is_empty() {
            // A message of this client was just decided and its answer is ready. Let the tasks it
            // woke run first: a release's next grant goes out before the release's own `Released`
            // (otherwise this stream's connection task, woken last, runs first and writes first).
            net::wake_after_the_ready_tasks(cx);
            return Poll::Pending;
        }
        this.events.poll_recv(cx).map(|item| {
            item.map(|out| match *out {
                Ok(event) => Ok(convert::server_message(event)),
                Err(error) => Err(to_status(&error)),
            })
        })
    }
}

impl Drop for SessionStream {
    /// The client went away or the stream ended: closing twice is harmless.
    fn drop(&mut self) {
        self.driver.close(self.session, None);
    }
}
