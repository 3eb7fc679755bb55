"""``netid bench index``: which FAISS index for the duplicate search, measured in memory.

On ``--credentials`` synthetic credentials of two face templates (``engine.bench.synthetic``)
with real persons planted (two images enrolled, a third searched), each candidate code is
trained and filled as the engine's face index is (``engine.matching.face_index``), then the
planted faces are searched at several probe fractions. Reported per code: bytes a template
(the index as written, over the templates), training and filling time, the error of the
approximate scores among the nearest candidates (|approximate - exact|), and the recall of the
planted duplicates at the duplicate threshold, a candidate counting as found when it is among
the ``candidates`` nearest and within ``rerank_margin`` of the threshold (what the engine
re-scores exactly). Then the growth study: the default code trained on the first 1/1, 1/4 and
1/8 of the register and filled with all of it. One JSON line per result, a summary on stderr.

``--scale`` measures the engine's default index alone at national scale (:func:`scale`): the
register is drawn ``--chunk`` credentials at a time and only the training sample and the
chunk being added are held as floats; the index is trained and filled as ``netid index
rebuild`` does (the first ``FaceIndex.training_size`` templates, then the rest in order), and
each probe face is searched alone, as a node searches, at every probe fraction, thread count
and number of candidates asked for; recall and candidates within the margin are also counted
at narrower re-rank margins (``--margins``) from the same searches, and each planted
duplicate missed is given its cause (:func:`_misses`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import time

import numpy as np

from engine.bench._common import REPO, data_root, emit, stderr

__all__ = ["main"]

CODES = ("SQ8", "PQ32", "PQ32x4fs", "PQ64x4fs")
#: FAISS fast-scan search implementations that share one query's lists among the threads
#: (heap for up to 20 results, reservoir beyond); the default (0) gives a query one thread.
OVER_LISTS = (14, 15)


def _register(args):
    from engine.bench.synthetic import Synthesizer, load_real_faces, planted

    real = load_real_faces(data_root(args.data), REPO / "benchmarks" / "out" / "cache")
    faces = Synthesizer(real, args.seed).identities(args.credentials, 2)
    enrolled, probes, _ = planted(real, args.planted, args.seed)
    where = np.random.default_rng(args.seed).choice(args.credentials, len(probes), replace=False)
    faces[where] = enrolled
    return faces.reshape(-1, faces.shape[2]), probes, where * 2, np.einsum("ij,ikj->ik", probes, enrolled).max(axis=1)


def _measure(index, vectors, probes, owner, exact, threshold, config, fractions):
    due = exact >= threshold
    out = []
    for fraction in fractions:
        nprobe = index.probe(fraction)
        started = time.perf_counter()
        scores, ids = index.search(probes, config.candidates)
        ms = (time.perf_counter() - started) / len(probes) * 1000
        mine = (ids == owner[:, None]) | (ids == owner[:, None] + 1)
        found = (mine & (scores >= threshold - config.rerank_margin)).any(axis=1)
        err = np.abs(scores - np.einsum("ij,ikj->ik", probes, vectors[np.maximum(ids, 0)]))[ids >= 0]
        out.append({"probe_fraction": fraction, "nprobe": nprobe, "recall": round(float(found[due].mean()), 5),
                    "ms_per_search": round(ms, 3), "error_p50": round(float(np.quantile(err, 0.5)), 4),
                    "error_p99": round(float(np.quantile(err, 0.99)), 4)})
    return out


def _scale_register(args, synth, enrolled, where, config, templates):
    """The register ``--chunk`` credentials at a time (template ids ``2 * credential`` and
    ``2 * credential + 1``, the planted persons at ``where``), trained on its first
    ``FaceIndex.training_size`` templates and filled in order. Returns the index and timings."""
    from engine.matching.face_index import FaceIndex

    want = FaceIndex.training_size(templates, config)
    index, pending = None, []
    spent = {"generate_s": 0.0, "train_s": 0.0, "add_s": 0.0}
    for start in range(0, args.credentials, args.chunk):
        t0 = time.perf_counter()
        size = min(args.chunk, args.credentials - start)
        faces = synth.identities(size, 2)
        inside = (where >= start) & (where < start + size)
        faces[where[inside] - start] = enrolled[inside]
        pending.append((np.arange(2 * start, 2 * (start + size), dtype=np.int64), faces.reshape(2 * size, -1)))
        t1 = time.perf_counter()
        spent["generate_s"] += t1 - t0
        if index is None:
            if sum(len(ids) for ids, _ in pending) < want and start + size < args.credentials:
                continue
            index = FaceIndex.trained(np.concatenate([v for _, v in pending])[:want], expected=templates, config=config)
            spent["train_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
        for ids, vectors in pending:
            index.add(ids, vectors)
        pending = []
        spent["add_s"] += time.perf_counter() - t1
        stderr(f"{start + size:,}/{args.credentials:,} credentials indexed ({spent['generate_s']:.0f} s drawing, "
               f"{spent['train_s']:.0f} s training, {spent['add_s']:.0f} s adding)")
    return index, spent


def _one_at_a_time(index, queries, k, threads):
    """Each query searched alone: (seconds, scores, ids) in the order of ``queries``. With more
    than one thread, one query's lists are shared among them (see :data:`OVER_LISTS`)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexIVFFastScan):
        inner.implem = OVER_LISTS[k > 20] if threads > 1 else 0
    else:
        faiss.extract_index_ivf(inner).parallel_mode = 1 if threads > 1 else 0
    for q in queries[:20]:  # warm-up
        index.search(q[None], k)
    took = np.empty(len(queries))
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        s, found = index.search(q[None], k)
        took[i] = time.perf_counter() - t0
        scores[i], ids[i] = s[0], found[0]
    return took, scores, ids


