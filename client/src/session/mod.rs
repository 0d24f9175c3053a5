//! The client session: one `Acquire` stream shared by every handle of a client, with its requests and leases.
//!
//! Three parts, one concept each:
//! - [`machine`]: the synchronous state machine (requests, leases, pauses, heartbeat schedule). It takes
//!   events and returns the messages to send and the notifications to deliver; no I/O, no clock.
//! - [`task`]: the connection task that owns the stream, reconnects with backoff, runs the heartbeat
//!   timer and feeds the machine.
//! - [`wire`]: the machine's messages to and from protobuf.

mod machine;
mod task;
#[cfg(test)]
mod tests;
pub(crate) mod wire;

pub use self::machine::{PauseInfo, Pauses};
pub(crate) use self::task::{Backoff, Session, SessionConfig};
