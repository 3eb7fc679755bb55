"""ID-card registry import: JSON lines of card records, card photos embedded and sealed.

Each line: ``{"card_number": "...", "name": "...", "photo": "path/to/photo.jpg",
"status": "valid"}``; a relative photo path is taken from the file's directory.
The card photo's face embedding is computed with the engine's own extraction
path and stored encrypted; a record whose photo has no usable face is refused
(reported, not imported), never stored half-made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from engine.crypto import TemplateCipher
from engine.errors import InvalidMessage, SampleError
from engine.store import CARD_STATUSES, CardRecord, Store

__all__ = ["CardLine", "ImportReport", "read_registry", "import_registry", "seal_card_template"]


class CardLine(msgspec.Struct, frozen=True, kw_only=True):
    card_number: str
    name: str
    photo: str
    status: str = "valid"


@dataclass
class ImportReport:
    imported: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (card number, error code)


def seal_card_template(cipher: TemplateCipher, vec: np.ndarray, card_number: str) -> bytes:
    """The card photo's embedding, sealed as the engine expects it (owner ``card:<number>``)."""
    return cipher.encrypt(np.asarray(vec, dtype=np.float32).tobytes(), f"card:{card_number}")


def read_registry(path: Path) -> Iterator[tuple[int, CardLine]]:
    decoder = msgspec.json.Decoder(CardLine)
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise InvalidMessage(f"{path}:{lineno}: {exc}") from None
            if rec.status not in CARD_STATUSES:
                raise InvalidMessage(f"{path}:{lineno}: status must be one of {', '.join(CARD_STATUSES)}")
            yield lineno, rec


def import_registry(
    path: Path,
    *,
    store: Store,
    cipher: TemplateCipher,
    embed_faces: Callable[[list[bytes]], list],
    actor: str = "operator",
    batch: int = 16,
    now: float,
) -> ImportReport:
    """Embed every card photo, then upsert the records in batches (one transaction each)."""
    report = ImportReport()
    lines = list(read_registry(path))
    for start in range(0, len(lines), batch):
        chunk = [rec for _n, rec in lines[start:start + batch]]
        images: list[bytes] = []
        for rec in chunk:
            photo = Path(rec.photo)
            if not photo.is_absolute():
                photo = path.parent / photo
            try:
                images.append(photo.read_bytes())
            except OSError:
                images.append(b"")
        embeddings = embed_faces([im if im else b"\0" for im in images])
        records = []
        for rec, image, emb in zip(chunk, images, embeddings, strict=True):
            if not image:
                report.refused.append((rec.card_number, "photo_missing"))
                continue
            if isinstance(emb, SampleError):
                report.refused.append((rec.card_number, emb.code))
                continue
            records.append(
                CardRecord(
                    card_number=rec.card_number,
                    name=rec.name,
                    photo_path=str(rec.photo),
                    status=rec.status,
                    photo_template=seal_card_template(cipher, emb, rec.card_number),
                    updated_at=now,
                )
            )
        if records:
            report.imported += store.import_cards(records, actor=actor)
    return report

