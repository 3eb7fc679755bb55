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

Latency is measured on answered verifications (a ``verified`` reply); an ``overloaded``
answer is timed from the moment the verify request was sent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing
import trio

from ._common import (
    DEFAULT_MIX,
    DIGIT_SPEAKERS,
    LIVE_TAKES,
    CpuClock,
    Person,
    digit_voices,
    data_root,
    emit,
    latency_summary,
    load_people,
    parse_mix,
    pct,
    screen_people,
    stderr,
)
from ._engine import EngineProcess, netid

__all__ = ["Step", "run", "main"]


@dataclass
class Outcome:
    kind: str
    arrival: float
    sent: float | None = None
    done: float | None = None
    status: str = "unanswered"  # "pass" / "fail" (a result), an error code, or "unanswered"
    stage: str = "open"
    session_id: str = ""


@dataclass
class Resident:
    person: Person
    key: nacl.signing.SigningKey = field(default_factory=nacl.signing.SigningKey.generate)
    credential_id: str = ""
    phone: Any = None  # HolderClient on a long-lived connection


@dataclass
class RelyingParty:
    rp_id: str
    sign: nacl.signing.SigningKey
    box: nacl.public.PrivateKey
    client: Any = None


@dataclass
class Step:
    name: str
    offered_rps: float
    seconds: float


class Generator:
    """Shared state of a run: residents, relying parties, payloads, pushed results."""

    def __init__(self, args: argparse.Namespace, root: Path, people: list[Person], strangers: list[bytes]) -> None:
        self.args = args
        self.residents = [Resident(p) for p in people]
        self.strangers = strangers
        speakers = list(DIGIT_SPEAKERS)  # impostor voices may come from any of them
        self.enroll_voices = digit_voices(root, speakers, range(0, 2))
        self.live_voices = digit_voices(root, speakers, LIVE_TAKES)
        self.speakers = speakers
        mix = parse_mix(args.mix)
        self.kinds, self.weights = list(mix), list(mix.values())
        self.rps: list[RelyingParty] = []
        self.pushed: dict[str, str] = {}
        self.host, self.port = "127.0.0.1", 0
        self.engine: EngineProcess | None = None
        self.metrics_url: str | None = None
        self.connections: Any = None  # AsyncExitStack of the long-lived connections

    def payload(self, kind: str, r: Resident, challenge: str, rng: random.Random) -> tuple[bytes, bytes]:
        p = r.person
        face = rng.choice(self.strangers) if kind == "impostor_face" else rng.choice(p.probe_faces)
        speaker = p.speaker
        if kind == "impostor_voice":
            speaker = rng.choice([s for s in self.speakers if s != p.speaker])
        said = challenge
        if kind == "wrong_words":
            while said == challenge:
                said = "".join(rng.choice("0123456789") for _ in challenge)
        return face, self.live_voices.say(speaker, said, rng)


# ---- setup -----------------------------------------------------------------------------------------
def prepare_data(gen: Generator, data_dir: Path, work: Path, run_tag: str) -> None:
    """Registry import and relying parties, with the operator commands (engine may be running)."""
    registry = work / "registry.jsonl"
    registry.write_text(
        "".join(
            json.dumps({"card_number": r.person.card_number, "name": r.person.name, "photo": str(r.person.card_photo), "status": "valid"}) + "\n"
            for r in gen.residents
        )
    )
    report = netid("registry", "import", str(registry), "--data", str(data_dir))
    refused = {c["card_number"] for c in report.get("refused", [])}
    if refused:
        stderr(f"  registry refused {len(refused)} card photos: {sorted(refused)}")
        gen.residents = [r for r in gen.residents if r.person.card_number not in refused]
    keys = work / "keys"
    for k in range(gen.args.relying_parties):
        rp_id = f"load-{run_tag}-{k}"
        netid("rp", "add", "--id", rp_id, "--name", f"Load test {k}", "--quota", "1000000", "--keys-out", str(keys), "--data", str(data_dir))
        gen.rps.append(
            RelyingParty(rp_id, nacl.signing.SigningKey((keys / f"{rp_id}.sign.key").read_bytes()), nacl.public.PrivateKey((keys / f"{rp_id}.box.key").read_bytes()))
        )


