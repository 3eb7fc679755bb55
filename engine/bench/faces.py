"""Face figures on LFW: the 10-fold protocol and all-against-all scoring in blocks.

Scores are cosine similarities of the engine's own embeddings (unit vectors, so the
inner product), computed with FAISS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.bench.datasets import Lfw
from engine.bench.embeddings import Embedded, progress
from engine.bench.stats import ExactScores, TailHistogram

__all__ = ["TenFold", "ten_fold", "AllAgainstAll", "PartScores", "all_against_all", "best_threshold",
           "EnrolledFaces", "first_images", "enrolled_faces"]


# --------------------------------------------------------------------------- 10-fold


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, int]:
    """The threshold maximising correct decisions (accept = score >= t), and how many.

    A pair without a score (a failure to acquire) is a rejection: right for a
    different-person pair, wrong for a same-person pair, whatever the threshold.
    """
    valid = np.isfinite(scores)
    s, y = scores[valid], same[valid]
    fixed = int((~same[~valid]).sum())
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    # threshold at candidate position i accepts s[i:]; candidates between distinct scores
    uniq_idx = np.concatenate(([0], np.flatnonzero(np.diff(s) > 0) + 1, [s.size]))
    gen_below = np.concatenate(([0], np.cumsum(y)))  # same-person pairs rejected below i
    imp_below = np.concatenate(([0], np.cumsum(~y)))
    correct = imp_below[uniq_idx] + (int(y.sum()) - gen_below[uniq_idx])
    best = int(np.argmax(correct))
    i = uniq_idx[best]
    if i == 0:
        thr = float(s[0]) - 1e-6 if s.size else 0.0
    elif i == s.size:
        thr = float(s[-1]) + 1e-6
    else:
        thr = 0.5 * (float(s[i - 1]) + float(s[i]))
    return thr, int(correct[best]) + fixed


@dataclass
class TenFold:
    accuracies: list[float]
    thresholds: list[float]
    mean: float
    std: float
    n_pairs: int
    #: pairs with an image that failed to acquire (counted as rejections above)
    pairs_with_fta: int
    #: the same protocol leaving those pairs out, for comparison with published figures
    mean_without_fta: float
    std_without_fta: float
    pair_eer: float


def _folds(scores: np.ndarray, same: np.ndarray, fold: np.ndarray) -> tuple[list[float], list[float]]:
    accs, thrs = [], []
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        thr, _ = best_threshold(scores[train], same[train])
        s, y = scores[test], same[test]
        accepted = np.where(np.isfinite(s), s >= thr, False)
        accs.append(float((accepted == y).mean()))
        thrs.append(thr)
    return accs, thrs


def ten_fold(lfw: Lfw, faces: Embedded) -> TenFold:
    """LFW View 2: each fold's threshold chosen on the other nine; mean and std."""
    a = np.array([p.a for p in lfw.pairs])
    b = np.array([p.b for p in lfw.pairs])
    same = np.array([p.same for p in lfw.pairs])
    fold = np.array([p.fold for p in lfw.pairs])
    scores = np.einsum("ij,ij->i", faces.emb[a].astype(np.float64), faces.emb[b].astype(np.float64))
    accs, thrs = _folds(scores, same, fold)
    ok = np.isfinite(scores)
    accs2, _ = _folds(scores[ok], same[ok], fold[ok])
    from engine.bench.stats import eer

    e, _ = eer(scores[ok & same], ExactScores(scores[ok & ~same]))
    return TenFold(accs, thrs, float(np.mean(accs)), float(np.std(accs)), int(len(scores)),
                   int((~ok).sum()), float(np.mean(accs2)), float(np.std(accs2)), e)


# --------------------------------------------------------------------------- all-against-all


@dataclass
class PartScores:
    """Every same-person score (exact) and every different-person score (tail + histogram)."""

    name: str
    genuine: ExactScores
    impostor: TailHistogram
    images: int
    identities: int
    #: identities with at least two usable images (the ones behind the genuine scores)
    genuine_identities: int
    #: share of genuine comparisons from the identity with the most
    largest_identity_share: float
    largest_identity: str = ""
    n_genuine_expected: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class AllAgainstAll:
    parts: dict[str, PartScores]  # "all", "A", "B"
    #: image index (into Lfw.images) of each row of the scored order
    order: np.ndarray
    images_used: int
    images_failed: int
    comparisons_lost: int
    seconds: float


