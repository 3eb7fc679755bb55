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

import trio

from .errors import FrameTooLarge, MalformedFrame

__all__ = ["HEADER_SIZE", "MAX_LENGTH", "FrameReader", "encode_frame"]

HEADER_SIZE = 4
#: Largest length the 4-byte header can express.
MAX_LENGTH = 2**32 - 1
#: Bytes asked of the stream per receive.
_RECEIVE_SIZE = 65536


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
    """

    def __init__(self, stream: trio.abc.ReceiveStream, max_frame: int) -> None:
        if isinstance(max_frame, bool) or not isinstance(max_frame, int) or not 1 <= max_frame <= MAX_LENGTH:
            raise ValueError("max_frame must be between 1 and 2**32 - 1")
        self._stream = stream
        self._max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of the unread bytes in _buf

    @property
    def max_frame(self) -> int:
        return self._max_frame

    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame."""
        return len(self._buf) - self._pos

    async def read(self) -> bytes | None:
        """The next frame's payload, or None at a clean end of stream.

        Raises ``FrameTooLarge`` if the announced length exceeds ``max_frame``
        (before reading the body) and ``MalformedFrame`` for a zero length or
        an end of stream in the middle of a frame.
        """
        if not await self._fill(HEADER_SIZE):
            if self.buffered() == 0:
                return None
            raise MalformedFrame("the stream ended inside a frame header")
        start = self._pos
        length = int.from_bytes(self._buf[start : start + HEADER_SIZE], "big")  # 4-byte copy
        if length == 0:
            raise MalformedFrame("zero-length frame")
        if length > self._max_frame:
            raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self._max_frame}")
        if not await self._fill(HEADER_SIZE + length):
            raise MalformedFrame("the stream ended inside a frame")
        body_start = self._pos + HEADER_SIZE  # _fill may have moved the unread bytes
        with memoryview(self._buf) as view:  # one copy, not two
            payload = bytes(view[body_start : body_start + length])
        self._pos = body_start + length
        return payload

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
            data = await self._stream.receive_some(_RECEIVE_SIZE)
            if not data:
                return False
            self._buf += data
        return True
