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
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from engine.bench._common import REPO, data_root, emit, stderr

__all__ = ["main"]

CODES = ("SQ8", "PQ32", "PQ32x4fs", "PQ64x4fs")


def _register(args):
    from engine.bench.synthetic import Synthesizer, load_real_faces, planted

    real = load_real_faces(data_root(args.data), REPO / "benchmarks" / "out" / "cache")
    faces = Synthesizer(real, args.seed).identities(args.credentials, 2)
    enrolled, probes, _ = planted(real, args.planted, args.seed)
    where = np.random.default_rng(args.seed).choice(args.credentials, len(probes), replace=False)
    faces[where] = enrolled
    return faces.reshape(-1, faces.shape[2]), probes, where * 2, np.einsum("ij,ikj->ik", probes, enrolled).max(axis=1)


def _measure(index, vectors, probes, owner, exact, threshold, config, fractions):
    import faiss

    ivf = faiss.extract_index_ivf(index.index)
    due = exact >= threshold
    out = []
    for fraction in fractions:
        ivf.nprobe = max(1, round(ivf.nlist * fraction))
        started = time.perf_counter()
        scores, ids = index.search(probes, config.candidates)
        ms = (time.perf_counter() - started) / len(probes) * 1000
        mine = (ids == owner[:, None]) | (ids == owner[:, None] + 1)
        found = (mine & (scores >= threshold - config.rerank_margin)).any(axis=1)
        err = np.abs(scores - np.einsum("ij,ikj->ik", probes, vectors[np.maximum(ids, 0)]))[ids >= 0]
        out.append({"probe_fraction": fraction, "nprobe": int(ivf.nprobe), "recall": round(float(found[due].mean()), 5),
                    "ms_per_search": round(ms, 3), "error_p50": round(float(np.quantile(err, 0.5)), 4),
                    "error_p99": round(float(np.quantile(err, 0.99)), 4)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netid bench index", description=__doc__.split("\n\n")[0])
    p.add_argument("--credentials", type=int, default=100_000)
    p.add_argument("--planted", type=int, default=1000)
    p.add_argument("--codes", default=",".join(CODES))
    p.add_argument("--fractions", default="0.0625,0.125,0.25")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=23)
    args = p.parse_args(argv)
    import faiss

    from engine.config import IndexConfig
    from engine.inference.models import DEFAULT_MODELS_DIR
    from engine.matching import DUPLICATE_FMR
    from engine.matching.calibration import ScoreModel
    from engine.matching.face_index import FaceIndex

    faiss.omp_set_num_threads(1)
    threshold = ScoreModel.load(DEFAULT_MODELS_DIR).threshold("face", DUPLICATE_FMR)
    vectors, probes, owner, exact = _register(args)
    ids = np.arange(len(vectors), dtype=np.int64)
    fractions = [float(f) for f in args.fractions.split(",")]
    base = IndexConfig(train_min=1)

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
