"""What both SQL stores share below the transitions: the row layout (columns and
decoders), the audit row and the audit log's reads, written with ``?`` placeholders."""

from __future__ import annotations

from typing import Any

import msgspec

from .base import (
    AcceptancePoint,
    AuditEntry,
    AuditValue,
    Credential,
    RelyingParty,
    TemplateRow,
    check_text as _text,
    encode_audit_detail as _encode_detail,
)

__all__ = [
    "AP_COLS", "CRED_COLS", "RP_COLS", "TPL_COLS", "SqlAudit", "acceptance_point_of",
    "append_audit", "credential_of", "relying_party_of", "template_of",
]

# columns and row decoders, in the order of the columns
CRED_COLS = "credential_id, card_number, version, level, device_key, status, created_at, updated_at"
TPL_COLS = "template_id, credential_id, modality, ciphertext"
RP_COLS = "rp_id, display_name, sign_key, box_key, max_level, quota_per_minute, status, created_at"
AP_COLS = "ap_id, name, sign_key, status, created_at"


def credential_of(row: tuple) -> Credential:
    return Credential(
        credential_id=row[0], card_number=row[1], version=row[2], level=row[3],
        device_key=bytes(row[4]), status=row[5], created_at=row[6], updated_at=row[7],
    )


def template_of(row: tuple) -> TemplateRow:
    return TemplateRow(
        template_id=row[0], credential_id=row[1], modality=row[2], ciphertext=bytes(row[3])
    )


def relying_party_of(row: tuple) -> RelyingParty:
    return RelyingParty(
        rp_id=row[0], display_name=row[1], sign_key=bytes(row[2]), box_key=bytes(row[3]),
        max_level=row[4], quota_per_minute=row[5], status=row[6], created_at=row[7],
    )


def acceptance_point_of(row: tuple) -> AcceptancePoint:
    return AcceptancePoint(
        ap_id=row[0], name=row[1], sign_key=bytes(row[2]), status=row[3], created_at=row[4]
    )


_detail_decoder = msgspec.json.Decoder(dict[str, AuditValue])
_AUDIT_INSERT = "INSERT INTO audit(ts, actor, action, subject, outcome, detail) VALUES (?, ?, ?, ?, ?, ?)"


def append_audit(
    conn: Any, mark: str, *, actor: str, action: str, subject: str, outcome: str,
    detail: dict[str, AuditValue] | None, now: float,
) -> None:
    """One audit row on ``conn``, inside the caller's transaction; ``mark``: the placeholder."""
    encoded = _encode_detail(detail)
    for value, what in ((actor, "actor"), (action, "action"), (subject, "subject"), (outcome, "outcome")):
        _text(value, f"audit {what}")
    conn.execute(_AUDIT_INSERT.replace("?", mark), (float(now), actor, action, subject, outcome, encoded))


class SqlAudit:
    """The audit log's reads, shared by both databases (their ``_audit`` writes)."""

    _MARK = "?"  # the dialect's placeholder

    def _sql(self, query: str) -> str:
        return query if self._MARK == "?" else query.replace("?", self._MARK)

    def _read(self, query: str, args: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    def audit_log(
        self, *, limit: int = 100, since_seq: int = 0, subject: str | None = None
    ) -> list[AuditEntry]:
        if limit <= 0:
            return []
        query = "SELECT seq, ts, actor, action, subject, outcome, detail FROM audit WHERE seq > ?"
        args: tuple = (since_seq,)
        if subject is not None:
            query += " AND subject = ?"
            args += (subject,)
        rows = self._read(query + " ORDER BY seq LIMIT ?", args + (limit,))
        return [
            AuditEntry(seq=r[0], ts=r[1], actor=r[2], action=r[3], subject=r[4], outcome=r[5],
                       detail=_detail_decoder.decode(r[6]))
            for r in rows
        ]
