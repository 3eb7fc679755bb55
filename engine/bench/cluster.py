"""``netid bench cluster``: several engine nodes on one PostgreSQL and one Redis, a mixed load,
one node SIGKILLed and one Redis restart; what was unanswered, lost or accepted twice.

What it does, in one run:

1. **Set-up.** A PostgreSQL schema and a Redis key prefix of its own, ``netid_bench_<random>``
   (engine/bench/services.py), both removed at the end. With the real models: an ID-card registry of
   chimeric residents and ``--relying-parties`` relying parties, with ``netid bench load``'s
   own functions (engine/bench/load_steps.py) and the operator commands on that store; then
   ``--nodes`` ``netid serve`` processes sharing one data directory (the engine's keys and
   the template key), the store and the state; every resident enrolled from its own phone.
   With ``--fake``: the nodes run engine/bench/fakeserve.py (the fake extractors, its card
   ``C1`` and relying party ``fuzz-rp``), a quick check of the harness itself.
2. **Load.** For ``--minutes``, Poisson arrivals at ``--rps`` of ``--mix`` (genuine holders,
   another person's face, another speaker's voice, the wrong digits), as ``netid bench load``
   sends them: a relying party opens a session and a holder's phone answers it. Relying
   parties connect with the fail-over client, given every node (each starting at another);
   each phone holds a connection to a node of its own (so a session is opened on one node
   and mostly verified on another), and when that connection drops it moves to another node
   and sends a verify caught by the drop again there. Every verify answered ``pass`` or
   ``fail`` is replayed, the same frame, to another node a moment later.
3. **Failures.** At ``--kill-at`` (1/3) of the run the node most relying parties are connected
   to is SIGKILLed (as soon as a verify is in flight on it, waiting at most 5 s); at ``--restart-at`` (1/2) it is started again on the same ports
   (``--no-node-restart``: it stays down). At ``--redis-at`` (2/3) Redis is shut down without
   saving (``redis-cli shutdown nosave``) and started again as CI starts it
   (:data:`REDIS_START`); it is started whatever happens before the run ends.
4. **Report.** One JSON line ``{"cluster": ...}`` and a human summary: arrivals, answers
   (pass/fail per kind), errors by code (``unavailable`` and ``overloaded`` during the
   failures are answers, counted), *unanswered* (no answer within ``--answer-timeout``),
   *lost results* (a verify answered pass/fail whose result reached its relying party
   neither pushed nor by ``fetch_result`` at the end), *nonces accepted twice* (replays
   answered with a result), *results delivered twice* (at-least-once delivery: counted, not
   an error), p50/p99 latency from each arrival's scheduled time to the holder's answer, and
   when the kill and the Redis restart happened. Checks: the three counts are 0.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nacl.public
import nacl.signing
import trio

from ..errors import DeadlineExceeded, EngineError, Overloaded, Unavailable
from ._common import DEFAULT_MIX, Person, data_root, emit, latency_summary, load_people, parse_mix, screen_people, stderr
from ._engine import EngineProcess
from .load_steps import Generator, Outcome, RelyingParty, Resident, arrival_times, enroll_all, prepare_data, verification
from .services import RunServices

__all__ = ["REDIS_START", "redis_start_command", "redis_answers", "start_redis", "run", "main"]

_DROPPED = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
#: answers that decide nothing about a replay: it is sent again a little later
_RETRY = (Unavailable, Overloaded, DeadlineExceeded)


# ---- Redis, stopped and started as CI does -------------------------------------------------------
def redis_start_command(port: int = 6379) -> list[str]:
    """How CI starts Redis: loopback only, nothing kept on disk."""
    return ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]


REDIS_START = redis_start_command()


def redis_answers(url: str) -> bool:
    import redis

    from engine.state.redis import parse_state_url

    client = redis.Redis.from_url(parse_state_url(url)[0], socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def start_redis(url: str) -> None:
    """Start Redis as CI does (on ``url``'s port), unless it answers already; wait until it answers PING."""
    if not redis_answers(url):
        subprocess.run(redis_start_command(urlsplit(url).port or 6379), check=True, timeout=10, capture_output=True)
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if time.monotonic() > deadline:
            raise RuntimeError("Redis did not come back within 10 s")
        time.sleep(0.1)


def _shut_down_redis(url: str) -> None:
    parts = urlsplit(url)
    subprocess.run(["redis-cli", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379), "shutdown", "nosave"], timeout=10, capture_output=True)
    deadline = time.monotonic() + 10
    while redis_answers(url) and time.monotonic() < deadline:
        time.sleep(0.1)


