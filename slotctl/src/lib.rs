//! `slotctl`: the operator's command line for slotd, built on `slotd-client` alone.
//!
//! The binary (`src/main.rs`) only parses [`cli::Cli`] and calls [`main`]. Everything else lives
//! here so that tests can reach it: [`table`] renders `slotctl status`, [`top`] is the live TUI (its
//! [`top::draw`] is a pure function of [`top::App`], testable with ratatui's `TestBackend`), [`admin`]
//! holds the Admin-service commands and [`run`] is `slotctl run`, `flock(1)` for LLM slots.
//!
//! With several `--endpoint`s (every member of a highly available deployment), [`conn::Conn`] sends
//! each call to the leader, and `slotctl run` holds its lease through `slotd-client`'s
//! `connect_any`, which re-presents it to a new leader after a failover.
//!
//! Exit codes: 0 on success, 1 for an error (printed as one line with its gRPC code), 2 for a usage
//! error (clap's), and for `slotctl run` the command's own exit status.

pub mod admin;
pub mod cli;
pub mod conn;
pub mod error;
pub mod run;
pub mod table;
pub mod top;

use std::io::Write;

use clap::CommandFactory;

pub use self::error::CtlError;
use self::{
    cli::{Cli, Command, Output, PoolCommand},
    conn::Conn,
};

/// Runs one parsed command line and returns the process exit code.
///
/// # Cancel safety
/// Dropping the future abandons the command where it is: a `run` drops its lease (released as ok, the
/// child keeps running unsupervised), a `drain` stops reporting (the daemon keeps draining).
pub async fn main(cli: Cli) -> i32 {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("slotctl: {e}");
            1
        }
    }
}

async fn dispatch(cli: Cli) -> Result<i32, CtlError> {
    let target = conn::Target {
        endpoints: cli.endpoint.clone(),
        token: cli.token.clone(),
        admin_token: cli.admin_token.clone(),
        ca_cert: cli.ca_cert.clone(),
        tls_domain: cli.tls_domain.clone(),
    };
    let conn = || Conn::connect(&target);
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let mut out = std::io::stdout().lock();
            clap_complete::generate(*shell, &mut cmd, "slotctl", &mut out);
            let _ = out.flush();
            Ok(0)
        }
        Command::Status { pool } => {
            print!("{}", status(&conn().await?, pool.as_deref(), cli.output).await?);
            Ok(0)
        }
        Command::Top { pool } => {
            top::require_terminal()?;
            top::run(conn().await?, pool.clone()).await?;
            Ok(0)
        }
        Command::Pool { command } => match command {
            PoolCommand::Set(args) => admin::pool_set(&conn().await?, args, cli.output).await.map(|()| 0),
            PoolCommand::Rm { name } => admin::pool_rm(&conn().await?, name).await.map(|()| 0),
        },
        Command::Pause { pool, duration, reason } => {
            admin::pause(&conn().await?, pool, *duration, reason.as_deref().unwrap_or_default())
                .await
                .map(|()| 0)
        }
        Command::Resume { pool } => admin::resume(&conn().await?, pool).await.map(|()| 0),
        Command::Revoke { lease_id } => admin::revoke(&conn().await?, lease_id).await.map(|()| 0),
        Command::Drain { timeout } => admin::drain(&conn().await?, *timeout, cli.output).await,
        Command::Undrain => admin::undrain(&conn().await?).await.map(|()| 0),
        Command::Breaker { to, pool, reason } => {
            admin::breaker(&conn().await?, pool, *to, reason.as_deref().unwrap_or_default()).await.map(|()| 0)
        }
        Command::Run(args) => run::run(&target, args).await,
    }
}

/// What `slotctl status` prints: with high availability, a first line naming the member that
/// answered (the leader), its role and epoch; then the pools and leases.
///
/// # Cancel safety
/// Cancel safe: a read-only call.
pub async fn status(conn: &Conn, pool: Option<&str>, output: Output) -> Result<String, CtlError> {
    let (status, ha) = conn.status_ha(pool).await?;
    let now = std::time::SystemTime::now();
    Ok(match output {
        Output::Table => table::render_ha(ha.as_ref()) + &table::render_status(&status, now),
        Output::Json => table::with_ha(&table::status_json(&status, now), ha.as_ref()),
    })
}
