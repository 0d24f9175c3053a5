"""The exceptions of the slotd client: one base class, a few precise kinds, never a raw gRPC error."""

from __future__ import annotations

import grpc


class SlotdError(Exception):
    """Base class of every error this package raises."""


class Rejected(SlotdError):
    """The daemon refused a request, or it gave up waiting (``code`` says which).

    ``code`` is the gRPC status code the daemon gave (for example ``RESOURCE_EXHAUSTED`` for a full
    queue, ``DEADLINE_EXCEEDED`` after ``max_wait``, ``NOT_FOUND`` for an unknown pool,
    ``INVALID_ARGUMENT`` for a bad TTL); ``retry_after`` (seconds), when set, is how long trying
    again is pointless.
    """

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        self.code = code
        self.message = message
        self.retry_after = retry_after
        hint = f" (retry after {retry_after:g}s)" if retry_after is not None else ""
        super().__init__(f"slotd rejected the request: {code.name.lower()}: {message}{hint}")


class Unavailable(SlotdError):
    """The daemon could not be reached (for longer than the client's ``connect_timeout``), or the
    client is closed."""


class LeaseLost(SlotdError):
    """A lease ended without its holder releasing it: it expired, was revoked, was taken over by
    another stream, or could not be resumed after a reconnect. Stop using the slot."""

    def __init__(self, lease_id: str, reason: str) -> None:
        self.lease_id = lease_id
        self.reason = reason
        super().__init__(f"lease {lease_id} lost: {reason}")


class ClientClosed(Unavailable):
    """The client was closed (or this process forked after creating it); make a new one."""
