"""``netid bench limit``: the model-bound ceiling of verifications per second, no server.

Each verification does exactly the extraction work the engine does for ``verify``, through
the same extractor seam (:func:`engine.inference.extractors.onnx_extractors`): decode, detect, align and
embed the face (YuNet + SFace); decode, resample, check for speech, filterbank and embed the voice
(CAM++); and, unless ``--no-challenge``, the spoken-challenge recogniser. No protocol, no
crypto, no store, no event loop: what is left is the work only the models can do, so
the engine's throughput divided by this figure is the share lost to everything else.

Layouts searched:

* ``threads``: pipelines running side by side in one process (like the engine), each taking
  ``batch`` verifications at a time through face, voice and challenge (each thread has its
  own extractors);
* ``intra``: onnxruntime intra-op threads per model session;
* ``batch``: verifications per model call;
* ``processes``: with the challenge recogniser, also N single-threaded processes side by
  side (``--processes``, default 2): the recogniser holds the interpreter lock while it
  decodes, so in one process it runs on one core at a time; an engine that scores
  challenges in worker processes can approach this layout.

``--stages`` measures each stage alone at several batch sizes (CPU ms per item): the
figures behind ``benchmarks/TUNING.md``.

The payloads are of the kinds of ``--mix`` in its proportions, by default the load
benchmark's mix (genuine holders, another face, another speaker, the wrong digits): a kind
changes the recogniser's work, so the limit does the same work as the load's arrivals.

Output: one JSON line per configuration measured, a summary JSON line with ``limit_rps``
and its configuration, and a short human summary on stderr. After a search, the layout
that measured best is measured once more and that second figure is the limit: the
maximum of several noisy measurements is biased upwards.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._common import DEFAULT_MIX, Verification, data_root, emit, make_verifications, parse_mix, stderr

__all__ = ["Layout", "LimitResult", "measure_layout", "search", "main"]


@dataclass(frozen=True)
class Layout:
    batch: int = 4
    threads: int = 2  # pipelines side by side in each process
    intra: int = 1
    processes: int = 1

    def label(self) -> str:
        procs = f" processes={self.processes}" if self.processes > 1 else ""
        return f"batch={self.batch} threads={self.threads} intra={self.intra}{procs}"


@dataclass(frozen=True)
class LimitResult:
    layout: Layout
    rps: float
    verifications: int
    seconds: float
    cpu_share: float  # of the whole machine, while measuring
    cpu_ms_per_verification: float
    stage_cpu_ms: dict[str, float]  # per verification, by stage (CPU time of the calling thread)

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self.layout),
            "rps": round(self.rps, 3),
            "verifications": self.verifications,
            "seconds": round(self.seconds, 2),
            "cpu_share": round(self.cpu_share, 3),
            "cpu_ms_per_verification": round(self.cpu_ms_per_verification, 1),
            "stage_cpu_ms": {k: round(v, 1) for k, v in self.stage_cpu_ms.items()},
        }


STAGES = ("face", "decode", "voice", "challenge")


def _extractors(intra: int, challenge: bool, models_dir: Path | None):
    import dataclasses

    from engine.errors import ModelMissing
    from engine.inference.extractors import onnx_extractors
    from engine.inference.models import DEFAULT_MODELS_DIR

    try:
        x = onnx_extractors(models_dir or DEFAULT_MODELS_DIR, intra_op_threads=intra, check_challenge=challenge)
    except ModelMissing:
        if not challenge:
            raise
        # No calibrated challenge threshold yet (an engine would refuse to start): measure
        # the recogniser with a placeholder one, both passes for every recording (no screen).
        from engine.challenge import ChallengeChecker

        x = onnx_extractors(models_dir or DEFAULT_MODELS_DIR, intra_op_threads=intra, check_challenge=False)
        x = dataclasses.replace(x, challenge_batch=ChallengeChecker(threshold=0.0).check_batch)
    x.warmup()
    return x


def _one_batch(x, items: list[Verification], challenge: bool, cpu: dict[str, float]) -> None:
    """The engine's verify extraction for a batch of verifications, stage by stage."""
    t = time.thread_time()
    faces = x.face_batch([v.face for v in items])
    t1 = time.thread_time()
    pcms = [x.decode_audio(v.voice, "auto") for v in items]
    t2 = time.thread_time()
    voices = x.voice_batch(pcms)
    t3 = time.thread_time()
    if challenge:
        scores = x.challenge_batch([(p, v.challenge) for p, v in zip(pcms, items, strict=True)])
    else:
        scores = [1.0] * len(items)
    t4 = time.thread_time()
    for out in (faces, voices, scores):
        bad = [o for o in out if isinstance(o, Exception)]
        if bad:
            raise SystemExit(f"a benchmark sample failed extraction: {bad[0]!r}")
    cpu["face"] += t1 - t
    cpu["decode"] += t2 - t1
    cpu["voice"] += t3 - t2
    cpu["challenge"] += t4 - t3


