//! Configuration: command-line flags (clap) merged over a TOML file, with an embedded default.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::{
    scheduler::{PoolConfig, PoolId, SchedulerConfig, validate_tree},
    token::Token,
};

/// The env var holding the agent token (an alternative to `agent_token_file`).
pub const AGENT_TOKEN_ENV: &str = "SLOTD_AGENT_TOKEN";
/// The env var holding the admin token (an alternative to `admin_token_file`).
pub const ADMIN_TOKEN_ENV: &str = "SLOTD_ADMIN_TOKEN";

/// The configuration `slotd` serves with when no `--config` is given.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// slotd: a gRPC daemon that leases scarce LLM-provider capacity to many agent processes.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// TOML configuration file (`[pools.NAME]` tables). Without it, the embedded default is used:
    /// one pool `default` with max_concurrent 4, on 127.0.0.1:50051. SIGHUP reloads the pools from it.
    #[arg(long, short, env = "SLOTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on; overrides `listen` in the file.
    #[arg(long, env = "SLOTD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SLOTD_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check: bool,
    /// Restart marker: present while the daemon runs (and kept if it stops with leases held). Finding it
    /// at startup means a restart: grant nothing new for one lease TTL so earlier holders resume first.
    /// Default: `<state_dir>/slotd-<port>.running`, or `$TMPDIR/slotd-<port>.running` without a state
    /// directory; `none` disables it.
    #[arg(long, value_name = "PATH|none", env = "SLOTD_RESTART_MARKER")]
    pub restart_marker: Option<String>,
    /// Directory for state that must outlive a restart: the resume-credential key (`lease.key`) and the
    /// default restart marker. systemd's `StateDirectory=` sets $STATE_DIRECTORY (the first entry of a
    /// colon-separated list is used). Overrides `state_dir`.
    #[arg(long, value_name = "DIR", env = "STATE_DIRECTORY")]
    pub state_dir: Option<PathBuf>,
    /// File holding the key of resume credentials (32 random bytes, mode 0600, created on first start);
    /// overrides `key_file`. Default: `<state_dir>/lease.key`, or `$TMPDIR/slotd-<port>.key` without a
    /// state directory.
    #[arg(long, value_name = "FILE", env = "SLOTD_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Persist pool changes made through the Admin service to this TOML file (written atomically);
    /// when it exists at startup, its pools replace the config file's. Overrides `state_file`.
    #[arg(long, value_name = "PATH", env = "SLOTD_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// Serve Prometheus metrics on `http://ADDR/metrics`; overrides `metrics_listen` (off by default).
    #[arg(long, value_name = "ADDR", env = "SLOTD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// File holding the token agents must send (`authorization: Bearer <token>`) to slotd.v1.Slotd;
    /// overrides `agent_token_file`. Or set the token itself in $SLOTD_AGENT_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub agent_token_file: Option<PathBuf>,
    /// File holding the token operators must send to slotd.v1.Admin; overrides `admin_token_file`.
    /// Or set the token itself in $SLOTD_ADMIN_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Allow listening beyond loopback with a service that has no token.
    #[arg(long)]
    pub allow_insecure_remote: bool,
    /// TLS certificate chain (PEM); with --tls-key, gRPC is served over TLS. Overrides `tls_cert`.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); overrides `tls_key`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Runtime threads; overrides `worker_threads`. 0: one per CPU; 1: everything on one thread
    /// (batched fan-out writes, at most one core).
    #[arg(long, value_name = "N", env = "SLOTD_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

