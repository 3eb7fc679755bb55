"""The template change log and the reads that node-local indexes make, for both SQL stores.

Every transaction that adds templates, deletes them or takes a credential out of the active
set (void, suspension) appends one row per template to ``template_log`` in the same
transaction: ``add`` for a template issued, ``remove`` for one deleted or whose credential is
no longer active. ``seq`` is monotonic in commit order (SQLite has one writer; PostgreSQL
writers take ``_lock_log`` first), so a reader that has applied every row up to ``seq`` n and
reads on from there misses nothing. Rows are appended last in each transaction, once the
transaction's row locks are held, to keep the log's lock at the end of the lock order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .base import MODALITIES, SealedTemplate, TemplateChange, check_choice as _one_of

__all__ = ["LOG_BACKFILL", "TemplateLog"]

#: The migration that creates the log fills it with an addition for every template of an
#: active credential (the state before the log, as if it had been written all along).
LOG_BACKFILL = (
    "INSERT INTO template_log(template_id, credential_id, modality, op)"
    " SELECT t.template_id, t.credential_id, t.modality, 'add' FROM templates t"
    " JOIN credentials c ON c.credential_id = t.credential_id"
    " WHERE c.status = 'active' ORDER BY t.template_id"
)

#: Rows read per page when streaming the active templates, and ids per ``IN (...)`` read.
_PAGE = 4096
_IDS_PER_READ = 500


class TemplateLog:
    """Mixed into ``SqlStore``; uses its ``_run``, ``_read`` and ``_sql``."""

    def _lock_log(self, conn: Any) -> None:
        """Hook: serialise the log's writers until commit (PostgreSQL); SQLite needs nothing."""

    def _log(self, conn: Any, rows: Sequence[tuple[int, str, str]], op: str) -> None:
        """Appends ``(template_id, credential_id, modality)`` rows with ``op``."""
        if not rows:
            return
        self._lock_log(conn)
        conn.cursor().executemany(
            self._sql("INSERT INTO template_log(template_id, credential_id, modality, op) VALUES (?, ?, ?, ?)"),
            [(int(t), c, m, op) for t, c, m in rows],
        )

    def _templates_of_credentials(self, conn: Any, credential_ids: Sequence[str]) -> list[tuple[int, str, str]]:
        out: list[tuple[int, str, str]] = []
        for cid in credential_ids:
            out += [tuple(r) for r in self._run(
                conn, "SELECT template_id, credential_id, modality FROM templates WHERE credential_id = ?"
                " ORDER BY template_id", (cid,))]
        return out

    # -- reads ------------------------------------------------------------------------------
    def store_id(self) -> str:
        rows = self._read("SELECT value FROM meta WHERE key = 'store_id'")
        return rows[0][0] if rows else ""

    def log_position(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(seq), 0) FROM template_log")[0][0])

    def count_templates(self, modality: str) -> int:
        """Templates of ``modality`` of active credentials."""
        _one_of(modality, MODALITIES, "modality")
        return int(self._read(
            "SELECT COUNT(*) FROM templates t JOIN credentials c ON c.credential_id = t.credential_id"
            " WHERE c.status = 'active' AND t.modality = ?", (modality,))[0][0])

    def template_changes(self, after: int, *, modality: str, limit: int = _PAGE) -> list[TemplateChange]:
        """Log rows after ``seq`` ``after``, oldest first, of every modality (so that a reader's
        position is the log's); an addition of ``modality`` carries its sealed template while
        the template exists and its credential is active. One range read of the log's key
        (what a search pays when nothing is new), then one read of the additions' templates."""
        _one_of(modality, MODALITIES, "modality")
        rows = self._read(
            "SELECT seq, op, template_id, credential_id, modality FROM template_log"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (int(after), int(limit)),
        )
        adds = [r[2] for r in rows if r[1] == "add" and r[4] == modality]
        sealed = {t.template_id: t for t in self.sealed_by_id(adds)} if adds else {}
        return [
            TemplateChange(seq=r[0], op=r[1], template_id=r[2], credential_id=r[3], modality=r[4],
                           sealed=sealed.get(r[2]) if r[1] == "add" and r[4] == modality else None)
            for r in rows
        ]

    def sealed_templates(self, modality: str) -> Iterator[SealedTemplate]:
        """Every template of ``modality`` of an active credential, with its card number, in
        pages by template id (no transaction is held between pages)."""
        _one_of(modality, MODALITIES, "modality")
        last = 0
        while True:
            rows = self._read(
                "SELECT t.template_id, t.credential_id, c.card_number, t.ciphertext FROM templates t"
                " JOIN credentials c ON c.credential_id = t.credential_id"
                " WHERE c.status = 'active' AND t.modality = ? AND t.template_id > ?"
                " ORDER BY t.template_id LIMIT ?",
                (modality, last, _PAGE),
            )
            for r in rows:
                yield SealedTemplate(template_id=r[0], credential_id=r[1], card_number=r[2], ciphertext=bytes(r[3]))
            if len(rows) < _PAGE:
                return
            last = rows[-1][0]

    def sealed_by_id(self, template_ids: Sequence[int]) -> list[SealedTemplate]:
        """The templates among ``template_ids`` whose credential is active (one indexed read
        per 500 ids): what a 1:N search re-ranks its candidates on."""
        ids = sorted({int(i) for i in template_ids})
        out: list[SealedTemplate] = []
        for start in range(0, len(ids), _IDS_PER_READ):
            chunk = ids[start:start + _IDS_PER_READ]
            marks = ", ".join("?" * len(chunk))
            out += [
                SealedTemplate(template_id=r[0], credential_id=r[1], card_number=r[2], ciphertext=bytes(r[3]))
                for r in self._read(
                    "SELECT t.template_id, t.credential_id, c.card_number, t.ciphertext FROM templates t"
                    " JOIN credentials c ON c.credential_id = t.credential_id"
                    f" WHERE c.status = 'active' AND t.template_id IN ({marks})",
                    tuple(chunk),
                )
            ]
        return out
