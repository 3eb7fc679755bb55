"""``netid bench register``: a national register of N credentials, and what a node does with it.

1. Synthetic faces (``engine.bench.synthetic``) checked against the real LFW set: genuine and
   impostor score distributions (KS statistic, quantiles, rate above the thresholds).
2. Bulk load of N credentials into a fresh store (SQLite: a file in the work directory;
   PostgreSQL: the schema ``bench_register`` of the URL's database, dropped first) through
   ``engine.store.bulk`` (executemany / COPY): each credential ``--faces`` synthetic face
   templates and ``--voices`` voice templates (random vectors: only 1:1 reads them), sealed
   as the engine seals them; ``--planted`` real persons enrolled among them. A register of
   ``--small`` credentials is loaded beside it for the 1:1 comparison.
3. The face index built as ``netid index rebuild`` builds it (time, kind, size).
4. A node in a process of its own (``engine.bench.register_node``): start-up to a loaded
   index, RSS, 1:N search latency and CPU, recall of the planted duplicates at the duplicate
   threshold, false duplicates, and 1:1 latency and CPU against both registers.
5. ``netid serve`` on the register (``--engine``): seconds to its ``ready`` line (the real
   models loaded, the face index read and brought up to date) and its RSS with its workers.
6. Disk: the store's size (and the index file's) per credential.

One JSON line per figure group on stdout, a summary on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engine.bench._common import REPO, data_root, emit, stderr

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netid bench register", description=__doc__.split("\n\n")[0])
    p.add_argument("--credentials", type=int, default=100_000)
    p.add_argument("--store", default="sqlite", help="sqlite (a file in --workdir) or postgresql://... (schema bench_register)")
    p.add_argument("--workdir", type=Path, default=None, help="default: /tmp/netid-register-N")
    p.add_argument("--faces", type=int, default=2, help="face templates per credential")
    p.add_argument("--voices", type=int, default=4, help="voice templates per credential")
    p.add_argument("--planted", type=int, default=1000, help="real persons enrolled among the synthetic ones")
    p.add_argument("--fresh", type=int, default=1000, help="searches of faces not in the register")
    p.add_argument("--small", type=int, default=100, help="credentials of the register 1:1 is compared against")
    p.add_argument("--matches", type=int, default=100, help="credentials matched 1:1 per register per round (at most --small)")
    p.add_argument("--batch", type=int, default=5000, help="credentials per bulk transaction")
    p.add_argument("--data", type=Path, default=None, help="data root with lfw/ (default ../shared/data)")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--check-pairs", type=int, default=200_000, help="score pairs in the synthetic-versus-real check")
    p.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                   help="also start netid serve on the register: time to ready, RSS with its workers")
    p.add_argument("--keep", action="store_true", help="keep the store and the index afterwards")
    p.add_argument("--sweep", default="0.03125,0.0625,0.125,0.25", help="probe fractions the planted duplicates are also searched at")
    p.add_argument("--index", default="{}", help='IndexConfig fields as JSON, e.g. {"probe_fraction": 0.05}')
    return p


def _store_url(given: str, workdir: Path, name: str) -> str:
    if given == "sqlite":
        path = workdir / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{path}"
    sep = "&" if "?" in given else "?"
    url = f"{given}{sep}schema={name}"
    _drop_schema(url)
    return url


def _drop_schema(url: str) -> None:
    import psycopg

    from engine.store.postgres_db import parse_url

    conninfo, schema = parse_url(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _analyze(url: str) -> None:
    if url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            conn.execute("ANALYZE")
        return
    import psycopg

    from engine.store.postgres_db import parse_url

    conninfo, schema = parse_url(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for table in ("cards", "credentials", "templates", "template_log"):
            # VACUUM too: PostgreSQL vacuums a table after a million inserts on its own, and
            # that would run during the searches
            conn.execute(f'VACUUM (ANALYZE) "{schema}".{table}')


def _disk_bytes(url: str) -> int:
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        return sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}"))
    import psycopg

    from engine.store.postgres_db import parse_url

    conninfo, schema = parse_url(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return int(conn.execute(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
            (schema,)).fetchone()[0])


def _engine_startup(url: str, data: Path, workdir: Path) -> dict:
    """``netid serve`` on the register: seconds from the command to its ``ready`` line (models
    loaded, face index read and brought up to date), and its RSS with its worker processes."""
    from engine.bench._engine import EngineProcess
    from engine.bench.fuzz import rss_kib

    started = time.perf_counter()
    eng = EngineProcess(data, serve_args=["--store", url], log_path=workdir / "engine.log").start()
    ready = time.perf_counter() - started
    time.sleep(2.0)  # let the worker processes settle
    out = {"ready_s": round(ready, 2), "rss_mb": round(rss_kib(eng.pid) / 1024, 1),
           "rss_with_workers_mb": round(rss_kib(eng.pid, tree=True) / 1024, 1)}
    eng.stop()
    return out


def _load(url, n, *, synth, sealer, faces, voices, batch, planted_faces, rng, label):
    """Bulk-loads ``n`` credentials; the planted ones at random places. Returns the credential
    ids of the planted ones, a sample (ids, first face) for 1:1, and the timings."""
    from engine.store import open_store
    from engine.store.bulk import BulkCredential, bulk_enroll
    from engine.inference.speaker import SpeakerEmbedding

    store = open_store(url)
    where = dict(zip(rng.choice(n, len(planted_faces), replace=False).tolist(), range(len(planted_faces))))
    planted_ids: list[str] = [""] * len(planted_faces)
    sample_ids, sample_faces = [], []
    prepare = insert = 0.0
    wide = SpeakerEmbedding(np.zeros(1, np.float32), "wide")
    for start in range(0, n, batch):
        t0 = time.perf_counter()
        size = min(batch, n - start)
        face = synth.identities(size, faces)
        voice = rng.standard_normal((size, voices, 192)).astype(np.float32)
        voice /= np.linalg.norm(voice, axis=2, keepdims=True)
        rows = []
        for i in range(size):
            k = start + i
            if k in where:
                face[i, :2] = planted_faces[where[k]][:faces]
            card = f"{label}{k:09d}"
            templates = [("face", sealer.seal_face(f, card)) for f in face[i]]
            templates += [("voice", sealer.seal_voice(wide._replace(vector=v), card)) for v in voice[i]]
            rows.append(BulkCredential(card_number=card, name=card, device_key=k.to_bytes(32, "big"), templates=templates))
        t1 = time.perf_counter()
        ids = bulk_enroll(store, rows, actor="bench", now=time.time())
        t2 = time.perf_counter()
        prepare += t1 - t0
        insert += t2 - t1
        for i, cid in enumerate(ids):
            if start + i in where:
                planted_ids[where[start + i]] = cid
        if len(sample_ids) < 2000:
            take = min(len(ids), 2000 - len(sample_ids))
            sample_ids += ids[:take]
            sample_faces += list(face[:take, 0])
        if start // batch % 20 == 0:
            stderr(f"{label}: {start + size:,}/{n:,} loaded ({(start + size) / (prepare + insert):,.0f}/s)")
    store.close()
    return planted_ids, sample_ids, np.stack(sample_faces), {"prepare_s": prepare, "insert_s": insert}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from engine.bench.synthetic import Synthesizer, compare, load_real_faces, planted
    from engine.config import IndexConfig
    from engine.crypto import TemplateCipher
    from engine.inference.models import DEFAULT_MODELS_DIR
    from engine.matching import DUPLICATE_FMR, FaissDuplicateSearch, TemplateSealer
    from engine.matching.calibration import ScoreModel
    from engine.store import open_store

    n = args.credentials
    workdir = args.workdir or Path(f"/tmp/netid-register-{n}")
    data = workdir / "data"
    shutil.rmtree(data / "index", ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    config = IndexConfig(**json.loads(args.index))
    scores = ScoreModel.load(DEFAULT_MODELS_DIR)
    threshold = scores.threshold("face", DUPLICATE_FMR)
    rng = np.random.default_rng(args.seed)

    real = load_real_faces(data_root(args.data), REPO / "benchmarks" / "out" / "cache")
    synth = Synthesizer(real, args.seed)
    check = compare(real, synth, pairs=args.check_pairs, seed=args.seed, thresholds={
        "fmr_1e-3": scores.threshold("face", 1e-3), "fmr_1e-4": scores.threshold("face", 1e-4), "duplicate_1e-6": threshold})
    emit({"figure": "synthetic", "real_images": len(real.vectors), "real_persons": len(real.names), **check})

    sealer = TemplateSealer(TemplateCipher.load_or_create(data / "template.key"))
    enrolled, probes, _names = planted(real, args.planted, args.seed)
    exact = np.einsum("ij,ikj->ik", probes, enrolled[:, :args.faces]).max(axis=1)
    url = _store_url(args.store, workdir, "bench_register")
    small_url = _store_url(args.store, workdir, "bench_register_small")
    t0 = time.perf_counter()
    planted_ids, large_ids, large_faces, timing = _load(url, n, synth=synth, sealer=sealer, faces=args.faces, voices=args.voices,
                                                        batch=args.batch, planted_faces=enrolled, rng=rng, label="R")
    wall = time.perf_counter() - t0
    _, small_ids, small_faces, _ = _load(small_url, args.small, synth=synth, sealer=sealer, faces=args.faces, voices=args.voices,
                                         batch=args.batch, planted_faces=enrolled[:0], rng=rng, label="S")
    for u in (url, small_url):  # as autovacuum would, in time: the planner's statistics and the visibility map after a bulk load
        _analyze(u)
    templates = n * (args.faces + args.voices)
    emit({"figure": "bulk_load", "store": url.split("://")[0], "credentials": n, "templates": templates,
          "wall_s": round(wall, 2), "insert_s": round(timing["insert_s"], 2), "prepare_s": round(timing["prepare_s"], 2),
          "credentials_per_s": round(n / wall, 1), "insert_credentials_per_s": round(n / timing["insert_s"], 1)})

    store = open_store(url)
    t0 = time.perf_counter()
    built = FaissDuplicateSearch(store, sealer, dim=probes.shape[1], threshold=threshold, config=config,
                                 directory=data / "index").rebuild()
    emit({"figure": "index_build", **built, "wall_s": round(time.perf_counter() - t0, 2)})
    store.close()

    figures: dict[str, dict] = {}
    if args.engine:
        figures["engine"] = _engine_startup(url, data, workdir)
        emit({"figure": "engine_startup", **figures["engine"], "credentials": n})

    fresh = synth.identities(args.fresh, 1)[:, 0]
    voice = rng.standard_normal((1, 192)).astype(np.float32)
    probe_file = workdir / "probes.npz"
    matches = min(args.matches, len(small_ids))  # the same credentials count on both sides
    np.savez(probe_file, probes=np.concatenate([probes, fresh]).astype(np.float32), planted_ids=np.array(planted_ids),
             planted_exact=exact, threshold=np.float32(threshold), seed=np.int64(args.seed),
             large_ids=np.array(large_ids[:matches]), large_faces=large_faces[:matches],
             small_ids=np.array(small_ids[:matches]), small_faces=small_faces[:matches],
             voice=voice / np.linalg.norm(voice))
    node = subprocess.run(
        [sys.executable, "-m", "engine.bench.register_node", "--store", url, "--small-store", small_url, "--data", str(data),
         "--probes", str(probe_file), "--config", json.dumps(dataclasses.asdict(config)), "--sweep", args.sweep],
        capture_output=True, text=True, check=False)
    if node.returncode:
        sys.stderr.write(node.stderr)
        return node.returncode
    for line in node.stdout.splitlines():
        row = json.loads(line)
        figures[row["figure"]] = row
        emit({**row, "credentials": n, "store": url.split("://")[0]})

    disk = _disk_bytes(url)
    index_bytes = sum(f.stat().st_size for f in (data / "index").glob("face-*"))
    emit({"figure": "disk", "credentials": n, "store_bytes": disk, "store_bytes_per_credential": round(disk / n, 1),
          "index_file_bytes": index_bytes, "index_bytes_per_credential": round(index_bytes / n, 2)})
    s, q, o = figures["startup"], figures["search"], figures["one_to_one"]
    engine = f" netid serve ready in {figures['engine']['ready_s']:.1f} s, RSS {figures['engine']['rss_with_workers_mb']:.0f} MB with workers;" \
        if "engine" in figures else ""
    stderr(f"register of {n:,} credentials on {url.split('://')[0]}: loaded at {n / wall:,.0f} credentials/s;"
           f" node ready (index loaded) in {s['to_loaded_index_s']:.2f} s, RSS {s['rss_mb']:.0f} MB"
           f" ({s['kind']}, {s['index_bytes'] / 2**20:.0f} MB index);{engine}"
           f" 1:N p50 {q['latency_ms']['p50']:.2f} ms p99 {q['latency_ms']['p99']:.2f} ms,"
           f" recall {q['recall']} of {q['planted_at_threshold']} planted duplicates at {threshold:.4f},"
           f" {q['false_duplicates_per_search']} false duplicates per search;"
           f" 1:1 match CPU p50 {o['large']['cpu_ms']['p50']:.3f} ms vs {o['small']['cpu_ms']['p50']:.3f} ms at {args.small}"
           f" (x{o['cpu_ratio_p50']}, mean x{o['cpu_ratio_mean']}); disk {disk / n:,.0f} B/credential")
    if not args.keep:
        for u in (url, small_url):
            if u.startswith("postgres"):
                _drop_schema(u)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
