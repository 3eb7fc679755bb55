"""Scoring the trials of ``netid bench challenge``: each recording against its challenges,
with the engine's own checker, in a pool of worker processes; the genuine check's CPU time
measured on its own.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections import defaultdict
from typing import Any

from engine.bench.challenge_trials import _SR, KIND_OF_SET, Result, Task, load_audio
from engine.challenge import ChallengeChecker, ChallengeConfig, Pass
from engine.errors import SampleError

__all__ = ["score_task", "run_tasks"]


_checker: ChallengeChecker | None = None


def _init_worker(config: ChallengeConfig) -> None:
    global _checker
    _checker = ChallengeChecker(config=config, threshold=0.0)
    for kind in KIND_OF_SET.values():  # loaded before the first recording, so not in its CPU time
        _checker.load_decoder(kind)


def score_task(task: Task) -> Result:
    """Score one task in this process (the genuine challenge first, timed on its own)."""
    assert _checker is not None
    wav = load_audio(task.audio)
    res = Result(task, audio_s=wav.size / _SR)
    cpu: dict[str, float] = defaultdict(float)

    def timed(passes: list[Pass]) -> list[Any]:
        out = []
        for p in passes:
            t = time.process_time()
            out += _checker.run_passes([p])
            cpu[p.kind] += time.process_time() - t
        return out

    # a phrase's cohort passes run once, on its first check (the reader keeps them): timed
    # apart, so that the genuine check's time is what every later check of it costs
    t0 = time.process_time()
    if _checker.prepare(task.expected[0]):
        res.prepare_cpu_s = time.process_time() - t0
    t0 = time.process_time()
    first = _checker.parts_batch([(wav, task.expected[0])], run_passes=timed)
    res.genuine_cpu_s = time.process_time() - t0
    res.pass_cpu_s = dict(cpu)
    rest = _checker.parts_batch([(wav, e) for e in task.expected[1:]]) if len(task.expected) > 1 else []
    for r in first + rest:
        if isinstance(r, SampleError):
            res.parts.append(None)
            res.errors.append(r.code)
        else:
            res.parts.append(r)
            res.errors.append("")
    return res


def run_tasks(tasks: list[Task], config: ChallengeConfig, workers: int, progress: bool) -> list[Result]:
    results: list[Result] = []
    t0 = time.perf_counter()

    def tick(i: int) -> None:
        if progress and (i % 20 == 0 or i == len(tasks)):
            print(f"  scored {i}/{len(tasks)} recordings in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    if workers <= 1:
        _init_worker(config)
        for i, t in enumerate(tasks, 1):
            results.append(score_task(t))
            tick(i)
        return results
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
        for i, r in enumerate(pool.imap(score_task, tasks, chunksize=2), 1):
            results.append(r)
            tick(i)
    return results
