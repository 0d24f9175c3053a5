//! Leadership terms (high availability): the grant deadline the driver feeds in, and a term's start.
//!
//! The core stays synchronous: the driver turns "last successful etcd keepalive + lease TTL − margin"
//! into an instant and hands it over as data ([`Scheduler::set_grant_deadline`]). From that instant on,
//! the chain gate is closed ([`Closed::Fenced`]) until a later deadline arrives: a leader that can no
//! longer be sure it is the leader grants nothing.

use std::time::Duration;

use tokio::time::Instant;

use super::{Decisions, Scheduler, pool::Closed, time};

impl Scheduler {
    /// Grants only before `until` (`None`: no deadline, the single-node default). Granting resumes
    /// when a later deadline is set, so waiters queued meanwhile are served then.
    pub fn set_grant_deadline(&mut self, now: Instant, until: Option<Instant>) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        self.grant_until = until;
        self.settle(now, &mut out);
        out
    }

    /// The gate of [`Scheduler::set_grant_deadline`].
    pub(super) fn fence_gate(&self, now: Instant) -> Result<(), Closed> {
        match self.grant_until {
            Some(until) if now >= until => Err(Closed::Fenced),
            _ => Ok(()),
        }
    }

    /// Starts a leadership term: every pool's next fencing token becomes at least `first_token`
    /// (pools created later too), and nothing new is granted for `learning` so that the previous
    /// leader's leases can be re-presented first: every pool learns until then, or until its leases
    /// are back once [`Scheduler::take_over`] gave it the previous leader's counts.
    pub fn begin_term(&mut self, now: Instant, first_token: u64, learning: Duration) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        self.cfg.first_token = self.cfg.first_token.max(first_token);
        for pool in self.pools.values_mut() {
            pool.next_token = pool.next_token.max(first_token);
        }
        for next in self.retired_tokens.values_mut() {
            *next = (*next).max(first_token);
        }
        if !learning.is_zero() {
            let until = time::after(now, learning);
            self.learning_until = Some(self.learning_until.map_or(until, |t| t.max(until)));
            self.start_learning(now);
        }
        self.settle(now, &mut out);
        out
    }

    /// The grant deadline in force, if any.
    pub fn grant_deadline(&self) -> Option<Instant> {
        self.grant_until
    }
}
