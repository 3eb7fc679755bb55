"""The TCP (optionally TLS) server: one nursery per connection.

Per connection: the engine sends ``hello`` with a fresh nonce; a reader task
decodes frames and starts one task per request (at most ``max_in_flight`` at
once); replies and pushed results go through a bounded outbox to a single
writer task. A malformed request gets an error reply and the connection lives
on; a broken frame gets an error reply and a close; an unexpected exception is
logged with an opaque id and answered ``internal``, never escaping into the
shared nursery.
"""

from __future__ import annotations

import errno
import logging
import secrets
import ssl
import time
from typing import Any

import msgspec
import trio

from . import protocol as P
from .config import EngineConfig
from .errors import DeadlineExceeded, EngineError, Overloaded, TooManyInFlight
from .framing import FrameReader, encode_frame
from .service import Conn, Engine

log = logging.getLogger("engine.server")

__all__ = ["Server", "open_listeners", "port_of"]

_CLOSE = object()


def _error(req_id: int | None, exc: EngineError) -> P.Error:
    return P.Error(id=req_id, code=exc.code, message=exc.message, retry_after_ms=exc.retry_after_ms)


class _Connection:
    def __init__(self, engine: Engine, stream: trio.abc.Stream, server: "Server") -> None:
        self.engine = engine
        self.server = server
        self.stream = stream
        lim = engine.config.limits
        self.limits = lim
        self.send, self.recv = trio.open_memory_channel(lim.outbox)
        self.conn = Conn(nonce=secrets.token_bytes(32), outbox=self.send)
        self.in_flight = 0
        self.metrics = engine.metrics
        self._frames = FrameReader(stream, max_frame=lim.max_frame)

    async def run(self) -> None:
        self.metrics.connections.inc()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                await self.send.send(
                    P.Hello(
                        nonce=self.conn.nonce,
                        engine_key=self.engine.keys.verify_key,
                        engine_box_key=self.engine.keys.box_public_key,
                        max_frame=self.limits.max_frame,
                        max_in_flight=self.limits.max_in_flight,
                    )
                )
                async with trio.open_nursery() as requests:
                    with trio.CancelScope() as reading:
                        self.server._readers.add(reading)
                        if self.server.draining:
                            reading.cancel()
                        try:
                            await self._reader(requests)
                        finally:
                            self.server._readers.discard(reading)
                    if reading.cancelled_caught:
                        await self._refuse_unread()
                # every request answered: let the writer flush and stop
                await self.send.send(_CLOSE)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away: an ordinary end of a connection, not an error
        finally:
            self.engine.disconnect(self.conn)
            self.metrics.connections.dec()
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await self._close()

    async def _close(self) -> None:
        try:
            await self.stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _writer(self) -> None:
        async for msg in self.recv:
            if msg is _CLOSE:
                return
            try:
                await self.stream.send_all(encode_frame(P.encode(msg)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise trio.BrokenResourceError from None
            if isinstance(msg, P.Error) and msg.code in ("frame_too_large", "malformed_frame"):
                return

    async def _refuse_unread(self) -> None:
        """Draining: requests the client sent before it noticed get ``overloaded``, not silence."""
        with trio.move_on_after(0.2):
            while True:
                try:
                    body = await self._frames.read()
                except (EngineError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                if body is None:
                    return
                err = Overloaded("the engine is shutting down", retry_after_ms=1000)
                await self.send.send(_error(P.peek_id(body), err))

    async def _reader(self, requests: trio.Nursery) -> None:
        reader = self._frames
        first = True
        while True:
            try:
                if first:  # a peer that connects and never speaks does not hold a slot for long
                    with trio.move_on_after(self.limits.first_frame_timeout):
                        body = await reader.read()
                        first = False
                    if first:
                        return
                else:
                    body = await reader.read()
            except EngineError as exc:  # broken framing: reply and close
                self.metrics.requests.labels(type="frame", outcome=exc.code).inc()
                await self.send.send(_error(None, exc))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if body is None:
                return
            try:
                req = P.decode_request(body)
            except EngineError as exc:
                self.metrics.requests.labels(type="invalid", outcome=exc.code).inc()
                await self.send.send(_error(P.peek_id(body), exc))
                continue
            if self.in_flight >= self.limits.max_in_flight:
                self.metrics.requests.labels(type=_kind(req), outcome=TooManyInFlight.code).inc()
                await self.send.send(_error(req.id, TooManyInFlight()))
                continue
            self.in_flight += 1
            self.metrics.in_flight.inc()
            requests.start_soon(self._handle, req)

    async def _handle(self, req: Any) -> None:
        kind = _kind(req)
        start = time.perf_counter()
        outcome = "ok"
        try:
            try:
                with trio.fail_after(self.limits.request_deadline):
                    reply = await self.engine.dispatch(self.conn, req)
            except trio.TooSlowError:
                raise DeadlineExceeded() from None
        except EngineError as exc:
            outcome = exc.code
            reply = _error(req.id, exc)
        except Exception:  # never let one request take the connection or the server down
            incident = secrets.token_hex(6)
            log.exception("internal error %s handling %s", incident, kind)
            outcome = "internal"
            reply = P.Error(id=req.id, code="internal", message=f"internal error (incident {incident})")
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
        self.metrics.requests.labels(type=kind, outcome=outcome).inc()
        self.metrics.latency.labels(type=kind).observe(time.perf_counter() - start)
        if outcome == "overloaded":
            self.metrics.overloaded.labels(where=kind).inc()
        try:
            await self.send.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _kind(req: msgspec.Struct) -> str:
    return type(req).__struct_config__.tag  # type: ignore[attr-defined]


def _ssl_context(config: EngineConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    return ctx


async def open_listeners(config: EngineConfig) -> list[trio.abc.Listener]:
    """TCP listeners on the configured address; TLS when a certificate and key are configured."""
    ctx = _ssl_context(config)
    if ctx is not None:
        return await trio.open_ssl_over_tcp_listeners(config.port, ctx, host=config.host)
    return await trio.open_tcp_listeners(config.port, host=config.host)


def port_of(listener: trio.abc.Listener) -> int:
    inner = getattr(listener, "transport_listener", listener)
    return inner.socket.getsockname()[1]


_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Server:
    """Accepts connections and runs each in its own task; drains on request."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.draining = False
        self._accepting = trio.CancelScope()
        self._readers: set[trio.CancelScope] = set()

    async def serve(self, listeners: list[trio.abc.Listener], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained (or cancelled); returns once every connection has finished."""
        async with trio.open_nursery() as connections:
            with self._accepting:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, connections)
                    task_status.started(port_of(listeners[0]))
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(listener)

    def drain(self) -> None:
        """Stop accepting and stop reading new requests; requests in flight are still answered."""
        self.draining = True
        self._accepting.cancel()
        for scope in list(self._readers):
            scope.cancel()

    async def _accept_loop(self, listener: trio.abc.Listener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    log.error("accept failed (%s); retrying", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            connections.start_soon(self._run_connection, stream)

    async def _run_connection(self, stream: trio.abc.Stream) -> None:
        try:
            await _Connection(self.engine, stream, self).run()
        except Exception:
            log.exception("connection handler failed")
