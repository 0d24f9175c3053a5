//! High availability: one leader among several members, elected through etcd's v3 election API.
//!
//! # Roles
//! Every member campaigns under `[ha] election` with a candidacy key bound to its own etcd lease
//! (`[ha] lease_ttl`). The one whose key etcd names leader serves; the others are standbys and answer
//! every agent and admin call with UNAVAILABLE and the leader's advertised address in the
//! `slotd-leader` metadata (one check, in the services' interceptor: [`RoleReader::admit`]). Health
//! reports the role: `slotd.v1.Slotd` and `slotd.v1.Admin` are SERVING on the leader only, `""`
//! (the process) is SERVING on every member.
//!
//! # Epochs and fencing tokens
//! A term's epoch is its leader key's create revision, which etcd increases with every write, so a
//! later leader always has a larger epoch. Fencing tokens of a term start at `epoch << 32`
//! ([`token_base`]): the epoch in the high 31 bits, a per-pool counter in the low 32. A pool's tokens
//! therefore strictly increase across failovers, as long as one term hands out fewer than 2^32
//! tokens per pool and etcd's revision stays below 2^31 (a member refuses to lead beyond that).
//!
//! # Self-fencing
//! The leader stops granting at its last successful keepalive (the instant the request was sent) +
//! the lease TTL etcd granted − `[ha] margin`: the core is fed that instant as data
//! ([`crate::scheduler::Scheduler::set_grant_deadline`]) and refuses to grant from then on, even
//! while this task is stalled (SIGSTOP) or cut from etcd. When that deadline passes without a
//! renewal, when etcd says the lease is gone, or when the leader key is deleted (watched), the
//! member is deposed: it ends all its streams at once and [`run`] returns, so the daemon exits and
//! its supervisor starts it again as a standby.
//!
//! # When etcd fails under the leader
//! - A broken link to etcd (etcd restarting, a network cut) is not a deposition by itself: the leader
//!   keeps serving its clients until its grant deadline and meanwhile reopens its keepalive stream
//!   every [`RENEW_RETRY`] (the etcd client reconnects underneath). A renewal that gets through in
//!   time moves the deadline on, and the term goes on; otherwise it is deposed at the deadline.
//! - Only etcd itself saying the lease is gone (a keepalive answered with TTL 0) deposes at once.
//! - The watch on the leader key is opened after a read that checks the key still exists with this
//!   term's create revision, from the revision after that read. When the watch ends (etcd
//!   restarted, the link broke, the watch was compacted away) it is opened again the same way as
//!   soon as a renewal gets through, so a deletion during the outage is still seen.
//! - A renewal proves the lease alive only from the instant its request was sent; a new candidacy's
//!   first proof is the instant its lease was asked for, never a later one.
//! - A standby whose campaign call fails (etcd restarting) campaigns again with the same lease,
//!   which keeps its candidacy key and its place in line, and keeps renewing the lease meanwhile;
//!   it only starts over with a new lease once etcd says the old one is gone or it could not renew
//!   it within the TTL. It follows the leader's address through a new Observe call likewise.
//!
//! # Durable state
//! In etcd, written only in transactions guarded by the term's epoch (a deposed leader's writes fail):
//! the pool set (Admin changes, `/slotd/{election}/pools`) and the runtime state (pauses, adaptive
//! headroom, breakers, rate-budget levels, holds, release cooldowns and per-pool held counts,
//! `/slotd/{election}/runtime`, see [`runtime`]).
//!
//! # Taking over
//! A new leader reads the pool set and the runtime state, then starts its term
//! ([`crate::scheduler::Scheduler::begin_term`] and [`crate::scheduler::Scheduler::take_over`]) with a
//! learning period covering the longest lease TTL of its pools: clients re-present their leases with
//! their resume credentials (the key file is shared by every member), and new waiters queue. Pauses
//! merge with max, rate budgets with min, headroom, breakers, holds and cooldowns are restored, and
//! each pool grants again as soon as every lease the previous leader last reported on it is back (or
//! when the period ends).

use std::{collections::VecDeque, sync::Arc, time::Duration};

