//! The state file is strict and honest: a file slotd did not write is refused (not served as "no
//! pools"), and temp files left by a write killed midway are removed at the next start.

use slotd::{ServeError, config::Config};
use slotd_test_support::*;

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("slotd-test-{}-state-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(state: &std::path::Path) -> String {
    format!("state_file = {:?}\n[pools.p]\nmax_concurrent = 2\n", state.display().to_string())
}

#[tokio::test]
async fn an_empty_or_comment_only_state_file_is_refused_instead_of_serving_no_pools() {
    let dir = temp_dir("empty");
    let state = dir.join("state.toml");
    for text in ["", "# nothing here\n", "\n\n"] {
        std::fs::write(&state, text).unwrap();
        let cfg = Config::from_toml_str(&config(&state)).unwrap();
        let mut d = Daemon::serve(cfg, "127.0.0.1:0").await;
        d.begin_shutdown();
        match d.join().await {
            Err(ServeError::State(e)) => {
                let e = e.to_string();
                assert!(e.contains("version = 1") && e.contains("state.toml"), "{text:?}: {e}");
            }
            other => panic!("{text:?}: expected a state file error, got {other:?}"),
        }
    }
    // What slotd writes itself is accepted, and its pools are served.
    let d = Daemon::start(&config(&state.with_file_name("written.toml"))).await;
    let mut admin = d.admin().await;
    admin
        .upsert_pool(slotd_proto::v1::UpsertPoolRequest {
            pool: Some(slotd_proto::v1::PoolSpec {
                name: "q".into(),
                max_concurrent: Some(3),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    d.stop().await;
    let d = Daemon::start(&config(&state.with_file_name("written.toml"))).await;
    assert_eq!(d.pool("q").await.limit, 3);
    d.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn temp_files_of_a_killed_write_are_removed_at_startup() {
    let dir = temp_dir("stale");
    let state = dir.join("state.toml");
    let stale = [dir.join(".state.toml.tmp.12345"), dir.join(".state.toml.tmp.aB3xYz")];
    let unrelated = dir.join("notes.txt");
    for f in stale.iter().chain([&unrelated]) {
        std::fs::write(f, "[pools.half").unwrap();
    }
    let d = Daemon::start(&config(&state)).await;
    assert_eq!(d.pool("p").await.limit, 2, "the config file's pools are served");
    for f in &stale {
        assert!(!f.exists(), "{} was left behind", f.display());
    }
    assert!(unrelated.exists(), "only the state file's temp files are removed");
    d.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
