"""The shared session state and quotas (Redis + PostgreSQL) against the seam's contract.

Two state objects on one Redis and one PostgreSQL schema stand for two engine nodes; the
same tests run on the in-process state, where both "nodes" are one object. Then what only
the shared state has: the single use survives Redis forgetting it, results outlive their
publication and expire, and Redis or PostgreSQL unreachable is ``unavailable`` until they
return. Redis and PostgreSQL on 127.0.0.1 (services policy: tests/conftest.py).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from engine import errors as E
from engine.wire import protocol as P
from engine.config import EngineConfig
from engine.state import MemoryQuotas, MemorySessionState, Session

from .conftest import service_unreachable

REDIS_URL = "redis://127.0.0.1:6379/0"
NONCE = b"n" * 16


def session(sid: str = "s1", rp: str = "hotel", *, now: float = 100.0, ttl: float = 60.0) -> Session:
    return Session(session_id=sid, rp_id=rp, level="basic", purpose="p", nonce=NONCE, challenge="123456",
                   created_at=now, expires_at=now + ttl)


@pytest.fixture
def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of its own on the test Redis, its keys deleted at the end."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.ConnectionError, OSError) as exc:
        service_unreachable("Redis", f"{type(exc).__name__}: {str(exc)[:160]}")
    prefix = f"netid-test-{secrets.token_hex(4)}"
    yield prefix
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


class Clock:
    """The engine's clock for the state's own use (retention), moved by the test."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def shared_node(redis_prefix: str, store_url: str):
    from engine.state.redis import RedisQuotas, RedisSessionState, connect
    from engine.state.durable import DurableState

    client = connect(REDIS_URL)
    return RedisSessionState(client, DurableState(store_url), prefix=redis_prefix), RedisQuotas(client, prefix=redis_prefix)


@pytest.fixture(params=["memory", "shared"])
async def nodes(request, nursery) -> AsyncIterator[tuple]:
    """(state A, state B, quotas A, quotas B, clock): two nodes, running."""
    clock = Clock()
    if request.param == "memory":
        quotas = MemoryQuotas()
        state = MemorySessionState(quotas)
        pair = [(state, quotas), (state, quotas)]
    else:
        prefix = request.getfixturevalue("redis_prefix")
        url = request.getfixturevalue("postgres_url")
        pair = [shared_node(prefix, url), shared_node(prefix, url)]
    for state, _ in {id(p[0]): p for p in pair}.values():
        await nursery.start(state.run, clock)
    yield pair[0][0], pair[1][0], pair[0][1], pair[1][1], clock
    nursery.cancel_scope.cancel()


async def test_a_session_opened_on_one_node_is_claimed_once_across_both(nodes) -> None:
    a, b, *_ = nodes
    await a.open(session(), now=100.0, max_open=10)
    with pytest.raises(E.UnknownSession):
        await b.claim("s1", b"x" * 16, 101.0)  # a wrong nonce claims nothing
    won: list[Session] = []

    async def claim(node) -> None:
        try:
            won.append(await node.claim("s1", NONCE, 101.0))
        except E.SessionUsed:
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(claim, (a, b)[i % 2])
    assert len(won) == 1 and won[0] == session()
    with pytest.raises(E.SessionUsed):
        await a.claim("s1", NONCE, 101.0)
    await b.release("s1")  # ended before any result: usable again, on any node
    await a.claim("s1", NONCE, 102.0)
    await a.open(session("s2"), now=100.0, max_open=10)
    with pytest.raises(E.SessionExpired):
        await b.claim("s2", NONCE, 160.0)


async def test_open_sessions_are_bounded_across_nodes(nodes) -> None:
    a, b, *_ = nodes
    await a.open(session("x"), now=100.0, max_open=1)
    with pytest.raises(E.Overloaded):
        await b.open(session("y"), now=100.0, max_open=1)


