"""Length-prefixed frames over a trio byte stream.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
MessagePack. The length is checked against the configured maximum before any
of the body is read, so an oversized frame never costs memory. A zero-length
frame is malformed (it cannot hold a MessagePack message).

    reader = FrameReader(stream, max_frame=limits.max_frame)
    while (payload := await reader.read()) is not None:
        ...
    await stream.send_all(encode_frame(reply))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from engine.errors import FrameBudgetExhausted, FrameTooLarge, IdleTimeout, MalformedFrame, TooSlow

__all__ = ["HEADER_SIZE", "MAX_LENGTH", "SMALL_FRAME", "Budget", "FrameReader", "encode_frame"]

HEADER_SIZE = 4
#: Largest length the 4-byte header can express.
MAX_LENGTH = 2**32 - 1
#: Most bytes asked of the stream per receive; at most this much is read past a frame's end.
_RECEIVE_SIZE = 65536
#: Frames at least this large get a buffer of their own, dropped once the frame is returned.
_LARGE = 1 << 20
#: Frames up to this size are not reserved from the budget: a relying party's requests and
#: a holder's small ones are never refused for memory that large uploads hold. What they can
#: hold is bounded otherwise: by the number of connections times this, and by the minimum
#: receive rate, which ends a frame held open for long.
SMALL_FRAME = 65536


class Budget(Protocol):
    """Memory shared by every connection's partly received frames (engine.server.limits.FrameBudget)."""

    def try_reserve(self, size: int) -> bool: ...
    def release(self, size: int) -> None: ...


def encode_frame(payload: bytes) -> bytes:
    """The frame carrying ``payload`` (header + payload, one copy)."""
    size = len(payload)
    if size == 0:
        raise ValueError("a frame cannot be empty")
    if size > MAX_LENGTH:
        raise ValueError("payload too large for a 4-byte length prefix")
    return size.to_bytes(HEADER_SIZE, "big") + payload


class FrameReader:
    """Reads frames from a ``trio.abc.ReceiveStream``.

    Bytes received past the end of a frame are kept for the next one, so
    pipelined frames cost one receive per chunk, not per frame. The reader
    does not own the stream and never closes it.

    The server also gives it the limits of a connection: ``min_rate`` bytes/s
    over each ``window`` seconds once a frame has begun (``TooSlow``), a
    ``budget`` that every frame's length is reserved from until the frame is
    complete (frames over ``SMALL_FRAME`` only; ``FrameBudgetExhausted``), and, per :meth:`read`, an idle timeout
    for the first byte of the next frame (``IdleTimeout``).
    """

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        max_frame: int,
        *,
        min_rate: int = 0,
        window: float = 10.0,
        budget: Budget | None = None,
    ) -> None:
        if isinstance(max_frame, bool) or not isinstance(max_frame, int) or not 1 <= max_frame <= MAX_LENGTH:
            raise ValueError("max_frame must be between 1 and 2**32 - 1")
        self._stream = stream
        self._max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of the unread bytes in _buf
        self._min_rate = min_rate
        self._window = window
        self._budget = budget
        self._window_end = 0.0
        self._window_bytes = 0
        self.reserved = 0  # bytes of the budget held for the frame being read
        self.last_receive = trio.current_time() if _in_trio() else 0.0

    @property
    def max_frame(self) -> int:
        return self._max_frame

    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame."""
        return len(self._buf) - self._pos

    def in_frame(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return self.buffered() > 0

    async def read(
        self,
        *,
        idle_timeout: float | None = None,
        admit: Callable[[int], Awaitable[None]] | None = None,
    ) -> bytes | None:
        """The next frame's payload, or None at a clean end of stream.

        Raises ``IdleTimeout`` if no byte of the next frame arrives within
        ``idle_timeout`` seconds (nothing is consumed: calling again is safe),
        ``FrameTooLarge`` if the announced length exceeds ``max_frame`` (before
        reading the body), ``MalformedFrame`` for a zero length or an end of
        stream in the middle of a frame, ``TooSlow`` and
        ``FrameBudgetExhausted`` as above. ``admit(length)`` is awaited before
        the body is read (the server waits there for room on the connection).
        """
        if self.buffered() == 0:
            got = True
            if idle_timeout is None:
                got = await self._receive_one()
            else:
                with trio.move_on_after(idle_timeout) as scope:
                    got = await self._receive_one()
                if scope.cancelled_caught:
                    raise IdleTimeout()
            if not got:
                return None
        self._start_window()
        if not await self._fill(HEADER_SIZE):
            raise MalformedFrame("the stream ended inside a frame header")
        start = self._pos
        length = int.from_bytes(self._buf[start : start + HEADER_SIZE], "big")  # 4-byte copy
        if length == 0:
            raise MalformedFrame("zero-length frame")
        if length > self._max_frame:
            raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self._max_frame}")
        if admit is not None:
            await admit(length)
            self._start_window()  # the time spent waiting for room was the engine's, not the peer's
        if self._budget is not None and length > SMALL_FRAME:
            if not self._budget.try_reserve(length):
                raise FrameBudgetExhausted(retry_after_ms=1000)
            self.reserved = length
        try:
            if not await self._fill(HEADER_SIZE + length):
                raise MalformedFrame("the stream ended inside a frame")
        finally:
            self.release()
        body_start = self._pos + HEADER_SIZE  # _fill may have moved the unread bytes
        with memoryview(self._buf) as view:  # one copy, not two
            payload = bytes(view[body_start : body_start + length])
        self._pos = body_start + length
        if length >= _LARGE and self._pos == len(self._buf):
            self._buf, self._pos = bytearray(), 0  # hand a large buffer back at once
        return payload

    def release(self) -> None:
        """Give the frame's reservation back to the budget (also when the connection ends)."""
        if self.reserved and self._budget is not None:
            self._budget.release(self.reserved)
        self.reserved = 0

    def _start_window(self) -> None:
        self._window_end = trio.current_time() + self._window
        self._window_bytes = 0

    async def _receive_one(self, want: int = _RECEIVE_SIZE) -> bool:
        if self._pos and self._pos == len(self._buf):
            self._buf, self._pos = bytearray(), 0
        data = await self._stream.receive_some(want)
        if not data:
            return False
        self._buf += data
        self._window_bytes += len(data)
        self.last_receive = trio.current_time()
        return True

    async def _fill(self, needed: int) -> bool:
        """Make ``needed`` unread bytes available; False if the stream ends first."""
        if self.buffered() >= needed:
            return True
        # Drop consumed bytes before growing the buffer: each byte is moved
        # at most once per frame, never once per receive.
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        while len(self._buf) < needed:
            want = min(_RECEIVE_SIZE, max(needed - len(self._buf), 4096))
            if not self._min_rate:
                if not await self._receive_one(want):
                    return False
                continue
            with trio.move_on_at(self._window_end):
                if not await self._receive_one(want):
                    return False
            if trio.current_time() >= self._window_end and len(self._buf) < needed:
                if self._window_bytes < self._min_rate * self._window:
                    raise TooSlow(f"fewer than {self._min_rate} bytes/s inside a frame")
                self._start_window()
        return True


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
