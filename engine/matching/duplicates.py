"""1:N duplicate search at enrollment: is this face already enrolled on another card?

``DuplicateSearch`` is asked inside the store's enrollment lock, together with the
issue of the new credential, so two enrollments of one face cannot both miss each
other. ``FaissDuplicateSearch`` keeps the active credentials' face templates in a
FAISS index (:class:`~engine.matching.index.TemplateIndex`), loaded from the store at
start-up; ``NoDuplicateSearch`` is for engines configured without the check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ..store import Store
from .index import TemplateIndex
from .templates import TemplateSealer

__all__ = ["DUPLICATE_FMR", "DuplicateSearch", "FaissDuplicateSearch", "NoDuplicateSearch"]

#: Target false-match rate of the search: strict, so that no honest resident is refused.
DUPLICATE_FMR = 1e-6

#: Distinct owners looked at per probe face.
NEIGHBOURS = 5
#: Templates added to the index at once while loading.
_LOAD_CHUNK = 4096


@runtime_checkable
class DuplicateSearch(Protocol):
    """Blocking (FAISS): called from worker threads."""

    def load(self) -> int:
        """Bring the search up to date with the store; returns the templates it holds."""
        ...

    def search(self, faces: np.ndarray) -> set[str]:
        """Credential ids with a face template over the duplicate threshold for any of ``faces``."""
        ...

    def add(self, owner: str, template_ids: Sequence[int], faces: np.ndarray) -> None: ...

    def remove_owner(self, owner: str) -> None: ...


class FaissDuplicateSearch:
    def __init__(self, store: Store, templates: TemplateSealer, *, dim: int, threshold: float) -> None:
        self.store = store
        self.templates = templates
        self.threshold = threshold
        self.index = TemplateIndex(dim)

    def __len__(self) -> int:
        return len(self.index)

    def load(self) -> int:
        cards: dict[str, str | None] = {}  # credential id -> card number
        ids: list[int] = []
        owners: list[str] = []
        vecs: list[np.ndarray] = []
        for row in self.store.active_templates("face"):
            if row.credential_id not in cards:
                cred = self.store.get_credential(row.credential_id)
                cards[row.credential_id] = None if cred is None else cred.card_number
            card = cards[row.credential_id]
            if card is None:
                continue
            ids.append(row.template_id)
            owners.append(row.credential_id)
            vecs.append(self.templates.open_face(row.ciphertext, card))
            if len(ids) == _LOAD_CHUNK:
                self.index.add(np.asarray(ids, dtype=np.int64), owners, np.stack(vecs))
                ids, owners, vecs = [], [], []
        if ids:
            self.index.add(np.asarray(ids, dtype=np.int64), owners, np.stack(vecs))
        return len(self.index)

    def search(self, faces: np.ndarray) -> set[str]:
        if not len(self.index):
            return set()
        return {owner for row in self.index.search(faces, NEIGHBOURS) for owner, score in row if score >= self.threshold}

    def add(self, owner: str, template_ids: Sequence[int], faces: np.ndarray) -> None:
        self.index.add(np.asarray(template_ids, dtype=np.int64), [owner] * len(template_ids), faces)

    def remove_owner(self, owner: str) -> None:
        self.index.remove_owner(owner)


class NoDuplicateSearch:
    """Finds nothing: for an engine configured with ``duplicate_search=False``."""

    def __len__(self) -> int:
        return 0

    def load(self) -> int:
        return 0

    def search(self, faces: np.ndarray) -> set[str]:
        return set()

    def add(self, owner: str, template_ids: Sequence[int], faces: np.ndarray) -> None:
        pass

    def remove_owner(self, owner: str) -> None:
        pass