async def test_an_open_takes_its_relying_partys_quota_in_the_same_step(nodes) -> None:
    a, b, qa, _qb, _clock = nodes
    for i, node in enumerate((a, b, a)):
        await node.open(session(f"q{i}"), now=100.0, max_open=10, quota=3)
    with pytest.raises(E.RateLimited) as info:
        await b.open(session("q3"), now=100.0, max_open=10, quota=3)
    assert 0 < info.value.retry_after_ms <= 20_001
    with pytest.raises(E.UnknownSession):
        await a.claim("q3", NONCE, 101.0)  # refused: nothing kept
    with pytest.raises(E.RateLimited):
        await qa.take("hotel", "open", 3, 100.0)  # the Quotas' own bucket
    await qa.take("hotel", "fetch", 3, 100.0)  # another bucket
    await b.open(session("c1", "courier"), now=100.0, max_open=10, quota=3)  # another relying party
    await a.open(session("q4"), now=120.0, max_open=10, quota=3)  # one back after 60/3 s
    await b.open(session("q5"), now=120.0, max_open=10)  # no quota given: none taken


async def test_failures_on_both_nodes_close_the_session_at_the_limit(nodes) -> None:
    a, b, *_ = nodes
    await a.open(session(), now=100.0, max_open=10)
    with pytest.raises(E.UnknownSession):
        await b.count_failure("s1", b"x" * 16, 101.0, limit=3)
    assert [await (a, b)[i % 2].count_failure("s1", NONCE, 101.0, limit=3) for i in range(3)] == [None, None, session()]
    with pytest.raises(E.SessionUsed):
        await b.count_failure("s1", NONCE, 101.0, limit=3)
    with pytest.raises(E.SessionUsed):
        await a.claim("s1", NONCE, 101.0)


async def receive(inbox: trio.MemoryReceiveChannel, seconds: float = 10.0) -> P.ResultMsg:
    with trio.fail_after(seconds):
        return await inbox.receive()


async def test_a_result_finished_on_one_node_reaches_the_stream_on_the_other(nodes) -> None:
    a, b, *_ = nodes
    s = session()
    await a.open(s, now=100.0, max_open=10)
    mine, my_inbox = trio.open_memory_channel(8)
    theirs, their_inbox = trio.open_memory_channel(8)
    a.subscribe("hotel", mine)
    a.subscribe("courier", theirs)
    await trio.sleep(0.5)  # the subscription reaches Redis
    await b.claim("s1", NONCE, 101.0)
    with pytest.raises(E.ResultPending):
        await a.result("s1", "hotel")
    assert (await b.finish(s, b"sealed", retain_until=700.0)).delivered == 1
    assert await receive(my_inbox) == P.ResultMsg(session_id="s1", sealed=b"sealed")
    await trio.sleep(0.3)
    with pytest.raises(trio.WouldBlock):
        their_inbox.receive_nowait()
    assert await a.result("s1", "hotel") == b"sealed" == await b.result("s1", "hotel")
    with pytest.raises(E.UnknownSession):
        await b.result("s1", "courier")
    with pytest.raises(E.UnknownSession):
        await b.result("nope", "hotel")


async def test_a_result_nobody_was_connected_for_is_fetched_and_sent_on_reconnect(nodes) -> None:
    a, b, *_ = nodes
    s = session()
    await a.open(s, now=100.0, max_open=10)
    await a.claim("s1", NONCE, 101.0)
    assert (await a.finish(s, b"sealed", retain_until=700.0)).delivered == 0
    assert await b.result("s1", "hotel") == b"sealed"
    if isinstance(b, MemorySessionState):
        return  # in one process a stream that was not there misses the push: it fetches
    back, inbox = trio.open_memory_channel(8)
    b.subscribe("hotel", back)  # the relying party reconnects, to the other node
    assert await receive(inbox) == P.ResultMsg(session_id="s1", sealed=b"sealed")
    from engine.state.redis import MARK_EVERY

    await trio.sleep(MARK_EVERY + 0.5)  # marked delivered
    again, inbox2 = trio.open_memory_channel(8)
    a.subscribe("hotel", again)
    await trio.sleep(1.0)
    with pytest.raises(trio.WouldBlock):
        inbox2.receive_nowait()  # delivered once already: not sent to the next stream


