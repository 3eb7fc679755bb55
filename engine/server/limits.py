"""Engine-wide connection limits: the connection table, the partial-frame budget, log pacing.

- :class:`ConnectionTable` counts open connections, in total and those not authenticated as
  a relying party, against ``LimitsConfig.max_connections`` / ``max_unauthenticated``. At a
  cap, a new connection evicts the unauthenticated connection that has nothing in flight
  and has been quiet longest; with none to evict it is refused. Authenticated streams are
  never evicted, and ``max_connections - max_unauthenticated`` slots are theirs alone, so a
  relying party with a live stream can always connect again.
- :class:`FrameBudget` is the memory that every connection's partly received frames may
  hold together; each frame's announced length is reserved before its body is read.
- :class:`LogPacer` lets a few lines a second through and counts the rest, so that what
  a client sends can never flood the engine's log.

All three are used from the event loop only (no locks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Tracked", "ConnectionTable", "FrameBudget", "LogPacer"]

#: Unauthenticated connections looked at, oldest first, to choose one to evict.
_EVICTION_SCAN = 64


class Tracked(Protocol):
    """What the table needs of a connection."""

    in_flight: int

    def quiet_since(self) -> float: ...
    def evict(self) -> None: ...


class ConnectionTable:
    def __init__(self, *, max_connections: int, max_unauthenticated: int, on_change: Callable[[int, int], None] | None = None) -> None:
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated
        self._unauth: dict[Any, None] = {}  # insertion order: oldest first
        self._auth: set[Any] = set()
        self._on_change = on_change
        self.evicted = 0
        self.refused = 0

    @property
    def total(self) -> int:
        return len(self._unauth) + len(self._auth)

    @property
    def unauthenticated(self) -> int:
        return len(self._unauth)

    def admit(self, conn: Tracked) -> bool:
        """Count a new (unauthenticated) connection in, evicting one if a cap is reached.
        False: no room, and nothing that may be evicted."""
        while self.total >= self.max_connections or len(self._unauth) >= self.max_unauthenticated:
            if not self.evict_one():
                self.refused += 1
                return False
        self._unauth[conn] = None
        self._changed()
        return True

    def authenticated(self, conn: Tracked) -> None:
        """The connection authenticated as a relying party: it leaves the evictable set."""
        if self._unauth.pop(conn, 0) is None:
            self._auth.add(conn)
            self._changed()

    def remove(self, conn: Tracked) -> None:
        if self._unauth.pop(conn, 0) is None or conn in self._auth:
            self._auth.discard(conn)
            self._changed()

    def evict_one(self) -> bool:
        """Evict the quietest idle unauthenticated connection among the oldest; False if none."""
        victim, quiet = None, float("inf")
        for k, conn in enumerate(self._unauth):
            if k >= _EVICTION_SCAN:
                break
            if conn.in_flight == 0 and conn.quiet_since() < quiet:
                victim, quiet = conn, conn.quiet_since()
        if victim is None:
            return False
        del self._unauth[victim]
        self.evicted += 1
        self._changed()
        victim.evict()
        return True

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.total, len(self._unauth))


class FrameBudget:
    """Bytes of partly received frames, engine-wide, against a fixed budget."""

    def __init__(self, budget: int, on_change: Callable[[int], None] | None = None) -> None:
        self.budget = budget
        self.used = 0
        self.peak = 0
        self._on_change = on_change

    def try_reserve(self, size: int) -> bool:
        if self.used + size > self.budget:
            return False
        self.used += size
        self.peak = max(self.peak, self.used)
        if self._on_change is not None:
            self._on_change(self.used)
        return True

    def release(self, size: int) -> None:
        self.used -= size
        if self._on_change is not None:
            self._on_change(self.used)


class LogPacer:
    """At most ``burst`` lines at once and ``per_second`` on average; the rest only counted.

    The next line let through says how many were held back since the last one.
    """

    def __init__(self, logger: logging.Logger, *, per_second: float = 1.0, burst: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.per_second = per_second
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self.suppressed = 0  # held back since the last line let through
        self.suppressed_total = 0

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        self.suppressed_total += 1
        return False

    def log(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log the line if the pace allows; True if it was written."""
        if not self.allow():
            return False
        if self.suppressed:
            msg += " (%d similar lines held back)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True
