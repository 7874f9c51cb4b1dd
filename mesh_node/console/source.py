"""What the console reads: a `StatusSource` (implemented by membership, later extended).

The console never owns mesh state. It asks the source for a snapshot (`status()`) and, for
the live event stream, for a `Subscription` to change events. The document's fields are
specified in proto/CONSOLE.md.

Contract for implementers:

* Single event loop: both methods are called from the node's asyncio loop, never from
  another thread, and must not block (no I/O, no waiting). `status()` is called once per
  `GET /api/status` and once per event-stream connection.
* `status()` returns a fresh JSON-ready dict (str keys; str/int/float/bool/None/list/dict
  values; finite floats) that the caller may serialise but does not mutate.
* `subscribe()` returns a new subscription that sees every change made after the call, so
  `subscribe()` followed by `status()` leaves no gap.
* A subscription is bounded: when its consumer falls behind and its queue overflows, the
  source drops the queued events and delivers one `("status", <whole document>)` instead
  (a resync), then carries on with new changes.
* Iterating yields `(event_name, payload)` tuples, waiting for the next change. Iteration
  ends (StopAsyncIteration) when the source shuts down or after `close()`.
* `close()` is idempotent, synchronous, and frees the subscription's queue; the console
  calls it when the HTTP client goes away or the console stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final, Protocol

EVENT_PEER: Final = "peer"
"""Payload: one PEER record (an upsert: something about that peer changed, or it is new)."""

EVENT_REMOVED: Final = "removed"
"""Payload: `{"id": <node id>}`: a long-dead peer was forgotten."""

EVENT_STATUS: Final = "status"
"""Payload: the whole status document (the first event of a stream, and every resync)."""

EVENT_NAMES: Final = (EVENT_PEER, EVENT_REMOVED, EVENT_STATUS)


class Subscription(Protocol):
    """Change events from a `StatusSource`, in order; an async iterator plus `close()`."""

    def __aiter__(self) -> AsyncIterator[tuple[str, dict[str, Any]]]: ...

    def close(self) -> None: ...


class StatusSource(Protocol):
    """The mesh state the console shows: a snapshot document and a change feed."""

    def status(self) -> dict[str, Any]:
        """The status document (proto/CONSOLE.md), ready to dump as JSON."""
        ...

    def subscribe(self) -> Subscription:
        """A new bounded subscription to change events (`EVENT_NAMES`)."""
        ...
