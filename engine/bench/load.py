"""``netid bench load``: open-loop load against a real engine over TCP, and its limit.

What it does, in one run:

1. **Setup.** Starts ``netid serve`` in a subprocess on free ports (or uses ``--connect``
   with the engine's data directory), imports an ID-card registry of chimeric residents
   (LFW faces, FSDD digit speakers, from ``../shared/data``), registers several relying
   parties with ``netid rp add``, and enrolls every resident from its own phone over TCP.
2. **The limit.** Runs ``engine.bench.limit`` (the same extraction work straight on the
   models, no server) while the engine idles, so both figures come from the same minutes
   of the same machine; after the load steps it runs again with the layout found, and the
   ratio uses the mean of the two (both are reported).
3. **Load steps.** Poisson arrivals at a given rate (exactly rate x seconds of them, at
   random times: :func:`arrival_times`): each arrival is a relying party
   opening a session and a holder's phone answering it with a live face and a recording
   of the session's digits (genuine holders, another person's face, another speaker's
   voice, the wrong digits). With ``--search`` (the default) the steps are: saturation
   (1.25 x the limit), then 50 %, 80 % and 200 % of the throughput measured at
   saturation. Every payload is prepared before the timed part; a recording of the
   session's digits is spliced from pre-loaded 16-bit PCM, a few byte joins.
4. **Report.** Per step, one JSON line: offered and achieved rates, latency percentiles
   (from each arrival's scheduled time to the holder's reply, so a slow generator cannot
   hide queueing), every error code counted, unanswered requests, batch sizes seen
   (from the engine's ``/metrics`` before and after), the generator's and the engine's
   CPU share. Then a summary JSON line (``throughput_rps``, ``limit_rps``, ``ratio``,
   ``p50_ms``, ``p99_ms``, ``offered_rps``, ``overloaded``, ``unanswered``, ``errors``,
   and the three load checks), a PNG plot, and a human summary.

**Many nodes.** With ``--store postgresql://...`` (and ``--state redis://...``, Redis on
127.0.0.1 by default) the engine runs on the shared services, as ``--nodes`` nodes: each
relying party's stream on one node, the holders' phones spread over the nodes apart from
them, so most sessions are opened on one node and verified on another; the nodes'
``/metrics`` and CPU are summed. Each step then also reports the CPU per verification spent
in the store's and the state's worker threads (``netid_layer_cpu_seconds_total``) and by the
PostgreSQL and Redis server processes (from /proc). ``--compare-sqlite`` first runs the same
steps on one SQLite node, under the same limit (measured before and after), both set up
first, their saturation steps alternating (``--rounds``), and checks that the two ratios are
within 0.03.

Latency is measured on answered verifications (a ``verified`` reply); an ``overloaded``
answer is timed from the moment the verify request was sent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from ._common import DEFAULT_MIX, data_root, emit, load_people, screen_people, stderr
from ._engine import EngineProcess
from .load_steps import measure_idle
from .services import RunServices

# the load generator and the report live beside this module; netid bench soak and the tests
# take the generator's pieces from here
from .load_report import human_summary, plot, run_summary
from .load_steps import (  # noqa: F401 - re-exported
    Generator,
    Outcome,
    Step,
    _connect_all,
    _route_pushes,
    arrival_times,
    enroll_all,
    prepare_data,
    run_step,
    summarise,
)

__all__ = ["Step", "run", "main"]


# ---- the limit ----------------------------------------------------------------------------------
def _limit_seconds(args: argparse.Namespace) -> list[str]:
    """Seconds per layout: the quick search's 12 (8 with --quick); the limit's own default
    with --limit-layout or --limit-search."""
    return [] if args.limit_layout or args.limit_search else ["--seconds", "8" if args.quick else "12"]


def measure_limit(args: argparse.Namespace, challenge: bool, layouts: list[str] | None = None) -> dict[str, Any]:
    """Run ``engine.bench.limit``: the layouts given, else ``--limit-layout``, else its full
    search (``--limit-search``) or its quick one; every time with the same seconds per layout."""
    cmd = [sys.executable, "-m", "engine.bench.limit", "--samples", "48", "--mix", args.mix]
    if args.data:
        cmd += ["--data", str(args.data)]
    if not challenge:
        cmd.append("--no-challenge")
    layouts = layouts or args.limit_layout
    if layouts:
        cmd += [arg for layout in layouts for arg in ("--layout", layout)]
    elif not args.limit_search:
        cmd.append("--quick")
    cmd += _limit_seconds(args)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"engine.bench.limit failed: {out.stderr[-2000:]}")
    sys.stderr.write(out.stderr)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{") and '"limit_rps"' in line:
            return json.loads(line)
    raise RuntimeError("engine.bench.limit printed no summary")


# ---- the run ------------------------------------------------------------------------------------
def _targets(args: argparse.Namespace, tag: str) -> list[tuple[str, RunServices, int]]:
    """What the steps run against, in order: ``(name, services, nodes)``; with
    ``--compare-sqlite``, one SQLite node first, then the store asked for."""
    services = RunServices(args.store, args.state, tag)
    name = "postgresql" if services.shared else "sqlite"
    targets = [(name, services, args.nodes)]
    if args.compare_sqlite and services.shared:
        targets.insert(0, ("sqlite", RunServices(None, None, tag), 1))
    return targets


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Set-up of every target (``_targets``), the limit, the steps, the limit again, the summary.

    With several targets all are set up first and idle while the limit is measured; their
    saturation steps then alternate (``--rounds`` each: A, B, A, B...), so that a machine
    that changes speed during the run weighs on both alike, and each target's capacity is the
    mean of its rounds; then each runs its 50 %, 80 % and 200 % steps."""
    targets = _targets(args, os.urandom(3).hex())
    limit: dict[str, Any] | None = None
    sides: list[tuple[str, Generator, bool]] = []
    rows: dict[str, list[dict[str, Any]]] = {}
    codes: dict[str, int | None] = {}
    try:
        try:
            for name, services, nodes in targets:
                sub = work / name if len(targets) > 1 else work
                sub.mkdir(parents=True, exist_ok=True)
                gen, challenge, t_setup = await _set_up(args, sub, services, nodes)
                sides.append((name, gen, challenge))
                refused = await enroll_all(gen, random.Random(args.seed))
                stderr(f"  [{name}, {max(1, len(gen.engines))} node(s)] enrolled {len(gen.residents)} residents "
                       f"({refused or 'none refused'}); setup {time.perf_counter() - t_setup:.0f} s")
                if not gen.residents:
                    raise SystemExit("no resident could be enrolled")
            if args.limit_rps:
                limit = {"limit_rps": args.limit_rps, "given": True}
            elif not args.no_limit:
                limit = await trio.to_thread.run_sync(measure_limit, args, sides[0][2])  # the engines idle
            limit_rps = limit["limit_rps"] if limit else None
            if args.rps or len(sides) == 1:
                for name, gen, _ in sides:
                    rows[name] = await _run_steps(gen, args, limit_rps)
            else:
                if not limit_rps:
                    raise SystemExit("a comparison needs the limit (drop --no-limit, or give --limit-rps)")
                seconds = args.seconds or (12.0 if args.quick else 30.0)
                for r in range(args.rounds):
                    for name, gen, _ in sides:
                        stderr(f"  [{name}] saturation, round {r + 1} of {args.rounds}")
                        got = await _run_steps(gen, args, limit_rps, [Step(f"saturation-{r + 1}", 1.25 * limit_rps, seconds)])
                        rows.setdefault(name, []).extend(got)
                for name, gen, _ in sides:
                    capacity = max(sum(x["throughput_rps"] for x in rows[name]) / len(rows[name]), 0.05)
                    stderr(f"  [{name}] capacity {capacity:.2f}/s (mean of {args.rounds} saturation steps)")
                    rows[name] += await _run_steps(gen, args, limit_rps, [
                        Step(step, factor * capacity, seconds) for step, factor in (("50%", 0.5), ("80%", 0.8), ("200%", 2.0))])
        finally:
            for name, gen, _ in sides:
                stopped = [await trio.to_thread.run_sync(engine.stop) for engine in gen.engines]
                codes[name] = max(stopped, key=abs) if stopped else None
        if limit is not None and "best" in limit:
            limit = await _limit_after(args, sides[-1][2], limit)
    finally:
        for _, services, _ in targets:
            await trio.to_thread.run_sync(services.clean_up)
    summaries = []
    for name, gen, challenge in sides:
        s = run_summary(rows[name], limit, gen, challenge, args)
        s.update(store=name, nodes=max(1, len(gen.engines)), engine_exit_code=codes.get(name))
        summaries.append(s)
    return compare(summaries)


