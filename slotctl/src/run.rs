//! `slotctl run`: `flock(1)` for LLM-provider slots.
//!
//! Acquires a lease through `slotd-client` (which heartbeats it, waits through pauses, and with
//! several endpoints follows the leader and re-presents the lease after a failover), runs the
//! command with the lease in its environment, passes its exit status through and releases the lease
//! with an outcome read from that status: 0 is ok, the rate-limit exit code (75, EX_TEMPFAIL, unless
//! configured) is rate limited (the daemon pauses the pool), anything else failed.
//!
//! While the command runs, slotctl ignores SIGINT (a terminal's ctrl-c reaches the command through the
//! process group, and the lease is released once the command is gone) and forwards SIGTERM and SIGHUP.

use std::{
    ffi::OsStr,
    path::Path,
    process::ExitStatus,
    time::{Duration, SystemTime},
};

use slotd_client::{Client, Lease, Lost, Outcome, PauseInfo, Pauses};
use tokio::time::Instant;
use tonic::Code;

use super::{
    CtlError,
    cli::RunArgs,
    conn::{Conn, Target},
    table::fmt_duration,
};

/// The exit code for "gave up waiting for a slot" (EX_TEMPFAIL).
pub const EXIT_TEMPFAIL: i32 = 75;
/// The exit code after ctrl-c while waiting for a slot (128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;
/// The exit code when the command could not be found (as in shells).
pub const EXIT_NOT_FOUND: i32 = 127;
/// The exit code when the command was found but could not be started (as in shells).
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// With `--kill-on-lost`: how long the command gets after SIGTERM before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(10);
/// How long the final release may take before slotctl leaves the slot to the daemon's TTL.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome a command's exit status reports.
pub fn outcome_for(code: i32, rate_limit_exit_code: i32, retry_after: Option<Duration>) -> Outcome {
    if code == 0 {
        Outcome::Ok
    } else if code == rate_limit_exit_code {
        Outcome::RateLimited { retry_after }
    } else {
        Outcome::Error
    }
}

/// The shell convention for an exit status: the exit code, or 128+N for a signal N.
pub fn exit_code(status: ExitStatus) -> i32 {
    if let Some(code) = status.code() {
        return code;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    1
}

fn program_name(cmd: &OsStr) -> String {
    Path::new(cmd).file_name().unwrap_or(cmd).to_string_lossy().into_owned()
}

/// Runs `slotctl run` and returns the exit code to leave with.
///
/// # Cancel safety
/// Dropping the future while it waits cancels the request; dropping it while the command runs drops
/// the lease (released as ok) and leaves the command running.
pub async fn run(target: &Target, args: &RunArgs) -> Result<i32, CtlError> {
    let Some((program, rest)) = args.command.split_first() else {
        return Err(CtlError::new("no command given after --"));
    };
    let name = program_name(program);
    let holder =
        args.holder.clone().unwrap_or_else(|| format!("slotctl run {name} pid {}", std::process::id()));
    let mut builder = Client::builder().holder(holder);
    if let Some(t) = &target.token {
        builder = builder.bearer_token(t);
    }
    if let Some(path) = &target.ca_cert {
        builder = builder.tls(target.ca_pem(path)?);
    }
    if let Some(domain) = &target.tls_domain {
        builder = builder.tls_domain(domain.clone());
    }
    // The session connects lazily and retries forever, so first make sure some member answers
    // (exit 1 at once when none does); that one is tried first.
    let reached = Conn::connect(target).await?.endpoint();
    let endpoints = std::iter::once(reached.clone())
        .chain(target.endpoints.iter().filter(|e| **e != reached).cloned())
        .collect::<Vec<_>>();
    let client = builder.connect_any(endpoints).await.map_err(|e| {
        CtlError::with_code(
            format!("cannot connect to {reached}: {e}"),
            e.code().unwrap_or(Code::Unavailable),
        )
    })?;

    let lease = match wait_for_lease(&client, args).await? {
        Wait::Granted(lease) => lease,
        Wait::GaveUp => return Ok(EXIT_TEMPFAIL),
        Wait::Interrupted => return Ok(EXIT_INTERRUPTED),
    };

    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest)
        .env("SLOTD_LEASE_ID", lease.lease_id())
        .env("SLOTD_FENCING_TOKEN", lease.fencing_token().to_string())
        .env("SLOTD_POOL", lease.pool());
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let code =
                if e.kind() == std::io::ErrorKind::NotFound { EXIT_NOT_FOUND } else { EXIT_CANNOT_EXECUTE };
            eprintln!("slotctl: cannot run {:?}: {e}", program.to_string_lossy());
            finish(lease, Outcome::Error).await;
            return Ok(code);
        }
    };
    let (status, lost) = supervise(child, &lease, &name, args.kill_on_lost).await?;
    let code = exit_code(status);
    if !lost {
        finish(lease, outcome_for(code, args.rate_limit_exit_code, args.retry_after)).await;
    }
    Ok(code)
}

