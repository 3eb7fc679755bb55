"""The session-and-result state seam: what lives as long as a verification.

Two small interfaces. ``SessionState``: open sessions with their nonces, the
single-use claim that a verify takes, the sealed result a session ends with (kept
for ``fetch_result``) and its push to every live stream of the relying party.
``Quotas``: per relying party token buckets. The flows never change a session
themselves; they ask for a transition (claim, release, count a failure, finish).
Methods that may cross a network are async: the in-process implementation answers
at once, one on a shared service runs its driver in worker threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import msgspec
import trio

__all__ = ["Delivery", "Quotas", "Session", "SessionState"]


class Session(msgspec.Struct, frozen=True, kw_only=True):
    """An open verification session, as the relying party opened it."""

    session_id: str
    rp_id: str
    level: str
    purpose: str
    nonce: bytes
    challenge: str
    created_at: float
    expires_at: float


class Delivery(NamedTuple):
    """What became of a result's push: streams that took it, streams that were full."""

    delivered: int
    full: int


@runtime_checkable
class SessionState(Protocol):
    async def open(self, session: Session, *, now: float, max_open: int, quota: int = 0) -> None:
        """Keep a new session; ``Overloaded`` when ``max_open`` sessions are open. With a
        ``quota`` (requests per minute), one request is first taken from the relying
        party's ``open`` bucket of the state's ``Quotas`` (``RateLimited`` when it is spent,
        and nothing kept): one step, one round trip on a shared service."""
        ...

    async def claim(self, session_id: str, nonce: bytes, now: float) -> Session:
        """Consume the session if it exists with this nonce, unused and unexpired (else
        ``UnknownSession``, ``SessionUsed`` or ``SessionExpired``): of callers racing,
        exactly one wins."""
        ...

    async def release(self, session_id: str) -> None:
        """Undo a claim that ended before any result (the engine's fault, not the
        holder's): the session can be used again until it expires."""
        ...

    async def count_failure(self, session_id: str, nonce: bytes, now: float, *, limit: int) -> Session | None:
        """Count a verify on the session that did not count; the errors of ``claim`` if
        the session is not open with this nonce. The session for the failure that
        reaches ``limit``: it is then claimed for its caller, who closes it with a
        result. ``None`` for the others."""
        ...

    async def finish(self, session: Session, sealed: bytes, *, retain_until: float) -> Delivery:
        """Keep the sealed result for ``fetch_result`` until ``retain_until``, then
        push it to every live stream of the session's relying party."""
        ...

    async def result(self, session_id: str, rp_id: str) -> bytes:
        """The kept result; ``UnknownSession`` if none (or another party's),
        ``ResultPending`` while the session is open or being verified."""
        ...

    def subscribe(self, rp_id: str, outbox: trio.MemorySendChannel) -> None:
        """Push this relying party's results into ``outbox`` (a live stream)."""
        ...

    def unsubscribe(self, rp_id: str, outbox: trio.MemorySendChannel) -> None: ...

    async def healthy(self) -> bool:
        """Whether the services the state lives on answer now (a cheap probe for
        readiness, never raising); in-process state is always healthy."""
        ...

    async def run(self, clock: Callable[[], float], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background work for as long as the engine runs (expiry sweeps)."""
        ...


@runtime_checkable
class Quotas(Protocol):
    async def take(self, rp_id: str, bucket: str, per_minute: int, now: float) -> None:
        """Take one request from the relying party's ``bucket``; ``RateLimited`` (with a
        retry hint) when it is empty. ``per_minute <= 0``: no limit."""
        ...