async def enroll_all(gen: Generator, rng: random.Random) -> dict[str, int]:
    from engine.client import open_holder
    from engine.errors import EngineError

    refused: Counter[str] = Counter()
    limit = trio.Semaphore(3)

    async def one(r: Resident) -> None:
        async with limit:
            voices = [gen.enroll_voices.say(r.person.speaker, "".join(rng.choice("0123456789") for _ in range(8)), rng) for _ in range(3)]
            for attempt in range(20):
                try:
                    async with open_holder(gen.host, gen.port, device_key=r.key) as phone:
                        got = await phone.enroll(r.person.card_number, r.person.enroll_faces, voices)
                    r.credential_id = got.credential_id
                    return
                except EngineError as exc:
                    if exc.code == "overloaded" and attempt < 19:
                        await trio.sleep(0.2 + (exc.retry_after_ms or 0) / 1000)
                        continue
                    refused[exc.code] += 1
                    return

    async with trio.open_nursery() as n:
        for r in gen.residents:
            n.start_soon(one, r)
    gen.residents = [r for r in gen.residents if r.credential_id]
    return dict(refused)


# ---- one verification -----------------------------------------------------------------------------
async def verification(gen: Generator, rp: RelyingParty, r: Resident, kind: str, arrival: float, rng: random.Random, out: list[Outcome]) -> None:
    from engine.errors import EngineError

    o = Outcome(kind, arrival)
    out.append(o)
    with trio.move_on_after(gen.args.answer_timeout):
        try:
            opened = await rp.client.open_session(level="basic", purpose="load test")
            o.session_id = opened.session_id
            face, voice = gen.payload(kind, r, opened.payload.challenge, rng)
            o.stage = "verify"
            o.sent = trio.current_time()
            result = await r.phone.verify(r.credential_id, opened.payload, face=face, voice=voice)
            o.status = result.outcome
        except EngineError as exc:
            o.status = exc.code
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            o.status = "connection_lost"
        o.done = trio.current_time()


def arrival_times(rate: float, seconds: float, rng: random.Random) -> list[float]:
    """Poisson arrivals at ``rate`` over ``seconds``, conditioned on their expected count.

    Given its count, a Poisson process's arrival times are independent and uniform over the
    interval, so the step keeps Poisson's bursts and gaps; fixing the count to ``rate *
    seconds`` makes the step offer the load it names. Drawn freely, the count of a 30 s
    step is off by ±11 % (one standard deviation) at 2.7/s, and a seeded run repeats the
    same draw: the 80 % step of every run offered 1.2 x its rate, about capacity.
    """
    count = round(rate * seconds)
    return sorted(rng.uniform(0.0, seconds) for _ in range(count))


async def run_step(gen: Generator, step: Step, seed: int) -> dict[str, Any]:
    """Poisson arrivals (:func:`arrival_times`) at ``step.offered_rps`` for ``step.seconds``;
    wait for every answer."""
    from engine.top import Snapshot

    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    before: Snapshot | None = await _scrape(gen)
    clock = CpuClock(other_pid=gen.engine.pid if gen.engine else gen.args.engine_pid)
    clock.start()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i, offset in enumerate(arrival_times(step.offered_rps, step.seconds, rng)):
            t = t0 + offset
            await trio.sleep_until(t)
            r = rng.choice(gen.residents)
            kind = rng.choices(gen.kinds, gen.weights)[0]
            nursery.start_soon(verification, gen, gen.rps[i % len(gen.rps)], r, kind, t, random.Random(rng.random()), outcomes)
    cpu = clock.stop()
    await trio.sleep(0.2)  # let the last pushes arrive
    after = await _scrape(gen)
    return summarise(step, t0, outcomes, before, after, cpu, gen)


async def _scrape(gen: Generator):
    from engine.top import scrape

    if not gen.metrics_url:
        return None
    try:
        return await trio.to_thread.run_sync(scrape, gen.metrics_url)
    except OSError:
        return None


