//! Reading an LLM provider's HTTP answer: its outcome class, Retry-After, rate-limit headers and
//! token usage (Anthropic and OpenAI shapes). Pure functions, no I/O; the tower layer and the proxy
//! build a release [`Report`] from them.
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx, 3xx, and 4xx other than those below | [`Outcome::Ok`] (the provider is fine) |
//! | 429 | [`Outcome::RateLimited`], or [`Outcome::QuotaExhausted`] when the body's error type is `insufficient_quota` |
//! | 529, 503, or an `overloaded_error` body | [`Outcome::Overloaded`] |
//! | 402, or an `insufficient_quota` / `billing_error` body | [`Outcome::QuotaExhausted`] |
//! | other 5xx | [`Outcome::Error`] |
//!
//! Retry-After comes from `retry-after-ms` (OpenAI), else `Retry-After` in seconds or as an HTTP date.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use serde_json::Value;

use crate::{LimitKind, Outcome, ProviderLimit, Usage};

/// How many bytes of an error body [`classify`] needs at most: the error `type` sits at its start.
pub const ERROR_BODY_PEEK: usize = 16 * 1024;

/// The outcome class of a provider answer. `error_body` is the start of the body of a non-2xx
/// answer, when the caller has it (at most [`ERROR_BODY_PEEK`] bytes are read).
pub fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    error_body: Option<&[u8]>,
    now: SystemTime,
) -> Outcome {
    let retry_after = || retry_after(headers, now);
    let kind = error_body.filter(|_| !status.is_success()).and_then(error_kind);
    match (status.as_u16(), kind) {
        (_, Some(ErrorKind::Quota)) | (402, _) => Outcome::QuotaExhausted { retry_after: retry_after() },
        (_, Some(ErrorKind::Overloaded)) | (503 | 529, _) => {
            Outcome::Overloaded { retry_after: retry_after() }
        }
        (429, _) | (_, Some(ErrorKind::RateLimit)) => Outcome::RateLimited { retry_after: retry_after() },
        (500..=599, _) => Outcome::Error,
        _ => Outcome::Ok,
    }
}

/// Reads a provider's retry hint: `retry-after-ms` (OpenAI), else `Retry-After` as seconds or as an
/// HTTP date (relative to `now`; a date in the past means zero).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return secs_f64(ms / 1000.0);
    }
    let value = header(headers, http::header::RETRY_AFTER.as_str())?;
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return secs_f64(secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The limits announced in a provider's rate-limit headers, each at most once per kind:
/// - Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
///   (reset as an RFC 3339 instant);
/// - OpenAI: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (reset as `1s`, `6m0s`, `20ms`).
///
/// A limit whose `limit` or `remaining` is missing or malformed is skipped; `remaining` is capped at
/// `limit`; a missing or past reset reads as zero. Costs a few header lookups when none are present.
pub fn provider_limits(headers: &HeaderMap, now: SystemTime) -> Vec<ProviderLimit> {
    const ANTHROPIC: [(&str, LimitKind); 4] = [
        ("requests", LimitKind::Requests),
        ("tokens", LimitKind::Tokens),
        ("input-tokens", LimitKind::InputTokens),
        ("output-tokens", LimitKind::OutputTokens),
    ];
    const OPENAI: [(&str, LimitKind); 2] = [("requests", LimitKind::Requests), ("tokens", LimitKind::Tokens)];
    let mut out = Vec::new();
    for (name, kind) in ANTHROPIC {
        let get = |part: &str| header(headers, &format!("anthropic-ratelimit-{name}-{part}"));
        let reset = get("reset")
            .and_then(|r| humantime::parse_rfc3339_weak(r).ok())
            .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO));
        push_limit(&mut out, kind, get("limit"), get("remaining"), reset);
    }
    for (name, kind) in OPENAI {
        if out.iter().any(|l| l.kind == kind) {
            continue;
        }
        let get = |part: &str| header(headers, &format!("x-ratelimit-{part}-{name}"));
        push_limit(&mut out, kind, get("limit"), get("remaining"), get("reset").and_then(go_duration));
    }
    out
}

