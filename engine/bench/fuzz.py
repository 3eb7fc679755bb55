"""``netid bench fuzz``: malformed and valid-looking frames against a real engine over TCP.

The engine runs in a subprocess (``netid serve`` with the real models, or ``--engine fake``:
``engine.bench.fakeserve``, the same server with the fake extractor). ``--connections`` workers
each open connection after connection; on each they read ``hello``, send rounds of 1-8
well-framed bodies at once from :mod:`engine.bench._fuzzgen` (valid requests, mutated ones,
damaged encodings), and read one reply per body; then they end the connection in one of six
ways: close, half-close, abort, or a broken frame (a length over ``max_frame``, a zero
length, a cut frame), after which the engine's error frame must arrive before its close.

Counted: frames sent, answered, ``internal`` answers, connections closed (or reset) with a
well-framed body unanswered (``closed_without_error``), broken frames whose error never
arrived, requests unanswered within ``--answer-timeout``, liveness pings missed, and engine
crashes; the engine's log bytes written and its RSS (and its workers') before and after.
One JSON line a minute and a summary line on stdout, then a human summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nacl.signing
import trio

from ._common import emit, stderr
from ._engine import EngineProcess, netid
from ._fuzzgen import FrameMaker

__all__ = ["Stats", "fuzz", "rss_kib", "start_engine", "main"]

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class Stats:
    connections: int = 0
    refused: int = 0  # too_many_connections in place of hello
    sent: int = 0
    answered: int = 0
    internal: int = 0
    closed_without_error: int = 0
    broken_frames: int = 0
    broken_without_error: int = 0
    unanswered: int = 0
    liveness_missed: int = 0
    crashes: int = 0
    kinds: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)
    samples: list = field(default_factory=list)  # a few bodies that went wrong, hex

    def sample(self, what: str, body: bytes) -> None:
        if len(self.samples) < 20:
            self.samples.append({"what": what, "body": body[:200].hex()})

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not isinstance(v, (Counter, list))}
        out["codes"] = dict(self.codes.most_common())
        out["kinds"] = dict(sorted(self.kinds.items()))
        out["samples"] = self.samples
        return out


# ---- the engine --------------------------------------------------------------------------------------------
def rss_kib(pid: int, tree: bool = False) -> int:
    """Resident memory of a process (and, with ``tree``, of all its descendants), KiB."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            if tree:
                for t in Path(f"/proc/{p}/task").iterdir():
                    pids += [int(c) for c in (t / "children").read_text().split()]
        except (OSError, ValueError):
            pass
        if not tree:
            break
    return total


def start_engine(kind: str, work: Path, *, sets: list[str], serve_args: list[str]) -> tuple[EngineProcess, str, nacl.signing.SigningKey]:
    """An engine in a subprocess with one relying party registered; (engine, rp_id, its key)."""
    data = work / "engine-data"
    data.mkdir(parents=True, exist_ok=True)
    log = work / "engine.log"
    if kind == "fake":
        eng = EngineProcess(data, module="engine.bench.fakeserve", serve_args=[a for s in sets for a in ("--set", s)], log_path=log)
        eng.start()
        return eng, "fuzz-rp", nacl.signing.SigningKey((data / "fuzz-rp.sign.key").read_bytes())
    netid("rp", "add", "--id", "fuzz-rp", "--name", "Fuzz", "--quota", "1000000", "--keys-out", str(work / "keys"), "--data", str(data))
    eng = EngineProcess(data, serve_args=serve_args, overrides=sets, log_path=log)
    eng.start()
    return eng, "fuzz-rp", nacl.signing.SigningKey((work / "keys" / "fuzz-rp.sign.key").read_bytes())


# ---- one connection ------------------------------------------------------------------------------------------
def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


async def _read_msg(reader) -> dict | None:
    body = await reader.read()
    if body is None:
        return None
    msg = msgspec.msgpack.decode(body)
    return msg if isinstance(msg, dict) else {"type": "?"}


