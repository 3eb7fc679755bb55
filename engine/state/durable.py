"""What of the shared session state must not be lost: consumed sessions and undelivered results.

Two tables in PostgreSQL, in the store's schema (the ``?schema=`` of the store URL):

``consumed_sessions``
    One row per session whose single use has been taken (a verify's claim, or the failed
    attempt that closed it). The primary key decides races between nodes: of two
    ``INSERT … ON CONFLICT DO NOTHING`` for one session, exactly one inserts a row. Redis
    holds the same flag as a fast path, but Redis may lose it (a restart without
    persistence, a fail-over to a replica that lagged); this table does not. A row is
    dropped once its session has expired, when a replay is refused for the expiry anyway.

``pending_results``
    The sealed result of every finished session, written before it is published, kept
    until ``expires`` (the configured result retention) for ``fetch_result``, and marked
    ``delivered`` once a node has handed it to a live stream of its relying party. A
    relying party that (re)connects to any node is sent what is still undelivered.

Everything here is blocking (psycopg 3 with a ``psycopg_pool`` pool): callers run it in
worker threads. Times are the engine's clock, passed in, so tests can move them. The
database unreachable raises ``Unavailable`` with a retry hint; the pool checks each
connection before use, so the state recovers by itself when the database returns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from ..errors import StoreError, Unavailable
from ..store.postgres_db import check_pooled, unreachable

__all__ = ["DurableState", "RETRY_AFTER_MS"]

log = logging.getLogger("engine.state")

#: The retry hint given when PostgreSQL or Redis cannot be reached.
RETRY_AFTER_MS = 1000
#: Seconds a consumed session's row outlives the session's expiry.
CONSUMED_GRACE = 60.0

# Version 1 of the shared state's tables. Idempotent; applied at start-up by every node under
# an advisory lock (concurrent CREATE … IF NOT EXISTS can otherwise collide in the catalog).
_DDL = """
CREATE TABLE IF NOT EXISTS consumed_sessions (
    session_id   text PRIMARY KEY,
    nonce_digest bytea NOT NULL,
    consumed_at  double precision NOT NULL,
    expires_at   double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS consumed_sessions_expiry ON consumed_sessions (expires_at);
CREATE TABLE IF NOT EXISTS pending_results (
    session_id text PRIMARY KEY,
    rp_id      text NOT NULL,
    sealed     bytea NOT NULL,
    created    double precision NOT NULL,
    expires    double precision NOT NULL,
    delivered  double precision
);
CREATE INDEX IF NOT EXISTS pending_results_undelivered ON pending_results (rp_id, created) WHERE delivered IS NULL;
CREATE INDEX IF NOT EXISTS pending_results_expiry ON pending_results (expires);
"""
_DDL_LOCK = 0x6E65_7469_6473_7431  # "netidst1": one node at a time applies the DDL


class DurableState:
    """The two tables above, through a small connection pool. Thread-safe."""

    def __init__(self, url: str, *, max_connections: int = 4, timeout_s: float = 2.0) -> None:
        from ..store.postgres import parse_url  # the store's URL grammar, ?schema= included

        conninfo, self.schema = parse_url(url)
        kwargs = {
            "autocommit": True,
            "options": f"-c search_path={self.schema} -c statement_timeout={int(timeout_s * 1000)}",
            "connect_timeout": max(1, round(timeout_s)),
            "application_name": "netid-engine-state",
        }
        try:
            with psycopg.connect(conninfo, **kwargs) as conn, conn.transaction():  # type: ignore[arg-type]
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                conn.execute(_DDL)
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        self._pool = ConnectionPool(conninfo, kwargs=kwargs, min_size=1, max_size=max_connections, open=False,
                                    timeout=timeout_s, check=check_pooled, name=f"netid-state-{self.schema}")
        self._pool.open(wait=False)

    @staticmethod
    def _error(exc: BaseException) -> Exception:
        if unreachable(exc):
            return Unavailable(f"the database is unreachable ({type(exc).__name__})", retry_after_ms=RETRY_AFTER_MS)
        return StoreError(f"the shared state's query failed ({type(exc).__name__})")

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:  # PoolTimeout included
            raise self._error(exc) from exc

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """``SELECT 1`` on a pooled connection; False while the database cannot be reached."""
        try:
            with self._pool.connection(timeout=timeout_s) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def close(self) -> None:
        self._pool.close()

    # ---- the single use --------------------------------------------------------------------------
    def consume(self, session_id: str, nonce_digest: bytes, *, now: float, expires_at: float) -> bool:
        """Record the session's single use; ``True`` for the one caller that did."""
        with self._conn() as conn:
            row = conn.execute(
                "INSERT INTO consumed_sessions (session_id, nonce_digest, consumed_at, expires_at) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (session_id) DO NOTHING RETURNING 1",
                (session_id, nonce_digest, now, expires_at),
            ).fetchone()
        return row is not None

    def unconsume(self, session_id: str) -> None:
        """Give a claim back (it ended before any result); never once a result exists."""
        with self._conn() as conn:
            conn.execute(
                "DELETE FROM consumed_sessions WHERE session_id = %s"
                " AND NOT EXISTS (SELECT 1 FROM pending_results WHERE session_id = %s)",
                (session_id, session_id),
            )

    # ---- results ---------------------------------------------------------------------------------
    def keep_result(self, session_id: str, rp_id: str, sealed: bytes, *, now: float, expires: float) -> None:
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO pending_results (session_id, rp_id, sealed, created, expires) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (session_id) DO UPDATE SET sealed = EXCLUDED.sealed, expires = EXCLUDED.expires, delivered = NULL",
                (session_id, rp_id, sealed, now, expires),
            )

    def result(self, session_id: str, *, now: float) -> tuple[str, bytes] | None:
        """``(rp_id, sealed)`` of the session's result if it is still kept."""
        with self._conn() as conn:
            row = conn.execute("SELECT rp_id, sealed FROM pending_results WHERE session_id = %s AND expires > %s",
                               (session_id, now)).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def undelivered(self, rp_ids: Sequence[str], *, now: float, created_before: float, limit: int = 1000) -> list[tuple[str, str, bytes]]:
        """``(rp_id, session_id, sealed)`` of results not yet handed to any stream, oldest first."""
        if not rp_ids:
            return []
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT rp_id, session_id, sealed FROM pending_results WHERE delivered IS NULL AND rp_id = ANY(%s)"
                " AND created <= %s AND expires > %s ORDER BY created LIMIT %s",
                (list(rp_ids), created_before, now, limit),
            ).fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def mark_delivered(self, session_ids: Sequence[str], *, now: float) -> None:
        if not session_ids:
            return
        with self._conn() as conn:
            conn.execute("UPDATE pending_results SET delivered = %s WHERE session_id = ANY(%s) AND delivered IS NULL",
                         (now, list(session_ids)))

    def sweep(self, now: float) -> int:
        """Drop results past retention and consumed sessions long expired; rows dropped."""
        with self._conn() as conn:
            a = conn.execute("DELETE FROM pending_results WHERE expires <= %s", (now,)).rowcount
            b = conn.execute("DELETE FROM consumed_sessions WHERE expires_at < %s", (now - CONSUMED_GRACE,)).rowcount
        return a + b

    def drop_schema_tables(self) -> None:
        """Drop both tables (tests clean up with this)."""
        with self._conn() as conn:
            conn.execute("DROP TABLE IF EXISTS consumed_sessions, pending_results")
