//! slotd-proxy: an HTTP reverse proxy in front of LLM providers that takes one slotd lease per
//! upstream attempt and holds it until the last byte of the answer.
//!
//! Agents need no code change: they point their provider base URL at the proxy
//! (`ANTHROPIC_BASE_URL=http://127.0.0.1:8089/anthropic`), optionally set `x-slotd-*` headers for
//! priority, turn start, holder and pool, and get slotd's ordering, pauses and budgets. The proxy
//! reads what agents never report back (status, `Retry-After`, rate-limit headers, token usage) and
//! releases each lease with it.
//!
//! [`serve`] runs the proxy on a listener until a shutdown future resolves; the `slotd-proxy` binary
//! is a thin wrapper around it.
#![warn(missing_docs)]

pub mod body;
pub mod config;
pub mod daemon;
pub mod fingerprint;
pub mod headers;
pub mod metrics;
pub mod proxy;
pub mod refusal;
pub mod route;
pub mod server;
pub mod upstream;

pub use crate::{
    config::{Config, ConfigError, DEFAULT_TOML},
    server::{ServeError, serve},
};