async def test_a_quota_holds_across_nodes(nodes) -> None:
    *_, qa, qb, _clock = nodes
    for q in (qa, qb, qa):
        await q.take("hotel", "open", 3, 0.0)
    with pytest.raises(E.RateLimited) as info:
        await qb.take("hotel", "open", 3, 0.0)
    assert 0 < info.value.retry_after_ms <= 20_001
    await qb.take("hotel", "fetch", 3, 0.0)  # another bucket
    await qb.take("courier", "open", 3, 0.0)  # another relying party
    await qa.take("hotel", "open", 3, 20.0)  # one back after 60/3 s
    with pytest.raises(E.RateLimited):
        await qb.take("hotel", "open", 3, 20.0)
    await qa.take("hotel", "open", 0, 20.0)  # no limit


# ---- what only the shared state has ---------------------------------------------------------------
@pytest.fixture
async def shared(redis_prefix, postgres_url, nursery):
    clock = Clock()
    a, b = shared_node(redis_prefix, postgres_url)[0], shared_node(redis_prefix, postgres_url)[0]
    await nursery.start(a.run, clock)
    await nursery.start(b.run, clock)
    yield a, b, clock
    nursery.cancel_scope.cancel()


async def test_a_consumed_session_stays_consumed_when_redis_forgets_it(shared) -> None:
    a, b, _clock = shared
    s = session()
    await a.open(s, now=100.0, max_open=10)
    await a.claim("s1", NONCE, 101.0)
    # Redis restored from a snapshot older than the claim (or a replica that lagged):
    # the session is back, unused; PostgreSQL still holds its single use.
    await a.r.run(a.r.client.delete, a._key("s1"))
    await b.open(s, now=100.0, max_open=10)
    with pytest.raises(E.SessionUsed):
        await b.claim("s1", NONCE, 102.0)
    with pytest.raises(E.SessionUsed):  # nor closed a second time by failed attempts
        await a.count_failure("s1", NONCE, 102.0, limit=1)
    await a.r.run(a.r.client.delete, a._key("s1"))  # Redis lost everything: the session is unknown
    with pytest.raises(E.UnknownSession):
        await b.claim("s1", NONCE, 102.0)


async def test_a_claim_postgresql_could_not_record_is_undone_in_redis(shared, monkeypatch) -> None:
    a, b, _clock = shared
    await a.open(session(), now=100.0, max_open=10)

    def down(*args, **kwargs):
        raise E.Unavailable("the database is unreachable (test)", retry_after_ms=500)

    with monkeypatch.context() as m:
        m.setattr(a.durable, "consume", down)
        with pytest.raises(E.Unavailable):
            await a.claim("s1", NONCE, 101.0)
    got = await b.claim("s1", NONCE, 102.0)  # back when PostgreSQL is: the holder may retry
    assert got.session_id == "s1"
    with pytest.raises(E.SessionUsed):
        await a.claim("s1", NONCE, 103.0)


async def test_a_result_expires_after_its_retention(shared) -> None:
    a, b, clock = shared
    s = session()
    await a.open(s, now=100.0, max_open=10)
    await a.claim("s1", NONCE, 101.0)
    await a.finish(s, b"sealed", retain_until=110.0)
    clock.now = 109.0
    assert await b.result("s1", "hotel") == b"sealed"
    clock.now = 110.0
    with pytest.raises((E.UnknownSession, E.ResultPending)):
        await b.result("s1", "hotel")
    assert await trio.to_thread.run_sync(b.durable.sweep, 110.0) >= 1
    late, inbox = trio.open_memory_channel(8)
    b.subscribe("hotel", late)
    await trio.sleep(1.0)
    with pytest.raises(trio.WouldBlock):
        inbox.receive_nowait()  # past retention: not sent on reconnect either


