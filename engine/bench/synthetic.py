"""Synthetic national-scale face templates: real LFW embeddings moved to new identities.

A register of millions cannot be filled with real faces. A synthetic identity here is made
of real material: its centre is a blend of ``BLEND`` real identity centres (their mean
deviation from the overall mean, scaled back by the square root of ``BLEND`` so the spread
of centres is that of real ones), and its images are one real person's images, each moved
by the difference between the new centre and that person's own (the person's real
within-identity variation, kept whole). Embeddings are those of the engine's SFace model,
computed once and cached under ``benchmarks/out/cache`` (``engine.bench.embeddings``).

:func:`compare` checks the result against the real set: genuine and impostor scores, each
person (real or synthetic) weighted alike, by two-sample Kolmogorov-Smirnov statistic,
quantiles and the rate above given thresholds. Planted duplicates are real: a real person's
two images enrolled, a third one searched (:func:`planted`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BLEND", "RealFaces", "Synthesizer", "compare", "ks_statistic", "load_real_faces", "planted"]

#: Real identity centres blended into one synthetic centre (8 matched the real impostor
#: tail best among 4, 8 and 16; docs/register.md).
BLEND = 8


@dataclass
class RealFaces:
    vectors: np.ndarray  # (n, d) unit rows
    person: np.ndarray  # (n,) person index
    names: list[str]

    def members(self) -> list[np.ndarray]:
        order = np.argsort(self.person, kind="stable")
        bounds = np.searchsorted(self.person[order], np.arange(len(self.names) + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(len(self.names))]


def load_real_faces(data_root: Path, cache_dir: Path, models_dir: Path | None = None) -> RealFaces:
    """SFace embeddings of every LFW image under ``data_root/lfw/images`` (cached; images
    where the engine finds no single face are left out)."""
    from engine.bench.embeddings import EmbeddingCache, embed_files, face_cache_key
    from engine.inference.face import FaceExtractor
    from engine.inference.models import DEFAULT_MODELS_DIR

    images = sorted((data_root / "lfw" / "images").glob("*/*.jpg"))
    if not images:
        raise SystemExit(f"no LFW images under {data_root / 'lfw' / 'images'}")
    keys = [str(p.relative_to(data_root)) for p in images]
    fe = FaceExtractor(models_dir or DEFAULT_MODELS_DIR)
    key, _ = face_cache_key(fe)
    cache = EmbeddingCache(cache_dir, "face", key, fe.dim)
    emb, _ = embed_files(keys, lambda k: (data_root / k).read_bytes(), fe.embed_batch, cache, desc="LFW faces")
    ok = emb.ok
    x = emb.emb[ok]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    people = [k.split("/")[-2] for k, good in zip(keys, ok) if good]
    names, person = np.unique(np.array(people), return_inverse=True)
    return RealFaces(x.astype(np.float32), person.astype(np.int64), [str(n) for n in names])


class Synthesizer:
    """Draws synthetic identities (see the module docstring); seeded."""

    def __init__(self, real: RealFaces, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        members = real.members()
        self.multi = [m for m in members if len(m) >= 2]
        self.x = real.vectors
        self.centres = np.stack([self.x[m].mean(axis=0) for m in self.multi])
        self.mean = self.centres.mean(axis=0)

    def identities(self, n: int, per: int) -> np.ndarray:
        """(n, per, d) unit vectors: ``per`` images of each of ``n`` new identities."""
        rng = self.rng
        src = rng.integers(0, len(self.centres), (n, BLEND))
        centres = self.mean + (self.centres[src] - self.mean).sum(axis=1) / np.sqrt(BLEND)
        donors = rng.integers(0, len(self.multi), n)
        out = np.empty((n, per, self.x.shape[1]), np.float32)
        for i, d in enumerate(donors):
            m = self.multi[d]
            pick = rng.choice(m, per, replace=len(m) < per)
            out[i] = centres[i] + (self.x[pick] - self.centres[d])
        out /= np.linalg.norm(out, axis=2, keepdims=True)
        return out


def planted(real: RealFaces, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(enrolled (n, 2, d), probes (n, d), names): two real images of a person enrolled, a
    third searched; ``n`` persons with three images or more (fewer if LFW has fewer)."""
    rng = np.random.default_rng(seed)
    three = [m for m in real.members() if len(m) >= 3]
    chosen = rng.permutation(len(three))[:n]
    enrolled, probes, names = [], [], []
    for c in chosen:
        pick = rng.choice(three[c], 3, replace=False)
        enrolled.append(real.vectors[pick[:2]])
        probes.append(real.vectors[pick[2]])
        names.append(real.names[int(real.person[pick[0]])])
    return np.stack(enrolled), np.stack(probes), names


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two ECDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


QUANTILES = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)


def _real_scores(real: RealFaces, pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    members = real.members()
    multi = [m for m in members if len(m) >= 2]
    g = np.array([rng.choice(multi[i], 2, replace=False) for i in rng.integers(0, len(multi), pairs)])
    genuine = np.einsum("ij,ij->i", real.vectors[g[:, 0]], real.vectors[g[:, 1]])
    pa, pb = rng.integers(0, len(members), (2, pairs))
    keep = pa != pb
    a = np.array([rng.choice(members[p]) for p in pa[keep]])
    b = np.array([rng.choice(members[p]) for p in pb[keep]])
    return genuine, np.einsum("ij,ij->i", real.vectors[a], real.vectors[b])


def compare(real: RealFaces, synth: Synthesizer, *, pairs: int, thresholds: dict[str, float], seed: int) -> dict:
    """Genuine and impostor score distributions, real against synthetic (each person weighted alike)."""
    rng = np.random.default_rng(seed)
    real_gen, real_imp = _real_scores(real, pairs, rng)
    ids = synth.identities(pairs, 2)
    syn_gen = np.einsum("ij,ij->i", ids[:, 0], ids[:, 1])
    a, b = rng.integers(0, pairs, (2, pairs))
    keep = a != b
    syn_imp = np.einsum("ij,ij->i", ids[a[keep], 0], ids[b[keep], 1])

    def q(v: np.ndarray) -> list[float]:
        return [round(float(x), 4) for x in np.quantile(v, QUANTILES)]

    return {
        "pairs": pairs, "quantiles_at": list(QUANTILES),
        "genuine": {"ks": round(ks_statistic(real_gen, syn_gen), 4), "real": q(real_gen), "synthetic": q(syn_gen)},
        "impostor": {"ks": round(ks_statistic(real_imp, syn_imp), 4), "real": q(real_imp), "synthetic": q(syn_imp)},
        "impostor_above": {
            name: {"threshold": round(t, 4), "real": float((real_imp >= t).mean()), "synthetic": float((syn_imp >= t).mean())}
            for name, t in thresholds.items()
        },
    }
