"""In-memory template index for one modality (FAISS).

``IndexIDMap2(IndexFlatIP(dim))`` over L2-normalised float32 vectors, so inner
products are cosine similarities and the search is exact. Ids are the store's
template ids; each template belongs to an owner (a credential id). The engine's
duplicate search (:mod:`engine.matching.duplicates`) keeps one for the faces.

All operations hold one lock: FAISS releases the GIL while it searches, and its
id map is not safe to mutate while another thread reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import faiss
import numpy as np

from .. import errors

__all__ = ["TemplateIndex", "normalise"]


def normalise(vectors: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) finite, non-zero vectors → contiguous float32 rows of unit length."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("vectors must be finite")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms <= 1e-12).any():
        raise ValueError("vectors must be non-zero")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


class TemplateIndex:
    """Templates of one modality, searchable 1:1 (by owner) and 1:N."""

    def __init__(self, dim: int) -> None:
        if not isinstance(dim, int) or dim <= 0:
            raise errors.ConfigError("the index dimension must be a positive integer")
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._owner_of: dict[int, str] = {}
        self._ids_of: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return int(self._index.ntotal)

    def __contains__(self, owner: object) -> bool:
        with self._lock:
            return owner in self._ids_of

    def owner_count(self) -> int:
        with self._lock:
            return len(self._ids_of)

    def add(self, template_ids: np.ndarray, owners: Sequence[str], vectors: np.ndarray) -> None:
        """Adds templates; an id already present (or repeated) is refused, nothing added."""
        ids = np.asarray(template_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError("template_ids must be a 1-d integer array")
        ids = ids.astype(np.int64)
        vecs = normalise(vectors, self.dim)
        if not (len(ids) == len(owners) == len(vecs)):
            raise ValueError("template_ids, owners and vectors must have the same length")
        if len(ids) == 0:
            return
        if any(not isinstance(o, str) or not o for o in owners):
            raise ValueError("owners must be non-empty strings")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("template ids must be unique")
        with self._lock:
            if any(int(i) in self._owner_of for i in ids):
                raise ValueError("a template id is already in the index")
            self._index.add_with_ids(vecs, ids)
            for i, owner in zip(ids.tolist(), owners):
                self._owner_of[i] = owner
                self._ids_of.setdefault(owner, []).append(i)

    def remove_owner(self, owner: str) -> int:
        """Removes every template of ``owner``; returns how many (0 if none)."""
        with self._lock:
            ids = self._ids_of.pop(owner, None)
            if not ids:
                return 0
            removed = int(self._index.remove_ids(np.asarray(ids, dtype=np.int64)))
            for i in ids:
                del self._owner_of[i]
            if removed != len(ids):  # the maps and FAISS disagree: a bug, not a user error
                raise errors.EngineError("template index out of step with its id map")
            return removed

    def _vectors(self, owner: str) -> np.ndarray:
        ids = self._ids_of.get(owner)
        if not ids:
            raise errors.UnknownCredential("no templates for this credential")
        return self._index.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    def vectors_of(self, owner: str) -> np.ndarray:
        """The owner's normalised templates, (k, dim); ``UnknownCredential`` if none."""
        with self._lock:
            return self._vectors(owner).copy()

    def compare(self, owner: str, probes: np.ndarray) -> np.ndarray:
        """Best cosine similarity of each probe (m, dim) against the owner's templates → (m,)."""
        p = normalise(probes, self.dim)
        with self._lock:
            templates = self._vectors(owner)
        return (p @ templates.T).max(axis=1).astype(np.float32)

    def search(self, probes: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """1:N: for each probe, up to ``k`` distinct owners by best similarity, best first."""
        if k <= 0:
            raise ValueError("k must be positive")
        p = normalise(probes, self.dim)
        with self._lock:
            if self._index.ntotal == 0 or len(p) == 0:
                return [[] for _ in range(len(p))]
            per_owner = max(len(v) for v in self._ids_of.values())
            # Enough neighbours that k distinct owners are among them whenever they exist.
            depth = min(int(self._index.ntotal), k * per_owner)
            scores, ids = self._index.search(p, depth)
            owner_of = self._owner_of
            out: list[list[tuple[str, float]]] = []
            for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):
                best: list[tuple[str, float]] = []
                seen: set[str] = set()
                for score, i in zip(row_scores, row_ids):
                    if i < 0:
                        break
                    owner = owner_of[i]
                    if owner not in seen:
                        seen.add(owner)
                        best.append((owner, float(score)))
                        if len(best) == k:
                            break
                out.append(best)
        return out
