"""The ``Store`` on PostgreSQL, shared by many engine nodes (see ``postgres_db`` for the
URL, the pool and failures, ``postgres_schema`` for the tables and migrations).

Every transition is one transaction that appends its audit rows itself, as in the SQLite
store. A transition first locks the rows it decides on (``SELECT … FOR UPDATE`` on the card
or the credential), so concurrent transitions on one card or credential, from any node, run
one after the other as under SQLite's single writer; a race on a unique key that no row lock
covers (two credentials taking one new device key) ends in ``Conflict``.
``enrollment_lock()`` is a session advisory lock: one enrollment at a time across every node
on the schema.
"""

from __future__ import annotations

from typing import Any

from .postgres_db import PostgresDatabase, parse_url
from .postgres_schema import SCHEMA_VERSION, advisory_key
from .sql import SqlStore

__all__ = ["SCHEMA_VERSION", "PostgresStore", "parse_url"]

_TEMPLATE_PAGE = 1000


class PostgresStore(PostgresDatabase, SqlStore):
    """``Store`` on a PostgreSQL schema. Thread-safe; see the module docstrings. The
    transitions and reads are ``SqlStore``'s, with PostgreSQL's dialect below."""

    _FOR_UPDATE = " FOR UPDATE"  # row locks: concurrent transitions on one row queue
    _COLLATE = ' COLLATE "C"'  # byte order, as SQLite sorts text
    _ROW_ORDER = "seq"  # the identity column that plays SQLite's rowid

    def _insert_id(self, conn: Any, query: str, args: tuple, column: str) -> int:
        (new_id,) = self._run(conn, f"{query} RETURNING {column}", args).fetchone()
        return new_id

    def _template_page(self) -> int:
        return _TEMPLATE_PAGE

    def _lock_log(self, conn: Any) -> None:
        """The template change log's writers queue here until they commit, so that ``seq``
        order is commit order (an identity value is drawn before its transaction commits)."""
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(self.schema, "template_log"),))
