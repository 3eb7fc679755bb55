"""The embedded ``Store``: one SQLite file in WAL mode (see ``sqlite_db``).

Every transition runs inside ``BEGIN IMMEDIATE … COMMIT`` and appends its audit
rows in the same transaction: a SIGKILL leaves the state before or after it, never
between. The audit table refuses UPDATE and DELETE (triggers). The enrollment lock
is a lock per database file in this process.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import msgspec

from .. import errors
from .base import (
    CARD_STATUSES,
    CREDENTIAL_STATUSES,
    LEVELS,
    MODALITIES,
    PARTY_STATUSES,
    AcceptancePoint,
    CardRecord,
    Credential,
    RelyingParty,
    TemplateRow,
    check_choice as _one_of,
    check_key as _key,
    check_text as _text,
    raise_unless_active,
    raise_unless_card_valid,
)
from .sqlite_db import (
    AP_COLS as _AP_COLS,
    CRED_COLS as _CRED_COLS,
    RP_COLS as _RP_COLS,
    SCHEMA_VERSION,
    TPL_COLS as _TPL_COLS,
    SqliteFile,
    acceptance_point_of as _ap,
    credential_of as _cred,
    relying_party_of as _rp,
    template_of as _tpl,
)

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_TEMPLATE_PAGE = 1000
_CRED_COLS_C = ", ".join(f"c.{col}" for col in _CRED_COLS.split(", "))

#: One enrollment lock per database file in this process (two stores on one file share it).
_ENROLL_LOCKS: dict[str, threading.Lock] = {}
_ENROLL_LOCKS_GUARD = threading.Lock()


class SqliteStore(SqliteFile):
    """``Store`` on one SQLite file. Thread-safe; see the module docstring."""

    def enrollment_lock(self) -> threading.Lock:
        """A lock per database file, in this process. The duplicate search it guards is
        an index in this process's memory, so one SQLite file serves one engine process."""
        key = os.path.realpath(self._path)
        with _ENROLL_LOCKS_GUARD:
            return _ENROLL_LOCKS.setdefault(key, threading.Lock())

    # -- ID-card registry ---------------------------------------------------------------
    def import_cards(
        self, records: Iterable[CardRecord], *, actor: str, now: float | None = None
    ) -> int:
        ts = time.time() if now is None else now
        count = 0
        with self._write() as conn:
            for rec in records:
                _text(rec.card_number, "card_number", limit=64)
                _text(rec.name, "name")
                _text(rec.photo_path, "photo_path", limit=4096)
                _one_of(rec.status, CARD_STATUSES, "card status")
                old = conn.execute(
                    "SELECT status FROM cards WHERE card_number = ?", (rec.card_number,)
                ).fetchone()
                # A new photo path drops the stale photo template unless one is given.
                conn.execute(
                    """INSERT INTO cards(card_number, name, photo_path, status, photo_template, updated_at)
                    VALUES (?, ?, ?, ?, ?, ?)
                    ON CONFLICT(card_number) DO UPDATE SET
                        name = excluded.name, status = excluded.status,
                        photo_template = CASE
                            WHEN excluded.photo_template IS NOT NULL THEN excluded.photo_template
                            WHEN excluded.photo_path = cards.photo_path THEN cards.photo_template
                            ELSE NULL END,
                        photo_path = excluded.photo_path, updated_at = excluded.updated_at""",
                    (rec.card_number, rec.name, rec.photo_path, rec.status, rec.photo_template,
                     rec.updated_at or ts),
                )
                if rec.status == "lost" and (old is None or old[0] != "lost"):
                    self._suspend_card(conn, rec.card_number, actor=actor, now=ts)
                count += 1
            self._audit(conn, actor=actor, action="registry.import", subject="registry",
                        outcome="ok", detail={"cards": count}, now=ts)
        return count

    def get_card(self, card_number: str) -> CardRecord | None:
        rows = self._read(
            "SELECT card_number, name, photo_path, status, photo_template, updated_at"
            " FROM cards WHERE card_number = ?",
            (card_number,),
        )
        if not rows:
            return None
        r = rows[0]
        return CardRecord(
            card_number=r[0], name=r[1], photo_path=r[2], status=r[3],
            photo_template=None if r[4] is None else bytes(r[4]), updated_at=r[5],
        )

    def set_card_photo_template(self, card_number: str, ciphertext: bytes) -> None:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE cards SET photo_template = ? WHERE card_number = ?",
                (bytes(ciphertext), card_number),
            )
            if cur.rowcount != 1:
                raise errors.UnknownCard()

    def _suspend_card(self, conn: sqlite3.Connection, card_number: str, *, actor: str, now: float) -> list[str]:
        ids = [r[0] for r in conn.execute(
            "SELECT credential_id FROM credentials WHERE card_number = ? AND status = 'active'"
            " ORDER BY version", (card_number,))]
        for cid in ids:
            conn.execute(
                "UPDATE credentials SET status = 'suspended', updated_at = ? WHERE credential_id = ?",
                (now, cid),
            )
            self._audit(conn, actor=actor, action="credential.suspend", subject=cid,
                        outcome="ok", detail={"reason": "card_lost"}, now=now)
        return ids

    def report_card_lost(self, card_number: str, *, actor: str, now: float) -> list[str]:
        with self._write() as conn:
            row = conn.execute("SELECT status FROM cards WHERE card_number = ?", (card_number,)).fetchone()
            if row is None:
                raise errors.UnknownCard()
            conn.execute(
                "UPDATE cards SET status = 'lost', updated_at = ? WHERE card_number = ?", (now, card_number)
            )
            ids = self._suspend_card(conn, card_number, actor=actor, now=now)
            self._audit(conn, actor=actor, action="card.lost", subject=card_number, outcome="ok",
                        detail={"previous": row[0], "suspended": len(ids)}, now=now)
        return ids

    def reissue_card(self, card_number: str, *, actor: str, now: float) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT status FROM cards WHERE card_number = ?", (card_number,)).fetchone()
            if row is None:
                raise errors.UnknownCard()
            conn.execute(
                "UPDATE cards SET status = 'valid', updated_at = ? WHERE card_number = ?", (now, card_number)
            )
            self._audit(conn, actor=actor, action="card.reissue", subject=card_number, outcome="ok",
                        detail={"previous": row[0]}, now=now)

    # -- credentials -------------------------------------------------------------------------
    def issue_credential(
        self, *, card_number: str, device_key: bytes, templates: Sequence[tuple[str, bytes]],
        actor: str, now: float,
    ) -> tuple[Credential, list[TemplateRow], list[str]]:
        key = _key(device_key, "device_key")
        if not templates:
            raise errors.InvalidMessage("a credential needs at least one template")
        checked = [(_one_of(m, MODALITIES, "modality"), bytes(c)) for m, c in templates]
        with self._write() as conn:
            row = conn.execute("SELECT status FROM cards WHERE card_number = ?", (card_number,)).fetchone()
            raise_unless_card_valid(None if row is None else row[0])
            bound = conn.execute(
                "SELECT card_number FROM credentials WHERE device_key = ? AND status != 'voided'", (key,)
            ).fetchone()
            if bound is not None and bound[0] != card_number:
                raise errors.Conflict("this device key is already bound to another credential")
            voided = [r[0] for r in conn.execute(
                "SELECT credential_id FROM credentials WHERE card_number = ? AND status != 'voided'"
                " ORDER BY version", (card_number,))]
            for cid in voided:
                conn.execute(
                    "UPDATE credentials SET status = 'voided', updated_at = ? WHERE credential_id = ?",
                    (now, cid),
                )
                self._audit(conn, actor=actor, action="credential.void", subject=cid,
                            outcome="ok", detail={"reason": "reissued"}, now=now)
            conn.execute(
                "DELETE FROM templates WHERE credential_id IN"
                " (SELECT credential_id FROM credentials WHERE card_number = ?)", (card_number,)
            )
            version = conn.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM credentials WHERE card_number = ?", (card_number,)
            ).fetchone()[0]
            cred = Credential(
                credential_id=secrets.token_urlsafe(16), card_number=card_number, version=version,
                level="basic", device_key=key, status="active", created_at=now, updated_at=now,
            )
            conn.execute(
                f"INSERT INTO credentials({_CRED_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (cred.credential_id, cred.card_number, cred.version, cred.level, cred.device_key,
                 cred.status, cred.created_at, cred.updated_at),
            )
            rows: list[TemplateRow] = []
            for modality, ciphertext in checked:
                cur = conn.execute(
                    "INSERT INTO templates(credential_id, modality, ciphertext) VALUES (?, ?, ?)",
                    (cred.credential_id, modality, ciphertext),
                )
                rows.append(TemplateRow(template_id=cur.lastrowid, credential_id=cred.credential_id,
                                        modality=modality, ciphertext=ciphertext))
            self._audit(conn, actor=actor, action="credential.issue", subject=cred.credential_id,
                        outcome="ok", detail={"card": card_number, "version": version,
                                              "templates": len(rows), "voided": len(voided)},
                        now=now)
        return cred, rows, voided

    def get_credential(self, credential_id: str) -> Credential | None:
        rows = self._read(f"SELECT {_CRED_COLS} FROM credentials WHERE credential_id = ?", (credential_id,))
        return _cred(rows[0]) if rows else None

    def credential_by_device(self, device_key: bytes) -> Credential | None:
        rows = self._read(
            f"SELECT {_CRED_COLS} FROM credentials WHERE device_key = ?"
            " ORDER BY status = 'voided', updated_at DESC, rowid DESC LIMIT 1",
            (bytes(device_key),),
        )
        return _cred(rows[0]) if rows else None

    def retired_device(self, device_key: bytes) -> str | None:
        rows = self._read(
            "SELECT credential_id FROM retired_devices WHERE device_key = ?1 AND NOT EXISTS"
            " (SELECT 1 FROM credentials WHERE device_key = ?1 AND status != 'voided')"
            " ORDER BY id DESC LIMIT 1",
            (bytes(device_key),),
        )
        return rows[0][0] if rows else None

    def _live(self, conn: sqlite3.Connection, credential_id: str) -> Credential:
        """The credential, if it exists and is active, else the matching error."""
        row = conn.execute(f"SELECT {_CRED_COLS} FROM credentials WHERE credential_id = ?",
                           (credential_id,)).fetchone()
        return raise_unless_active(None if row is None else _cred(row))

    def rebind_device(
        self, credential_id: str, *, expected_device_key: bytes, new_device_key: bytes,
        actor: str, now: float,
    ) -> Credential:
        expected = _key(expected_device_key, "expected_device_key")
        new = _key(new_device_key, "new_device_key")
        with self._write() as conn:
            cred = self._live(conn, credential_id)
            if not secrets.compare_digest(cred.device_key, expected):
                raise errors.Conflict("the device key changed concurrently; retry from fresh state")
            taken = conn.execute(
                "SELECT 1 FROM credentials WHERE device_key = ? AND status != 'voided'", (new,)
            ).fetchone()
            if taken is not None:
                raise errors.Conflict("the new device key is already bound to a credential")
            conn.execute(
                "INSERT INTO retired_devices(device_key, credential_id, retired_at) VALUES (?, ?, ?)",
                (cred.device_key, credential_id, now),
            )
            conn.execute(
                "UPDATE credentials SET device_key = ?, updated_at = ? WHERE credential_id = ?",
                (new, now, credential_id),
            )
            self._audit(conn, actor=actor, action="device.rebind", subject=credential_id,
                        outcome="ok", detail=None, now=now)
        return msgspec.structs.replace(cred, device_key=new, updated_at=now)

    def set_level(
        self, credential_id: str, level: str, *, actor: str, now: float, attestation: bytes
    ) -> Credential:
        _one_of(level, LEVELS, "level")
        if not isinstance(attestation, (bytes, bytearray, memoryview)) or not attestation:
            raise errors.InvalidMessage("the attestation must be non-empty bytes")
        with self._write() as conn:
            cred = self._live(conn, credential_id)
            cur = conn.execute(
                "INSERT INTO attestations(credential_id, level, attestation, actor, ts) VALUES (?, ?, ?, ?, ?)",
                (credential_id, level, bytes(attestation), actor, now),
            )
            conn.execute(
                "UPDATE credentials SET level = ?, updated_at = ? WHERE credential_id = ?",
                (level, now, credential_id),
            )
            self._audit(conn, actor=actor, action="credential.level", subject=credential_id,
                        outcome="ok", detail={"from": cred.level, "to": level,
                                              "attestation": cur.lastrowid}, now=now)
        return msgspec.structs.replace(cred, level=level, updated_at=now)

    def active_templates(self, modality: str | None = None) -> Iterator[TemplateRow]:
        """Streams in pages by template id; no read transaction is held between pages."""
        if modality is not None:
            _one_of(modality, MODALITIES, "modality")
        last = 0
        while True:
            rows = self._read(
                "SELECT t.template_id, t.credential_id, t.modality, t.ciphertext FROM templates t"
                " JOIN credentials c ON c.credential_id = t.credential_id"
                " WHERE c.status = 'active' AND t.template_id > ? AND (?2 IS NULL OR t.modality = ?2)"
                " ORDER BY t.template_id LIMIT ?3",
                (last, modality, _TEMPLATE_PAGE),
            )
            for r in rows:
                yield _tpl(r)
            if len(rows) < _TEMPLATE_PAGE:
                return
            last = rows[-1][0]

    def templates_of(self, credential_id: str) -> list[TemplateRow]:
        rows = self._read(
            f"SELECT {_TPL_COLS} FROM templates WHERE credential_id = ? ORDER BY template_id",
            (credential_id,),
        )
        return [_tpl(r) for r in rows]

    def credential_with_templates(self, credential_id: str) -> tuple[Credential | None, list[TemplateRow]]:
        rows = self._read(
            f"SELECT {_CRED_COLS_C}, t.template_id, t.modality, t.ciphertext FROM credentials c"
            " LEFT JOIN templates t ON t.credential_id = c.credential_id"
            " WHERE c.credential_id = ? ORDER BY t.template_id",
            (credential_id,),
        )
        if not rows:
            return None, []
        cred = _cred(rows[0][:8])
        return cred, [
            TemplateRow(template_id=r[8], credential_id=credential_id, modality=r[9], ciphertext=bytes(r[10]))
            for r in rows if r[8] is not None
        ]

    def count_credentials(self) -> dict[str, int]:
        counts = dict.fromkeys(CREDENTIAL_STATUSES, 0)
        for status, n in self._read("SELECT status, COUNT(*) FROM credentials GROUP BY status"):
            counts[status] = n
        return counts

    # -- relying parties and acceptance points -------------------------------------------
    def add_relying_party(self, rp: RelyingParty, *, actor: str) -> None:
        _text(rp.rp_id, "rp_id", limit=128)
        _text(rp.display_name, "display_name")
        _key(rp.sign_key, "sign_key")
        _key(rp.box_key, "box_key")
        _one_of(rp.max_level, LEVELS, "max_level")
        _one_of(rp.status, PARTY_STATUSES, "status")
        if not isinstance(rp.quota_per_minute, int) or rp.quota_per_minute <= 0:
            raise errors.InvalidMessage("quota_per_minute must be a positive integer")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM relying_parties WHERE rp_id = ?", (rp.rp_id,)).fetchone():
                raise errors.Conflict("a relying party with this id already exists")
            conn.execute(
                f"INSERT INTO relying_parties({_RP_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rp.rp_id, rp.display_name, bytes(rp.sign_key), bytes(rp.box_key), rp.max_level,
                 rp.quota_per_minute, rp.status, rp.created_at),
            )
            self._audit(conn, actor=actor, action="rp.add", subject=rp.rp_id, outcome="ok",
                        detail={"max_level": rp.max_level, "quota_per_minute": rp.quota_per_minute},
                        now=rp.created_at)

    def get_relying_party(self, rp_id: str) -> RelyingParty | None:
        rows = self._read(f"SELECT {_RP_COLS} FROM relying_parties WHERE rp_id = ?", (rp_id,))
        return _rp(rows[0]) if rows else None

    def list_relying_parties(self) -> list[RelyingParty]:
        return [_rp(r) for r in self._read(f"SELECT {_RP_COLS} FROM relying_parties ORDER BY rp_id")]

    def set_relying_party_status(
        self, rp_id: str, status: str, *, actor: str, now: float | None = None
    ) -> RelyingParty:
        _one_of(status, PARTY_STATUSES, "status")
        ts = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute(f"SELECT {_RP_COLS} FROM relying_parties WHERE rp_id = ?", (rp_id,)).fetchone()
            if row is None:
                raise errors.UnknownRelyingParty()
            conn.execute("UPDATE relying_parties SET status = ? WHERE rp_id = ?", (status, rp_id))
            self._audit(conn, actor=actor, action="rp.status", subject=rp_id, outcome="ok",
                        detail={"from": row[6], "to": status}, now=ts)
        return msgspec.structs.replace(_rp(row), status=status)

    def add_acceptance_point(self, ap: AcceptancePoint, *, actor: str) -> None:
        _text(ap.ap_id, "ap_id", limit=128)
        _text(ap.name, "name")
        _key(ap.sign_key, "sign_key")
        _one_of(ap.status, PARTY_STATUSES, "status")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM acceptance_points WHERE ap_id = ?", (ap.ap_id,)).fetchone():
                raise errors.Conflict("an acceptance point with this id already exists")
            conn.execute(
                f"INSERT INTO acceptance_points({_AP_COLS}) VALUES (?, ?, ?, ?, ?)",
                (ap.ap_id, ap.name, bytes(ap.sign_key), ap.status, ap.created_at),
            )
            self._audit(conn, actor=actor, action="ap.add", subject=ap.ap_id, outcome="ok",
                        detail=None, now=ap.created_at)

    def get_acceptance_point(self, ap_id: str) -> AcceptancePoint | None:
        rows = self._read(f"SELECT {_AP_COLS} FROM acceptance_points WHERE ap_id = ?", (ap_id,))
        return _ap(rows[0]) if rows else None

    def list_acceptance_points(self) -> list[AcceptancePoint]:
        return [_ap(r) for r in self._read(f"SELECT {_AP_COLS} FROM acceptance_points ORDER BY ap_id")]

    def set_acceptance_point_status(
        self, ap_id: str, status: str, *, actor: str, now: float | None = None
    ) -> AcceptancePoint:
        _one_of(status, PARTY_STATUSES, "status")
        ts = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute(f"SELECT {_AP_COLS} FROM acceptance_points WHERE ap_id = ?", (ap_id,)).fetchone()
            if row is None:
                raise errors.UnknownAcceptancePoint()
            conn.execute("UPDATE acceptance_points SET status = ? WHERE ap_id = ?", (status, ap_id))
            self._audit(conn, actor=actor, action="ap.status", subject=ap_id, outcome="ok",
                        detail={"from": row[3], "to": status}, now=ts)
        return msgspec.structs.replace(_ap(row), status=status)
