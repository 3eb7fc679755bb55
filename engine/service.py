"""The engine and its connection record, where the server and older callers import them
(:mod:`engine.flows` holds them)."""

from __future__ import annotations

from .flows import REASONS, Conn, Engine

__all__ = ["Conn", "Engine", "REASONS"]
