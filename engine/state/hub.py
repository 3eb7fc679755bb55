"""Fan-out of results to the live streams of a relying party in this process.

Used by every ``SessionState``: a shared implementation receives a result from
another node and hands it to this hub for the streams connected here.
"""

from __future__ import annotations

import trio

from .base import Delivery

__all__ = ["ResultHub"]


class ResultHub:
    """Routes pushed results to every live stream of a relying party."""

    def __init__(self) -> None:
        self._streams: dict[str, set[trio.MemorySendChannel]] = {}

    def subscribe(self, rp_id: str, outbox: trio.MemorySendChannel) -> None:
        self._streams.setdefault(rp_id, set()).add(outbox)

    def unsubscribe(self, rp_id: str, outbox: trio.MemorySendChannel) -> None:
        streams = self._streams.get(rp_id)
        if streams is not None:
            streams.discard(outbox)
            if not streams:
                del self._streams[rp_id]

    def publish(self, rp_id: str, message: object) -> Delivery:
        """Push without blocking to every live stream of the relying party. A stream
        that misses a push can still fetch the result by session id."""
        delivered = full = 0
        for outbox in list(self._streams.get(rp_id, ())):
            try:
                outbox.send_nowait(message)
                delivered += 1
            except trio.WouldBlock:
                full += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return Delivery(delivered, full)
