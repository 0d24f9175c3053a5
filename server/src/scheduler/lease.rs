//! The lease table: leases by id, an expiry index, and tombstones of recently ended leases.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

use super::ids::{FencingToken, LeaseId, PoolId, Priority, RequestId, SessionId};

/// A granted slot on a pool (and on each of its ancestors).
#[derive(Clone, Debug)]
pub struct Lease {
    /// Unguessable id.
    pub id: LeaseId,
    /// The pool it was granted on.
    pub pool: PoolId,
    /// The stream that holds it.
    pub session: SessionId,
    /// The request that got it (empty for a lease re-created by a resume).
    pub request_id: Option<RequestId>,
    /// Holder name from the request.
    pub holder: Arc<str>,
    /// Priority of the request.
    pub priority: Priority,
    /// Strictly increasing per pool.
    pub token: FencingToken,
    /// When it was granted (or re-created).
    pub granted_at: Instant,
    /// How long it lives without a heartbeat.
    pub ttl: Duration,
    /// When it expires unless renewed.
    pub expires_at: Instant,
}

/// How a lease ended, remembered for a while so late messages get a clear answer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Released by its holder.
    Released,
    /// Reclaimed because heartbeats stopped.
    Expired,
    /// Its stream closed.
    StreamClosed,
    /// Revoked or its pool removed.
    Revoked,
}

impl Ended {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Ended::Released => "released",
            Ended::Expired => "reclaimed after its ttl expired without a heartbeat",
            Ended::StreamClosed => "released when its stream closed",
            Ended::Revoked => "revoked",
        }
    }
}

/// Leases by id, ordered by expiry.
#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    by_id: HashMap<LeaseId, Lease>,
    expiry: BTreeSet<(Instant, LeaseId)>,
    tombstones: HashMap<LeaseId, Ended>,
    tomb_order: VecDeque<LeaseId>,
}

impl LeaseTable {
    /// How many ended leases are remembered.
    pub(crate) const TOMBSTONES: usize = 65_536;

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn get(&self, id: &LeaseId) -> Option<&Lease> {
        self.by_id.get(id)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Lease> {
        self.by_id.values()
    }

    pub(crate) fn contains(&self, id: &LeaseId) -> bool {
        self.by_id.contains_key(id)
    }

    pub(crate) fn insert(&mut self, lease: Lease) {
        self.expiry.insert((lease.expires_at, lease.id));
        self.by_id.insert(lease.id, lease);
    }

    pub(crate) fn remove(&mut self, id: &LeaseId, how: Ended) -> Option<Lease> {
        let lease = self.by_id.remove(id)?;
        self.expiry.remove(&(lease.expires_at, lease.id));
        if self.tomb_order.len() >= Self::TOMBSTONES
            && let Some(old) = self.tomb_order.pop_front()
        {
            self.tombstones.remove(&old);
        }
        self.tombstones.insert(*id, how);
        self.tomb_order.push_back(*id);
        Some(lease)
    }

    /// How a recently ended lease ended.
    pub(crate) fn ended(&self, id: &LeaseId) -> Option<Ended> {
        self.tombstones.get(id).copied()
    }

    /// Gives a lease a new TTL (applied from its next renewal).
    pub(crate) fn set_ttl(&mut self, id: &LeaseId, ttl: Duration) {
        if let Some(lease) = self.by_id.get_mut(id) {
            lease.ttl = ttl;
        }
    }

    /// Renews a lease: it now expires `ttl` after `now`.
    pub(crate) fn renew(&mut self, id: &LeaseId, now: Instant) -> Option<&Lease> {
        let lease = self.by_id.get_mut(id)?;
        self.expiry.remove(&(lease.expires_at, lease.id));
        lease.expires_at = super::time::after(now, lease.ttl);
        self.expiry.insert((lease.expires_at, lease.id));
        Some(lease)
    }

    /// Sets when a lease expires.
    pub(crate) fn set_expiry(&mut self, id: &LeaseId, at: Instant) {
        if let Some(lease) = self.by_id.get_mut(id) {
            self.expiry.remove(&(lease.expires_at, lease.id));
            lease.expires_at = at;
            self.expiry.insert((at, lease.id));
        }
    }

    /// Moves a lease to another session.
    pub(crate) fn set_session(&mut self, id: &LeaseId, session: SessionId) {
        if let Some(l) = self.by_id.get_mut(id) {
            l.session = session;
        }
    }

    /// The earliest expiry.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.expiry.first().map(|(t, _)| *t)
    }

    /// The id of a lease that has expired by `now`, if any.
    pub(crate) fn first_expired(&self, now: Instant) -> Option<LeaseId> {
        self.expiry.first().filter(|(t, _)| *t <= now).map(|(_, id)| *id)
    }
}
