"""Plain value types shared by the client, the transports and the tests: outcomes, usage, limits."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from google.protobuf import duration_pb2, timestamp_pb2

from slotd.v1 import slotd_pb2 as pb

#: Longest duration the client accepts from its caller (a TTL, a max_wait, a retry_after): 30 days.
#: The daemon applies its own, smaller bounds; this only keeps extreme values off the wire.
MAX_DURATION = 30 * 24 * 3600.0


class Outcome(enum.IntEnum):
    """How the provider call covered by a lease ended (the proto's ``Outcome``)."""

    OK = pb.OUTCOME_OK
    ERROR = pb.OUTCOME_ERROR
    CANCELLED = pb.OUTCOME_CANCELLED
    RATE_LIMITED = pb.OUTCOME_RATE_LIMITED
    OVERLOADED = pb.OUTCOME_OVERLOADED
    QUOTA_EXHAUSTED = pb.OUTCOME_QUOTA_EXHAUSTED


class LimitKind(enum.IntEnum):
    """Which provider limit a rate-limit header describes (the proto's ``LimitKind``)."""

    REQUESTS = pb.LIMIT_KIND_REQUESTS
    TOKENS = pb.LIMIT_KIND_TOKENS
    INPUT_TOKENS = pb.LIMIT_KIND_INPUT_TOKENS
    OUTPUT_TOKENS = pb.LIMIT_KIND_OUTPUT_TOKENS


@dataclass(frozen=True)
class Usage:
    """Tokens a provider call used, as the provider reported them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0

    def to_proto(self) -> pb.Usage:
        return pb.Usage(
            input_tokens=_u64(self.input_tokens),
            output_tokens=_u64(self.output_tokens),
            cache_read_tokens=_u64(self.cache_read_tokens),
            cache_creation_tokens=_u64(self.cache_creation_tokens),
        )


@dataclass(frozen=True)
class ProviderLimit:
    """One limit from a provider's rate-limit headers: ``remaining`` of ``limit``, full again in
    ``reset_in`` seconds."""

    kind: LimitKind
    limit: int
    remaining: int
    reset_in: float | None = None

    def to_proto(self) -> pb.ProviderLimit:
        msg = pb.ProviderLimit(
            kind=cast(Any, int(self.kind)), limit=_u64(self.limit), remaining=_u64(self.remaining)
        )
        if self.reset_in is not None:
            msg.reset_in.CopyFrom(duration(min(self.reset_in, MAX_RESET_IN), "reset_in"))
        return msg


#: Longest ``reset_in`` the daemon accepts (providers' windows are a minute to a day); longer is capped.
MAX_RESET_IN = 24 * 3600.0

#: At most this many provider limits ride on one release (the daemon's bound).
MAX_PROVIDER_LIMITS = 8


@dataclass
class Report:
    """What a release tells the daemon: the outcome, the provider's Retry-After, usage and limits."""

    outcome: Outcome = Outcome.OK
    retry_after: float | None = None
    usage: Usage | None = None
    limits: list[ProviderLimit] = field(default_factory=list)


@dataclass(frozen=True)
class Pause:
    """A pool's pause, as the daemon pushed it."""

    until: datetime
    reason: str


def _u64(n: int) -> int:
    return max(0, min(int(n), 2**64 - 1))


def seconds(value: float | None, what: str, *, allow_zero: bool = True) -> float | None:
    """Checks a caller's duration: finite, not negative (or zero, unless allowed), at most
    :data:`MAX_DURATION`."""
    if value is None:
        return None
    v = float(value)
    if math.isnan(v) or v < 0 or (v == 0 and not allow_zero) or v > MAX_DURATION:
        bound = "positive" if not allow_zero else "non-negative"
        raise ValueError(f"{what} must be {bound} and at most {MAX_DURATION:g}s, got {value!r}")
    return v


def duration(value: float, what: str) -> duration_pb2.Duration:
    """A checked number of seconds as a protobuf Duration."""
    v = seconds(value, what)
    assert v is not None
    whole = int(v)
    return duration_pb2.Duration(seconds=whole, nanos=min(int(round((v - whole) * 1e9)), 999_999_999))


def from_duration(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def timestamp(value: datetime | float) -> timestamp_pb2.Timestamp:
    """A datetime (naive means UTC) or a UNIX time in seconds as a protobuf Timestamp."""
    t = timestamp_pb2.Timestamp()
    if isinstance(value, datetime):
        t.FromDatetime(value)
    else:
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"started_at must be a datetime or a UNIX time, got {value!r}")
        whole = int(v)
        t.seconds, t.nanos = whole, min(int((v - whole) * 1e9), 999_999_999)
    return t


def from_timestamp(t: timestamp_pb2.Timestamp) -> float:
    return t.seconds + t.nanos / 1e9
