"""The soak's side load, in a process of its own: fuzzing connections and idle clients.

``netid bench soak`` starts it with ``python -m engine.bench.side_load`` next to the engine.
It runs ``netid bench fuzz``'s generator on ``--fuzz-connections`` connections (as the
relying party ``--rp-id``, so that signed frames get past the handshake) and ``--idle``
clients that connect, ping once and stay silent (the engine closes them after its idle
timeout; they connect again). Its own process, so that generating malformed frames never
delays the event loop that schedules the soak's verifications and times their answers:
an attacker's CPU is not the measuring client's. Every ``--every`` seconds, and once at the
end, it replaces ``--stats`` (JSON: the fuzz counters and the idle clients' connects).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import nacl.signing
import trio

from .fuzz import Stats, fuzz
from .idle import attacker

__all__ = ["idle_clients", "main", "read_stats"]


async def idle_clients(port: int, count: int, counts: Counter) -> None:
    """``count`` clients that connect, ping once and stay silent; they connect again a second
    after the engine closes them (``ping_idle_connects``, ``connect_failed`` in ``counts``)."""

    async def one(k: int) -> None:
        await trio.sleep(k * 0.01)
        await attacker(port, "ping_idle", 0, counts)

    async with trio.open_nursery() as n:
        for k in range(count):
            n.start_soon(one, k)


def _write(path: Path, st: Stats, idle: Counter) -> None:
    out = {k: v for k, v in st.as_dict().items() if k not in ("kinds", "samples")}
    out["idle"] = {"connects": idle["ping_idle_connects"], "connect_failed": idle["connect_failed"]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)


def read_stats(path: Path) -> dict[str, Any]:
    """The side load's last counters (empty before it first wrote them)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


async def run(args: argparse.Namespace) -> None:
    st = Stats()
    idle: Counter = Counter()
    key = nacl.signing.SigningKey(args.rp_key.read_bytes())

    async def report() -> None:
        while True:
            _write(args.stats, st, idle)
            await trio.sleep(args.every)

    try:
        # fuzzing stops by itself after ``seconds`` once its frames in flight are answered
        with trio.move_on_after(args.seconds + (60.0 if args.fuzz_connections else 0.0)):
            async with trio.open_nursery() as n:
                n.start_soon(report)
                if args.idle:
                    n.start_soon(idle_clients, args.port, args.idle, idle)
                if args.fuzz_connections:
                    await fuzz(args.port, args.seconds, args.seed, connections=args.fuzz_connections, rp_id=args.rp_id,
                               rp_key=key, max_frame=args.max_frame, st=st)
                    n.cancel_scope.cancel()
    finally:
        _write(args.stats, st, idle)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench.side_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--fuzz-connections", type=int, default=1)
    p.add_argument("--idle", type=int, default=200)
    p.add_argument("--rp-id", required=True)
    p.add_argument("--rp-key", type=Path, required=True, help="the relying party's signing key file (--keys-out)")
    p.add_argument("--max-frame", type=int, default=8 * 1024 * 1024)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--every", type=float, default=2.0)
    args = p.parse_args(argv)
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