async def one_connection(port: int, rng: random.Random, st: Stats, *, rp_id: str, rp_key, answer_timeout: float, max_frame: int) -> None:
    from engine.wire.framing import FrameReader

    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        st.refused += 1
        return
    st.connections += 1
    reader = FrameReader(stream, max_frame=2**31)
    try:
        with trio.move_on_after(answer_timeout):
            hello = await _read_msg(reader)
        if not hello or hello.get("type") != "hello":
            st.refused += 1
            return
        maker = FrameMaker(rng, rp_id=rp_id, rp_key=rp_key)
        maker.nonce = hello["nonce"]
        for _round in range(rng.randint(1, 4)):
            bodies = [maker.body() for _ in range(rng.randint(1, 8))]
            for kind, _ in bodies:
                st.kinds[kind.split(":")[0]] += 1
            await stream.send_all(b"".join(_frame(b) for _, b in bodies))
            st.sent += len(bodies)
            got = 0
            with trio.move_on_after(answer_timeout) as waited:
                while got < len(bodies):
                    msg = await _read_msg(reader)
                    if msg is None:
                        st.closed_without_error += 1
                        st.sample("closed", bodies[got][1])
                        return
                    if msg.get("type") == "result" and msg.get("id") is None:
                        continue  # a push to an authenticated stream
                    got += 1
                    st.answered += 1
                    code = msg.get("code") or msg.get("type")
                    st.codes[str(code)] += 1
                    if code == "internal":
                        st.internal += 1
                        st.sample("internal", b"")
            if waited.cancelled_caught:
                st.unanswered += len(bodies) - got
                return
        await _end(stream, reader, rng, st, max_frame, answer_timeout)
    except (ConnectionResetError, trio.BrokenResourceError) as exc:
        st.closed_without_error += 1
        st.sample(f"reset: {exc!r}"[:60], b"")
    except _GONE:
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _end(stream, reader, rng: random.Random, st: Stats, max_frame: int, answer_timeout: float) -> None:
    how = rng.choice(["close", "eof", "abort", "oversize", "zero", "cut"])
    if how in ("close", "abort"):
        return
    if how == "eof":
        await stream.send_eof()
        with trio.move_on_after(answer_timeout):
            while await reader.read() is not None:
                pass
        return
    st.broken_frames += 1
    if how == "oversize":
        raw, want = struct.pack(">I", rng.choice([max_frame + 1, 2**32 - 1])) + rng.randbytes(rng.randint(0, 3000)), "frame_too_large"
    elif how == "zero":
        raw, want = struct.pack(">I", 0), "malformed_frame"
    else:
        raw, want = struct.pack(">I", rng.randint(10, 5000)) + rng.randbytes(rng.randint(0, 9)), "malformed_frame"
    await stream.send_all(raw)
    if how == "cut":
        await stream.send_eof()
    codes = []
    with trio.move_on_after(answer_timeout):
        while (msg := await _read_msg(reader)) is not None:
            codes.append(msg.get("code"))
    if want not in codes:
        st.broken_without_error += 1
        st.sample(f"{how}: got {codes}", raw[:16])


