//! The `x-slotd-*` request headers (agent identity and order), and the headers a proxy must not forward.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, header};

use crate::config::RouteConfig;

/// Priority, 0..=9.
pub const PRIORITY: &str = "x-slotd-priority";
/// When the agent's turn started: RFC 3339 or unix milliseconds.
pub const STARTED_AT: &str = "x-slotd-started-at";
/// The holder name shown in slotd's Status.
pub const HOLDER: &str = "x-slotd-holder";
/// The pool, where the route allows it.
pub const POOL: &str = "x-slotd-pool";
/// The call's input tokens, for the pool's rate budgets (with [`MAX_OUTPUT_TOKENS`]).
pub const INPUT_TOKENS: &str = "x-slotd-input-tokens";
/// The call's `max_tokens`, for the pool's rate budgets (with [`INPUT_TOKENS`]).
pub const MAX_OUTPUT_TOKENS: &str = "x-slotd-max-output-tokens";
/// Largest token figure accepted in a header (the daemon's bound).
pub const MAX_TOKENS: u64 = 1 << 40;
/// On a local refusal: why (`queue_full`, `max_wait`, `paused`, `daemon_down`, ...).
pub const REASON: &str = "x-slotd-reason";
/// Every header with this prefix is removed before forwarding.
pub const PREFIX: &str = "x-slotd-";
/// Longest `x-slotd-holder` accepted (the daemon's limit).
pub const MAX_HOLDER_LEN: usize = 256;

/// What the agent asked for through the headers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AgentHeaders {
    /// `x-slotd-priority`.
    pub priority: Option<u32>,
    /// `x-slotd-started-at`.
    pub started_at: Option<SystemTime>,
    /// `x-slotd-holder`.
    pub holder: Option<String>,
    /// `x-slotd-pool`.
    pub pool: Option<String>,
    /// `x-slotd-input-tokens` and `x-slotd-max-output-tokens`: the estimate reserved from the pool's
    /// rate budgets (unset: the pool's default estimate).
    pub tokens: Option<(u64, u64)>,
}

/// A header the proxy cannot use; answered with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{header}: {why}")]
pub struct BadHeader {
    /// The header's name.
    pub header: &'static str,
    /// What is wrong (never the value itself).
    pub why: String,
}

fn bad(header: &'static str, why: impl Into<String>) -> BadHeader {
    BadHeader { header, why: why.into() }
}

fn text<'a>(h: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, BadHeader> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| bad(name, "not visible ASCII")),
    }
}

impl AgentHeaders {
    /// Parses the `x-slotd-*` headers against the route's rules, then removes every `x-slotd-*` header.
    pub fn take(h: &mut HeaderMap, route: &RouteConfig) -> Result<AgentHeaders, BadHeader> {
        let parsed = Self::parse(h, route);
        let names: Vec<HeaderName> = h.keys().filter(|k| k.as_str().starts_with(PREFIX)).cloned().collect();
        for n in names {
            h.remove(n);
        }
        parsed
    }

    fn parse(h: &HeaderMap, route: &RouteConfig) -> Result<AgentHeaders, BadHeader> {
        let priority = match text(h, PRIORITY)? {
            None => None,
            Some(s) => match s.parse::<u32>() {
                Ok(p) if p <= RouteConfig::MAX_PRIORITY => Some(p),
                _ => return Err(bad(PRIORITY, format!("an integer 0..={}", RouteConfig::MAX_PRIORITY))),
            },
        };
        let started_at = match text(h, STARTED_AT)? {
            None => None,
            Some(s) => {
                Some(parse_started_at(s).ok_or_else(|| bad(STARTED_AT, "RFC 3339 or unix milliseconds"))?)
            }
        };
        let holder = match text(h, HOLDER)? {
            None => None,
            Some(s) if s.is_empty() || s.len() > MAX_HOLDER_LEN => {
                return Err(bad(HOLDER, format!("1..={MAX_HOLDER_LEN} bytes")));
            }
            Some(s) => Some(s.to_owned()),
        };
        let pool = match text(h, POOL)? {
            None => None,
            Some(s) if route.allowed_pools.iter().any(|p| p == s) => Some(s.to_owned()),
            Some(_) => return Err(bad(POOL, "this route does not allow that pool")),
        };
        let count = |name: &'static str| -> Result<Option<u64>, BadHeader> {
            match text(h, name)? {
                None => Ok(None),
                Some(s) => match s.parse::<u64>() {
                    Ok(n) if n <= MAX_TOKENS => Ok(Some(n)),
                    _ => Err(bad(name, format!("an integer 0..={MAX_TOKENS}"))),
                },
            }
        };
        let tokens = match (count(INPUT_TOKENS)?, count(MAX_OUTPUT_TOKENS)?) {
            (None, None) => None,
            (Some(input), Some(output)) => Some((input, output)),
            (Some(_), None) => return Err(bad(MAX_OUTPUT_TOKENS, "required with x-slotd-input-tokens")),
            (None, Some(_)) => return Err(bad(INPUT_TOKENS, "required with x-slotd-max-output-tokens")),
        };
        Ok(AgentHeaders { priority, started_at, holder, pool, tokens })
    }
}

