"""Session and result state, and quotas, in this process's memory.

Sessions last tens of seconds and a restart simply expires them. Everything is
used from the event loop only and no method awaits before it has finished its
change, so each transition is atomic with respect to other tasks.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

import trio

from engine.wire import protocol as P
from ..errors import Overloaded, RateLimited, ResultPending, SessionExpired, SessionUsed, UnknownSession
from .base import Delivery, Session
from .hub import ResultHub

__all__ = ["MemorySessionState", "MemoryQuotas"]

#: Seconds between sweeps of expired sessions and results.
SWEEP_EVERY = 1.0


@dataclass(slots=True)
class _Entry:
    session: Session
    used: bool = False
    failed_attempts: int = 0
    result: bytes | None = None  # sealed for the relying party
    retain_until: float = 0.0


class MemorySessionState:
    """Single-use sessions with expiry in a dict, swept every second, and a
    :class:`ResultHub` for the streams."""

    def __init__(self, quotas: MemoryQuotas | None = None) -> None:
        self._entries: dict[str, _Entry] = {}
        self.hub = ResultHub()
        #: the buckets an open takes its quota from: the engine's ``Quotas`` (app.py passes
        #: them), else buckets of its own
        self.quotas = quotas if quotas is not None else MemoryQuotas()

    def __len__(self) -> int:
        return len(self._entries)

    async def open(self, session: Session, *, now: float, max_open: int, quota: int = 0) -> None:
        await self.quotas.take(session.rp_id, "open", quota, now)
        if len(self._entries) >= max_open:
            self.sweep(now)
            if len(self._entries) >= max_open:
                raise Overloaded("too many open sessions", retry_after_ms=1000)
        self._entries[session.session_id] = _Entry(session)

    def _checked(self, session_id: str, nonce: bytes, now: float) -> _Entry:
        e = self._entries.get(session_id)
        if e is None or not hmac.compare_digest(e.session.nonce, nonce):
            raise UnknownSession()
        if e.used:
            raise SessionUsed()
        if now >= e.session.expires_at:
            raise SessionExpired()
        return e

    async def claim(self, session_id: str, nonce: bytes, now: float) -> Session:
        e = self._checked(session_id, nonce, now)
        e.used = True
        return e.session

    async def release(self, session_id: str) -> None:
        e = self._entries.get(session_id)
        if e is not None and e.result is None:
            e.used = False

    async def count_failure(self, session_id: str, nonce: bytes, now: float, *, limit: int) -> Session | None:
        e = self._checked(session_id, nonce, now)
        e.failed_attempts += 1
        if e.failed_attempts < limit:
            return None
        e.used = True
        return e.session

    async def finish(self, session: Session, sealed: bytes, *, retain_until: float) -> Delivery:
        e = self._entries.get(session.session_id)
        if e is not None:  # kept for fetch_result whatever happens to the pushes
            e.result, e.retain_until = sealed, retain_until
        return self.hub.publish(session.rp_id, P.ResultMsg(session_id=session.session_id, sealed=sealed))

    async def result(self, session_id: str, rp_id: str) -> bytes:
        e = self._entries.get(session_id)
        if e is None or e.session.rp_id != rp_id:
            raise UnknownSession()
        if e.result is None:
            raise ResultPending(retry_after_ms=500)
        return e.result

    def subscribe(self, rp_id: str, outbox: trio.MemorySendChannel) -> None:
        self.hub.subscribe(rp_id, outbox)

    def unsubscribe(self, rp_id: str, outbox: trio.MemorySendChannel) -> None:
        self.hub.unsubscribe(rp_id, outbox)

    def sweep(self, now: float) -> int:
        """Drop expired unused sessions, results past retention, and sessions claimed
        long ago that never got a result."""
        dead = [
            sid
            for sid, e in self._entries.items()
            if (not e.used and now >= e.session.expires_at + 5.0)
            or (e.used and e.result is not None and now >= e.retain_until)
            or (e.used and e.result is None and now >= e.session.expires_at + 300.0)
        ]
        for sid in dead:
            del self._entries[sid]
        return len(dead)

    async def healthy(self) -> bool:
        return True

    async def run(self, clock: Callable[[], float], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(SWEEP_EVERY)
            self.sweep(clock())


class MemoryQuotas:
    """Token buckets (requests per minute), one per relying party and bucket.

    A bucket holds a minute's worth: a relying party that was quiet can spend its whole
    minute's quota in a burst, then one request per 60/quota seconds."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    async def take(self, rp_id: str, bucket: str, per_minute: int, now: float) -> None:
        if per_minute <= 0:
            return
        key = (rp_id, bucket)
        rate = per_minute / 60.0
        tokens, last = self._buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            raise RateLimited(retry_after_ms=int((1.0 - tokens) / rate * 1000) + 1)
        self._buckets[key] = (tokens - 1.0, now)