# ---- the run -----------------------------------------------------------------------------------------------
async def fuzz(port: int, seconds: float, seed: int, *, connections: int, rp_id: str, rp_key, answer_timeout: float = 20.0,
               max_frame: int, st: Stats | None = None, alive=lambda: True, progress=None) -> Stats:
    """Fuzz an engine on ``port`` for ``seconds``; ``alive()`` False counts a crash and stops."""
    from engine.wire.client import open_connection

    st = st or Stats()
    master = random.Random(seed)
    deadline = trio.current_time() + seconds

    async def worker(k: int) -> None:
        rng = random.Random(master.random())
        while trio.current_time() < deadline:
            await one_connection(port, rng, st, rp_id=rp_id, rp_key=rp_key, answer_timeout=answer_timeout, max_frame=max_frame)

    async def watch() -> None:
        last_report = trio.current_time()
        while trio.current_time() < deadline:
            await trio.sleep(min(5.0, max(0.0, deadline - trio.current_time())))
            if not alive():
                st.crashes += 1
                nursery.cancel_scope.cancel()
                return
            try:
                with trio.fail_after(10):
                    async with open_connection("127.0.0.1", port) as conn:
                        await conn.ping()
            except Exception:
                st.liveness_missed += 1
            if progress is not None and trio.current_time() - last_report >= 60:
                last_report = trio.current_time()
                progress(st)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for k in range(connections):
            nursery.start_soon(worker, k)
    return st


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    # the engine's error pacing (LimitsConfig.error_rate) would answer a fuzzing connection
    # at 20 errors a second: off, so that the decoders see millions of frames, unless set
    sets = ([] if any(s.startswith("limits.error_rate=") for s in args.engine_set) else ["limits.error_rate=0"]) + list(args.engine_set)
    eng, rp_id, rp_key = start_engine(args.engine, work, sets=sets, serve_args=list(args.serve_arg))
    log = work / "engine.log"
    try:
        time.sleep(args.settle)
        rss0, tree0, log0 = rss_kib(eng.pid), rss_kib(eng.pid, tree=True), log.stat().st_size
        t0 = time.time()

        def progress(st: Stats) -> None:
            emit({"fuzz_progress": {"elapsed_s": round(time.time() - t0), "sent": st.sent, "answered": st.answered,
                                    "closed_without_error": st.closed_without_error, "internal": st.internal,
                                    "rss_mib": round(rss_kib(eng.pid) / 1024, 1), "log_bytes": log.stat().st_size - log0}})

        max_frame = _max_frame(sets)
        st = trio.run(lambda: fuzz(eng.port, args.seconds, args.seed, connections=args.connections, rp_id=rp_id, rp_key=rp_key,
                                   answer_timeout=args.answer_timeout, max_frame=max_frame, alive=lambda: eng.proc.poll() is None, progress=progress))
        elapsed = time.time() - t0
        time.sleep(2.0)  # let the last connections close
        rss1, tree1 = rss_kib(eng.pid), rss_kib(eng.pid, tree=True)
        log_bytes = log.stat().st_size - log0
    finally:
        code = eng.stop()
    out = st.as_dict()
    out.update(
        seconds=round(elapsed, 1), seed=args.seed, engine=args.engine, frames_per_s=round(st.sent / max(elapsed, 1e-9)),
        log_bytes=log_bytes, rss_before_mib=round(rss0 / 1024, 1), rss_after_mib=round(rss1 / 1024, 1),
        rss_growth=round(rss1 / rss0 - 1, 4) if rss0 else None,
        rss_tree_before_mib=round(tree0 / 1024, 1), rss_tree_after_mib=round(tree1 / 1024, 1),
        engine_exit_code=code, log=str(log),
    )
    out["pass"] = (out["crashes"] == 0 and out["closed_without_error"] == 0 and out["broken_without_error"] == 0 and out["internal"] == 0
                   and out["unanswered"] == 0 and out["liveness_missed"] == 0 and log_bytes <= 1_000_000
                   and (out["rss_growth"] is None or out["rss_growth"] <= 0.10))
    return out


def _max_frame(sets: list[str]) -> int:
    from engine.wire.protocol import MAX_FRAME_BYTES

    for s in sets:
        if s.startswith("limits.max_frame="):
            return int(s.split("=", 1)[1])
    return MAX_FRAME_BYTES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netid bench fuzz", description="Malformed and valid-looking frames against a real engine over TCP.")
    p.add_argument("--minutes", type=float, default=None, help="how long (default 3 minutes)")
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--connections", type=int, default=16, help="concurrent connections")
    p.add_argument("--engine", choices=["real", "fake"], default="real", help="real: netid serve with the models; fake: the fake extractor")
    p.add_argument("--answer-timeout", type=float, default=20.0)
    p.add_argument("--settle", type=float, default=2.0, help="seconds between ready and the first RSS reading")
    p.add_argument("--serve-arg", action="append", default=["--no-challenge-check"], help="argument for netid serve (repeat)")
    p.add_argument("--engine-set", action="append", default=[], metavar="FIELD=VALUE", help="engine configuration override")
    p.add_argument("--workdir", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else 60.0 * (args.minutes if args.minutes is not None else 3.0)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="netid-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    stderr(f"netid bench fuzz: {args.seconds:.0f} s, seed {args.seed}, {args.connections} connections, {args.engine} engine, work dir {work}")
    out = run(args, work)
    emit({"fuzz": out})
    growth = f"{100 * out['rss_growth']:+.1f} %" if out["rss_growth"] is not None else "n/a"
    print(
        f"FUZZ {'PASS' if out['pass'] else 'FAIL'} {out['seconds']:.0f} s, seed {out['seed']}: {out['sent']:,} frames over "
        f"{out['connections']:,} connections ({out['frames_per_s']:,}/s); answered {out['answered']:,}; closed without an error "
        f"{out['closed_without_error']}; broken frames {out['broken_frames']:,}, their error missing {out['broken_without_error']}; "
        f"internal {out['internal']}; unanswered {out['unanswered']}; liveness missed {out['liveness_missed']}; crashes {out['crashes']}; "
        f"log {out['log_bytes']:,} bytes; RSS {out['rss_before_mib']} -> {out['rss_after_mib']} MiB ({growth}), "
        f"with workers {out['rss_tree_before_mib']} -> {out['rss_tree_after_mib']} MiB"
    )
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