use etcd_client::{
    Client, ConnectOptions, EventType, LeaseKeepAliveStream, LeaseKeeper, WatchOptions, WatchStream,
};
use slotd_proto::v1::{admin_server, slotd_server};
use tokio::{sync::watch, time::Instant};
use tonic::{Status, metadata::MetadataValue};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{debug, info, warn};

use crate::{
    config::HaSection,
    driver::{DriverHandle, Pools},
    scheduler::{BreakerRuntime, PoolRuntime},
    state,
};

pub mod runtime;

/// The metadata key naming the leader's advertised address on a standby's UNAVAILABLE.
pub use slotd_proto::LEADER_HEADER;

/// Bits of a fencing token below the epoch (see the module docs).
pub const EPOCH_SHIFT: u32 = 32;
/// Largest epoch a member leads with: `epoch << EPOCH_SHIFT` must stay below
/// [`crate::scheduler::SchedulerConfig::MAX_RESUME_TOKEN`] so that re-presented tokens are accepted.
pub const MAX_EPOCH: u64 = (1 << 31) - 1;
/// Longest wait between two attempts to reach etcd.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(2);
/// How soon a failed renewal, a broken keepalive stream or watch, or a failed campaign call is
/// tried again (renewals are otherwise a third of the lease TTL apart).
pub const RENEW_RETRY: Duration = Duration::from_millis(100);

/// This member's role.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serving agents and operators.
    Leader,
    /// Redirecting every call to the leader.
    Standby,
}

impl Role {
    /// `leader` or `standby`.
    pub fn label(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Standby => "standby",
        }
    }
}

/// What the services and metrics read about the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleState {
    /// This member's role.
    pub role: Role,
    /// The current term's epoch as far as this member knows (0: none yet).
    pub epoch: u64,
    /// The leader's advertised address, when known.
    pub leader: Option<String>,
    /// Terms this member has led (each one a failover onto it, or the first election).
    pub terms: u64,
    /// The learning period of the term this member leads (or last led).
    pub learning: Duration,
}

impl RoleState {
    /// A standby that knows no leader yet.
    pub fn standby() -> Self {
        Self { role: Role::Standby, epoch: 0, leader: None, terms: 0, learning: Duration::ZERO }
    }
}

/// The services' view of the role (cheap to clone, read without waiting).
#[derive(Clone, Debug)]
pub struct RoleReader(watch::Receiver<RoleState>);

impl RoleReader {
    /// A reader of `rx`.
    pub fn new(rx: watch::Receiver<RoleState>) -> Self {
        Self(rx)
    }

    /// The role now.
    pub fn get(&self) -> RoleState {
        self.0.borrow().clone()
    }

