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