# ---- phones that move to another node --------------------------------------------------------------
class Phone:
    """A resident's phone: one connection to one node at a time. When it drops (the node died)
    or cannot be made, the phone moves to another node; a verify caught by the drop is sent
    again, the same request, on the new connection."""

    def __init__(self, key: nacl.signing.SigningKey, addresses: list[tuple[str, int]], node: int, rng: random.Random, busy: Counter[int]) -> None:
        self.key, self.addresses, self.node, self.rng = key, addresses, node, rng
        self.busy = busy  # verifies in flight, by node (shared by the phones)
        self.holder: Any = None
        self._changed = trio.Event()
        self.reconnects = 0
        self.resent = 0
        #: what was answered with a result, by session id: (credential id, QR, face, voice, node that answered)
        self.answered: dict[str, tuple[str, Any, bytes, bytes, int]] = {}

    def _switch(self, holder: Any) -> None:
        self.holder = holder
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def run(self) -> None:
        from engine.wire.client import open_holder

        while True:
            try:
                async with open_holder(*self.addresses[self.node], device_key=self.key) as holder:
                    self._switch(holder)
                    async for _ in holder.conn.pushes:  # nothing is pushed to a phone: this waits for the drop
                        pass
            except (*_DROPPED, EngineError):
                pass
            self._switch(None)
            self.reconnects += 1
            self.node = self.rng.choice([k for k in range(len(self.addresses)) if k != self.node])
            await trio.sleep(0.2)

    async def verify(self, credential_id: str, qr: Any, *, face: bytes, voice: bytes) -> Any:
        while True:
            holder, node = self.holder, self.node
            if holder is not None:
                self.busy[node] += 1
                try:
                    result = await holder.verify(credential_id, qr, face=face, voice=voice)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.resent += 1
                else:
                    self.answered[qr.session_id] = (credential_id, qr, face, voice, node)
                    return result
                finally:
                    self.busy[node] -= 1
            while self.holder is holder:
                await self._changed.wait()


# ---- the fake extractors' residents -----------------------------------------------------------------
class FakeResidents:
    """What :class:`~engine.bench.load_steps.Generator` gives the load, for nodes with the fake
    extractors (engine/bench/fakeserve.py): card ``C1`` (alice), faces ``FACE:<who>:<n>``,
    recordings ``VOICE:<who>:<said>:<n>``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        faces = [f"FACE:alice:{n}".encode() for n in range(1, 9)]
        self.residents = [Resident(Person("C1", "Alice", Path("a.jpg"), faces[:2], faces[2:], "alice"))]
        self.rps: list[RelyingParty] = []
        self.host, self.port = "127.0.0.1", 0
        self.engines: list[EngineProcess] = []
        self.enroll_voices = self
        mix = parse_mix(args.mix)
        self.kinds, self.weights = list(mix), list(mix.values())

    def node(self, k: int) -> tuple[str, int]:
        return "127.0.0.1", self.engines[k % len(self.engines)].port

    def say(self, speaker: str, said: str, rng: random.Random) -> bytes:
        return f"VOICE:{speaker}:{said}:{rng.randrange(10**6)}".encode()

    def payload(self, kind: str, r: Resident, challenge: str, rng: random.Random) -> tuple[bytes, bytes]:
        said = challenge
        while kind == "wrong_words" and said == challenge:
            said = "".join(rng.choice("0123456789") for _ in challenge)
        face = f"FACE:{'bob' if kind == 'impostor_face' else 'alice'}:{rng.randrange(10**6)}".encode()
        return face, self.say("bob" if kind == "impostor_voice" else "alice", said, rng)


# ---- set-up -------------------------------------------------------------------------------------------
class Cluster:
    """The nodes, the run's counters and its timeline."""

    def __init__(self, args: argparse.Namespace, work: Path, services: RunServices) -> None:
        self.args, self.work, self.services = args, work, services
        self.state_url = services.state
        self.data_dir = work / "engine-data"
        self.nodes: list[EngineProcess] = []
        self.alive: set[int] = set()
        self.outcomes: list[Outcome] = []
        self.rp_of: dict[str, RelyingParty] = {}
        self.pushed: dict[str, list[str]] = defaultdict(list)
        self.replays: Counter[str] = Counter()
        self.crossed = 0  # verified on another node than the relying party's
        self.busy: Counter[int] = Counter()  # verifies in flight, by node
        self.events: dict[str, Any] = {}
        self.lost: list[str] = []  # sessions answered pass/fail whose result never reached the relying party
        self.fetched = 0  # results that were not pushed but fetched
        self.t0 = 0.0

    def node(self, k: int, *extra: str) -> EngineProcess:
        if self.args.fake:
            serve = ["--set", f"store_url={self.services.store}", "--set", f"state_url={self.services.state}"]
        else:
            serve = [*self.services.serve_args(), *(["--no-challenge-check"] if self.args.no_challenge_check else [])]
        return EngineProcess(self.data_dir, serve_args=[*serve, *self.args.serve_arg, *extra], module="engine.bench.fakeserve" if self.args.fake else None,
                             log_path=self.work / f"node-{k}.log", ready_timeout=300.0)

    async def start_nodes(self) -> None:
        for k in range(self.args.nodes):  # one after the other: the first writes the keys, and models load faster alone
            t = time.perf_counter()
            self.nodes.append(self.node(k))
            await trio.to_thread.run_sync(self.nodes[k].start)
            self.alive.add(k)
            stderr(f"  node {k} ready on port {self.nodes[k].port} in {time.perf_counter() - t:.0f} s")

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    def since(self) -> float:
        return round(trio.current_time() - self.t0, 1)


