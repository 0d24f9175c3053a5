//! Unit tests of the provider-answer parsers, on recorded Anthropic and OpenAI shapes.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use super::*;

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, v.parse().unwrap());
    }
    h
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap()
}

#[test]
fn retry_after_forms() {
    let now = now();
    assert_eq!(retry_after(&headers(&[("retry-after", "7")]), now), Some(secs(7)));
    assert_eq!(retry_after(&headers(&[("retry-after", "1.5")]), now), Some(Duration::from_millis(1500)));
    assert_eq!(
        retry_after(&headers(&[("retry-after-ms", "250"), ("retry-after", "7")]), now),
        Some(Duration::from_millis(250))
    );
    let date = httpdate::fmt_http_date(now + secs(30));
    assert_eq!(retry_after(&headers(&[("retry-after", &date)]), now), Some(secs(30)));
    let past = httpdate::fmt_http_date(now - secs(30));
    assert_eq!(retry_after(&headers(&[("retry-after", &past)]), now), Some(Duration::ZERO));
    assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
    assert_eq!(retry_after(&headers(&[("retry-after", "-3")]), now), None);
    assert_eq!(retry_after(&headers(&[("retry-after", "1e400")]), now), None);
    assert_eq!(retry_after(&headers(&[("retry-after", "1e30")]), now), Some(Duration::MAX));
    assert_eq!(retry_after(&HeaderMap::new(), now), None);
}

#[test]
fn classes_by_status() {
    let h = headers(&[("retry-after", "3")]);
    let n = now();
    assert_eq!(classify(status(429), &h, None, n), Outcome::RateLimited { retry_after: Some(secs(3)) });
    assert_eq!(classify(status(529), &h, None, n), Outcome::Overloaded { retry_after: Some(secs(3)) });
    assert_eq!(classify(status(503), &HeaderMap::new(), None, n), Outcome::Overloaded { retry_after: None });
    assert_eq!(
        classify(status(402), &HeaderMap::new(), None, n),
        Outcome::QuotaExhausted { retry_after: None }
    );
    assert_eq!(classify(status(500), &h, None, n), Outcome::Error);
    assert_eq!(classify(status(502), &h, None, n), Outcome::Error);
    assert_eq!(classify(status(200), &h, None, n), Outcome::Ok);
    assert_eq!(classify(status(400), &h, None, n), Outcome::Ok);
    assert_eq!(classify(status(401), &h, None, n), Outcome::Ok);
}

#[test]
fn classes_by_error_body() {
    let n = now();
    let none = HeaderMap::new();
    // OpenAI sends insufficient_quota as a 429: retrying never helps, so it is not a rate limit.
    let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    assert_eq!(classify(status(429), &none, Some(quota), n), Outcome::QuotaExhausted { retry_after: None });
    let overloaded = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    assert_eq!(classify(status(500), &none, Some(overloaded), n), Outcome::Overloaded { retry_after: None });
    let billing = br#"{"type":"error","error":{"type":"billing_error","message":"credit balance too low"}}"#;
    assert_eq!(classify(status(400), &none, Some(billing), n), Outcome::QuotaExhausted { retry_after: None });
    let rate = br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
    assert_eq!(classify(status(429), &none, Some(rate), n), Outcome::RateLimited { retry_after: None });
    // Bodies that are not JSON, or truncated, fall back to the status.
    assert_eq!(classify(status(529), &none, Some(b"<html>"), n), Outcome::Overloaded { retry_after: None });
    assert_eq!(classify(status(500), &none, Some(&overloaded[..20]), n), Outcome::Error);
    // A success body is never read for an error type.
    assert_eq!(classify(status(200), &none, Some(quota), n), Outcome::Ok);
}

#[test]
fn anthropic_rate_limit_headers() {
    let n = now();
    let reset = humantime::format_rfc3339_seconds(n + secs(20)).to_string();
    let h = headers(&[
        ("anthropic-ratelimit-requests-limit", "50"),
        ("anthropic-ratelimit-requests-remaining", "49"),
        ("anthropic-ratelimit-requests-reset", &reset),
        ("anthropic-ratelimit-input-tokens-limit", "30000"),
        ("anthropic-ratelimit-input-tokens-remaining", "90000"),
        ("anthropic-ratelimit-output-tokens-limit", "8000"),
        ("anthropic-ratelimit-output-tokens-remaining", "7000"),
        ("anthropic-ratelimit-output-tokens-reset", "not a date"),
        ("anthropic-ratelimit-tokens-limit", "oops"),
        ("anthropic-ratelimit-tokens-remaining", "1"),
    ]);
    assert_eq!(
        provider_limits(&h, n),
        vec![
            ProviderLimit { kind: LimitKind::Requests, limit: 50, remaining: 49, reset_in: secs(20) },
            // remaining is capped at the limit; a missing reset reads as zero.
            ProviderLimit {
                kind: LimitKind::InputTokens,
                limit: 30000,
                remaining: 30000,
                reset_in: Duration::ZERO
            },
            ProviderLimit {
                kind: LimitKind::OutputTokens,
                limit: 8000,
                remaining: 7000,
                reset_in: Duration::ZERO
            },
        ]
    );
}

