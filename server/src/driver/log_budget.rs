//! Per-stream log rate limiting: one summary line per message, and a token bucket per stream.
//!
//! A client decides how many refusals it causes: one heartbeat naming 1,900 unknown leases, or a
//! flood of bad requests, wrote a log line each (megabytes a second from one client). Now the
//! refusals of one operation are summed up in one line per stream ([`Refusals`]), and each stream
//! may write [`LogBudget::BURST`] such lines at once, then one per [`LogBudget::REFILL`]; the lines
//! held back are counted and the count rides on the stream's next line (or its close).

use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use crate::scheduler::{Error, Fact, SessionId, ids::truncate};

/// The longest id written to a log line, in bytes (ids are bounded by the message size, not by this).
const LOGGED_ID_LEN: usize = 128;

/// One stream's budget of refusal log lines.
#[derive(Debug)]
pub struct LogBudget {
    tokens: u32,
    /// When the bucket last gained a token (or was full).
    refilled: Instant,
    /// Lines held back since the last one written.
    suppressed: u64,
}

impl LogBudget {
    /// Lines a stream may write at once.
    pub const BURST: u32 = 10;
    /// A stream gains one line per this much time, up to [`LogBudget::BURST`].
    pub const REFILL: Duration = Duration::from_secs(1);

    /// A full budget at `now`.
    pub fn new(now: Instant) -> Self {
        Self { tokens: Self::BURST, refilled: now, suppressed: 0 }
    }

    /// Whether a line may be written at `now`: `Some(lines held back before it)`, or `None` (the
    /// line is counted as held back).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let gained = now.saturating_duration_since(self.refilled).as_nanos() / Self::REFILL.as_nanos();
        if gained > 0 {
            let gained = u32::try_from(gained).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(gained).min(Self::BURST);
            self.refilled = now;
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Lines held back and not yet reported.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// What one stream had refused in one operation.
#[derive(Debug)]
struct Summary {
    session: SessionId,
    /// Requests rejected and lease messages refused.
    requests: u32,
    leases: u32,
    /// The first refusal: its id (as sent) and why.
    first_id: String,
    first_error: Error,
}

/// The refusals among one operation's facts, gathered per stream.
#[derive(Debug, Default)]
pub struct Refusals {
    by_session: Vec<Summary>,
}

impl Refusals {
    /// Takes a refusal fact (returns `true`); any other fact is left to the caller (`false`).
    pub fn note(&mut self, fact: &Fact) -> bool {
        let (session, id, error, lease) = match fact {
            Fact::Rejected { session, request_id, error } => (*session, request_id, error, false),
            Fact::LeaseRefused { session, lease_id, error } => (*session, lease_id, error, true),
            _ => return false,
        };
        // Usually one stream per operation; a timer can reject waiters of many.
        let summary = match self.by_session.iter_mut().position(|s| s.session == session) {
            Some(i) => &mut self.by_session[i],
            None => {
                self.by_session.push(Summary {
                    session,
                    requests: 0,
                    leases: 0,
                    first_id: truncate(id, LOGGED_ID_LEN).to_owned(),
                    first_error: error.clone(),
                });
                self.by_session.last_mut().expect("just pushed")
            }
        };
        if lease {
            summary.leases += 1;
        } else {
            summary.requests += 1;
        }
        true
    }

    /// Writes one line per stream, as that stream's budget allows (`budget` finds it; a stream that
    /// is gone has no budget and is written).
    pub fn log(self, mut budget: impl FnMut(SessionId) -> Option<u64>) {
        for s in self.by_session {
            let Some(suppressed) = budget(s.session) else { continue };
            let (session, id, reason) = (s.session.0, s.first_id, s.first_error);
            match (s.requests, s.leases) {
                (1, 0) => info!(session, request_id = %id, %reason, suppressed, "request rejected"),
                (0, 1) => info!(session, lease_id = %id, %reason, suppressed, "lease message refused"),
                (requests, leases) => info!(
                    session,
                    requests,
                    leases,
                    first_id = %id,
                    first_reason = %reason,
                    suppressed,
                    "requests rejected and lease messages refused (one line per message)"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_line_per_refill_counting_what_was_held_back() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(t0);
        for _ in 0..LogBudget::BURST {
            assert_eq!(b.allow(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(b.allow(t0), None);
        }
        assert_eq!(b.suppressed(), 5);
        assert_eq!(b.allow(t0 + LogBudget::REFILL / 2), None);
        assert_eq!(b.allow(t0 + LogBudget::REFILL), Some(6));
        assert_eq!(b.allow(t0 + LogBudget::REFILL), None);
        // A long quiet period refills to the burst, no further.
        let later = t0 + LogBudget::REFILL * 1000;
        for _ in 0..LogBudget::BURST {
            assert!(b.allow(later).is_some());
        }
        assert_eq!(b.allow(later), None);
    }

    #[test]
    fn refusals_are_summed_per_stream() {
        let (x, y) = (SessionId(1), SessionId(2));
        let mut r = Refusals::default();
        let refused = |s: SessionId, id: &str| Fact::LeaseRefused {
            session: s,
            lease_id: id.into(),
            error: Error::InvalidArgument("bad".into()),
        };
        for i in 0..1900 {
            assert!(r.note(&refused(x, &format!("{i}"))));
        }
        assert!(r.note(&refused(y, &"z".repeat(4000))));
        assert!(!r.note(&Fact::Resumed { pool: "p".into() }));
        assert_eq!(r.by_session.len(), 2);
        assert_eq!((r.by_session[0].leases, r.by_session[0].first_id.as_str()), (1900, "0"));
        assert_eq!(r.by_session[1].first_id.len(), LOGGED_ID_LEN);
        let mut asked = Vec::new();
        r.log(|s| {
            asked.push(s);
            None
        });
        assert_eq!(asked, vec![x, y]);
    }
}
