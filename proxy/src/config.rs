//! Configuration: the TOML file (routes and limits) with an embedded default, validated before serving.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use http::Uri;
use serde::Deserialize;

/// The configuration `slotd-proxy` serves with when no `--config` is given.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML did not parse (or named an unknown key).
    #[error("invalid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// A value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// A file named by the configuration could not be read.
    #[error("reading {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// The API a route speaks: decides the shape of local error bodies and where usage is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// Anthropic Messages API (`{"type":"error","error":{...}}`, `message_delta` usage).
    Anthropic,
    /// OpenAI APIs (`{"error":{...}}`, `usage` objects).
    Openai,
}

/// What a route does while the daemon is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonDown {
    /// Answer 503 naming the daemon's address (the default).
    #[default]
    FailClosed,
    /// Forward without a lease, with a warning logged at most once a second.
    FailOpen,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the proxy listens (default [`Config::DEFAULT_LISTEN`]).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The slotd daemon: `host:port` or a URL, or a list of them, every member of a highly
    /// available deployment (default [`Config::DEFAULT_DAEMON`]).
    #[serde(default = "default_daemon")]
    pub daemon: Daemons,
    /// A file holding the daemon's agent token.
    #[serde(default)]
    pub daemon_token_file: Option<PathBuf>,
    /// A PEM CA bundle for the daemon's certificate (implies TLS to the daemon).
    #[serde(default)]
    pub daemon_ca_file: Option<PathBuf>,
    /// Holder name for leases taken without `x-slotd-holder`.
    #[serde(default = "default_holder")]
    pub holder: String,
    /// How often the daemon is probed; one probe may take as long.
    #[serde(default = "default_probe", with = "humantime_serde")]
    pub daemon_probe_interval: Duration,
    /// Concurrent client connections; more wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request header block accepted from a client.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Largest request body accepted from a client (413 beyond).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// How long in-flight streams may run on after a shutdown signal.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Trust the system's root store for upstream TLS as well as the webpki roots.
    #[serde(default)]
    pub system_roots: bool,
    /// Extra PEM CA certificates trusted for upstream TLS.
    #[serde(default)]
    pub extra_ca_file: Option<PathBuf>,
    /// TCP connect timeout to upstreams.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    /// The credential-fingerprint key, inline (at least [`Config::MIN_FINGERPRINT_KEY`] bytes).
    #[serde(default)]
    pub fingerprint_key: Option<Secret>,
    /// The credential-fingerprint key, from a file (trailing whitespace ignored).
    #[serde(default)]
    pub fingerprint_key_file: Option<PathBuf>,
    /// The routes, by name (the name labels metrics and logs).
    pub routes: BTreeMap<String, RouteConfig>,
}

/// The daemon's address, or the addresses of every member of a highly available deployment (the
/// session follows the leader among them). TOML takes a string or a list of strings; it prints as
/// the addresses joined with ", ".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "OneOrMany")]
pub struct Daemons(pub Vec<String>);

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl From<OneOrMany> for Daemons {
    fn from(v: OneOrMany) -> Self {
        match v {
            OneOrMany::One(s) => Daemons(vec![s]),
            OneOrMany::Many(v) => Daemons(v),
        }
    }
}

impl Daemons {
    /// Most daemon addresses accepted (a deployment has a handful of members).
    pub const MAX: usize = 16;

    /// Addresses separated by commas (the `--daemon` flag).
    pub fn parse_list(list: &str) -> Self {
        Daemons(list.split(',').map(|s| s.trim().to_owned()).collect())
    }