def summarise(step: Step, t0: float, outcomes: list[Outcome], before, after, cpu: dict, gen: Generator) -> dict[str, Any]:
    from engine.top import _buckets, _by, _delta, histogram_quantile

    results = [o for o in outcomes if o.status in ("pass", "fail")]
    warm = min(2.0, 0.15 * step.seconds)
    window = (t0 + warm, t0 + step.seconds)
    in_window = sum(1 for o in results if o.done is not None and window[0] <= o.done <= window[1])
    errors = Counter(o.status for o in outcomes if o.status not in ("pass", "fail"))
    overloaded = [o for o in outcomes if o.status == "overloaded"]
    over_lat = sorted((o.done - (o.sent if o.sent is not None else o.arrival)) for o in overloaded if o.done is not None)
    lat = latency_summary([o.done - o.arrival for o in results if o.done is not None])
    verify_lat = latency_summary([o.done - o.sent for o in results if o.done is not None and o.sent is not None])
    by_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for o in outcomes:
        by_kind[o.kind][o.status if o.status in ("pass", "fail") else "error"] += 1
    missing = sum(1 for o in results if o.session_id not in gen.pushed)
    row: dict[str, Any] = {
        "step": step.name,
        "offered_rps": round(step.offered_rps, 3),
        "arrived_rps": round(len(outcomes) / step.seconds, 3),
        "seconds": step.seconds,
        "arrivals": len(outcomes),
        "throughput_rps": round(in_window / (window[1] - window[0]), 3),
        "answered_results": len(results),
        **lat,
        "verify_p99_ms": verify_lat["p99_ms"],
        "overloaded": len(overloaded),
        "overloaded_p99_ms": round(1000 * pct(over_lat, 0.99), 1) if over_lat else None,
        "overloaded_max_ms": round(1000 * over_lat[-1], 1) if over_lat else None,
        "unanswered": errors.get("unanswered", 0) + errors.get("connection_lost", 0),
        "errors": dict(errors),
        "results_not_pushed": missing,
        "outcomes": {k: dict(v) for k, v in by_kind.items()},
        "cpu": cpu,
    }
    if before is not None and after is not None:
        size_b = _delta(before, after, "netid_batch_size_bucket")
        counts = _by(_delta(before, after, "netid_batch_size_count"), "model")
        sums = _by(_delta(before, after, "netid_batch_size_sum"), "model")
        batches = {}
        for model in sorted(counts):
            hist, prev = {}, 0.0
            for le, c in _buckets(size_b, model=model):
                if c > prev:
                    hist["+Inf" if math.isinf(le) else str(int(le))] = int(c - prev)
                prev = c
            wait_b = _buckets(_delta(before, after, "netid_batch_wait_seconds_bucket"), model=model)
            batches[model] = {
                "calls": int(counts[model]),
                "mean": round(sums.get(model, 0.0) / counts[model], 2) if counts[model] else None,
                "sizes": hist,
                "wait_p50_ms": _ms(histogram_quantile(wait_b, 0.5)),
                "wait_p99_ms": _ms(histogram_quantile(wait_b, 0.99)),
            }
        row["batches"] = batches
        lat_b = _buckets(_delta(before, after, "netid_request_latency_seconds_bucket"), type="verify")
        row["engine_verify_p99_ms"] = _ms(histogram_quantile(lat_b, 0.99))
        row["engine_overloaded"] = {k: int(v) for k, v in _by(_delta(before, after, "netid_overloaded_total"), "where").items() if v}
        row["abandoned"] = {k: int(v) for k, v in _by(_delta(before, after, "netid_batch_abandoned_total"), "model").items() if v}
    engine_cpu = cpu.get("engine_cpu_s")
    if engine_cpu is not None and len(results):
        row["engine_cpu_ms_per_verification"] = round(1000 * engine_cpu / len(results), 1)
    return row


def _ms(x: float) -> float | None:
    return None if math.isnan(x) else round(1000 * x, 1)


# ---- the run ------------------------------------------------------------------------------------
async def _connect_all(gen: Generator) -> None:
    """Long-lived connections: one per relying party, one per holder's phone."""
    from contextlib import AsyncExitStack

    from engine.client import open_holder, open_relying_party

    gen.connections = stack = AsyncExitStack()
    for rp in gen.rps:
        rp.client = await stack.enter_async_context(open_relying_party(gen.host, gen.port, rp_id=rp.rp_id, signing_key=rp.sign, box_key=rp.box))
    for r in gen.residents:
        r.phone = await stack.enter_async_context(open_holder(gen.host, gen.port, device_key=r.key))


