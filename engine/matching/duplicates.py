"""1:N duplicate search at enrollment: is this face already enrolled on another card?

``DuplicateSearch`` is asked inside the store's enrollment lock, together with the
issue of the new credential, so two enrollments of one face cannot both miss each
other. ``NoDuplicateSearch`` is for engines configured without the check.

``FaissDuplicateSearch`` keeps a face index (:class:`~engine.matching.face_index.FaceIndex`:
template ids and vectors only) that follows the store's template change log
(:mod:`engine.store.sql_log`): before each search it applies the log rows written since
its position, by this node or any other, so a search sees every enrollment committed
before it. Its candidates are re-scored exactly: the candidates' sealed templates are
read from the store (active credentials only) and opened, and the decision at the
threshold is taken on the exact cosine. The index is written to ``directory`` with its
log position and read back at start-up, then brought up to date from the log; without a
usable file (none, another store, another dimension) it is built from the store.
``rebuild`` builds it afresh, retraining the quantiser (``netid index rebuild``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..config import IndexConfig
from ..store import SealedTemplate, Store
from .face_index import FaceIndex, IndexMeta
from .index import normalise
from .templates import TemplateSealer

__all__ = ["DUPLICATE_FMR", "DuplicateSearch", "FaissDuplicateSearch", "NoDuplicateSearch"]

log = logging.getLogger("engine.matching")

#: Target false-match rate of the search: strict, so that no honest resident is refused.
DUPLICATE_FMR = 1e-6

#: Templates opened and added to the index at once while building or catching up.
_CHUNK = 4096


@runtime_checkable
class DuplicateSearch(Protocol):
    """Blocking (FAISS, the store): called from worker threads."""

    def load(self) -> int:
        """Bring the search up to date with the store; returns the templates it holds."""
        ...

    def search(self, faces: np.ndarray) -> set[str]:
        """Credential ids with a face template over the duplicate threshold for any of ``faces``."""
        ...

    def add(self, owner: str, template_ids: Sequence[int], faces: np.ndarray) -> None: ...

    def remove_owner(self, owner: str) -> None: ...

    def flush(self) -> None:
        """Write what it holds to disk, if it keeps anything there and it changed since."""
        ...


class FaissDuplicateSearch:
    def __init__(
        self, store: Store, templates: TemplateSealer, *, dim: int, threshold: float,
        config: IndexConfig | None = None, directory: Path | None = None,
    ) -> None:
        self.store = store
        self.templates = templates
        self.dim = dim
        self.threshold = threshold
        self.config = config or IndexConfig()
        self.directory = directory  # None: never written to disk
        self.index = FaceIndex.empty(dim, self.config)
        self.position = 0  # the last log row applied
        self.saved_at = 0  # the position written to disk
        self.reranked = 0  # candidates re-scored on their stored template, since start
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.index)

    # -- life cycle ------------------------------------------------------------------------------
    def load(self) -> int:
        """The index file if it is this store's, else a build from the store; then the log."""
        with self._lock:
            store_id = self.store.store_id()
            loaded = None if self.directory is None else FaceIndex.load(self.directory, config=self.config)
            if loaded is not None and loaded[1]["store_id"] == store_id and loaded[1]["dim"] == self.dim \
                    and loaded[1]["position"] <= self.store.log_position():
                self.index, meta = loaded
                self.position = self.saved_at = int(meta["position"])
                self.catch_up()
            else:
                if loaded is not None:
                    log.warning("the face index in %s is not this store's: building it again", self.directory)
                self._build()
            if self.position != self.saved_at:
                self.save()
            return len(self.index)

    def rebuild(self) -> dict[str, Any]:
        """A fresh index from the store, its quantiser retrained on the enrolled templates,
        written to disk. Returns the status after."""
        with self._lock:
            started = time.perf_counter()
            self._build()
            self.save()
            return {**self.status(), "rebuild_s": round(time.perf_counter() - started, 3)}

    def _open(self, rows: Iterable[SealedTemplate]) -> tuple[np.ndarray, np.ndarray]:
        rows = list(rows)
        ids = np.fromiter((r.template_id for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.empty((len(rows), self.dim), np.float32)
        for i, r in enumerate(rows):
            vecs[i] = self.templates.open_face(r.ciphertext, r.card_number)
        return ids, vecs

    def _build(self) -> None:
        """Every active face template, then the log from the position read first (the index
        ignores what it already holds, so the overlap of the two reads does no harm)."""
        position = self.store.log_position()
        count = self.store.count_templates("face")
        want = FaceIndex.training_size(count, self.config)
        rows = self.store.sealed_templates("face")
        if want:
            head: list[SealedTemplate] = []
            for row in rows:
                head.append(row)
                if len(head) == want:
                    break
            ids, vecs = self._open(head)
            index = FaceIndex.trained(normalise(vecs, self.dim), expected=count, config=self.config)
            index.add(ids, vecs)
        else:
            index = FaceIndex.empty(self.dim, self.config)
        chunk: list[SealedTemplate] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == _CHUNK:
                index.add(*self._open(chunk))
                chunk = []
        index.add(*self._open(chunk))
        self.index, self.position = index, position
        self.catch_up()
        log.info("face index built: %s, %d templates (%d trained on)", index.kind, len(index), index.trained_on)

    def catch_up(self) -> int:
        """Applies the change log after ``position`` (every node's enrollments and removals);
        returns the face rows applied. One indexed read when there is nothing new."""
        applied = 0
        with self._lock:
            while True:
                page = self.store.template_changes(self.position, modality="face", limit=_CHUNK)
                if not page:
                    break
                changes = [c for c in page if c.modality == "face"]
                i = 0
                while i < len(changes):  # runs of one operation, applied in log order
                    j = i
                    while j < len(changes) and changes[j].op == changes[i].op:
                        j += 1
                    run = changes[i:j]
                    if run[0].op == "add":
                        self.index.add(*self._open(c.sealed for c in run if c.sealed is not None))
                    else:
                        self.index.remove(np.array([c.template_id for c in run], dtype=np.int64))
                    i = j
                self.position = page[-1].seq
                applied += len(changes)
            if self.directory is not None and self.position - self.saved_at >= self.config.save_every:
                self.save()
        return applied

    def save(self) -> IndexMeta | None:
        if self.directory is None:
            return None
        with self._lock:
            meta = self.index.save(self.directory, position=self.position, store_id=self.store.store_id())
            self.saved_at = self.position
            return meta

    def flush(self) -> None:
        with self._lock:
            if self.directory is not None and self.position != self.saved_at:
                self.save()

    def status(self) -> dict[str, Any]:
        with self._lock:
            idx = self.index
            growth = len(idx) / idx.trained_for if idx.trained_for else None
            if idx.kind == "flat":
                advised = len(idx) >= self.config.train_min
            else:
                advised = growth is not None and growth > self.config.retrain_factor
            return {
                "kind": idx.kind, "templates": len(idx), "trained_on": idx.trained_on,
                "trained_for": idx.trained_for, "nlist": idx.nlist,
                "nprobe": idx.index.nprobe if idx.kind == "ivf" else 0,
                "codes": self.config.codes if idx.kind == "ivf" else "flat",
                "position": self.position, "store_position": self.store.log_position(),
                "growth": None if growth is None else round(growth, 3),
                "retrain_factor": self.config.retrain_factor, "rebuild_advised": advised,
                "directory": None if self.directory is None else str(self.directory),
            }

    # -- the search --------------------------------------------------------------------------------
    def candidates(self, faces: np.ndarray) -> list[SealedTemplate]:
        """Sealed templates (of active credentials) whose approximate score against any of
        ``faces`` comes within ``rerank_margin`` of the threshold, among the nearest."""
        scores, ids = self.index.search(faces, self.config.candidates)
        near = ids[(ids >= 0) & (scores >= self.threshold - self.config.rerank_margin)]
        return self.store.sealed_by_id(np.unique(near).tolist()) if len(near) else []

    def exact_scores(self, faces: np.ndarray, found: Sequence[SealedTemplate]) -> dict[str, float]:
        """Credential id → best exact cosine of ``faces`` against its templates in ``found``."""
        if not found:
            return {}
        _, vecs = self._open(found)
        best = (normalise(vecs, self.dim) @ normalise(faces, self.dim).T).max(axis=1)
        out: dict[str, float] = {}
        for row, score in zip(found, best.tolist()):
            out[row.credential_id] = max(score, out.get(row.credential_id, -1.0))
        return out

    def search(self, faces: np.ndarray) -> set[str]:
        with self._lock:
            self.catch_up()
            found = self.candidates(faces)
            self.reranked += len(found)
        return {owner for owner, score in self.exact_scores(faces, found).items() if score >= self.threshold}

    def add(self, owner: str, template_ids: Sequence[int], faces: np.ndarray) -> None:
        """The store's log already holds the new templates: read them from there."""
        self.catch_up()

    def remove_owner(self, owner: str) -> None:
        self.catch_up()


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

    def flush(self) -> None:
        pass
