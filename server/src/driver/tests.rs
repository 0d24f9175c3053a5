//! Driver tests under paused time: in-process channels, no sockets.
//!
//! Each test runs the real timer task on a scheduler with explicit pools and talks to it through a
//! [`DriverHandle`], as the gRPC layer does. Paused time jumps straight to the next timer whenever
//! every task waits, so these tests check deadlines to the instant without waiting for them.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};

use super::{Driver, DriverHandle, Observer, Outbound, StreamOp, watch};
use crate::scheduler::{
    Error, Event, Fact, LeaseEnd, LeaseId, NewRequest, Outcome, PoolConfig, PoolId, RequestId, Scheduler,
    SchedulerConfig, SessionId,
};

fn pid(name: &str) -> PoolId {
    PoolId::parse(name).expect("valid pool name")
}

fn req(id: &str, pool: &str) -> NewRequest {
    NewRequest::new(RequestId::parse(id).expect("valid request id"), pid(pool))
}

/// Records every fact it is handed.
#[derive(Clone, Default)]
struct Facts(Arc<Mutex<Vec<Fact>>>);

impl Observer for Facts {
    fn fact(&mut self, fact: &Fact) {
        self.0.lock().unwrap().push(fact.clone());
    }
}

impl Facts {
    fn take(&self) -> Vec<Fact> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A running driver over these pools, and the facts it routes.
fn start(pools: &[(&str, PoolConfig)]) -> (DriverHandle, Facts) {
    let pools = pools.iter().map(|(n, c)| (pid(n), c.clone())).collect();
    let cfg = SchedulerConfig { seed: Some(1), ..Default::default() };
    let sched = Scheduler::new(cfg, pools, Instant::now()).expect("valid pools");
    let facts = Facts::default();
    let (driver, handle) = Driver::new(sched);
    tokio::spawn(driver.with_observer(facts.clone()).run());
    (handle, facts)
}

/// One open stream: its session and its event channel.
struct Stream {
    session: SessionId,
    events: mpsc::Receiver<Outbound>,
    driver: DriverHandle,
}

impl Stream {
    async fn open(driver: &DriverHandle) -> Self {
        let (tx, events) = mpsc::channel(64);
        let session = driver.open(tx, Duration::ZERO).expect("driver runs");
        Self { session, events, driver: driver.clone() }
    }

    async fn send(&self, op: StreamOp) {
        self.driver.op(self.session, op).expect("driver runs");
    }

