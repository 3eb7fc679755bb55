"""``netid bench idle``: thousands of idle and slow connections against one engine.

The engine is ``engine.bench.fakeserve`` (the real server and limits, the fake extractor) in a
subprocess; this process raises its open-files limit to the hard limit first, and the engine
inherits it.

1. **Cost of a connection.** ``--connections`` clients connect, read ``hello``, ping once; the
   engine's RSS before and after gives its memory per idle connection.
2. **Abuse.** For ``--seconds``, as many clients keep the engine busy, each reconnecting a
   second after the engine closes it: silent ones, ones that ping once and stay silent, ones
   that send the header of a maximum-size frame and 64 KiB of it then a byte a second, and ones
   that send a ping then a byte a second. Meanwhile, every ``--every`` seconds a relying party
   connects, authenticates and opens a session, and an enrolled holder verifies on it.
3. **Report.** One JSON line: relying-party rounds and failures, their latency, the peak of
   the engine's partly-received-frame bytes (``netid_partial_frame_bytes``, sampled from its
   metrics) against the budget, the connections the engine closed by reason, RSS; and a
   human summary.
"""

from __future__ import annotations

import argparse
import resource
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import nacl.public
import nacl.signing
import trio

from ._common import emit, latency_summary, stderr
from ._engine import EngineProcess
from .fuzz import rss_kib

__all__ = ["main"]

_PING = msgspec.msgpack.encode({"type": "ping", "id": 1})
_PING_FRAME = struct.pack(">I", len(_PING)) + _PING


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _metric(url: str, name: str) -> float | None:
    from engine.ops.top import scrape

    try:
        snap = await trio.to_thread.run_sync(scrape, url)
    except OSError:
        return None
    values = snap.series(name)
    return sum(values.values()) if values else None


async def open_quiet(port: int, n: int, held: list) -> int:
    """``n`` connections that read hello and ping once; kept open in ``held``. Returns how many."""
    limit = trio.Semaphore(200)

    async def one() -> None:
        async with limit:
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.receive_some(4096)
                await s.send_all(_PING_FRAME)
                await s.receive_some(4096)
                held.append(s)
            except OSError:
                pass

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return len(held)


