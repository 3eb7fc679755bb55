"""Session and result state, and quotas: the interfaces, the in-process implementation and,
for many nodes, the one on Redis and PostgreSQL (``engine.state.redis``, imported on first
use so that a single node needs neither driver)."""

from __future__ import annotations

from typing import Any

from .base import Delivery, Quotas, Session, SessionState
from .hub import ResultHub
from .memory import MemoryQuotas, MemorySessionState

__all__ = [
    "Delivery", "MemoryQuotas", "MemorySessionState", "Quotas", "RedisQuotas", "RedisSessionState", "ResultHub", "Session",
    "SessionState", "open_shared_state",
]

_SHARED = ("RedisQuotas", "RedisSessionState", "open_shared_state")


def __getattr__(name: str) -> Any:
    if name in _SHARED:
        from . import redis

        return getattr(redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
