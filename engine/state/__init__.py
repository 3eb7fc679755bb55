"""Session and result state, and quotas: the interfaces and the in-process implementation."""

from __future__ import annotations

from .base import Delivery, Quotas, Session, SessionState
from .hub import ResultHub
from .memory import MemoryQuotas, MemorySessionState

__all__ = ["Delivery", "MemoryQuotas", "MemorySessionState", "Quotas", "ResultHub", "Session", "SessionState"]
