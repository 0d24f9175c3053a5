import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from slotd.v1 import slotd_pb2 as _slotd_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PoolSpec(_message.Message):
    __slots__ = ("name", "max_concurrent", "parent", "max_queue_depth", "on_overflow", "cooldown", "default_ttl", "max_ttl", "max_wait", "default_retry_after", "adaptive", "headroom_recovery", "max_agent_retry_after")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ON_OVERFLOW_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TTL_FIELD_NUMBER: _ClassVar[int]
    MAX_TTL_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_RECOVERY_FIELD_NUMBER: _ClassVar[int]
    MAX_AGENT_RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_concurrent: int
    parent: str
    max_queue_depth: int
    on_overflow: str
    cooldown: _duration_pb2.Duration
    default_ttl: _duration_pb2.Duration
    max_ttl: _duration_pb2.Duration
    max_wait: _duration_pb2.Duration
    default_retry_after: _duration_pb2.Duration
    adaptive: bool
    headroom_recovery: _duration_pb2.Duration
    max_agent_retry_after: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., max_concurrent: _Optional[int] = ..., parent: _Optional[str] = ..., max_queue_depth: _Optional[int] = ..., on_overflow: _Optional[str] = ..., cooldown: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., default_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., default_retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., adaptive: _Optional[bool] = ..., headroom_recovery: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_agent_retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class UpsertPoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: PoolSpec
    def __init__(self, pool: _Optional[_Union[PoolSpec, _Mapping]] = ...) -> None: ...

class UpsertPoolResponse(_message.Message):
    __slots__ = ("pool", "created")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    pool: _slotd_pb2.PoolStatus
    created: bool
    def __init__(self, pool: _Optional[_Union[_slotd_pb2.PoolStatus, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class DeletePoolRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeletePoolResponse(_message.Message):
    __slots__ = ("rejected_waiters", "expired_leases")
    REJECTED_WAITERS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_LEASES_FIELD_NUMBER: _ClassVar[int]
    rejected_waiters: int
    expired_leases: int
    def __init__(self, rejected_waiters: _Optional[int] = ..., expired_leases: _Optional[int] = ...) -> None: ...

class PausePoolRequest(_message.Message):
    __slots__ = ("pool", "duration", "reason")
    POOL_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pool: str
    duration: _duration_pb2.Duration
    reason: str
    def __init__(self, pool: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class PausePoolResponse(_message.Message):
    __slots__ = ("paused_until",)
    PAUSED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    paused_until: _timestamp_pb2.Timestamp
    def __init__(self, paused_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ResumePoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: _Optional[str] = ...) -> None: ...

class ResumePoolResponse(_message.Message):
    __slots__ = ("was_paused",)
    WAS_PAUSED_FIELD_NUMBER: _ClassVar[int]
    was_paused: bool
    def __init__(self, was_paused: _Optional[bool] = ...) -> None: ...

class RevokeLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class RevokeLeaseResponse(_message.Message):
    __slots__ = ("pool", "holder")
    POOL_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    pool: str
    holder: str
    def __init__(self, pool: _Optional[str] = ..., holder: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout",)
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    timeout: _duration_pb2.Duration
    def __init__(self, timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DrainProgress(_message.Message):
    __slots__ = ("leases_remaining", "queued", "done")
    LEASES_REMAINING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    leases_remaining: int
    queued: int
    done: bool
    def __init__(self, leases_remaining: _Optional[int] = ..., queued: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class UndrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UndrainResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("pool", "snapshot_interval")
    POOL_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    snapshot_interval: _duration_pb2.Duration
    def __init__(self, pool: _Optional[str] = ..., snapshot_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("at", "snapshot", "granted", "released", "expired", "paused", "resumed", "limit_changed", "rejected")
    AT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_CHANGED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    snapshot: _slotd_pb2.StatusResponse
    granted: LeaseChange
    released: LeaseChange
    expired: LeaseChange
    paused: PoolChange
    resumed: PoolChange
    limit_changed: PoolChange
    rejected: PoolChange
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., snapshot: _Optional[_Union[_slotd_pb2.StatusResponse, _Mapping]] = ..., granted: _Optional[_Union[LeaseChange, _Mapping]] = ..., released: _Optional[_Union[LeaseChange, _Mapping]] = ..., expired: _Optional[_Union[LeaseChange, _Mapping]] = ..., paused: _Optional[_Union[PoolChange, _Mapping]] = ..., resumed: _Optional[_Union[PoolChange, _Mapping]] = ..., limit_changed: _Optional[_Union[PoolChange, _Mapping]] = ..., rejected: _Optional[_Union[PoolChange, _Mapping]] = ...) -> None: ...

class LeaseChange(_message.Message):
    __slots__ = ("pool", "lease_id", "holder", "detail")
    POOL_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    lease_id: str
    holder: str
    detail: str
    def __init__(self, pool: _Optional[str] = ..., lease_id: _Optional[str] = ..., holder: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class PoolChange(_message.Message):
    __slots__ = ("pool", "detail", "status")
    POOL_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    detail: str
    status: _slotd_pb2.PoolStatus
    def __init__(self, pool: _Optional[str] = ..., detail: _Optional[str] = ..., status: _Optional[_Union[_slotd_pb2.PoolStatus, _Mapping]] = ...) -> None: ...
