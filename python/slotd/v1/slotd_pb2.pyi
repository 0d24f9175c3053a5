import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_OK: _ClassVar[Outcome]
    OUTCOME_ERROR: _ClassVar[Outcome]
    OUTCOME_CANCELLED: _ClassVar[Outcome]
    OUTCOME_RATE_LIMITED: _ClassVar[Outcome]
    OUTCOME_OVERLOADED: _ClassVar[Outcome]
    OUTCOME_QUOTA_EXHAUSTED: _ClassVar[Outcome]

class LimitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIMIT_KIND_UNSPECIFIED: _ClassVar[LimitKind]
    LIMIT_KIND_REQUESTS: _ClassVar[LimitKind]
    LIMIT_KIND_TOKENS: _ClassVar[LimitKind]
    LIMIT_KIND_INPUT_TOKENS: _ClassVar[LimitKind]
    LIMIT_KIND_OUTPUT_TOKENS: _ClassVar[LimitKind]

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]

class Gate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GATE_UNSPECIFIED: _ClassVar[Gate]
    GATE_SLOTS: _ClassVar[Gate]
    GATE_PAUSE: _ClassVar[Gate]
    GATE_COOLDOWN: _ClassVar[Gate]
    GATE_BREAKER: _ClassVar[Gate]
    GATE_REQUESTS_BUDGET: _ClassVar[Gate]
    GATE_INPUT_TOKENS_BUDGET: _ClassVar[Gate]
    GATE_OUTPUT_TOKENS_BUDGET: _ClassVar[Gate]
    GATE_LEARNING: _ClassVar[Gate]
    GATE_DRAINING: _ClassVar[Gate]

class ExpiryReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPIRY_REASON_UNSPECIFIED: _ClassVar[ExpiryReason]
    EXPIRY_REASON_TTL: _ClassVar[ExpiryReason]
    EXPIRY_REASON_REVOKED: _ClassVar[ExpiryReason]
    EXPIRY_REASON_POOL_REMOVED: _ClassVar[ExpiryReason]
    EXPIRY_REASON_SHUTDOWN: _ClassVar[ExpiryReason]
    EXPIRY_REASON_RESUMED_ELSEWHERE: _ClassVar[ExpiryReason]

class BudgetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_KIND_UNSPECIFIED: _ClassVar[BudgetKind]
    BUDGET_KIND_REQUESTS: _ClassVar[BudgetKind]
    BUDGET_KIND_INPUT_TOKENS: _ClassVar[BudgetKind]
    BUDGET_KIND_OUTPUT_TOKENS: _ClassVar[BudgetKind]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_OK: Outcome
OUTCOME_ERROR: Outcome
OUTCOME_CANCELLED: Outcome
OUTCOME_RATE_LIMITED: Outcome
OUTCOME_OVERLOADED: Outcome
OUTCOME_QUOTA_EXHAUSTED: Outcome
LIMIT_KIND_UNSPECIFIED: LimitKind
LIMIT_KIND_REQUESTS: LimitKind
LIMIT_KIND_TOKENS: LimitKind
LIMIT_KIND_INPUT_TOKENS: LimitKind
LIMIT_KIND_OUTPUT_TOKENS: LimitKind
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState
GATE_UNSPECIFIED: Gate
GATE_SLOTS: Gate
GATE_PAUSE: Gate
GATE_COOLDOWN: Gate
GATE_BREAKER: Gate
GATE_REQUESTS_BUDGET: Gate
GATE_INPUT_TOKENS_BUDGET: Gate
GATE_OUTPUT_TOKENS_BUDGET: Gate
GATE_LEARNING: Gate
GATE_DRAINING: Gate
EXPIRY_REASON_UNSPECIFIED: ExpiryReason
EXPIRY_REASON_TTL: ExpiryReason
EXPIRY_REASON_REVOKED: ExpiryReason
EXPIRY_REASON_POOL_REMOVED: ExpiryReason
EXPIRY_REASON_SHUTDOWN: ExpiryReason
EXPIRY_REASON_RESUMED_ELSEWHERE: ExpiryReason
BUDGET_KIND_UNSPECIFIED: BudgetKind
BUDGET_KIND_REQUESTS: BudgetKind
BUDGET_KIND_INPUT_TOKENS: BudgetKind
BUDGET_KIND_OUTPUT_TOKENS: BudgetKind

