"""The models as the flows see them: face, voice and challenge check behind batchers.

:class:`Inference` owns one :class:`~engine.inference.batcher.Batcher` per model,
each calling that model's :class:`~engine.inference.backend.InferenceBackend`, and
decodes audio in worker threads. :func:`local_inference` builds it on the local
extractors (:mod:`engine.inference.extractors`): the real ONNX models or the unit tests' fake.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from .backend import InferenceBackend, LocalBackend
from .batcher import Batcher, BatcherConfig, SharedSlots

if TYPE_CHECKING:
    from engine.inference.extractors import Extractors
    from engine.ops.metrics import Metrics
    from engine.inference.speaker import SpeakerEmbedding

__all__ = ["Inference", "local_inference"]

#: Recordings decoded at once (worker threads).
DECODE_THREADS = 2


class Inference:
    def __init__(
        self,
        *,
        face: InferenceBackend,
        voice: InferenceBackend,
        challenge: InferenceBackend,
        decode_audio: Callable[[bytes, str], Any],
        batching: tuple[BatcherConfig, BatcherConfig, BatcherConfig],
        metrics: Metrics | None = None,
        warmup: Callable[[], None] = lambda: None,
        close: Callable[[], None] = lambda: None,
        shared: SharedSlots | None = None,
        pooled: frozenset[str] = frozenset(),
    ) -> None:
        face_cfg, voice_cfg, challenge_cfg = batching
        # The batchers whose models share worker processes (``pooled``) take turns for them,
        # the oldest job first, so that a batch waits in its batcher's queue, where admission
        # sees it, and not in the pool's.
        self._shared = shared if pooled else None
        slots = lambda name: self._shared if name in pooled else None  # noqa: E731
        self.face_batcher = Batcher("face", face, face_cfg, metrics=metrics, shared=slots("face"))
        self.voice_batcher = Batcher("voice", voice, voice_cfg, metrics=metrics, shared=slots("voice"))
        self.challenge_batcher = Batcher("challenge", challenge, challenge_cfg, metrics=metrics, shared=slots("challenge"))
        self._decode = decode_audio
        self._decode_limiter = trio.CapacityLimiter(DECODE_THREADS)
        self._warmup = warmup
        self.close = close

    async def face(self, image: bytes) -> np.ndarray:
        """The face embedding of an image; ``NoFace`` and the like as errors."""
        return await self.face_batcher.submit(image)

    async def decode_audio(self, data: bytes, fmt: str) -> Any:
        return await trio.to_thread.run_sync(self._decode, data, fmt, limiter=self._decode_limiter)

    async def voice(self, pcm: Any) -> SpeakerEmbedding:
        return await self.voice_batcher.submit(pcm)

    async def challenge(self, pcm: Any, expected: str) -> Any:
        """The check of what a recording says (an ``engine.challenge.Verdict``)."""
        return await self.challenge_batcher.submit((pcm, expected))

    def queue_wait(self) -> float:
        """Estimated seconds a new job would wait in the slowest model queue; for the
        batchers that share worker processes, the work queued in all of them over the
        processes."""
        batchers = (self.face_batcher, self.voice_batcher, self.challenge_batcher)
        waits = [b.queue_wait() for b in batchers if b.shared is None]
        if self._shared is not None:
            waits.append(sum(b.queued_work() for b in batchers if b.shared is not None) / self._shared.processes)
        return max(waits, default=0.0)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Warm the models, start the batchers; runs until cancelled."""
        await trio.to_thread.run_sync(self._warmup)
        async with trio.open_nursery() as nursery:
            for b in (self.face_batcher, self.voice_batcher, self.challenge_batcher):
                await nursery.start(b.run)
            task_status.started()


def local_inference(extractors: Extractors, batching: tuple[BatcherConfig, BatcherConfig, BatcherConfig], *, metrics: Metrics | None = None) -> Inference:
    """The local extractors, each batch function in as many threads as its batcher has
    workers; a batcher whose model shares the worker processes gets at least a worker per
    shared slot, so that its batches can wait for any of them."""
    shared = SharedSlots(extractors.pool_processes) if extractors.pool_processes > 0 else None
    if shared is not None:
        names = ("face", "voice", "challenge")
        batching = tuple(replace(cfg, workers=max(cfg.workers, shared.total)) if name in extractors.pooled else cfg
                         for name, cfg in zip(names, batching, strict=True))  # type: ignore[assignment]
    face_cfg, voice_cfg, challenge_cfg = batching
    return Inference(
        face=LocalBackend(extractors.face_batch, threads=face_cfg.workers),
        voice=LocalBackend(extractors.voice_batch, threads=voice_cfg.workers),
        challenge=LocalBackend(extractors.challenge_batch, threads=challenge_cfg.workers),
        decode_audio=extractors.decode_audio,
        batching=batching,
        metrics=metrics,
        warmup=extractors.warmup,
        close=extractors.close,
        shared=shared,
        pooled=extractors.pooled,
    )