async def _route_pushes(gen: Generator, rp: RelyingParty) -> None:
    async for result in rp.client.results():
        gen.pushed[result.session_id] = result.outcome


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


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = data_root(args.data)
    t_setup = time.perf_counter()
    people, strangers = load_people(root, args.residents, seed=args.seed)
    people, strangers = await trio.to_thread.run_sync(screen_people, people, strangers)
    gen = Generator(args, root, people, strangers)
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
        serve_args = list(args.serve_arg)
        if not challenge:
            serve_args.append("--no-challenge-check")
        gen.engine = EngineProcess(data_dir, serve_args=serve_args, overrides=args.engine_set, log_path=work / "engine.log").start()
        gen.port = gen.engine.port
        gen.metrics_url = gen.engine.metrics_url
    summary: dict[str, Any] = {}
    try:
        refused = await enroll_all(gen, random.Random(args.seed))
        stderr(f"  enrolled {len(gen.residents)} residents ({refused or 'none refused'}); setup {time.perf_counter() - t_setup:.0f} s")
        if not gen.residents:
            raise SystemExit("no resident could be enrolled")

        limit: dict[str, Any] | None = None
        if args.limit_rps:
            limit = {"limit_rps": args.limit_rps, "given": True}
        elif not args.no_limit:
            limit = await trio.to_thread.run_sync(measure_limit, args, challenge)
        limit_rps = limit["limit_rps"] if limit else None

        seconds = args.seconds or (12.0 if args.quick else 30.0)
        rows: list[dict[str, Any]] = []
        async with trio.open_nursery() as routers:
            await _connect_all(gen)
            for rp in gen.rps:
                routers.start_soon(_route_pushes, gen, rp)
            if args.rps:
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
        if limit is not None and "best" in limit:
            # the limit again, with the layout found before, now that the engine idles again:
            # the ratio uses the mean of the two, so that a machine that got faster or slower
            # during the steps does not tilt it
            layout = ",".join(str(limit["best"][k]) for k in ("batch", "threads", "intra", "processes"))
            try:
                after = await trio.to_thread.run_sync(measure_limit, args, challenge, [layout])
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                stderr(f"the limit after the steps could not be measured ({exc}); the ratio uses the one before")
                limit = {**limit, "limit_rps_before": limit["limit_rps"], "limit_rps_after": None}
            else:
                limit = bracket_limit(limit, after)
        summary = _summary(rows, limit, gen, challenge, args)
    finally:
        if gen.engine is not None:
            code = await trio.to_thread.run_sync(gen.engine.stop)
            summary["engine_exit_code"] = code
    return summary


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


