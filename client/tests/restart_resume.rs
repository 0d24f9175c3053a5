//! Reconnect and resume: a daemon restart with held leases gets them resumed during the learning
//! period, queued requests are re-sent, and an auditor checks the limit is never exceeded.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use slotd_client::{Client, Lost};
use slotd_test_support::{
    Daemon,
    client::{idle, pool, wait_until},
    within,
};

const LIMIT: usize = 2;

/// Both daemons of a test share `key_file`, so resume credentials outlive the restart.
fn config(learning: &str, key_file: &std::path::Path) -> String {
    format!(
        "key_file = {:?}\n[scheduler]\nlearning_period = \"{learning}\"\n[limits]\ndrain_timeout = \"300ms\"\n\
         [pools.p]\nmax_concurrent = {LIMIT}\nadaptive = false\ndefault_ttl = \"2s\"\n",
        key_file.display().to_string()
    )
}

/// A key file path of its own for one test, removed on drop.
struct KeyFile(std::path::PathBuf);

impl KeyFile {
    fn new(tag: &str) -> Self {
        let name = format!("slotd-restart-resume-{}-{tag}.key", std::process::id());
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_file(&path);
        KeyFile(path)
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Counts the holders that believe they hold a slot, and remembers the most ever seen at once.
#[derive(Clone, Default)]
struct Auditor {
    holding: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

impl Auditor {
    fn enter(&self) {
        let now = self.holding.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.holding.fetch_sub(1, Ordering::SeqCst);
    }

    #[track_caller]
    fn check(&self) {
        let max = self.max.load(Ordering::SeqCst);
        assert!(max <= LIMIT, "{max} holders at once, limit {LIMIT}");
    }
}

/// Samples the daemon's Status (whichever daemon answers) and fails on any pool over its limit.
fn status_auditor(client: Client, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut samples = 0;
        while !stop.load(Ordering::SeqCst) {
            if let Ok(st) = client.status(None).await {
                let p = pool(&st, "p");
                assert!(p.in_flight as usize <= LIMIT, "daemon over its limit: {st:#?}");
                assert!(st.leases.len() <= LIMIT, "too many leases: {st:#?}");
                samples += 1;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples
    })
}

#[tokio::test]
async fn a_restart_resumes_held_leases_within_the_limit() {
    let key = KeyFile::new("resumes");
    let toml = config("400ms", &key.0);
    let d1 = Daemon::start(&toml).await;
    let addr = d1.addr;
    let auditor = Auditor::default();
    let stop = Arc::new(AtomicBool::new(false));

    let holder = d1.connect().await;
    let waiter = d1.connect().await;
    let churner = d1.connect().await;
    let observer = d1.connect().await;
    let audit = status_auditor(observer.clone(), stop.clone());

    let a = within("first", holder.acquire("p")).await.unwrap();
    auditor.enter();
    let b = within("second", holder.acquire("p")).await.unwrap();
    auditor.enter();
    let ids = {
        let mut ids = vec![a.lease_id().to_owned(), b.lease_id().to_owned()];
        ids.sort();
        ids
    };

    // A queued request that must survive the restart with its place.
    let waiting = tokio::spawn({
        let (waiter, auditor) = (waiter.clone(), auditor.clone());
        async move {
            let lease = waiter.acquire("p").await.expect("granted after the restart");
            auditor.enter();
            tokio::time::sleep(Duration::from_millis(20)).await;
            auditor.leave();
            drop(lease);
        }
    });
    // Another agent that keeps trying to get in through the whole restart.
    let churn = tokio::spawn({
        let (churner, auditor, stop) = (churner.clone(), auditor.clone(), stop.clone());
        async move {
            let mut grants = 0;
            while !stop.load(Ordering::SeqCst) {
                let Ok(Ok(lease)) = tokio::time::timeout(
                    Duration::from_millis(50),
                    std::future::IntoFuture::into_future(churner.acquire("p")),
                )
                .await
                else {
                    continue;
                };
                auditor.enter();
                tokio::time::sleep(Duration::from_millis(5)).await;
                auditor.leave();
                drop(lease);
                grants += 1;
            }
            grants
        }
    });
    wait_until(&observer, "the waiter is queued", |st| pool(st, "p").queued >= 1).await;

    d1.stop().await;
    let d2 = Daemon::start_on(&toml, addr).await;

    // Both leases come back, with their ids and fencing tokens, while the learning period holds
    // every new request back.
    let st = wait_until(&observer, "both leases are resumed", |st| {
        let mut got: Vec<_> = st.leases.iter().map(|l| l.lease_id.clone()).collect();
        got.sort();
        got == ids
    })
    .await;
    assert!(st.learning, "resumed within the learning period");
    assert!(!a.is_lost() && !b.is_lost());
    let tokens: Vec<_> = st.leases.iter().map(|l| l.fencing_token).collect();
    assert!(tokens.contains(&a.fencing_token()) && tokens.contains(&b.fencing_token()));
    assert!(!waiting.is_finished(), "the limit is still taken");

    // The held leases are renewed on the new daemon: still there after several heartbeats.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(observer.status(None).await.unwrap().leases.len(), LIMIT);

    // Giving one back lets the queued waiter (and the churner) in, one at a time.
    auditor.leave();
    within("release", a.release(slotd_client::Outcome::Ok)).await.unwrap();
    within("the waiter is served", waiting).await.unwrap();
    auditor.leave();
    drop(b);

    stop.store(true, Ordering::SeqCst);
    let _grants = within("churner", churn).await.unwrap();
    let samples = within("auditor", audit).await.unwrap();
    assert!(samples > 10, "the auditor saw the daemon {samples} times");
    auditor.check();
    wait_until(&observer, "idle", |st| idle(st, "p")).await;
    drop(d2);
}

#[tokio::test]
async fn a_lease_not_resumed_in_time_is_lost() {
    // No learning period: the new daemon refuses to re-create leases it never granted.
    let key = KeyFile::new("lost");
    let toml = config("0s", &key.0);
    let d1 = Daemon::start(&toml).await;
    let addr = d1.addr;
    let c = d1.connect().await;
    let lease = within("acquire", c.acquire("p")).await.unwrap();
    d1.stop().await;
    let _d2 = Daemon::start_on(&toml, addr).await;
    let lost = within("lost", lease.lost()).await;
    assert!(matches!(lost, Lost::ResumeFailed(_)), "{lost:?}");
    // The client itself keeps working on the new daemon.
    let again = within("acquire after restart", c.acquire("p")).await.unwrap();
    drop(again);
    wait_until(&c, "idle", |st| idle(st, "p")).await;
}
