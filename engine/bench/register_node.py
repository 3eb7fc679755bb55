"""One node of the register benchmark, in a process of its own (``engine.bench.register``).

Opens the store, loads the duplicate search's face index from the data directory (brought up
to date from the change log) and reports the time that took and the process's RSS; then the
1:N searches of the probes (latency, CPU, recall of the planted duplicates at the duplicate
threshold, false duplicates) and the 1:1 matches against the large register and against one of
``--small`` credentials, in alternating rounds (latency and CPU of each). One JSON line per
figure group on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


def rss_mb() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0].lower()] = round(int(line.split()[1]) / 1024, 1)
    return {"rss_mb": out.get("vmrss", 0.0), "peak_rss_mb": out.get("vmhwm", 0.0)}


def pcts(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    v = np.sort(np.asarray(values)) * scale
    return {"p50": round(float(np.percentile(v, 50)), 3), "p99": round(float(np.percentile(v, 99)), 3),
            "mean": round(float(v.mean()), 3), "max": round(float(v.max()), 3)}


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench.register_node")
    p.add_argument("--store", required=True)
    p.add_argument("--small-store", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--probes", type=Path, required=True)
    p.add_argument("--config", required=True, help="IndexConfig fields, JSON")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--sweep", default="", help="probe fractions to search the planted duplicates at, e.g. 0.0625,0.125")
    args = p.parse_args(argv)

    started = time.perf_counter()
    import faiss

    from engine.config import IndexConfig
    from engine.crypto import TemplateCipher
    from engine.inference.speaker import SpeakerEmbedding
    from engine.matching import FaissDuplicateSearch, StoreMatcher, TemplateSealer
    from engine.matching.calibration import ScoreModel
    from engine.inference.models import DEFAULT_MODELS_DIR
    from engine.store import open_store

    faiss.omp_set_num_threads(1)  # as the engine sets it (intra_op_threads)
    z = np.load(args.probes, allow_pickle=False)
    threshold = float(z["threshold"])
    sealer = TemplateSealer(TemplateCipher.load_or_create(args.data / "template.key"))
    scores = ScoreModel.load(DEFAULT_MODELS_DIR)
    store = open_store(args.store)
    search = FaissDuplicateSearch(store, sealer, dim=int(z["probes"].shape[1]), threshold=threshold,
                                  config=IndexConfig(**json.loads(args.config)), directory=args.data / "index")
    imported = time.perf_counter()
    held = search.load()
    loaded = time.perf_counter()
    emit({"figure": "startup", "templates": held, "import_s": round(imported - started, 3),
          "index_load_s": round(loaded - imported, 3), "to_loaded_index_s": round(loaded - started, 3),
          **{k: v for k, v in search.status().items() if k in ("kind", "nlist", "nprobe", "codes", "trained_on")},
          "index_bytes": search.index.nbytes(), **rss_mb()})

    # 1:N: planted duplicates and fresh faces, interleaved
    probes, planted_ids, exact = z["probes"], [str(s) for s in z["planted_ids"]], z["planted_exact"]
    n_planted = len(planted_ids)
    order = np.random.default_rng(int(z["seed"])).permutation(len(probes))
    lat, cpu = [0.0] * len(probes), [0.0] * len(probes)
    found: list[set[str]] = [set()] * len(probes)
    reranked = search.reranked
    for i in order:
        t, c = time.perf_counter(), time.thread_time()
        found[i] = search.search(probes[i:i + 1])
        cpu[i], lat[i] = time.thread_time() - c, time.perf_counter() - t
    due = [i for i in range(n_planted) if exact[i] >= threshold]
    hits = sum(planted_ids[i] in found[i] for i in due)
    false_planted = sum(len(found[i] - {planted_ids[i]}) for i in range(n_planted))
    false_fresh = [len(found[i]) for i in range(n_planted, len(probes))]
    emit({"figure": "search", "searches": len(probes), "latency_ms": pcts(lat), "cpu_ms": pcts(cpu),
          "planted": n_planted, "planted_at_threshold": len(due), "found": hits,
          "recall": round(hits / len(due), 5) if due else None,
          "false_duplicates_per_search": round((false_planted + sum(false_fresh)) / len(probes), 4),
          "fresh_searches_with_a_false_duplicate": sum(1 for f in false_fresh if f),
          "fresh_searches": len(false_fresh),
          "reranked_per_search": round((search.reranked - reranked) / len(probes), 2), **rss_mb()})

    # the same planted searches at other probe fractions (an IVF index only): what recall costs
    if search.index.kind == "ivf" and args.sweep:
        sweep = []
        for fraction in (float(f) for f in args.sweep.split(",")):
            nprobe = search.index.probe(fraction)
            times, hits = [], 0
            for i in due:
                t = time.perf_counter()
                hits += planted_ids[i] in search.search(probes[i:i + 1])
                times.append(time.perf_counter() - t)
            sweep.append({"probe_fraction": fraction, "nprobe": nprobe, "recall": round(hits / len(due), 5),
                          "latency_ms": pcts(times)})
        search.index.probe(search.config.probe_fraction)
        emit({"figure": "probe_sweep", "planted_at_threshold": len(due), "nlist": search.index.nlist, "sweep": sweep})

    # 1:1: the same number of matches against each register, in alternating rounds
    small = open_store(args.small_store)
    matchers = {
        "large": (StoreMatcher(store, sealer, scores, face_dim=probes.shape[1], voice_dim=z["voice"].shape[1]), z["large_ids"]),
        "small": (StoreMatcher(small, sealer, scores, face_dim=probes.shape[1], voice_dim=z["voice"].shape[1]), z["small_ids"]),
    }
    voice = SpeakerEmbedding(z["voice"][0], "wide")
    timing: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in matchers}
    for r in range(args.rounds + 1):
        for name, (matcher, ids) in matchers.items():
            for j, cid in enumerate(ids):
                t, c = time.perf_counter(), time.thread_time()
                matcher.match(str(cid), z[f"{name}_faces"][j], voice)
                if r:  # the first round warms the caches
                    timing[name][0].append(time.perf_counter() - t)
                    timing[name][1].append(time.thread_time() - c)
    out = {k: {"matches": len(v[0]), "latency_ms": pcts(v[0]), "cpu_ms": pcts(v[1])} for k, v in timing.items()}
    emit({"figure": "one_to_one", **out,
          "cpu_ratio_p50": round(out["large"]["cpu_ms"]["p50"] / out["small"]["cpu_ms"]["p50"], 4),
          "cpu_ratio_mean": round(out["large"]["cpu_ms"]["mean"] / out["small"]["cpu_ms"]["mean"], 4), **rss_mb()})
    store.close()
    small.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
