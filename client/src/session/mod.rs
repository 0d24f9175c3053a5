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
mod wire;

use std::{collections::HashMap, time::SystemTime};

pub(crate) use self::task::{Backoff, Session, SessionConfig};

/// A pool's pause, as pushed by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseInfo {
    /// When the pause ends.
    pub until: SystemTime,
    /// Why, for example "rate limited (429) reported by release of lease ...".
    pub reason: String,
}

/// The pause state of every pool this client waits on or holds, by pool name.
pub type Pauses = HashMap<String, PauseInfo>;

/// Header that asks the daemon to keep this stream's leases for a while after it closes.
pub(crate) const RESUME_GRACE_HEADER: &str = "slotd-resume-grace";
