"""The inference seam: one async backend per model, called by that model's batcher.

``InferenceBackend.run(items)`` returns one output per item, in order: a result, or
the :class:`~engine.errors.SampleError` for that item. ``LocalBackend`` runs a
blocking batch function (the ONNX models in this process or in worker processes,
:mod:`engine.inference.extractors`; or the deterministic fake) in trio worker threads behind its
own ``CapacityLimiter``; a remote model server would be another implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar, runtime_checkable

import trio

__all__ = ["InferenceBackend", "LocalBackend"]

In = TypeVar("In")
Out = TypeVar("Out")
In_contra = TypeVar("In_contra", contravariant=True)
Out_co = TypeVar("Out_co", covariant=True)


@runtime_checkable
class InferenceBackend(Protocol[In_contra, Out_co]):
    async def run(self, items: list[In_contra]) -> Sequence[Out_co | Exception]:
        """One output per item, in order; an ``Exception`` instance fails that item only."""
        ...


class LocalBackend(Generic[In, Out]):
    """A blocking batch function, run in up to ``threads`` worker threads at once.

    The limiter is private (and never contended when ``threads`` matches the
    batcher's workers), so model calls never queue behind other work on trio's
    default thread limiter."""

    def __init__(self, fn: Callable[[list[In]], Sequence[Out | Exception]], *, threads: int = 1) -> None:
        self._fn = fn
        self._limiter = trio.CapacityLimiter(threads)

    async def run(self, items: list[In]) -> Sequence[Out | Exception]:
        return await trio.to_thread.run_sync(self._fn, items, limiter=self._limiter)
