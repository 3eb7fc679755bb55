"""Verification sessions and result fan-out (in-process implementations).

Sessions live in memory: they last tens of seconds and a restart simply
expires them. Both classes are used only from the event loop, so each method
is atomic with respect to other tasks (no ``await`` inside). A Redis-backed
implementation of the same two interfaces is the path past one host.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Protocol

import trio

from .errors import SessionExpired, SessionUsed, UnknownSession

__all__ = ["Session", "SessionStore", "MemorySessionStore", "ResultHub"]


@dataclass(slots=True)
class Session:
    session_id: str
    rp_id: str
    level: str
    purpose: str
    nonce: bytes
    challenge: str
    created_at: float
    expires_at: float
    used: bool = False
    #: Verify attempts that did not count (LimitsConfig.max_failed_attempts).
    failed_attempts: int = 0
    #: Sealed result for the relying party, kept until ``retain_until``.
    result: bytes | None = None
    retain_until: float = 0.0


class SessionStore(Protocol):
    def add(self, session: Session) -> None: ...
    def check(self, session_id: str, nonce: bytes, now: float) -> Session: ...
    def claim(self, session_id: str, nonce: bytes, now: float) -> Session: ...
    def peek(self, session_id: str) -> Session | None: ...
    def finish(self, session_id: str, sealed_result: bytes, retain_until: float) -> None: ...
    def sweep(self, now: float) -> int: ...
    def __len__(self) -> int: ...


class MemorySessionStore:
    """Single-use sessions with expiry, kept in a dict and swept periodically."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: Session) -> None:
        self._sessions[session.session_id] = session

    def peek(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def check(self, session_id: str, nonce: bytes, now: float) -> Session:
        """Raise unless the session exists, is unused, unexpired and the nonce matches."""
        s = self._sessions.get(session_id)
        if s is None or not hmac.compare_digest(s.nonce, nonce):
            raise UnknownSession()
        if s.used:
            raise SessionUsed()
        if now >= s.expires_at:
            raise SessionExpired()
        return s

    def claim(self, session_id: str, nonce: bytes, now: float) -> Session:
        """Check and consume the session in one step (no await in between)."""
        s = self.check(session_id, nonce, now)
        s.used = True
        return s

    def finish(self, session_id: str, sealed_result: bytes, retain_until: float) -> None:
        s = self._sessions.get(session_id)
        if s is not None:
            s.result = sealed_result
            s.retain_until = retain_until

    def sweep(self, now: float) -> int:
        """Drop expired unused sessions and results past retention."""
        dead = [
            sid
            for sid, s in self._sessions.items()
            if (not s.used and now >= s.expires_at + 5.0)
            or (s.used and s.result is not None and now >= s.retain_until)
            or (s.used and s.result is None and now >= s.expires_at + 300.0)
        ]
        for sid in dead:
            del self._sessions[sid]
        return len(dead)


class ResultHub:
    """Routes pushed results to every live stream of a relying party."""

    def __init__(self) -> None:
        self._streams: dict[str, set[trio.MemorySendChannel]] = {}

    def subscribe(self, rp_id: str, outbox: trio.MemorySendChannel) -> None:
        self._streams.setdefault(rp_id, set()).add(outbox)

    def unsubscribe(self, rp_id: str, outbox: trio.MemorySendChannel) -> None:
        streams = self._streams.get(rp_id)
        if streams is not None:
            streams.discard(outbox)
            if not streams:
                del self._streams[rp_id]

    def publish(self, rp_id: str, message: object) -> tuple[int, int]:
        """Push without blocking to every live stream of the relying party.

        Returns (streams that took it, streams whose outbox was full). A stream that misses
        a push can still fetch the result by session id: the caller keeps it."""
        delivered = full = 0
        for outbox in list(self._streams.get(rp_id, ())):
            try:
                outbox.send_nowait(message)
                delivered += 1
            except trio.WouldBlock:
                full += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return delivered, full
