//! The command line of `slotctl` (clap derive: the doc comments are the `--help` text).

use std::{ffi::OsString, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where `slotctl` looks for the daemon unless told otherwise.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";
/// The exit code that `slotctl run` reads as "rate limited" unless told otherwise (EX_TEMPFAIL).
pub const DEFAULT_RATE_LIMIT_EXIT_CODE: i32 = 75;

/// Operate a slotd daemon: status, a live view, pools, pauses, revokes, drains, and `run` (flock(1)
/// for LLM-provider slots).
#[derive(Debug, Parser)]
#[command(name = "slotctl", version, propagate_version = true)]
pub struct Cli {
    /// The daemon's gRPC endpoint (`host:port` or a URL). With high availability, give every member:
    /// repeat the flag, or separate them with commas (also in SLOTD_ENDPOINT). Every command then
    /// reaches the leader: a standby's redirect is followed, a member that is down is skipped.
    #[arg(
        long,
        global = true,
        env = "SLOTD_ENDPOINT",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINT,
        value_name = "ENDPOINT"
    )]
    pub endpoint: Vec<String>,
    /// Bearer token, sent as `authorization: Bearer <token>` (to the admin service too, unless
    /// --admin-token is given).
    #[arg(long, global = true, env = "SLOTD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Bearer token for the admin service (pool, pause, resume, revoke, drain, undrain, and top's
    /// events), when it differs from --token.
    #[arg(long, global = true, env = "SLOTD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// CA certificate (PEM) to verify the daemon's TLS certificate; implies TLS. An `https://`
    /// endpoint uses TLS too.
    #[arg(long, global = true, env = "SLOTD_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// The name the daemon's TLS certificate must carry (default: the endpoint's host).
    #[arg(long, global = true, env = "SLOTD_TLS_DOMAIN", value_name = "NAME")]
    pub tls_domain: Option<String>,
    /// Output format (used by `status`, `pool set` and `drain`).
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (one object; `drain` prints one per line).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a table of pools and leases (the Status RPC).
    Status {
        /// Only this pool and its leases.
        #[arg(long)]
        pool: Option<String>,
    },
    /// A live view: per pool a bar of in-flight against the limit, queue depth, pause countdown, and
    /// recent events. q, Esc or ctrl-c quits.
    Top {
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Create, change or remove pools (Admin service).
    Pool {
        /// What to do with the pool.
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// Pause a pool by hand until max(current pause end, now + FOR).
    Pause {
        /// The pool.
        pool: String,
        /// How long, for example 30s or 2m.
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
        duration: Duration,
        /// Shown in Status and to waiting agents.
        #[arg(long)]
        reason: Option<String>,
    },
    /// End a pool's pause now.
    Resume {
        /// The pool.
        pool: String,
    },
    /// End a lease now; its holder is told it expired (revoked).
    Revoke {
        /// The lease id (32 hex digits), or a prefix that matches one lease (`slotctl status` shows 8).
        lease_id: String,
    },
    /// Stop granting, then report progress until no lease is held. Granting stays stopped until
    /// `slotctl undrain`. Exits 1 if the timeout passes first.
    Drain {
        /// Stop waiting after this long (the daemon keeps draining).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Start granting again after a drain.
    Undrain,
    /// Force a pool's circuit breaker open (nothing is granted until it is forced closed) or closed
    /// (counts and backoff start over). Works whether or not the pool's breaker is enabled.
    Breaker {
        /// Open or close it.
        #[arg(value_enum)]
        to: BreakerTo,
        /// The pool.
        pool: String,
        /// Shown in the transition's reason (Watch, logs, waiting agents).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Hold a lease while a command runs, like flock(1).
    ///
    /// The command gets SLOTD_LEASE_ID, SLOTD_FENCING_TOKEN and SLOTD_POOL in its environment, and
    /// its exit status is passed through (a signal N gives 128+N). Exit 0 releases the lease as ok,
    /// the rate-limit exit code (75, EX_TEMPFAIL) as rate limited (which pauses the pool), anything
    /// else as failed.
    Run(RunArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// What `slotctl breaker` forces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BreakerTo {
    /// Forced open.
    Open,
    /// Forced closed.
    Close,
}

/// `slotctl pool ...`.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a pool or change one; options left out keep their current value (or the default for
    /// a new pool).
    Set(Box<PoolSetArgs>),
    /// Remove a pool that has no children: its waiters are rejected and its leases expire.
    Rm {
        /// The pool.
        name: String,
    },
}

/// What an overflowing queue does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOverflow {
    /// Refuse the new request.
    Reject,
    /// Drop the oldest waiter to make room.
    #[value(name = "shed_oldest", alias = "shed-oldest")]
    ShedOldest,
    /// Make the new request wait to enter the queue.
    Block,
}

impl OnOverflow {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnOverflow::Reject => "reject",
            OnOverflow::ShedOldest => "shed_oldest",
            OnOverflow::Block => "block",
        }
    }
}

