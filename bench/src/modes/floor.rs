//! `floor`: the pause fan-out with no slotd in it. A child process holds N plain TCP connections and,
//! on each signal, writes one small message to every one of them; the bench times each arrival exactly
//! as `fanout` times each `Paused`. No HTTP/2, no gRPC, no scheduler: what any daemon on this machine
//! would pay at least to tell N sockets something.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use clap::Args;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    time::Instant,
};

use super::emit;
use crate::{
    BoxError,
    stats::{self, Latency},
};

/// Options of `floor`.
#[derive(Debug, Args)]
pub struct Opts {
    /// TCP connections told per round.
    #[arg(long, default_value_t = 10_000)]
    pub sockets: usize,
    /// Bytes written to each connection per round (a `Paused` in its HTTP/2 frame is about 80).
    #[arg(long, default_value_t = 80)]
    pub message_bytes: usize,
    /// Rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Pause between rounds.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    pub gap: Duration,
    /// One-byte ping-pongs timed on the signal connection first (the round-trip floor).
    #[arg(long, default_value_t = 10_000)]
    pub pings: usize,
}

/// The result of `floor`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// "floor".
    pub mode: &'static str,
    /// Connections told per round.
    pub sockets: usize,
    /// One-byte ping -> pong over one connection.
    pub ping_pong: Latency,
    /// Per round: signal sent -> each connection's message received.
    pub rounds: Vec<Latency>,
    /// Every round together.
    pub all_rounds: Latency,
}

impl Report {
    /// Prints the report.
    pub fn emit(&self, json: bool) {
        emit(self, json, |r| {
            let mut s = format!(
                "floor: raw TCP over loopback between two tokio processes (no gRPC, no slotd)\n\
                 round trip (1-byte ping -> pong): {}\n\
                 fan-out to {} connections:\n",
                r.ping_pong.line(),
                r.sockets
            );
            for (i, round) in r.rounds.iter().enumerate() {
                s += &format!("  round {}: {}\n", i + 1, round.line());
            }
            s + &format!("all rounds: {}\n", r.all_rounds.line())
        })
    }
}

/// Kills the server child when the run ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `floor`: starts `current_exe() floor-serve` and drives it.
///
/// # Cancel safety
/// Dropping the future kills the server child (a drop guard); reader tasks end with their sockets.
pub async fn run(o: &Opts) -> Result<Report, BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["floor-serve", "--message-bytes", &o.message_bytes.to_string()])
        .args(["--sockets", &o.sockets.to_string()])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("floor-serve: no stdout")?;
    let _server = Server(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    })
    .await??;
    let addr: SocketAddr = line.trim().parse().map_err(|_| format!("floor-serve said {line:?}"))?;

    // The first connection is the signal; the server tells the others in the order they connected.
    let mut signal = TcpStream::connect(addr).await?;
    signal.set_nodelay(true)?;
    let (stamps, mut arrived) = mpsc::unbounded_channel::<Instant>();
    for _ in 0..o.sockets {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let stamps = stamps.clone();
        let mut buf = vec![0u8; o.message_bytes];
        tokio::spawn(async move {
            while s.read_exact(&mut buf).await.is_ok() {
                let _ = stamps.send(Instant::now());
            }
        });
    }
    drop(stamps);
    // Wait until the server has accepted every connection (it answers the signal's first byte).
    signal.write_all(b"?").await?;
    signal.read_u8().await?;

    let mut pings = stats::histogram();
    for _ in 0..o.pings {
        let t0 = Instant::now();
        signal.write_all(b"p").await?;
        signal.read_u8().await?;
        stats::record(&mut pings, t0.elapsed());
    }

    let (mut rounds, mut all) = (Vec::new(), stats::histogram());
    for _ in 0..o.rounds {
        tokio::time::sleep(o.gap).await;
        let mut h = stats::histogram();
        let t0 = Instant::now();
        signal.write_all(b"!").await?;
        for _ in 0..o.sockets {
            let at = tokio::time::timeout(Duration::from_secs(30), arrived.recv())
                .await
                .map_err(|_| "not every connection was told within 30s")?
                .ok_or("connections ended")?;
            stats::record(&mut h, at.saturating_duration_since(t0));
        }
        all.add(&h)?;
        rounds.push(Latency::of(&h));
    }
    Ok(Report {
        mode: "floor",
        sockets: o.sockets,
        ping_pong: Latency::of(&pings),
        rounds,
        all_rounds: Latency::of(&all),
    })
}

/// The child side (`slotd-bench floor-serve`): prints its address, then on each `!` from the first
/// connection writes `message_bytes` to every other connection, one task per connection as a daemon
/// would have (on a multi-threaded runtime, like slotd's). `?` is answered once `sockets` connections
/// have been accepted, `p` at once.
///
/// # Cancel safety
/// Not meant to be cancelled: it runs until the signal connection closes, then returns.
pub async fn serve(message_bytes: usize, sockets: usize) -> Result<(), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let (signal, _) = listener.accept().await?;
    signal.set_nodelay(true)?;
    let (go, _) = watch::channel(0u64);
    let go = Arc::new(go);
    let message: Arc<[u8]> = vec![b'x'; message_bytes].into();
    let accept_go = go.clone();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let mut rx = accept_go.subscribe();
            let message = message.clone();
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    if s.write_all(&message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    // On a worker thread, as a daemon's connection task would be.
    tokio::spawn(async move { signals(signal, go, accepted, sockets).await }).await?
}

/// Answers the signal connection.
async fn signals(
    mut signal: TcpStream,
    go: Arc<watch::Sender<u64>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    sockets: usize,
) -> Result<(), BoxError> {
    let mut byte = [0u8; 1];
    let mut rounds = 0u64;
    while signal.read_exact(&mut byte).await.is_ok() {
        match byte[0] {
            b'?' => {
                let deadline = Instant::now() + Duration::from_secs(30);
                while accepted.load(std::sync::atomic::Ordering::Relaxed) < sockets {
                    if Instant::now() > deadline {
                        return Err("floor-serve: not every connection arrived within 30s".into());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                signal.write_all(b"=").await?;
            }
            b'p' => signal.write_all(b"p").await?,
            _ => {
                rounds += 1;
                go.send_replace(rounds);
            }
        }
    }
    Ok(())
}