    fn validate(&self, tls: bool) -> Result<(), ConfigError> {
        if self.0.is_empty() || self.0.len() > Self::MAX {
            return Err(invalid(format!("daemon: 1..={} addresses", Self::MAX)));
        }
        for (i, d) in self.0.iter().enumerate() {
            if d.trim().is_empty() {
                return Err(invalid("daemon: empty address"));
            }
            slotd_client::parse_endpoint(d, tls).map_err(|e| invalid(format!("daemon: {e}")))?;
            if self.0[..i].contains(d) {
                return Err(invalid(format!("daemon: {d} is listed twice")));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Daemons {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

/// A secret from the configuration: its `Debug` never shows it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One `[routes.NAME]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, starting with `/`, matched on segment boundaries and removed before forwarding.
    pub prefix: String,
    /// Upstream base URL (`http` or `https`, optionally with a base path).
    pub upstream: String,
    /// The pool leases are taken on (the fallback when `credential_pools` has no match).
    #[serde(default)]
    pub pool: Option<String>,
    /// The API dialect.
    pub dialect: Dialect,
    /// Default priority (0..=9).
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Lease TTL (default: the pool's).
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// How long a request may wait for its slot.
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// Cut the stream when the lease is lost.
    #[serde(default)]
    pub strict: bool,
    /// Behaviour while the daemon is unreachable.
    #[serde(default)]
    pub on_daemon_down: DaemonDown,
    /// Pools `x-slotd-pool` may name.
    #[serde(default)]
    pub allowed_pools: Vec<String>,
    /// Credential fingerprint -> pool.
    #[serde(default)]
    pub credential_pools: BTreeMap<String, String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(Config::DEFAULT_LISTEN)
}
fn default_daemon() -> Daemons {
    Daemons(vec![Config::DEFAULT_DAEMON.to_owned()])
}
fn default_holder() -> String {
    Config::DEFAULT_HOLDER.to_owned()
}
fn default_probe() -> Duration {
    Config::DEFAULT_PROBE_INTERVAL
}
fn default_max_connections() -> usize {
    Config::DEFAULT_MAX_CONNECTIONS
}
fn default_max_header_bytes() -> usize {
    Config::DEFAULT_MAX_HEADER_BYTES
}
fn default_max_body_bytes() -> u64 {
    Config::DEFAULT_MAX_BODY_BYTES
}
fn default_shutdown_timeout() -> Duration {
    Config::DEFAULT_SHUTDOWN_TIMEOUT
}
fn default_connect_timeout() -> Duration {
    Config::DEFAULT_CONNECT_TIMEOUT
}
fn default_priority() -> u32 {
    RouteConfig::DEFAULT_PRIORITY
}
fn default_max_wait() -> Duration {
    RouteConfig::DEFAULT_MAX_WAIT
}

impl Config {
    /// Default listen address.
    pub const DEFAULT_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 8089);
    /// Default daemon address.
    pub const DEFAULT_DAEMON: &str = "http://127.0.0.1:50051";
    /// Default holder name.
    pub const DEFAULT_HOLDER: &str = "slotd-proxy";
    /// Default daemon probe interval.
    pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
    /// Shortest probe interval accepted.
    pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(10);
    /// Longest probe interval accepted.
    pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(60);
    /// Default limit on concurrent client connections.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
    /// Largest `max_connections` accepted.
    pub const MAX_MAX_CONNECTIONS: usize = 65_536;
    /// Default limit on a request's header block.
    pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
    /// Smallest `max_header_bytes` accepted (hyper's HTTP/1 read buffer cannot be smaller).
    pub const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;
    /// Largest `max_header_bytes` accepted.
    pub const MAX_MAX_HEADER_BYTES: usize = 1024 * 1024;
    /// Default limit on a request body.
    pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
    /// Largest `max_body_bytes` accepted.
    pub const MAX_MAX_BODY_BYTES: u64 = 1024 * 1024 * 1024;
    /// Default grace for in-flight streams on shutdown.
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    /// Longest shutdown grace accepted.
    pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3600);
    /// Default upstream connect timeout.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Longest upstream connect timeout accepted.
    pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(300);
    /// Shortest fingerprint key accepted, in bytes.
    pub const MIN_FINGERPRINT_KEY: usize = 16;
    /// Most routes accepted.
    pub const MAX_ROUTES: usize = 256;
    /// Longest holder name (the daemon's limit).
    pub const MAX_HOLDER_LEN: usize = 256;

    /// Parses and validates a TOML document.
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(s)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The embedded default.
    pub fn default_config() -> Self {
        Self::from_toml_str(DEFAULT_TOML).expect("the embedded default configuration is valid")
    }

    /// Checks every bound and cross-reference.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.daemon.validate(self.daemon_ca_file.is_some())?;
        if self.holder.is_empty() || self.holder.len() > Self::MAX_HOLDER_LEN {
            return Err(invalid(format!("holder: 1..={} bytes", Self::MAX_HOLDER_LEN)));
        }
        within(
            "daemon_probe_interval",
            self.daemon_probe_interval,
            Self::MIN_PROBE_INTERVAL,
            Self::MAX_PROBE_INTERVAL,
        )?;
        if !(1..=Self::MAX_MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err(invalid(format!("max_connections: 1..={}", Self::MAX_MAX_CONNECTIONS)));
        }
        if !(Self::MIN_MAX_HEADER_BYTES..=Self::MAX_MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            return Err(invalid(format!(
                "max_header_bytes: {}..={}",
                Self::MIN_MAX_HEADER_BYTES,
                Self::MAX_MAX_HEADER_BYTES
            )));
        }
        if !(1..=Self::MAX_MAX_BODY_BYTES).contains(&self.max_body_bytes) {
            return Err(invalid(format!("max_body_bytes: 1..={}", Self::MAX_MAX_BODY_BYTES)));
        }
        within("shutdown_timeout", self.shutdown_timeout, Duration::ZERO, Self::MAX_SHUTDOWN_TIMEOUT)?;
        within(
            "upstream_connect_timeout",
            self.upstream_connect_timeout,
            Duration::from_millis(1),
            Self::MAX_CONNECT_TIMEOUT,
        )?;
        if self.fingerprint_key.is_some() && self.fingerprint_key_file.is_some() {
            return Err(invalid("set fingerprint_key or fingerprint_key_file, not both"));
        }
        if let Some(k) = &self.fingerprint_key
            && k.0.len() < Self::MIN_FINGERPRINT_KEY
        {
            return Err(invalid(format!("fingerprint_key: at least {} bytes", Self::MIN_FINGERPRINT_KEY)));
        }
        if self.routes.is_empty() || self.routes.len() > Self::MAX_ROUTES {
            return Err(invalid(format!("routes: 1..={} routes", Self::MAX_ROUTES)));
        }
        let mut prefixes = std::collections::HashSet::new();
        for (name, r) in &self.routes {
            r.validate(name).map_err(|e| invalid(format!("routes.{name}: {e}")))?;
            if !prefixes.insert(r.normalized_prefix()) {
                return Err(invalid(format!("routes.{name}: prefix {} is used twice", r.prefix)));
            }
            if !r.credential_pools.is_empty()
                && self.fingerprint_key.is_none()
                && self.fingerprint_key_file.is_none()
            {
                return Err(invalid(format!(
                    "routes.{name}: credential_pools needs fingerprint_key or fingerprint_key_file"
                )));
            }
        }
        Ok(())
    }

    /// The fingerprint key, read from the file when it is configured there.
    pub fn load_fingerprint_key(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        if let Some(k) = &self.fingerprint_key {
            return Ok(Some(k.0.as_bytes().to_vec()));
        }
        let Some(path) = &self.fingerprint_key_file else { return Ok(None) };
        let raw = read(path)?;
        let key = raw.trim_ascii_end().to_vec();
        if key.len() < Self::MIN_FINGERPRINT_KEY {
            return Err(invalid(format!(
                "fingerprint_key_file {}: at least {} bytes",
                path.display(),
                Self::MIN_FINGERPRINT_KEY
            )));
        }
        Ok(Some(key))
    }

    /// Reads every file the configuration names (for `--check` and startup).
    pub fn load_files(&self) -> Result<Files, ConfigError> {
        let token = match &self.daemon_token_file {
            Some(p) => Some(
                String::from_utf8(read(p)?)
                    .map_err(|_| invalid(format!("daemon_token_file {}: not UTF-8", p.display())))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let daemon_ca = self.daemon_ca_file.as_ref().map(read).transpose()?;
        let extra_ca = self.extra_ca_file.as_ref().map(read).transpose()?;
        Ok(Files { token, daemon_ca, extra_ca, fingerprint_key: self.load_fingerprint_key()? })
    }
}

/// The contents of the files a configuration names.
#[derive(Default)]
pub struct Files {
    /// The daemon's agent token.
    pub token: Option<String>,
    /// PEM CA for the daemon.
    pub daemon_ca: Option<Vec<u8>>,
    /// Extra PEM CA for upstreams.
    pub extra_ca: Option<Vec<u8>>,
    /// The fingerprint key.
    pub fingerprint_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("fingerprint_key", &self.fingerprint_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|error| ConfigError::Read { path: path.clone(), error })
}

fn within(what: &str, d: Duration, min: Duration, max: Duration) -> Result<(), ConfigError> {
    if d < min || d > max {
        return Err(invalid(format!("{what}: {d:?} is outside {min:?}..={max:?}")));
    }
    Ok(())
}

impl RouteConfig {
    /// Default priority of a request without `x-slotd-priority`.
    pub const DEFAULT_PRIORITY: u32 = 5;
    /// Highest priority.
    pub const MAX_PRIORITY: u32 = 9;
    /// Default `max_wait`: waiting is the default.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(600);
    /// Longest `max_wait` accepted.
    pub const MAX_MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
    /// Shortest TTL accepted.
    pub const MIN_TTL: Duration = Duration::from_millis(10);
    /// Longest TTL accepted.
    pub const MAX_TTL: Duration = Duration::from_secs(3600);
    /// Most credential mappings per route.
    pub const MAX_CREDENTIAL_POOLS: usize = 1024;
    /// Longest pool name (as the daemon).
    pub const MAX_POOL_NAME: usize = 128;

    /// The prefix without a trailing `/` (`/` itself stays `/`... as the empty prefix).
    pub fn normalized_prefix(&self) -> String {
        self.prefix.trim_end_matches('/').to_owned()
    }

    fn validate(&self, _name: &str) -> Result<(), String> {
        if !self.prefix.starts_with('/') || self.prefix.contains(['?', '#', ' ']) {
            return Err(format!("prefix {:?} must start with / and be a plain path", self.prefix));
        }
        let uri: Uri = self.upstream.parse().map_err(|e| format!("upstream {:?}: {e}", self.upstream))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("upstream {:?}: scheme must be http or https", self.upstream)),
        }
        if uri.authority().is_none() || uri.query().is_some() {
            return Err(format!("upstream {:?}: needs a host and no query", self.upstream));
        }
        if self.pool.is_none() && self.credential_pools.is_empty() {
            return Err("set pool, or credential_pools".into());
        }
        for p in self.pool.iter().chain(&self.allowed_pools).chain(self.credential_pools.values()) {
            if p.is_empty() || p.len() > Self::MAX_POOL_NAME {
                return Err(format!("pool name {p:?}: 1..={} bytes", Self::MAX_POOL_NAME));
            }
        }
        if self.priority > Self::MAX_PRIORITY {
            return Err(format!("priority: 0..={}", Self::MAX_PRIORITY));
        }
        if let Some(ttl) = self.ttl {
            within("ttl", ttl, Self::MIN_TTL, Self::MAX_TTL).map_err(|e| e.to_string())?;
        }
        within("max_wait", self.max_wait, Duration::ZERO, Self::MAX_MAX_WAIT).map_err(|e| e.to_string())?;
        if self.credential_pools.len() > Self::MAX_CREDENTIAL_POOLS {
            return Err(format!("credential_pools: at most {}", Self::MAX_CREDENTIAL_POOLS));
        }
        for fp in self.credential_pools.keys() {
            if !crate::fingerprint::is_fingerprint(fp) {
                return Err(format!(
                    "credential_pools: {fp:?} is not a fingerprint (fp_ and 32 hex digits, from --fingerprint)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let cfg = Config::default_config();
        assert_eq!(cfg.listen, "127.0.0.1:8089".parse().unwrap());
        assert_eq!(cfg.routes["anthropic"].upstream, "https://api.anthropic.com");
        assert_eq!(cfg.routes["openai"].pool.as_deref(), Some("openai"));
        assert_eq!(cfg.routes["openai"].on_daemon_down, DaemonDown::FailClosed);
    }

    /// Every slotd-proxy TOML example in the README (fenced as `toml slotd-proxy`) is valid.
    #[test]
    fn readme_examples_parse() {
        let readme = include_str!("../../README.md");
        let blocks: Vec<&str> = readme
            .split("```toml slotd-proxy\n")
            .skip(1)
            .map(|b| b.split("```").next().unwrap_or(""))
            .collect();
        assert!(!blocks.is_empty(), "the README shows a slotd-proxy config");
        for b in blocks {
            if let Err(e) = Config::from_toml_str(b) {
                panic!("README slotd-proxy example is invalid: {e}\n{b}");
            }
        }
    }

    #[test]
    fn daemon_is_one_address_or_a_bounded_list() {
        let with = |daemon: &str| DEFAULT_TOML.replacen("daemon = \"http://127.0.0.1:50051\"", daemon, 1);
        let one = Config::from_toml_str(&with("daemon = \"127.0.0.1:7070\"")).expect("one address");
        assert_eq!(one.daemon.0, ["127.0.0.1:7070"]);
        let three = "daemon = [\"http://10.0.0.1:50051\", \"10.0.0.2:50051\", \"10.0.0.3:50051\"]";
        let cfg = Config::from_toml_str(&with(three)).expect("a list");
        assert_eq!(cfg.daemon.0.len(), 3);
        assert_eq!(cfg.daemon.to_string(), "http://10.0.0.1:50051, 10.0.0.2:50051, 10.0.0.3:50051");
        let many = (0..=Daemons::MAX).map(|i| format!("\"10.0.0.{i}:1\"")).collect::<Vec<_>>().join(",");
        for bad in [
            "daemon = []".to_owned(),
            format!("daemon = [{many}]"),
            "daemon = [\"10.0.0.1:1\", \"\"]".to_owned(),
            "daemon = [\"10.0.0.1:1\", \"10.0.0.1:1\"]".to_owned(),
            "daemon = [\"10.0.0.1\"]".to_owned(),
            "daemon = 7".to_owned(),
        ] {
            assert!(Config::from_toml_str(&with(&bad)).is_err(), "accepted {bad}");
        }
        assert_eq!(Daemons::parse_list("a:1, b:2").0, ["a:1", "b:2"]);
    }

    #[test]
    fn bad_values_are_refused() {
        let base = DEFAULT_TOML.to_owned();
        for (from, to) in [
            ("max_connections = 1024", "max_connections = 0"),
            ("max_header_bytes = 65536", "max_header_bytes = 10"),
            ("daemon_probe_interval = \"1s\"", "daemon_probe_interval = \"1ms\""),
            ("prefix = \"/openai\"", "prefix = \"/anthropic\""),
            ("prefix = \"/openai\"", "prefix = \"openai\""),
            ("upstream = \"https://api.openai.com\"", "upstream = \"ftp://x\""),
            ("priority = 5\n# ttl", "priority = 10\n# ttl"),
            ("max_wait = \"10m\"\nstrict", "max_wait = \"1000d\"\nstrict"),
            ("allowed_pools = []\n# Per", "bogus = 1\n# Per"),
        ] {
            let toml = base.replacen(from, to, 1);
            assert!(toml != base, "{from} not found");
            assert!(Config::from_toml_str(&toml).is_err(), "accepted {to}");
        }
        let toml = format!(
            "{base}\n[routes.openai.credential_pools]\n\"fp_00000000000000000000000000000000\" = \"x\"\n"
        );
        assert!(Config::from_toml_str(&toml).unwrap_err().to_string().contains("fingerprint_key"));
    }
}
