"""Metrics registry and the /metrics, /healthz, /readyz endpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio

from engine.ops.metrics import Metrics, serve_http


async def http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` as the whole request; return (status, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n".encode()


async def start(nursery: trio.Nursery, metrics: Metrics, ready: Callable[[], bool]) -> int:
    port = await nursery.start(lambda task_status: serve_http(
        metrics, host="127.0.0.1", port=0, ready=ready, task_status=task_status
    ))
    assert isinstance(port, int) and port > 0
    return port


async def test_metrics_shows_counter_after_increment() -> None:
    metrics = Metrics()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, metrics, lambda: True)
            line = b'netid_requests_total{outcome="pass",type="verify"} '
            status, headers, body = await http(port, get("/metrics"))
            assert status == 200 and line not in body
            metrics.requests.labels(type="verify", outcome="pass").inc()
            metrics.requests.labels(type="verify", outcome="pass").inc()
            metrics.queue_depth.labels(model="face").set(7)
            status, headers, body = await http(port, get("/metrics?x=1"))
            assert status == 200
            assert headers["content-type"].startswith("text/plain")
            assert int(headers["content-length"]) == len(body)
            assert line + b"2.0" in body
            assert b'netid_queue_depth{model="face"} 7.0' in body
            assert b"netid_request_latency_seconds" in body
            nursery.cancel_scope.cancel()


async def test_healthz_and_readyz_flip() -> None:
    state = {"ready": False}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, Metrics(), lambda: state["ready"])
            assert (await http(port, get("/healthz")))[::2] == (200, b"ok\n")
            assert (await http(port, get("/readyz")))[0] == 503
            state["ready"] = True
            assert (await http(port, get("/readyz")))[0] == 200
            state["ready"] = False
            assert (await http(port, get("/readyz")))[0] == 503
            nursery.cancel_scope.cancel()


async def test_failing_readiness_check_is_not_ready() -> None:
    def broken() -> bool:
        raise RuntimeError("store unreachable")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, Metrics(), broken)
            assert (await http(port, get("/readyz")))[0] == 503
            assert (await http(port, get("/healthz")))[0] == 200
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "junk",
    [
        b"\x00\xff\xfe\x16\x03\x01 hello\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET  /metrics HTTP/1.1\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n",  # closed before the end of the head
        b"A" * 20_000,
    ],
)
async def test_junk_gets_400_and_server_lives_on(junk: bytes) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, Metrics(), lambda: True)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(junk)
                await stream.send_eof()
                data = bytearray()
                while chunk := await stream.receive_some(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 400 ")
            assert (await http(port, get("/healthz")))[0] == 200
            nursery.cancel_scope.cancel()


async def test_silent_clients_do_not_disturb() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, Metrics(), lambda: True)
            for _ in range(3):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.aclose()
            # A client that sends half a request and lingers does not block others.
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            await idle.send_all(b"GET /metr")
            assert (await http(port, get("/metrics")))[0] == 200
            await idle.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (get("/nowhere"), 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405),
        (b"GET /healthz HTTP/1.0\n\n", 200),
    ],
)
async def test_other_statuses(raw: bytes, status: int) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, Metrics(), lambda: True)
            got, headers, _ = await http(port, raw)
            assert got == status
            if status == 405:
                assert headers["allow"] == "GET, HEAD"
            nursery.cancel_scope.cancel()


async def test_head_has_headers_but_no_body() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, Metrics(), lambda: True)
            status, headers, body = await http(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (status, headers["content-length"], body) == (200, "3", b"")
            nursery.cancel_scope.cancel()


def test_registries_are_separate() -> None:
    a, b = Metrics(), Metrics()
    a.rate_limited.inc()
    a.overloaded.labels(where="connection").inc(3)
    get_a: Any = a.registry.get_sample_value
    get_b: Any = b.registry.get_sample_value
    assert get_a("netid_rate_limited_total") == 1
    assert get_b("netid_rate_limited_total") == 0
    assert get_a("netid_overloaded_total", {"where": "connection"}) == 3
    assert b"netid_rate_limited_total 1.0" in a.render()
