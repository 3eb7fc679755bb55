"""The SQLite file under the embedded store: connections, transactions, schema.

One connection per thread (``threading.local``); the connections of threads that
have ended are closed when the next one is opened (worker threads come and go),
and ``close()`` closes the rest. ``synchronous=FULL``, foreign keys on, a
``busy_timeout`` for writers that queue behind one another; every write is one
``BEGIN IMMEDIATE … COMMIT``, which appends its audit rows itself (``_audit``).
The schema is created on first use and versioned: a database of an older version is
migrated forward in one transaction (``_MIGRATIONS``); a newer one is refused.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from .. import errors
from .sql_log import LOG_BACKFILL
from .base import AuditValue
from .sql_rows import (  # the row layout, shared with the PostgreSQL store (re-exported)
    SqlAudit,
    acceptance_point_of,
    append_audit,
    credential_of,
    relying_party_of,
    template_of,
)
from .sql_rows import AP_COLS as AP_COLS, CRED_COLS as CRED_COLS, RP_COLS as RP_COLS, TPL_COLS as TPL_COLS

__all__ = ["SCHEMA_VERSION", "SqliteFile", "credential_of", "template_of", "relying_party_of", "acceptance_point_of"]

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cards (
    card_number TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    photo_path TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('valid', 'lost', 'revoked', 'expired')),
    photo_template BLOB,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS credentials (
    credential_id TEXT PRIMARY KEY,
    card_number TEXT NOT NULL REFERENCES cards(card_number),
    version INTEGER NOT NULL CHECK (version >= 1),
    level TEXT NOT NULL CHECK (level IN ('basic', 'high')),
    device_key BLOB NOT NULL CHECK (length(device_key) = 32),
    status TEXT NOT NULL CHECK (status IN ('active', 'voided', 'suspended')),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (card_number, version)
);
-- A key is bound to at most one credential that is not voided.
CREATE UNIQUE INDEX IF NOT EXISTS credentials_bound_key
    ON credentials(device_key) WHERE status != 'voided';
CREATE INDEX IF NOT EXISTS credentials_key ON credentials(device_key);
-- At most one live (active or suspended) credential per card.
CREATE UNIQUE INDEX IF NOT EXISTS credentials_live_card
    ON credentials(card_number) WHERE status != 'voided';
CREATE TABLE IF NOT EXISTS templates (
    template_id INTEGER PRIMARY KEY AUTOINCREMENT,
    credential_id TEXT NOT NULL REFERENCES credentials(credential_id) ON DELETE CASCADE,
    modality TEXT NOT NULL CHECK (modality IN ('face', 'voice')),
    ciphertext BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS templates_credential ON templates(credential_id);
CREATE TABLE IF NOT EXISTS retired_devices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_key BLOB NOT NULL,
    credential_id TEXT NOT NULL REFERENCES credentials(credential_id),
    retired_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS retired_devices_key ON retired_devices(device_key);
CREATE TABLE IF NOT EXISTS attestations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    credential_id TEXT NOT NULL REFERENCES credentials(credential_id),
    level TEXT NOT NULL,
    attestation BLOB NOT NULL,
    actor TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS relying_parties (
    rp_id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    sign_key BLOB NOT NULL CHECK (length(sign_key) = 32),
    box_key BLOB NOT NULL CHECK (length(box_key) = 32),
    max_level TEXT NOT NULL CHECK (max_level IN ('basic', 'high')),
    quota_per_minute INTEGER NOT NULL CHECK (quota_per_minute > 0),
    status TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS acceptance_points (
    ap_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    sign_key BLOB NOT NULL CHECK (length(sign_key) = 32),
    status TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_subject ON audit(subject, seq);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

# Version 2: the template change log that node-local indexes follow (engine.matching.duplicates),
# filled with an addition for every template of an active credential, and the store's
# identity (an index file names the store it was built from).
_V2 = [
    """CREATE TABLE template_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        template_id INTEGER NOT NULL,
        credential_id TEXT NOT NULL,
        modality TEXT NOT NULL CHECK (modality IN ('face', 'voice')),
        op TEXT NOT NULL CHECK (op IN ('add', 'remove'))
    )""",
    LOG_BACKFILL,
    "INSERT INTO meta(key, value) VALUES ('store_id', lower(hex(randomblob(16))))",
]

#: (version, statements) applied in order to a database at the version before; never edited.
_MIGRATIONS: tuple[tuple[int, list[str]], ...] = ((2, _V2),)


class SqliteFile(SqlAudit):
    """One SQLite database file, used from any number of threads."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000) -> None:
        if busy_timeout_ms < 0:
            raise errors.ConfigError("busy_timeout_ms must be >= 0")
        self._path = os.fspath(path)
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._local = threading.local()
        self._conns: list[tuple[weakref.ref[threading.Thread], sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        if not os.path.exists(self._path):
            try:  # owner-only: the file holds names and encrypted templates
                os.close(os.open(self._path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                raise errors.StoreError(f"cannot create the database file ({exc.strerror})") from exc
        self._migrate()

    # -- connections and transactions -------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise errors.StoreError("the store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            conn = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False,
                timeout=self._busy_timeout_ms / 1000,
            )
        except sqlite3.Error as exc:
            raise errors.StoreError(f"cannot open the database ({type(exc).__name__})") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise errors.StoreError("the database cannot use WAL mode")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except (sqlite3.Error, errors.StoreError) as exc:
            conn.close()
            if isinstance(exc, errors.StoreError):
                raise
            raise errors.StoreError(f"cannot open the database ({type(exc).__name__})") from exc
        with self._conns_lock:
            if self._closed:
                conn.close()
                raise errors.StoreError("the store is closed")
            live = []
            for ref, other in self._conns:
                thread = ref()
                if thread is not None and thread.is_alive():
                    live.append((ref, other))
                else:  # its thread has ended, so nothing can be using it
                    other.close()
            live.append((weakref.ref(threading.current_thread()), conn))
            self._conns = live
        self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; rolled back on any exception."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise errors.StoreError(f"cannot start a transaction ({type(exc).__name__})") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(exc, sqlite3.Error):
                raise errors.StoreError(f"the transaction failed ({type(exc).__name__})") from exc
            raise

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise errors.StoreError(f"a query failed ({type(exc).__name__})") from exc

    def _migrate(self) -> None:
        with self._write() as conn:
            has_meta = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            row = (
                conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if has_meta
                else None
            )
            if row is None:
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
                found = 1
            else:
                found = int(row[0])
            if found > SCHEMA_VERSION:
                raise errors.StoreError(
                    f"database schema version {found} is not supported (this engine uses {SCHEMA_VERSION})"
                )
            for version, statements in _MIGRATIONS:
                if version > found:
                    for statement in statements:
                        conn.execute(statement)
            if found != SCHEMA_VERSION:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def healthy(self) -> bool:
        """A file in this process: healthy until closed."""
        return not self._closed

    def close(self) -> None:
        with self._conns_lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for _, conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # -- audit ----------------------------------------------------------------------
    @staticmethod
    def _audit(
        conn: sqlite3.Connection, *, actor: str, action: str, subject: str, outcome: str,
        detail: dict[str, AuditValue] | None, now: float,
    ) -> None:
        append_audit(conn, "?", actor=actor, action=action, subject=subject, outcome=outcome,
                     detail=detail, now=now)

    def audit(
        self, *, actor: str, action: str, subject: str, outcome: str,
        detail: dict[str, AuditValue] | None = None, now: float,
    ) -> None:
        with self._write() as conn:
            self._audit(conn, actor=actor, action=action, subject=subject, outcome=outcome,
                        detail=detail, now=now)