    /// Registers the election's metrics (`slotd_ha_leader`, `slotd_ha_epoch`,
    /// `slotd_ha_terms_total`, `slotd_ha_learning_seconds`) and keeps them current.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        let leader = prometheus::IntGauge::new(
            "slotd_ha_leader",
            "1 while this member is the leader, 0 on a standby.",
        )?;
        let epoch = prometheus::IntGauge::new(
            "slotd_ha_epoch",
            "Epoch of the term this member leads or last led (the etcd leader key's create revision).",
        )?;
        let terms = prometheus::IntCounter::new(
            "slotd_ha_terms_total",
            "Terms this member took over as leader (its first election and every failover onto it).",
        )?;
        let learning = prometheus::Gauge::new(
            "slotd_ha_learning_seconds",
            "Learning period of the term this member leads or last led: the longest a pool grants nothing \
             new (each pool ends it once its leases are back; see slotd_ha_learning_pool_seconds).",
        )?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(epoch.clone()))?;
        registry.register(Box::new(terms.clone()))?;
        registry.register(Box::new(learning.clone()))?;
        let mut rx = self.0.clone();
        tokio::spawn(async move {
            loop {
                {
                    let st = rx.borrow_and_update();
                    leader.set(i64::from(st.role == Role::Leader));
                    epoch.set(i64::try_from(st.epoch).unwrap_or(i64::MAX));
                    terms.inc_by(st.terms.saturating_sub(terms.get()));
                    learning.set(st.learning.as_secs_f64());
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// Lets a call through on the leader; on a standby, UNAVAILABLE with the leader's address (when
    /// known) in `slotd-leader`.
    pub fn admit(&self) -> Result<(), Status> {
        let st = self.0.borrow();
        if st.role == Role::Leader {
            return Ok(());
        }
        let mut status = match &st.leader {
            Some(addr) => Status::unavailable(format!("this slotd is a standby; the leader is {addr}")),
            None => Status::unavailable("this slotd is a standby and knows no leader yet; retry shortly"),
        };
        if let Some(v) = st.leader.as_deref().and_then(|a| MetadataValue::try_from(a).ok()) {
            status.metadata_mut().insert(LEADER_HEADER, v);
        }
        Err(status)
    }
}

/// The first fencing token of a term, or `None` when the epoch is out of range.
pub fn token_base(epoch: i64) -> Option<u64> {
    u64::try_from(epoch).ok().filter(|e| (1..=MAX_EPOCH).contains(e)).map(|e| e << EPOCH_SHIFT)
}

/// Why the member stopped.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// It led and can no longer be sure it does.
    #[error("deposed as leader: {0}")]
    Deposed(String),
    /// It cannot lead at all.
    #[error("cannot lead: {0}")]
    Fatal(String),
}

/// The leader's durable state in etcd (the pool set Admin changes, and the runtime state of
/// [`runtime`]), written in transactions that
/// only succeed while this term's leader key exists with this term's create revision: a deposed
/// leader's writes fail. Shared by the election task (which opens and closes the term) and the
/// Admin service.
#[derive(Clone, Default)]
pub struct Durable(Arc<tokio::sync::Mutex<Option<TermStore>>>, Arc<std::sync::Mutex<Option<Candidacy>>>);

/// This member's etcd lease, revoked on a graceful stop (see [`Durable::resign`]).
struct Candidacy {
    client: Client,
    lease: i64,
    timeout: Duration,
}

struct TermStore {
    client: Client,
    leader_key: Vec<u8>,
    epoch: i64,
    pools_key: String,
    runtime_key: String,
    timeout: Duration,
}

/// The etcd key of the pool set of `election`.
pub fn pools_key(election: &str) -> String {
    format!("/slotd/{election}/pools")
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Durable")
    }
}

impl Durable {
    /// Writes the pool set under this term's epoch.
    ///
    /// # Cancel safety
    /// Dropping it may or may not have written the pool set.
    pub async fn save_pools(&self, pools: &Pools) -> Result<(), String> {
        let term = self.0.lock().await;
        let Some(t) = term.as_ref() else {
            return Err("this member is not the leader".into());
        };
        let text = state::encode(pools)?;
        runtime::put_guarded(&t.client, &t.leader_key, t.epoch, &t.pools_key, text, t.timeout)
            .await
            .map_err(|e| e.to_string())
    }

    /// Writes the runtime state document under this term's epoch.
    ///
    /// # Cancel safety
    /// Dropping it may or may not have written the document.
    pub async fn save_runtime(&self, text: String) -> Result<(), runtime::PutError> {
        let term = self.0.lock().await;
        let Some(t) = term.as_ref() else {
            return Err(runtime::PutError::Closed);
        };
        runtime::put_guarded(&t.client, &t.leader_key, t.epoch, &t.runtime_key, text, t.timeout).await
    }

    /// On a graceful stop, after granting stopped: writes the runtime state a last time, then revokes
    /// this member's etcd lease, so that its
    /// candidacy key (and leadership) goes at once and the next member takes over without waiting
    /// out the lease TTL.
    ///
    /// # Cancel safety
    /// Dropping it may or may not have revoked the lease; etcd expires it after its TTL anyway.
    pub async fn resign(&self, handle: &DriverHandle) {
        // Last, the exact held counts (nothing is granted any more), so that the next leader's pools
        // leave learning as soon as these leases are back.
        if let Some(t) = self.0.lock().await.take()
            && let Ok((_, st)) = handle.runtime_state().await
        {
            let written = match runtime::encode(&st, t.epoch as u64, runtime::Clock::now()) {
                Ok(text) => {
                    runtime::put_guarded(&t.client, &t.leader_key, t.epoch, &t.runtime_key, text, t.timeout)
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                warn!(error = %e, "cannot write the final runtime state; the next leader uses the last one");
            }
        }
        let candidacy = self.1.lock().ok().and_then(|mut c| c.take());
        if let Some(c) = candidacy {
            let mut client = c.client;
            match tokio::time::timeout(c.timeout, client.lease_revoke(c.lease)).await {
                Ok(Ok(_)) => info!("resigned: etcd lease revoked, another member takes over now"),
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot revoke the etcd lease; another member takes over after its TTL")
                }
                Err(_) => {
                    warn!("etcd did not answer the lease revoke; another member takes over after its TTL")
                }
            }
        }
    }

    fn candidacy(&self, c: Option<Candidacy>) {
        if let Ok(mut slot) = self.1.lock() {
            *slot = c;
        }
    }

    async fn open(&self, t: TermStore) {
        *self.0.lock().await = Some(t);
    }

    async fn close(&self) {
        *self.0.lock().await = None;
    }
}

/// What the election task needs from the daemon.
pub struct Member {
    /// `[ha]`.
    pub cfg: HaSection,
    /// The address clients reach this member at (`[ha] advertise`, or the bound listen address).
    pub advertise: String,
    /// The scheduler.
    pub handle: DriverHandle,
    /// Where the role is published.
    pub role: watch::Sender<RoleState>,
    /// Health, to report the role.
    pub health: HealthReporter,
    /// A new term's learning period (the longest lease TTL of the pools).
    pub learning: Duration,
    /// The durable state, opened for each term.
    pub durable: Durable,
}

/// Runs this member's candidacy until it is deposed (or cannot lead at all): as a standby it follows
/// the leader's address; once elected it starts a term, renews its lease and fences itself.
///
/// # Cancel safety
/// Dropping it stops campaigning and renewing: a leader's grants stop at its current grant deadline
/// and etcd elects another member once the lease runs out.
pub async fn run(m: Member) -> HaError {
    set_health(&m.health, Role::Standby).await;
    let mut backoff = Duration::from_millis(100);
    loop {
        match term(&m).await {
            Ok(e) => return e,
            Err(e) => {
                warn!(error = %e, "etcd unreachable or candidacy lost while standing by; retrying");
                m.role.send_modify(|s| s.leader = None);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
            }
        }
    }
}

/// One candidacy: `Err` when it ended while standing by (retry), `Ok` when the member led and was
/// deposed or cannot lead.
async fn term(m: &Member) -> Result<HaError, etcd_client::Error> {
    let ttl = m.cfg.lease_ttl;
    let call = ttl / 3;
    // No HTTP/2 keep-alive pings: etcd answers pings more often than every 5 s with GOAWAY; the
    // lease keepalives below are the liveness check.
    let opts = ConnectOptions::new().with_connect_timeout(call);
    let mut client = Client::connect(&m.cfg.etcd, Some(opts)).await?;
    debug!("connected to etcd");
    // The lease lives from (at the latest) the instant it was asked for: its first proof.
    let asked = Instant::now();
    let granted = within(call, client.lease_grant(ttl.as_secs() as i64, None)).await??;
    let lease = granted.id();
    // etcd may raise a TTL below its minimum: fence on what it granted.
    let ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0)).max(ttl);
    debug!(lease, ?ttl, "etcd lease granted");
    m.durable.candidacy(Some(Candidacy { client: client.clone(), lease, timeout: call }));
    let stream = within(call, client.lease_keep_alive(lease)).await??;
    let mut renewal = Renewal { lease, stream: Some(stream), outstanding: VecDeque::new(), renewed: asked };

    // Follow the leader's address while standing by. Its own task: etcd answers Observe only once
    // there is a leader, so the call itself may wait for a long time.
    let follow = AbortOnDrop(tokio::spawn(follow(client.clone(), m.cfg.election.clone(), m.role.clone())));
    let mut election = client.election_client();
    let mut next = Instant::now() + call;
    let won = 'campaign: loop {
        let campaign = election.campaign(m.cfg.election.clone(), m.advertise.clone(), lease);
        tokio::pin!(campaign);
        let failed = loop {
            tokio::select! {
                res = &mut campaign => match res {
                    Ok(won) => break 'campaign won,
                    Err(e) => break e,
                },
                () = tokio::time::sleep_until(next) => {
                    let renewed = renewal.round(&mut client, call).await?;
                    if renewal.renewed.elapsed() >= ttl {
                        return Err(etcd_client::Error::LeaseKeepAliveError("candidacy lease lapsed".into()));
                    }
                    next = Instant::now() + if renewed { call } else { RENEW_RETRY };
                }
            }
        };
        // etcd restarting, say: the same lease keeps this candidacy's key and place in line.
        debug!(error = %failed, "campaign call failed; campaigning again with the same lease");
        tokio::time::sleep(RENEW_RETRY).await;
        if renewal.renewed.elapsed() >= ttl {
            return Err(failed);
        }
    };
    drop(follow);
    let Some(key) = won.leader() else {
        return Err(etcd_client::Error::InvalidArgs("campaign answered without a leader key".into()));
    };
    let (epoch, key) = (key.rev(), key.key().to_vec());
    let Some(first_token) = token_base(epoch) else {
        return Ok(HaError::Fatal(format!("epoch {epoch} is beyond {MAX_EPOCH}")));
    };
    Ok(lead(m, &mut client, renewal, ttl, epoch, first_token, key).await)
}