enum Wait {
    Granted(Lease),
    GaveUp,
    Interrupted,
}

/// Waits for the grant (through pauses, telling the user about them).
async fn wait_for_lease(client: &Client, args: &RunArgs) -> Result<Wait, CtlError> {
    let mut acquire = client.acquire_any(args.pool.clone());
    let pools = args.pool.join(" or ");
    if let Some(p) = args.priority {
        acquire = acquire.priority(p);
    }
    if let Some(t) = args.ttl {
        acquire = acquire.ttl(t);
    }
    if let Some(n) = args.tokens {
        acquire = acquire.tokens(n, args.max_output_tokens.unwrap_or(0));
    }
    let acquire = std::future::IntoFuture::into_future(acquire);
    tokio::pin!(acquire);
    let deadline = args.max_wait.map(|d| Instant::now() + d);
    let mut pauses = client.pauses();
    let mut told_until: Option<SystemTime> = None;
    let mut pauses_open = true;
    loop {
        tokio::select! {
            res = &mut acquire => {
                return match res {
                    Ok(lease) => Ok(Wait::Granted(lease)),
                    Err(e) if e.code() == Some(Code::DeadlineExceeded) => {
                        eprintln!("slotctl: gave up waiting for a slot on pool {pools}: {}", CtlError::from(e));
                        Ok(Wait::GaveUp)
                    }
                    Err(e) => Err(e.into()),
                };
            }
            () = sleep_until_opt(deadline) => {
                let waited = args.max_wait.map(fmt_duration).unwrap_or_default();
                eprintln!("slotctl: gave up waiting for a slot on pool {pools} after {waited} (--max-wait)");
                return Ok(Wait::GaveUp);
            }
            changed = pauses.changed(), if pauses_open => {
                if changed.is_err() {
                    // The session ended; the acquire resolves with the reason next.
                    pauses_open = false;
                    continue;
                }
                let pause = blocking_pause(&pauses.borrow_and_update(), &args.pool[0]);
                if let Some((by, p)) = pause
                    && told_until != Some(p.until)
                {
                    told_until = Some(p.until);
                    eprintln!("slotctl: {}", pause_line(&pools, &by, &p, SystemTime::now()));
                }
            }
            _ = tokio::signal::ctrl_c() => {
                eprintln!("slotctl: interrupted while waiting for a slot on pool {pools}");
                return Ok(Wait::Interrupted);
            }
        }
    }
}

/// The pause that holds up a wait on `pool`, and the pool it is on. This client waits on nothing
/// else, so every pause the daemon pushed to it is on `pool` or on one of its ancestors (a pool under
/// `global` grants nothing while `global` is paused); the one ending last is what the wait is for.
fn blocking_pause(pauses: &Pauses, pool: &str) -> Option<(String, PauseInfo)> {
    if let Some(own) = pauses.get(pool) {
        return Some((pool.to_owned(), own.clone()));
    }
    pauses.iter().max_by_key(|(_, p)| p.until).map(|(name, p)| (name.clone(), p.clone()))
}

/// What slotctl says about a pause holding up the wait on `pool`.
fn pause_line(pool: &str, by: &str, p: &PauseInfo, now: SystemTime) -> String {
    let left = fmt_duration(p.until.duration_since(now).unwrap_or_default());
    let why = if p.reason.is_empty() { String::new() } else { format!(" ({})", p.reason) };
    if by == pool {
        format!("pool {pool} is paused for {left}{why}; waiting")
    } else {
        format!("pool {pool} is paused by {by} for {left}{why}; waiting")
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Watches the command until it exits; returns its status and whether the lease was lost meanwhile.
async fn supervise(
    mut child: tokio::process::Child,
    lease: &Lease,
    name: &str,
    kill_on_lost: bool,
) -> Result<(ExitStatus, bool), CtlError> {
    let lost = lease.lost();
    tokio::pin!(lost);
    let mut was_lost = false;
    let mut kill_at: Option<Instant> = None;
    let mut signals = Signals::new()?;
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| CtlError::new(format!("waiting for {name}: {e}")))?;
                return Ok((status, was_lost));
            }
            why = &mut lost, if !was_lost => {
                was_lost = true;
                warn_lost(lease, name, &why, kill_on_lost);
                if kill_on_lost {
                    signals::send(&child, signals::TERM);
                    kill_at = Some(Instant::now() + KILL_GRACE);
                }
            }
            () = sleep_until_opt(kill_at) => {
                kill_at = None;
                let _ = child.start_kill();
            }
            sig = signals.recv() => signals::send(&child, sig),
        }
    }
}

