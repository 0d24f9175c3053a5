//! The `slotd` binary: parse flags, load the config, init tracing, serve until SIGTERM or ctrl-c.

use std::process::ExitCode;

use clap::Parser;
use slotd::config::{Cli, Config, DEFAULT_TOML, LogFormat};
use tokio::{net::TcpListener, sync::mpsc};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{DEFAULT_TOML}");
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::load(&cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("slotd: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!("configuration ok: {} pools", cfg.pools.len());
        return ExitCode::SUCCESS;
    }
    init_tracing(cli.log_format);
    let runtime = match cfg.worker_threads {
        // No LIFO hand-offs between threads: a woken connection task runs after the streams that woke
        // it, so a fan-out leaves in one write per connection.
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    };
    match runtime {
        Ok(rt) => rt.block_on(run(cli, cfg)),
        Err(e) => {
            eprintln!("slotd: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

/// Binds, serves and reloads until SIGTERM or ctrl-c.
async fn run(cli: Cli, cfg: Config) -> ExitCode {
    let shutdown = shutdown_signal();
    let listener = match TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            error!(addr = %cfg.listen, error = %e, "cannot listen");
            return ExitCode::from(1);
        }
    };
    let addr = listener.local_addr().map_or(cfg.listen, |a| a);
    // Which pools are served (the config file's or the state file's) is logged by `serve`.
    info!(%addr, "slotd serving");

    let (reload_tx, reload_rx) = mpsc::channel(4);
    tokio::spawn(reload_on_sighup(cli, reload_tx));
    match slotd::serve_with_reload(cfg, listener, shutdown, Some(reload_rx)).await {
        Ok(()) => {
            info!("slotd stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = %e, "slotd failed");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on ctrl-c or SIGTERM. The handlers are installed now, not when the future is first
/// polled: a SIGTERM that arrives while the daemon is still starting must stop it gracefully too, not
/// kill it with the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Re-reads the config file on SIGHUP and hands the pools to the daemon.
async fn reload_on_sighup(cli: Cli, tx: mpsc::Sender<Config>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match Config::load(&cli) {
                Ok(cfg) => {
                    info!("SIGHUP: reloading configuration");
                    if tx.send(cfg).await.is_err() {
                        return;
                    }
                }
                Err(e) => warn!(error = %e, "SIGHUP: configuration refused; keeping the old one"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (cli, tx);
}
