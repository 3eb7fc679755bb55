"""The embedded ``Store``: one SQLite file in WAL mode (see ``sqlite_db``).

Every transition runs inside ``BEGIN IMMEDIATE … COMMIT`` and appends its audit
rows in the same transaction: a SIGKILL leaves the state before or after it, never
between. The audit table refuses UPDATE and DELETE (triggers). The enrollment lock
is a lock per database file in this process.
"""

from __future__ import annotations

import os
import threading

from .sql import SqlStore
from .sqlite_db import SCHEMA_VERSION, SqliteFile

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_TEMPLATE_PAGE = 1000

#: One enrollment lock per database file in this process (two stores on one file share it).
_ENROLL_LOCKS: dict[str, threading.Lock] = {}
_ENROLL_LOCKS_GUARD = threading.Lock()


class SqliteStore(SqliteFile, SqlStore):
    """``Store`` on one SQLite file. Thread-safe; see the module docstring. The transitions
    and reads are ``SqlStore``'s: SQLite's single writer (``BEGIN IMMEDIATE``) needs no row
    locks, and ``rowid`` orders credentials as they were inserted."""

    def enrollment_lock(self) -> threading.Lock:
        """A lock per database file, in this process. The duplicate search it guards is
        an index in this process's memory, so one SQLite file serves one engine process."""
        key = os.path.realpath(self._path)
        with _ENROLL_LOCKS_GUARD:
            return _ENROLL_LOCKS.setdefault(key, threading.Lock())

    def _template_page(self) -> int:
        return _TEMPLATE_PAGE