/// This member's etcd lease and its keepalive stream, carried from the candidacy into the term.
struct Renewal {
    lease: i64,
    /// `None` after the stream broke: reopened by the next round.
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Send instants of the requests on `stream` not answered yet, oldest first.
    outstanding: VecDeque<Instant>,
    /// The send instant of the last request etcd answered (at first: when the lease was asked for).
    renewed: Instant,
}

impl Renewal {
    /// One keepalive round, bounded by `wait`: `Ok(true)` when it renewed (`renewed` moved on),
    /// `Ok(false)` when it proved nothing this time (no answer in time, or the stream is broken and
    /// is reopened by the next round), `Err` when etcd says the lease is gone.
    async fn round(&mut self, client: &mut Client, wait: Duration) -> Result<bool, etcd_client::Error> {
        let until = Instant::now() + wait;
        if self.stream.is_none() {
            match tokio::time::timeout_at(until, client.lease_keep_alive(self.lease)).await {
                Ok(Ok(stream)) => {
                    info!(lease = self.lease, "lease keepalive stream reopened");
                    self.stream = Some(stream);
                    self.outstanding.clear();
                }
                Ok(Err(e)) => {
                    debug!(error = %e, "cannot reopen the lease keepalive stream yet");
                    return Ok(false);
                }
                Err(_) => return Ok(false),
            }
        }
        let Some((keeper, acks)) = self.stream.as_mut() else { return Ok(false) };
        match keepalive(keeper, acks, &mut self.outstanding, until).await {
            Ack::Renewed(at) => {
                self.renewed = at;
                Ok(true)
            }
            Ack::Silent => Ok(false),
            Ack::Gone => Err(etcd_client::Error::LeaseKeepAliveError("etcd says the lease is gone".into())),
            Ack::Broken(why) => {
                warn!(reason = %why, "lease keepalive stream broke; reopening it until the grant deadline");
                self.stream = None;
                Ok(false)
            }
        }
    }
}

