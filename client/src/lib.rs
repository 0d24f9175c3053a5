//! Client for [slotd](https://example.invalid/slotd): LLM-provider concurrency slots as RAII guards.
//!
//! A [`Client`] keeps one `Acquire` stream to the daemon in a background task. Every acquire is a
//! request on that stream; every granted slot is a [`Lease`] guard that goes back when dropped.
//! Heartbeats are automatic (about a third of the TTL), acquires wait through pool pauses, and a
//! broken connection is re-established with backoff, resuming held leases and re-sending queued
//! requests with their original `started_at`.
//!
//! Nothing here can leak a slot: dropping a lease, an acquire future, a [`Hold`] stream or a
//! [`LeaseBody`] gives the slot back (the daemon's TTL covers even a dead process).
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//!
//! use futures::StreamExt;
//! use slotd_client::{Client, Outcome};
//!
//! # async fn call_provider() -> Result<u16, std::io::Error> { Ok(200) }
//! # async fn stream_tokens() -> impl futures::Stream<Item = String> { futures::stream::empty() }
//! #[tokio::main]
//! async fn main() -> Result<(), slotd_client::Error> {
//!     let client = Client::builder()
//!         .holder("reviewer-agent")
//!         .connect("http://127.0.0.1:50051")
//!         .await?;
//!
//!     // The guard form: hold the slot for one provider call.
//!     let lease = client
//!         .acquire("anthropic")
//!         .priority(7)
//!         .max_wait(Duration::from_secs(60))
//!         .await?;
//!     println!("fencing token {}", lease.fencing_token());
//!     match call_provider().await {
//!         Ok(429) => lease.rate_limited(Some(Duration::from_secs(10))).await?,
//!         Ok(_) => drop(lease), // released with outcome ok
//!         Err(_) => lease.failed().await?,
//!     }
//!
//!     // The closure form: released however the closure ends (an error or a panic included).
//!     let n = client
//!         .run("anthropic", |lease| async move {
//!             lease.set_outcome(Outcome::Ok);
//!             Ok::<_, slotd_client::Error>(lease.fencing_token())
//!         })
//!         .await?;
//!     println!("ran under token {n}");
//!
//!     // A streamed answer keeps its slot until the last token.
//!     let lease = client.acquire("anthropic").await?;
//!     let mut tokens = lease.hold(stream_tokens().await);
//!     while let Some(token) = tokens.next().await {
//!         print!("{token}");
//!     }
//!     drop(tokens);
//!
//!     // Before exiting: flush the last releases (dropped leases are released in the background).
//!     client.close().await
//! }
//! ```
//!
//! With tower, [`LeaseLayer`] takes a lease around every HTTP request and reads the outcome from the
//! response (429 with `Retry-After`, Anthropic's 529, 5xx).
//!
//! [`Connector`] parses an endpoint (`host:port` or a URL) and sets up TLS, timeouts and keepalives;
//! [`BearerAuth`] adds the token to every call of a channel. [`ClientBuilder`] uses both, and so can
//! anything else that talks to the daemon (an operator tool calling the Admin service, for example).
//!
//! # Short-lived programs
//! A dropped lease is released by the client's background task, which dies with the runtime when
//! `main` returns. Call [`Client::close`] before exiting: it sends every release still on its way
//! and waits (bounded) until the daemon acknowledged them.
//!
//! # Cancel safety
//! Every async fn documents what dropping its future does. In short: dropping an acquire cancels the
//! request (and returns a grant that raced with the cancel); dropping anything that holds a lease
//! releases it.
#![warn(missing_docs)]

mod any;
mod client;
mod coalesce;
mod command;
mod connect;
mod error;
mod hold;
mod layer;
mod lease;
mod members;
pub mod provider;
mod report;
mod session;

pub use crate::{
    client::{Acquire, AcquireBuilder, Client, ClientBuilder},
    coalesce::Coalesce,
    connect::{AuthChannel, BearerAuth, Connector, parse_endpoint},
    error::{Error, Lost},
    hold::Hold,
    layer::{BoxError, FixedPool, LeaseBody, LeaseLayer, LeaseService, ResponseFuture, SelectPool},
    lease::{Lease, LeaseHandle},
    members::{ELECTION_RETRY_MAX, MAX_LEADER_BYTES, leader_of},
    report::{LimitKind, Outcome, ProviderLimit, Report, Usage},
    session::{PauseInfo, Pauses},
};
/// The generated wire types, for [`Client::status`] answers.
pub use slotd_proto::v1 as proto;
