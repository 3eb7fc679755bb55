"""Two engine nodes over real TCP on one PostgreSQL and one Redis.

Two ``python -m engine.bench.fakeserve`` processes (the real server, wire and limits; the
fake extractors) share a data directory (the engine's keys, as every node of a deployment
must), a PostgreSQL schema and a Redis key prefix. A session opened on node A is verified
on node B, the result is pushed to the relying party's stream on A, and the same
submission replayed to either node is refused. The relying party's node killed with
SIGKILL, the relying party's client (given both addresses) fails over to the other node and
receives the result of a session that completed meanwhile. Redis and PostgreSQL on 127.0.0.1
(services policy: tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing
import pytest
import trio

from engine import errors as E
from engine.bench._engine import EngineProcess
from engine.wire.client import open_holder, open_relying_party

from .conftest import face, voice
from .test_state_redis import REDIS_URL, redis_prefix  # noqa: F401 - the fixture


def node(data: Path, log: Path, store_url: str, state_url: str) -> EngineProcess:
    sets = [f"store_url={store_url}", f"state_url={state_url}", "limits.request_deadline=20"]
    args = [a for s in sets for a in ("--set", s)]
    return EngineProcess(data, serve_args=args, module="engine.bench.fakeserve", log_path=log, ready_timeout=120.0)


@asynccontextmanager
async def two_nodes(tmp_path: Path, redis_prefix: str, postgres_url: str) -> AsyncIterator[tuple[EngineProcess, EngineProcess, dict, Any]]:
    """Nodes A and B, the relying party's connection arguments, and alice enrolled (on A)."""
    data = tmp_path / "data"
    state_url = f"{REDIS_URL}?prefix={redis_prefix}"
    a = node(data, tmp_path / "a.log", postgres_url, state_url)
    b = node(data, tmp_path / "b.log", postgres_url, state_url)
    await trio.to_thread.run_sync(a.start)  # A first: it writes the keys and registers the relying party
    try:
        await trio.to_thread.run_sync(b.start)
        assert a.ready["engine_key"] == b.ready["engine_key"]
        rp = dict(rp_id="fuzz-rp", signing_key=nacl.signing.SigningKey((data / "fuzz-rp.sign.key").read_bytes()),
                  box_key=nacl.public.PrivateKey((data / "fuzz-rp.box.key").read_bytes()), engine_key=bytes.fromhex(a.ready["engine_key"]))
        key = nacl.signing.SigningKey.generate()
        with trio.fail_after(60):
            async with open_holder("127.0.0.1", a.port, device_key=key) as phone:
                enrolled = await phone.enroll("C1", [face("alice", 1), face("alice", 2)], [voice("alice", "enroll", n) for n in (1, 2, 3)])
        yield a, b, rp, (key, enrolled.credential_id)
    finally:
        for n in (b, a):
            n.terminate()
        for n in (b, a):
            await trio.to_thread.run_sync(n.wait)  # A may have been killed already: reaped again


async def test_opened_on_one_node_verified_on_the_other_pushed_back_and_never_replayed(tmp_path, redis_prefix, postgres_url) -> None:  # noqa: F811
    async with two_nodes(tmp_path, redis_prefix, postgres_url) as (a, b, rp, (key, credential_id)):
        with trio.fail_after(60):
            async with open_relying_party("127.0.0.1", a.port, **rp) as hotel:
                opened = await hotel.open_session(level="basic", purpose="check-in")
                async with open_holder("127.0.0.1", b.port, device_key=key) as phone:
                    qr = phone.scan(opened.qr)
                    submission = dict(face=face("alice", 3), voice=voice("alice", qr.challenge, 4))
                    on_phone = await phone.verify(credential_id, qr, **submission)
                    assert on_phone.outcome == "pass" and on_phone.session_id == opened.session_id
                    with trio.fail_after(10):
                        pushed = await hotel.results().__anext__()  # pushed to A's stream from B
                    assert (pushed.session_id, pushed.outcome, pushed.reason) == (opened.session_id, "pass", "match")
                    with pytest.raises(E.SessionUsed):  # the same submission again, to B
                        await phone.verify(credential_id, qr, **submission)
                async with open_holder("127.0.0.1", a.port, device_key=key) as phone:
                    with pytest.raises(E.SessionUsed):  # and to A
                        await phone.verify(credential_id, qr, **submission)
            async with open_relying_party("127.0.0.1", b.port, **rp) as hotel_on_b:
                fetched = await hotel_on_b.fetch_result(opened.session_id)  # kept, from any node
                assert (fetched.session_id, fetched.outcome) == (opened.session_id, "pass")


async def test_the_relying_partys_node_killed_the_client_fails_over_and_gets_the_result(tmp_path, redis_prefix, postgres_url) -> None:  # noqa: F811
    async with two_nodes(tmp_path, redis_prefix, postgres_url) as (a, b, rp, (key, credential_id)):
        with trio.fail_after(60):
            async with open_relying_party(hosts=[("127.0.0.1", a.port), ("127.0.0.1", b.port)], **rp) as hotel:
                assert hotel.address == ("127.0.0.1", a.port)  # the first that answers
                opened = await hotel.open_session(level="basic", purpose="check-in")
                await trio.to_thread.run_sync(a.kill)  # SIGKILL: the relying party's node is gone
                async with open_holder("127.0.0.1", b.port, device_key=key) as phone:
                    qr = phone.scan(opened.qr)  # the session opened on A lives on
                    assert (await phone.verify(credential_id, qr, face=face("alice", 5), voice=voice("alice", qr.challenge, 6))).outcome == "pass"
                with trio.fail_after(10):
                    pushed = await hotel.results().__anext__()  # completed while it was away: sent on reconnect to B
                assert (pushed.session_id, pushed.outcome) == (opened.session_id, "pass")
                assert hotel.address == ("127.0.0.1", b.port) and hotel.connections == 2
                again = await hotel.open_session(level="basic", purpose="check-out")  # carries on, on B
                assert (await hotel.fetch_result(opened.session_id)).session_id == opened.session_id
                with pytest.raises(E.ResultPending):
                    await hotel.fetch_result(again.session_id)


def test_the_relying_partys_addresses_read_as_pairs_or_a_comma_list() -> None:
    from engine.wire.client import _addresses

    assert _addresses("h", 1, None) == [("h", 1)]
    assert _addresses(None, None, "a:1, b:2,[::1]:3") == [("a", 1), ("b", 2), ("::1", 3)]
    assert _addresses(None, None, [("a", "1")]) == [("a", 1)]
    for bad in ("a", "a:x", ""):
        with pytest.raises(ValueError):
            _addresses(None, None, bad)
    with pytest.raises(ValueError):
        _addresses(None, None, [])
