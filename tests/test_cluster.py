"""Two engine nodes over real TCP on one PostgreSQL and one Redis.

Two ``python -m engine.bench.fakeserve`` processes (the real server, wire and limits; the
fake extractors) share a data directory (the engine's keys, as every node of a deployment
must), a PostgreSQL schema and a Redis key prefix. A session opened on node A is verified
on node B, the result is pushed to the relying party's stream on A, and the same
submission replayed to either node is refused. The relying party's node killed with
SIGKILL, the relying party's client (given both addresses) fails over to the other node and
receives the result of a session that completed meanwhile. A card re-enrolled on A: its old
credential is refused on B at the next request. Redis restarted empty mid-run, and PostgreSQL
stopped and started mid-run (each opt-in, see those tests): no nonce accepted twice, no result
lost, both nodes recover. ``netid bench cluster --fake`` for 20 s (a node SIGKILLed and
started again): nothing unanswered, lost or accepted twice. Redis and PostgreSQL on 127.0.0.1
(services policy: tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing
import pytest
import trio

from engine import errors as E
from engine.bench._engine import EngineProcess
from engine.bench.cluster import redis_answers, start_redis
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


async def test_re_enrolled_on_one_node_the_old_credential_is_refused_on_the_other_at_once(tmp_path, redis_prefix, postgres_url) -> None:  # noqa: F811
    async with two_nodes(tmp_path, redis_prefix, postgres_url) as (a, b, rp, (old_key, old_id)):
        with trio.fail_after(60):
            async with open_relying_party("127.0.0.1", a.port, **rp) as hotel:
                first = await hotel.open_session(level="basic", purpose="check-in")
                async with open_holder("127.0.0.1", b.port, device_key=old_key) as old_phone:
                    qr = old_phone.scan(first.qr)  # B has read the old credential once: it passes
                    assert (await old_phone.verify(old_id, qr, face=face("alice", 3), voice=voice("alice", qr.challenge, 4))).outcome == "pass"
                    new_key = nacl.signing.SigningKey.generate()
                    async with open_holder("127.0.0.1", a.port, device_key=new_key) as new_phone:  # a new phone, on A
                        enrolled = await new_phone.enroll("C1", [face("alice", 7), face("alice", 8)], [voice("alice", "enroll", n) for n in (7, 8, 9)])
                    assert enrolled.credential_id != old_id
                    second = await hotel.open_session(level="basic", purpose="check-in")
                    qr = old_phone.scan(second.qr)
                    with pytest.raises(E.CredentialVoided):  # the very next request on B, no wait
                        await old_phone.verify(old_id, qr, face=face("alice", 5), voice=voice("alice", qr.challenge, 6))
                async with open_holder("127.0.0.1", b.port, device_key=new_key) as new_phone:
                    qr = new_phone.scan(second.qr)  # the refusal did not use the session up
                    assert (await new_phone.verify(enrolled.credential_id, qr, face=face("alice", 5), voice=voice("alice", qr.challenge, 6))).outcome == "pass"


#: The Redis restart below stops the Redis every test on this machine shares: opt in.
RESTART_REDIS = os.environ.get("NETID_REQUIRE_SERVICES") == "1" or os.environ.get("NETID_TEST_RESTART_REDIS") == "1"


@pytest.mark.skipif(not RESTART_REDIS, reason="restarts the shared Redis: set NETID_TEST_RESTART_REDIS=1 (CI: NETID_REQUIRE_SERVICES=1)")
async def test_a_redis_restart_loses_no_result_accepts_no_nonce_twice_and_the_nodes_recover(tmp_path, redis_prefix, postgres_url) -> None:  # noqa: F811
    """Redis shut down without saving (``redis-cli shutdown nosave``) and started again,
    empty, mid-run: the session claimed before stays claimed (its replay refused on both
    nodes), the results finished before are still fetched and pushed, requests during the
    outage get ``unavailable``, and both nodes serve again by themselves.

    It stops the Redis on 127.0.0.1:6379 that every test and service on the machine shares,
    so it runs only when ``NETID_REQUIRE_SERVICES=1`` (CI) or ``NETID_TEST_RESTART_REDIS=1``
    is set; Redis is started again (as CI starts it) in a ``finally``, whatever happens."""
    async with two_nodes(tmp_path, redis_prefix, postgres_url) as (a, b, rp, (key, credential_id)):
        with trio.fail_after(90):
            async with open_relying_party(hosts=[("127.0.0.1", a.port), ("127.0.0.1", b.port)], **rp) as hotel:
                seen: set[str] = set()

                async def results_until(wanted: set[str]) -> None:
                    with trio.fail_after(20):
                        async with aclosing(hotel.results()) as results:
                            async for result in results:
                                seen.add(result.session_id)
                                if wanted <= seen:
                                    return

                opened = [await hotel.open_session(level="basic", purpose="check-in") for _ in range(2)]
                async with open_holder("127.0.0.1", b.port, device_key=key) as phone:
                    submissions = []
                    for n, session in enumerate(opened):
                        qr = phone.scan(session.qr)
                        submissions.append((qr, dict(face=face("alice", 10 + n), voice=voice("alice", qr.challenge, 20 + n))))
                        assert (await phone.verify(credential_id, qr, **submissions[-1][1])).outcome == "pass"
                try:
                    await trio.to_thread.run_sync(lambda: subprocess.run(["redis-cli", "shutdown", "nosave"], timeout=10, capture_output=True))
                    with trio.fail_after(10):
                        while await trio.to_thread.run_sync(redis_answers, REDIS_URL):
                            await trio.sleep(0.1)
                    with pytest.raises(E.Unavailable):  # within its deadline, with a retry hint
                        await hotel.open_session(level="basic", purpose="check-in")
                finally:
                    with trio.CancelScope(shield=True):  # even when the test's deadline has passed
                        await trio.to_thread.run_sync(start_redis, REDIS_URL)  # as CI starts it (engine.bench.cluster.REDIS_START)
                for port in (a.port, b.port):  # Redis forgot the sessions; PostgreSQL did not
                    async with open_holder("127.0.0.1", port, device_key=key) as phone:
                        for qr, submission in submissions:
                            with pytest.raises((E.SessionUsed, E.UnknownSession)):
                                await phone.verify(credential_id, qr, **submission)
                for session in opened:  # no result lost
                    assert (await hotel.fetch_result(session.session_id)).outcome == "pass"
                await results_until({s.session_id for s in opened})
                while True:  # the nodes recover by themselves (the pools reconnect)
                    try:
                        after = await hotel.open_session(level="basic", purpose="check-in")
                        break
                    except E.Unavailable:
                        await trio.sleep(0.2)
                async with open_holder("127.0.0.1", a.port, device_key=key) as phone:
                    qr = phone.scan(after.qr)
                    assert (await phone.verify(credential_id, qr, face=face("alice", 30), voice=voice("alice", qr.challenge, 31))).outcome == "pass"
                await results_until({after.session_id})  # pushed through the resubscribed channel (or re-sent)


#: The PostgreSQL restart below stops the PostgreSQL every test on this machine shares: opt in.
RESTART_POSTGRES = os.environ.get("NETID_REQUIRE_SERVICES") == "1" or os.environ.get("NETID_TEST_RESTART_POSTGRES") == "1"


def _postgres_address() -> tuple[str, int]:
    from urllib.parse import urlsplit

    from .conftest import POSTGRES_URL

    parts = urlsplit(POSTGRES_URL)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def _postgres_answers() -> bool:
    host, port = _postgres_address()
    return subprocess.run(["pg_isready", "-q", "-h", host, "-p", str(port), "-t", "1"], timeout=10).returncode == 0


def _postgres_ctl(action: str) -> None:
    """``pg_ctlcluster VERSION NAME ACTION`` for the cluster that ``pg_lsclusters`` lists on the
    test port; ``service postgresql ACTION`` where there is no such cluster or no pg_lsclusters."""
    port = str(_postgres_address()[1])
    try:
        listed = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        listed = []
    clusters = [f[:2] for f in map(str.split, listed) if len(f) >= 3 and f[2] == port]
    cmd = ["pg_ctlcluster", *clusters[0], action] if clusters else ["service", "postgresql", action]
    subprocess.run(cmd, check=True, timeout=60, capture_output=True)


def _start_postgres() -> None:
    """Start PostgreSQL unless ``pg_isready`` says it accepts connections; wait until it does."""
    if not _postgres_answers():
        _postgres_ctl("start")
    deadline = time.monotonic() + 30
    while not _postgres_answers():
        if time.monotonic() > deadline:
            raise RuntimeError("PostgreSQL did not come back within 30 s")
        time.sleep(0.2)


@pytest.mark.skipif(not RESTART_POSTGRES, reason="restarts the shared PostgreSQL: set NETID_TEST_RESTART_POSTGRES=1 (CI: NETID_REQUIRE_SERVICES=1)")
async def test_a_postgresql_restart_answers_unavailable_loses_no_result_accepts_no_nonce_twice_and_the_nodes_recover(
    tmp_path, redis_prefix, postgres_url  # noqa: F811
) -> None:
    """PostgreSQL stopped (``pg_ctlcluster VERSION NAME stop``, fast mode: every connection
    cut) while both nodes verify, and started again once both nodes' ``/readyz`` say 503:
    every request gets ``pass``, ``fail`` or ``unavailable`` (never ``internal``, never a
    dropped connection), sessions opened before and verified during the outage get
    ``unavailable``, each submission is accepted at most once across both nodes (the
    verifications answered before are refused on replay on both; those refused with
    ``unavailable`` may pass once when retried), every result answered reaches the relying
    party and is fetched, and both nodes verify again by themselves and say 200 on
    ``/readyz`` within a bound.

    It stops the PostgreSQL on 127.0.0.1 that every test on the machine shares, so it runs
    only when ``NETID_REQUIRE_SERVICES=1`` (CI) or ``NETID_TEST_RESTART_POSTGRES=1`` is set;
    PostgreSQL is started again in a ``finally`` if ``pg_isready`` fails, whatever happens."""
    from .test_readiness import readyz_becomes

    async with two_nodes(tmp_path, redis_prefix, postgres_url) as (a, b, rp, (key, credential_id)):
        with trio.fail_after(60):
            async with (open_relying_party(hosts=[("127.0.0.1", a.port), ("127.0.0.1", b.port)], **rp) as hotel,
                        open_holder("127.0.0.1", a.port, device_key=key) as on_a, open_holder("127.0.0.1", b.port, device_key=key) as on_b):
                phones = {"A": on_a, "B": on_b}
                answered: list[tuple[str, Any, dict, str]] = []  # session id, QR, submission, pass / fail / unavailable
                pushed: set[str] = set()

                async def verify(node: str, session: Any, n: int) -> str:
                    qr = phones[node].scan(session.qr)
                    who = "bob" if n % 4 == 3 else "alice"  # one in four another person's face: fail
                    submission = dict(face=face(who, 100 + n), voice=voice("alice", qr.challenge, 100 + n))
                    try:
                        outcome = (await phones[node].verify(credential_id, qr, **submission)).outcome
                    except E.Unavailable:
                        outcome = "unavailable"
                    answered.append((session.session_id, qr, submission, outcome))
                    return outcome

                async def verifications(node: str, first: int) -> None:  # on and on, through the outage
                    for n in range(first, 10_000, 2):
                        try:
                            session = await hotel.open_session(level="basic", purpose="check-in")
                        except E.Unavailable:
                            pass  # the relying party's record could not be read: no session
                        else:
                            await verify(node, session, n)
                        await trio.sleep(0.1)

                async def collect_pushes() -> None:
                    async for result in hotel.results():
                        pushed.add(result.session_id)

                async with trio.open_nursery() as load:
                    load.start_soon(collect_pushes)
                    spare = [await hotel.open_session(level="basic", purpose="check-in") for _ in range(4)]  # verified during the outage
                    for node, first in (("A", 0), ("B", 1)):
                        load.start_soon(verifications, node, first)
                    while sum(1 for *_x, outcome in answered if outcome in ("pass", "fail")) < 6:  # verified before
                        await trio.sleep(0.1)
                    before = len(answered)
                    try:
                        await trio.to_thread.run_sync(_postgres_ctl, "stop")
                        for node in (a, b):
                            await readyz_becomes(node.metrics_port, 503, 8)
                        async with trio.open_nursery() as during:
                            for k, (node, session) in enumerate(zip("ABAB", spare)):
                                during.start_soon(verify, node, session, 1000 + k)
                        assert {sid for sid, *_x, outcome in answered if outcome == "unavailable"} >= {s.session_id for s in spare}
                    finally:
                        with trio.CancelScope(shield=True):  # even when the test's deadline has passed
                            await trio.to_thread.run_sync(_start_postgres)
                    back = trio.current_time()
                    for node in "AB":  # each node verifies again by itself, within a bound
                        with trio.fail_after(15):
                            while await verify(node, await hotel.open_session(level="basic", purpose="check-in"), 2000 + len(answered)) == "unavailable":
                                await trio.sleep(0.2)
                    recovered = trio.current_time() - back
                    for node in (a, b):  # and is ready again
                        await readyz_becomes(node.metrics_port, 200, 15)
                    await trio.sleep(1.0)  # the load runs on a little after the recovery
                    load.cancel_scope.cancel()

                outcomes = [outcome for *_x, outcome in answered]
                assert "unavailable" in outcomes[before:] and outcomes.count("pass") > 6, outcomes
                assert recovered < 15
                for sid, qr, submission, outcome in answered:  # each nonce accepted at most once, on either node
                    accepted = outcome != "unavailable"
                    for phone in phones.values():
                        try:
                            await phone.verify(credential_id, qr, **submission)
                        except (E.SessionUsed, E.UnknownSession):
                            continue
                        assert not accepted, f"{sid}: accepted twice"
                        accepted = True
                finished = {sid for sid, *_x, outcome in answered if outcome in ("pass", "fail")}
                for sid, *_x, outcome in answered:  # no result lost: kept, from any node
                    if outcome in ("pass", "fail"):
                        assert (await hotel.fetch_result(sid)).outcome == outcome
                with trio.fail_after(10):  # and pushed (some re-sent from pending_results)
                    async with aclosing(hotel.results()) as results:
                        while not finished <= pushed:
                            pushed.add((await results.__anext__()).session_id)


async def test_the_cluster_benchmark_with_the_fake_extractors_leaves_nothing_unanswered_lost_or_accepted_twice(tmp_path, postgres_schemas, redis_prefix) -> None:  # noqa: F811
    """``netid bench cluster --fake --nodes 2`` for 20 s at 4/s: the node its relying party is
    on SIGKILLed at a third (while a verify is in flight there, if one comes within 5 s) and
    started again at half, Redis down for 2 s at two thirds (only under the Redis opt-in
    above): no arrival unanswered, no result lost, every answered verify replayed to the
    other node and refused."""
    from engine.bench import cluster

    restart = [] if RESTART_REDIS else ["--no-redis-restart"]
    args = cluster.build_parser().parse_args(["--fake", "--nodes", "2", "--minutes", "0.33", "--rps", "4", "--store", postgres_schemas.base_url,
                                              "--state", REDIS_URL, "--redis-down", "2", *restart])
    with trio.fail_after(90):
        summary = await cluster.run(args, tmp_path)
    assert (summary["unanswered"], summary["lost_results"], summary["nonces_accepted_twice"]) == (0, 0, 0), summary
    answered = summary["answered"]
    assert answered["pass"] > 20 and answered["fail"] > 2 and summary["replays"]["sent"] == answered["pass"] + answered["fail"], summary
    assert "undecided" not in summary["replays"]["refused"], summary
    events = summary["events"]
    assert events["kill"]["relying_parties_on_it"] == 1 and events["reconnects"]["relying_party_failovers"] >= 1, events
    assert "ready_at_s" in events["node_restart"] and ("redis_restart" in events) == RESTART_REDIS, events
    assert summary["node_exit_codes"] == [0, 0], summary
