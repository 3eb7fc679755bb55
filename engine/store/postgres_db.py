"""The PostgreSQL database under ``PostgresStore``: URL, pool, transactions, locks, audit.

URL: ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?schema=NAME&LIBPQ_PARAM=...]``;
``schema`` (default ``public``) selects the schema the tables live in, so several
deployments or test runs can share one database; the other query parameters go to libpq.

Connections come from a ``psycopg_pool.ConnectionPool`` (the store is called from worker
threads), in autocommit mode: a read is one statement, a write one explicit transaction
(``_write``) that appends its audit rows itself (``_audit``). Each connection is checked
before use, so the store recovers by itself when the database returns. The database
unreachable (refused, dropped, shutting down, no pooled connection within the timeout)
raises ``StoreUnavailable`` with a retry hint, after the transaction rolled back. Error
messages name the error class, never a value or the URL. The schema is migrated when the
store opens (``postgres_schema``).
"""

from __future__ import annotations

import re
import select
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .. import errors
from .base import AuditValue
from .postgres_schema import advisory_key, migrate
from .sql_rows import SqlAudit, append_audit

__all__ = ["PostgresDatabase", "check_pooled", "parse_url"]

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def parse_url(url: str) -> tuple[str, str]:
    """``(libpq URL without the schema parameter, schema)``; ``ConfigError`` if malformed.
    The URL is never repeated in a message: it may carry a password."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("postgresql", "postgres") or not parts.netloc:
        raise errors.ConfigError("a PostgreSQL store URL reads postgresql://USER@HOST[:PORT]/DATABASE[?schema=NAME]")
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    if len(schemas) > 1 or (schemas and not _SCHEMA_NAME.fullmatch(schemas[0])):
        raise errors.ConfigError("schema= must be one name of lower-case letters, digits and _ (at most 63)")
    conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path,
                           urlencode([(k, v) for k, v in query if k != "schema"]), ""))
    try:
        conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise errors.ConfigError(f"malformed PostgreSQL URL ({type(exc).__name__})") from None
    return conninfo, schemas[0] if schemas else "public"


def unreachable(exc: BaseException) -> bool:
    """True for the failures of reaching the database, as opposed to refusals by it."""
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, PoolClosed) or not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    # no SQLSTATE: the client lost or could not make the connection; 08: connection
    # exceptions; 57P01-57P03: the server is shutting down or starting up
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def check_pooled(conn: psycopg.Connection) -> None:
    """The pool's check before it hands a connection out: ask the server only when the socket
    has something to read. An idle connection has nothing to say; one the server closed (a
    restart, a terminated backend) or sent a notice on is readable, and then a round trip
    tells whether it still works. A connection handed out on each request costs no round trip."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    if select.select([conn.fileno()], [], [], 0)[0]:
        ConnectionPool.check_connection(conn)


