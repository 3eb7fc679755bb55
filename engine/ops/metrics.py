"""Prometheus metrics and the operations HTTP endpoint (/metrics, /healthz, /readyz).

Each :class:`Metrics` owns its own ``CollectorRegistry`` (never the process-wide
default), so several engines can live in one process, as tests do.

:func:`serve_http` is a deliberately tiny HTTP/1.1 server on trio: GET and HEAD
only, one request per connection (``Connection: close``), a bounded request
head, a deadline per connection and a cap on open connections. A malformed
request gets a 400; nothing a client sends can stop the server.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .layer_cpu import LayerCpu

__all__ = ["Metrics", "serve_http"]

log = logging.getLogger(__name__)

#: Request latency, 1 ms to 10 s.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
#: Items per model call.
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
#: Time a job waits in a model queue, 0.1 ms to 5 s.
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: Time of one model call, 0.5 ms to 10 s.
MODEL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    """Every metric the engine exports, on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "netid_requests", "Requests handled, by message type and outcome code.",
            ["type", "outcome"], registry=r,
        )
        self.latency = Histogram(
            "netid_request_latency_seconds", "Time from a request's arrival to its reply.",
            ["type"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "netid_batch_size", "Items per model call.",
            ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r,
        )
        self.batch_wait = Histogram(
            "netid_batch_wait_seconds", "Time a job waited in the model queue before its batch ran.",
            ["model"], buckets=WAIT_BUCKETS, registry=r,
        )
        self.model_time = Histogram(
            "netid_model_seconds", "Time of one model call on a batch.",
            ["model"], buckets=MODEL_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "netid_queue_depth", "Jobs waiting in the model queue.", ["model"], registry=r,
        )
        self.abandoned = Counter(
            "netid_batch_abandoned", "Queued jobs dropped uncomputed: caller gone, or its deadline would pass first.",
            ["model"], registry=r,
        )
        self.challenge_checks = Counter(
            "netid_challenge_checks", "Spoken-challenge checks, by the stage that decided them "
            "(screen: the alignment alone; background: against the phone loop too; read: by Whisper) and outcome.",
            ["stage", "outcome"], registry=r,
        )
        self.voice_bands = Counter(
            "netid_voice_comparisons", "Voice comparisons, by the band of the enrollment and of the "
            "recording compared (wide: 16 kHz capture; narrow: 8 kHz or telephone band).",
            ["enrolled", "probe"], registry=r,
        )
        self.in_flight = Gauge("netid_in_flight", "Requests being processed.", registry=r)
        self.overloaded = Counter(
            "netid_overloaded", "Requests refused with 'overloaded', by where they were refused.",
            ["where"], registry=r,
        )
        self.rate_limited = Counter(
            "netid_rate_limited", "Requests refused with 'rate_limited'.", registry=r,
        )
        self.credentials = Gauge(
            "netid_credentials", "Credentials by status.", ["status"], registry=r,
        )
        self.connections = Gauge("netid_connections", "Open client connections.", registry=r)
        self.connections_unauthenticated = Gauge(
            "netid_connections_unauthenticated", "Open connections not authenticated as a relying party.", registry=r,
        )
        self.connections_closed = Counter(
            "netid_connections_closed", "Connections closed, by why: peer (it closed or went away), drain, "
            "or the error code sent before closing (frame_too_large, idle_timeout, too_many_connections, ...).",
            ["reason"], registry=r,
        )
        self.frame_bytes = Gauge(
            "netid_partial_frame_bytes", "Bytes reserved for partly received frames over 64 KiB, engine-wide (see LimitsConfig.frame_budget).",
            registry=r,
        )
        self.log_suppressed = Counter(
            "netid_log_lines_suppressed", "Log lines about client mistakes or internal errors held back by the log pacing.",
            registry=r,
        )
        self.paced_seconds = Counter(
            "netid_error_pacing_seconds", "Seconds connections waited before their next frame was read, having provoked "
            "errors faster than LimitsConfig.error_rate.",
            registry=r,
        )
        self.results_not_pushed = Counter(
            "netid_results_not_pushed", "Results not pushed to a relying-party stream, by why (outbox_full, no_stream); "
            "each is kept for fetch_result.",
            ["why"], registry=r,
        )
        self.failed_attempts = Counter(
            "netid_session_failed_attempts", "Verify attempts that did not count against a session (not signed by the "
            "key bound to an active credential), by error code; and sessions closed after too many (code too_many_attempts).",
            ["code"], registry=r,
        )
        #: CPU of the store and state layers' worker threads (netid_layer_cpu_seconds_total)
        self.layer_cpu = LayerCpu()
        r.register(self.layer_cpu)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)


