"""Pure parsers of provider HTTP answers: outcome, Retry-After, rate-limit headers, usage.

No I/O and no httpx import: they take a status, a header mapping and body bytes, so the transports
and the tests share them, and they work with any HTTP library.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

from slotd._types import MAX_DURATION, LimitKind, Outcome, ProviderLimit, Usage

#: An error body is read up to this many bytes to tell OpenAI's ``insufficient_quota`` 429 apart.
MAX_ERROR_BODY = 64 * 1024
#: The usage scanner keeps at most this much of a JSON body, and of one SSE line (bytes).
MAX_SCAN_BYTES = 1024 * 1024


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The provider's retry hint in seconds: ``retry-after-ms``, else ``Retry-After`` as seconds or as
    an HTTP date (relative to ``now``, a UNIX time; a date in the past means zero). Bounded by
    :data:`MAX_DURATION`; an unreadable value means none."""
    ms = _get(headers, "retry-after-ms")
    if ms is not None:
        v = _float(ms)
        if v is not None:
            return min(v / 1000.0, MAX_DURATION)
    value = _get(headers, "retry-after")
    if value is None:
        return None
    v = _float(value)
    if v is not None:
        return min(v, MAX_DURATION)
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if at is None:
        return None
    now = time.time() if now is None else now
    return min(max(0.0, at.timestamp() - now), MAX_DURATION)


def classify(
    status: int, headers: Mapping[str, str], error_body: bytes | None = None, now: float | None = None
) -> tuple[Outcome, float | None]:
    """The outcome class of a provider answer, and its retry hint (seconds) when the class has one:
    429 rate limited (or quota exhausted when the body says ``insufficient_quota``), 503/529
    overloaded, 402 quota exhausted, other 5xx error, anything else ok."""
    if status == 429:
        outcome = Outcome.RATE_LIMITED
        if error_body and _error_type(error_body) == "insufficient_quota":
            outcome = Outcome.QUOTA_EXHAUSTED
        return outcome, retry_after(headers, now)
    if status in (503, 529):
        return Outcome.OVERLOADED, retry_after(headers, now)
    if status == 402:
        return Outcome.QUOTA_EXHAUSTED, retry_after(headers, now)
    if 500 <= status <= 599:
        return Outcome.ERROR, None
    return Outcome.OK, None


_ANTHROPIC = {
    "requests": LimitKind.REQUESTS,
    "tokens": LimitKind.TOKENS,
    "input-tokens": LimitKind.INPUT_TOKENS,
    "output-tokens": LimitKind.OUTPUT_TOKENS,
}
_OPENAI = {"requests": LimitKind.REQUESTS, "tokens": LimitKind.TOKENS}


def provider_limits(headers: Mapping[str, str], now: float | None = None) -> list[ProviderLimit]:
    """The limits announced by Anthropic's ``anthropic-ratelimit-*`` and OpenAI's ``x-ratelimit-*``
    headers (at most one per kind; a malformed header is skipped)."""
    now = time.time() if now is None else now
    out: list[ProviderLimit] = []
    for name, kind in _ANTHROPIC.items():
        limit = _int(_get(headers, f"anthropic-ratelimit-{name}-limit"))
        remaining = _int(_get(headers, f"anthropic-ratelimit-{name}-remaining"))
        if limit is None or remaining is None:
            continue
        reset = _get(headers, f"anthropic-ratelimit-{name}-reset")
        reset_in = None
        if reset:
            try:
                at = datetime.fromisoformat(reset.strip().replace("Z", "+00:00"))
                reset_in = min(max(0.0, at.timestamp() - now), MAX_DURATION)
            except ValueError:
                reset_in = None
        out.append(ProviderLimit(kind, limit, remaining, reset_in))
    seen = {p.kind for p in out}
    for name, kind in _OPENAI.items():
        if kind in seen:
            continue
        limit = _int(_get(headers, f"x-ratelimit-limit-{name}"))
        remaining = _int(_get(headers, f"x-ratelimit-remaining-{name}"))
        if limit is None or remaining is None:
            continue
        out.append(
            ProviderLimit(kind, limit, remaining, _go_duration(_get(headers, f"x-ratelimit-reset-{name}")))
        )
    return out