async def _set_up(c: Cluster) -> Any:
    """Registry, relying parties, the nodes and the enrolled residents: the load's generator."""
    args = c.args
    if args.fake:
        gen = FakeResidents(args)
        await c.start_nodes()  # the first registers C1 and fuzz-rp
        keys = c.data_dir
        gen.rps = [RelyingParty("fuzz-rp", nacl.signing.SigningKey((keys / "fuzz-rp.sign.key").read_bytes()),
                                nacl.public.PrivateKey((keys / "fuzz-rp.box.key").read_bytes()))]
    else:
        root = data_root(args.data)
        people, strangers = load_people(root, args.residents, seed=args.seed)
        people, strangers = await trio.to_thread.run_sync(screen_people, people, strangers)
        gen = Generator(args, root, people, strangers)
        gen.store_args = c.services.store_args()  # the registry and the relying parties go to the cluster's schema
        await trio.to_thread.run_sync(prepare_data, gen, c.data_dir, c.work, os.urandom(3).hex())
        await c.start_nodes()
    gen.engines = c.nodes  # residents enroll on every node in turn
    gen.host, gen.port = c.addresses[0]
    refused = await enroll_all(gen, random.Random(args.seed))
    if not gen.residents:
        raise SystemExit(f"no resident could be enrolled ({refused})")
    if args.fake:  # one card: more phones of the same holder, so that phones sit on every node
        first = gen.residents[0]
        gen.residents = [Resident(first.person, first.key, first.credential_id) for _ in range(args.residents)]
    stderr(f"  {len(gen.residents)} residents enrolled ({refused or 'none refused'}), {len(gen.rps)} relying parties")
    return gen


# ---- the run ----------------------------------------------------------------------------------------
async def _arrival(c: Cluster, gen: Any, rp: RelyingParty, r: Resident, kind: str, at: float, rng: random.Random, replays: trio.Nursery) -> None:
    mine: list[Outcome] = []
    await verification(gen, rp, r, kind, at, rng, mine)
    o = mine[0]
    c.outcomes.append(o)
    c.rp_of[o.session_id] = rp
    if o.status in ("pass", "fail") and o.session_id in r.phone.answered:
        *_x, node = r.phone.answered[o.session_id]
        c.crossed += rp.client.address != c.addresses[node]
        replays.start_soon(_replay, c, r, o.session_id, random.Random(rng.random()))