fn warn_lost(lease: &Lease, name: &str, why: &Lost, kill: bool) {
    let then = if kill { "terminating it" } else { "it keeps running (--kill-on-lost stops it)" };
    eprintln!(
        "slotctl: warning: lease {} on pool {} was lost while {name} runs ({why}); another holder may get \
         the slot; {then}",
        lease.lease_id(),
        lease.pool()
    );
}

/// Releases the lease, bounded by [`RELEASE_TIMEOUT`]; failures only warn (the daemon's TTL covers them).
async fn finish(lease: Lease, outcome: Outcome) {
    let id = lease.lease_id().to_owned();
    match tokio::time::timeout(RELEASE_TIMEOUT, lease.release(outcome)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("slotctl: warning: releasing lease {id}: {}", CtlError::from(e)),
        Err(_) => eprintln!(
            "slotctl: warning: releasing lease {id} took longer than {}; the daemon reclaims it when its \
             TTL runs out",
            fmt_duration(RELEASE_TIMEOUT)
        ),
    }
}

/// The signals slotctl receives while the command runs.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, CtlError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen =
                |kind| signal(kind).map_err(|e| CtlError::new(format!("installing a signal handler: {e}")));
            Ok(Signals {
                int: listen(SignalKind::interrupt())?,
                term: listen(SignalKind::terminate())?,
                hup: listen(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next signal to forward to the command (SIGINT is swallowed: the terminal sent it to the
    /// whole process group already).
    async fn recv(&mut self) -> i32 {
        #[cfg(unix)]
        loop {
            tokio::select! {
                _ = self.int.recv() => {}
                _ = self.term.recv() => return signals::TERM,
                _ = self.hup.recv() => return signals::HUP,
            }
        }
        #[cfg(not(unix))]
        std::future::pending().await
    }
}

mod signals {
    //! Sending a signal to the child (a no-op where there are no signals).

    #[cfg(unix)]
    pub const TERM: i32 = libc::SIGTERM;
    #[cfg(unix)]
    pub const HUP: i32 = libc::SIGHUP;
    #[cfg(not(unix))]
    pub const TERM: i32 = 15;

    /// Sends `sig` to the child if it is still running.
    pub fn send(child: &tokio::process::Child, sig: i32) {
        #[cfg(unix)]
        if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own unreaped child,
            // so it cannot have been reused by another process.
            unsafe {
                libc::kill(pid, sig);
            }
        }
        #[cfg(not(unix))]
        let _ = (child, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_exit_code() {
        assert_eq!(outcome_for(0, 75, None), Outcome::Ok);
        assert_eq!(outcome_for(3, 75, None), Outcome::Error);
        let ra = Some(Duration::from_secs(5));
        assert_eq!(outcome_for(75, 75, ra), Outcome::RateLimited { retry_after: ra });
        assert_eq!(outcome_for(42, 42, None), Outcome::RateLimited { retry_after: None });
        assert_eq!(outcome_for(75, 42, None), Outcome::Error);
    }

    #[test]
    fn a_wait_is_held_up_by_its_own_pause_or_else_by_an_ancestor_s() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let pause =
            |secs, reason: &str| PauseInfo { until: now + Duration::from_secs(secs), reason: reason.into() };
        let mut pauses = Pauses::new();
        assert!(blocking_pause(&pauses, "opus").is_none());
        pauses.insert("global".into(), pause(45, "incident"));
        pauses.insert("anthropic".into(), pause(10, ""));
        let (by, p) = blocking_pause(&pauses, "opus").expect("held up by an ancestor");
        assert_eq!(by, "global", "the pause ending last is the one waited for");
        assert_eq!(
            pause_line("opus", &by, &p, now),
            "pool opus is paused by global for 45s (incident); waiting"
        );
        pauses.insert("opus".into(), pause(5, ""));
        let (by, p) = blocking_pause(&pauses, "opus").expect("its own pause");
        assert_eq!(pause_line("opus", &by, &p, now), "pool opus is paused for 5.0s; waiting");
    }
}