fn push_limit(
    out: &mut Vec<ProviderLimit>,
    kind: LimitKind,
    limit: Option<&str>,
    remaining: Option<&str>,
    reset_in: Option<Duration>,
) {
    let (Some(limit), Some(remaining)) =
        (limit.and_then(|v| v.parse::<u64>().ok()), remaining.and_then(|v| v.parse::<u64>().ok()))
    else {
        return;
    };
    let reset_in = reset_in.unwrap_or(Duration::ZERO).min(ProviderLimit::MAX_RESET_IN);
    out.push(ProviderLimit { kind, limit, remaining: remaining.min(limit), reset_in });
}

/// Parses a Go-style duration as OpenAI sends it in `x-ratelimit-reset-*`: `1s`, `6m0s`, `20ms`,
/// `1h2m3.5s`. Capped at [`ProviderLimit::MAX_RESET_IN`].
pub fn go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += value * scale;
    }
    secs_f64(total).map(|d| d.min(ProviderLimit::MAX_RESET_IN))
}

/// A provider error's kind, from its JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    RateLimit,
    Overloaded,
    Quota,
}

/// Reads `error.type` / `error.code` of an Anthropic (`{"type":"error","error":{"type":...}}`) or
/// OpenAI (`{"error":{"type":...,"code":...}}`) error body.
fn error_kind(body: &[u8]) -> Option<ErrorKind> {
    let body = &body[..body.len().min(ERROR_BODY_PEEK)];
    let v: Value = serde_json::from_slice(body).ok()?;
    let error = v.get("error")?;
    let names = [error.get("code"), error.get("type")];
    names.into_iter().flatten().filter_map(Value::as_str).find_map(|name| match name {
        "insufficient_quota" | "billing_error" | "billing_hard_limit_reached" => Some(ErrorKind::Quota),
        "overloaded_error" | "server_overloaded" => Some(ErrorKind::Overloaded),
        "rate_limit_error" | "rate_limit_exceeded" => Some(ErrorKind::RateLimit),
        _ => None,
    })
}

/// Collects the token usage of a response body fed to it frame by frame: a JSON body (Anthropic
/// Messages, OpenAI Chat Completions or Responses) or a server-sent event stream (Anthropic's
/// `message_start` / `message_delta`, OpenAI's final chunk with `usage` or `response.completed`).
///
/// Memory is bounded: a JSON body larger than [`UsageScanner::MAX_JSON`] and SSE lines longer than
/// [`UsageScanner::MAX_LINE`] are skipped, not buffered. SSE lines that do not mention `usage` are
/// not parsed.
#[derive(Debug)]
pub struct UsageScanner {
    mode: Mode,
    buf: Vec<u8>,
    /// The current SSE line grew past [`UsageScanner::MAX_LINE`]: skip to its end.
    skipping: bool,
    usage: Partial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Json,
    Sse,
    Off,
}

/// Usage fields as they arrive; a later event overrides what it names.
#[derive(Debug, Default, Clone, Copy)]
struct Partial {
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
}

impl UsageScanner {
    /// Largest JSON body scanned for usage.
    pub const MAX_JSON: usize = 4 * 1024 * 1024;
    /// Longest SSE line scanned for usage.
    pub const MAX_LINE: usize = 1024 * 1024;

    /// A scanner for a body of this `content-type` (`text/event-stream` for SSE, JSON otherwise; any
    /// other type is not scanned).
    pub fn new(content_type: Option<&str>) -> Self {
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        let mode = if ct.starts_with("text/event-stream") {
            Mode::Sse
        } else if ct.is_empty() || ct.contains("json") {
            Mode::Json
        } else {
            Mode::Off
        };
        UsageScanner { mode, buf: Vec::new(), skipping: false, usage: Partial::default() }
    }

