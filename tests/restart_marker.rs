//! Restart detection: a daemon that stops with leases held (or crashes) leaves its restart marker, and
//! the next start runs a learning period of one lease TTL; a clean stop with nothing held does not.

use slotd_test_support::*;

fn config(marker: &std::path::Path) -> String {
    format!(
        "restart_marker = {:?}\n[pools.p]\nmax_concurrent = 1\ndefault_ttl = \"3s\"\n",
        marker.display().to_string()
    )
}

#[tokio::test]
async fn a_stop_with_leases_held_makes_the_next_start_learn_and_a_clean_one_does_not() {
    let marker = std::env::temp_dir().join(format!("slotd-test-{}-marker.running", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let toml = config(&marker);

    // First start: no marker, no learning; the marker now exists.
    let d = Daemon::start(&toml).await;
    assert!(!d.status().await.learning);
    assert!(marker.exists());
    let mut a = d.agent("holder").await;
    a.request(a.req("r1", "p")).await;
    a.expect_granted("r1").await;
    d.stop().await;
    assert!(marker.exists(), "stopping with a lease held keeps the marker");

    // Second start: it learns, so nothing new is granted until the holder could resume.
    let d = Daemon::start(&toml).await;
    assert!(d.status().await.learning, "a restart after a stop with leases held learns");
    let mut b = d.agent("newcomer").await;
    b.request(b.req("r2", "p")).await;
    b.expect_queued("r2").await;
    drop(b);
    d.stop().await;
    assert!(!marker.exists(), "a clean stop with nothing held removes the marker");

    // Third start: nothing to learn.
    let d = Daemon::start(&toml).await;
    assert!(!d.status().await.learning);
    d.stop().await;
    let _ = std::fs::remove_file(&marker);
}

/// A fresh marker path for one test.
fn marker_path(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("slotd-test-{}-{tag}.running", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Waits until the marker records `ms` as the longest TTL granted (it is written off the driver task).
#[track_caller]
fn marker_records(marker: &std::path::Path, ms: u64) -> impl std::future::Future<Output = ()> + '_ {
    let at = std::panic::Location::caller();
    let want = format!("max_granted_ttl_ms = {ms}");
    async move {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let text = std::fs::read_to_string(marker).unwrap_or_default();
            if text.contains(&want) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{at}: marker never recorded {want}: {text:?}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Holds for at least `d` of real time: the learning period is still on after it.
#[track_caller]
fn still_learning_after(d: &Daemon, wait: std::time::Duration) -> impl std::future::Future<Output = ()> + '_ {
    let at = std::panic::Location::caller();
    async move {
        tokio::time::sleep(wait).await;
        assert!(d.status().await.learning, "{at}: learning ended before {wait:?}");
    }
}

#[tokio::test]
async fn learning_after_a_restart_covers_the_longest_ttl_granted_not_the_default_ttl() {
    let marker = marker_path("longest-ttl");
    // default_ttl is short; the lease asks for 3 s (below max_ttl).
    let toml = format!(
        "restart_marker = {:?}\n[pools.p]\nmax_concurrent = 2\ndefault_ttl = \"50ms\"\nmax_ttl = \"1m\"\n",
        marker.display().to_string()
    );
    let d = Daemon::start(&toml).await;
    let mut a = d.agent("holder").await;
    let mut req = a.req("r1", "p");
    req.ttl = Some(ms(3000));
    a.request(req).await;
    a.expect_granted("r1").await;
    // A shorter one afterwards does not lower the record.
    let mut req = a.req("r2", "p");
    req.ttl = Some(ms(1000));
    a.request(req).await;
    a.expect_granted("r2").await;
    marker_records(&marker, 3000).await;
    // Stopping with both held keeps the marker.
    d.stop().await;
    drop(a);

    // Restarted: the daemon learns for the 3 s lease may still be live, well past default_ttl.
    let d = Daemon::start(&toml).await;
    assert!(d.status().await.learning);
    still_learning_after(&d, std::time::Duration::from_millis(500)).await;
    d.stop().await;
    let _ = std::fs::remove_file(&marker);
}

#[tokio::test]
async fn without_a_record_learning_uses_the_state_files_pools_and_never_exceeds_max_ttl() {
    let marker = marker_path("state-pools");
    let state = std::env::temp_dir().join(format!("slotd-test-{}-learn-state.toml", std::process::id()));
    // The served pools come from the state file: its default_ttl (3 s) counts, not the config's.
    std::fs::write(
        &state,
        "version = 1\n[pools.p]\nmax_concurrent = 1\ndefault_ttl = \"3s\"\nmax_ttl = \"1m\"\n",
    )
    .unwrap();
    // A marker from an older slotd: a restart, with no TTL recorded.
    std::fs::write(&marker, "4242\n").unwrap();
    let toml = format!(
        "restart_marker = {:?}\nstate_file = {:?}\n[pools.p]\nmax_concurrent = 1\ndefault_ttl = \"50ms\"\n",
        marker.display().to_string(),
        state.display().to_string()
    );
    let d = Daemon::start(&toml).await;
    assert!(d.status().await.learning);
    still_learning_after(&d, std::time::Duration::from_millis(500)).await;
    d.stop().await;

    // A recorded TTL beyond every pool's max_ttl is cut to it: learning ends.
    std::fs::write(
        &state,
        "version = 1\n[pools.p]\nmax_concurrent = 1\ndefault_ttl = \"50ms\"\nmax_ttl = \"200ms\"\n",
    )
    .unwrap();
    std::fs::write(&marker, "pid = 4242\nmax_granted_ttl_ms = 3600000\n").unwrap();
    let d = Daemon::start(&toml).await;
    assert!(d.status().await.learning);
    d.wait_for("the learning period to end at the pools' max_ttl", |s| !s.learning).await;
    d.stop().await;
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_file(&state);
}