/// How logs are written.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to serve gRPC on.
    #[serde(default = "Config::default_listen")]
    pub listen: SocketAddr,
    /// Scheduler-wide settings.
    #[serde(default)]
    pub scheduler: SchedulerSection,
    /// Resource bounds.
    #[serde(default)]
    pub limits: Limits,
    /// The pools, by name.
    #[serde(default)]
    pub pools: BTreeMap<PoolId, PoolConfig>,
    /// Restart detection (see `--restart-marker`); `None` (the library default) never detects one.
    #[serde(default)]
    pub restart_marker: Option<PathBuf>,
    /// Directory for state that must outlive a restart (see `--state-dir`): the key file
    /// [`Config::KEY_FILE_NAME`] unless `key_file` says otherwise, and, for the binary, the default
    /// restart marker. Created (mode 0700) if missing.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The key of resume credentials (see [`Config::key_path`]); `None` with no `state_dir` (the library
    /// default) uses a random key held in memory, so credentials do not survive a restart.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Where Admin pool changes are persisted; `None` (the default) keeps them in memory only.
    /// When the file exists at startup its pools replace `pools` (which stay the seed otherwise).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Address of the Prometheus endpoint (`GET /metrics`); `None` (the default) serves none.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// File holding the agent token (see [`Config::agent_token`]).
    #[serde(default)]
    pub agent_token_file: Option<PathBuf>,
    /// File holding the admin token (see [`Config::admin_token`]).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Listen beyond loopback even with a service that has no token.
    #[serde(default)]
    pub allow_insecure_remote: bool,
    /// TLS certificate chain (PEM file); with `tls_key`, gRPC is served over TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM file).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Threads of the daemon's runtime: 0 (the default) runs one per CPU; 1 runs everything on one
    /// thread, which writes a fan-out in fewer syscalls but uses at most one core (see
    /// docs/BENCHMARKS.md).
    #[serde(default)]
    pub worker_threads: usize,
    /// High availability through etcd (`[ha]`); `None` (the default) serves as a single node.
    #[serde(default)]
    pub ha: Option<HaSection>,
    /// The token slotd.v1.Slotd requires, read by [`Config::load`] from `agent_token_file` or
    /// `$SLOTD_AGENT_TOKEN`; `None` leaves the service open.
    #[serde(skip)]
    pub agent_token: Option<Token>,
    /// The token slotd.v1.Admin requires (`admin_token_file` or `$SLOTD_ADMIN_TOKEN`).
    #[serde(skip)]
    pub admin_token: Option<Token>,
}

/// `[scheduler]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSection {
    /// One priority level is worth this much waiting.
    #[serde(with = "humantime_serde")]
    pub aging_step: Duration,
    /// After a restart, grant nothing new for this long so earlier leases can resume first.
    #[serde(with = "humantime_serde")]
    pub learning_period: Duration,
    /// Most open requests plus leases on one stream.
    pub max_per_stream: usize,
}

impl SchedulerSection {
    /// Largest accepted `aging_step` (24 h): one priority level worth more than a day of waiting
    /// is no aging at all.
    pub const MAX_AGING_STEP: Duration = Duration::from_secs(24 * 3600);
    /// Largest accepted `learning_period` (24 h, the longest lease TTL there can be,
    /// `PoolConfig::MAX_TTL_LIMIT`).
    pub const MAX_LEARNING_PERIOD: Duration = PoolConfig::MAX_TTL_LIMIT;

    /// Checks the bounds of `[scheduler]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.aging_step.is_zero() {
            return Err(ConfigError::Invalid("scheduler.aging_step must be > 0".into()));
        }
        check_max("scheduler.aging_step", self.aging_step, Self::MAX_AGING_STEP)?;
        check_max("scheduler.learning_period", self.learning_period, Self::MAX_LEARNING_PERIOD)?;
        if self.max_per_stream == 0 {
            return Err(ConfigError::Invalid("scheduler.max_per_stream must be >= 1".into()));
        }
        Ok(())
    }
}

/// Refuses a duration above its documented maximum, naming the key.
fn check_max(key: &str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::Invalid(format!(
            "{key} = {} is above the maximum {}",
            humantime::format_duration(value),
            humantime::format_duration(max)
        )));
    }
    Ok(())
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            aging_step: SchedulerConfig::DEFAULT_AGING_STEP,
            learning_period: Duration::ZERO,
            max_per_stream: SchedulerConfig::DEFAULT_MAX_PER_SESSION,
        }
    }
}