class PostgresDatabase(SqlAudit):
    """One PostgreSQL schema, used from any number of threads."""

    _MARK = "%s"  # statements are written with ``?``; psycopg takes ``%s``

    def __init__(
        self, url: str, *, busy_timeout_ms: int = 5000, min_connections: int = 1, max_connections: int = 8,
        timeout_s: float = 3.0, enrollment_wait_s: float = 30.0, retry_after_ms: int = 1000,
    ) -> None:
        if busy_timeout_ms < 0 or timeout_s <= 0 or enrollment_wait_s <= 0 or retry_after_ms < 0:
            raise errors.ConfigError("the store's timeouts must be positive")
        if not 1 <= min_connections <= max_connections:
            raise errors.ConfigError("the store needs 1 <= min_connections <= max_connections")
        conninfo, self.schema = parse_url(url)
        self._retry_after_ms = int(retry_after_ms)
        self._enrollment_wait_s = float(enrollment_wait_s)
        given = conninfo_to_dict(conninfo)
        # every connection: autocommit (transactions are explicit), this schema only, and a
        # bounded wait for row locks, like SQLite's busy timeout
        options = f"-c search_path={self.schema} -c lock_timeout={int(busy_timeout_ms)}"
        kwargs: dict[str, object] = {
            "autocommit": True,
            "options": f"{given['options']} {options}" if given.get("options") else options,
        }
        defaults = {"connect_timeout": max(2, round(timeout_s)), "application_name": "netid-engine",
                    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
        kwargs.update({k: v for k, v in defaults.items() if k not in given})
        self._connect = lambda: psycopg.connect(conninfo, **kwargs)  # type: ignore[arg-type]
        self._enroll_key = advisory_key(self.schema, "enrollment")
        self._enroll_guard = threading.Lock()  # one thread per process waits on the database lock
        self._lock_conn: psycopg.Connection | None = None
        self._closed = False
        try:
            with self._connect() as conn:
                migrate(conn, self.schema)
        except psycopg.Error as exc:  # for the operator: libpq's first line names host and port
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            if unreachable(exc):
                raise errors.StoreUnavailable(f"cannot reach the PostgreSQL store: {why}",
                                              retry_after_ms=self._retry_after_ms) from exc
            raise errors.StoreError(f"cannot open the PostgreSQL store: {why}") from exc
        self._pool: ConnectionPool = ConnectionPool(
            conninfo, kwargs=kwargs, min_size=min_connections, max_size=max_connections, open=False,
            timeout=timeout_s, check=check_pooled, name=f"netid-{self.schema}",
            # a reconnection attempt backs off 1, 2, 4 s…; giving it up after timeout_s lets the
            # next request start a fresh one, so the store is back soon after the database is
            reconnect_timeout=timeout_s,
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    # -- connections and transactions -------------------------------------------------------
    def _error(self, exc: psycopg.Error) -> errors.EngineError:
        if unreachable(exc):
            return errors.StoreUnavailable(f"the database is unreachable ({type(exc).__name__})",
                                           retry_after_ms=self._retry_after_ms)
        if isinstance(exc, PoolClosed):
            return errors.StoreError("the store is closed")
        if isinstance(exc, psycopg.errors.UniqueViolation):
            return errors.Conflict("a concurrent change to the same record won; retry from fresh state")
        if isinstance(exc, psycopg.DataError):  # e.g. a NUL character, which PostgreSQL text refuses
            return errors.InvalidMessage(f"a value cannot be stored ({type(exc).__name__})")
        return errors.StoreError(f"the transaction failed ({type(exc).__name__})")

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in autocommit mode; psycopg errors become engine errors."""
        if self._closed:
            raise errors.StoreError("the store is closed")
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection]:
        """One transaction; rolled back on any exception (``StoreUnavailable`` if the link broke)."""
        with self._connection() as conn, conn.transaction():
            yield conn

    def _read(self, query: str, args: tuple = ()) -> list[tuple]:
        """One statement, written with ``?`` placeholders."""
        with self._connection() as conn:
            return conn.execute(self._sql(query), args).fetchall()  # type: ignore[arg-type]

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """``SELECT 1`` on a pooled connection (checked before use): False while the database
        cannot be reached within ``timeout_s``. The pool reconnects meanwhile, so the probe
        turns True again by itself once the database is back."""
        if self._closed:
            return False
        try:
            with self._pool.connection(timeout=timeout_s) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        with self._enroll_guard:
            self._drop_lock_connection()

    # -- the enrollment lock ------------------------------------------------------------------------
    def _drop_lock_connection(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            conn.close()  # a session's advisory locks end with it

    def _take_enrollment_lock(self) -> None:
        """Under ``_enroll_guard``. A kept connection that died since its last use (the
        database restarted) is replaced once, so the first enrollment after does not fail."""
        while True:
            fresh = self._lock_conn is None or self._lock_conn.closed
            try:
                if fresh:
                    self._lock_conn = self._connect()
                    self._lock_conn.execute(f"SET lock_timeout = {int(self._enrollment_wait_s * 1000)}")
                self._lock_conn.execute("SELECT pg_advisory_lock(%s)", (self._enroll_key,))
                return
            except psycopg.errors.LockNotAvailable:
                raise
            except psycopg.Error as exc:
                self._drop_lock_connection()
                if fresh or not unreachable(exc):
                    raise

    @contextmanager
    def enrollment_lock(self) -> Iterator[None]:
        """``pg_advisory_lock`` on a connection of its own (outside the pool, so waiting
        enrollments cannot starve it), held for the block: one enrollment at a time across
        every node on this schema. Waiting longer than ``enrollment_wait_s`` raises
        ``Overloaded``. If the database drops the lock's session, the database frees the lock;
        the next enrollment reconnects."""
        if self._closed:
            raise errors.StoreError("the store is closed")
        busy = errors.Overloaded("enrollments are queued; retry later", retry_after_ms=self._retry_after_ms)
        if not self._enroll_guard.acquire(timeout=self._enrollment_wait_s):
            raise busy
        try:
            try:
                self._take_enrollment_lock()
            except psycopg.errors.LockNotAvailable:
                raise busy from None
            except psycopg.Error as exc:
                raise self._error(exc) from exc
            try:
                yield
            finally:
                try:
                    self._lock_conn.execute("SELECT pg_advisory_unlock(%s)", (self._enroll_key,))
                except psycopg.Error:
                    self._drop_lock_connection()
        finally:
            self._enroll_guard.release()

    # -- audit --------------------------------------------------------------------------------------
    @staticmethod
    def _audit(
        conn: psycopg.Connection, *, actor: str, action: str, subject: str, outcome: str,
        detail: dict[str, AuditValue] | None, now: float,
    ) -> None:
        append_audit(conn, "%s", actor=actor, action=action, subject=subject, outcome=outcome,
                     detail=detail, now=now)

    def audit(
        self, *, actor: str, action: str, subject: str, outcome: str,
        detail: dict[str, AuditValue] | None = None, now: float,
    ) -> None:
        with self._connection() as conn:  # one INSERT: atomic on its own
            self._audit(conn, actor=actor, action=action, subject=subject, outcome=outcome,
                        detail=detail, now=now)
