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

import secrets
import time
from collections.abc import Iterable, Iterator, Sequence

import msgspec
import psycopg

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
from .postgres_db import PostgresDatabase, parse_url
from .postgres_schema import SCHEMA_VERSION

# The row layout (columns and decoders) is the one both SQL stores share.
from .sqlite_db import (
    AP_COLS as _AP_COLS,
    CRED_COLS as _CRED_COLS,
    RP_COLS as _RP_COLS,
    TPL_COLS as _TPL_COLS,
    acceptance_point_of as _ap,
    credential_of as _cred,
    relying_party_of as _rp,
    template_of as _tpl,
)

__all__ = ["SCHEMA_VERSION", "PostgresStore", "parse_url"]

_TEMPLATE_PAGE = 1000
_CRED_COLS_C = ", ".join(f"c.{col}" for col in _CRED_COLS.split(", "))


class PostgresStore(PostgresDatabase):
    """``Store`` on a PostgreSQL schema. Thread-safe; see the module docstrings."""

    # -- ID-card registry ---------------------------------------------------------------------------
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
                    "SELECT status FROM cards WHERE card_number = %s FOR UPDATE", (rec.card_number,)
                ).fetchone()
                # A new photo path drops the stale photo template unless one is given.
                conn.execute(
                    """INSERT INTO cards(card_number, name, photo_path, status, photo_template, updated_at)
                    VALUES (%s, %s, %s, %s, %s, %s)
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
                if rec.status == "lost" and (old is None or old[0] != "lost"):
                    self._suspend_card(conn, rec.card_number, actor=actor, now=ts)
                count += 1
            self._audit(conn, actor=actor, action="registry.import", subject="registry",
                        outcome="ok", detail={"cards": count}, now=ts)
        return count

    def get_card(self, card_number: str) -> CardRecord | None:
        rows = self._read(
            "SELECT card_number, name, photo_path, status, photo_template, updated_at"
            " FROM cards WHERE card_number = %s",
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
                "UPDATE cards SET photo_template = %s WHERE card_number = %s", (bytes(ciphertext), card_number)
            )
            if cur.rowcount != 1:
                raise errors.UnknownCard()

    def _lock_card(self, conn: psycopg.Connection, card_number: str) -> str | None:
        """The card's status, its row locked to the end of the transaction; ``None``: no such card."""
        row = conn.execute("SELECT status FROM cards WHERE card_number = %s FOR UPDATE", (card_number,)).fetchone()
        return None if row is None else row[0]

    def _suspend_card(self, conn: psycopg.Connection, card_number: str, *, actor: str, now: float) -> list[str]:
        ids = [r[0] for r in conn.execute(
            "SELECT credential_id FROM credentials WHERE card_number = %s AND status = 'active'"
            " ORDER BY version FOR UPDATE", (card_number,))]
        for cid in ids:
            conn.execute(
                "UPDATE credentials SET status = 'suspended', updated_at = %s WHERE credential_id = %s", (now, cid)
            )
            self._audit(conn, actor=actor, action="credential.suspend", subject=cid,
                        outcome="ok", detail={"reason": "card_lost"}, now=now)
        return ids

    def report_card_lost(self, card_number: str, *, actor: str, now: float) -> list[str]:
        with self._write() as conn:
            previous = self._lock_card(conn, card_number)
            if previous is None:
                raise errors.UnknownCard()
            conn.execute("UPDATE cards SET status = 'lost', updated_at = %s WHERE card_number = %s", (now, card_number))
            ids = self._suspend_card(conn, card_number, actor=actor, now=now)
            self._audit(conn, actor=actor, action="card.lost", subject=card_number, outcome="ok",
                        detail={"previous": previous, "suspended": len(ids)}, now=now)
        return ids

    def reissue_card(self, card_number: str, *, actor: str, now: float) -> None:
        with self._write() as conn:
            previous = self._lock_card(conn, card_number)
            if previous is None:
                raise errors.UnknownCard()
            conn.execute("UPDATE cards SET status = 'valid', updated_at = %s WHERE card_number = %s", (now, card_number))
            self._audit(conn, actor=actor, action="card.reissue", subject=card_number, outcome="ok",
                        detail={"previous": previous}, now=now)

    # -- credentials --------------------------------------------------------------------------------
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
            bound = conn.execute(
                "SELECT card_number FROM credentials WHERE device_key = %s AND status <> 'voided'", (key,)
            ).fetchone()
            if bound is not None and bound[0] != card_number:
                raise errors.Conflict("this device key is already bound to another credential")
            voided = [r[0] for r in conn.execute(
                "SELECT credential_id FROM credentials WHERE card_number = %s AND status <> 'voided'"
                " ORDER BY version FOR UPDATE", (card_number,))]
            for cid in voided:
                conn.execute(
                    "UPDATE credentials SET status = 'voided', updated_at = %s WHERE credential_id = %s", (now, cid)
                )
                self._audit(conn, actor=actor, action="credential.void", subject=cid,
                            outcome="ok", detail={"reason": "reissued"}, now=now)
            conn.execute(
                "DELETE FROM templates WHERE credential_id IN"
                " (SELECT credential_id FROM credentials WHERE card_number = %s)", (card_number,)
            )
            version = conn.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM credentials WHERE card_number = %s", (card_number,)
            ).fetchone()[0]
            cred = Credential(
                credential_id=secrets.token_urlsafe(16), card_number=card_number, version=version,
                level="basic", device_key=key, status="active", created_at=now, updated_at=now,
            )
            conn.execute(
                f"INSERT INTO credentials({_CRED_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (cred.credential_id, cred.card_number, cred.version, cred.level, cred.device_key,
                 cred.status, cred.created_at, cred.updated_at),
            )
            rows: list[TemplateRow] = []
            for modality, ciphertext in checked:
                (template_id,) = conn.execute(
                    "INSERT INTO templates(credential_id, modality, ciphertext) VALUES (%s, %s, %s)"
                    " RETURNING template_id",
                    (cred.credential_id, modality, ciphertext),
                ).fetchone()
                rows.append(TemplateRow(template_id=template_id, credential_id=cred.credential_id,
                                        modality=modality, ciphertext=ciphertext))
            self._audit(conn, actor=actor, action="credential.issue", subject=cred.credential_id,
                        outcome="ok", detail={"card": card_number, "version": version,
                                              "templates": len(rows), "voided": len(voided)},
                        now=now)
        return cred, rows, voided

    def get_credential(self, credential_id: str) -> Credential | None:
        rows = self._read(f"SELECT {_CRED_COLS} FROM credentials WHERE credential_id = %s", (credential_id,))
        return _cred(rows[0]) if rows else None

    def credential_by_device(self, device_key: bytes) -> Credential | None:
        rows = self._read(
            f"SELECT {_CRED_COLS} FROM credentials WHERE device_key = %s"
            " ORDER BY status = 'voided', updated_at DESC, seq DESC LIMIT 1",
            (bytes(device_key),),
        )
        return _cred(rows[0]) if rows else None

    def retired_device(self, device_key: bytes) -> str | None:
        rows = self._read(
            "SELECT credential_id FROM retired_devices WHERE device_key = %(k)s AND NOT EXISTS"
            " (SELECT 1 FROM credentials WHERE device_key = %(k)s AND status <> 'voided')"
            " ORDER BY id DESC LIMIT 1",
            {"k": bytes(device_key)},
        )
        return rows[0][0] if rows else None

    def _live(self, conn: psycopg.Connection, credential_id: str) -> Credential:
        """The credential, locked to the end of the transaction, if it is active; else the error."""
        row = conn.execute(f"SELECT {_CRED_COLS} FROM credentials WHERE credential_id = %s FOR UPDATE",
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
                "SELECT 1 FROM credentials WHERE device_key = %s AND status <> 'voided'", (new,)
            ).fetchone()
            if taken is not None:
                raise errors.Conflict("the new device key is already bound to a credential")
            conn.execute(
                "INSERT INTO retired_devices(device_key, credential_id, retired_at) VALUES (%s, %s, %s)",
                (cred.device_key, credential_id, now),
            )
            conn.execute(
                "UPDATE credentials SET device_key = %s, updated_at = %s WHERE credential_id = %s",
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
            (attestation_id,) = conn.execute(
                "INSERT INTO attestations(credential_id, level, attestation, actor, ts)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (credential_id, level, bytes(attestation), actor, now),
            ).fetchone()
            conn.execute(
                "UPDATE credentials SET level = %s, updated_at = %s WHERE credential_id = %s",
                (level, now, credential_id),
            )
            self._audit(conn, actor=actor, action="credential.level", subject=credential_id,
                        outcome="ok", detail={"from": cred.level, "to": level,
                                              "attestation": attestation_id}, now=now)
        return msgspec.structs.replace(cred, level=level, updated_at=now)

    def active_templates(self, modality: str | None = None) -> Iterator[TemplateRow]:
        """Streams in pages by template id; no transaction is held between pages."""
        if modality is not None:
            _one_of(modality, MODALITIES, "modality")
        last = 0
        while True:
            rows = self._read(
                "SELECT t.template_id, t.credential_id, t.modality, t.ciphertext FROM templates t"
                " JOIN credentials c ON c.credential_id = t.credential_id"
                " WHERE c.status = 'active' AND t.template_id > %(last)s"
                " AND (%(m)s::text IS NULL OR t.modality = %(m)s)"
                " ORDER BY t.template_id LIMIT %(n)s",
                {"last": last, "m": modality, "n": _TEMPLATE_PAGE},
            )
            for r in rows:
                yield _tpl(r)
            if len(rows) < _TEMPLATE_PAGE:
                return
            last = rows[-1][0]

    def templates_of(self, credential_id: str) -> list[TemplateRow]:
        rows = self._read(
            f"SELECT {_TPL_COLS} FROM templates WHERE credential_id = %s ORDER BY template_id", (credential_id,)
        )
        return [_tpl(r) for r in rows]

    def credential_with_templates(self, credential_id: str) -> tuple[Credential | None, list[TemplateRow]]:
        rows = self._read(
            f"SELECT {_CRED_COLS_C}, t.template_id, t.modality, t.ciphertext FROM credentials c"
            " LEFT JOIN templates t ON t.credential_id = c.credential_id"
            " WHERE c.credential_id = %s ORDER BY t.template_id",
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

    # -- relying parties and acceptance points ------------------------------------------------------
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
            if conn.execute("SELECT 1 FROM relying_parties WHERE rp_id = %s", (rp.rp_id,)).fetchone():
                raise errors.Conflict("a relying party with this id already exists")
            conn.execute(
                f"INSERT INTO relying_parties({_RP_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (rp.rp_id, rp.display_name, bytes(rp.sign_key), bytes(rp.box_key), rp.max_level,
                 rp.quota_per_minute, rp.status, rp.created_at),
            )
            self._audit(conn, actor=actor, action="rp.add", subject=rp.rp_id, outcome="ok",
                        detail={"max_level": rp.max_level, "quota_per_minute": rp.quota_per_minute},
                        now=rp.created_at)

    def get_relying_party(self, rp_id: str) -> RelyingParty | None:
        rows = self._read(f"SELECT {_RP_COLS} FROM relying_parties WHERE rp_id = %s", (rp_id,))
        return _rp(rows[0]) if rows else None

    def list_relying_parties(self) -> list[RelyingParty]:
        return [_rp(r) for r in self._read(f"SELECT {_RP_COLS} FROM relying_parties ORDER BY rp_id COLLATE \"C\"")]

    def set_relying_party_status(
        self, rp_id: str, status: str, *, actor: str, now: float | None = None
    ) -> RelyingParty:
        _one_of(status, PARTY_STATUSES, "status")
        ts = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute(f"SELECT {_RP_COLS} FROM relying_parties WHERE rp_id = %s FOR UPDATE",
                               (rp_id,)).fetchone()
            if row is None:
                raise errors.UnknownRelyingParty()
            conn.execute("UPDATE relying_parties SET status = %s WHERE rp_id = %s", (status, rp_id))
            self._audit(conn, actor=actor, action="rp.status", subject=rp_id, outcome="ok",
                        detail={"from": row[6], "to": status}, now=ts)
        return msgspec.structs.replace(_rp(row), status=status)

    def add_acceptance_point(self, ap: AcceptancePoint, *, actor: str) -> None:
        _text(ap.ap_id, "ap_id", limit=128)
        _text(ap.name, "name")
        _key(ap.sign_key, "sign_key")
        _one_of(ap.status, PARTY_STATUSES, "status")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM acceptance_points WHERE ap_id = %s", (ap.ap_id,)).fetchone():
                raise errors.Conflict("an acceptance point with this id already exists")
            conn.execute(
                f"INSERT INTO acceptance_points({_AP_COLS}) VALUES (%s, %s, %s, %s, %s)",
                (ap.ap_id, ap.name, bytes(ap.sign_key), ap.status, ap.created_at),
            )
            self._audit(conn, actor=actor, action="ap.add", subject=ap.ap_id, outcome="ok",
                        detail=None, now=ap.created_at)

    def get_acceptance_point(self, ap_id: str) -> AcceptancePoint | None:
        rows = self._read(f"SELECT {_AP_COLS} FROM acceptance_points WHERE ap_id = %s", (ap_id,))
        return _ap(rows[0]) if rows else None

    def list_acceptance_points(self) -> list[AcceptancePoint]:
        return [_ap(r) for r in self._read(f"SELECT {_AP_COLS} FROM acceptance_points ORDER BY ap_id COLLATE \"C\"")]

    def set_acceptance_point_status(
        self, ap_id: str, status: str, *, actor: str, now: float | None = None
    ) -> AcceptancePoint:
        _one_of(status, PARTY_STATUSES, "status")
        ts = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute(f"SELECT {_AP_COLS} FROM acceptance_points WHERE ap_id = %s FOR UPDATE",
                               (ap_id,)).fetchone()
            if row is None:
                raise errors.UnknownAcceptancePoint()
            conn.execute("UPDATE acceptance_points SET status = %s WHERE ap_id = %s", (status, ap_id))
            self._audit(conn, actor=actor, action="ap.status", subject=ap_id, outcome="ok",
                        detail={"from": row[3], "to": status}, now=ts)
        return msgspec.structs.replace(_ap(row), status=status)