async def test_unreachable_services_are_unavailable_with_a_retry_hint(redis_prefix, postgres_url) -> None:
    from engine.state.durable import DurableState
    from engine.state.redis import RedisQuotas, RedisSessionState, connect

    durable = DurableState(postgres_url)
    dead = connect("redis://127.0.0.1:1/0")  # nothing listens there
    state, quotas = RedisSessionState(dead, durable, prefix=redis_prefix), RedisQuotas(dead, prefix=redis_prefix)
    with trio.fail_after(8):
        for call in (lambda: state.open(session(), now=100.0, max_open=10), lambda: state.claim("s1", NONCE, 101.0),
                     lambda: quotas.take("hotel", "open", 5, 100.0)):
            with pytest.raises(E.Unavailable) as info:
                await call()
            assert info.value.code == "unavailable" and info.value.retry_after_ms and info.value.retry_after_ms > 0
    durable.close()
    with trio.fail_after(8), pytest.raises(E.Unavailable):
        await trio.to_thread.run_sync(DurableState, "postgresql://postgres@127.0.0.1:1/test?connect_timeout=1")
    assert E.ERRORS_BY_CODE["unavailable"] is E.Unavailable and issubclass(E.StoreUnavailable, E.Unavailable)


class Proxy:
    """A TCP relay to Redis that the test can cut and restore, as if Redis went away."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.up = trio.Event()
        self.scope: trio.CancelScope | None = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self.scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()
            await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target) as server:
            async def pump(src, dst) -> None:
                try:
                    async for chunk in src:
                        await dst.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server)
                nursery.start_soon(pump, server, client)

    def cut(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


async def test_a_node_recovers_by_itself_when_redis_returns(redis_prefix, postgres_url, nursery) -> None:
    from engine.state.durable import DurableState
    from engine.state.redis import RedisSessionState, connect

    proxy = Proxy(6379)
    await nursery.start(proxy.serve)
    clock = Clock()
    a = RedisSessionState(connect(f"redis://127.0.0.1:{proxy.port}/0"), DurableState(postgres_url), prefix=redis_prefix)
    b = shared_node(redis_prefix, postgres_url)[0]  # a node whose link to Redis stays up
    await nursery.start(a.run, clock)
    await nursery.start(b.run, clock)
    stream, inbox = trio.open_memory_channel(8)
    a.subscribe("hotel", stream)
    await trio.sleep(0.5)
    proxy.cut()
    await trio.sleep(0.3)
    with trio.fail_after(8), pytest.raises(E.Unavailable):
        await a.open(session("s1"), now=100.0, max_open=10)
    s2 = session("s2")
    await b.open(s2, now=100.0, max_open=10)
    await b.claim("s2", NONCE, 101.0)
    await b.finish(s2, b"meanwhile", retain_until=700.0)  # published while a cannot hear it
    await nursery.start(proxy.serve)  # Redis is back, on the same port
    assert await receive(inbox, 15.0) == P.ResultMsg(session_id="s2", sealed=b"meanwhile")
    with trio.fail_after(8):
        await a.open(session("s3"), now=100.0, max_open=10)
    await b.claim("s3", NONCE, 101.0)
    await b.finish(session("s3"), b"after", retain_until=700.0)
    assert await receive(inbox) == P.ResultMsg(session_id="s3", sealed=b"after")  # subscribed again
    nursery.cancel_scope.cancel()


def test_shared_state_needs_a_postgresql_store(tmp_path: Path) -> None:
    with pytest.raises(E.ConfigError, match="PostgreSQL store"):
        EngineConfig(data_dir=tmp_path, state_url=REDIS_URL)
    with pytest.raises(E.ConfigError, match="state URL"):
        EngineConfig(data_dir=tmp_path, store_url="postgresql://postgres@127.0.0.1/test", state_url="memcached://x")
    EngineConfig(data_dir=tmp_path, store_url="postgresql://postgres@127.0.0.1/test", state_url=f"{REDIS_URL}?prefix=a-b")
    from engine.state.redis import parse_state_url

    assert parse_state_url("redis://h:1/2?prefix=p1&ssl_cert_reqs=none") == ("redis://h:1/2?ssl_cert_reqs=none", "p1")
    with pytest.raises(E.ConfigError):
        parse_state_url("redis://h/0?prefix=a:b")
