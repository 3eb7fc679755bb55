"""The extractor seam: what the service needs from the biometric models.

Two implementations stand behind it: :func:`onnx_extractors` (the real ONNX
models: YuNet + SFace, CAM++, and the spoken-challenge check: Whisper, or pocketsphinx) and
:func:`fake_extractors`, a deterministic stand-in for unit tests of batching
and protocol. The fake derives an identity from a marker at the start of the
sample bytes (``b"FACE:alice:..."``, ``b"VOICE:alice:..."``), so tests can
make genuine and impostor samples without models.

Every ``*_batch`` call returns one entry per input, in order: a result, or the
:class:`~engine.errors.SampleError` instance for that input.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.errors import ModelMissing, NoFace, NoSpeech, SampleError, UndecodableSample

__all__ = ["Extractors", "onnx_extractors", "fake_extractors"]

log = logging.getLogger("engine.inference.extractors")

Pcm = Any  # float32 16 kHz mono audio (np.ndarray); opaque bytes for the fake
_ORPHAN_POLL = 0.5  # seconds between a worker's checks that the engine still runs
#: A challenge worker hands freed heap back to the system every this many passes: the
#: decoders' buffers vary with each recording's length and the heap kept growing (800
#: checks of recordings drawn at random: +323 MiB in the two workers without it, +205 with
#: it; benchmarks/TUNING.md section 7).
_TRIM_EVERY = 20
_passes = 0


@dataclass(frozen=True)
class Extractors:
    face_dim: int
    voice_dim: int
    #: list[image bytes] -> list[embedding | SampleError]
    face_batch: Callable[[list[bytes]], list]
    #: (audio bytes, format) -> Pcm, raises SampleError
    decode_audio: Callable[[bytes, str], Pcm]
    #: list[Pcm] -> list[embedding | SampleError]
    voice_batch: Callable[[list[Pcm]], list]
    #: list[(Pcm, expected challenge)] -> list[Verdict | SampleError] (engine.challenge.Verdict)
    challenge_batch: Callable[[list[tuple[Pcm, str]]], list]
    warmup: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None
    #: Worker processes the batch functions named in ``pooled`` ("face", "voice",
    #: "challenge") share (0: none shared).
    pool_processes: int = 0
    pooled: frozenset[str] = frozenset()


# ---- the recogniser in worker processes ------------------------------------------------------------
# pocketsphinx holds the interpreter lock for a whole decoding pass (hundreds of ms), which
# would stall the event loop, and a Whisper reading is most of a verification's CPU; each
# worker process keeps its own ChallengeChecker instead.
_checker = None


def _exit_with(parent: int) -> None:
    """Exit this worker process as soon as ``parent`` is gone (killed with SIGKILL, say):
    an orphaned worker would hold its models' memory and the engine's output pipes."""
    while os.getppid() == parent:
        time.sleep(_ORPHAN_POLL)
    os._exit(0)


def _start_worker(parent: int, initializer: Callable[..., None], *args: Any) -> None:
    """Every pool's worker: watch the parent, hold numpy's BLAS to one thread (OpenBLAS
    threads spin between small products and take the cores from the other workers: the
    voice front end, Whisper's mel filters), then load what the pool runs. An error in
    loading is kept for :func:`_ready` and the first task: an initializer that raises
    breaks the pool without saying why."""
    global _init_error
    from engine.inference.models import limit_blas_threads

    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()
    limit_blas_threads()
    try:
        initializer(*args)
    except Exception as exc:
        _init_error = exc


class _WorkerPool:
    """A spawn-context process pool; a call that finds it broken (a worker died) starts a
    fresh one and tries once more. Its workers exit when the process that started them is
    gone."""

    def __init__(self, processes: int, initializer: Callable[..., None], initargs: tuple) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.processes = processes
        self._lock = threading.Lock()
        self._new = lambda: ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.getpid(), initializer, *initargs),
        )
        self._pool = self._new()
        self._closed = False

    def run(self, fn: Callable[[Any], Any], args: list) -> list:
        """``fn(arg)`` for each arg, side by side in the pool; results in order."""
        from concurrent.futures.process import BrokenProcessPool

        pool = self._pool
        try:
            return self._map(pool, fn, args)
        except BrokenProcessPool:  # a worker died (killed, out of memory): start a fresh pool, once
            log.error("%s worker pool broke; restarting it", type(self).__name__)
            with self._lock:
                if self._closed:
                    raise
                if self._pool is pool:
                    self._pool = self._new()
            return self._map(self._pool, fn, args)

    @staticmethod
    def _map(pool: Any, fn: Callable[[Any], Any], args: list) -> list:
        futures = [pool.submit(fn, a) for a in args]
        return [f.result() for f in futures]

    def warmup(self, timeout: float = 600.0) -> None:
        """Wait until every worker has started and loaded its models, and raise the error
        of one that could not (a model file that does not match its manifest, ...). Each
        worker loads them in its initializer, before its first task; one that is up early
        may take several of the ready tasks, so ask until every worker's pid has answered."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < self.processes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{type(self).__name__}: {self.processes - len(seen)} worker(s) not ready")
            seen |= {f.result() for f in [self._pool.submit(_ready) for _ in range(self.processes)]}
            if len(seen) < self.processes:
                time.sleep(0.05)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool = self._pool
        pool.shutdown(wait=True, cancel_futures=True)


_models: tuple[Any, Any] | None = None  # (FaceExtractor, VoiceExtractor) in a model worker
_init_error: BaseException | None = None  # why a worker could not load what its pool runs


def _ready() -> int:
    """A worker's pid once its initializer is done; the error it kept, if it failed."""
    if _init_error is not None:
        raise _init_error
    return os.getpid()


def _init_model_worker(models_dir: Path, intra_op_threads: int, challenge: tuple[Any, str] | None = None) -> None:
    """Load the face and voice models and, with ``challenge`` (the checker's configuration
    and the kind of challenge), the spoken-challenge recogniser too."""
    global _models
    from engine.inference.face import FaceExtractor
    from engine.inference.voice import VoiceExtractor

    face = FaceExtractor(models_dir, intra_op_threads=intra_op_threads)
    voice = VoiceExtractor(models_dir, intra_op_threads=intra_op_threads)
    face.warmup()
    voice.warmup()
    _models = (face, voice)
    if challenge is not None:
        _init_challenge_worker(*challenge)


def _loaded() -> tuple[Any, Any]:
    if _models is None:
        raise _init_error or RuntimeError("model worker not initialised")
    return _models


def _face_in_worker(images: list) -> list:
    return _loaded()[0].embed_batch(images)


def _voice_in_worker(wavs: list) -> list:
    return _loaded()[1].embed_pcm_batch(wavs)


class ModelPool(_WorkerPool):
    """The face and voice models, and with ``challenge`` the recogniser too, in worker
    processes (called from the batchers' threads).

    In the engine's own process the models run from several batcher threads next to the
    event loop; in processes a verification cost 258 CPU ms against 267 at 7 arrivals/s
    (benchmarks/TUNING.md section 6). Each worker loads every model; a batch (or a
    recogniser's pass) is one task. The batchers take turns for the processes
    (:class:`~engine.inference.batcher.SharedSlots`), so tasks rarely queue in the pool.
    """

    def __init__(self, models_dir: Path, *, intra_op_threads: int, processes: int,
                 challenge: tuple[Any, str] | None = None) -> None:
        from engine.inference.models import load_manifest

        for name in ("yunet", "sface", "campplus"):  # a missing model is an error now, not in a worker
            manifest = load_manifest(models_dir, name)
            if not (Path(models_dir) / manifest.file).is_file():
                raise ModelMissing(f"model file {Path(models_dir) / manifest.file} not found")
        super().__init__(processes, _init_model_worker, (Path(models_dir), intra_op_threads, challenge))

    def face_batch(self, images: list) -> list:
        return self.run(_face_in_worker, [list(images)])[0]

    def voice_batch(self, wavs: list) -> list:
        return self.run(_voice_in_worker, [list(wavs)])[0]


def _init_challenge_worker(config: Any, kind: str) -> None:
    global _checker
    from engine.challenge import ChallengeChecker

    # a worker only decodes, with the engine's checker's configuration; the threshold is
    # applied by that checker, in the engine's process
    checker = ChallengeChecker(config=config, threshold=0.0)
    checker.load_decoder(kind)  # the kind's recogniser, before the first recording arrives
    _checker = checker


def _pass_in_worker(p: Any) -> Any:
    global _passes
    if _checker is None:
        raise _init_error or RuntimeError("challenge worker not initialised")
    out = _checker.run_passes([p])[0]
    _passes += 1
    if _passes % _TRIM_EVERY == 0:
        _trim_heap()
    return out


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` from the process's own symbols, looked up once; ``None``
    where the C library has none."""
    import ctypes

    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def _trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc only; nothing elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ChallengePool(_WorkerPool):
    """A :class:`~engine.challenge.ChallengeChecker`'s ``check_batch``, with its decoding
    passes run in a pool of worker processes (called from a batcher thread).

    Each decoding pass (the alignment of the expected words; the phone-loop background,
    for the recordings the screen leaves open; Whisper's reading of a phrase) is one task: the recordings of a batch, and
    both passes of a recording whose kind has no screen, run side by side on two cores,
    so a single queued recording can keep both processes busy. Each pass carries the
    recording's PCM (~140 kB for 4.5 s) to the pool.
    """

    def __init__(self, checker: Any, processes: int, *, kind: str) -> None:
        self.checker = checker
        # each worker preloads the decoder of the kind of challenge the engine issues
        super().__init__(processes, _init_challenge_worker, (checker.config, kind))

    def check_batch(self, items: list) -> list:
        """Check a batch: the recordings are checked here, their passes decoded in the pool."""
        return _check_in(self.checker, self, items)


def _check_in(checker: Any, pool: _WorkerPool, items: list) -> list:
    """``checker.check_batch(items)`` with its decoding passes run in ``pool``'s workers
    (a :class:`ChallengePool`'s own, or the model workers' with ``shared_processes``)."""
    return checker.check_batch(items, run_passes=functools.partial(pool.run, _pass_in_worker))


def onnx_extractors(
    models_dir: Path,
    *,
    intra_op_threads: int = 1,
    check_challenge: bool = True,
    challenge_processes: int = 2,
    challenge_kind: str = "digits",
    model_processes: int = 0,
    shared_processes: bool = False,
) -> Extractors:
    """The real models, loaded and digest-checked from ``models_dir``: the face and voice
    models in this process (``model_processes=0``) or in that many worker processes, the
    challenge recogniser in ``challenge_processes`` worker processes, ready for challenges
    of ``challenge_kind``."""
    from engine.inference.audio import decode_audio
    from engine.inference.face import FaceExtractor
    from engine.inference.models import limit_blas_threads
    from engine.inference.voice import VoiceExtractor

    limit_blas_threads()  # this process's numpy too: it decodes audio and scores templates
    checker = None
    if check_challenge:
        from engine.challenge import ChallengeChecker, ChallengeConfig

        # first: a missing or mismatched calibration is refused before any process starts;
        # the calibrated thresholds and the Whisper manifest come from models_dir
        checker = ChallengeChecker(config=ChallengeConfig.for_models(models_dir))  # decoding happens in the pool
    closers: list[Callable[[], None]] = []
    warmers: list[Callable[[], None]] = []
    face_batch: Callable[[list], list]
    voice_batch: Callable[[list], list]
    shared = shared_processes and model_processes > 0 and checker is not None
    if model_processes > 0:
        models = ModelPool(models_dir, intra_op_threads=intra_op_threads, processes=model_processes,
                           challenge=(checker.config, challenge_kind) if shared else None)
        face_batch, voice_batch = models.face_batch, models.voice_batch
        closers.append(models.close)
        warmers.append(models.warmup)
    else:
        face = FaceExtractor(models_dir, intra_op_threads=intra_op_threads)
        voice = VoiceExtractor(models_dir, intra_op_threads=intra_op_threads)
        face_batch, voice_batch = face.embed_batch, voice.embed_pcm_batch
        warmers += [face.warmup, voice.warmup]
    if shared:
        challenge_batch = functools.partial(_check_in, checker, models)
    elif checker is not None:
        pool = ChallengePool(checker, challenge_processes, kind=challenge_kind)
        challenge_batch = pool.check_batch
        closers.append(pool.close)
        warmers.append(pool.warmup)
    else:
        def challenge_batch(items: list) -> list:  # the check is disabled by configuration
            from engine.challenge import Verdict

            return [Verdict(True, 0.0, "screen") for _ in items]

    def warmup() -> None:
        for w in warmers:
            w()

    def close() -> None:
        for c in closers:
            c()

    return Extractors(
        face_dim=FaceExtractor.dim,
        voice_dim=VoiceExtractor.dim,
        face_batch=face_batch,
        decode_audio=lambda data, fmt: decode_audio(data, fmt=fmt),
        voice_batch=voice_batch,
        challenge_batch=challenge_batch,
        warmup=warmup,
        close=close,
        pool_processes=model_processes,
        pooled=frozenset(("face", "voice", "challenge") if shared else ("face", "voice")) if model_processes > 0 else frozenset(),
    )


# ---- deterministic fake, for unit tests -----------------------------------------------------------
def _identity_vector(kind: str, identity: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(f"{kind}:{identity}".encode()).digest()[:8], "big")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _fake_embed(kind: str, data: bytes, dim: int, err: type[SampleError]) -> np.ndarray | SampleError:
    prefix = f"{kind}:".encode()
    if not data.startswith(prefix):
        return UndecodableSample()
    parts = data[len(prefix):].split(b":", 1)
    identity = parts[0].decode(errors="replace")
    if identity == "none":
        return err()
    base = _identity_vector(kind, identity, dim)
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "big")
    noise = np.random.default_rng(seed).standard_normal(dim).astype(np.float32) * 0.02
    v = base + noise
    return (v / np.linalg.norm(v)).astype(np.float32)


def _fake_voice(data: bytes) -> Any:
    """A fake speaker embedding; ``VOICE8:`` marks a narrow-band recording."""
    from engine.inference.speaker import SpeakerEmbedding

    narrow = data.startswith(b"VOICE8:")
    out = _fake_embed("VOICE", b"VOICE:" + data[7:] if narrow else data, 192, NoSpeech)
    return out if isinstance(out, SampleError) else SpeakerEmbedding(out, "narrow" if narrow else "wide")


def fake_extractors() -> Extractors:
    """Deterministic stand-in: ``FACE:<who>:...`` / ``VOICE:<who>:<said>:...``; ``<who>`` = none → no face/speech."""

    def decode(data: bytes, fmt: str) -> bytes:
        if not data.startswith((b"VOICE:", b"VOICE8:")):
            raise UndecodableSample()
        return data

    def challenge(items: list[tuple[bytes, str]]) -> list:
        from engine.challenge import Verdict

        out: list = []
        for pcm, expected in items:
            said = pcm.split(b":")[2].decode(errors="replace") if pcm.count(b":") >= 2 else ""
            out.append(Verdict(said == expected, 1.0 if said == expected else -1.0, "screen"))
        return out

    return Extractors(
        face_dim=128,
        voice_dim=192,
        face_batch=lambda items: [_fake_embed("FACE", b, 128, NoFace) for b in items],
        decode_audio=decode,
        voice_batch=lambda items: [_fake_voice(b) for b in items],
        challenge_batch=challenge,
    )