def measure_layout(
    verifs: list[Verification], layout: Layout, *, seconds: float, challenge: bool = True, models_dir: Path | None = None
) -> LimitResult:
    """Run ``layout`` for about ``seconds`` (after one warm-up batch per thread)."""
    if layout.processes > 1:
        return _measure_processes(verifs, layout, seconds=seconds, challenge=challenge)
    n, elapsed, cpu, stage_cpu = _run_threads(verifs, layout, seconds=seconds, challenge=challenge, models_dir=models_dir)
    return _result(layout, n, elapsed, cpu, stage_cpu)


def _process_tree_cpu() -> float:
    """CPU seconds of this process and its worker processes (the challenge recogniser runs in a pool)."""
    from ._common import proc_cpu_seconds

    total = proc_cpu_seconds(os.getpid())
    return total if total is not None else time.process_time()


def _result(layout: Layout, n: int, elapsed: float, cpu: float, stage_cpu: dict[str, float]) -> LimitResult:
    # per stage: CPU time of the calling threads (onnxruntime's own pool threads, intra > 1,
    # and the recogniser's worker processes are only in the process-tree total)
    stage = {s: 1000.0 * stage_cpu[s] / max(n, 1) for s in STAGES}
    return LimitResult(layout, n / elapsed, n, elapsed, cpu / (elapsed * (os.cpu_count() or 1)), 1000.0 * cpu / max(n, 1), stage)


def _run_threads(
    verifs: list[Verification], layout: Layout, *, seconds: float, challenge: bool, models_dir: Path | None = None, barrier: Any = None
) -> tuple[int, float, float, dict[str, float]]:
    """(verifications, seconds, CPU seconds of the process, CPU seconds by stage) of ``layout.threads`` pipelines."""
    # the recogniser's worker pools are closed whatever happens: a pool left open in a
    # process that exits waits for its workers while they wait for it
    with contextlib.ExitStack() as pools:
        xs = []
        for _ in range(layout.threads):
            xs.append(_extractors(layout.intra, challenge, models_dir))
            pools.callback(xs[-1].close)
        return _run_pipelines(xs, verifs, layout, seconds=seconds, challenge=challenge, barrier=barrier)


def _run_pipelines(xs: list[Any], verifs: list[Verification], layout: Layout, *, seconds: float, challenge: bool, barrier: Any) -> tuple[int, float, float, dict[str, float]]:
    counts = [0] * layout.threads
    cpus = [dict.fromkeys(STAGES, 0.0) for _ in range(layout.threads)]
    deadline = [0.0, 0.0]  # start, end: set by the barrier as every thread is ready

    cpu0 = [0.0]

    def go() -> None:
        deadline[0] = time.perf_counter()
        deadline[1] = deadline[0] + seconds
        cpu0[0] = _process_tree_cpu()

    ready = threading.Barrier(layout.threads + 1, action=go)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            x = xs[k]
            shift = k * 7 % len(verifs)
            cycle = itertools.cycle(list(range(shift, len(verifs))) + list(range(shift)))
            nxt = lambda: [verifs[next(cycle)] for _ in range(layout.batch)]  # noqa: E731
            _one_batch(x, nxt(), challenge, dict.fromkeys(STAGES, 0.0))  # warm-up, not counted
            ready.wait()
            while time.perf_counter() < deadline[1]:
                _one_batch(x, nxt(), challenge, cpus[k])
                counts[k] += layout.batch
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(layout.threads)]
    for th in threads:
        th.start()
    try:
        if barrier is not None:  # several processes start together
            barrier.wait()
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    start = deadline[0]
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    cpu = _process_tree_cpu() - cpu0[0]  # while the recogniser's worker processes live
    if errors:
        raise errors[0]
    return sum(counts), elapsed, cpu, {st: sum(c[st] for c in cpus) for st in STAGES}


