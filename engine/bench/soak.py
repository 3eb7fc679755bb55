"""``netid bench soak``: a long run at 80 % of capacity, with fuzzing and idle clients alongside.

Set-up and load are ``netid bench load``'s (engine/bench/load.py): an engine in a subprocess,
an ID-card registry of chimeric residents, relying parties, every resident enrolled from its
own phone, Poisson arrivals of a relying party opening a session and a holder answering it.
Capacity is found the same way: the model-bound limit (engine/bench/limit.py, quick layout
search; or ``--limit-rps``) and a saturation step at 1.25 x that limit; capacity is the
throughput the saturation step achieved (or ``--capacity-rps``). The saturation step runs
with the fuzzing and idle clients already going (``--capacity-alone``: before them), so that
80 % is of what the engine can do in the soak's own conditions.

Then, for ``--minutes``, arrivals at ``--load`` (0.8) x capacity in windows of ``--window``
minutes (5), while the side load (``engine.bench.side_load``, a process of its own so that it
never delays the loop that times the verifications) runs ``netid bench fuzz``'s generator on
``--fuzz-connections`` connections and ``--idle`` clients that connect, ping once and stay
silent (the engine closes them after its idle timeout; they connect again). Per window, one
JSON line: arrivals, answered, unanswered, errors, p50/p99 (from each arrival's scheduled
time to the holder's reply), the engine's RSS (and with its workers), fuzz frames and idle
reconnections. Then a summary line with the
checks (0 unanswered, p99 <= 1 s in every window, RSS of the last window within 10 % of the
second) and a human summary. A limit measured at the start is measured again at the end
(the side load stopped), with the same layout:
how much the machine's own speed moved over the soak, apart from the engine's CPU per
verification in each window.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from ._common import data_root, emit, load_people, screen_people, stderr
from ._engine import EngineProcess
from .fuzz import rss_kib
from .side_load import read_stats
from .load import (
    DEFAULT_MIX, Generator, Step, _connect_all, _route_pushes, enroll_all, measure_limit, measure_limit_again, prepare_data, run_step,
)

__all__ = ["main"]


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = data_root(args.data)
    people, strangers = load_people(root, args.residents, seed=args.seed)
    people, strangers = await trio.to_thread.run_sync(screen_people, people, strangers)
    args.mix = DEFAULT_MIX
    gen = Generator(args, root, people, strangers)
    data_dir = work / "engine-data"
    prepare_data(gen, data_dir, work, os.urandom(3).hex())
    keys = work / "keys"
    from ._engine import netid

    netid("rp", "add", "--id", "soak-fuzz", "--name", "Fuzz", "--quota", "1000000", "--keys-out", str(keys), "--data", str(data_dir))
    serve_args = [] if args.challenge_check else ["--no-challenge-check"]
    gen.engine = EngineProcess(data_dir, serve_args=serve_args, overrides=args.engine_set, log_path=work / "engine.log").start()
    gen.port, gen.metrics_url = gen.engine.port, gen.engine.metrics_url
    pid = gen.engine.pid
    out: dict[str, Any] = {"windows": []}
    try:
        refused = await enroll_all(gen, random.Random(args.seed))
        stderr(f"  enrolled {len(gen.residents)} residents ({refused or 'none refused'})")
        capacity = args.capacity_rps
        measured = None  # the limit as measured before the soak, to measure it again after
        if capacity is None:
            if args.limit_rps:
                out["limit_rps"] = args.limit_rps
            else:
                measured = await trio.to_thread.run_sync(measure_limit, args, args.challenge_check)
                out["limit_rps"] = measured["limit_rps"]
                out["limit_cpu_ms_per_verification"] = measured["best"]["cpu_ms_per_verification"]
        async with trio.open_nursery() as routers:
            await _connect_all(gen)
            for rp in gen.rps:
                routers.start_soon(_route_pushes, gen, rp)
            if capacity is None and args.capacity_alone:
                capacity = await _saturate(gen, args, out)
            stats_file = work / "side-load.json"
            side = subprocess.Popen([
                sys.executable, "-m", "engine.bench.side_load", "--port", str(gen.port),
                "--seconds", str(args.minutes * 60 + args.find_seconds + 600), "--seed", str(args.seed),
                "--fuzz-connections", str(args.fuzz_connections), "--idle", str(args.idle), "--rp-id", "soak-fuzz",
                "--rp-key", str(keys / "soak-fuzz.sign.key"), "--stats", str(stats_file)])
            log0 = (work / "engine.log").stat().st_size
            try:
                if capacity is None:  # capacity as the soak will find the engine: with the fuzzing and idle clients
                    await trio.sleep(5.0)
                    capacity = await _saturate(gen, args, out)
                out["capacity_rps"] = capacity
                rate = args.load * capacity
                stderr(f"  capacity {capacity:.2f}/s; soaking at {rate:.2f}/s for {args.minutes} min, windows of {args.window} min")
                windows = max(1, round(args.minutes / args.window))
                for w in range(windows):
                    before = read_stats(stats_file)
                    row = await run_step(gen, Step(f"window {w + 1}", rate, args.window * 60), args.seed + 100 + w)
                    after = read_stats(stats_file)
                    row.update(rss_mib=round(rss_kib(pid) / 1024, 1), rss_tree_mib=round(rss_kib(pid, tree=True) / 1024, 1),
                               fuzz_frames=after.get("sent", 0) - before.get("sent", 0),
                               fuzz_closed_without_error=after.get("closed_without_error", 0), fuzz_internal=after.get("internal", 0),
                               idle_reconnects=after.get("idle", {}).get("connects", 0) - before.get("idle", {}).get("connects", 0),
                               log_bytes=(work / "engine.log").stat().st_size - log0)
                    row.pop("outcomes", None)
                    emit({"soak_window": row})
                    stderr(f"  window {w + 1}/{windows}: {row['arrivals']} arrivals, p99 {row['p99_ms']} ms, unanswered {row['unanswered']}, "
                           f"errors {row['errors']}, RSS {row['rss_mib']} MiB (with workers {row['rss_tree_mib']}), fuzz frames {row['fuzz_frames']}")
                    out["windows"].append(row)
            finally:
                side.send_signal(signal.SIGINT)
                try:
                    await trio.to_thread.run_sync(side.wait, 30)
                except subprocess.TimeoutExpired:
                    side.kill()
            final = read_stats(stats_file)
            idle = final.pop("idle", {"connects": 0, "connect_failed": 0})
            out["fuzz"] = {"sent": 0, "closed_without_error": 0, "internal": 0, **final}
            out["idle"] = idle
            if measured is not None:  # the machine's own drift over the soak, apart from the engine's
                again = await measure_limit_again(args, args.challenge_check, measured)
                if again is not None:
                    out["limit_rps_after"] = again["limit_rps"]
                    out["limit_cpu_ms_per_verification_after"] = again["best"]["cpu_ms_per_verification"]
            await gen.connections.aclose()
            routers.cancel_scope.cancel()
    finally:
        out["engine_exit_code"] = await trio.to_thread.run_sync(gen.engine.stop)
    ws = out["windows"]
    p99s = [w["p99_ms"] for w in ws]
    second = ws[1]["rss_mib"] if len(ws) > 1 else ws[0]["rss_mib"]
    out["checks"] = {
        "unanswered_0": {"value": sum(w["unanswered"] for w in ws), "pass": all(w["unanswered"] == 0 for w in ws)},
        "p99_le_1s_every_window": {"value_ms": p99s, "pass": all(p is not None and p <= 1000.0 for p in p99s)},
        "rss_last_within_10pct_of_second": {"second_mib": second, "last_mib": ws[-1]["rss_mib"],
                                            "pass": abs(ws[-1]["rss_mib"] / second - 1) <= 0.10},
        "fuzz_clean": {"closed_without_error": out["fuzz"]["closed_without_error"], "internal": out["fuzz"]["internal"],
                       "pass": out["fuzz"]["closed_without_error"] == 0 and out["fuzz"]["internal"] == 0},
    }
    return out


async def _saturate(gen: Generator, args: argparse.Namespace, out: dict[str, Any]) -> float:
    """Capacity as netid bench load finds it: the throughput of a step at 1.25 x the limit."""
    sat = await run_step(gen, Step("saturation", 1.25 * out["limit_rps"], args.find_seconds), args.seed)
    sat.pop("outcomes", None)
    emit({"soak_saturation": sat})
    return max(sat["throughput_rps"], 0.05)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netid bench soak", description="A long run at 80 % of capacity with fuzzing and idle clients alongside.")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--window", type=float, default=5.0, help="minutes per reported window")
    p.add_argument("--load", type=float, default=0.8, help="fraction of capacity offered")
    p.add_argument("--capacity-rps", type=float, default=None, help="skip the capacity search")
    p.add_argument("--limit-rps", type=float, default=None, help="skip the limit measurement; saturate at 1.25 x this")
    p.add_argument("--find-seconds", type=float, default=30.0, help="seconds of the saturation step")
    p.add_argument("--capacity-alone", action="store_true", help="find capacity before the fuzzing and idle clients start (default: with them)")
    p.add_argument("--fuzz-connections", type=int, default=1)
    p.add_argument("--idle", type=int, default=200, help="idle clients alongside")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--residents", type=int, default=24)
    p.add_argument("--relying-parties", type=int, default=4)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--answer-timeout", type=float, default=20.0)
    p.add_argument("--no-challenge-check", dest="challenge_check", action="store_false")
    p.add_argument("--engine-set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--workdir", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # what engine.bench.load's helpers read from its own arguments
    args.limit_layout, args.limit_search, args.quick, args.engine_pid = [], False, True, None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="netid-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    stderr(f"netid bench soak: {args.minutes} min at {args.load:.0%} of capacity, work dir {work}")
    t0 = time.time()
    out = trio.run(soak, args, work)
    out["seconds"] = round(time.time() - t0)
    emit({"summary": {k: v for k, v in out.items() if k != "windows"}})
    ws = out["windows"]
    print(
        f"SOAK {'PASS' if all(c['pass'] for c in out['checks'].values()) else 'FAIL'} {args.minutes:g} min at {args.load * out['capacity_rps']:.2f}/s "
        f"({args.load:.0%} of {out['capacity_rps']:.2f}/s): unanswered {out['checks']['unanswered_0']['value']}; "
        f"p99 per window {[w['p99_ms'] for w in ws]} ms; RSS per window {[w['rss_mib'] for w in ws]} MiB "
        f"(with workers {[w['rss_tree_mib'] for w in ws]}); fuzz {out['fuzz']['sent']:,} frames, closed without an error "
        f"{out['fuzz']['closed_without_error']}, internal {out['fuzz']['internal']}; idle reconnections {out['idle']['connects']:,}"
    )
    cpu = [w.get("engine_cpu_ms_per_verification") for w in ws]
    print(f"  engine CPU per verification per window (side load included) {cpu} ms")
    models = [round(sum(w.get("model_ms_per_verification", {}).values()), 1) for w in ws]
    print(f"  model time per verification per window (wall, all models) {models} ms")
    if "limit_rps_after" in out:
        print(f"  the models alone (netid bench limit) before / after: {out['limit_rps']:.2f} / {out['limit_rps_after']:.2f} per s, "
              f"{out['limit_cpu_ms_per_verification']} / {out['limit_cpu_ms_per_verification_after']} CPU ms per verification")
    for name, check in out["checks"].items():
        print(f"  check {name}: {'PASS' if check['pass'] else 'FAIL'} {({k: v for k, v in check.items() if k != 'pass'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