class UsageScanner:
    """Reads token usage from a response body fed incrementally: one JSON document (Anthropic
    ``usage``, OpenAI ``usage``) or a server-sent event stream (Anthropic ``message_start`` /
    ``message_delta``, OpenAI's final chunk). Memory is bounded by :data:`MAX_SCAN_BYTES`."""

    def __init__(self, content_type: str | None) -> None:
        ct = (content_type or "").lower()
        self._sse = "text/event-stream" in ct
        self._json = "json" in ct
        self._buf = bytearray()
        self._overflow = False
        self._usage: dict[str, int] = {}

    def feed(self, chunk: bytes) -> None:
        if not (self._sse or self._json) or self._overflow:
            return
        self._buf += chunk
        if self._sse:
            *lines, rest = self._buf.split(b"\n")
            self._buf = bytearray(rest)
            for line in lines:
                self._line(bytes(line))
        if len(self._buf) > MAX_SCAN_BYTES:
            self._overflow = True
            self._buf = bytearray()

    def finish(self) -> Usage | None:
        if self._sse and self._buf:
            self._line(bytes(self._buf))
        elif self._json and self._buf:
            try:
                doc = json.loads(self._buf)
            except (ValueError, UnicodeDecodeError):
                doc = None
            if isinstance(doc, dict):
                self._take(doc.get("usage"))
        self._buf = bytearray()
        if not self._usage:
            return None
        return Usage(
            input_tokens=self._usage.get("input", 0),
            output_tokens=self._usage.get("output", 0),
            cache_read_tokens=self._usage.get("cache_read", 0),
            cache_creation_tokens=self._usage.get("cache_creation", 0),
        )

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if not payload.startswith(b"{"):
            return
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(doc, dict):
            return
        message = doc.get("message")
        if isinstance(message, dict):  # Anthropic message_start
            self._take(message.get("usage"))
        self._take(doc.get("usage"))  # Anthropic message_delta, OpenAI's last chunk

    def _take(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        fields = {
            "input": usage.get("input_tokens", usage.get("prompt_tokens")),
            "output": usage.get("output_tokens", usage.get("completion_tokens")),
            "cache_read": usage.get("cache_read_input_tokens"),
            "cache_creation": usage.get("cache_creation_input_tokens"),
        }
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            fields["cache_read"] = details["cached_tokens"]
            if isinstance(fields["input"], int):  # OpenAI counts cached tokens in prompt_tokens
                fields["input"] = max(0, fields["input"] - details["cached_tokens"])
        for k, v in fields.items():
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                self._usage[k] = v  # later events carry the running totals


def _get(headers: Mapping[str, str], name: str) -> str | None:
    v = headers.get(name)
    if v is None and hasattr(headers, "items") and not _case_insensitive(headers):
        low = name.lower()
        for k, val in headers.items():
            if k.lower() == low:
                return val
    return v


def _case_insensitive(headers: Mapping[str, str]) -> bool:
    return type(headers).__name__ == "Headers"  # httpx.Headers looks up case-insensitively


def _float(value: str) -> float | None:
    try:
        v = float(value.strip())
    except ValueError:
        return None
    return v if math.isfinite(v) and v >= 0 else None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        v = int(value.strip())
    except ValueError:
        return None
    return v if 0 <= v < 2**64 else None


_GO_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")


def _go_duration(value: str | None) -> float | None:
    """OpenAI's reset headers: ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``."""
    if not value:
        return None
    value = value.strip()
    parts = _GO_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return min(sum(float(n) * _GO_UNIT[u] for n, u in parts), MAX_DURATION)


def _error_type(body: bytes) -> str | None:
    try:
        doc = json.loads(body[:MAX_ERROR_BODY])
    except (ValueError, UnicodeDecodeError):
        return None
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        for key in ("type", "code"):
            if err.get(key) == "insufficient_quota":
                return "insufficient_quota"
        t = err.get("type")
        return t if isinstance(t, str) else None
    return None