#[test]
fn openai_rate_limit_headers() {
    let h = headers(&[
        ("x-ratelimit-limit-requests", "500"),
        ("x-ratelimit-remaining-requests", "499"),
        ("x-ratelimit-reset-requests", "120ms"),
        ("x-ratelimit-limit-tokens", "30000"),
        ("x-ratelimit-remaining-tokens", "29000"),
        ("x-ratelimit-reset-tokens", "6m0.5s"),
    ]);
    assert_eq!(
        provider_limits(&h, now()),
        vec![
            ProviderLimit {
                kind: LimitKind::Requests,
                limit: 500,
                remaining: 499,
                reset_in: Duration::from_millis(120)
            },
            ProviderLimit {
                kind: LimitKind::Tokens,
                limit: 30000,
                remaining: 29000,
                reset_in: Duration::from_millis(360_500)
            },
        ]
    );
    assert!(provider_limits(&HeaderMap::new(), now()).is_empty());
}

#[test]
fn go_durations() {
    assert_eq!(go_duration("1s"), Some(secs(1)));
    assert_eq!(go_duration("1h2m3s"), Some(secs(3723)));
    assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
    assert_eq!(go_duration("999h"), Some(ProviderLimit::MAX_RESET_IN));
    for bad in ["", "s", "1x", "1.2.3s", "-1s", "1"] {
        assert_eq!(go_duration(bad), None, "{bad:?}");
    }
}

fn scan(content_type: &str, chunks: &[&[u8]]) -> Option<Usage> {
    let mut s = UsageScanner::new(Some(content_type));
    for c in chunks {
        s.feed(c);
    }
    s.finish()
}

#[test]
fn anthropic_json_usage() {
    let body = br#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":12,"cache_creation_input_tokens":3,"cache_read_input_tokens":100,"output_tokens":7}}"#;
    let (a, b) = body.split_at(40);
    assert_eq!(
        scan("application/json", &[a, b]),
        Some(Usage { input_tokens: 12, output_tokens: 7, cache_read_tokens: 100, cache_creation_tokens: 3 })
    );
}

#[test]
fn anthropic_sse_usage_split_anywhere() {
    let stream = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    )
    .as_bytes();
    let want =
        Some(Usage { input_tokens: 25, output_tokens: 15, cache_read_tokens: 5, cache_creation_tokens: 0 });
    for split in [1, 7, 50, 120, stream.len() - 3] {
        let (a, b) = stream.split_at(split);
        assert_eq!(scan("text/event-stream; charset=utf-8", &[a, b]), want, "split at {split}");
    }
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(scan("text/event-stream", &bytes), want);
}

#[test]
fn openai_chat_usage_json_and_stream() {
    let body = br#"{"id":"c","object":"chat.completion","usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120,"prompt_tokens_details":{"cached_tokens":64}}}"#;
    let want =
        Some(Usage { input_tokens: 36, output_tokens: 20, cache_read_tokens: 64, cache_creation_tokens: 0 });
    assert_eq!(scan("application/json", &[body]), want);
    let stream = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":20,\"prompt_tokens_details\":{\"cached_tokens\":64}}}\n\n",
        "data: [DONE]\n\n",
    );
    assert_eq!(scan("text/event-stream", &[stream.as_bytes()]), want);
}

#[test]
fn openai_responses_usage() {
    let stream = concat!(
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":50,\"input_tokens_details\":{\"cached_tokens\":10},\"output_tokens\":9}}}\n\n",
    );
    assert_eq!(
        scan("text/event-stream", &[stream.as_bytes()]),
        Some(Usage { input_tokens: 40, output_tokens: 9, cache_read_tokens: 10, cache_creation_tokens: 0 })
    );
}

#[test]
fn no_usage_and_bounded_memory() {
    assert_eq!(scan("application/json", &[b"{\"ok\":true}"]), None);
    assert_eq!(scan("application/json", &[b"not json"]), None);
    assert_eq!(scan("image/png", &[br#"{"usage":{"input_tokens":1}}"#]), None);
    assert_eq!(scan("text/event-stream", &[b"data: [DONE]\n\n"]), None);
    // An oversized JSON body is dropped, not buffered.
    let mut s = UsageScanner::new(Some("application/json"));
    let big = vec![b' '; UsageScanner::MAX_JSON / 2 + 1];
    s.feed(&big);
    s.feed(&big);
    s.feed(br#"{"usage":{"input_tokens":1}}"#);
    assert!(s.buf.capacity() <= UsageScanner::MAX_JSON);
    assert_eq!(s.finish(), None);
    // An oversized SSE line is skipped; the lines after it still count.
    let mut s = UsageScanner::new(Some("text/event-stream"));
    s.feed(b"data: ");
    s.feed(&vec![b'x'; UsageScanner::MAX_LINE + 10]);
    assert!(s.buf.len() <= UsageScanner::MAX_LINE);
    s.feed(b"\ndata: {\"usage\":{\"input_tokens\":4,\"output_tokens\":2}}\n");
    assert_eq!(s.finish(), Some(Usage { input_tokens: 4, output_tokens: 2, ..Usage::default() }));
}
