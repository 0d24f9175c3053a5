//! What a release reports about the provider call its lease covered: the outcome class, the tokens
//! it used and the provider's own view of its limits (from its rate-limit headers).

pub use slotd_proto::report::{LimitKind, ProviderLimit, Usage};

use super::Outcome;

/// The whole report a release carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// How the call ended.
    pub outcome: Outcome,
    /// The tokens it used, when known.
    pub usage: Option<Usage>,
    /// The provider's rate-limit headers, when present (at most [`ProviderLimit::MAX_PER_REPORT`]).
    pub limits: Vec<ProviderLimit>,
}

impl From<Outcome> for Report {
    fn from(outcome: Outcome) -> Self {
        Report { outcome, usage: None, limits: Vec::new() }
    }
}
