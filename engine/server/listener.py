"""The TCP (optionally TLS) server: admission, one task per connection, drain.

Each accepted connection is counted in a :class:`~engine.server.limits.ConnectionTable` (at a cap,
the quietest idle unauthenticated connection is evicted to make room, or the new one is
refused with ``too_many_connections``) and then runs as an
:class:`~engine.server.connection.Connection`, whose errors never escape into the shared nursery.
All connections share one :class:`~engine.server.limits.FrameBudget` for partly received frames
and two log pacers (client mistakes, internal errors).
"""

from __future__ import annotations

import errno
import logging
import ssl

import trio

from engine.wire import protocol as P
from engine.config import EngineConfig
from engine.server.connection import Connection, close_gracefully
from engine.wire.framing import encode_frame
from engine.server.limits import ConnectionTable, FrameBudget, LogPacer
from engine.flows import Engine

log = logging.getLogger("engine.server.listener")

__all__ = ["Server", "open_listeners", "port_of"]


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
        lim, m = engine.config.limits, engine.metrics
        self.table = ConnectionTable(
            max_connections=lim.max_connections,
            max_unauthenticated=lim.max_unauthenticated,
            on_change=lambda _total, unauth: m.connections_unauthenticated.set(unauth),
        )
        self.budget = FrameBudget(lim.frame_budget, on_change=m.frame_bytes.set)
        self.client_log = LogPacer(log, per_second=1.0, burst=20)
        self.error_log = LogPacer(log, per_second=0.2, burst=10)

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
                    # out of file descriptors: make room by closing an idle unauthenticated
                    # connection, so that idle peers cannot lock relying parties out
                    evicted = self.table.evict_one()
                    if not self.error_log.log(logging.ERROR, "accept failed (%s); %s", exc, "evicted an idle connection" if evicted else "retrying"):
                        self.engine.metrics.log_suppressed.inc()
                    await trio.sleep(0.02 if evicted else 0.1)
                    continue
                raise
            connections.start_soon(self._run_connection, stream)

    async def _run_connection(self, stream: trio.abc.Stream) -> None:
        conn = Connection(self.engine, stream, self)
        if not self.table.admit(conn):
            await self._refuse(stream)
            return
        try:
            await conn.run()
        except Exception:
            if not self.error_log.log(logging.ERROR, "connection handler failed", exc_info=True):
                self.engine.metrics.log_suppressed.inc()

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        """No room: say so in one frame (in place of hello) and close."""
        self.engine.metrics.connections_closed.labels(reason="refused").inc()
        err = P.Error(code="too_many_connections", message="The engine has no room for another connection; retry later.", retry_after_ms=1000)
        with trio.move_on_after(self.engine.config.limits.linger + 2.0):
            try:
                await stream.send_all(encode_frame(P.encode(err)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            await close_gracefully(stream, min(self.engine.config.limits.linger, 0.25))
