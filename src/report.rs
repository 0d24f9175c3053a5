//! The provider-report vocabulary shared by the daemon and its clients: the tokens a call used and
//! the limits a provider announced, with the bounds the daemon accepts.

use std::time::Duration;

/// Tokens a provider call used, as the provider reported them.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens, cache reads and writes excluded.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens read from the provider's prompt cache.
    pub cache_read_tokens: u64,
    /// Input tokens written to the provider's prompt cache.
    pub cache_creation_tokens: u64,
}

impl Usage {
    /// Largest token count accepted in one field: far above any context window, far below overflow
    /// when summed.
    pub const MAX_TOKENS: u64 = 1 << 40;
}

/// Which limit a provider's rate-limit headers describe.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LimitKind {
    /// Requests per window.
    Requests,
    /// Tokens per window, input and output together.
    Tokens,
    /// Input tokens per window.
    InputTokens,
    /// Output tokens per window.
    OutputTokens,
}

/// One limit as the provider announced it in a response.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ProviderLimit {
    /// Which limit.
    pub kind: LimitKind,
    /// Its size per window.
    pub limit: u64,
    /// What is left of it.
    pub remaining: u64,
    /// How long until it is fully replenished, from the response.
    pub reset_in: Duration,
}

impl ProviderLimit {
    /// Most entries one release may carry (one per kind, twice over).
    pub const MAX_PER_REPORT: usize = 8;
    /// Longest `reset_in` accepted: providers' windows are a minute to a day.
    pub const MAX_RESET_IN: Duration = Duration::from_secs(24 * 3600);
}

impl From<LimitKind> for crate::v1::LimitKind {
    fn from(k: LimitKind) -> Self {
        match k {
            LimitKind::Requests => Self::Requests,
            LimitKind::Tokens => Self::Tokens,
            LimitKind::InputTokens => Self::InputTokens,
            LimitKind::OutputTokens => Self::OutputTokens,
        }
    }
}