/// `[ha]`: active/standby through etcd's v3 election API (see README "High availability").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    /// etcd endpoints, e.g. `["http://127.0.0.1:2379"]`.
    pub etcd: Vec<String>,
    /// The election's name: members with the same name elect one leader among them. Also the
    /// prefix of slotd's keys in etcd (`/slotd/<election>/...`).
    #[serde(default = "HaSection::default_election")]
    pub election: String,
    /// The address clients use to reach this member (`http://host:port`), handed to them by the
    /// standbys in `slotd-leader` while this member leads. Default: `http://<the bound listen
    /// address>`, which needs a concrete (not unspecified) listen IP.
    #[serde(default)]
    pub advertise: Option<String>,
    /// TTL of the etcd lease behind this member's candidacy: a dead leader is replaced after about
    /// this long. Whole seconds (etcd's unit).
    #[serde(default = "HaSection::default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// The leader stops granting at its last successful keepalive + `lease_ttl` − `margin`, so that
    /// it is silent before etcd can elect another (covers clock-rate drift and the keepalive's
    /// round trip).
    #[serde(default = "HaSection::default_margin", with = "humantime_serde")]
    pub margin: Duration,
}

impl HaSection {
    /// Default `election`.
    pub const DEFAULT_ELECTION: &str = "slotd";
    /// Default `lease_ttl`.
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
    /// Shortest `lease_ttl` (etcd rounds shorter ones up to its own minimum anyway).
    pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
    /// Longest `lease_ttl`.
    pub const MAX_LEASE_TTL: Duration = Duration::from_secs(300);
    /// Default `margin`.
    pub const DEFAULT_MARGIN: Duration = Duration::from_secs(1);
    /// Most etcd endpoints.
    pub const MAX_ENDPOINTS: usize = 16;
    /// Longest endpoint, election name or advertised address, in bytes.
    pub const MAX_NAME_BYTES: usize = 256;

    fn default_election() -> String {
        Self::DEFAULT_ELECTION.to_owned()
    }

    fn default_lease_ttl() -> Duration {
        Self::DEFAULT_LEASE_TTL
    }

    fn default_margin() -> Duration {
        Self::DEFAULT_MARGIN
    }

    /// Checks the bounds of `[ha]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.etcd.is_empty() || self.etcd.len() > Self::MAX_ENDPOINTS {
            return bad(format!("ha.etcd must list 1 to {} endpoints", Self::MAX_ENDPOINTS));
        }
        let visible = |s: &str| {
            !s.is_empty() && s.len() <= Self::MAX_NAME_BYTES && s.bytes().all(|b| b.is_ascii_graphic())
        };
        for e in &self.etcd {
            if !visible(e) || !(e.starts_with("http://") || e.starts_with("https://")) {
                return bad(format!("ha.etcd: {e:?} is not an http:// or https:// URL"));
            }
        }
        if !visible(&self.election)
            || !self.election.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return bad(format!(
                "ha.election = {:?}: use 1 to {} letters, digits, '-', '_' or '.'",
                self.election,
                Self::MAX_NAME_BYTES
            ));
        }
        if let Some(advertise) = self.advertise.as_deref()
            && !visible(advertise)
        {
            return bad(format!(
                "ha.advertise = {:?}: the address clients reach this member at (visible ASCII, at most {} bytes)",
                advertise,
                Self::MAX_NAME_BYTES
            ));
        }
        if self.lease_ttl < Self::MIN_LEASE_TTL || self.lease_ttl.subsec_nanos() != 0 {
            return bad("ha.lease_ttl must be a whole number of seconds, at least 1s".into());
        }
        check_max("ha.lease_ttl", self.lease_ttl, Self::MAX_LEASE_TTL)?;
        if self.margin.is_zero() || self.margin >= self.lease_ttl {
            return bad("ha.margin must be > 0 and shorter than ha.lease_ttl".into());
        }
        Ok(())
    }
}

