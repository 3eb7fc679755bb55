"""The load generator of ``netid bench load`` (and ``netid bench soak``): residents and relying
parties, their set-up against the engine, Poisson arrivals of verifications, and one step's row.

A step (:func:`run_step`) offers Poisson arrivals (:func:`arrival_times`) for a given number
of seconds; each arrival is a relying party opening a session and a holder's phone answering
it (:func:`verification`). :func:`summarise` turns the step's outcomes and the engine's
``/metrics`` before and after it into one JSON row.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing
import trio

from ._common import (
    DIGIT_SPEAKERS,
    LIVE_TAKES,
    CpuClock,
    Person,
    digit_voices,
    latency_summary,
    parse_mix,
    pct,
    services_cpu_seconds,
    stderr,
)
from ._engine import EngineProcess, netid
from engine.cli.demo import ENROLL_RECORDINGS

__all__ = [
    "Outcome", "Resident", "RelyingParty", "Step", "Generator", "prepare_data", "enroll_all", "verification",
    "arrival_times", "run_step", "summarise", "measure_idle",
]

#: Seconds the database servers' idle CPU is measured before the steps (``--store postgresql:``).
IDLE_SECONDS = 10.0


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
        #: every node of a cluster (``--nodes``): the first is ``engine``/``host``/``port``
        self.engines: list[EngineProcess] = []
        #: the store's operator flags (``--store URL``), for the registry import and relying parties
        self.store_args: list[str] = []
        #: the database servers' pids (a PostgreSQL store, Redis state), for their CPU
        self.services: tuple[int, ...] = ()
        #: CPU seconds per second the services spend with the nodes up and idle (their own
        #: timers, the nodes' health checks and subscriber wake-ups): not per verification
        self.services_idle_cpu: float = 0.0
        #: the same for the nodes' layers (netid_layer_cpu_seconds_total), by layer; None
        #: until measured
        self.layer_idle_cpu: dict[str, float] | None = None
        self.connections: Any = None  # AsyncExitStack of the long-lived connections

    def node(self, k: int) -> tuple[str, int]:
        """Address of node ``k`` (modulo the number of nodes)."""
        if not self.engines:
            return self.host, self.port
        return "127.0.0.1", self.engines[k % len(self.engines)].port

    @property
    def metrics_urls(self) -> list[str]:
        return [e.metrics_url for e in self.engines] if self.engines else [self.metrics_url] if self.metrics_url else []

    @property
    def engine_pids(self) -> tuple[int, ...]:
        if self.engines:
            return tuple(e.pid for e in self.engines)
        if self.engine is not None:
            return (self.engine.pid,)
        return (self.args.engine_pid,) if getattr(self.args, "engine_pid", None) else ()

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
    report = netid("registry", "import", str(registry), "--data", str(data_dir), *gen.store_args)
    refused = {c["card_number"] for c in report.get("refused", [])}
    if refused:
        stderr(f"  registry refused {len(refused)} card photos: {sorted(refused)}")
        gen.residents = [r for r in gen.residents if r.person.card_number not in refused]
    keys = work / "keys"
    for k in range(gen.args.relying_parties):
        rp_id = f"load-{run_tag}-{k}"
        netid("rp", "add", "--id", rp_id, "--name", f"Load test {k}", "--quota", "1000000", "--keys-out", str(keys), "--data", str(data_dir), *gen.store_args)
        gen.rps.append(
            RelyingParty(rp_id, nacl.signing.SigningKey((keys / f"{rp_id}.sign.key").read_bytes()), nacl.public.PrivateKey((keys / f"{rp_id}.box.key").read_bytes()))
        )


async def enroll_all(gen: Generator, rng: random.Random) -> dict[str, int]:
    from engine.wire.client import open_holder
    from engine.errors import EngineError

    refused: Counter[str] = Counter()
    limit = trio.Semaphore(3)

    async def one(k: int, r: Resident) -> None:
        host, port = gen.node(k)
        async with limit:
            voices = [gen.enroll_voices.say(r.person.speaker, "".join(rng.choice("0123456789") for _ in range(8)), rng) for _ in range(ENROLL_RECORDINGS)]
            for attempt in range(20):
                try:
                    async with open_holder(host, port, device_key=r.key) as phone:
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
        for k, r in enumerate(gen.residents):
            n.start_soon(one, k, r)
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
    from engine.ops.top import Snapshot

    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    before: Snapshot | None = await _scrape(gen)
    clock = CpuClock(other_pids=gen.engine_pids, services=gen.services)
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


async def measure_idle(gen: Generator, seconds: float = IDLE_SECONDS) -> None:
    """CPU seconds per second of the database servers and of the nodes' layers (store,
    state, match) while nothing is offered (their timers: health probes, re-sends, the subscriber's
    wake-ups), so that a step's figures per verification are what its verifications added."""
    from engine.ops.top import _by, _delta

    before = await _scrape(gen)
    t0, c0 = time.perf_counter(), services_cpu_seconds(gen.services)
    await trio.sleep(seconds)
    wall = time.perf_counter() - t0
    gen.services_idle_cpu = (services_cpu_seconds(gen.services) - c0) / wall
    after = await _scrape(gen)
    gen.layer_idle_cpu = {}
    if before is not None and after is not None:
        gen.layer_idle_cpu = {k: v / max(after.at - before.at, 1e-3) for k, v in _by(_delta(before, after, "netid_layer_cpu_seconds_total"), "layer").items()}


