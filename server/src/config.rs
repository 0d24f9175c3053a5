//! Configuration: command-line flags (clap) merged over a TOML file, with an embedded default.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::scheduler::{PoolConfig, PoolId, SchedulerConfig, validate_tree};

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

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            aging_step: SchedulerConfig::DEFAULT_AGING_STEP,
            learning_period: Duration::ZERO,
            max_per_stream: SchedulerConfig::DEFAULT_MAX_PER_SESSION,
        }
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: Self::DEFAULT_MAX_MESSAGE_BYTES,
            max_resume_grace: Self::DEFAULT_MAX_RESUME_GRACE,
            stream_buffer: Self::DEFAULT_STREAM_BUFFER,
            max_pools: Self::DEFAULT_MAX_POOLS,
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
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
        Ok(cfg)
    }

    /// Checks cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_tree(&self.pools).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.pools.len() > self.limits.max_pools {
            return Err(ConfigError::Invalid(format!(
                "{} pools configured, more than limits.max_pools = {}",
                self.pools.len(),
                self.limits.max_pools
            )));
        }
        if self.limits.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid("limits.max_message_bytes must be >= 1024".into()));
        }
        if self.limits.stream_buffer == 0 || self.scheduler.max_per_stream == 0 {
            return Err(ConfigError::Invalid(
                "limits.stream_buffer and scheduler.max_per_stream must be >= 1".into(),
            ));
        }
        if self.scheduler.aging_step.is_zero() {
            return Err(ConfigError::Invalid("scheduler.aging_step must be > 0".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ];
        for (toml, want) in cases {
            let err = Config::from_toml_str(toml).unwrap_err().to_string();
            assert!(err.contains(want), "{toml:?}: {err}");
        }
    }
}