def _within(mine, scores, ids, floor):
    """(whether each planted probe found one of its owner's templates at or above ``floor``,
    how many candidates of each search are at or above it)."""
    return (mine & (scores[:len(mine)] >= floor)).any(axis=1), ((ids >= 0) & (scores >= floor)).sum(axis=1)


def _misses(index, probes, home, decoded, missed, scores, ids, floor, k):
    """Why each planted duplicate at the threshold was not found, judged on its owner's
    best-scoring enrolled template, which sits in list ``home``: ``list`` (that list is not
    among those probed), ``code``
    (its product-quantised score, decoded without the fast scan's 8-bit tables, is below
    ``floor``), ``crowded`` (the ``k`` candidates returned all score above its decoded score)
    and ``scan`` (none of these: the fast scan's quantised tables scored it below ``floor``)."""
    import faiss

    ivf = faiss.extract_index_ivf(index.index)
    causes = {"list": 0, "code": 0, "crowded": 0, "scan": 0}
    rows = np.flatnonzero(missed)
    if not len(rows):
        return causes
    _, probed = ivf.quantizer.search(np.ascontiguousarray(probes[rows]), ivf.nprobe)
    for j, i in enumerate(rows):
        if home[i] not in probed[j]:
            causes["list"] += 1
        elif decoded[i] < floor:
            causes["code"] += 1
        elif (ids[i] >= 0).sum() == k and scores[i, -1] >= decoded[i]:
            causes["crowded"] += 1
        else:
            causes["scan"] += 1
    return causes


