"""``netid bench index --scale``: the register drawn in chunks, trained and filled as the engine
does, each probe face searched alone. Real faces are stood in for by clustered random unit
vectors (the LFW embedding cache is not needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import engine.bench.synthetic as synthetic
from engine.bench import index as bench_index
from engine.bench.synthetic import RealFaces
from engine.config import IndexConfig
from engine.matching.face_index import FaceIndex


def _faces(persons: int = 300, per: int = 4, dim: int = 128, seed: int = 7) -> RealFaces:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((persons, dim))
    x = np.repeat(centres, per, axis=0) + 0.35 * rng.standard_normal((persons * per, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return RealFaces(x.astype(np.float32), np.repeat(np.arange(persons), per), [f"P{i:03d}" for i in range(persons)])


@pytest.fixture
def fake_faces(monkeypatch):
    real = _faces()
    monkeypatch.setattr(synthetic, "load_real_faces", lambda *a, **k: real)
    return real


def test_scale_draws_in_chunks_and_searches_one_probe_at_a_time(fake_faces, monkeypatch, capsys):
    added: list[int] = []
    add = FaceIndex.add
    monkeypatch.setattr(FaceIndex, "add", lambda self, ids, vectors: added.append(len(ids)) or add(self, ids, vectors))
    assert bench_index.main(["--scale", "--credentials", "3000", "--chunk", "1000", "--planted", "60", "--fresh", "40",
                             "--fractions", "0.25,1", "--candidates", "32,64", "--threads", "1,2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    build, codes, searches = rows[0], rows[1], rows[2:]
    assert added == [2000, 2000, 2000]  # never more than a chunk at a time
    assert build["figure"] == "index_scale_build" and build["templates"] == 6000 and build["codes"] == "PQ64x4fs"
    assert build["trained_on"] == FaceIndex.training_size(6000, IndexConfig(train_min=1))
    assert build["nlist"] == min(build["nlist_default"], build["trained_on"] // 39)
    assert 30 < build["bytes_per_template"] < 200 and build["index_bytes"] > 6000 * 32
    assert build["planted"] == 60 and build["planted_at_threshold"] > 40
    assert codes["figure"] == "index_scale_codes" and codes["planted_at_threshold"] == build["planted_at_threshold"]
    assert 0 <= codes["code_error_p50"] <= codes["code_error_p99"] < 0.5
    assert [(r["probe_fraction"], r["threads"], r["candidates"]) for r in searches] == [
        (f, t, k) for f in (0.25, 1.0) for t in (1, 2) for k in (32, 64)]
    for r in searches:
        assert r["searches"] == 100 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert 0 <= r["within_margin_mean"] <= r["candidates"]
        assert [n["rerank_margin"] for n in r["narrower"]] == [0.05, 0.025]
        assert r["within_margin_mean"] >= r["narrower"][0]["within_margin_mean"] >= r["narrower"][1]["within_margin_mean"]
        assert r["recall"] >= r["narrower"][0]["recall"] >= r["narrower"][1]["recall"]
        assert sum(r["misses"].values()) == r["planted_at_threshold"] - r["found"]
    everything = [r for r in searches if r["probe_fraction"] == 1.0]
    assert all(r["recall"] == 1.0 for r in everything)  # every list probed: only the codes can lose one
    one, two = (next(r for r in everything if r["threads"] == t and r["candidates"] == 64) for t in (1, 2))
    assert one["found"] == two["found"] and one["within_margin_mean"] == pytest.approx(two["within_margin_mean"], abs=0.5)


def test_scale_is_reproducible_and_honours_nlist(fake_faces, capsys):
    args = ["--scale", "--credentials", "1500", "--chunk", "700", "--planted", "30", "--fresh", "20",
            "--fractions", "0.5", "--candidates", "32", "--threads", "1", "--nlist", "16"]
    runs = []
    for _ in range(2):
        bench_index.main(args)
        runs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert runs[0][0]["nlist"] == 16 and runs[0][2]["nprobe"] == 8
    keep = ("index_bytes", "planted_at_threshold", "recall", "within_margin_mean", "fresh_over_threshold_mean", "misses", "code_error_p99")
    assert [{k: r[k] for k in keep if k in r} for r in runs[0]] == [{k: r[k] for k in keep if k in r} for r in runs[1]]


def test_a_miss_is_given_its_cause():
    import faiss

    x = _faces(persons=200, per=5).vectors
    index = FaceIndex.trained(x, expected=len(x), config=IndexConfig(train_min=1, nlist=16, min_probe=1))
    index.add(np.arange(len(x)), x)
    index.probe(1 / 16)  # one list: the probe's own
    _, home = faiss.extract_index_ivf(index.index).quantizer.search(x, 1)
    elsewhere = next(i for i in range(len(x)) if home[i, 0] != home[0, 0])
    probes, home = x[:2], home[[elsewhere, 1], 0]
    decoded, missed = np.array([0.9, 0.9]), np.array([True, True])
    scores, ids = np.full((2, 4), 0.95, np.float32), np.ones((2, 4), np.int64)
    assert bench_index._misses(index, probes, home, decoded, missed, scores, ids, 0.5, 4) == {
        "list": 1, "code": 0, "crowded": 1, "scan": 0}
    assert bench_index._misses(index, probes, home, decoded, np.array([False, True]), scores, ids, 0.95, 4)["code"] == 1
    ids[1, 2:] = -1  # fewer than asked for came back: not crowded out
    assert bench_index._misses(index, probes, home, decoded, np.array([False, True]), scores, ids, 0.5, 4)["scan"] == 1