/// The leader's loop: renew, fence, watch the leader key; returns why it was deposed.
async fn lead(
    m: &Member,
    client: &mut Client,
    mut renewal: Renewal,
    ttl: Duration,
    epoch: i64,
    first_token: u64,
    key: Vec<u8>,
) -> HaError {
    let margin = m.cfg.margin;
    let call = ttl / 3;
    let deadline = |at: Instant| at + ttl.saturating_sub(margin);
    let mut watch = match watch_key(client, &key, epoch, call).await {
        Ok(Some(w)) => Some(w),
        Ok(None) => return depose(m, "the leader key is gone".into()).await,
        Err(e) => return depose(m, format!("cannot watch the leader key: {e}")).await,
    };
    // Renew once more before serving, so the term starts with a full grant window.
    if let Err(e) = renewal.round(client, call).await {
        return depose(m, format!("keepalive failed on taking over: {e}")).await;
    }
    if Instant::now() >= deadline(renewal.renewed) {
        return depose(m, "elected too late to serve before the lease could lapse".into()).await;
    }
    // The pools the previous leaders' operators left, stored under their epochs.
    let pools_key = pools_key(&m.cfg.election);
    let mut learning = m.learning;
    match tokio::time::timeout(call, client.get(pools_key.clone(), None)).await {
        Ok(Ok(resp)) => {
            if let Some(kv) = resp.kvs().first() {
                match kv.value_str().map_err(|e| e.to_string()).and_then(state::decode) {
                    Ok(pools) => {
                        let n = pools.len();
                        // Leases of the stored pools may live as long as their max_ttl.
                        learning = pools.values().map(|p| p.max_ttl).fold(learning, Duration::max);
                        if let Err(e) = m.handle.set_pools(pools).await {
                            warn!(error = %e, "the pools stored in etcd were refused; keeping the configured ones");
                        } else {
                            info!(
                                pools = n,
                                "serving the pools stored in etcd (Admin changes of earlier leaders)"
                            );
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "the pools stored in etcd are unreadable; keeping the configured ones")
                    }
                }
            }
        }
        _ => return depose(m, "cannot read the stored pools from etcd".into()).await,
    }
    // The previous leaders' pauses, headroom, breakers, budgets, holds and held counts.
    let state = match runtime::read(client, &m.cfg.election, call).await {
        Ok(runtime::Found::State(s)) => {
            let count = |f: fn(&PoolRuntime) -> bool| s.pools.values().filter(|p| f(p)).count();
            info!(
                pools = s.pools.len(),
                with_leases = count(|p| p.held.is_some_and(|h| h > 0)),
                without_count = count(|p| p.held.is_none()),
                paused = count(|p| p.paused_until.is_some()),
                breakers_not_closed = count(|p| p.breaker != BreakerRuntime::Closed),
                budgets_in_use = count(|p| p.budget_full_at.iter().any(Option::is_some)),
                holds = s.pools.values().map(|p| p.holds.len()).sum::<usize>(),
                cooling = s.pools.values().map(|p| p.cooling.len()).sum::<usize>(),
                "taking over the previous leader's runtime state"
            );
            Some(s)
        }
        Ok(runtime::Found::Unreadable) => None,
        Ok(runtime::Found::Absent) => {
            // Every leader publishes before it serves: no leader has granted anything here.
            info!("no leader has served in this election before: no learning period");
            learning = Duration::ZERO;
            None
        }
        Err(e) => return depose(m, format!("cannot read the runtime state from etcd: {e}")).await,
    };
    let runtime_key = runtime::runtime_key(&m.cfg.election);
    m.durable
        .open(TermStore {
            client: client.clone(),
            leader_key: key.clone(),
            epoch,
            pools_key,
            runtime_key,
            timeout: call,
        })
        .await;
    let term_epoch = epoch as u64;
    let inherited = state.is_some();
    if m.handle.begin_term(first_token, learning, state).await.is_err() {
        return HaError::Fatal("the scheduler stopped".into());
    }
    // Published before serving: a missing document then means that no leader has served.
    let published = match runtime::publish_now(&m.handle, &m.durable, term_epoch).await {
        Ok(s) => s,
        Err(e) => return depose(m, format!("cannot write the runtime state on taking over: {e}")).await,
    };
    if m.handle.set_grant_deadline(Some(deadline(renewal.renewed))).await.is_err() {
        return HaError::Fatal("the scheduler stopped".into());
    }
    let mut publisher = AbortOnDrop(tokio::spawn(runtime::publish(
        m.handle.clone(),
        m.durable.clone(),
        term_epoch,
        published,
    )));
    m.role.send_modify(|s| {
        s.role = Role::Leader;
        s.epoch = epoch as u64;
        s.leader = Some(m.advertise.clone());
        s.terms += 1;
        s.learning = learning;
    });
    set_health(&m.health, Role::Leader).await;
    info!(
        epoch,
        first_token,
        learning_secs = learning.as_secs_f64(),
        inherited,
        "elected leader: term started"
    );
    let mut next = Instant::now() + call;
    loop {
        let fence = deadline(renewal.renewed);
        tokio::select! {
            () = tokio::time::sleep_until(next.min(fence)) => {
                let now = Instant::now();
                if now >= fence {
                    return depose(m, "no successful keepalive within the lease TTL minus the margin".into()).await;
                }
                // A round never outlasts the deadline, so the deposition is not late.
                let renewed = match renewal.round(client, call.min(fence - now)).await {
                    Ok(r) => r,
                    Err(e) => return depose(m, e.to_string()).await,
                };
                if renewed && m.handle.set_grant_deadline(Some(deadline(renewal.renewed))).await.is_err() {
                    return HaError::Fatal("the scheduler stopped".into());
                }
                // etcd answers again: watch the leader key again, catching a deletion meanwhile.
                if renewed && watch.is_none() {
                    match watch_key(client, &key, epoch, call).await {
                        Ok(Some(w)) => {
                            info!("watching the leader key again");
                            watch = Some(w);
                        }
                        Ok(None) => return depose(m, "the leader key was deleted while unwatched".into()).await,
                        Err(e) => debug!(error = %e, "cannot watch the leader key yet"),
                    }
                }
                next = Instant::now() + if renewed && watch.is_some() { call } else { RENEW_RETRY };
            }
            why = &mut publisher.0 => {
                let why = why.unwrap_or_else(|e| format!("the runtime publisher failed: {e}"));
                return depose(m, format!("runtime state write refused: {why}")).await;
            }
            event = next_event(&mut watch) => match event {
                Ok(Some(resp)) if resp.events().iter().any(|e| e.event_type() == EventType::Delete) => {
                    return depose(m, "the leader key was deleted".into()).await;
                }
                Ok(Some(resp)) if resp.canceled() => {
                    warn!(reason = resp.cancel_reason(), "etcd cancelled the watch on the leader key; watching again");
                    watch = None;
                    next = Instant::now();
                }
                Ok(Some(_)) => {}
                // etcd restarting, the link broken: watch again once a renewal gets through.
                Ok(None) | Err(_) => {
                    warn!("watch on the leader key ended; watching again once etcd answers");
                    watch = None;
                    next = Instant::now();
                }
            },
        }
    }
}