def _sorted_usable(lfw: Lfw, ok: np.ndarray) -> np.ndarray:
    idx = [i for i, im in enumerate(lfw.images) if ok[i]]
    idx.sort(key=lambda i: (lfw.part[lfw.images[i].name], lfw.images[i].name, lfw.images[i].number))
    return np.array(idx, dtype=np.int64)


def _identity_ends(names: list[str]) -> np.ndarray:
    """For each row of the scored order, the end (exclusive) of its identity's run."""
    n = len(names)
    id_end = np.empty(n, dtype=np.int64)
    run_end = n
    for i in range(n - 1, -1, -1):
        if i < n - 1 and names[i] != names[i + 1]:
            run_end = i + 1
        id_end[i] = run_end
    return id_end


def _part_sizes(names: list[str], parts: np.ndarray) -> dict[str, tuple[int, int, dict[str, int]]]:
    """Per part ("all", "A", "B"): its images, its genuine comparisons, its images per identity."""

    def sizes(sel: np.ndarray) -> tuple[int, int, dict[str, int]]:
        counts: dict[str, int] = {}
        for i in np.flatnonzero(sel):
            counts[names[i]] = counts.get(names[i], 0) + 1
        m = int(sel.sum())
        gen = sum(c * (c - 1) // 2 for c in counts.values())
        return m, gen, counts

    n = len(names)
    return {key: sizes(sel) for key, sel in (("all", np.ones(n, bool)), ("A", parts == "A"), ("B", parts == "B"))}


class _Router:
    """Sends a block of different-person scores to the parts' histograms; the pairs behind
    the few scores that reach a tail are worked out only for those."""

    def __init__(self, order: np.ndarray, acc: dict[str, TailHistogram]) -> None:
        self.order, self.acc = order, acc

    def _pairs_of(self, rows0: int, cols0: int, ncols: int, positions: np.ndarray):
        def f(sel: np.ndarray) -> np.ndarray:
            r, c = np.divmod(positions[sel], ncols)
            return np.stack((self.order[rows0 + r], self.order[cols0 + c]), axis=1).astype(np.int32)
        return f

    def __call__(self, scores2d: np.ndarray, r0: int, c0: int, mask: np.ndarray | None, keys: tuple[str, ...]) -> None:
        if mask is None:
            vals = scores2d.reshape(-1)
            positions = np.arange(vals.size)
        else:
            vals = scores2d[mask]
            positions = None
        if vals.size == 0:
            return
        ncols = scores2d.shape[1]

        def pair_fn(sel: np.ndarray) -> np.ndarray:
            pos = positions if positions is not None else np.flatnonzero(np.asarray(mask))
            return self._pairs_of(r0, c0, ncols, pos)(sel)

        for key in keys:
            self.acc[key].add(vals, pair_fn)


def _score_blocks(x: np.ndarray, id_end: np.ndarray, n_a: int, block: int, route: _Router,
                  genuine: dict[str, list[np.ndarray]], show_progress: bool) -> None:
    """Score every pair once, in row blocks that never straddle the A/B boundary: the
    genuine scores into ``genuine``, the others through ``route``."""
    import faiss

    n = x.shape[0]
    bounds = list(range(0, n_a, block)) + list(range(n_a, n, block)) + [n]
    bounds = sorted(set(bounds))
    work = sum((bounds[k + 1] - bounds[k]) * (n - bounds[k]) for k in range(len(bounds) - 1))
    with progress(total=work, desc="all-against-all", enabled=show_progress) as bar:
        for r0, r1 in zip(bounds[:-1], bounds[1:]):
            in_a = r0 < n_a
            rows = np.arange(r0, r1)[:, None]
            part_end = n_a if in_a else n
            part_key = "A" if in_a else "B"
            # same part: columns r0 .. part_end (the upper triangle and the genuine runs)
            s = faiss.pairwise_distances(x[r0:r1], x[r0:part_end], metric=faiss.METRIC_INNER_PRODUCT)
            cols = np.arange(r0, part_end)[None, :]
            ends = id_end[r0:r1][:, None]
            gmask = (cols > rows) & (cols < ends)
            g = s[gmask]
            genuine[part_key].append(g)
            genuine["all"].append(g)
            route(s, r0, r0, cols >= ends, (part_key, "all"))
            del s
            if in_a and n_a < n:  # A rows against B columns: all different people
                s = faiss.pairwise_distances(x[r0:r1], x[n_a:], metric=faiss.METRIC_INNER_PRODUCT)
                route(s, r0, n_a, None, ("all",))
                del s
            bar.update((r1 - r0) * (n - r0))


def _part_scores(meta: dict[str, tuple[int, int, dict[str, int]]], genuine: dict[str, list[np.ndarray]],
                 acc: dict[str, TailHistogram]) -> dict[str, PartScores]:
    """Each part's scores, checked against the comparisons it should hold."""
    out: dict[str, PartScores] = {}
    for key, (m, gen, counts) in meta.items():
        gs = np.concatenate(genuine[key]) if genuine[key] else np.zeros(0, np.float32)
        if gs.size != gen:
            raise RuntimeError(f"part {key}: {gs.size} genuine scores, expected {gen}")
        expected_imp = m * (m - 1) // 2 - gen
        if acc[key].n != expected_imp:
            raise RuntimeError(f"part {key}: {acc[key].n} impostor scores, expected {expected_imp}")
        biggest = max(counts.items(), key=lambda kv: kv[1] * (kv[1] - 1), default=("", 0))
        out[key] = PartScores(
            key, ExactScores(gs), acc[key], m, len(counts),
            sum(1 for c in counts.values() if c >= 2),
            (biggest[1] * (biggest[1] - 1) / 2) / gen if gen else 0.0, biggest[0], gen,
        )
    return out


def all_against_all(
    lfw: Lfw, faces: Embedded, *, block: int = 1024, tail_fraction: float = 1.5e-3,
    show_progress: bool = True,
) -> AllAgainstAll:
    """Score every pair of usable images once, in row blocks, with FAISS.

    Images are ordered by (part, identity), so in a row block the same-person columns of
    each row are one contiguous run and the parts are contiguous column ranges; scores
    are routed to the "A", "B" and "all" distributions by slicing, never by copying the
    87-million-score matrix.
    """
    import time

    import faiss  # noqa: F401 - loaded before the clock starts: its import is not scoring time

    t0 = time.perf_counter()
    order = _sorted_usable(lfw, faces.ok)
    x = np.ascontiguousarray(faces.emb[order], dtype=np.float32)
    n = len(order)
    names = [lfw.images[i].name for i in order]
    parts = np.array([lfw.part[nm] for nm in names])
    n_a = int((parts == "A").sum())
    meta = _part_sizes(names, parts)
    acc = {key: TailHistogram(int(math.ceil(tail_fraction * (m * (m - 1) // 2 - gen))) + 64)
           for key, (m, gen, _) in meta.items()}
    genuine: dict[str, list[np.ndarray]] = {"all": [], "A": [], "B": []}
    _score_blocks(x, _identity_ends(names), n_a, block, _Router(order, acc), genuine, show_progress)
    out = _part_scores(meta, genuine, acc)
    total = len(lfw.images)
    lost = total * (total - 1) // 2 - n * (n - 1) // 2
    return AllAgainstAll(out, order, n, total - n, lost, time.perf_counter() - t0)


# --------------------------------------------------------------------------- enrollments of several images


@dataclass
class EnrolledFaces:
    """Face scores as the engine compares them: a probe image against an enrollment of
    ``enroll`` images of one identity, the best cosine over them.

    Every identity of the part whose first ``enroll`` images all acquire is enrolled with
    them; it is compared with every usable image of every other identity of the part
    (impostor) and with its own remaining usable images (genuine).
    """

    part: str
    enroll: int
    genuine: ExactScores
    impostor: ExactScores
    #: identities enrolled; of those, with at least one image left to be genuine probes
    identities: int
    genuine_identities: int
    #: identities whose enrollment images did not all acquire (not enrolled)
    failed_to_enroll: int
    images: int


def first_images(lfw: Lfw) -> dict[str, list[int]]:
    """Each identity's images (indices into ``lfw.images``) in number order."""
    by_name: dict[str, list[int]] = {}
    for i, im in enumerate(lfw.images):
        by_name.setdefault(im.name, []).append(i)
    for v in by_name.values():
        v.sort(key=lambda i: lfw.images[i].number)
    return by_name


def enrolled_faces(lfw: Lfw, faces: Embedded, part: str, enroll: int, *, block: int = 256) -> EnrolledFaces:
    """Every enrollment of ``enroll`` images of a part against every usable image of the part."""
    if enroll < 1:
        raise ValueError("enroll must be at least 1")
    ok = faces.ok
    by_name = {n: v for n, v in first_images(lfw).items() if lfw.part[n] == part}
    probes = np.array([i for v in by_name.values() for i in v if ok[i]], dtype=np.int64)
    owner = np.array([lfw.images[i].name for i in probes])
    x = np.ascontiguousarray(faces.emb[probes], dtype=np.float32)
    enrolled = [(n, v[:enroll]) for n, v in sorted(by_name.items()) if len(v) >= enroll]
    failed = sum(1 for _, e in enrolled if not ok[e].all())
    enrolled = [(n, e) for n, e in enrolled if ok[e].all()]
    gen: list[np.ndarray] = []
    imp: list[np.ndarray] = []
    for b0 in range(0, len(enrolled), block):
        chunk = enrolled[b0 : b0 + block]
        t = np.ascontiguousarray(faces.emb[np.concatenate([e for _, e in chunk])], dtype=np.float32)
        best = (x @ t.T).reshape(len(probes), len(chunk), enroll).max(axis=2)  # (probes, identities)
        for j, (name, e) in enumerate(chunk):
            mine = owner == name
            imp.append(best[~mine, j])
            gen.append(best[mine & ~np.isin(probes, e), j])
    g = np.concatenate(gen) if gen else np.zeros(0, np.float32)
    i = np.concatenate(imp) if imp else np.zeros(0, np.float32)
    gen_ids = sum(1 for a in gen if a.size)
    return EnrolledFaces(part, enroll, ExactScores(g), ExactScores(i), len(enrolled), gen_ids, failed, len(probes))


# --------------------------------------------------------------------------- AS-norm for faces?


def face_as_norm(
    lfw: Lfw, faces: Embedded, *, top_k: int = 200, block: int = 1024, tail_fraction: float = 1.5e-3,
) -> tuple[PartScores, int]:
    """Part B all-against-all with AS-norm scores, the cohort being part A's images.

    Measures whether score normalisation helps faces as it does voices; the engine
    applies it only where it does. Returns the normalised part-B scores and top-k.
    """
    import faiss

    ok = faces.ok
    a_idx = [i for i, im in enumerate(lfw.images) if ok[i] and lfw.part[im.name] == "A"]
    order = _sorted_usable(lfw, ok)
    order = order[[lfw.part[lfw.images[i].name] == "B" for i in order]]
    x = np.ascontiguousarray(faces.emb[order], dtype=np.float32)
    names = np.array([lfw.images[i].name for i in order])
    top_k = min(top_k, len(a_idx))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(faces.emb[a_idx], dtype=np.float32))
    cs, _ = index.search(x, top_k)
    mu = cs.mean(axis=1).astype(np.float32)
    sd = np.maximum(cs.std(axis=1), 1e-6).astype(np.float32)
    n = len(order)
    n_gen = sum(c * (c - 1) // 2 for c in np.unique(names, return_counts=True)[1])
    acc = TailHistogram(int(math.ceil(tail_fraction * (n * (n - 1) // 2 - n_gen))) + 64,
                        lo=-30.0, hi=70.0, bins_per_unit=200)
    gen = []
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        s = faiss.pairwise_distances(x[r0:r1], x[r0:], metric=faiss.METRIC_INNER_PRODUCT)
        s = np.float32(0.5) * ((s - mu[r0:r1, None]) / sd[r0:r1, None] + (s - mu[None, r0:]) / sd[None, r0:])
        rows = np.arange(r0, r1)[:, None]
        cols = np.arange(r0, n)[None, :]
        same = names[r0:r1, None] == names[None, r0:]
        upper = cols > rows
        gen.append(s[upper & same])
        acc.add(s[upper & ~same])
    g = np.concatenate(gen) if gen else np.zeros(0, np.float32)
    counts: dict[str, int] = {}
    for nm in names:
        counts[nm] = counts.get(nm, 0) + 1
    ps = PartScores("B", ExactScores(g), acc, n, len(counts), sum(1 for c in counts.values() if c >= 2), 0.0)
    return ps, top_k