async def _replay(c: Cluster, r: Resident, session_id: str, rng: random.Random) -> None:
    """The verify answered for ``session_id``, sent again to another node: refused, or a nonce
    accepted twice."""
    from engine.wire.client import open_holder

    credential_id, qr, face, voice, answered_on = r.phone.answered.pop(session_id)
    await trio.sleep(rng.uniform(0.5, 3.0))
    for _attempt in range(8):
        others = [k for k in sorted(c.alive) if k != answered_on] or sorted(c.alive)
        try:
            with trio.fail_after(c.args.answer_timeout):
                async with open_holder(*c.addresses[rng.choice(others)], device_key=r.key) as phone:
                    await phone.verify(credential_id, qr, face=face, voice=voice)
            c.replays["accepted"] += 1
            return
        except _RETRY:
            pass
        except EngineError as exc:
            c.replays[exc.code] += 1
            return
        except (*_DROPPED, trio.TooSlowError):
            pass
        await trio.sleep(3.0)  # a node down, Redis restarting: later
    c.replays["undecided"] += 1


async def _failures(c: Cluster, gen: Any, seconds: float) -> None:
    """The SIGKILL of a node, its restart, and the Redis restart, at their fractions of the run."""
    args = c.args
    if args.kill_at is not None and len(c.nodes) > 1:
        await trio.sleep_until(c.t0 + args.kill_at * seconds)
        streams = Counter(rp.client.address for rp in gen.rps)
        victim = max(sorted(c.alive), key=lambda k: (streams[c.addresses[k]], k))  # the node most relying parties are on
        port, metrics_port = c.nodes[victim].port, c.nodes[victim].metrics_port
        with trio.move_on_after(5.0):  # while it has a verify in flight, if one comes within 5 s
            while not c.busy[victim]:
                await trio.sleep(0.005)
        c.events["kill"] = {"at_s": c.since(), "node": victim, "relying_parties_on_it": streams[c.addresses[victim]], "verifies_in_flight": c.busy[victim]}
        c.alive.discard(victim)
        await trio.to_thread.run_sync(c.nodes[victim].kill)
        stderr(f"  {c.since():.0f} s: node {victim} SIGKILLed ({streams[c.addresses[victim]]} relying parties on it)")
        if args.restart_at is not None:
            await trio.sleep_until(c.t0 + args.restart_at * seconds)
            t = trio.current_time()
            again = c.node(victim, "--port", str(port), "--metrics-port", str(metrics_port))
            try:
                await trio.to_thread.run_sync(again.start)
            except RuntimeError as exc:
                c.events["node_restart"] = {"at_s": round(t - c.t0, 1), "failed": str(exc)[:300]}
            else:
                c.nodes[victim] = again
                c.alive.add(victim)
                c.events["node_restart"] = {"at_s": round(t - c.t0, 1), "ready_at_s": c.since()}
                stderr(f"  {c.since():.0f} s: node {victim} started again on port {port}")
    if args.redis_at is not None:
        await trio.sleep_until(c.t0 + args.redis_at * seconds)
        down = c.since()
        try:
            await trio.to_thread.run_sync(_shut_down_redis, c.state_url)
            await trio.sleep(args.redis_down)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(start_redis, c.state_url)
        c.events["redis_restart"] = {"down_at_s": down, "up_at_s": c.since(), "outage_s": round(c.since() - down, 1)}
        stderr(f"  {down:.0f} s: Redis shut down without saving, answering again at {c.since():.0f} s")


