"""The face index of the duplicate search: FAISS, exact or approximate, written to disk.

A :class:`FaceIndex` holds template ids and their (possibly compressed) vectors, nothing
else: no owner, no card number. Small registers get an exact ``IndexFlatIP``; from
``IndexConfig.train_min`` templates on, an IVF index whose lists hold product-quantised
codes (``IndexConfig.codes``), trained on the enrolled templates themselves. Scores it
returns are approximate for IVF: the duplicate search re-scores its candidates exactly on
the stored templates (:mod:`engine.matching.duplicates`).

Which ids it holds is kept in a bitmap (:class:`IdSet`, one bit per template id), so that
adding a template twice or removing one it never had changes nothing: the index can be
filled from a scan of the store and then brought up to date from the change log without
caring where the two overlap.

On disk (``save``/``load``), in one directory: ``face-<position>.faiss`` and
``face-<position>.ids.npy``, and ``face.json`` naming them with the log position they
reflect and the store they came from; ``face.json`` is replaced last, atomically, so a
crash while writing leaves the previous index in use.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..config import IndexConfig
from .index import normalise

__all__ = ["FaceIndex", "IdSet", "IndexMeta", "default_nlist"]

META = "face.json"
FORMAT = 1
#: Fewer templates than this are never trained on, whatever ``train_min`` says (k-means and
#: the product quantiser need a few hundred points).
MIN_TRAIN = 256


class IdSet:
    """A set of non-negative int64 ids as a growable bitmap (1 bit per id up to the largest)."""

    def __init__(self, words: np.ndarray | None = None) -> None:
        self.words = np.zeros(1024, dtype=np.uint64) if words is None else words.astype(np.uint64)
        self.count = int(np.unpackbits(self.words.view(np.uint8)).sum(dtype=np.int64))

    def _grow(self, top: int) -> None:
        need = top // 64 + 1
        if need > len(self.words):
            self.words = np.concatenate([self.words, np.zeros(max(need, 2 * len(self.words)) - len(self.words), np.uint64)])

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        inside = ids // 64 < len(self.words)
        out = np.zeros(len(ids), dtype=bool)
        w = ids[inside]
        out[inside] = (self.words[w // 64] >> (w % 64).astype(np.uint64)) & np.uint64(1) == 1
        return out

    def add(self, ids: np.ndarray) -> None:
        """``ids`` must be distinct and absent."""
        if len(ids):
            self._grow(int(ids.max()))
            np.bitwise_or.at(self.words, ids // 64, np.left_shift(np.uint64(1), (ids % 64).astype(np.uint64)))
            self.count += len(ids)

    def discard(self, ids: np.ndarray) -> None:
        """``ids`` must be distinct and present."""
        if len(ids):
            np.bitwise_and.at(self.words, ids // 64, ~np.left_shift(np.uint64(1), (ids % 64).astype(np.uint64)))
            self.count -= len(ids)


class IndexMeta(dict):
    """What ``face.json`` says: ``store_id``, ``position``, ``kind`` (flat or ivf), ``dim``,
    ``trained_on`` (templates), ``trained_for`` (the register's templates then), ``nlist``, ``codes``, ``templates``, ``built_at`` and the file names."""


def _nlist_for(templates: int, config: IndexConfig) -> int:
    return config.nlist or default_nlist(templates)


def default_nlist(templates: int) -> int:
    """Half the square root of the templates: lists of ``2 * sqrt(templates)`` codes. Fewer,
    longer lists than the usual ``4 to 16 sqrt`` because a duplicate at the threshold is far
    from its probe (cosine 0.57), and the finer the partition, the more of them sit in lists
    the probe does not search (docs/register.md, "How many lists")."""
    return max(1, int(round(0.5 * math.sqrt(templates))))


class FaceIndex:
    """Template ids → vectors of one dimension, searched by inner product. Thread-safe."""

    def __init__(self, index: Any, ids: IdSet, *, kind: str, dim: int, trained_on: int, config: IndexConfig,
                 trained_for: int = 0) -> None:
        self.index = index
        self.trained_for = trained_for  # templates in the register when it was trained
        self.ids = ids
        self.kind = kind
        self.dim = dim
        self.trained_on = trained_on
        self.config = config
        self.nlist = int(faiss.extract_index_ivf(index).nlist) if kind == "ivf" else 0
        self._lock = threading.Lock()
        if kind == "ivf":
            self.probe(config.probe_fraction)

    def probe(self, fraction: float) -> int:
        """Search ``fraction`` of an IVF index's lists, at least ``config.min_probe`` of them
        (all, in an index with fewer); returns how many."""
        ivf = faiss.extract_index_ivf(self.index)
        ivf.nprobe = min(self.nlist, max(self.config.min_probe, math.ceil(self.nlist * fraction)))
        return int(ivf.nprobe)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def empty(cls, dim: int, config: IndexConfig) -> FaceIndex:
        return cls(faiss.IndexIDMap(faiss.IndexFlatIP(dim)), IdSet(), kind="flat", dim=dim, trained_on=0, config=config)

    @classmethod
    def trained(cls, sample: np.ndarray, *, expected: int, config: IndexConfig) -> FaceIndex:
        """An empty IVF index trained on ``sample`` (normalised rows), with lists for a
        register of ``expected`` templates."""
        dim = sample.shape[1]
        nlist = min(_nlist_for(expected, config), max(1, len(sample) // 39))
        index = faiss.index_factory(dim, f"IVF{nlist},{config.codes}", faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        return cls(index, IdSet(), kind="ivf", dim=dim, trained_on=len(sample), config=config, trained_for=expected)

    @staticmethod
    def training_size(templates: int, config: IndexConfig) -> int:
        """Templates to train an index for a register of ``templates``: 0 if it stays flat."""
        if templates < max(config.train_min, MIN_TRAIN):
            return 0
        return min(templates, max(20_000, 40 * _nlist_for(templates, config)))

    # -- contents --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.ids.count

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Adds the templates it does not hold yet; returns how many."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return 0
        vecs = normalise(vectors, self.dim)
        _, first = np.unique(ids, return_index=True)
        keep = np.zeros(len(ids), dtype=bool)
        keep[first] = True
        with self._lock:
            keep &= ~self.ids.contains(ids)
            if keep.any():
                self.index.add_with_ids(np.ascontiguousarray(vecs[keep]), np.ascontiguousarray(ids[keep]))
                self.ids.add(ids[keep])
        return int(keep.sum())

    def remove(self, ids: np.ndarray) -> int:
        """Removes the templates it holds among ``ids``; returns how many."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        with self._lock:
            ids = ids[self.ids.contains(ids)]
            if len(ids):
                self.index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
                self.ids.discard(ids)
        return len(ids)

    def search(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (m, k), best first; ids of -1 where there are fewer than k."""
        p = normalise(probes, self.dim)
        with self._lock:
            if self.ids.count == 0:
                return np.full((len(p), k), -np.inf, np.float32), np.full((len(p), k), -1, np.int64)
            return self.index.search(p, k)

    def nbytes(self) -> int:
        """Bytes of the index as written (about its size in memory) plus the id bitmap."""
        with self._lock:
            return int(faiss.serialize_index(self.index).nbytes) + self.ids.words.nbytes

    # -- on disk -----------------------------------------------------------------------------------
    def save(self, directory: Path, *, position: int, store_id: str) -> IndexMeta:
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"face-{position}-{os.getpid()}-{time.monotonic_ns()}"
        with self._lock:
            faiss.write_index(self.index, str(directory / f"{stem}.faiss"))
            np.save(directory / f"{stem}.ids.npy", self.ids.words)
            count = self.ids.count
        meta = IndexMeta(
            format=FORMAT, store_id=store_id, position=position, kind=self.kind, dim=self.dim,
            trained_on=self.trained_on, trained_for=self.trained_for, nlist=self.nlist, codes=self.config.codes if self.kind == "ivf" else "flat",
            templates=count, built_at=time.time(), index_file=f"{stem}.faiss", ids_file=f"{stem}.ids.npy",
        )
        tmp = directory / f"{META}.{stem}.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, directory / META)
        for old in directory.glob("face-*"):  # earlier files (and leftovers of a crash)
            if old.name not in (meta["index_file"], meta["ids_file"]):
                old.unlink(missing_ok=True)
        return meta

    @staticmethod
    def read_meta(directory: Path) -> IndexMeta | None:
        try:
            meta = IndexMeta(json.loads((directory / META).read_text()))
        except (OSError, ValueError):
            return None
        return meta if meta.get("format") == FORMAT else None

    @classmethod
    def load(cls, directory: Path, *, config: IndexConfig) -> tuple[FaceIndex, IndexMeta] | None:
        """The index written in ``directory`` and what it reflects; ``None`` if there is none
        (or it cannot be read)."""
        meta = cls.read_meta(directory)
        if meta is None:
            return None
        try:
            index = faiss.read_index(str(directory / meta["index_file"]))
            words = np.load(directory / meta["ids_file"], allow_pickle=False)
        except (OSError, RuntimeError, ValueError):
            return None
        ids = IdSet(words)
        if ids.count != index.ntotal:
            return None
        return cls(index, ids, kind=meta["kind"], dim=meta["dim"], trained_on=meta["trained_on"], config=config,
                   trained_for=meta.get("trained_for", 0)), meta
