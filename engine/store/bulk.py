"""Bulk enrollment: many cards with their credentials and sealed templates, in one transaction.

For loading a register from another system (and the register benchmark): each batch is
one transaction that inserts the cards, one active credential per card, its templates and
their ``add`` rows in the template change log, and one audit row for the batch. SQLite
takes ``executemany``; PostgreSQL ``COPY``. The cards must be new: a batch that names a
card already in the store fails whole (the store's unique keys refuse it). The enrollment
checks (card photo, duplicate search) are not run: what is loaded is taken as enrolled.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import msgspec

from .base import MODALITIES, check_choice, check_key, check_text

__all__ = ["BulkCredential", "bulk_enroll"]


class BulkCredential(msgspec.Struct, frozen=True, kw_only=True):
    card_number: str
    name: str
    device_key: bytes  # 32 bytes
    templates: list[tuple[str, bytes]]  # (modality, ciphertext sealed to the card)


def _rows(batch: Sequence[BulkCredential], now: float, template_ids: list[int]):
    cards, creds, templates, log = [], [], [], []
    it = iter(template_ids)
    for b in batch:
        check_text(b.card_number, "card_number", limit=64)
        check_text(b.name, "name")
        key = check_key(b.device_key, "device_key")
        cid = secrets.token_urlsafe(16)
        cards.append((b.card_number, b.name, "bulk", "valid", now))
        creds.append((cid, b.card_number, 1, "basic", key, "active", now, now))
        for modality, ciphertext in b.templates:
            check_choice(modality, MODALITIES, "modality")
            tid = next(it)
            templates.append((tid, cid, modality, bytes(ciphertext)))
            log.append((tid, cid, modality, "add"))
    return cards, creds, templates, log


def bulk_enroll(store: Any, batch: Sequence[BulkCredential], *, actor: str, now: float) -> list[str]:
    """Enrolls ``batch`` in one transaction of ``store`` (a SQLite or PostgreSQL store);
    returns the ids of the credentials issued, in order."""
    if not batch:
        return []
    n_templates = sum(len(b.templates) for b in batch)
    postgres = hasattr(store, "_lock_conn")
    with store._write() as conn:
        if postgres:
            ids = [r[0] for r in conn.execute(
                "SELECT nextval(pg_get_serial_sequence('templates', 'template_id'))"
                " FROM generate_series(1, %s)", (n_templates,))]
        else:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'templates'").fetchone()
            top = max(row[0] if row else 0, conn.execute("SELECT COALESCE(MAX(template_id), 0) FROM templates").fetchone()[0])
            ids = list(range(top + 1, top + 1 + n_templates))
        cards, creds, templates, log = _rows(batch, now, ids)
        tables = (
            ("cards(card_number, name, photo_path, status, updated_at)", cards),
            ("credentials(credential_id, card_number, version, level, device_key, status, created_at, updated_at)", creds),
            ("templates(template_id, credential_id, modality, ciphertext)", templates),
        )
        for table, rows in tables:
            _insert(conn, postgres, table, rows)
        store._lock_log(conn)
        _insert(conn, postgres, "template_log(template_id, credential_id, modality, op)", log)
        store._audit(conn, actor=actor, action="registry.bulk_enroll", subject="registry", outcome="ok",
                     detail={"credentials": len(batch), "templates": n_templates}, now=now)
    return [c[0] for c in creds]


def _insert(conn: Any, postgres: bool, table: str, rows: list[tuple]) -> None:
    if postgres:
        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    else:
        marks = ", ".join("?" * len(rows[0]))
        conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
