"""Template vectors as the matchers and the face index compare them.

:func:`normalise` turns embeddings into contiguous float32 rows of unit length, so that
inner products are cosine similarities (:mod:`engine.matching.one_to_one`,
:mod:`engine.matching.face_index`, :mod:`engine.matching.duplicates`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalise"]


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
