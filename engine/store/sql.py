"""The ``Store`` transitions and reads that the SQLite and PostgreSQL stores share.

Statements are written once, with ``?`` placeholders; ``_sql`` turns them into the
dialect's (``%s`` for psycopg). The spots where the dialects truly differ are hooks a
subclass sets: ``_FOR_UPDATE`` (row locks; SQLite's single writer needs none),
``_COLLATE`` (byte order of ids), ``_ROW_ORDER`` (insertion order of credentials) and
``_insert_id`` (the id of a row just inserted). Every transition is one transaction
(``_write``) that appends its audit rows itself (``_audit``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

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
from .sql_log import TemplateLog
from .sql_rows import (
    AP_COLS,
    CRED_COLS,
    RP_COLS,
    TPL_COLS,
    SqlAudit,
    acceptance_point_of,
    credential_of,
    relying_party_of,
    template_of,
)

__all__ = ["SqlStore"]

_CRED_COLS_C = ", ".join(f"c.{col}" for col in CRED_COLS.split(", "))


class SqlStore(TemplateLog, SqlAudit):
    """The ``Store`` protocol on an SQL database; a subclass supplies ``_write``, ``_read``,
    ``_audit``, ``enrollment_lock``, ``_template_page`` and the dialect hooks."""

    _FOR_UPDATE = ""  # appended to a SELECT whose rows the transaction decides on
    _COLLATE = ""  # appended to ORDER BY of ids, for byte order
    _ROW_ORDER = "rowid"  # a column in the order credentials were inserted

    def _run(self, conn: Any, query: str, args: tuple = ()) -> Any:
        return conn.execute(self._sql(query), args)

    def _insert_id(self, conn: Any, query: str, args: tuple, column: str) -> int:
        """Runs the INSERT ``query``; the ``column`` (the row id) of the new row."""
        return self._run(conn, query, args).lastrowid

    def _template_page(self) -> int:
        raise NotImplementedError

    # -- ID-card registry ------------------------------------------------------------------
    def import_cards(
        self, records: Iterable[CardRecord], *, actor: str, now: float | None = None
    ) -> int:
        ts = time.time() if now is None else now
        count = 0
        suspended: list[tuple[int, str, str]] = []
        with self._write() as conn:
            for rec in records:
                _text(rec.card_number, "card_number", limit=64)
                _text(rec.name, "name")
                _text(rec.photo_path, "photo_path", limit=4096)
                _one_of(rec.status, CARD_STATUSES, "card status")
                old = self._lock_card(conn, rec.card_number)
                # A new photo path drops the stale photo template unless one is given.
                self._run(
                    conn,
                    """INSERT INTO cards(card_number, name, photo_path, status, photo_template, updated_at)
                    VALUES (?, ?, ?, ?, ?, ?)
                    ON CONFLICT (card_number) DO UPDATE SET
                        name = excluded.name, status = excluded.status,
                        photo_template = CASE
                            WHEN excluded.photo_template IS NOT NULL THEN excluded.photo_template
                            WHEN excluded.photo_path = cards.photo_path THEN cards.photo_template
                            ELSE NULL END,
                        photo_path = excluded.photo_path, updated_at = excluded.updated_at""",
                    (rec.card_number, rec.name, rec.photo_path, rec.status, rec.photo_template,
                     rec.updated_at or ts),
                )
                if rec.status == "lost" and old != "lost":
                    ids = self._suspend_card(conn, rec.card_number, actor=actor, now=ts, log=False)
                    suspended += self._templates_of_credentials(conn, ids)
                count += 1
            self._log(conn, suspended, "remove")
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
            cur = self._run(conn, "UPDATE cards SET photo_template = ? WHERE card_number = ?",
                            (bytes(ciphertext), card_number))
            if cur.rowcount != 1:
                raise errors.UnknownCard()

    def _lock_card(self, conn: Any, card_number: str) -> str | None:
        """The card's status (its row locked to the end of the transaction); ``None``: no such card."""
        row = self._run(conn, f"SELECT status FROM cards WHERE card_number = ?{self._FOR_UPDATE}",
                        (card_number,)).fetchone()
        return None if row is None else row[0]

    def _set_status(self, conn: Any, ids: list[str], status: str, reason: str, action: str,
                    *, actor: str, now: float) -> None:
        for cid in ids:
            self._run(conn, "UPDATE credentials SET status = ?, updated_at = ? WHERE credential_id = ?",
                      (status, now, cid))
            self._audit(conn, actor=actor, action=action, subject=cid,
                        outcome="ok", detail={"reason": reason}, now=now)

    def _suspend_card(self, conn: Any, card_number: str, *, actor: str, now: float, log: bool = True) -> list[str]:
        """Suspends the card's active credentials; with ``log``, their templates leave the
        change log's active set here (else the caller logs them at the end of its transaction)."""
        ids = [r[0] for r in self._run(
            conn, "SELECT credential_id FROM credentials WHERE card_number = ? AND status = 'active'"
            f" ORDER BY version{self._FOR_UPDATE}", (card_number,))]
        self._set_status(conn, ids, "suspended", "card_lost", "credential.suspend", actor=actor, now=now)
        if log:
            self._log(conn, self._templates_of_credentials(conn, ids), "remove")
        return ids

    def report_card_lost(self, card_number: str, *, actor: str, now: float) -> list[str]:
        with self._write() as conn:
            previous = self._lock_card(conn, card_number)
            if previous is None:
                raise errors.UnknownCard()
            self._run(conn, "UPDATE cards SET status = 'lost', updated_at = ? WHERE card_number = ?",
                      (now, card_number))
            ids = self._suspend_card(conn, card_number, actor=actor, now=now)
            self._audit(conn, actor=actor, action="card.lost", subject=card_number, outcome="ok",
                        detail={"previous": previous, "suspended": len(ids)}, now=now)
        return ids

    def reissue_card(self, card_number: str, *, actor: str, now: float) -> None:
        with self._write() as conn:
            previous = self._lock_card(conn, card_number)
            if previous is None:
                raise errors.UnknownCard()
            self._run(conn, "UPDATE cards SET status = 'valid', updated_at = ? WHERE card_number = ?",
                      (now, card_number))
            self._audit(conn, actor=actor, action="card.reissue", subject=card_number, outcome="ok",
                        detail={"previous": previous}, now=now)

    # -- credentials ---------------------------------------------------------------------------
    def issue_credential(
        self, *, card_number: str, device_key: bytes, templates: Sequence[tuple[str, bytes]],
        actor: str, now: float,
    ) -> tuple[Credential, list[TemplateRow], list[str]]:
        key = _key(device_key, "device_key")
        if not templates:
            raise errors.InvalidMessage("a credential needs at least one template")
        checked = [(_one_of(m, MODALITIES, "modality"), bytes(c)) for m, c in templates]
        with self._write() as conn:
            raise_unless_card_valid(self._lock_card(conn, card_number))
            bound = self._run(conn, "SELECT card_number FROM credentials WHERE device_key = ?"
                              " AND status <> 'voided'", (key,)).fetchone()
            if bound is not None and bound[0] != card_number:
                raise errors.Conflict("this device key is already bound to another credential")
            voided = [r[0] for r in self._run(
                conn, "SELECT credential_id FROM credentials WHERE card_number = ? AND status <> 'voided'"
                f" ORDER BY version{self._FOR_UPDATE}", (card_number,))]
            self._set_status(conn, voided, "voided", "reissued", "credential.void", actor=actor, now=now)
            removed = [tuple(r) for r in self._run(
                conn, "SELECT template_id, credential_id, modality FROM templates WHERE credential_id IN"
                " (SELECT credential_id FROM credentials WHERE card_number = ?) ORDER BY template_id",
                (card_number,))]
            self._run(conn, "DELETE FROM templates WHERE credential_id IN"
                      " (SELECT credential_id FROM credentials WHERE card_number = ?)", (card_number,))
            version = self._run(conn, "SELECT COALESCE(MAX(version), 0) + 1 FROM credentials"
                                " WHERE card_number = ?", (card_number,)).fetchone()[0]
            cred = Credential(
                credential_id=secrets.token_urlsafe(16), card_number=card_number, version=version,
                level="basic", device_key=key, status="active", created_at=now, updated_at=now,
            )
            self._run(conn, f"INSERT INTO credentials({CRED_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (cred.credential_id, cred.card_number, cred.version, cred.level, cred.device_key,
                       cred.status, cred.created_at, cred.updated_at))
            rows: list[TemplateRow] = []
            for modality, ciphertext in checked:
                template_id = self._insert_id(
                    conn, "INSERT INTO templates(credential_id, modality, ciphertext) VALUES (?, ?, ?)",
                    (cred.credential_id, modality, ciphertext), "template_id")
                rows.append(TemplateRow(template_id=template_id, credential_id=cred.credential_id,
                                        modality=modality, ciphertext=ciphertext))
            self._log(conn, removed, "remove")
            self._log(conn, [(r.template_id, r.credential_id, r.modality) for r in rows], "add")
            self._audit(conn, actor=actor, action="credential.issue", subject=cred.credential_id,
                        outcome="ok", detail={"card": card_number, "version": version,
                                              "templates": len(rows), "voided": len(voided)},
                        now=now)
        return cred, rows, voided

    def get_credential(self, credential_id: str) -> Credential | None:
        rows = self._read(f"SELECT {CRED_COLS} FROM credentials WHERE credential_id = ?", (credential_id,))
        return credential_of(rows[0]) if rows else None

    def credential_by_device(self, device_key: bytes) -> Credential | None:
        rows = self._read(
            f"SELECT {CRED_COLS} FROM credentials WHERE device_key = ?"
            f" ORDER BY status = 'voided', updated_at DESC, {self._ROW_ORDER} DESC LIMIT 1",
            (bytes(device_key),),
        )
        return credential_of(rows[0]) if rows else None

    def retired_device(self, device_key: bytes) -> str | None:
        key = bytes(device_key)
        rows = self._read(
            "SELECT credential_id FROM retired_devices WHERE device_key = ? AND NOT EXISTS"
            " (SELECT 1 FROM credentials WHERE device_key = ? AND status <> 'voided')"
            " ORDER BY id DESC LIMIT 1",
            (key, key),
        )
        return rows[0][0] if rows else None

    def _live(self, conn: Any, credential_id: str) -> Credential:
        """The credential (locked to the end of the transaction) if it is active; else the error."""
        row = self._run(conn, f"SELECT {CRED_COLS} FROM credentials WHERE credential_id = ?{self._FOR_UPDATE}",
                        (credential_id,)).fetchone()
        return raise_unless_active(None if row is None else credential_of(row))

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
            taken = self._run(conn, "SELECT 1 FROM credentials WHERE device_key = ? AND status <> 'voided'",
                              (new,)).fetchone()
            if taken is not None:
                raise errors.Conflict("the new device key is already bound to a credential")
            self._run(conn, "INSERT INTO retired_devices(device_key, credential_id, retired_at) VALUES (?, ?, ?)",
                      (cred.device_key, credential_id, now))
            self._run(conn, "UPDATE credentials SET device_key = ?, updated_at = ? WHERE credential_id = ?",
                      (new, now, credential_id))
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
            attestation_id = self._insert_id(
                conn, "INSERT INTO attestations(credential_id, level, attestation, actor, ts)"
                " VALUES (?, ?, ?, ?, ?)", (credential_id, level, bytes(attestation), actor, now), "id")
            self._run(conn, "UPDATE credentials SET level = ?, updated_at = ? WHERE credential_id = ?",
                      (level, now, credential_id))
            self._audit(conn, actor=actor, action="credential.level", subject=credential_id,
                        outcome="ok", detail={"from": cred.level, "to": level,
                                              "attestation": attestation_id}, now=now)
        return msgspec.structs.replace(cred, level=level, updated_at=now)

    def active_templates(self, modality: str | None = None) -> Iterator[TemplateRow]:
        """Streams in pages by template id; no transaction is held between pages."""
        if modality is not None:
            _one_of(modality, MODALITIES, "modality")
        page = self._template_page()
        last = 0
        while True:
            rows = self._read(
                "SELECT t.template_id, t.credential_id, t.modality, t.ciphertext FROM templates t"
                " JOIN credentials c ON c.credential_id = t.credential_id"
                " WHERE c.status = 'active' AND t.template_id > ?"
                " AND (CAST(? AS TEXT) IS NULL OR t.modality = ?)"
                " ORDER BY t.template_id LIMIT ?",
                (last, modality, modality, page),
            )
            for r in rows:
                yield template_of(r)
            if len(rows) < page:
                return
            last = rows[-1][0]

    def templates_of(self, credential_id: str) -> list[TemplateRow]:
        rows = self._read(
            f"SELECT {TPL_COLS} FROM templates WHERE credential_id = ? ORDER BY template_id", (credential_id,)
        )
        return [template_of(r) for r in rows]

    def credential_with_templates(self, credential_id: str) -> tuple[Credential | None, list[TemplateRow]]:
        rows = self._read(
            f"SELECT {_CRED_COLS_C}, t.template_id, t.modality, t.ciphertext FROM credentials c"
            " LEFT JOIN templates t ON t.credential_id = c.credential_id"
            " WHERE c.credential_id = ? ORDER BY t.template_id",
            (credential_id,),
        )
        if not rows:
            return None, []
        cred = credential_of(rows[0][:8])
        return cred, [
            TemplateRow(template_id=r[8], credential_id=credential_id, modality=r[9], ciphertext=bytes(r[10]))
            for r in rows if r[8] is not None
        ]

    def count_credentials(self) -> dict[str, int]:
        counts = dict.fromkeys(CREDENTIAL_STATUSES, 0)
        for status, n in self._read("SELECT status, COUNT(*) FROM credentials GROUP BY status"):
            counts[status] = n
        return counts

    # -- relying parties and acceptance points -----------------------------------------------------
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
            if self._run(conn, "SELECT 1 FROM relying_parties WHERE rp_id = ?", (rp.rp_id,)).fetchone():
                raise errors.Conflict("a relying party with this id already exists")
            self._run(conn, f"INSERT INTO relying_parties({RP_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (rp.rp_id, rp.display_name, bytes(rp.sign_key), bytes(rp.box_key), rp.max_level,
                       rp.quota_per_minute, rp.status, rp.created_at))
            self._audit(conn, actor=actor, action="rp.add", subject=rp.rp_id, outcome="ok",
                        detail={"max_level": rp.max_level, "quota_per_minute": rp.quota_per_minute},
                        now=rp.created_at)

    def get_relying_party(self, rp_id: str) -> RelyingParty | None:
        rows = self._read(f"SELECT {RP_COLS} FROM relying_parties WHERE rp_id = ?", (rp_id,))
        return relying_party_of(rows[0]) if rows else None

    def list_relying_parties(self) -> list[RelyingParty]:
        return [relying_party_of(r) for r in
                self._read(f"SELECT {RP_COLS} FROM relying_parties ORDER BY rp_id{self._COLLATE}")]

    def set_relying_party_status(
        self, rp_id: str, status: str, *, actor: str, now: float | None = None
    ) -> RelyingParty:
        _one_of(status, PARTY_STATUSES, "status")
        ts = time.time() if now is None else now
        with self._write() as conn:
            row = self._run(conn, f"SELECT {RP_COLS} FROM relying_parties WHERE rp_id = ?{self._FOR_UPDATE}",
                            (rp_id,)).fetchone()
            if row is None:
                raise errors.UnknownRelyingParty()
            self._run(conn, "UPDATE relying_parties SET status = ? WHERE rp_id = ?", (status, rp_id))
            self._audit(conn, actor=actor, action="rp.status", subject=rp_id, outcome="ok",
                        detail={"from": row[6], "to": status}, now=ts)
        return msgspec.structs.replace(relying_party_of(row), status=status)

    def add_acceptance_point(self, ap: AcceptancePoint, *, actor: str) -> None:
        _text(ap.ap_id, "ap_id", limit=128)
        _text(ap.name, "name")
        _key(ap.sign_key, "sign_key")
        _one_of(ap.status, PARTY_STATUSES, "status")
        with self._write() as conn:
            if self._run(conn, "SELECT 1 FROM acceptance_points WHERE ap_id = ?", (ap.ap_id,)).fetchone():
                raise errors.Conflict("an acceptance point with this id already exists")
            self._run(conn, f"INSERT INTO acceptance_points({AP_COLS}) VALUES (?, ?, ?, ?, ?)",
                      (ap.ap_id, ap.name, bytes(ap.sign_key), ap.status, ap.created_at))
            self._audit(conn, actor=actor, action="ap.add", subject=ap.ap_id, outcome="ok",
                        detail=None, now=ap.created_at)

    def get_acceptance_point(self, ap_id: str) -> AcceptancePoint | None:
        rows = self._read(f"SELECT {AP_COLS} FROM acceptance_points WHERE ap_id = ?", (ap_id,))
        return acceptance_point_of(rows[0]) if rows else None

    def list_acceptance_points(self) -> list[AcceptancePoint]:
        return [acceptance_point_of(r) for r in
                self._read(f"SELECT {AP_COLS} FROM acceptance_points ORDER BY ap_id{self._COLLATE}")]

    def set_acceptance_point_status(
        self, ap_id: str, status: str, *, actor: str, now: float | None = None
    ) -> AcceptancePoint:
        _one_of(status, PARTY_STATUSES, "status")
        ts = time.time() if now is None else now
        with self._write() as conn:
            row = self._run(conn, f"SELECT {AP_COLS} FROM acceptance_points WHERE ap_id = ?{self._FOR_UPDATE}",
                            (ap_id,)).fetchone()
            if row is None:
                raise errors.UnknownAcceptancePoint()
            self._run(conn, "UPDATE acceptance_points SET status = ? WHERE ap_id = ?", (status, ap_id))
            self._audit(conn, actor=actor, action="ap.status", subject=ap_id, outcome="ok",
                        detail={"from": row[3], "to": status}, now=ts)
        return msgspec.structs.replace(acceptance_point_of(row), status=status)
