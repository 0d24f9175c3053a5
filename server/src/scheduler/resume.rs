//! Resuming a lease on a new stream, or re-creating it during the learning period after a restart.
//!
//! Either takes the lease's resume credential (see [`credential`](super::credential)): a resume without
//! it is refused with [`Error::BadCredential`] before anything else is looked at, and changes nothing.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    Decisions, Error, Event, FencingToken, Lease, LeaseId, ORPHANS, PoolId, Priority, ResumeCredential,
    Scheduler, SchedulerConfig, SessionId, check_ttl,
};

/// A request to re-attach a lease granted on an earlier stream.
#[derive(Clone, Debug)]
pub struct ResumeRequest {
    /// The lease.
    pub lease_id: LeaseId,
    /// Its fencing token.
    pub token: FencingToken,
    /// Its pool.
    pub pool: PoolId,
    /// Its priority.
    pub priority: Priority,
    /// New TTL; `None` means the pool's default.
    pub ttl: Option<Duration>,
    /// Holder name, as in the original request (the credential covers it).
    pub holder: Arc<str>,
    /// The resume credential from the grant.
    pub credential: ResumeCredential,
}

impl Scheduler {
    /// Re-attaches a lease to this session, given its resume credential: moves a live lease here, or
    /// re-creates one during the learning period after a restart (when every level still has room
    /// under its configured limit).
    ///
    /// A live lease held by another open stream is taken over: that stream is told
    /// [`Event::ResumedElsewhere`] first, and no longer owns the lease.
    pub fn resume(&mut self, now: Instant, session: SessionId, req: ResumeRequest) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let id = req.lease_id;
        match self.try_resume(now, session, req) {
            Ok(Resumed { token, expires_at, displaced }) => {
                if let Some((old, pool)) = displaced {
                    out.push(old, Event::ResumedElsewhere { lease_id: id, pool });
                }
                out.push(session, Event::LeaseResumed { lease_id: id, token, expires_at });
            }
            Err(error) => out.push(session, Event::LeaseError { lease_id: id.to_string(), error }),
        }
        self.settle(now, &mut out);
        out
    }

    fn try_resume(&mut self, now: Instant, session: SessionId, req: ResumeRequest) -> Result<Resumed, Error> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let id = req.lease_id;
        // First, so that without the credential nothing (not even whether the lease exists) is told.
        if !self.cfg.lease_key.verify(&req.credential, id, req.token, &req.pool, &req.holder) {
            return Err(Error::BadCredential(id));
        }
        let pool = self.pools.get(&req.pool).ok_or_else(|| Error::UnknownPool(req.pool.clone()))?;
        let ttl = check_ttl(pool, req.ttl)?;
        if !self.sessions.contains_key(&session) {
            return Err(Error::ShuttingDown);
        }
        if let Some(lease) = self.leases.get(&id) {
            if lease.token != req.token {
                return Err(Error::LeaseMismatch(id, "wrong fencing token"));
            }
            if lease.pool != req.pool {
                return Err(Error::LeaseMismatch(id, "wrong pool"));
            }
            let old = lease.session;
            let mut displaced = None;
            if old != session {
                if old != ORPHANS && self.sessions.contains_key(&old) {
                    displaced = Some((old, req.pool.clone()));
                }
                if let Some(s) = self.sessions.get_mut(&old) {
                    s.leases.remove(&id);
                }
                let pool = self.pools.get_mut(&req.pool).expect("lease pools exist");
                pool.drop_interest(old);
                pool.add_interest(session);
                self.sessions.get_mut(&session).expect("checked").leases.insert(id);
                self.leases.set_session(&id, session);
            }
            // The resume's TTL applies from now on (the client heartbeats for it).
            self.leases.set_ttl(&id, ttl);
            let lease = self.leases.renew(&id, now).expect("exists");
            return Ok(Resumed { token: lease.token, expires_at: lease.expires_at, displaced });
        }
        if let Some(how) = self.leases.ended(&id) {
            return Err(Error::LeaseEnded { id, how: how.describe() });
        }
        if self.learning_until.is_none() {
            return Err(Error::UnknownLease(id));
        }
        if req.token.0 > SchedulerConfig::MAX_RESUME_TOKEN {
            return Err(Error::InvalidArgument(format!(
                "fencing_token {} is out of range (max {})",
                req.token,
                SchedulerConfig::MAX_RESUME_TOKEN
            )));
        }
        let sess = &self.sessions[&session];
        if sess.requests.len() + sess.leases.len() >= self.cfg.max_per_session {
            return Err(Error::LimitExceeded("stream has too many open requests and leases".into()));
        }
        let chain = pool.chain.clone();
        if chain.iter().any(|p| self.pools[p].in_flight >= self.pools[p].cfg.max_concurrent) {
            return Err(Error::ResumeOverLimit(req.pool));
        }
        for p in &chain {
            self.pools.get_mut(p).expect("chain pools exist").in_flight += 1;
        }
        let pool = self.pools.get_mut(&req.pool).expect("checked");
        pool.next_token = pool.next_token.max(req.token.0.saturating_add(1));
        let readopted = req.pool.clone();
        pool.add_interest(session);
        self.sessions.get_mut(&session).expect("checked").leases.insert(id);
        let expires_at = now + ttl;
        self.leases.insert(Lease {
            id,
            pool: req.pool,
            session,
            request_id: None,
            holder: req.holder,
            priority: req.priority,
            token: req.token,
            granted_at: now,
            ttl,
            expires_at,
        });
        self.readopted(now, &readopted);
        Ok(Resumed { token: req.token, expires_at, displaced: None })
    }
}

/// What an accepted resume did.
struct Resumed {
    token: FencingToken,
    expires_at: Instant,
    /// The open stream the lease was taken from, and the lease's pool.
    displaced: Option<(SessionId, PoolId)>,
}
