//! `Client::close`: a short-lived program that closes its client before exiting loses no release,
//! and a closed client flushes what it still held, refuses new acquires, and closes again harmlessly.

use std::{process::Stdio, time::Duration};

use slotd_client::{Client, Error, Lost, Outcome};
use slotd_proto::v1::{self as pb, watch_event::Event};
use slotd_test_support::{
    Daemon,
    client::{idle, one_pool, pool},
    process::{assert_exit_code, output_within, text},
    within,
};
use tonic::Streaming;

/// Set in a child process: the daemon's URL. Without it, [`short_lived_program`] does nothing.
const CHILD_URL: &str = "SLOTD_CLOSE_TEST_URL";
/// How many short-lived programs run one after the other (the bug lost the release in 4 runs of 5).
const RUNS: usize = 5;

/// The short-lived program, run as a child process by [`a_short_lived_program_loses_no_release`]:
/// acquire, drop the lease (its release goes through the background task), close, exit at once.
/// `std::process::exit` runs no destructor: whatever `close` did not flush is lost, as when `main`
/// returns and the runtime drops the client's task.
#[test]
fn short_lived_program() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let closed = rt.block_on(async {
        let client = Client::builder().holder("short-lived").connect(url).await.expect("connect");
        let lease = client.acquire("p").await.expect("acquire");
        println!("\nLEASE_ID={}", lease.lease_id());
        drop(lease);
        client.close().await
    });
    std::process::exit(if closed.is_ok() { 0 } else { 3 });
}

#[tokio::test]
async fn a_short_lived_program_loses_no_release() {
    // A long TTL and the client's default resume grace: a lost release would keep the slot held.
    let d = Daemon::start(&one_pool("p", 1, "default_ttl = \"30s\"")).await;
    let mut watch = watch(&d).await;
    let first_token = pool(&d.status().await, "p").next_fencing_token;
    let exe = std::env::current_exe().expect("the test binary");
    for run in 0..RUNS {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["short_lived_program", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_URL, d.url())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = output_within(&mut cmd).await;
        assert_exit_code(&out, 0);
        let stdout = text(&out.stdout);
        let lease_id = stdout
            .lines()
            .find_map(|l| l.strip_prefix("LEASE_ID="))
            .unwrap_or_else(|| panic!("run {run}: no lease id in {stdout}"))
            .to_owned();

        // Right after the exit, before any grace or TTL could run out: nothing is held.
        let st = d.status().await;
        assert!(idle(&st, "p"), "run {run}: the slot is still held after exit: {st:#?}");

        // The daemon saw the holder's release, with outcome ok: not a closed stream, not an expiry.
        let end = within("the lease's end on Watch", lease_end(&mut watch, &lease_id)).await;
        assert_eq!(end, ("released", "ok".to_owned()), "run {run}");
    }
    let p = pool(&d.status().await, "p").clone();
    assert_eq!(p.next_fencing_token, first_token + RUNS as u64, "one lease per run: {p:#?}");
}

#[tokio::test]
async fn close_releases_held_leases_and_ends_the_session() {
    let d = Daemon::start(&one_pool("p", 2, "")).await;
    let c = d.connect().await;
    let kept = within("acquire", c.acquire("p")).await.unwrap();
    let released = within("acquire", c.acquire("p")).await.unwrap();
    let queued = tokio::spawn({
        let c = c.clone();
        async move { c.acquire("p").await }
    });
    d.wait_for("the third acquire queued", |st| pool(st, "p").queued == 1).await;
    // Its release grants the queued acquire while the close withdraws it: that slot comes back too.
    drop(released);

    within("close", c.close()).await.expect("every release acknowledged");
    // Acknowledged means applied: Status shows it at once.
    let st = d.status().await;
    assert!(idle(&st, "p"), "{st:#?}");
    assert!(matches!(within("queued acquire", queued).await.unwrap(), Err(Error::SessionClosed)));
    assert_eq!(within("lost", kept.lost()).await, Lost::SessionClosed);
    assert!(matches!(
        within("release after close", kept.release(Outcome::Ok)).await,
        Err(Error::Lost { reason: Lost::SessionClosed, .. })
    ));
    assert!(matches!(within("acquire after close", c.acquire("p")).await, Err(Error::SessionClosed)));

    // Idempotent, and unary calls still work.
    within("close again", c.close()).await.expect("a second close is harmless");
    assert!(idle(&c.status(None).await.unwrap(), "p"));
}

#[tokio::test]
async fn close_gives_up_at_its_timeout_when_the_daemon_is_gone() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let c = Client::builder()
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .close_timeout(Duration::from_millis(200))
        .connect(d.url())
        .await
        .unwrap();
    let lease = within("acquire", c.acquire("p")).await.unwrap();
    // The daemon stops for good: nobody will ever acknowledge the release.
    d.stop().await;
    drop(lease);
    let closed = within("close", c.close()).await;
    assert!(matches!(closed, Err(Error::Unacknowledged { releases: 1 })), "{closed:?}");
}

/// An Admin Watch on pool `p`, past its first snapshot.
async fn watch(d: &Daemon) -> Streaming<pb::WatchEvent> {
    let mut admin = d.admin().await;
    let req = pb::WatchRequest { pool: "p".into(), snapshot_interval: Some(Default::default()) };
    let mut events = within("watch", admin.watch(req)).await.expect("watch").into_inner();
    let first = within("the first snapshot", events.message()).await.expect("watch event").expect("an event");
    assert!(matches!(first.event, Some(Event::Snapshot(_))), "{first:?}");
    events
}

/// Reads Watch events until lease `lease_id` ends: ("released" or "expired", detail).
async fn lease_end(events: &mut Streaming<pb::WatchEvent>, lease_id: &str) -> (&'static str, String) {
    loop {
        let e = events.message().await.expect("watch event").expect("the watch goes on");
        match e.event {
            Some(Event::Released(c)) if c.lease_id == lease_id => return ("released", c.detail),
            Some(Event::Expired(c)) if c.lease_id == lease_id => return ("expired", c.detail),
            _ => {}
        }
    }
}