    /// A scanner for a response with these headers.
    pub fn for_headers(headers: &HeaderMap) -> Self {
        Self::new(headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()))
    }

    /// Feeds the next piece of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self.mode {
            Mode::Off => {}
            Mode::Json => {
                if self.buf.len() + chunk.len() > Self::MAX_JSON {
                    self.mode = Mode::Off;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            Mode::Sse => {
                let mut rest = chunk;
                while let Some(i) = rest.iter().position(|b| *b == b'\n') {
                    if !self.skipping && self.buf.len() + i <= Self::MAX_LINE {
                        self.buf.extend_from_slice(&rest[..i]);
                        let line = std::mem::take(&mut self.buf);
                        self.sse_line(&line);
                        self.buf = line;
                    }
                    self.buf.clear();
                    self.skipping = false;
                    rest = &rest[i + 1..];
                }
                if self.skipping || self.buf.len() + rest.len() > Self::MAX_LINE {
                    self.skipping = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(rest);
                }
            }
        }
    }

    /// The usage seen in the whole body, if any.
    pub fn finish(mut self) -> Option<Usage> {
        match self.mode {
            Mode::Json => {
                if let Ok(v) = serde_json::from_slice::<Value>(&self.buf) {
                    self.event(&v);
                }
            }
            Mode::Sse if !self.skipping && !self.buf.is_empty() => {
                let line = std::mem::take(&mut self.buf);
                self.sse_line(&line);
            }
            _ => {}
        }
        let p = self.usage;
        (p.input.is_some() || p.output.is_some()).then(|| Usage {
            input_tokens: p.input.unwrap_or(0),
            output_tokens: p.output.unwrap_or(0),
            cache_read_tokens: p.cache_read.unwrap_or(0),
            cache_creation_tokens: p.cache_creation.unwrap_or(0),
        })
    }

    fn sse_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else { return };
        if !data.windows(7).any(|w| w == b"\"usage\"") {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) {
            self.event(&v);
        }
    }

    /// Takes the usage of one JSON document: a whole response, or one stream event.
    fn event(&mut self, v: &Value) {
        let usage = v
            .get("usage")
            .or_else(|| v.pointer("/message/usage"))
            .or_else(|| v.pointer("/response/usage"))
            .filter(|u| u.is_object());
        if let Some(u) = usage {
            self.merge(u);
        }
    }

    fn merge(&mut self, u: &Value) {
        let n = |path: &str| u.pointer(path).and_then(Value::as_u64);
        let p = &mut self.usage;
        if let Some(prompt) = n("/prompt_tokens") {
            // OpenAI Chat Completions: prompt_tokens includes the cached part.
            let cached = n("/prompt_tokens_details/cached_tokens").unwrap_or(0).min(prompt);
            p.input = Some(prompt - cached);
            p.cache_read = Some(cached);
            p.output = n("/completion_tokens").or(p.output);
            return;
        }
        if let Some(details) = n("/input_tokens_details/cached_tokens") {
            // OpenAI Responses: input_tokens includes the cached part.
            let input = n("/input_tokens").unwrap_or(0);
            let cached = details.min(input);
            p.input = Some(input - cached);
            p.cache_read = Some(cached);
            p.output = n("/output_tokens").or(p.output);
            return;
        }
        // Anthropic: input_tokens excludes cache reads and writes; output_tokens is cumulative.
        p.input = n("/input_tokens").or(p.input);
        p.output = n("/output_tokens").or(p.output);
        p.cache_read = n("/cache_read_input_tokens").or(p.cache_read);
        p.cache_creation = n("/cache_creation_input_tokens").or(p.cache_creation);
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// A non-negative, finite number of seconds as a duration (`None` otherwise); saturates at
/// [`Duration::MAX`].
fn secs_f64(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0).then(|| Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

#[cfg(test)]
mod tests;