# -- HTTP endpoint ------------------------------------------------------------

_MAX_HEAD = 8192  # bytes of request line + headers
_CONNECTION_DEADLINE = 10.0  # seconds a client gets to send its request and read the reply
_LINGER = 1.0  # seconds spent discarding unread input before closing
_MAX_CONNECTIONS = 64
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"


class _BadRequest(Exception):
    pass


async def serve_http(
    metrics: Metrics,
    *,
    host: str,
    port: int,
    ready: Callable[[], bool],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics, /healthz and /readyz until cancelled.

    ``task_status.started(port)`` reports the bound port (``port=0`` picks a
    free one). ``ready()`` decides /readyz: 200 when true, else 503.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    slots = trio.CapacityLimiter(_MAX_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            return  # too many open connections: close this one at once
        try:
            await _handle(stream, metrics, ready)
        finally:
            slots.release()

    task_status.started(bound_port)
    await trio.serve_listeners(handler, listeners)


async def _handle(stream: trio.SocketStream, metrics: Metrics, ready: Callable[[], bool]) -> None:
    try:
        with trio.move_on_after(_CONNECTION_DEADLINE):
            try:
                head = await _read_head(stream)
            except _BadRequest:
                await _reply(stream, 400, b"bad request\n")
                return
            if head is None:
                return
            method, path = head
            if method not in (b"GET", b"HEAD"):
                await _reply(stream, 405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
                return
            status, ctype, body = _route(path, metrics, ready)
            await _reply(stream, status, body, ctype=ctype, head_only=method == b"HEAD")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception:
        log.exception("metrics endpoint: unexpected error (error id %s)", secrets.token_hex(6))


async def _read_head(stream: trio.SocketStream) -> tuple[bytes, bytes] | None:
    """Read and check the request head; return (method, path) or None on a silent close."""
    buf = bytearray()
    request: tuple[bytes, bytes] | None = None
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            end = buf.find(b"\n\n")
        if request is None and b"\n" in buf:
            # Reject a bad request line before waiting for the headers.
            request = _parse_request_line(bytes(buf[: buf.index(b"\n")]))
        if end >= 0 and request is not None:
            break
        if len(buf) > _MAX_HEAD:
            raise _BadRequest
        data = await stream.receive_some(4096)
        if not data:
            if buf.strip():
                raise _BadRequest  # closed in the middle of a request
            return None
        buf += data
    if end > _MAX_HEAD:
        raise _BadRequest
    lines = bytes(buf[:end]).split(b"\n")
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        name, colon, _ = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise _BadRequest
    return request


def _parse_request_line(line: bytes) -> tuple[bytes, bytes]:
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) != 3:
        raise _BadRequest
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target) or not _VERSION.fullmatch(version):
        raise _BadRequest
    return method, target.split(b"?", 1)[0]


def _route(path: bytes, metrics: Metrics, ready: Callable[[], bool]) -> tuple[int, str, bytes]:
    if path == b"/metrics":
        try:
            return 200, CONTENT_TYPE_LATEST, metrics.render()
        except Exception:
            error_id = secrets.token_hex(6)
            log.exception("metrics endpoint: collecting failed (error id %s)", error_id)
            return 500, _TEXT, f"internal error (id {error_id})\n".encode()
    if path == b"/healthz":
        return 200, _TEXT, b"ok\n"
    if path == b"/readyz":
        try:
            is_ready = bool(ready())
        except Exception:
            log.exception("metrics endpoint: readiness check failed")
            is_ready = False
        return (200, _TEXT, b"ready\n") if is_ready else (503, _TEXT, b"not ready\n")
    return 404, _TEXT, b"not found\n"


async def _reply(
    stream: trio.SocketStream,
    status: int,
    body: bytes,
    *,
    ctype: str = _TEXT,
    extra: bytes = b"",
    head_only: bool = False,
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
    ).encode("ascii") + extra + b"\r\n"
    await stream.send_all(head if head_only else head + body)
    # Lingering close: stop sending, then discard what the client may still
    # send for a moment, so that closing does not reset the connection
    # before the client has read the reply.
    await stream.send_eof()
    with trio.move_on_after(_LINGER):
        while await stream.receive_some(4096):
            pass
