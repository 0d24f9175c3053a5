//! The `slotd-proxy` binary: parse flags and configuration, init logging, call `slotd_proxy::serve`.

use std::{io::Read, net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, ValueEnum};
use slotd_proxy::{Config, DEFAULT_TOML, fingerprint::Fingerprinter};

/// slotd-proxy: an HTTP reverse proxy for LLM providers that takes one slotd lease per upstream attempt.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file. Without it, the embedded default is used: listen on 127.0.0.1:8089,
    /// slotd at 127.0.0.1:50051, /anthropic and /openai routes.
    #[arg(long, short, env = "SLOTD_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on; overrides `listen` in the file.
    #[arg(long, env = "SLOTD_PROXY_LISTEN")]
    listen: Option<SocketAddr>,
    /// The slotd daemon; overrides `daemon` in the file. Separate the members of a highly
    /// available deployment with commas.
    #[arg(long, env = "SLOTD_PROXY_DAEMON")]
    daemon: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SLOTD_PROXY_LOG_FORMAT")]
    log_format: LogFormat,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Check the configuration (and the files it names) and exit.
    #[arg(long)]
    check: bool,
    /// Read a provider key on stdin and print its fingerprint (for `credential_pools`) with the
    /// configured fingerprint key, then exit.
    #[arg(long)]
    fingerprint: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn load(cli: &Cli) -> Result<Config, String> {
    let text = match &cli.config {
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))?,
        None => DEFAULT_TOML.to_owned(),
    };
    let mut cfg = Config::from_toml_str(&text).map_err(|e| e.to_string())?;
    if let Some(l) = cli.listen {
        cfg.listen = l;
    }
    if let Some(d) = &cli.daemon {
        cfg.daemon = slotd_proxy::config::Daemons::parse_list(d);
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{DEFAULT_TOML}");
        return ExitCode::SUCCESS;
    }
    let cfg = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("slotd-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let files = match cfg.load_files() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("slotd-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!(
            "configuration ok: {} route(s), listen {}, daemon {}",
            cfg.routes.len(),
            cfg.listen,
            cfg.daemon
        );
        return ExitCode::SUCCESS;
    }
    if cli.fingerprint {
        let Some(key) = files.fingerprint_key else {
            eprintln!(
                "slotd-proxy: --fingerprint needs fingerprint_key or fingerprint_key_file in the configuration"
            );
            return ExitCode::from(2);
        };
        let mut credential = Vec::new();
        if let Err(e) = std::io::stdin().read_to_end(&mut credential) {
            eprintln!("slotd-proxy: reading stdin: {e}");
            return ExitCode::from(2);
        }
        println!("{}", Fingerprinter::new(&key).fingerprint(credential.trim_ascii()));
        return ExitCode::SUCCESS;
    }
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("slotd-proxy: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        slotd_proxy::serve(cfg, listener, shutdown_signal()).await.map_err(std::io::Error::other)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "slotd-proxy failed");
            eprintln!("slotd-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
