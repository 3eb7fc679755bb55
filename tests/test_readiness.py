"""/readyz follows the services: 503 while PostgreSQL or Redis cannot be reached, 200 again
once they are back, with no restart of the node.

An engine in this process (the fake extractors) on a PostgreSQL store and Redis state, each
reached through a TCP relay (``Proxy`` from tests/test_state_redis.py) that the test cuts and
restores. Redis and PostgreSQL on 127.0.0.1 (services policy: tests/conftest.py).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import trio

from engine.app import build_engine, run_engine
from engine.config import EngineConfig
from engine.inference.extractors import fake_extractors

from .conftest import FixedScores
from .test_metrics import get, http
from .test_state_redis import Proxy, redis_prefix  # noqa: F401 - the fixture


def through(url: str, port: int) -> str:
    """``url`` with its port replaced by ``port`` (the relay's)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit(":", 1)[0] if ":" in parts.netloc.rsplit("@", 1)[-1] else parts.netloc
    return urlunsplit((parts.scheme, f"{host}:{port}", parts.path, parts.query, ""))


async def readyz_becomes(port: int, status: int, within: float) -> None:
    with trio.fail_after(within):
        while (await http(port, get("/readyz")))[0] != status:
            await trio.sleep(0.2)


async def test_readyz_is_503_while_postgresql_or_redis_is_unreachable(tmp_path, redis_prefix, postgres_url, nursery) -> None:  # noqa: F811
    pg, rd = Proxy(urlsplit(postgres_url).port or 5432), Proxy(6379)
    await nursery.start(pg.serve)
    await nursery.start(rd.serve)
    cfg = EngineConfig(data_dir=tmp_path / "data", port=0, metrics_host="127.0.0.1", metrics_port=0,
                       store_url=through(postgres_url, pg.port), state_url=f"redis://127.0.0.1:{rd.port}/0?prefix={redis_prefix}")
    # in a thread: opening the store blocks, and the relays run on this event loop
    engine = await trio.to_thread.run_sync(lambda: build_engine(cfg, extractors=fake_extractors(), scores=FixedScores()))
    running = await nursery.start(run_engine, engine)
    port = running.metrics_port
    await readyz_becomes(port, 200, 10)
    for relay in (pg, rd):
        relay.cut()  # the service is gone: the next probe (every second) says so
        await readyz_becomes(port, 503, 8)
        assert (await http(port, get("/healthz")))[0] == 200  # alive, only not ready
        await nursery.start(relay.serve)  # back, on the same port: ready again by itself
        await readyz_becomes(port, 200, 15)
    running.drain()
    await trio.to_thread.run_sync(engine.close)