/// The next message of the watch, or never without one.
async fn next_event(
    watch: &mut Option<WatchStream>,
) -> Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match watch {
        Some(w) => w.message().await,
        None => std::future::pending().await,
    }
}

/// Reads the leader key and watches it from the revision after that read: `Ok(None)` when the key
/// is gone or belongs to another term (this term is over).
async fn watch_key(
    client: &mut Client,
    key: &[u8],
    epoch: i64,
    wait: Duration,
) -> Result<Option<WatchStream>, etcd_client::Error> {
    let resp = within(wait, client.get(key.to_vec(), None)).await??;
    if resp.kvs().first().is_none_or(|kv| kv.create_revision() != epoch) {
        return Ok(None);
    }
    let opts = match resp.header() {
        Some(h) => WatchOptions::new().with_start_revision(h.revision().saturating_add(1)),
        None => WatchOptions::new(),
    };
    Ok(Some(within(wait, client.watch(key.to_vec(), Some(opts))).await??))
}

/// Publishes the leader's advertised address as etcd reports it, until aborted; observes again
/// after the call ends (etcd restarted, the link broke).
async fn follow(client: Client, election: String, role: watch::Sender<RoleState>) {
    loop {
        match client.election_client().observe(election.clone()).await {
            Ok(mut observe) => {
                while let Ok(Some(seen)) = observe.message().await {
                    let addr = seen
                        .kv()
                        .and_then(|kv| kv.value_str().ok())
                        .filter(|a| !a.is_empty())
                        .map(str::to_owned);
                    role.send_if_modified(|s| {
                        let changed = s.role == Role::Standby && s.leader != addr;
                        if changed {
                            s.leader = addr.clone();
                        }
                        changed
                    });
                }
                debug!("observing the election ended; observing again");
            }
            Err(e) => debug!(error = %e, "cannot observe the election yet"),
        }
        tokio::time::sleep(RENEW_RETRY).await;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one keepalive request proved.
enum Ack {
    /// etcd renewed the lease: the send instant of the latest request it answered.
    Renewed(Instant),
    /// No answer in time (etcd slow or unreachable).
    Silent,
    /// etcd answered that the lease is gone (TTL 0).
    Gone,
    /// The stream failed or ended (etcd restarting, the link broken).
    Broken(String),
}

/// Sends one keepalive and reads answers until `until`.
///
/// `outstanding` holds the send instants of requests not answered yet, oldest first: etcd answers
/// in order, so a late answer proves a renewal at its own request's instant, never a later one.
async fn keepalive(
    keeper: &mut LeaseKeeper,
    acks: &mut LeaseKeepAliveStream,
    outstanding: &mut VecDeque<Instant>,
    until: Instant,
) -> Ack {
    let sent = Instant::now();
    if let Err(e) = keeper.keep_alive().await {
        return Ack::Broken(e.to_string());
    }
    outstanding.push_back(sent);
    let mut proven = None;
    while !outstanding.is_empty() {
        match tokio::time::timeout_at(until, acks.message()).await {
            Ok(Ok(Some(ack))) if ack.ttl() > 0 => proven = outstanding.pop_front(),
            Ok(Ok(Some(_))) => return Ack::Gone,
            Ok(Ok(None)) => return Ack::Broken("keepalive stream ended".into()),
            Ok(Err(e)) => return Ack::Broken(e.to_string()),
            Err(_) => break,
        }
    }
    proven.map_or(Ack::Silent, Ack::Renewed)
}

/// Stops granting, turns standby, ends every stream at once.
async fn depose(m: &Member, why: String) -> HaError {
    warn!(reason = %why, "deposed: no more grants; ending every stream");
    let _ = m.handle.set_grant_deadline(Some(Instant::now())).await;
    m.durable.close().await;
    m.role.send_modify(|s| {
        s.role = Role::Standby;
        s.leader = None;
    });
    set_health(&m.health, Role::Standby).await;
    let held = m.handle.shutdown().await;
    info!(leases = held, "streams ended; the clients resume their leases on the next leader");
    HaError::Deposed(why)
}

async fn within<F: std::future::Future>(d: Duration, f: F) -> Result<F::Output, etcd_client::Error> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| etcd_client::Error::LeaseKeepAliveError(format!("etcd did not answer within {d:?}")))
}