async def attacker(port: int, kind: str, max_frame: int, counts: Counter) -> None:
    while True:
        try:
            s = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            counts["connect_failed"] += 1
            await trio.sleep(1.0)
            continue
        counts[f"{kind}_connects"] += 1
        try:
            async with trio.open_nursery() as nursery:

                async def sender() -> None:
                    if kind == "silent":
                        return
                    await s.send_all(_PING_FRAME)
                    if kind == "ping_idle":
                        return
                    if kind == "partial":
                        await s.send_all(struct.pack(">I", max_frame) + b"\0" * 65536)
                    else:  # trickle: a frame header then a byte a second
                        await s.send_all(struct.pack(">I", 1000))
                    while True:
                        await trio.sleep(1.0)
                        await s.send_all(b"\0")

                nursery.start_soon(sender)
                while await s.receive_some(65536):
                    pass
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(s)
        await trio.sleep(1.0)


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from engine.wire.client import open_holder, open_relying_party

    nofile = raise_nofile()
    sets = [a for s in args.engine_set for a in ("--set", s)] + (["--nofile", str(args.engine_nofile)] if args.engine_nofile else [])
    eng = EngineProcess(work / "engine-data", module="engine.bench.fakeserve", serve_args=sets, log_path=work / "engine.log").start()
    data = work / "engine-data"
    rp_sign = nacl.signing.SigningKey((data / "fuzz-rp.sign.key").read_bytes())
    rp_box = nacl.public.PrivateKey((data / "fuzz-rp.box.key").read_bytes())
    out: dict[str, Any] = {"nofile": args.engine_nofile or nofile, "connections": args.connections}
    try:
        url = eng.metrics_url
        budget = await _metric(url, "netid_partial_frame_bytes")  # present from the start
        device = nacl.signing.SigningKey.generate()
        async with open_holder("127.0.0.1", eng.port, device_key=device) as phone:
            cred = (await phone.enroll("C1", [b"FACE:alice:1"], [f"VOICE:alice:enroll:{n}".encode() for n in (1, 2, 3)])).credential_id
        await trio.sleep(1.0)
        rss0 = rss_kib(eng.pid)
        held: list = []
        t = time.monotonic()
        opened = await open_quiet(eng.port, args.connections, held)
        await trio.sleep(1.0)
        rss1 = rss_kib(eng.pid)
        out.update(quiet_opened=opened, quiet_open_seconds=round(time.monotonic() - t, 1), rss_before_mib=round(rss0 / 1024, 1),
                   rss_quiet_mib=round(rss1 / 1024, 1), kib_per_connection=round((rss1 - rss0) / max(opened, 1), 1),
                   engine_connections=await _metric(url, "netid_connections"))
        for s in held:
            await trio.aclose_forcefully(s)
        stderr(f"  {opened} quiet connections: engine RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, {out['kib_per_connection']} KiB each")

        counts: Counter = Counter()
        rounds: list[float] = []
        failures: Counter = Counter()
        peak = {"frame_bytes": 0.0, "rss_kib": rss1, "connections": 0.0}
        kinds = ["silent"] * 4 + ["ping_idle"] * 3 + ["partial"] * 2 + ["trickle"]
        async with trio.open_nursery() as nursery:
            for k in range(args.connections):
                nursery.start_soon(attacker, eng.port, kinds[k % len(kinds)], args.max_frame, counts)
                if k % 500 == 499:
                    await trio.sleep(0.2)
            deadline = trio.current_time() + args.seconds
            while trio.current_time() < deadline:
                await trio.sleep(args.every)
                t0 = trio.current_time()
                try:
                    with trio.fail_after(10):
                        async with open_relying_party("127.0.0.1", eng.port, rp_id="fuzz-rp", signing_key=rp_sign, box_key=rp_box) as rp:
                            session = await rp.open_session()
                            async with open_holder("127.0.0.1", eng.port, device_key=device) as phone:
                                qr = phone.scan(session.qr)
                                mine = await phone.verify(cred, qr, face=b"FACE:alice:9", voice=f"VOICE:alice:{qr.challenge}:9".encode())
                            assert mine.outcome == "pass"
                    rounds.append(trio.current_time() - t0)
                except Exception as exc:  # counted, never fatal to the run
                    failures[type(exc).__name__ + ":" + str(getattr(exc, "code", ""))] += 1
                peak["frame_bytes"] = max(peak["frame_bytes"], await _metric(url, "netid_partial_frame_bytes") or 0.0)
                peak["connections"] = max(peak["connections"], await _metric(url, "netid_connections") or 0.0)
                peak["rss_kib"] = max(peak["rss_kib"], rss_kib(eng.pid))
            closed = {}
            from engine.ops.top import scrape

            snap = await trio.to_thread.run_sync(scrape, url)
            for labels, v in snap.series("netid_connections_closed_total").items():
                closed[dict(labels).get("reason", "?")] = int(v)
            nursery.cancel_scope.cancel()
        out.update(
            rp_rounds=len(rounds) + sum(failures.values()), rp_ok=len(rounds), rp_failures=dict(failures),
            rp_round_latency=latency_summary(rounds), peak_partial_frame_mib=round(peak["frame_bytes"] / 2**20, 1),
            frame_budget_mib=round(args.frame_budget / 2**20, 1), peak_connections=peak["connections"],
            peak_rss_mib=round(peak["rss_kib"] / 1024, 1), attacker_connects=dict(counts), closed_by_reason=closed, initial_budget_gauge=budget,
        )
    finally:
        out["engine_exit_code"] = eng.stop()
    out["pass"] = out["rp_failures"] == {} and out["rp_ok"] > 0 and out["peak_partial_frame_mib"] <= out["frame_budget_mib"]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netid bench idle", description="Thousands of idle and slow connections; relying parties must still get through.")
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--every", type=float, default=2.0, help="seconds between relying-party rounds")
    p.add_argument("--engine-set", action="append", default=[], metavar="FIELD=VALUE", help="engine configuration override")
    p.add_argument("--engine-nofile", type=int, default=None, help="the engine's open-files limit (default: this process's, raised to the hard limit)")
    p.add_argument("--workdir", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    from engine.config import LimitsConfig

    args = build_parser().parse_args(argv)
    args.max_frame, args.frame_budget = LimitsConfig.max_frame, LimitsConfig.frame_budget
    for s in args.engine_set:
        key, _, value = s.partition("=")
        if key == "limits.max_frame":
            args.max_frame = int(value)
        if key == "limits.frame_budget":
            args.frame_budget = int(value)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="netid-idle-"))
    work.mkdir(parents=True, exist_ok=True)
    stderr(f"netid bench idle: {args.connections} connections for {args.seconds:.0f} s, work dir {work}")
    out = trio.run(run, args, work)
    emit({"idle": out})
    lat = out["rp_round_latency"]
    print(
        f"IDLE {'PASS' if out['pass'] else 'FAIL'} {args.connections:,} idle or slow connections (open-files limit {out['nofile']:,}): "
        f"{out['kib_per_connection']} KiB of engine memory per quiet connection; relying-party rounds {out['rp_ok']}/{out['rp_rounds']} "
        f"(connect, auth, open_session, verify: p50 {lat['p50_ms']} ms, max {lat['max_ms']} ms; failures {out['rp_failures']}); "
        f"partly received frames peaked at {out['peak_partial_frame_mib']} MiB of a {out['frame_budget_mib']} MiB budget; "
        f"engine RSS peak {out['peak_rss_mib']} MiB; closed by the engine: {out['closed_by_reason']}"
    )
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