async def _load(c: Cluster, gen: Any) -> None:
    from engine.wire.client import open_relying_party

    args, n = c.args, len(c.nodes)
    rng = random.Random(args.seed)
    seconds = args.minutes * 60.0
    async with AsyncExitStack() as stack:
        for k, rp in enumerate(gen.rps):  # each relying party starts at another node
            hosts = c.addresses[k % n:] + c.addresses[: k % n]
            rp.client = await stack.enter_async_context(open_relying_party(hosts=hosts, rp_id=rp.rp_id, signing_key=rp.sign, box_key=rp.box))
        async with trio.open_nursery() as background:
            for rp in gen.rps:
                background.start_soon(_collect, c, rp)
            for i, r in enumerate(gen.residents):
                r.phone = Phone(r.key, c.addresses, (i + 1) % n, random.Random(rng.random()), c.busy)
                background.start_soon(r.phone.run)
            stderr(f"  {seconds:.0f} s of arrivals at {args.rps}/s on {n} nodes")
            c.t0 = trio.current_time()
            async with trio.open_nursery() as replays:
                async with trio.open_nursery() as arrivals:
                    arrivals.start_soon(_failures, c, gen, seconds)
                    for i, offset in enumerate(arrival_times(args.rps, seconds, rng)):
                        await trio.sleep_until(c.t0 + offset)
                        arrivals.start_soon(_arrival, c, gen, gen.rps[i % len(gen.rps)], rng.choice(gen.residents),
                                            rng.choices(gen.kinds, gen.weights)[0], c.t0 + offset, random.Random(rng.random()), replays)
            c.events["load_s"] = c.since()
            await _account(c)
            c.events["reconnects"] = {"phones": sum(r.phone.reconnects for r in gen.residents), "verifies_sent_again": sum(r.phone.resent for r in gen.residents),
                                      "relying_party_failovers": sum(rp.client.connections - 1 for rp in gen.rps)}
            background.cancel_scope.cancel()


async def _collect(c: Cluster, rp: RelyingParty) -> None:
    async for result in rp.client.results():
        c.pushed[result.session_id].append(result.outcome)


async def _account(c: Cluster) -> None:
    """Wait for the pushes still due (re-sent every 2 s); fetch what never came."""
    finished = {o.session_id: o.status for o in c.outcomes if o.status in ("pass", "fail")}
    with trio.move_on_after(c.args.push_wait):
        while any(sid not in c.pushed for sid in finished):
            await trio.sleep(0.5)
    for sid, status in finished.items():
        if sid in c.pushed and c.pushed[sid][0] == status:
            continue
        try:
            with trio.fail_after(c.args.answer_timeout):
                fetched = await c.rp_of[sid].client.fetch_result(sid)
            ok = fetched.outcome == status
        except (EngineError, *_DROPPED, trio.TooSlowError):
            ok = False
        c.fetched += ok
        if not ok:
            c.lost.append(sid)


def summarise(c: Cluster, gen: Any) -> dict[str, Any]:
    outs = c.outcomes
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outs:
        by_kind[o.kind][o.status if o.status in ("pass", "fail") else "error"] += 1
    errors = Counter(o.status for o in outs if o.status not in ("pass", "fail", "unanswered", "connection_lost"))
    unanswered = sum(1 for o in outs if o.status in ("unanswered", "connection_lost"))
    lat = latency_summary([o.done - o.arrival for o in outs if o.status in ("pass", "fail") and o.done is not None])
    twice = sum(1 for seen in c.pushed.values() if len(seen) > 1)
    accepted_twice = c.replays.pop("accepted", 0)
    out: dict[str, Any] = {
        "nodes": c.args.nodes, "models": "fake" if c.args.fake else "real", "minutes": c.args.minutes, "rps": c.args.rps,
        "residents": len(gen.residents), "relying_parties": len(gen.rps), "arrivals": len(outs),
        "answered": {"pass": sum(o.status == "pass" for o in outs), "fail": sum(o.status == "fail" for o in outs)},
        "outcomes": {k: dict(v) for k, v in sorted(by_kind.items())}, "errors": dict(errors.most_common()),
        "unanswered": unanswered, "lost_results": len(c.lost), "results_fetched_not_pushed": c.fetched,
        "nonces_accepted_twice": accepted_twice, "replays": {"sent": accepted_twice + sum(c.replays.values()), "refused": dict(c.replays)},
        "results_delivered_twice": twice, "verified_on_another_node": c.crossed, **lat, "events": c.events,
    }
    out["checks"] = {name: {"value": out[key], "pass": out[key] == 0}
                     for name, key in (("unanswered_0", "unanswered"), ("lost_results_0", "lost_results"), ("nonces_accepted_twice_0", "nonces_accepted_twice"))}
    return out


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    services = RunServices(args.store, args.state, os.urandom(4).hex())
    c = Cluster(args, work, services)
    stderr(f"netid bench cluster: {args.nodes} nodes ({'fake extractors' if args.fake else 'real models'}), schema {services.name}, work dir {work}")
    out: dict[str, Any] = {}
    try:
        gen = await _set_up(c)
        await _load(c, gen)
        out = summarise(c, gen)
    finally:
        with trio.CancelScope(shield=True):
            codes = [await trio.to_thread.run_sync(n.stop) if n.proc is not None else None for n in c.nodes]
            out["node_exit_codes"] = codes
            if args.redis_at is not None:  # it was restarted: it runs again, whatever happened
                await trio.to_thread.run_sync(start_redis, args.state)
            await trio.to_thread.run_sync(services.clean_up)
    out["workdir"] = str(work)
    return out


