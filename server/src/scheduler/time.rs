//! Checked time arithmetic for the core: an extreme duration gives a far-future instant, never a panic.
//!
//! Every duration the core adds to an instant is bounded where it enters (config, Admin, agents), so
//! these helpers only matter for a bound that is missed or raised later: they turn an overflow into
//! "never" instead of a panic of the task that owns the scheduler.

use std::time::Duration;

use tokio::time::Instant;

/// The furthest ahead the core schedules anything (30 years): a later instant is treated as this,
/// which is "never" for a daemon.
pub const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `at + d`, saturating at `at + FAR_FUTURE`.
pub(crate) fn after(at: Instant, d: Duration) -> Instant {
    // `at + FAR_FUTURE` cannot overflow a real monotonic clock (it counts from boot in i64 seconds);
    // should it ever, the instant itself is the only value left that is not a panic.
    at.checked_add(d.min(FAR_FUTURE)).or_else(|| at.checked_add(FAR_FUTURE)).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_durations_saturate() {
        let t0 = Instant::now();
        assert_eq!(after(t0, Duration::ZERO), t0);
        assert_eq!(after(t0, Duration::from_nanos(1)), t0 + Duration::from_nanos(1));
        assert_eq!(after(t0, Duration::MAX), t0 + FAR_FUTURE);
        assert_eq!(after(t0, Duration::from_secs(u64::MAX)), t0 + FAR_FUTURE);
        assert_eq!(after(t0, Duration::from_secs(i64::MAX as u64)), t0 + FAR_FUTURE);
    }
}