class ClientMessage(_message.Message):
    __slots__ = ("request", "cancel", "heartbeat", "release", "resume")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    request: LeaseRequest
    cancel: CancelRequest
    heartbeat: Heartbeat
    release: ReleaseLease
    resume: ResumeLease
    def __init__(self, request: _Optional[_Union[LeaseRequest, _Mapping]] = ..., cancel: _Optional[_Union[CancelRequest, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., release: _Optional[_Union[ReleaseLease, _Mapping]] = ..., resume: _Optional[_Union[ResumeLease, _Mapping]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("request_id", "pool", "priority", "started_at", "ttl", "max_wait", "holder", "any_pools", "estimate")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    ANY_POOLS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    pool: str
    priority: int
    started_at: _timestamp_pb2.Timestamp
    ttl: _duration_pb2.Duration
    max_wait: _duration_pb2.Duration
    holder: str
    any_pools: _containers.RepeatedScalarFieldContainer[str]
    estimate: TokenEstimate
    def __init__(self, request_id: _Optional[str] = ..., pool: _Optional[str] = ..., priority: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., holder: _Optional[str] = ..., any_pools: _Optional[_Iterable[str]] = ..., estimate: _Optional[_Union[TokenEstimate, _Mapping]] = ...) -> None: ...

class TokenEstimate(_message.Message):
    __slots__ = ("input_tokens", "max_output_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    max_output_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("lease_ids",)
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_CREATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_creation_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cache_read_tokens: _Optional[int] = ..., cache_creation_tokens: _Optional[int] = ...) -> None: ...

class ProviderLimit(_message.Message):
    __slots__ = ("kind", "limit", "remaining", "reset_in")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_IN_FIELD_NUMBER: _ClassVar[int]
    kind: LimitKind
    limit: int
    remaining: int
    reset_in: _duration_pb2.Duration
    def __init__(self, kind: _Optional[_Union[LimitKind, str]] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_in: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ReleaseLease(_message.Message):
    __slots__ = ("lease_id", "outcome", "retry_after", "usage", "provider_limits")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_LIMITS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    outcome: Outcome
    retry_after: _duration_pb2.Duration
    usage: Usage
    provider_limits: _containers.RepeatedCompositeFieldContainer[ProviderLimit]
    def __init__(self, lease_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., provider_limits: _Optional[_Iterable[_Union[ProviderLimit, _Mapping]]] = ...) -> None: ...

class ResumeLease(_message.Message):
    __slots__ = ("lease_id", "fencing_token", "pool", "priority", "ttl", "holder", "credential")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    fencing_token: int
    pool: str
    priority: int
    ttl: _duration_pb2.Duration
    holder: str
    credential: str
    def __init__(self, lease_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., pool: _Optional[str] = ..., priority: _Optional[int] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., holder: _Optional[str] = ..., credential: _Optional[str] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("queued", "granted", "rejected", "paused", "resumed", "expired", "released", "lease_error", "lease_resumed", "cancelled", "heartbeat_ack", "breaker")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    LEASE_ERROR_FIELD_NUMBER: _ClassVar[int]
    LEASE_RESUMED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    granted: Granted
    rejected: Rejected
    paused: Paused
    resumed: Resumed
    expired: Expired
    released: Released
    lease_error: LeaseError
    lease_resumed: LeaseResumed
    cancelled: Cancelled
    heartbeat_ack: HeartbeatAck
    breaker: BreakerChanged
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., granted: _Optional[_Union[Granted, _Mapping]] = ..., rejected: _Optional[_Union[Rejected, _Mapping]] = ..., paused: _Optional[_Union[Paused, _Mapping]] = ..., resumed: _Optional[_Union[Resumed, _Mapping]] = ..., expired: _Optional[_Union[Expired, _Mapping]] = ..., released: _Optional[_Union[Released, _Mapping]] = ..., lease_error: _Optional[_Union[LeaseError, _Mapping]] = ..., lease_resumed: _Optional[_Union[LeaseResumed, _Mapping]] = ..., cancelled: _Optional[_Union[Cancelled, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., breaker: _Optional[_Union[BreakerChanged, _Mapping]] = ...) -> None: ...

class BreakerChanged(_message.Message):
    __slots__ = ("pool", "status", "reason")
    POOL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pool: str
    status: BreakerStatus
    reason: str
    def __init__(self, pool: _Optional[str] = ..., status: _Optional[_Union[BreakerStatus, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class BreakerStatus(_message.Message):
    __slots__ = ("state", "open_until", "probe_lease_id", "epoch", "opens", "failures", "outcomes", "forced", "enabled")
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPEN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    PROBE_LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OPENS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    state: BreakerState
    open_until: _timestamp_pb2.Timestamp
    probe_lease_id: str
    epoch: int
    opens: int
    failures: int
    outcomes: int
    forced: bool
    enabled: bool
    def __init__(self, state: _Optional[_Union[BreakerState, str]] = ..., open_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., probe_lease_id: _Optional[str] = ..., epoch: _Optional[int] = ..., opens: _Optional[int] = ..., failures: _Optional[int] = ..., outcomes: _Optional[int] = ..., forced: _Optional[bool] = ..., enabled: _Optional[bool] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("request_id", "position", "blocked", "gate", "gate_until", "gate_pool")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    GATE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    GATE_POOL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    position: int
    blocked: bool
    gate: Gate
    gate_until: _timestamp_pb2.Timestamp
    gate_pool: str
    def __init__(self, request_id: _Optional[str] = ..., position: _Optional[int] = ..., blocked: _Optional[bool] = ..., gate: _Optional[_Union[Gate, str]] = ..., gate_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gate_pool: _Optional[str] = ...) -> None: ...

class Granted(_message.Message):
    __slots__ = ("request_id", "lease_id", "fencing_token", "ttl", "expires_at", "pool", "resume_credential", "probe")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    RESUME_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    lease_id: str
    fencing_token: int
    ttl: _duration_pb2.Duration
    expires_at: _timestamp_pb2.Timestamp
    pool: str
    resume_credential: str
    probe: bool
    def __init__(self, request_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pool: _Optional[str] = ..., resume_credential: _Optional[str] = ..., probe: _Optional[bool] = ...) -> None: ...

class Rejected(_message.Message):
    __slots__ = ("request_id", "code", "message", "retry_after")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    retry_after: _duration_pb2.Duration
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Paused(_message.Message):
    __slots__ = ("pool", "until", "reason", "remaining")
    POOL_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    pool: str
    until: _timestamp_pb2.Timestamp
    reason: str
    remaining: _duration_pb2.Duration
    def __init__(self, pool: _Optional[str] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., remaining: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Resumed(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: _Optional[str] = ...) -> None: ...

class Expired(_message.Message):
    __slots__ = ("lease_id", "reason", "message")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: ExpiryReason
    message: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[_Union[ExpiryReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Released(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class LeaseError(_message.Message):
    __slots__ = ("lease_id", "code", "message")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    code: int
    message: str
    def __init__(self, lease_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LeaseResumed(_message.Message):
    __slots__ = ("lease_id", "fencing_token", "expires_at")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    fencing_token: int
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, lease_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Cancelled(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("renewed",)
    RENEWED_FIELD_NUMBER: _ClassVar[int]
    renewed: int
    def __init__(self, renewed: _Optional[int] = ...) -> None: ...

class ReportRateLimitRequest(_message.Message):
    __slots__ = ("pool", "retry_after", "reason", "outcome")
    POOL_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    pool: str
    retry_after: _duration_pb2.Duration
    reason: str
    outcome: Outcome
    def __init__(self, pool: _Optional[str] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., reason: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ...) -> None: ...

class ReportRateLimitResponse(_message.Message):
    __slots__ = ("paused_until", "effective_limit")
    PAUSED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    paused_until: _timestamp_pb2.Timestamp
    effective_limit: int
    def __init__(self, paused_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., effective_limit: _Optional[int] = ...) -> None: ...

class ReportUsageRequest(_message.Message):
    __slots__ = ("pool", "usage", "provider_limits")
    POOL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_LIMITS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    usage: Usage
    provider_limits: _containers.RepeatedCompositeFieldContainer[ProviderLimit]
    def __init__(self, pool: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., provider_limits: _Optional[_Iterable[_Union[ProviderLimit, _Mapping]]] = ...) -> None: ...

class ReportUsageResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: BudgetStatus
    def __init__(self, budget: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("pools", "leases", "learning", "shutting_down")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    LEARNING_FIELD_NUMBER: _ClassVar[int]
    SHUTTING_DOWN_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseStatus]
    learning: bool
    shutting_down: bool
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ..., leases: _Optional[_Iterable[_Union[LeaseStatus, _Mapping]]] = ..., learning: _Optional[bool] = ..., shutting_down: _Optional[bool] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("name", "parent", "limit", "effective_limit", "in_flight", "queued", "paused_until", "pause_reason", "cooling", "next_fencing_token", "max_agent_retry_after", "blocked_by", "held", "held_until", "breaker", "budget", "gate", "gate_until", "gate_pool", "learning_until", "learning_expected", "learning_back")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    PAUSE_REASON_FIELD_NUMBER: _ClassVar[int]
    COOLING_FIELD_NUMBER: _ClassVar[int]
    NEXT_FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_AGENT_RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_BY_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    HELD_UNTIL_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    GATE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    GATE_POOL_FIELD_NUMBER: _ClassVar[int]
    LEARNING_UNTIL_FIELD_NUMBER: _ClassVar[int]
    LEARNING_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    LEARNING_BACK_FIELD_NUMBER: _ClassVar[int]
    name: str
    parent: str
    limit: int
    effective_limit: int
    in_flight: int
    queued: int
    paused_until: _timestamp_pb2.Timestamp
    pause_reason: str
    cooling: int
    next_fencing_token: int
    max_agent_retry_after: _duration_pb2.Duration
    blocked_by: PauseInherited
    held: int
    held_until: _timestamp_pb2.Timestamp
    breaker: BreakerStatus
    budget: BudgetStatus
    gate: Gate
    gate_until: _timestamp_pb2.Timestamp
    gate_pool: str
    learning_until: _timestamp_pb2.Timestamp
    learning_expected: int
    learning_back: int
    def __init__(self, name: _Optional[str] = ..., parent: _Optional[str] = ..., limit: _Optional[int] = ..., effective_limit: _Optional[int] = ..., in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., paused_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pause_reason: _Optional[str] = ..., cooling: _Optional[int] = ..., next_fencing_token: _Optional[int] = ..., max_agent_retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., blocked_by: _Optional[_Union[PauseInherited, _Mapping]] = ..., held: _Optional[int] = ..., held_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., breaker: _Optional[_Union[BreakerStatus, _Mapping]] = ..., budget: _Optional[_Union[BudgetStatus, _Mapping]] = ..., gate: _Optional[_Union[Gate, str]] = ..., gate_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gate_pool: _Optional[str] = ..., learning_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., learning_expected: _Optional[int] = ..., learning_back: _Optional[int] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("window", "shadow", "reservations", "levels", "provider", "counters")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    window: _duration_pb2.Duration
    shadow: bool
    reservations: int
    levels: _containers.RepeatedCompositeFieldContainer[BudgetLevelStatus]
    provider: _containers.RepeatedCompositeFieldContainer[BudgetProviderView]
    counters: BudgetCounters
    def __init__(self, window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., shadow: _Optional[bool] = ..., reservations: _Optional[int] = ..., levels: _Optional[_Iterable[_Union[BudgetLevelStatus, _Mapping]]] = ..., provider: _Optional[_Iterable[_Union[BudgetProviderView, _Mapping]]] = ..., counters: _Optional[_Union[BudgetCounters, _Mapping]] = ...) -> None: ...

class BudgetLevelStatus(_message.Message):
    __slots__ = ("kind", "refill", "burst", "level", "debt", "reserved", "full_at")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REFILL_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    DEBT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    FULL_AT_FIELD_NUMBER: _ClassVar[int]
    kind: BudgetKind
    refill: int
    burst: int
    level: int
    debt: int
    reserved: int
    full_at: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[_Union[BudgetKind, str]] = ..., refill: _Optional[int] = ..., burst: _Optional[int] = ..., level: _Optional[int] = ..., debt: _Optional[int] = ..., reserved: _Optional[int] = ..., full_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BudgetProviderView(_message.Message):
    __slots__ = ("limit", "age")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    limit: ProviderLimit
    age: _duration_pb2.Duration
    def __init__(self, limit: _Optional[_Union[ProviderLimit, _Mapping]] = ..., age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class BudgetCounters(_message.Message):
    __slots__ = ("reserved_requests", "reserved_input_tokens", "reserved_output_tokens", "settled_requests", "settled_input_tokens", "settled_output_tokens", "estimate_error_input_tokens", "estimate_error_output_tokens", "settled_with_usage", "shadow_waits", "shadow_wait")
    RESERVED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SETTLED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SETTLED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SETTLED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_ERROR_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_ERROR_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SETTLED_WITH_USAGE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_WAITS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_WAIT_FIELD_NUMBER: _ClassVar[int]
    reserved_requests: int
    reserved_input_tokens: int
    reserved_output_tokens: int
    settled_requests: int
    settled_input_tokens: int
    settled_output_tokens: int
    estimate_error_input_tokens: int
    estimate_error_output_tokens: int
    settled_with_usage: int
    shadow_waits: int
    shadow_wait: _duration_pb2.Duration
    def __init__(self, reserved_requests: _Optional[int] = ..., reserved_input_tokens: _Optional[int] = ..., reserved_output_tokens: _Optional[int] = ..., settled_requests: _Optional[int] = ..., settled_input_tokens: _Optional[int] = ..., settled_output_tokens: _Optional[int] = ..., estimate_error_input_tokens: _Optional[int] = ..., estimate_error_output_tokens: _Optional[int] = ..., settled_with_usage: _Optional[int] = ..., shadow_waits: _Optional[int] = ..., shadow_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class PauseInherited(_message.Message):
    __slots__ = ("pool", "until", "reason")
    POOL_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pool: str
    until: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, pool: _Optional[str] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaseStatus(_message.Message):
    __slots__ = ("lease_id", "pool", "holder", "priority", "age", "expires_in", "fencing_token")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    pool: str
    holder: str
    priority: int
    age: _duration_pb2.Duration
    expires_in: _duration_pb2.Duration
    fencing_token: int
    def __init__(self, lease_id: _Optional[str] = ..., pool: _Optional[str] = ..., holder: _Optional[str] = ..., priority: _Optional[int] = ..., age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., expires_in: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., fencing_token: _Optional[int] = ...) -> None: ...