    async fn next(&mut self) -> Event {
        match self.events.recv().await.map(|b| *b) {
            Some(Ok(e)) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Nothing arrives within `d`.
    async fn quiet_for(&mut self, d: Duration) {
        if let Ok(e) = tokio::time::timeout(d, self.events.recv()).await {
            panic!("expected nothing for {d:?}, got {e:?}");
        }
    }

    async fn granted(&mut self, id: &str) -> LeaseId {
        match self.next().await {
            Event::Granted { request_id, lease_id, .. } if request_id.as_str() == id => lease_id,
            e => panic!("expected the grant of {id}, got {e:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_lease_without_heartbeats_expires_exactly_at_its_ttl() {
    let ttl = Duration::from_secs(10);
    let (driver, facts) = start(&[("p", PoolConfig { default_ttl: ttl, ..PoolConfig::with_limit(1) })]);
    let mut a = Stream::open(&driver).await;
    let t0 = Instant::now();
    a.send(StreamOp::Request(req("1", "p"))).await;
    let lease = a.granted("1").await;

    a.quiet_for(ttl - Duration::from_millis(1)).await;
    match a.next().await {
        Event::Expired { lease_id, .. } => assert_eq!(lease_id, lease),
        e => panic!("expected Expired, got {e:?}"),
    }
    assert_eq!(Instant::now() - t0, ttl);
    let ends: Vec<LeaseEnd> = facts
        .take()
        .into_iter()
        .filter_map(|f| match f {
            Fact::Ended { end, .. } => Some(end),
            _ => None,
        })
        .collect();
    assert_eq!(ends, [LeaseEnd::Expired(crate::scheduler::ExpiryReason::Ttl)]);
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_moves_the_expiry() {
    let ttl = Duration::from_secs(10);
    let (driver, _) = start(&[("p", PoolConfig { default_ttl: ttl, ..PoolConfig::with_limit(1) })]);
    let mut a = Stream::open(&driver).await;
    a.send(StreamOp::Request(req("1", "p"))).await;
    let lease = a.granted("1").await;
    a.quiet_for(Duration::from_secs(6)).await;
    let renewed_at = Instant::now();
    a.send(StreamOp::Heartbeat(vec![lease])).await;
    assert_eq!(a.next().await, Event::HeartbeatAck { renewed: 1 });

    a.quiet_for(ttl - Duration::from_millis(1)).await;
    assert!(matches!(a.next().await, Event::Expired { lease_id, .. } if lease_id == lease));
    assert_eq!(Instant::now() - renewed_at, ttl);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_rejected_exactly_at_its_max_wait() {
    let wait = Duration::from_secs(3);
    let (driver, _) = start(&[("p", PoolConfig { max_wait: Some(wait), ..PoolConfig::with_limit(1) })]);
    let mut a = Stream::open(&driver).await;
    let mut b = Stream::open(&driver).await;
    a.send(StreamOp::Request(req("1", "p"))).await;
    a.granted("1").await;
    let t0 = Instant::now();
    b.send(StreamOp::Request(req("2", "p"))).await;
    assert!(matches!(b.next().await, Event::Queued { position: 0, .. }));

    b.quiet_for(wait - Duration::from_millis(1)).await;
    match b.next().await {
        Event::Rejected { request_id, error: Error::WaitTimeout { .. } } => assert_eq!(request_id, "2"),
        e => panic!("expected a wait timeout, got {e:?}"),
    }
    assert_eq!(Instant::now() - t0, wait);
    // The holder heard nothing of it.
    a.quiet_for(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn events_go_to_their_own_session_and_a_closed_stream_frees_its_slot() {
    let (driver, facts) = start(&[("p", PoolConfig::with_limit(1))]);
    let mut a = Stream::open(&driver).await;
    let mut b = Stream::open(&driver).await;
    a.send(StreamOp::Request(req("1", "p"))).await;
    let lease = a.granted("1").await;
    b.send(StreamOp::Request(req("1", "p"))).await;
    assert!(matches!(b.next().await, Event::Queued { .. }));
    a.quiet_for(Duration::from_secs(1)).await;

    // A release from the wrong session is refused there, and changes nothing.
    b.send(StreamOp::Release(lease, Outcome::Ok.into())).await;
    assert!(matches!(b.next().await, Event::LeaseError { error: Error::NotYourLease(_), .. }));

    facts.take();
    driver.close(a.session, None);
    b.granted("1").await;
    let ends: Vec<(LeaseId, LeaseEnd)> = facts
        .take()
        .into_iter()
        .filter_map(|f| match f {
            Fact::Ended { lease, end } => Some((lease.id, end)),
            _ => None,
        })
        .collect();
    assert_eq!(ends, [(lease, LeaseEnd::StreamClosed)]);
    // The closed stream is ended, with no further events.
    assert!(a.events.recv().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_pause_of_an_idle_pool_reaches_observers_and_ends_on_time() {
    let (driver, facts) = start(&[("p", PoolConfig::with_limit(1))]);
    let t0 = Instant::now();
    let applied =
        driver.report_rate_limit(pid("p"), Some(Duration::from_secs(5)), "slow down".into()).await.unwrap();
    assert_eq!(applied.until, t0 + Duration::from_secs(5));
    assert!(matches!(&facts.take()[..], [Fact::Paused { extended: true, .. }]));

    tokio::time::sleep(Duration::from_secs(5)).await;
    // The driver's timer fired on its own; Status sees the pause over.
    let snap = driver.status(Some(pid("p"))).await.unwrap();
    assert_eq!(snap.pools[0].paused_until, None);
    assert!(matches!(&facts.take()[..], [Fact::Resumed { .. }]));
}

#[tokio::test(start_paused = true)]
async fn drain_follows_the_counts_until_the_last_lease_ends() {
    let (driver, _) = start(&[("p", PoolConfig::with_limit(2))]);
    let mut a = Stream::open(&driver).await;
    a.send(StreamOp::Request(req("1", "p"))).await;
    let l1 = a.granted("1").await;
    a.send(StreamOp::Request(req("2", "p"))).await;
    let l2 = a.granted("2").await;

    let mut progress = watch::drain(driver.clone(), None).await.unwrap();
    assert_eq!(progress.recv().await.unwrap().unwrap().leases, 2);
    a.send(StreamOp::Release(l1, Outcome::Ok.into())).await;
    assert_eq!(progress.recv().await.unwrap().unwrap().leases, 1);
    a.send(StreamOp::Release(l2, Outcome::Ok.into())).await;
    assert_eq!(progress.recv().await.unwrap().unwrap().leases, 0);
    assert!(progress.recv().await.is_none(), "the stream ends once no lease is held");
}

#[tokio::test(start_paused = true)]
async fn drain_times_out_at_its_deadline() {
    // The lease lives 30 s (the default TTL), longer than the drain waits.
    let (driver, _) = start(&[("p", PoolConfig::with_limit(1))]);
    let mut a = Stream::open(&driver).await;
    a.send(StreamOp::Request(req("1", "p"))).await;
    a.granted("1").await;
    let t0 = Instant::now();
    let mut progress = watch::drain(driver.clone(), Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(progress.recv().await.unwrap().unwrap().leases, 1);
    match progress.recv().await.unwrap() {
        Err(watch::DrainError::Timeout { leases: 1 }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(Instant::now() - t0, Duration::from_secs(20));
}