async def _scrape(gen: Generator):
    """Every node's ``/metrics``, summed (None if a node could not be read)."""
    from engine.ops.top import Snapshot, scrape

    if not gen.metrics_urls:
        return None
    try:
        snaps = [await trio.to_thread.run_sync(scrape, url) for url in gen.metrics_urls]
    except OSError:
        return None
    samples: dict = {}
    for snap in snaps:
        for key, value in snap.samples.items():
            samples[key] = samples.get(key, 0.0) + value
    return Snapshot(at=snaps[-1].at, samples=samples, ready=all(s.ready for s in snaps))


def summarise(step: Step, t0: float, outcomes: list[Outcome], before, after, cpu: dict, gen: Generator) -> dict[str, Any]:
    from engine.ops.top import _buckets, _by, _delta, histogram_quantile

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
        model_s = _by(_delta(before, after, "netid_model_seconds_sum"), "model")
        if results and model_s:  # wall time in the models' calls: what a CPU rise is made of
            row["model_ms_per_verification"] = {k: round(1000 * v / len(results), 1) for k, v in sorted(model_s.items())}
        layers = _by(_delta(before, after, "netid_layer_cpu_seconds_total"), "layer")
        if results and layers:
            # what the verifications added to the layers' idle rate, per verification
            idle = getattr(gen, "layer_idle_cpu", None) or {}
            wall = after.at - before.at  # the layers' counters cover the scrapes' interval
            row["layer_cpu_ms_per_verification"] = {k: _added_ms(v, idle.get(k, 0.0), wall, len(results)) for k, v in sorted(layers.items())}
            if idle:
                row["layer_cpu_raw_ms_per_verification"] = {k: round(1000 * v / len(results), 2) for k, v in sorted(layers.items())}
                row["layer_idle_cpu_ms_per_s"] = {k: round(1000 * v, 2) for k, v in sorted(idle.items())}
    engine_cpu = cpu.get("engine_cpu_s")
    if engine_cpu is not None and len(results):
        row["engine_cpu_ms_per_verification"] = round(1000 * engine_cpu / len(results), 1)
    if cpu.get("services_cpu_s") is not None and len(results):
        # what the verifications added to the services' idle rate, per verification
        row["services_cpu_ms_per_verification"] = _added_ms(cpu["services_cpu_s"], getattr(gen, "services_idle_cpu", 0.0),
                                                             cpu.get("wall_s") or 0.0, len(results))
        row["services_cpu_raw_ms_per_verification"] = round(1000 * cpu["services_cpu_s"] / len(results), 2)
        row["services_idle_cpu_ms_per_s"] = round(1000 * getattr(gen, "services_idle_cpu", 0.0), 2)
    return row


def _added_ms(spent: float, idle_rate: float, seconds: float, n: int) -> float:
    """Milliseconds per verification of ``spent`` CPU seconds above ``idle_rate`` per second."""
    return round(1000 * max(0.0, spent - idle_rate * seconds) / n, 2)


def _ms(x: float) -> float | None:
    return None if math.isnan(x) else round(1000 * x, 1)


# ---- connections ------------------------------------------------------------------------------
async def _connect_all(gen: Generator) -> None:
    """Long-lived connections: one per relying party, one per holder's phone."""
    from contextlib import AsyncExitStack

    from engine.wire.client import open_holder, open_relying_party

    gen.connections = stack = AsyncExitStack()
    for k, rp in enumerate(gen.rps):
        host, port = gen.node(k)
        rp.client = await stack.enter_async_context(open_relying_party(host, port, rp_id=rp.rp_id, signing_key=rp.sign, box_key=rp.box))
    for k, r in enumerate(gen.residents):
        # spread over the nodes apart from the relying parties: on N nodes, (N - 1) / N of the
        # sessions are opened on one node and verified on another
        host, port = gen.node(k + 1)
        r.phone = await stack.enter_async_context(open_holder(host, port, device_key=r.key))


async def _route_pushes(gen: Generator, rp: RelyingParty) -> None:
    async for result in rp.client.results():
        gen.pushed[result.session_id] = result.outcome
