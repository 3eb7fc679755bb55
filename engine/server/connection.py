"""One client connection: ``hello``, a reader, a writer, one task per request.

The reader decodes frames and starts a task per request (at most ``max_in_flight`` at once);
replies and pushed results go through a bounded outbox to the single writer. What reaches
the engine from the wire, and what it does:

- a well-framed body that is not a valid request (any bytes at all: invalid UTF-8, nesting
  past the interpreter's limit, an array, odd extra fields) is answered ``invalid_message`` or
  ``unknown_message``, with the request's id when it can be read; the connection lives on;
- a broken frame (``frame_too_large``, ``malformed_frame``) or a connection limit
  (``idle_timeout``, ``too_slow``, ``frame_budget``, ``too_many_connections``) stops the
  reading; every request already in flight is answered, then the error, then the engine
  half-closes, discards what the peer still sends for up to ``linger`` seconds and closes, so
  that the error frame is delivered rather than lost to a reset;
- an unexpected exception in a request is answered ``internal`` with an opaque incident id
  and never escapes into the shared nursery.

Client mistakes are counted in the metrics and logged at most once per connection, without
a traceback, through a pacer shared by all connections (engine.server.limits.LogPacer).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from engine.wire import protocol as P
from engine.errors import DeadlineExceeded, EngineError, IdleTimeout, InvalidMessage, Overloaded, TooManyConnections, TooManyInFlight
from engine.wire.framing import FrameReader, encode_frame
from engine.flows import Conn, Engine

if TYPE_CHECKING:
    from engine.server.listener import Server

log = logging.getLogger("engine.server.listener")

__all__ = ["Connection"]

_CLOSE = object()
_ids = itertools.count(1)
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError)


def _error(req_id: int | None, exc: EngineError) -> P.Error:
    return P.Error(id=req_id, code=exc.code, message=exc.message, retry_after_ms=exc.retry_after_ms)


def _kind(req: msgspec.Struct) -> str:
    return type(req).__struct_config__.tag  # type: ignore[attr-defined]


#: Error codes that say something about the engine's state or the protocol's normal course,
#: not about a client's mistake: they never slow a connection down (LimitsConfig.error_rate).
UNPACED = frozenset({
    "overloaded", "rate_limited", "deadline_exceeded", "unavailable", "internal", "too_many_in_flight",
    "result_pending", "session_expired", "session_used",
})


class Connection:
    def __init__(self, engine: Engine, stream: trio.abc.Stream, server: Server) -> None:
        self.engine = engine
        self.server = server
        self.stream = stream
        lim = engine.config.limits
        self.limits = lim
        self.send, self.recv = trio.open_memory_channel(lim.outbox)
        self.conn = Conn(nonce=secrets.token_bytes(32), outbox=self.send)
        self.id = next(_ids)
        self.in_flight = 0
        self.body_bytes = 0  # request bodies in flight
        self.metrics = engine.metrics
        self.frames = FrameReader(stream, max_frame=lim.max_frame, min_rate=lim.min_receive_rate, window=lim.rate_window, budget=server.budget)
        self.evicted = False
        self._reading: trio.CancelScope | None = None
        self._room = trio.lowlevel.ParkingLot()  # the reader waits here for in-flight bodies to finish
        self._logged = False
        self._error_room = float(lim.error_burst)  # errors it may still provoke at once
        self._error_at = trio.current_time()

    # ---- for the connection table ----------------------------------------------------------------
    def quiet_since(self) -> float:
        return self.frames.last_receive

    def evict(self) -> None:
        """Close to make room: stop reading, answer what is in flight, say why, close."""
        self.evicted = True
        if self._reading is not None:
            self._reading.cancel()

    # ---- life ------------------------------------------------------------------------------------
    async def run(self) -> None:
        self.metrics.connections.inc()
        reason = "peer"
        graceful = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                await self.send.send(
                    P.Hello(
                        version=P.PROTOCOL_VERSION,
                        nonce=self.conn.nonce,
                        engine_key=self.engine.keys.verify_key,
                        engine_box_key=self.engine.keys.box_public_key,
                        max_frame=self.limits.max_frame,
                        max_in_flight=self.limits.max_in_flight,
                    )
                )
                fatal: EngineError | None = None
                async with trio.open_nursery() as requests:
                    with trio.CancelScope() as reading:
                        self._reading = reading
                        self.server._readers.add(reading)
                        if self.server.draining or self.evicted:
                            reading.cancel()
                        try:
                            fatal = await self._reader(requests)
                        finally:
                            self.server._readers.discard(reading)
                            self.frames.release()
                    if reading.cancelled_caught:
                        if self.evicted:
                            fatal = TooManyConnections("closed to make room for another connection", retry_after_ms=1000)
                        else:
                            reason = "drain"
                            await self._refuse_unread()
                # every request in flight has been answered: now the error, if any, then close
                if fatal is not None:
                    reason = fatal.code
                    await self.send.send(_error(None, fatal))
                await self.send.send(_CLOSE)
            graceful = True
        except* trio.TooSlowError:
            reason = "write_timeout"  # the peer stopped reading its replies
        except* _GONE:
            pass  # the peer went away: an ordinary end of a connection, not an error
        finally:
            self.server.table.remove(self)
            self.frames.release()
            self.engine.disconnect(self.conn)
            self.metrics.connections.dec()
            self.metrics.connections_closed.labels(reason=reason).inc()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.limits.linger + 1.0):
                    await close_gracefully(self.stream, self.limits.linger if graceful else 0.0)

    async def _writer(self) -> None:
        try:
            async for msg in self.recv:
                if msg is _CLOSE:
                    return
                with trio.fail_after(self.limits.write_timeout):
                    try:
                        await self.stream.send_all(encode_frame(P.encode(msg)))
                    except _GONE:
                        raise trio.BrokenResourceError from None
        finally:
            self.recv.close()  # pushes from now on fail at once (counted), they do not pile up

    async def _refuse_unread(self) -> None:
        """Draining: requests the client sent before it noticed get ``overloaded``, not silence."""
        with trio.move_on_after(0.2):
            while True:
                try:
                    body = await self.frames.read()
                except (EngineError, *_GONE):
                    return
                if body is None:
                    return
                err = Overloaded("the engine is shutting down", retry_after_ms=1000)
                await self.send.send(_error(P.peek_id(body), err))

    def _idle_timeout(self, first: bool) -> float:
        if first:
            return self.limits.first_frame_timeout
        return self.limits.rp_idle_timeout if self.conn.rp is not None else self.limits.idle_timeout

    async def _admit(self, length: int) -> None:
        """Wait until the frame fits in the connection's byte bound (never for the first body)."""
        while self.body_bytes and self.body_bytes + length > self.limits.max_connection_bytes:
            await self._room.park()

    def _error_bucket(self) -> float:
        now = trio.current_time()
        lim = self.limits
        self._error_room = min(float(lim.error_burst), self._error_room + (now - self._error_at) * lim.error_rate)
        self._error_at = now
        return self._error_room

    def _provoked(self, code: str) -> None:
        """Count an error reply against the connection's pace (LimitsConfig.error_rate)."""
        if self.limits.error_rate > 0 and code not in UNPACED:
            self._error_bucket()
            self._error_room -= 1.0

    async def _pace(self) -> None:
        """Before reading the next frame: wait while the connection is past its error pace."""
        if self.limits.error_rate > 0 and self._error_bucket() < 0:
            wait = -self._error_room / self.limits.error_rate
            self.metrics.paced_seconds.inc(wait)
            await trio.sleep(wait)

    async def _reader(self, requests: trio.Nursery) -> EngineError | None:
        """Read and dispatch until the peer's end of stream (None) or a fatal error (returned)."""
        first = True
        while True:
            await self._pace()
            try:
                body = await self.frames.read(idle_timeout=self._idle_timeout(first), admit=self._admit)
            except IdleTimeout as exc:
                if self.in_flight:
                    continue  # waiting for its replies is not idleness
                return exc
            except EngineError as exc:  # broken framing, too slow, no budget: reply and close
                self.metrics.requests.labels(type="frame", outcome=exc.code).inc()
                self._note(exc)
                return exc
            except _GONE:
                return None
            if body is None:
                return None
            first = False
            try:
                req = P.decode_request(body)
            except EngineError as exc:
                await self._refuse(body, exc)
                continue
            except Exception:  # decode_request is total; this is the belt to its braces
                await self._refuse(body, InvalidMessage("undecodable request"))
                continue
            if self.in_flight >= self.limits.max_in_flight:
                self.metrics.requests.labels(type=_kind(req), outcome=TooManyInFlight.code).inc()
                await self.send.send(_error(req.id, TooManyInFlight()))
                continue
            self.in_flight += 1
            self.body_bytes += len(body)
            self.metrics.in_flight.inc()
            requests.start_soon(self._handle, req, len(body))

    async def _refuse(self, body: bytes, exc: EngineError) -> None:
        self.metrics.requests.labels(type="invalid", outcome=exc.code).inc()
        self._provoked(exc.code)
        self._note(exc)
        await self.send.send(_error(P.peek_id(body), exc))

    def _note(self, exc: EngineError) -> None:
        """A client's mistake: one paced log line per connection at most, no traceback."""
        if self._logged:
            return
        self._logged = True
        if not self.server.client_log.log(logging.INFO, "connection %d: %s: %s", self.id, exc.code, exc.message[:160]):
            self.metrics.log_suppressed.inc()

    async def _handle(self, req: Any, size: int) -> None:
        kind = _kind(req)
        start = time.perf_counter()
        outcome = "ok"
        try:
            try:
                with trio.fail_after(self.limits.request_deadline):
                    reply = await self.engine.dispatch(self.conn, req)
            except trio.TooSlowError:
                raise DeadlineExceeded() from None
            if self.conn.rp is not None:
                self.server.table.authenticated(self)
        except EngineError as exc:
            outcome = exc.code
            reply = _error(req.id, exc)
        except Exception:  # never let one request take the connection or the server down
            incident = secrets.token_hex(6)
            if not self._logged:
                self._logged = True
                if not self.server.error_log.log(logging.ERROR, "internal error %s handling %s", incident, kind, exc_info=True):
                    self.metrics.log_suppressed.inc()
            outcome = "internal"
            reply = P.Error(id=req.id, code="internal", message=f"internal error (incident {incident})")
        finally:
            self.in_flight -= 1
            self.body_bytes -= size
            self._room.unpark_all()
            self.metrics.in_flight.dec()
        self.metrics.requests.labels(type=kind, outcome=outcome).inc()
        if outcome != "ok":
            self._provoked(outcome)
        self.metrics.latency.labels(type=kind).observe(time.perf_counter() - start)
        if outcome == "overloaded":
            self.metrics.overloaded.labels(where=kind).inc()
        try:
            await self.send.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def close_gracefully(stream: trio.abc.Stream, linger: float) -> None:
    """Half-close, discard what the peer still sends (until its end of stream, a quiet
    quarter second, or ``linger`` seconds), then close: the last frame is not lost to a reset."""
    if linger > 0:
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            with trio.move_on_after(linger):
                while True:
                    with trio.move_on_after(min(0.25, linger)) as quiet:
                        data = await stream.receive_some(65536)
                    if quiet.cancelled_caught or not data:
                        break
        except _GONE:
            pass
    try:
        await stream.aclose()
    except _GONE:
        pass
