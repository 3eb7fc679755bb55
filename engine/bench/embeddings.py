"""Embeddings of the benchmark data through the engine's own extractors, cached on disk.

The cache is one ``.npz`` per extractor set-up, named by a digest of the model files'
sha256 and the extractor configuration, holding for every file (by its path relative
to the data root) either the embedding or the code of the :class:`SampleError` the
engine raised for it (a failure to acquire is recorded, never dropped). A second run
embeds only what is missing.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import SampleError

__all__ = ["Embedded", "EmbeddingCache", "embed_files", "face_cache_key", "voice_cache_key", "progress"]

OK = "ok"


def progress(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool = True):
    """A tqdm progress bar on stderr (a no-op wrapper when disabled)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, file=sys.stderr,
                unit="it", dynamic_ncols=True, mininterval=1.0)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def face_cache_key(extractor) -> tuple[str, dict[str, str]]:
    """(cache key, model digests) for a :class:`engine.inference.face.FaceExtractor`."""
    models = {"yunet": extractor.det_manifest.sha256, "sface": extractor.emb_manifest.sha256}
    return _digest("face", models["yunet"], models["sface"], repr(extractor.config)), models


def voice_cache_key(extractor, max_seconds: float) -> tuple[str, dict[str, str]]:
    """(cache key, model digests) for a :class:`engine.inference.voice.VoiceExtractor` + crop."""
    models = {"campplus": extractor.manifest.sha256}
    return _digest("voice", models["campplus"], repr(extractor.config), f"crop={max_seconds:g}"), models


@dataclass
class Embedded:
    """Embeddings of ``keys`` in order; failed rows are NaN and ``status`` says why."""

    keys: list[str]
    emb: np.ndarray  # (n, d) float32
    status: list[str]  # "ok" or a SampleError code
    #: what the extractor said of each input besides its vector (a voice's detected band)
    tags: list[str] | None = None

    @property
    def ok(self) -> np.ndarray:
        return np.array([s == OK for s in self.status], dtype=bool)

    def failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.status:
            if s != OK:
                out[s] = out.get(s, 0) + 1
        return dict(sorted(out.items()))


class EmbeddingCache:
    def __init__(self, directory: Path, kind: str, key: str, dim: int) -> None:
        self.path = Path(directory) / f"{kind}-{key[:20]}.npz"
        self.dim = dim
        self.vectors: dict[str, np.ndarray] = {}
        self.status: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        if self.path.exists():
            with np.load(self.path, allow_pickle=False) as z:
                keys = [str(k) for k in z["keys"]]
                emb = z["emb"].astype(np.float32)
                status = [str(s) for s in z["status"]]
                tags = [str(t) for t in z["tags"]] if "tags" in z.files else [""] * len(keys)
            for k, e, s, t in zip(keys, emb, status, tags, strict=True):
                self.status[k] = s
                self.tags[k] = t
                if s == OK:
                    self.vectors[k] = e

    def __contains__(self, key: str) -> bool:
        return key in self.status

    def put(self, key: str, value: np.ndarray | SampleError) -> None:
        """Keep an embedding (a vector, or a ``(vector, tag)`` pair such as a voice's
        :class:`engine.inference.speaker.SpeakerEmbedding`) or the error of its input."""
        if isinstance(value, SampleError):
            self.status[key] = value.code
            self.vectors.pop(key, None)
            self.tags[key] = ""
        else:
            vec, tag = value if isinstance(value, tuple) else (value, "")
            self.status[key] = OK
            self.vectors[key] = np.asarray(vec, dtype=np.float32)
            self.tags[key] = str(tag)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.status)
        emb = np.full((len(keys), self.dim), np.nan, dtype=np.float32)
        for i, k in enumerate(keys):
            if k in self.vectors:
                emb[i] = self.vectors[k]
        tmp = self.path.with_name(self.path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, keys=np.array(keys), emb=emb, status=np.array([self.status[k] for k in keys]),
                 tags=np.array([self.tags.get(k, "") for k in keys]))
        tmp.replace(self.path)

    def get(self, keys: Sequence[str]) -> Embedded:
        emb = np.full((len(keys), self.dim), np.nan, dtype=np.float32)
        status = []
        for i, k in enumerate(keys):
            s = self.status[k]
            status.append(s)
            if s == OK:
                emb[i] = self.vectors[k]
        return Embedded(list(keys), emb, status, [self.tags.get(k, "") for k in keys])


def embed_files(
    keys: Sequence[str],
    load: Callable[[str], object],
    embed: Callable[[list], list],
    cache: EmbeddingCache,
    *,
    batch: int = 32,
    desc: str = "",
    show_progress: bool = True,
    save_every_s: float = 60.0,
) -> tuple[Embedded, dict[str, float]]:
    """Embed every key not yet cached (``load(key)`` gives the extractor's input).

    Returns the embeddings of all ``keys`` and timing figures for what was computed.
    """
    todo = [k for k in dict.fromkeys(keys) if k not in cache]
    started = time.perf_counter()
    last_save = started
    compute = 0.0
    with progress(total=len(todo), desc=desc, enabled=show_progress and bool(todo)) as bar:
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            inputs = [load(k) for k in chunk]
            t0 = time.perf_counter()
            outs = embed(inputs)
            compute += time.perf_counter() - t0
            if len(outs) != len(chunk):
                raise RuntimeError("extractor returned a different number of results")
            for k, out in zip(chunk, outs):
                cache.put(k, out)
            bar.update(len(chunk))
            if time.perf_counter() - last_save > save_every_s:
                cache.save()
                last_save = time.perf_counter()
    if todo:
        cache.save()
    wall = time.perf_counter() - started
    timing = {"embedded": float(len(todo)), "wall_s": wall, "extract_s": compute,
              "ms_per_item": 1000.0 * compute / len(todo) if todo else 0.0}
    return cache.get(list(keys)), timing
