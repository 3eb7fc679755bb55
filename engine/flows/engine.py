"""The engine: the flows behind one dispatcher, with admission control and a life cycle.

The server calls :meth:`Engine.dispatch` with typed requests; each request type has
one flow (a function of the :class:`~engine.flows.context.Context`) that returns a
typed reply or raises an :class:`~engine.errors.EngineError`. :meth:`Engine.run`
loads the duplicate search, warms the models and starts the batchers and the state's
background work. The engine is assembled by :func:`engine.app.build_engine`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from engine.wire import protocol as P
from ..errors import Overloaded
from .context import Context
from .enroll import handle_enroll
from .holder import handle_rebind, handle_report_lost, handle_status, report_lost
from .relying_party import Conn, handle_auth, handle_fetch_result, handle_open_session
from .upgrade import handle_upgrade
from .verify import handle_verify

log = logging.getLogger("engine.flows")

__all__ = ["Engine"]


async def handle_ping(ctx: Context, conn: Conn, req: P.Ping) -> P.Pong:
    return P.Pong(id=req.id)


Flow = Callable[[Context, Conn, Any], Awaitable[msgspec.Struct]]

#: The flow of each request type, by the name of the engine's method that runs it.
HANDLERS: dict[type, str] = {
    P.Auth: "handle_auth",
    P.OpenSession: "handle_open_session",
    P.FetchResult: "handle_fetch_result",
    P.Verify: "handle_verify",
    P.Enroll: "handle_enroll",
    P.Rebind: "handle_rebind",
    P.ReportLost: "handle_report_lost",
    P.Status: "handle_status",
    P.Upgrade: "handle_upgrade",
    P.Ping: "handle_ping",
}


def _on_ctx(flow: Flow) -> Callable[[Engine, Conn, Any], Awaitable[msgspec.Struct]]:
    """An engine method that runs ``flow`` in the engine's context."""

    async def handle(self: Engine, conn: Conn, req: Any) -> msgspec.Struct:
        return await flow(self.ctx, conn, req)

    handle.__name__ = handle.__qualname__ = flow.__name__
    handle.__doc__ = flow.__doc__
    return handle


#: Seconds between probes of the store and the state's services (for /readyz).
PROBE_EVERY = 1.0

#: Requests that run the models: admitted against the engine-wide limits first.
BIOMETRIC = (P.Verify, P.Enroll, P.Rebind, P.ReportLost)


class Engine:
    def __init__(self, ctx: Context, *, extractors: Any = None, owns_extractors: bool = False) -> None:
        self.ctx = ctx
        self.x = extractors  # the local extractors, when the models run here (engine.inference.extractors)
        self.owns_extractors = owns_extractors
        self.ready = False  # warmed up and serving
        self.reachable = True  # the store and the state's services answered the last probe
        self._biometric = 0  # biometric requests admitted and not yet answered

    # the seams, for the server, the operator tools and tests
    config = property(lambda self: self.ctx.config)
    store = property(lambda self: self.ctx.store)
    state = property(lambda self: self.ctx.state)
    keys = property(lambda self: self.ctx.keys)
    metrics = property(lambda self: self.ctx.metrics)
    inference = property(lambda self: self.ctx.inference)
    matcher = property(lambda self: self.ctx.matcher)
    duplicates = property(lambda self: self.ctx.duplicates)
    cipher = property(lambda self: self.ctx.templates.cipher)

    @property
    def clock(self) -> Callable[[], float]:
        return self.ctx.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.ctx.clock = clock

    handle_auth = _on_ctx(handle_auth)
    handle_open_session = _on_ctx(handle_open_session)
    handle_fetch_result = _on_ctx(handle_fetch_result)
    handle_verify = _on_ctx(handle_verify)
    handle_enroll = _on_ctx(handle_enroll)
    handle_rebind = _on_ctx(handle_rebind)
    handle_report_lost = _on_ctx(handle_report_lost)
    handle_status = _on_ctx(handle_status)
    handle_upgrade = _on_ctx(handle_upgrade)
    handle_ping = _on_ctx(handle_ping)

    # ---- life cycle ------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Load the duplicate search, warm the models, start the batchers and the state's
        background work; report ready; run until cancelled."""
        held = await self.ctx.db(self.ctx.duplicates.load)
        log.info("duplicate search loaded: %d face templates", held)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.ctx.inference.run)
            await nursery.start(self.ctx.state.run, lambda: self.ctx.clock())
            nursery.start_soon(self._probe)
            self.ready = True
            await self.ctx.refresh_credential_gauge()
            task_status.started()

    async def _probe(self) -> None:
        """Every ``PROBE_EVERY`` seconds, ask the store and the state whether their services
        answer; ``reachable`` holds the last answer (for /readyz, not for each request)."""
        while True:
            # a thread of its own, not the store's limiter: requests queued there must not delay it
            up = await trio.to_thread.run_sync(self.ctx.store.healthy) and await self.ctx.state.healthy()
            if up != self.reachable:
                if up:
                    log.info("the store and the shared state answer again: ready")
                else:
                    log.warning("the store or the shared state is unreachable: not ready")
                self.reachable = up
            await trio.sleep(PROBE_EVERY)

    def close(self) -> None:
        """Write the duplicate search's index (if it moved), release the store and, if the
        engine made them, the models' worker processes."""
        try:
            self.ctx.duplicates.flush()
        except Exception:  # the next start-up replays the log instead
            log.exception("the duplicate search's index could not be written")
        self.ctx.store.close()
        if self.owns_extractors:
            self.ctx.inference.close()

    def disconnect(self, conn: Conn) -> None:
        if conn.rp is not None:
            self.ctx.state.unsubscribe(conn.rp.rp_id, conn.outbox)

    async def report_lost(self, card_number: str, *, actor: str) -> list[str]:
        return await report_lost(self.ctx, card_number, actor=actor)

    # ---- dispatch --------------------------------------------------------------------------------
    def queue_wait(self) -> float:
        """Estimated seconds a new job would wait in the slowest model queue (backlog x batch time)."""
        return self.ctx.inference.queue_wait()

    async def dispatch(self, conn: Conn, req: P.Request) -> msgspec.Struct:
        handler = getattr(self, HANDLERS[type(req)])
        if not isinstance(req, BIOMETRIC):
            return await handler(conn, req)
        # Admission control: beyond capacity, answer at once rather than queue past deadlines.
        lim = self.ctx.config.limits
        wait = self.queue_wait()
        if self._biometric >= lim.max_biometric or (self._biometric >= lim.min_admitted and wait > lim.admission_wait):
            raise Overloaded(retry_after_ms=max(100, int(wait * 1000)))
        self._biometric += 1
        try:
            return await handler(conn, req)
        finally:
            self._biometric -= 1
