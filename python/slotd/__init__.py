"""slotd: slot leases for shared LLM-provider capacity.

``with client.lease("anthropic"):`` holds one of the pool's slots for the duration of a provider
call. See :class:`Client`, :class:`AsyncClient` and, for httpx-based SDKs, :mod:`slotd.httpx`.
"""

from slotd._client import AsyncClient, Client, Lease
from slotd._errors import ClientClosed, LeaseLost, Rejected, SlotdError, Unavailable
from slotd._types import LimitKind, Outcome, Pause, ProviderLimit, Report, Usage

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ClientClosed",
    "Lease",
    "LeaseLost",
    "LimitKind",
    "Outcome",
    "Pause",
    "ProviderLimit",
    "Rejected",
    "Report",
    "SlotdError",
    "Unavailable",
    "Usage",
]
