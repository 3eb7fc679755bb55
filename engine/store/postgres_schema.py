"""The PostgreSQL store's schema: versioned migrations, applied at start-up.

Each migration is a list of statements run in one transaction with its row in
``schema_version``; a node applies the ones it has not seen, under a transaction
advisory lock keyed by the schema, so several nodes starting at once migrate once.
A database newer than this engine is refused rather than used.
"""

from __future__ import annotations

import hashlib

import psycopg
from psycopg import sql

from .. import errors
from .sql_log import LOG_BACKFILL

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "advisory_key", "migrate"]

# Migration 1: the tables of the SQLite store (engine/store/sqlite_db.py), with bytea for
# bytes, double precision for times and identity columns for the row ids.
_V1 = [
    """CREATE TABLE cards (
        card_number text PRIMARY KEY,
        name text NOT NULL,
        photo_path text NOT NULL,
        status text NOT NULL CHECK (status IN ('valid', 'lost', 'revoked', 'expired')),
        photo_template bytea,
        updated_at double precision NOT NULL
    )""",
    # ``seq`` orders credentials that share a key and a time, as SQLite's rowid does.
    """CREATE TABLE credentials (
        credential_id text PRIMARY KEY,
        seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        card_number text NOT NULL REFERENCES cards(card_number),
        version integer NOT NULL CHECK (version >= 1),
        level text NOT NULL CHECK (level IN ('basic', 'high')),
        device_key bytea NOT NULL CHECK (octet_length(device_key) = 32),
        status text NOT NULL CHECK (status IN ('active', 'voided', 'suspended')),
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        UNIQUE (card_number, version)
    )""",
    # A key is bound to at most one credential that is not voided; a card has at most one
    # live (active or suspended) credential.
    "CREATE UNIQUE INDEX credentials_bound_key ON credentials(device_key) WHERE status <> 'voided'",
    "CREATE INDEX credentials_key ON credentials(device_key)",
    "CREATE UNIQUE INDEX credentials_live_card ON credentials(card_number) WHERE status <> 'voided'",
    # Template ids come from a sequence: never reused, so a stale FAISS id cannot alias.
    """CREATE TABLE templates (
        template_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        credential_id text NOT NULL REFERENCES credentials(credential_id) ON DELETE CASCADE,
        modality text NOT NULL CHECK (modality IN ('face', 'voice')),
        ciphertext bytea NOT NULL
    )""",
    "CREATE INDEX templates_credential ON templates(credential_id)",
    """CREATE TABLE retired_devices (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_key bytea NOT NULL,
        credential_id text NOT NULL REFERENCES credentials(credential_id),
        retired_at double precision NOT NULL
    )""",
    "CREATE INDEX retired_devices_key ON retired_devices(device_key)",
    """CREATE TABLE attestations (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        credential_id text NOT NULL REFERENCES credentials(credential_id),
        level text NOT NULL,
        attestation bytea NOT NULL,
        actor text NOT NULL,
        ts double precision NOT NULL
    )""",
    """CREATE TABLE relying_parties (
        rp_id text PRIMARY KEY,
        display_name text NOT NULL,
        sign_key bytea NOT NULL CHECK (octet_length(sign_key) = 32),
        box_key bytea NOT NULL CHECK (octet_length(box_key) = 32),
        max_level text NOT NULL CHECK (max_level IN ('basic', 'high')),
        quota_per_minute bigint NOT NULL CHECK (quota_per_minute > 0),
        status text NOT NULL CHECK (status IN ('active', 'disabled')),
        created_at double precision NOT NULL
    )""",
    """CREATE TABLE acceptance_points (
        ap_id text PRIMARY KEY,
        name text NOT NULL,
        sign_key bytea NOT NULL CHECK (octet_length(sign_key) = 32),
        status text NOT NULL CHECK (status IN ('active', 'disabled')),
        created_at double precision NOT NULL
    )""",
    # ``detail`` is the JSON text the caller's map was checked and encoded into, as in SQLite.
    """CREATE TABLE audit (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts double precision NOT NULL,
        actor text NOT NULL,
        action text NOT NULL,
        subject text NOT NULL,
        outcome text NOT NULL,
        detail text NOT NULL
    )""",
    "CREATE INDEX audit_subject ON audit(subject, seq)",
    # Append-only: UPDATE, DELETE and TRUNCATE are refused for every role, owner included.
    """CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the audit log is append-only' USING ERRCODE = 'insufficient_privilege';
    END $$""",
    """CREATE TRIGGER audit_no_update_or_delete BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION audit_append_only()""",
    """CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
        FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()""",
]

# Migration 2: the template change log that node-local indexes follow
# (engine.matching.duplicates), filled with an addition for every template of an active
# credential, and the store's identity (an index file names the store it was built from).
# Writers append to the log under a transaction advisory lock, so ``seq`` order is commit
# order and a reader that has seen ``seq`` n has seen everything before it.
_V2 = [
    """CREATE TABLE template_log (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        template_id bigint NOT NULL,
        credential_id text NOT NULL,
        modality text NOT NULL CHECK (modality IN ('face', 'voice')),
        op text NOT NULL CHECK (op IN ('add', 'remove'))
    )""",
    LOG_BACKFILL,
    "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
    "INSERT INTO meta(key, value) VALUES ('store_id', replace(gen_random_uuid()::text, '-', ''))",
]

#: (version, statements), in order; a new migration goes at the end and never edits an old one.
MIGRATIONS: tuple[tuple[int, list[str]], ...] = ((1, _V1), (2, _V2))
SCHEMA_VERSION = MIGRATIONS[-1][0]


def advisory_key(schema: str, purpose: str) -> int:
    """A signed 64-bit advisory-lock key for ``purpose`` in ``schema`` (schemas do not contend)."""
    digest = hashlib.blake2b(f"netid:{schema}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def migrate(conn: psycopg.Connection, schema: str) -> int:
    """Bring ``schema`` up to ``SCHEMA_VERSION`` in one transaction; returns the version it found.

    ``conn`` is in autocommit mode. The transaction takes ``pg_advisory_xact_lock`` first, so
    a second node starting at the same moment waits, then finds the work done.
    """
    name = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(schema, "migrate"),))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(name))
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_version (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"""
        )
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise errors.StoreError(
                f"database schema version {found} is not supported (this engine uses {SCHEMA_VERSION})"
            )
        for version, statements in MIGRATIONS:
            if version <= found:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version(version) VALUES (%s)", (version,))
    return found