async fn set_health(health: &HealthReporter, role: Role) {
    let status = match role {
        Role::Leader => ServingStatus::Serving,
        Role::Standby => ServingStatus::NotServing,
    };
    for service in [slotd_server::SERVICE_NAME, admin_server::SERVICE_NAME] {
        health.set_service_status(service, status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_of_a_later_epoch_are_above_every_token_of_an_earlier_one() {
        let a = token_base(41).unwrap();
        let b = token_base(42).unwrap();
        assert!(b > a + u64::from(u32::MAX));
        assert_eq!(token_base(0), None);
        assert_eq!(token_base(-1), None);
        assert_eq!(token_base(MAX_EPOCH as i64 + 1), None);
        assert!(token_base(MAX_EPOCH as i64).unwrap() <= crate::scheduler::SchedulerConfig::MAX_RESUME_TOKEN);
    }

    #[test]
    fn a_standby_answers_unavailable_with_the_leader() {
        let (tx, rx) = watch::channel(RoleState::standby());
        let r = RoleReader::new(rx);
        let s = r.admit().unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.metadata().get(LEADER_HEADER).is_none());
        tx.send_modify(|s| s.leader = Some("http://127.0.0.1:7001".into()));
        let s = r.admit().unwrap_err();
        assert_eq!(s.metadata().get(LEADER_HEADER).unwrap(), "http://127.0.0.1:7001");
        tx.send_modify(|s| s.role = Role::Leader);
        assert!(r.admit().is_ok());
    }
}