def _summary(rows: list[dict[str, Any]], limit: dict[str, Any] | None, gen: Generator, challenge: bool, args: argparse.Namespace) -> dict[str, Any]:
    limit_rps = limit["limit_rps"] if limit else None
    named = {r["step"]: r for r in rows}
    best = max(rows, key=lambda r: r["throughput_rps"])
    throughput = named["saturation"]["throughput_rps"] if "saturation" in named else best["throughput_rps"]
    at80 = named.get("80%", best)
    errors: Counter[str] = Counter()
    for r in rows:
        errors.update(r["errors"])
    gen_share = [r["cpu"].get("generator_cpu_share") for r in rows if r["cpu"].get("generator_cpu_share") is not None]
    out: dict[str, Any] = {
        "throughput_rps": throughput,
        "limit_rps": limit_rps,
        "ratio": round(throughput / limit_rps, 3) if limit_rps else None,
        "limit_rps_before_after": [limit["limit_rps_before"], limit["limit_rps_after"]] if limit and "limit_rps_before" in limit else None,
        "offered_rps": named["saturation"]["offered_rps"] if "saturation" in named else best["offered_rps"],
        "p50_ms": at80["p50_ms"],
        "p99_ms": at80["p99_ms"],
        "latency_at": at80["step"],
        "overloaded": sum(r["overloaded"] for r in rows),
        "unanswered": sum(r["unanswered"] for r in rows),
        "errors": dict(errors),
        "residents": len(gen.residents),
        "relying_parties": len(gen.rps),
        "challenge_check": challenge,
        "generator_cpu_share_max": max(gen_share) if gen_share else None,
    }
    if limit and "best" in limit:
        # CPU per verification does not depend on how much of the shared machine each got
        out["limit_layout"] = {k: limit["best"][k] for k in ("batch", "threads", "intra", "processes")}
        out["limit_cpu_share"] = limit["best"].get("cpu_share")
        out["limit_cpu_ms_per_verification"] = limit["best"]["cpu_ms_per_verification"]
        sat = named.get("saturation", best)
        engine_ms = sat.get("engine_cpu_ms_per_verification")
        if engine_ms:
            # On a shared machine the wall-clock ratio mostly says how much CPU each side got;
            # CPU per verification says how much work the engine adds to the models' own.
            out["engine_cpu_share"] = sat["cpu"].get("engine_cpu_share")
            out["engine_cpu_ms_per_verification"] = engine_ms
            out["cpu_efficiency"] = round(limit["best"]["cpu_ms_per_verification"] / engine_ms, 3)
    if "saturation" in named and limit_rps:
        out["checks"] = {
            "saturation_ratio_ge_0.90": {
                "value": out["ratio"],
                "cpu_efficiency": out.get("cpu_efficiency"),
                "limit_cpu_share": out.get("limit_cpu_share"),
                "engine_cpu_share": out.get("engine_cpu_share"),
                "pass": out["ratio"] is not None and out["ratio"] >= 0.90,
            },
        }
        if "80%" in named:
            p99 = named["80%"]["p99_ms"]
            out["checks"]["p99_le_1s_at_80pct"] = {"value_ms": p99, "pass": p99 is not None and p99 <= 1000.0}
        if "200%" in named:
            s2 = named["200%"]
            good = s2["throughput_rps"] / throughput if throughput else 0.0
            over_ok = s2["overloaded_p99_ms"] is None or s2["overloaded_p99_ms"] <= 100.0
            out["checks"]["overload_at_2x"] = {
                "goodput_vs_capacity": round(good, 3),
                "overloaded": s2["overloaded"],
                "overloaded_p99_ms": s2["overloaded_p99_ms"],
                "unanswered": s2["unanswered"],
                "other_errors": {k: v for k, v in s2["errors"].items() if k != "overloaded"},
                "pass": good >= 0.90 and over_ok and s2["unanswered"] == 0,
            }
    out["steps"] = rows
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # x: the arrival rate the step really produced (Poisson: near the nominal rate, not equal)
    rows = sorted(summary["steps"], key=lambda r: r["arrived_rps"])
    x = [r["arrived_rps"] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    a.plot(x, [r["throughput_rps"] for r in rows], "o-", label="throughput (answered verifications/s)")
    top = max(x + [r["throughput_rps"] for r in rows]) * 1.1
    a.plot([0, top], [0, top], ":", color="grey", label="offered")
    if summary.get("limit_rps"):
        a.axhline(summary["limit_rps"], color="red", linestyle="--", label=f"model-bound limit {summary['limit_rps']:.2f}/s")
    a.set_ylabel("verifications / s")
    a.legend(loc="upper left", fontsize=8)
    a.grid(alpha=0.3)
    for key, style, label in (("p50_ms", "o-", "p50"), ("p99_ms", "s-", "p99"), ("overloaded_p99_ms", "^--", "overloaded answer p99")):
        pts = [(r["arrived_rps"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            b.plot(*zip(*pts), style, label=label)
    b.axhline(1000, color="red", linestyle=":", linewidth=1, label="1 s")
    b.set_yscale("log")
    b.set_xlabel("offered load (arrivals / s, Poisson)")
    b.set_ylabel("latency (ms)")
    b.legend(loc="best", fontsize=8)
    b.grid(alpha=0.3, which="both")
    fig.suptitle(f"netid-engine under load ({os.cpu_count()} cores, challenge check {'on' if summary.get('challenge_check') else 'off'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    summary = trio.run(run, args, work)
    plot_path = args.plot or work / "load.png"
    plot(summary, plot_path)
    summary["plot"] = str(plot_path)
    emit({"summary": {k: v for k, v in summary.items() if k != "steps"}})
    _human(summary)
    return 0


def _human(s: dict[str, Any]) -> None:
    print(
        f"LOAD throughput {s['throughput_rps']:.2f}/s {'at saturation' if 'checks' in s else 'at the best step'} (offered {s['offered_rps']:.2f}/s); "
        f"limit {s['limit_rps'] if s['limit_rps'] is None else format(s['limit_rps'], '.2f')}/s"
        f"{' (before/after: {} / {})'.format(*s['limit_rps_before_after']) if s.get('limit_rps_before_after') else ''}; ratio {s['ratio']}; "
        f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms at {s['latency_at']}; overloaded {s['overloaded']}; "
        f"unanswered {s['unanswered']}; errors {s['errors']}; generator CPU at most {100 * (s['generator_cpu_share_max'] or 0):.1f} % of the machine"
    )
    if s.get("cpu_efficiency"):
        print(
            f"  CPU per verification: limit {s['limit_cpu_ms_per_verification']} ms, engine {s['engine_cpu_ms_per_verification']} ms "
            f"(efficiency {s['cpu_efficiency']}); machine share while measuring: limit {s['limit_cpu_share']}, engine {s['engine_cpu_share']}"
        )
    for name, check in s.get("checks", {}).items():
        print(f"  check {name}: {'PASS' if check['pass'] else 'FAIL'} {({k: v for k, v in check.items() if k != 'pass'})}")
    print(f"  plot: {s['plot']}; engine exit code {s.get('engine_exit_code')}")


if __name__ == "__main__":
    sys.exit(main())
