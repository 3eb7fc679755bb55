"""The engine's flows (enroll, sessions, verify, rebind, lost card, status, upgrade) and
the :class:`Engine` that dispatches requests to them. Flows talk only to the seams in
their :class:`Context`: store, state, matching, inference, keys, metrics, config."""

from __future__ import annotations

from .context import Context
from .engine import Engine
from .relying_party import Conn
from .verify import REASONS

__all__ = ["Conn", "Context", "Engine", "REASONS"]