# ---- separate processes (what the interpreter lock costs) ---------------------------------------
def _proc_worker(verifs: list[Verification], layout: Layout, seconds: float, challenge: bool, barrier: Any, out: Any) -> None:
    out.put(_run_threads(verifs, layout, seconds=seconds, challenge=challenge, barrier=barrier))


def _measure_processes(verifs: list[Verification], layout: Layout, *, seconds: float, challenge: bool) -> LimitResult:
    """``layout.processes`` processes, each running ``layout.threads`` pipelines, started together."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(layout.processes)
    out = ctx.Queue()
    procs = [ctx.Process(target=_proc_worker, args=(verifs, layout, seconds, challenge, barrier, out)) for _ in range(layout.processes)]
    for p in procs:
        p.start()
    parts: list[Any] = []
    deadline = time.monotonic() + seconds + 600
    while len(parts) < len(procs):
        try:
            parts.append(out.get(timeout=1.0))
        except queue.Empty:
            # a worker that died (killed, out of memory) never reports: fail now, not at the deadline
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"limit worker processes failed (exit codes {dead})" if dead else "limit workers timed out") from None
    for p in procs:
        p.join()
    count = sum(p[0] for p in parts)
    elapsed = max(p[1] for p in parts)
    return _result(layout, count, elapsed, sum(p[2] for p in parts), {st: sum(p[3][st] for p in parts) for st in STAGES})


# ---- per-stage figures (tuning) -----------------------------------------------------------------
def measure_stages(verifs: list[Verification], *, batches: list[int], intras: list[int], seconds: float, challenge: bool) -> list[dict[str, Any]]:
    """CPU and wall ms per item of each stage alone, by batch size and intra-op threads (one thread)."""
    rows: list[dict[str, Any]] = []
    for intra in intras:
        x = _extractors(intra, challenge, None)
        try:
            rows += _stage_rows(x, verifs, batches=batches, intra=intra, seconds=seconds, challenge=challenge)
        finally:
            x.close()
    return rows


def _stage_rows(x: Any, verifs: list[Verification], *, batches: list[int], intra: int, seconds: float, challenge: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    pcms = [x.decode_audio(v.voice, "auto") for v in verifs]
    stages: dict[str, Any] = {
        "face": lambda items: x.face_batch([v.face for v, _ in items]),
        "voice": lambda items: x.voice_batch([p for _, p in items]),
    }
    if challenge:
        stages["challenge"] = lambda items: x.challenge_batch([(p, v.challenge) for v, p in items])
    pairs = list(zip(verifs, pcms, strict=True))
    for name, fn in stages.items():
        for b in batches:
            fn(pairs[:b])
            n, i = 0, 0
            w0, c0 = time.perf_counter(), _process_tree_cpu()  # the recogniser runs in worker processes
            while time.perf_counter() - w0 < seconds or n == 0:
                fn([pairs[(i + j) % len(pairs)] for j in range(b)])
                i += b
                n += b
            wall, cpu = time.perf_counter() - w0, _process_tree_cpu() - c0
            row = {"stage": name, "intra": intra, "batch": b, "items": n, "wall_ms_per_item": round(1000 * wall / n, 2), "cpu_ms_per_item": round(1000 * cpu / n, 2)}
            emit({"limit_stage": row})
            rows.append(row)
    return rows


# ---- search ------------------------------------------------------------------------------------
def search(
    verifs: list[Verification], layouts: list[Layout], *, seconds: float, challenge: bool, models_dir: Path | None = None
) -> list[LimitResult]:
    results = []
    for layout in layouts:
        r = measure_layout(verifs, layout, seconds=seconds, challenge=challenge, models_dir=models_dir)
        emit({"limit_config": r.as_json()})
        stderr(f"  limit {layout.label():<28} {r.rps:6.2f} verifications/s  ({r.cpu_ms_per_verification:.0f} CPU ms each, {100 * r.cpu_share:.0f} % of the machine)")
        results.append(r)
    return results


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netid bench limit", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="data root (default ../shared/data, else samples/)")
    p.add_argument("--quick", action="store_true", help="measure two or three layouts only")
    p.add_argument("--seconds", type=float, default=None, help="seconds per layout (default 10, quick 6)")
    p.add_argument("--batches", default="1,2,4,8", help="batch sizes searched")
    p.add_argument("--threads", default="1,2,3", help="pipelines side by side searched")
    p.add_argument("--intra", default="1,2", help="onnxruntime intra-op threads searched")
    p.add_argument("--layout", action="append", default=[], metavar="B,T,I[,P]", help="measure exactly these layouts (batch,threads,intra[,processes])")
    p.add_argument("--processes", type=int, default=None,
                   help="also search layouts of N single-threaded processes (default 2 with the challenge recogniser, else none)")
    p.add_argument("--stages", action="store_true", help="per-stage CPU cost by batch size instead of the layout search")
    p.add_argument("--no-challenge", action="store_true", help="leave the spoken-challenge recogniser out (engines run with --no-challenge-check)")
    p.add_argument("--samples", type=int, default=48, help="distinct verification payloads")
    p.add_argument("--mix", default=DEFAULT_MIX, help="kinds of payload and their weights, as netid bench load's --mix (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    challenge = not args.no_challenge
    if challenge:
        try:
            import engine.challenge  # noqa: F401
        except ImportError:
            stderr("engine.challenge is not available: measuring without the challenge recogniser")
            challenge = False
    root = data_root(args.data)
    mix = parse_mix(args.mix)
    verifs = make_verifications(root, args.samples, mix=mix)
    seconds = args.seconds or (6.0 if args.quick else 10.0)
    t0 = time.perf_counter()
    if args.stages:
        rows = measure_stages(verifs, batches=_ints(args.batches) if args.batches != "1,2,4,8" else [1, 2, 4, 8, 16],
                              intras=_ints(args.intra), seconds=seconds / 2, challenge=challenge)
        emit({"limit_stages": rows, "challenge": challenge})
        return 0
    stderr(f"netid bench limit: {len(verifs)} verification payloads from {root}; challenge recogniser {'on' if challenge else 'off'}")
    # The recogniser holds the interpreter lock, so with it processes may beat threads.
    procs = args.processes if args.processes is not None else (2 if challenge else 0)
    run = lambda layouts: search(verifs, layouts, seconds=seconds, challenge=challenge)  # noqa: E731
    if args.layout:
        results = run([Layout(*_ints(s)) for s in args.layout])
    elif args.quick:
        quick = [Layout(2, 2, 1)] if challenge else [Layout(4, 2, 1), Layout(1, 2, 1), Layout(4, 1, 2)]
        results = run(quick + ([Layout(2, 1, 1, procs)] if procs > 1 else []))
    else:
        # Stage 1: pipelines, intra-op threads (and processes), at a middle batch size;
        # stage 2: the batch size, at the best of stage 1.
        first = [Layout(4, t, i) for t in _ints(args.threads) for i in _ints(args.intra) if t * i <= 4]
        if procs > 1:
            first.append(Layout(4, 1, 1, procs))
        results = run(first)
        best = max(results, key=lambda r: r.rps).layout
        results += run([Layout(b, best.threads, best.intra, best.processes) for b in _ints(args.batches) if b != best.batch])
    best = max(results, key=lambda r: r.rps)
    searched = None
    if len(results) > 1:
        # The best of several noisy measurements runs high (each is a few per cent off):
        # the layout chosen is measured once more, and that measurement is the limit.
        searched, best = best, run([best.layout])[0]
    summary: dict[str, Any] = {
        "limit_rps": round(best.rps, 3),
        "best": best.as_json(),
        "search_best_rps": round(searched.rps, 3) if searched else None,
        "mix": mix,
        "challenge": challenge,
        "search": [r.as_json() for r in results],
        "search_seconds": round(time.perf_counter() - t0, 1),
        "cores": os.cpu_count(),
    }
    emit(summary)
    stage = ", ".join(f"{k} {v:.0f}" for k, v in best.stage_cpu_ms.items())
    # the recogniser's worker processes (and onnxruntime's pool threads) only show in the total
    stage += f"; in worker processes and pools {best.cpu_ms_per_verification - sum(best.stage_cpu_ms.values()):.0f}"
    stderr(f"LIMIT {best.rps:.2f} verifications/s at {best.layout.label()} ({best.cpu_ms_per_verification:.0f} CPU ms per verification: {stage})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
