//! What slotd-proxy costs, over loopback: the latency it adds (proxy vs direct to the same fake
//! provider, interleaved in one run), streaming throughput, and memory per in-flight stream.
//!
//! The proxy runs as its own process (the release binary) so that its memory can be read from
//! /proc; the daemon (in-process, release) and the fake provider run in this process.
//!
//! ```sh
//! cargo build --release -p slotd-proxy
//! cargo bench -p slotd-proxy --bench proxy -- [--requests 5000] [--streams 500] [--bulk-mib 256]
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use http_body_util::BodyExt;
use slotd_test_support::{Daemon, client::one_pool};
use support::{Fake, http1, post};

struct Opts {
    requests: usize,
    streams: usize,
    bulk_mib: u64,
    proxy_bin: String,
}

fn opts() -> Opts {
    let mut o = Opts {
        requests: 5000,
        streams: 500,
        bulk_mib: 256,
        proxy_bin: concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/slotd-proxy").to_owned(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--requests" => o.requests = v.parse().expect("--requests N"),
            "--streams" => o.streams = v.parse().expect("--streams N"),
            "--bulk-mib" => o.bulk_mib = v.parse().expect("--bulk-mib N"),
            "--proxy-bin" => o.proxy_bin = v,
            // `cargo bench` passes `--bench`; ignore anything else.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = opts();
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("bench", 10_000, "adaptive = false")).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndaemon = \"{}\"\nmax_connections = 10000\n\
             [routes.a]\nprefix = \"/a\"\nupstream = \"{}\"\npool = \"bench\"\ndialect = \"anthropic\"\n",
            d.url(),
            fake.url()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(&o.proxy_bin)
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e} (cargo build --release -p slotd-proxy)", o.proxy_bin));
    let pid = child.id().unwrap();
    let proxy = format!("http://127.0.0.1:{port}");
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // 1. Added latency: one keep-alive connection each, direct and through the proxy, interleaved.
    let (direct_c, proxy_c) = (http1(), http1());
    let direct_url = format!("{}/v1/messages", fake.url());
    let proxy_url = format!("{proxy}/a/v1/messages");
    let (mut direct, mut proxied) = (Vec::with_capacity(o.requests), Vec::with_capacity(o.requests));
    for i in 0..o.requests + 200 {
        for (c, url, out) in [(&direct_c, &direct_url, &mut direct), (&proxy_c, &proxy_url, &mut proxied)] {
            let t = Instant::now();
            let resp = c.request(post(url, &[])).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
            if i >= 200 {
                out.push(t.elapsed());
            }
        }
    }
    direct.sort();
    proxied.sort();
    let (d50, d99, p50, p99) =
        (pct(&direct, 0.5), pct(&direct, 0.99), pct(&proxied, 0.5), pct(&proxied, 0.99));
    println!("latency over {} requests each (µs)", o.requests);
    println!("| | p50 | p99 |\n|---|---|---|");
    println!("| direct | {:.0} | {:.0} |", us(d50), us(d99));
    println!("| through slotd-proxy | {:.0} | {:.0} |", us(p50), us(p99));
    println!("| added | {:.0} | {:.0} |", us(p50) - us(d50), us(p99) - us(d99));

    // 2. Streaming throughput: one large body at a time, direct and proxied alternately, 3 rounds each
    //    (the first transfers of a run are slower whatever the path); the median is reported.
    let bytes = o.bulk_mib * 1024 * 1024;
    let bulk_bytes = bytes.to_string();
    println!("\nstreaming {} MiB in {} KiB chunks (median of 3)", o.bulk_mib, support::BULK_CHUNK / 1024);
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (i, (c, url)) in [(&direct_c, &direct_url), (&proxy_c, &proxy_url)].into_iter().enumerate() {
            let t = Instant::now();
            let resp =
                c.request(post(url, &[("x-fake", "bulk"), ("x-fake-bytes", &bulk_bytes)])).await.unwrap();
            let n = support::drain(resp.into_body()).await.unwrap();
            assert_eq!(n as u64, bytes);
            rates[i].push(o.bulk_mib as f64 / t.elapsed().as_secs_f64());
        }
    }
    for (name, mut r) in ["direct", "through slotd-proxy"].into_iter().zip(rates) {
        r.sort_by(f64::total_cmp);
        println!("| {name} | {:.0} MiB/s (runs: {:.0?}) |", r[1], r);
    }

    // 3. Memory per in-flight stream: M slow SSE streams, each on its own connection.
    let idle = rss_kib(pid);
    let mut held = Vec::with_capacity(o.streams);
    for _ in 0..o.streams {
        let c = http1();
        let resp = c
            .request(post(
                &proxy_url,
                &[("x-fake", "sse"), ("x-fake-events", "100000"), ("x-fake-interval-ms", "1000")],
            ))
            .await
            .unwrap();
        let mut body = resp.into_body();
        body.frame().await.unwrap().unwrap();
        held.push((c, body));
    }
    while fake.current() < o.streams {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let busy = rss_kib(pid);
    println!(
        "\nmemory: idle {idle} KiB, with {} streams in flight {busy} KiB: {:.1} KiB per stream",
        o.streams,
        (busy.saturating_sub(idle)) as f64 / o.streams as f64
    );
    drop(held);
    let _ = child.kill().await;
}