def human_summary(s: dict[str, Any]) -> None:
    ok = all(ch["pass"] for ch in s["checks"].values())
    ev = s["events"]
    kill, again, rd = ev.get("kill"), ev.get("node_restart"), ev.get("redis_restart")
    print(f"CLUSTER {'PASS' if ok else 'FAIL'} {s['nodes']} nodes ({s['models']} models), {s['minutes']:g} min at {s['rps']:g}/s: "
          f"{s['arrivals']} arrivals, {s['answered']['pass']} pass, {s['answered']['fail']} fail; errors {s['errors'] or 'none'}")
    print(f"  unanswered {s['unanswered']}, lost results {s['lost_results']} (fetched, not pushed: {s['results_fetched_not_pushed']}), "
          f"nonces accepted twice {s['nonces_accepted_twice']} of {s['replays']['sent']} replays; results delivered twice {s['results_delivered_twice']}")
    print(f"  latency p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms; by kind {s['outcomes']}")
    if kill:
        print(f"  node {kill['node']} SIGKILLed at {kill['at_s']} s ({kill['relying_parties_on_it']} relying parties on it, "
              f"{kill['verifies_in_flight']} verifies in flight); "
              + (f"started again at {again['at_s']} s, ready at {again.get('ready_at_s')} s" if again else "not started again"))
    if rd:
        print(f"  Redis shut down at {rd['down_at_s']} s, answering again at {rd['up_at_s']} s")
    print(f"  reconnections {ev.get('reconnects')}; work dir {s['workdir']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netid bench cluster", description="Several nodes on one PostgreSQL and Redis: a mixed load, a node SIGKILLed, Redis restarted.")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--rps", type=float, default=2.5, help="arrivals per second, all nodes together (default %(default)s)")
    p.add_argument("--store", default="postgresql://127.0.0.1/test", help="PostgreSQL URL; without schema= the run uses a schema of its own, dropped at the end")
    p.add_argument("--state", default="redis://127.0.0.1:6379/0", help="Redis URL; without prefix= the run uses a key prefix of its own, deleted at the end")
    p.add_argument("--fake", action="store_true", help="nodes with the fake extractors (engine.bench.fakeserve): a quick check of the harness")
    p.add_argument("--kill-at", type=float, default=1 / 3, help="fraction of the run at which a node is SIGKILLed")
    p.add_argument("--no-kill", dest="kill_at", action="store_const", const=None)
    p.add_argument("--restart-at", type=float, default=1 / 2, help="fraction of the run at which the killed node is started again")
    p.add_argument("--no-node-restart", dest="restart_at", action="store_const", const=None)
    p.add_argument("--redis-at", type=float, default=2 / 3, help="fraction of the run at which Redis is restarted")
    p.add_argument("--no-redis-restart", dest="redis_at", action="store_const", const=None)
    p.add_argument("--redis-down", type=float, default=5.0, help="seconds Redis stays down before it is started again")
    p.add_argument("--data", type=Path, default=None, help="data root with lfw/ and digits/ (default ../shared/data, else samples/)")
    p.add_argument("--residents", type=int, default=12)
    p.add_argument("--relying-parties", type=int, default=3)
    p.add_argument("--mix", default=DEFAULT_MIX)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--answer-timeout", type=float, default=30.0, help="seconds after which an arrival counts as unanswered")
    p.add_argument("--push-wait", type=float, default=20.0, help="seconds to wait after the load for results still to be pushed")
    p.add_argument("--no-challenge-check", action="store_true")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for every node (repeat)")
    p.add_argument("--workdir", type=Path, default=None, help="node logs and data (default: a new temporary directory, kept)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nodes < 1 or args.rps <= 0 or args.minutes <= 0:
        raise SystemExit("--nodes, --rps and --minutes must be positive")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="netid-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    summary = trio.run(run, args, work)
    emit({"cluster": summary})
    human_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