/// `slotctl pool set`.
#[derive(Debug, Args)]
pub struct PoolSetArgs {
    /// The pool.
    pub name: String,
    /// Most leases at once (1..=10000).
    #[arg(long)]
    pub max_concurrent: Option<u32>,
    /// Parent pool; "" makes it a root.
    #[arg(long)]
    pub parent: Option<String>,
    /// Longest queue (>= 1).
    #[arg(long)]
    pub max_queue_depth: Option<u32>,
    /// What a full queue does with a new request.
    #[arg(long, value_enum)]
    pub on_overflow: Option<OnOverflow>,
    /// How long a released slot cools down before it is granted again, for example 200ms.
    #[arg(long, value_parser = parse_duration)]
    pub cooldown: Option<Duration>,
    /// Lease TTL when a request sets none.
    #[arg(long, value_parser = parse_duration)]
    pub default_ttl: Option<Duration>,
    /// Largest lease TTL a request may ask for.
    #[arg(long, value_parser = parse_duration)]
    pub max_ttl: Option<Duration>,
    /// Default wait limit; 0s clears it (wait forever).
    #[arg(long, value_parser = parse_duration)]
    pub max_wait: Option<Duration>,
    /// Pause for a 429 that came without a Retry-After.
    #[arg(long, value_parser = parse_duration)]
    pub default_retry_after: Option<Duration>,
    /// Adaptive headroom on or off.
    #[arg(long)]
    pub adaptive: Option<bool>,
    /// Quiet period per headroom recovery step.
    #[arg(long, value_parser = parse_duration)]
    pub headroom_recovery: Option<Duration>,
    /// Longest pause an agent's 429 report can cause (operators' pauses are not capped).
    #[arg(long, value_parser = parse_duration)]
    pub max_agent_retry_after: Option<Duration>,
    /// Requests-per-minute budget (0 removes it).
    #[arg(long, value_name = "N")]
    pub requests_per_minute: Option<u64>,
    /// Input-tokens-per-minute budget (0 removes it).
    #[arg(long, value_name = "N")]
    pub input_tokens_per_minute: Option<u64>,
    /// Output-tokens-per-minute budget (0 removes it).
    #[arg(long, value_name = "N")]
    pub output_tokens_per_minute: Option<u64>,
    /// Budget shadow mode: track and report, never block.
    #[arg(long)]
    pub budget_shadow: Option<bool>,
    /// Hold the slot this long after an `error` release (0s turns it off).
    #[arg(long, value_parser = parse_duration)]
    pub failure_hold: Option<Duration>,
    /// Hold the slot this long after a `cancelled` release (0s turns it off).
    #[arg(long, value_parser = parse_duration)]
    pub cancel_cooldown: Option<Duration>,
    /// Base of the phantom hold after error, 429 or overload (0s turns it off).
    #[arg(long, value_parser = parse_duration)]
    pub phantom_hold: Option<Duration>,
    /// The circuit breaker on or off (its other settings: the config file or Admin UpsertPool).
    #[arg(long)]
    pub breaker: Option<bool>,
}

/// `slotctl run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pool to take a slot on. Repeat it (`--pool key-a --pool key-b`) to take one slot on the
    /// first listed pool that has room (acquire_any): the request waits in every listed queue at once.
    #[arg(long, required = true)]
    pub pool: Vec<String>,
    /// 0..=9, higher is served first (the daemon's default is 5).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=9))]
    pub priority: Option<u32>,
    /// Lease TTL (heartbeats are automatic); default: the pool's.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Holder name shown in Status (default: "slotctl run CMD pid N").
    #[arg(long)]
    pub holder: Option<String>,
    /// Give up waiting for the slot after this long and exit 75. Default: wait forever (through
    /// pauses too).
    #[arg(long, value_parser = parse_duration)]
    pub max_wait: Option<Duration>,
    /// The command's input-token estimate, reserved from the pool's rate budgets while it runs
    /// (default: the pool's default estimate). Refused if above a budget's burst.
    #[arg(long, value_name = "N")]
    pub tokens: Option<u64>,
    /// The command's output-token estimate (its max_tokens), with `--tokens`; default 0.
    #[arg(long, value_name = "N", requires = "tokens")]
    pub max_output_tokens: Option<u64>,
    /// The command exit code that means "the provider rate-limited me".
    #[arg(long, env = "SLOTCTL_RATE_LIMIT_EXIT_CODE", default_value_t = DEFAULT_RATE_LIMIT_EXIT_CODE)]
    pub rate_limit_exit_code: i32,
    /// With a rate-limited exit: how long to pause the pool (default: the pool's default_retry_after).
    #[arg(long, value_parser = parse_duration)]
    pub retry_after: Option<Duration>,
    /// Terminate the command (SIGTERM, then SIGKILL after 10 s) if the lease is lost while it runs.
    /// By default only a warning is printed.
    #[arg(long)]
    pub kill_on_lost: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Parses a human duration ("200ms", "30s", "1h 5m").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (try for example 500ms, 30s or 2m)"))
}