/// RFC 3339 (`2026-01-02T03:04:05Z`, offsets allowed) or unix milliseconds.
pub fn parse_started_at(s: &str) -> Option<SystemTime> {
    if let Ok(ms) = s.parse::<u64>() {
        return SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms));
    }
    humantime::parse_rfc3339_weak(s).ok().or_else(|| parse_rfc3339_offset(s))
}

/// RFC 3339 with a numeric offset (`+02:00`), which humantime does not take.
fn parse_rfc3339_offset(s: &str) -> Option<SystemTime> {
    let (base, sign, off) = match s.len().checked_sub(6).and_then(|i| s.get(i..).map(|o| (i, o))) {
        Some((i, o)) if (o.starts_with('+') || o.starts_with('-')) && o.as_bytes()[3] == b':' => {
            (&s[..i], if o.starts_with('+') { 1i64 } else { -1 }, &o[1..])
        }
        _ => return None,
    };
    let hh: i64 = off.get(..2)?.parse().ok()?;
    let mm: i64 = off.get(3..)?.parse().ok()?;
    if hh > 23 || mm > 59 {
        return None;
    }
    let local = humantime::parse_rfc3339_weak(base).ok()?;
    let shift = Duration::from_secs(u64::try_from(hh * 3600 + mm * 60).ok()?);
    // `+02:00` means the local time is ahead of UTC: subtract.
    if sign > 0 { local.checked_sub(shift) } else { local.checked_add(shift) }
}

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1), those named by `Connection` included.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn route(allowed: &[&str]) -> RouteConfig {
        let mut r = Config::default_config().routes["anthropic"].clone();
        r.allowed_pools = allowed.iter().map(|s| s.to_string()).collect();
        r
    }

    #[test]
    fn parses_and_strips() {
        let mut h = HeaderMap::new();
        h.insert(PRIORITY, "7".parse().unwrap());
        h.insert(STARTED_AT, "1700000000123".parse().unwrap());
        h.insert(HOLDER, "agent-1".parse().unwrap());
        h.insert(POOL, "batch".parse().unwrap());
        h.insert("x-slotd-other", "1".parse().unwrap());
        h.insert("x-api-key", "k".parse().unwrap());
        let a = AgentHeaders::take(&mut h, &route(&["batch"])).unwrap();
        assert_eq!(a.priority, Some(7));
        assert_eq!(a.started_at, Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)));
        assert_eq!(a.holder.as_deref(), Some("agent-1"));
        assert_eq!(a.pool.as_deref(), Some("batch"));
        assert_eq!(a.tokens, None);
        assert_eq!(h.len(), 1, "only x-api-key stays: {h:?}");
    }

    #[test]
    fn token_estimate_headers_come_in_pairs() {
        let mut h = HeaderMap::new();
        h.insert(INPUT_TOKENS, "1200".parse().unwrap());
        h.insert(MAX_OUTPUT_TOKENS, "4096".parse().unwrap());
        let a = AgentHeaders::take(&mut h, &route(&[])).unwrap();
        assert_eq!(a.tokens, Some((1200, 4096)));
        assert!(h.is_empty());
        for (pairs, refused) in [
            (vec![(INPUT_TOKENS, "5")], MAX_OUTPUT_TOKENS),
            (vec![(MAX_OUTPUT_TOKENS, "5")], INPUT_TOKENS),
            (vec![(INPUT_TOKENS, "-1"), (MAX_OUTPUT_TOKENS, "5")], INPUT_TOKENS),
            (vec![(INPUT_TOKENS, "1"), (MAX_OUTPUT_TOKENS, "1099511627777")], MAX_OUTPUT_TOKENS),
        ] {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(k, v.parse().unwrap());
            }
            assert_eq!(AgentHeaders::take(&mut h, &route(&[])).unwrap_err().header, refused);
            assert!(h.is_empty());
        }
    }

    #[test]
    fn refuses_bad_values_and_still_strips() {
        for (name, value) in
            [(PRIORITY, "10"), (PRIORITY, "high"), (STARTED_AT, "yesterday"), (POOL, "other")]
        {
            let mut h = HeaderMap::new();
            h.insert(name, value.parse().unwrap());
            let e = AgentHeaders::take(&mut h, &route(&["batch"])).unwrap_err();
            assert_eq!(e.header, name);
            assert!(h.is_empty());
        }
    }

    #[test]
    fn started_at_forms() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600); // 2026-01-01T00:00:00Z
        assert_eq!(parse_started_at("2026-01-01T00:00:00Z"), Some(t));
        assert_eq!(parse_started_at("2026-01-01T02:00:00+02:00"), Some(t));
        assert_eq!(parse_started_at("2025-12-31T23:30:00-00:30"), Some(t));
        assert_eq!(parse_started_at("1767225600000"), Some(t));
        assert_eq!(parse_started_at("2026-13-01T00:00:00Z"), None);
    }

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-foo".parse().unwrap());
        h.insert("x-foo", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }
}
