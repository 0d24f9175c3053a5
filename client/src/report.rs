//! What a release tells the daemon about the provider call its lease covered: the outcome class, the
//! tokens used and the provider's own view of its rate limits.

use std::time::Duration;

pub use slotd_proto::report::{LimitKind, ProviderLimit, Usage};

/// How the call covered by a lease ended; sent to the daemon with the release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    /// The provider call succeeded.
    #[default]
    Ok,
    /// The provider call failed: a 5xx other than 503/529, or a transport error.
    Error,
    /// The caller gave up before the call ended.
    Cancelled,
    /// The provider answered 429 (this key's rate limit). Pauses the pool for `retry_after`, or for
    /// the pool's `default_retry_after` when `None`.
    RateLimited {
        /// The provider's Retry-After.
        retry_after: Option<Duration>,
    },
    /// The provider is overloaded (Anthropic's 529 `overloaded_error`, a 503): a provider-wide
    /// signal that says nothing about this key's quota.
    Overloaded {
        /// The provider's Retry-After.
        retry_after: Option<Duration>,
    },
    /// The key is out of credit (402, OpenAI's `insufficient_quota`): retrying does not help.
    QuotaExhausted {
        /// The provider's Retry-After, if it gave one.
        retry_after: Option<Duration>,
    },
}

/// Everything a release reports: the outcome class, plus the usage and the provider's limits when
/// they are known.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// How the call ended.
    pub outcome: Outcome,
    /// The tokens it used.
    pub usage: Option<Usage>,
    /// The provider's rate-limit headers (at most [`ProviderLimit::MAX_PER_REPORT`] are sent).
    pub limits: Vec<ProviderLimit>,
}

impl From<Outcome> for Report {
    fn from(outcome: Outcome) -> Self {
        Report { outcome, usage: None, limits: Vec::new() }
    }
}

impl Report {
    /// The report with another outcome, keeping usage and limits.
    pub fn with_outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }
}