def scale(args, threshold: float) -> int:
    """``--scale``: the engine's default face index at ``--credentials`` (see the module doc)."""
    import faiss

    from engine.bench.synthetic import Synthesizer, load_real_faces, planted
    from engine.config import IndexConfig
    from engine.matching.face_index import FaceIndex, default_nlist

    config = IndexConfig(train_min=1, nlist=args.nlist, min_probe=1)  # the fractions asked for, exactly
    templates = 2 * args.credentials
    if not FaceIndex.training_size(templates, config):
        raise SystemExit("--scale: the register is too small to train an index")
    real = load_real_faces(data_root(args.data), REPO / "benchmarks" / "out" / "cache")
    synth = Synthesizer(real, args.seed)
    enrolled, probes, _ = planted(real, args.planted, args.seed)
    where = np.random.default_rng(args.seed).choice(args.credentials, len(probes), replace=False)
    pair = np.einsum("ij,ikj->ik", probes, enrolled)  # each probe against its owner's two
    exact = pair.max(axis=1)
    due = exact >= threshold
    build_threads = os.cpu_count() or 1
    faiss.omp_set_num_threads(build_threads)
    index, spent = _scale_register(args, synth, enrolled, where, config, templates)
    nbytes = index.nbytes()
    fresh = synth.identities(args.fresh, 1)[:, 0]  # faces not in the register
    queries = np.concatenate([probes, fresh]).astype(np.float32)
    order = np.random.default_rng(args.seed).permutation(len(queries))  # planted and fresh interleaved
    emit({"figure": "index_scale_build", "codes": config.codes, "credentials": args.credentials, "templates": len(index),
          "nlist": index.nlist, "nlist_default": default_nlist(templates),
          "trained_on": index.trained_on, "index_bytes": nbytes, "bytes_per_template": round(nbytes / len(index), 1),
          **{k: round(v, 1) for k, v in spent.items()}, "build_threads": build_threads,
          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
          "planted": len(probes), "planted_at_threshold": int(due.sum()), "fresh": len(fresh), "threshold": round(threshold, 4)})
    stderr(f"{config.codes}, {len(index):,} templates, nlist {index.nlist}: {nbytes / 2**20:,.0f} MiB "
           f"({nbytes / len(index):.1f} B a template); train {spent['train_s']:.0f} s, add {spent['add_s']:.0f} s")
    owner = where * 2
    best = enrolled[np.arange(len(probes)), pair.argmax(axis=1)].astype(np.float32)
    decoded = np.einsum("ij,ij->i", index.index.sa_decode(index.index.sa_encode(best)), probes)
    home = faiss.extract_index_ivf(index.index).quantizer.search(best, 1)[1][:, 0]  # the list of each
    low = (exact - decoded)[due]
    emit({"figure": "index_scale_codes", "credentials": args.credentials, "planted_at_threshold": int(due.sum()),
          "code_error_p50": round(float(np.quantile(np.abs(low), 0.5)), 4),
          "code_error_p99": round(float(np.quantile(np.abs(low), 0.99)), 4),
          "below_by_more_than_margin": int((low > config.rerank_margin).sum())})
    margins = [float(m) for m in args.margins.split(",") if m and float(m) < config.rerank_margin]
    for fraction in (float(f) for f in args.fractions.split(",")):
        nprobe = index.probe(fraction)
        for threads in (int(t) for t in args.threads.split(",")):
            for k in (int(c) for c in args.candidates.split(",")):
                took, scores, ids = _one_at_a_time(index, queries[order], k, threads)
                back = np.argsort(order)
                scores, ids = scores[back], ids[back]
                mine = (ids[:len(probes)] == owner[:, None]) | (ids[:len(probes)] == owner[:, None] + 1)
                found, near = _within(mine, scores, ids, threshold - config.rerank_margin)
                over = ((ids[len(probes):] >= 0) & (scores[len(probes):] >= threshold)).sum(axis=1)
                causes = _misses(index, probes, home, decoded, due & ~found, scores, ids,
                                 threshold - config.rerank_margin, k)
                narrower = [(m, *_within(mine, scores, ids, threshold - m)) for m in margins]
                ms = np.quantile(took, [0.5, 0.99]) * 1000
                row = {"figure": "index_scale_search", "credentials": args.credentials, "nlist": index.nlist,
                       "probe_fraction": fraction, "nprobe": nprobe, "threads": threads, "candidates": k,
                       "recall": round(float(found[due].mean()), 5), "found": int(found[due].sum()),
                       "planted_at_threshold": int(due.sum()), "searches": len(queries),
                       "p50_ms": round(float(ms[0]), 3), "p99_ms": round(float(ms[1]), 3),
                       "within_margin_mean": round(float(near.mean()), 1), "misses": causes, "within_margin_p99": float(np.quantile(near, 0.99)),
                       "within_margin_fresh_mean": round(float(near[len(probes):].mean()), 1),
                       "fresh_over_threshold_mean": round(float(over.mean()), 2),
                       "narrower": [{"rerank_margin": m, "recall": round(float(f[due].mean()), 5), "within_margin_mean": round(float(n.mean()), 1)}
                                    for m, f, n in narrower],
                       "load_average": round(os.getloadavg()[0], 2)}  # the machine's: a shared one shows in p99
                emit(row)
                stderr(f"1/{round(1 / fraction)} of the lists, {threads} thread(s), {k} candidates: recall {row['recall']} "
                       f"({row['found']}/{row['planted_at_threshold']}), p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                       f"{row['within_margin_mean']} within the margin; misses {causes}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netid bench index", description=__doc__.split("\n\n")[0])
    p.add_argument("--credentials", type=int, default=100_000)
    p.add_argument("--planted", type=int, default=1000)
    p.add_argument("--codes", default=",".join(CODES))
    p.add_argument("--fractions", default="0.0625,0.125,0.25")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--scale", action="store_true", help="the default index alone, drawn in chunks, each probe searched alone")
    p.add_argument("--chunk", type=int, default=200_000, help="--scale: credentials drawn at a time")
    p.add_argument("--nlist", type=int, default=0, help="--scale: lists of the index (0: the engine's, sqrt(templates) / 2)")
    p.add_argument("--candidates", default="128,256,512,1024", help="--scale: nearest asked for per probe face")
    p.add_argument("--threads", default="1,2", help="--scale: FAISS threads per search")
    p.add_argument("--fresh", type=int, default=1000, help="--scale: searches of faces not in the register")
    p.add_argument("--margins", default="0.05,0.025", help="--scale: narrower re-rank margins also counted (same searches)")
    args = p.parse_args(argv)
    import faiss

    from engine.config import IndexConfig
    from engine.inference.models import DEFAULT_MODELS_DIR
    from engine.matching import DUPLICATE_FMR
    from engine.matching.calibration import ScoreModel
    from engine.matching.face_index import FaceIndex

    threshold = ScoreModel.load(DEFAULT_MODELS_DIR).threshold("face", DUPLICATE_FMR)
    if args.scale:
        return scale(args, threshold)
    faiss.omp_set_num_threads(1)
    vectors, probes, owner, exact = _register(args)
    ids = np.arange(len(vectors), dtype=np.int64)
    fractions = [float(f) for f in args.fractions.split(",")]
    base = IndexConfig(train_min=1, min_probe=1)

    def build(config: IndexConfig, first: int) -> tuple[FaceIndex, float, float]:
        t0 = time.perf_counter()
        index = FaceIndex.trained(vectors[:FaceIndex.training_size(first, config)], expected=first, config=config)
        t1 = time.perf_counter()
        index.add(ids, vectors)
        return index, t1 - t0, time.perf_counter() - t1

    for codes in args.codes.split(","):
        config = dataclasses.replace(base, codes=codes)
        index, train_s, add_s = build(config, len(vectors))
        row = {"figure": "index_code", "codes": codes, "templates": len(vectors), "nlist": index.nlist,
               "bytes_per_template": round(index.nbytes() / len(vectors), 1), "train_s": round(train_s, 1),
               "add_s": round(add_s, 1), "planted_at_threshold": int((exact >= threshold).sum()),
               "results": _measure(index, vectors, probes, owner, exact, threshold, config, fractions)}
        emit(row)
        stderr(f"{codes}: {row['bytes_per_template']} B/template; " + "; ".join(
            f"1/{round(1 / r['probe_fraction'])}: recall {r['recall']}, {r['ms_per_search']} ms, error p99 {r['error_p99']}"
            for r in row["results"]))
    for share in (1, 4, 8):
        index, _, _ = build(base, len(vectors) // share)
        result = _measure(index, vectors, probes, owner, exact, threshold, base, [base.probe_fraction])[0]
        emit({"figure": "index_growth", "codes": base.codes, "trained_for": len(vectors) // share,
              "templates": len(vectors), "nlist": index.nlist, **result})
        stderr(f"{base.codes} trained for 1/{share} of the register: nlist {index.nlist}, recall {result['recall']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