def compare(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary; with a SQLite baseline first, the last with the baseline inside it and the
    check that their ratios to the limit are within 0.03 of each other."""
    summary = summaries[-1]
    if len(summaries) > 1:
        base = summaries[0]
        summary["baseline"] = {k: v for k, v in base.items() if k not in ("steps", "checks")}
        summary["baseline"]["checks"] = base.get("checks", {})
        if summary.get("ratio") is not None and base.get("ratio") is not None:
            diff = round(summary["ratio"] - base["ratio"], 3)
            summary.setdefault("checks", {})["ratio_within_0.03_of_sqlite"] = {
                "value": diff, "ratio": summary["ratio"], "sqlite_ratio": base["ratio"], "pass": abs(diff) <= 0.03,
            }
    return summary


async def _set_up(args: argparse.Namespace, work: Path, services: RunServices, nodes: int) -> tuple[Generator, bool, float]:
    """Residents and relying parties, the registry imported and the engine's ``nodes`` started
    (unless ``--connect``) on ``services``: the generator, whether the challenge check is on,
    when set-up began."""
    root = data_root(args.data)
    t_setup = time.perf_counter()
    people, strangers = load_people(root, args.residents, seed=args.seed)
    people, strangers = await trio.to_thread.run_sync(screen_people, people, strangers)
    gen = Generator(args, root, people, strangers)
    gen.store_args = services.store_args()
    if services.shared:
        from ._common import listening_pids

        gen.services = tuple(listening_pids(services.ports()))
    run_tag = os.urandom(3).hex()
    challenge = not args.no_challenge_check
    if challenge:
        try:
            import engine.challenge  # noqa: F401
        except ImportError:
            stderr("engine.challenge is not available: the engine runs with --no-challenge-check, the limit without the recogniser")
            challenge = False
    if args.connect:
        host, _, port = args.connect.rpartition(":")
        gen.host, gen.port = host or "127.0.0.1", int(port)
        gen.metrics_url = args.metrics_url
        if args.engine_data is None:
            raise SystemExit("--connect needs --engine-data (the engine's data directory, for the registry and relying parties)")
        data_dir = args.engine_data
    else:
        data_dir = work / "engine-data"
    stderr(f"netid bench load: {len(people)} residents, {args.relying_parties} relying parties, data {root}, work dir {work}")
    prepare_data(gen, data_dir, work, run_tag)
    if not args.connect:
        serve_args = [*args.serve_arg, *services.serve_args()]
        if not challenge:
            serve_args.append("--no-challenge-check")
        for k in range(nodes):
            log_path = work / (f"engine-{k}.log" if nodes > 1 else "engine.log")
            gen.engines.append(EngineProcess(data_dir, serve_args=serve_args, overrides=args.engine_set, log_path=log_path))
            try:
                gen.engines[-1].start()
            except BaseException:
                for engine in gen.engines[:-1]:
                    engine.stop()
                raise
        gen.engine = gen.engines[0]
        gen.port = gen.engine.port
        gen.metrics_url = gen.engine.metrics_url
    return gen, challenge, t_setup


async def _run_steps(gen: Generator, args: argparse.Namespace, limit_rps: float | None, steps: list[Step] | None = None) -> list[dict[str, Any]]:
    """The load steps on long-lived connections: ``steps``, else ``--rps``, else the capacity
    search (saturation at 1.25 x the limit, then 50 %, 80 % and 200 % of what saturation achieved)."""
    seconds = args.seconds or (12.0 if args.quick else 30.0)
    rows: list[dict[str, Any]] = []
    async with trio.open_nursery() as routers:
        await _connect_all(gen)
        for rp in gen.rps:
            routers.start_soon(_route_pushes, gen, rp)
        if gen.services and gen.layer_idle_cpu is None:
            await measure_idle(gen)  # once, before the generator's first step
        if steps:
            for k, st in enumerate(steps):
                rows.append(await _do_step(gen, st, args.seed + k))
        elif args.rps:
            steps = [Step(f"rps={r:g}", r, seconds) for r in args.rps]
            for k, st in enumerate(steps):
                rows.append(await _do_step(gen, st, args.seed + k))
        else:
            if not limit_rps:
                raise SystemExit("a capacity search needs the limit (drop --no-limit, or give --limit-rps or --rps)")
            sat = await _do_step(gen, Step("saturation", 1.25 * limit_rps, seconds), args.seed)
            rows.append(sat)
            capacity = max(sat["throughput_rps"], 0.05)
            for k, (name, factor) in enumerate((("50%", 0.5), ("80%", 0.8), ("200%", 2.0))):
                rows.append(await _do_step(gen, Step(name, factor * capacity, seconds), args.seed + 1 + k))
        await gen.connections.aclose()
        routers.cancel_scope.cancel()
    return rows


async def _limit_after(args: argparse.Namespace, challenge: bool, limit: dict[str, Any]) -> dict[str, Any]:
    """The limit again, with the layout found before, now that the engine idles again: the
    ratio uses the mean of the two, so that a machine that got faster or slower during the
    steps does not tilt it."""
    after = await measure_limit_again(args, challenge, limit)
    if after is None:
        stderr("the ratio uses the limit before the steps")
        return {**limit, "limit_rps_before": limit["limit_rps"], "limit_rps_after": None}
    return bracket_limit(limit, after)


async def measure_limit_again(args: argparse.Namespace, challenge: bool, limit: dict[str, Any]) -> dict[str, Any] | None:
    """``measure_limit`` with the layout ``limit`` found best; None (said) if it failed."""
    layout = ",".join(str(limit["best"][k]) for k in ("batch", "threads", "intra", "processes"))
    try:
        return await trio.to_thread.run_sync(measure_limit, args, challenge, [layout])
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        stderr(f"the limit could not be measured again ({exc})")
        return None


async def _do_step(gen: Generator, step: Step, seed: int) -> dict[str, Any]:
    row = await run_step(gen, step, seed)
    emit({"load_step": row})
    means = ", ".join(f"{m}: {b['mean']}" for m, b in row.get("batches", {}).items())
    stderr(
        f"  {step.name:<11} offered {step.offered_rps:6.2f}/s  throughput {row['throughput_rps']:6.2f}/s  "
        f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  overloaded {row['overloaded']} (p99 {row['overloaded_p99_ms']} ms)  "
        f"unanswered {row['unanswered']}  errors {row['errors']}  mean batch {{{means}}}  "
        f"generator CPU {100 * (row['cpu'].get('generator_cpu_share') or 0):.1f} %"
    )
    await trio.sleep(1.0)
    return row


def bracket_limit(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The limit measured before and after the load steps, as one: the mean of the two."""
    out = dict(before)
    out["limit_rps_before"], out["limit_rps_after"] = before["limit_rps"], after["limit_rps"]
    out["limit_rps"] = round((before["limit_rps"] + after["limit_rps"]) / 2, 3)
    best = dict(before["best"])
    for key in ("rps", "cpu_ms_per_verification", "cpu_share"):
        if best.get(key) is not None and after["best"].get(key) is not None:
            best[key] = round((best[key] + after["best"][key]) / 2, 4)
    best["before"], best["after"] = before["best"], after["best"]
    out["best"] = best
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netid bench load", description="Open-loop load against a real engine over TCP, with the model-bound limit.")
    p.add_argument("--data", type=Path, default=None, help="data root with lfw/ and digits/ (default ../shared/data, else samples/)")
    p.add_argument("--quick", action="store_true", help="short steps (12 s) and a quick limit: about 2 minutes")
    p.add_argument("--search", action="store_true", help="capacity search (the default unless --rps is given)")
    p.add_argument("--rps", type=float, action="append", default=[], help="offered rate of one step (repeat for several steps)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per step (default 30, quick 12)")
    p.add_argument("--residents", type=int, default=24)
    p.add_argument("--relying-parties", type=int, default=4)
    p.add_argument("--mix", default=DEFAULT_MIX, help="kinds of arrival and their weights; the limit measures the same mix (default %(default)s)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--answer-timeout", type=float, default=20.0, help="seconds after which a request counts as unanswered")
    p.add_argument("--no-challenge-check", action="store_true", help="engine without the spoken-challenge check, limit without the recogniser")
    p.add_argument("--no-limit", action="store_true", help="do not measure the limit")
    p.add_argument("--limit-rps", type=float, default=None, help="use this limit instead of measuring it")
    p.add_argument("--limit-layout", action="append", default=[], metavar="B,T,I[,P]", help="limit layouts to measure (default: the limit's quick search)")
    p.add_argument("--limit-search", action="store_true", help="run the limit's full layout search (adds minutes; see benchmarks/TUNING.md)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for netid serve (repeat)")
    p.add_argument("--engine-set", action="append", default=[], metavar="FIELD=VALUE", help="engine configuration override, e.g. limits.max_biometric=12")
    p.add_argument("--store", default=None, metavar="URL",
                   help="the nodes' store, e.g. postgresql://127.0.0.1/test (default: SQLite in the work directory); "
                        "without schema= the run works in a schema of its own and drops it at the end")
    p.add_argument("--state", default=None, metavar="URL",
                   help="shared session state, e.g. redis://127.0.0.1:6379/0 (needs a PostgreSQL --store; default with one: "
                        "redis://127.0.0.1:6379/0; without prefix= the run uses a prefix of its own and deletes its keys)")
    p.add_argument("--nodes", type=int, default=1, help="engine nodes on the shared store and state (default 1)")
    p.add_argument("--compare-sqlite", action="store_true",
                   help="with a PostgreSQL --store: first run the same steps on one SQLite node, same limit, and check the ratios")
    p.add_argument("--rounds", type=int, default=2, help="with --compare-sqlite: saturation steps per store, alternating (default 2)")
    p.add_argument("--connect", default=None, metavar="HOST:PORT", help="use a running engine instead of starting one")
    p.add_argument("--engine-data", type=Path, default=None, help="with --connect: the engine's data directory")
    p.add_argument("--metrics-url", default=None, help="with --connect: the engine's /metrics URL")
    p.add_argument("--engine-pid", type=int, default=None, help="with --connect: the engine's pid (for its CPU share)")
    p.add_argument("--workdir", type=Path, default=None, help="where the engine data, logs and plot go (default: a new temporary directory, kept)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default WORKDIR/load.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="netid-load-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.residents < 2:
        raise SystemExit("--residents must be at least 2")
    shared = bool(args.store and args.store.startswith(("postgresql:", "postgres:")))
    if args.state is None and shared:
        args.state = "redis://127.0.0.1:6379/0"
    if args.nodes < 1 or (args.nodes > 1 and not shared):
        raise SystemExit("--nodes N > 1 needs a PostgreSQL --store (and Redis --state)")
    if args.connect and (args.store or args.nodes > 1 or args.compare_sqlite):
        raise SystemExit("--connect measures a running engine: --store, --nodes and --compare-sqlite start their own")
    summary = trio.run(run, args, work)
    plot_path = args.plot or work / "load.png"
    plot(summary, plot_path)
    summary["plot"] = str(plot_path)
    emit({"summary": {k: v for k, v in summary.items() if k != "steps"}})
    human_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