/// `[limits]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Longest resume grace a client may ask for.
    #[serde(with = "humantime_serde")]
    pub max_resume_grace: Duration,
    /// Events buffered per stream before a slow client is disconnected.
    pub stream_buffer: usize,
    /// Most pools.
    pub max_pools: usize,
    /// After shutdown begins, how long open connections get to finish before the daemon stops anyway
    /// (a health `Watch` or a client that never closes would otherwise hold it forever).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Most open Acquire streams in all; the next is refused with RESOURCE_EXHAUSTED.
    pub max_streams: usize,
    /// Most open Acquire streams on one connection; the next is refused with RESOURCE_EXHAUSTED.
    pub max_streams_per_connection: usize,
    /// Most open client connections; the next is closed at once (an HTTP/2 GOAWAY on plaintext)
    /// with a rate-limited warning. Each one costs a file descriptor: keep the process's open-file
    /// limit (systemd `LimitNOFILE`) above it.
    pub max_connections: usize,
    /// How long a new connection has to send the HTTP/2 preface (and, under TLS, to finish the TLS
    /// handshake) before it is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Limits {
    /// Default `max_message_bytes`.
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
    /// Default `max_resume_grace`.
    pub const DEFAULT_MAX_RESUME_GRACE: Duration = Duration::from_secs(60);
    /// Default `stream_buffer`.
    pub const DEFAULT_STREAM_BUFFER: usize = 4096;
    /// Default `max_pools`.
    pub const DEFAULT_MAX_POOLS: usize = 1024;
    /// Default `drain_timeout`.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default `max_streams`.
    pub const DEFAULT_MAX_STREAMS: usize = 10_000;
    /// Default `max_streams_per_connection`.
    pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: usize = 256;
    /// Default `max_connections`: one connection per agent process at `DEFAULT_MAX_STREAMS` agents
    /// with one Acquire stream each, plus room for unary-only clients (slotctl, health probes).
    pub const DEFAULT_MAX_CONNECTIONS: usize = Self::DEFAULT_MAX_STREAMS + 1024;
    /// Largest accepted `max_connections`.
    pub const MAX_MAX_CONNECTIONS: usize = 1_000_000;
    /// Default `handshake_timeout`.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Longest accepted `handshake_timeout`.
    pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);
    /// HTTP/2 streams allowed per connection beyond `max_streams_per_connection`, for unary calls
    /// (Status, ReportRateLimit, health) next to a connection's Acquire streams.
    pub const UNARY_STREAM_HEADROOM: u32 = 64;

    /// Largest accepted `max_resume_grace` (24 h, the longest lease TTL there can be: a lease kept
    /// for its grace still expires at its TTL).
    pub const MAX_RESUME_GRACE: Duration = PoolConfig::MAX_TTL_LIMIT;
    /// Largest accepted `drain_timeout` (1 h).
    pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);

    /// Checks the bounds of `[limits]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid("limits.max_message_bytes must be >= 1024".into()));
        }
        if self.stream_buffer == 0 {
            return Err(ConfigError::Invalid("limits.stream_buffer must be >= 1".into()));
        }
        if self.max_streams == 0 || self.max_streams_per_connection == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_streams and limits.max_streams_per_connection must be >= 1".into(),
            ));
        }
        check_max("limits.max_resume_grace", self.max_resume_grace, Self::MAX_RESUME_GRACE)?;
        check_max("limits.drain_timeout", self.drain_timeout, Self::MAX_DRAIN_TIMEOUT)?;
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: Self::DEFAULT_MAX_MESSAGE_BYTES,
            max_resume_grace: Self::DEFAULT_MAX_RESUME_GRACE,
            stream_buffer: Self::DEFAULT_STREAM_BUFFER,
            max_pools: Self::DEFAULT_MAX_POOLS,
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
            max_streams: Self::DEFAULT_MAX_STREAMS,
            max_streams_per_connection: Self::DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// A configuration that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("invalid config: {0}")]
    Parse(#[from] toml::de::Error),
    /// The values are inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Most runtime threads `worker_threads` accepts.
    pub const MAX_WORKER_THREADS: usize = 256;
    /// The key file's name inside `state_dir`.
    pub const KEY_FILE_NAME: &str = "lease.key";

    /// Where the key of resume credentials is kept: `key_file`, else `<state_dir>/lease.key`; `None`
    /// means a random key in memory.
    pub fn key_path(&self) -> Option<PathBuf> {
        self.key_file.clone().or_else(|| self.state_dir.as_ref().map(|d| d.join(Self::KEY_FILE_NAME)))
    }

    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 50051))
    }

    /// The embedded default.
    pub fn embedded() -> Self {
        Self::from_toml_str(DEFAULT_TOML).expect("the embedded default config is valid")
    }

    /// Parses and validates TOML.
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(s)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml_str(&text)
    }

    /// Loads what the command line asks for: the file, or the embedded default; then flag overrides.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let mut cfg = match &cli.config {
            Some(path) => Self::from_file(path)?,
            None => Self::embedded(),
        };
        if let Some(listen) = cli.listen {
            cfg.listen = listen;
        }
        if let Some(f) = &cli.state_file {
            cfg.state_file = Some(f.clone());
        }
        if let Some(dir) = &cli.state_dir {
            // systemd lists several directories separated by colons when a unit asks for several.
            let first = dir.to_str().and_then(|d| d.split(':').next()).map(PathBuf::from);
            cfg.state_dir = Some(first.unwrap_or_else(|| dir.clone()));
        }
        if let Some(f) = &cli.key_file {
            cfg.key_file = Some(f.clone());
        }
        // The binary's defaults: beside each other in the state directory, else in the temp directory.
        let port = cfg.listen.port();
        let default_dir = cfg.state_dir.clone().unwrap_or_else(std::env::temp_dir);
        match cli.restart_marker.as_deref() {
            Some("none") => cfg.restart_marker = None,
            Some(path) => cfg.restart_marker = Some(PathBuf::from(path)),
            None if cfg.restart_marker.is_none() => {
                cfg.restart_marker = Some(default_dir.join(format!("slotd-{port}.running")));
            }
            None => {}
        }
        if cfg.key_path().is_none() {
            cfg.key_file = Some(default_dir.join(format!("slotd-{port}.key")));
        }
        if let Some(addr) = cli.metrics_listen {
            cfg.metrics_listen = Some(addr);
        }
        if let Some(f) = &cli.agent_token_file {
            cfg.agent_token_file = Some(f.clone());
        }
        if let Some(f) = &cli.admin_token_file {
            cfg.admin_token_file = Some(f.clone());
        }
        if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
            cfg.tls_cert = Some(cert.clone());
            cfg.tls_key = Some(key.clone());
        }
        cfg.allow_insecure_remote |= cli.allow_insecure_remote;
        if let Some(n) = cli.worker_threads {
            cfg.worker_threads = n;
        }
        cfg.validate()?;
        cfg.resolve_tokens(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    /// Reads the tokens: each from its file or its env var (`env` looks one up), not both.
    pub fn resolve_tokens(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let read = |file: &Option<PathBuf>, var: &str, key: &str| -> Result<Option<Token>, ConfigError> {
            let from_env = env(var).filter(|v| !v.is_empty());
            let text = match (file, from_env) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::Invalid(format!("both {key} and ${var} are set; use one")));
                }
                (Some(path), None) => std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.clone(), source })?,
                (None, Some(v)) => v,
                (None, None) => return Ok(None),
            };
            Token::new(&text).map(Some).map_err(|e| ConfigError::Invalid(format!("{key} / ${var}: {e}")))
        };
        self.agent_token = read(&self.agent_token_file, AGENT_TOKEN_ENV, "agent_token_file")?;
        self.admin_token = read(&self.admin_token_file, ADMIN_TOKEN_ENV, "admin_token_file")?;
        Ok(())
    }

    /// Checks every bound and cross-field rule: each pool ([`PoolConfig::validate`], through
    /// `validate_tree`), `[limits]` ([`Limits::validate`]) and `[scheduler]` ([`SchedulerSection::validate`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_tree(&self.pools).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.worker_threads > Self::MAX_WORKER_THREADS {
            return Err(ConfigError::Invalid(format!(
                "worker_threads = {} is more than {}; 0 runs one per CPU",
                self.worker_threads,
                Self::MAX_WORKER_THREADS
            )));
        }
        if self.pools.len() > self.limits.max_pools {
            return Err(ConfigError::Invalid(format!(
                "{} pools configured, more than limits.max_pools = {}",
                self.pools.len(),
                self.limits.max_pools
            )));
        }
        self.limits.validate()?;
        self.scheduler.validate()?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid("tls_cert and tls_key go together: set both or neither".into()));
        }
        if !(1..=Limits::MAX_MAX_CONNECTIONS).contains(&self.limits.max_connections) {
            return Err(ConfigError::Invalid(format!(
                "limits.max_connections must be between 1 and {}",
                Limits::MAX_MAX_CONNECTIONS
            )));
        }
        if self.limits.handshake_timeout.is_zero()
            || self.limits.handshake_timeout > Limits::MAX_HANDSHAKE_TIMEOUT
        {
            return Err(ConfigError::Invalid(format!(
                "limits.handshake_timeout must be > 0 and at most {}",
                humantime::format_duration(Limits::MAX_HANDSHAKE_TIMEOUT)
            )));
        }
        if self.scheduler.aging_step.is_zero() {
            return Err(ConfigError::Invalid("scheduler.aging_step must be > 0".into()));
        }
        if let Some(ha) = &self.ha {
            ha.validate()?;
            // Resume credentials must verify on whichever member leads next.
            if self.key_file.is_none() {
                return Err(ConfigError::Invalid(
                    "[ha] needs key_file: the same resume-credential key file on every member".into(),
                ));
            }
        }
        for (key, path) in [("state_dir", &self.state_dir), ("key_file", &self.key_file)] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(ConfigError::Invalid(format!("{key} is empty: name a path or leave it out")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every TOML example in the README is a valid configuration, so the docs cannot rot.
    #[test]
    fn readme_config_examples_parse() {
        let readme = include_str!("../../README.md");
        let blocks: Vec<&str> =
            readme.split("```toml\n").skip(1).map(|b| b.split("```").next().unwrap_or("")).collect();
        assert!(!blocks.is_empty(), "the README shows a config example");
        for b in blocks {
            if let Err(e) = Config::from_toml_str(b) {
                panic!("README config example is invalid: {e}\n{b}");
            }
        }
    }

    /// `[ha]` is bounded and needs the shared key file; without it nothing HA is configured.
    #[test]
    fn ha_section_is_validated() {
        let base = "key_file = \"/k\"\n[pools.p]\nmax_concurrent = 1\n";
        let ok = format!("{base}[ha]\netcd = [\"http://127.0.0.1:2379\"]\n");
        let cfg = Config::from_toml_str(&ok).unwrap();
        let ha = cfg.ha.expect("[ha] parsed");
        assert_eq!(
            (ha.election.as_str(), ha.lease_ttl, ha.margin),
            ("slotd", HaSection::DEFAULT_LEASE_TTL, HaSection::DEFAULT_MARGIN)
        );
        assert!(Config::from_toml_str(base).unwrap().ha.is_none());
        let refused = |extra: &str, want: &str| {
            let text = format!("{base}[ha]\n{extra}\n");
            let e = Config::from_toml_str(&text).expect_err(extra).to_string();
            assert!(e.contains(want), "{extra}: {e}");
        };
        refused("etcd = []", "ha.etcd");
        refused("etcd = [\"127.0.0.1:2379\"]", "ha.etcd");
        refused("etcd = [\"http://e\"]\nelection = \"a b\"", "ha.election");
        refused("etcd = [\"http://e\"]\nlease_ttl = \"1500ms\"", "ha.lease_ttl");
        refused("etcd = [\"http://e\"]\nlease_ttl = \"10m\"", "ha.lease_ttl");
        refused("etcd = [\"http://e\"]\nmargin = \"5s\"", "ha.margin");
        refused("etcd = [\"http://e\"]\nadvertise = \"\"", "ha.advertise");
        let no_key = "[pools.p]\nmax_concurrent = 1\n[ha]\netcd = [\"http://e\"]\n";
        assert!(Config::from_toml_str(no_key).unwrap_err().to_string().contains("key_file"));
    }

    #[test]
    fn embedded_default_has_one_pool_of_four_on_50051() {
        let cfg = Config::embedded();
        assert_eq!(cfg.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(cfg.pools.len(), 1);
        assert_eq!(cfg.pools[&PoolId::new("default")].max_concurrent, 4);
    }

    #[test]
    fn durations_and_policies_parse() {
        let cfg = Config::from_toml_str(
            r#"
            [pools.global]
            max_concurrent = 10
            [pools.anthropic]
            max_concurrent = 4
            parent = "global"
            cooldown = "200ms"
            on_overflow = "shed_oldest"
            max_wait = "2m"
            "#,
        )
        .unwrap();
        let a = &cfg.pools[&PoolId::new("anthropic")];
        assert_eq!(a.cooldown, Duration::from_millis(200));
        assert_eq!(a.max_wait, Some(Duration::from_secs(120)));
        assert_eq!(a.parent, Some(PoolId::new("global")));
    }

    #[test]
    fn every_duration_at_its_maximum_is_accepted() {
        let toml = format!(
            "[scheduler]\naging_step = \"{}\"\nlearning_period = \"{}\"\n\
             [limits]\nmax_resume_grace = \"{}\"\ndrain_timeout = \"{}\"\n\
             [pools.a]\nmax_concurrent = 1\ncooldown = \"{}\"\nheadroom_recovery = \"{}\"\n\
             default_retry_after = \"{}\"\nmax_wait = \"{}\"\nmax_ttl = \"{}\"\ndefault_ttl = \"{}\"\n",
            humantime::format_duration(SchedulerSection::MAX_AGING_STEP),
            humantime::format_duration(SchedulerSection::MAX_LEARNING_PERIOD),
            humantime::format_duration(Limits::MAX_RESUME_GRACE),
            humantime::format_duration(Limits::MAX_DRAIN_TIMEOUT),
            humantime::format_duration(PoolConfig::MAX_COOLDOWN),
            humantime::format_duration(PoolConfig::MAX_HEADROOM_RECOVERY),
            humantime::format_duration(PoolConfig::MAX_RETRY_AFTER),
            humantime::format_duration(PoolConfig::MAX_WAIT_LIMIT),
            humantime::format_duration(PoolConfig::MAX_TTL_LIMIT),
            humantime::format_duration(PoolConfig::MAX_TTL_LIMIT),
        );
        let cfg = Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(cfg.pools[&PoolId::new("a")].cooldown, PoolConfig::MAX_COOLDOWN);
    }

    #[test]
    fn tokens_come_from_a_file_or_the_env_not_both() {
        let dir = std::env::temp_dir().join(format!("slotd-config-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.token");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut cfg = Config::embedded();
        cfg.agent_token_file = Some(file.clone());
        let env = |k: &str| (k == ADMIN_TOKEN_ENV).then(|| "from-env".to_owned());
        cfg.resolve_tokens(env).unwrap();
        assert!(cfg.agent_token.as_ref().is_some_and(|t| t.matches(b"from-file")));
        assert!(cfg.admin_token.as_ref().is_some_and(|t| t.matches(b"from-env")));

        let both = |_: &str| Some("x".to_owned());
        let err = cfg.resolve_tokens(both).unwrap_err().to_string();
        assert!(err.contains("agent_token_file") && err.contains(AGENT_TOKEN_ENV), "{err}");
        cfg.agent_token_file = Some(dir.join("missing"));
        assert!(cfg.resolve_tokens(|_| None).unwrap_err().to_string().contains("cannot read"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_key_and_the_restart_marker_live_in_the_state_dir_else_beside_each_other_in_tmp() {
        let load = |args: &[&str]| {
            let cli = Cli::parse_from([&["slotd", "--listen", "127.0.0.1:6000"], args].concat());
            Config::load(&cli).unwrap()
        };
        let cfg = load(&["--state-dir", "/var/lib/slotd:/var/lib/other"]);
        assert_eq!(cfg.state_dir, Some(PathBuf::from("/var/lib/slotd")));
        assert_eq!(cfg.key_path(), Some(PathBuf::from("/var/lib/slotd/lease.key")));
        assert_eq!(cfg.restart_marker, Some(PathBuf::from("/var/lib/slotd/slotd-6000.running")));
        let cfg = load(&["--state-dir", "/s", "--key-file", "/k/key", "--restart-marker", "none"]);
        assert_eq!((cfg.key_path(), cfg.restart_marker), (Some(PathBuf::from("/k/key")), None));
        let env_set = ["STATE_DIRECTORY", "SLOTD_KEY_FILE", "SLOTD_RESTART_MARKER"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        if !env_set {
            let cfg = load(&[]);
            let tmp = std::env::temp_dir();
            assert_eq!(cfg.key_path(), Some(tmp.join("slotd-6000.key")));
            assert_eq!(cfg.restart_marker, Some(tmp.join("slotd-6000.running")));
        }
        // The library default (no CLI) keeps the key in memory.
        assert_eq!(Config::embedded().key_path(), None);
        let err = Config::from_toml_str("state_dir = \"\"").unwrap_err().to_string();
        assert!(err.contains("state_dir is empty"), "{err}");
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let cases = [
            ("[pools.a]\nmax_concurrent = 0", "max_concurrent"),
            ("[pools.a]\nmax_concurrent = 1\nparent = \"b\"", "does not exist"),
            (
                "[pools.a]\nmax_concurrent = 1\nparent = \"b\"\n[pools.b]\nmax_concurrent = 1\nparent = \"a\"",
                "cycle",
            ),
            ("[pools.a]\nmax_concurrent = 1\nbogus = 3", "unknown field"),
            ("[pools.a]\nmax_concurrent = 1\ncooldown = \"soon\"", "cooldown"),
            ("[pools.\"bad name\"]\nmax_concurrent = 1", "invalid pool name"),
            ("tls_key = \"k.pem\"", "tls_cert and tls_key"),
            ("[limits]\nmax_streams = 0", "max_streams"),
            ("worker_threads = 100000", "worker_threads"),
            ("worker_threads = -1", "worker_threads"),
            ("[limits]\nmax_connections = 0", "max_connections"),
            ("[limits]\nmax_connections = 1000001", "max_connections"),
            ("[limits]\nhandshake_timeout = \"0s\"", "handshake_timeout"),
            ("[limits]\nhandshake_timeout = \"301s\"", "handshake_timeout"),
            // Every duration has a documented maximum (the issue's value among them).
            ("[pools.a]\nmax_concurrent = 1\ncooldown = \"9223372036854775807s\"", "cooldown"),
            ("[pools.a]\nmax_concurrent = 1\ncooldown = \"61m\"", "cooldown"),
            (
                "[pools.a]\nmax_concurrent = 1\nheadroom_recovery = \"9223372036854775807s\"",
                "headroom_recovery",
            ),
            ("[pools.a]\nmax_concurrent = 1\ndefault_retry_after = \"25h\"", "default_retry_after"),
            ("[pools.a]\nmax_concurrent = 1\nmax_wait = \"31days\"", "max_wait"),
            ("[pools.a]\nmax_concurrent = 1\nmax_ttl = \"25h\"", "max_ttl"),
            ("[pools.a]\nmax_concurrent = 1\ndefault_ttl = \"25h\"", "default_ttl"),
            ("[scheduler]\naging_step = \"25h\"", "scheduler.aging_step"),
            ("[scheduler]\naging_step = \"0s\"", "scheduler.aging_step"),
            ("[scheduler]\nlearning_period = \"25h\"", "scheduler.learning_period"),
            ("[limits]\nmax_resume_grace = \"25h\"", "limits.max_resume_grace"),
            ("[limits]\ndrain_timeout = \"2h\"", "limits.drain_timeout"),
            ("[limits]\ndrain_timeout = \"99999999999999999999999s\"", "drain_timeout"),
        ];
        for (toml, want) in cases {
            let err = Config::from_toml_str(toml).unwrap_err().to_string();
            assert!(err.contains(want), "{toml:?}: {err}");
        }
    }
}
