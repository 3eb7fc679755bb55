"""Dynamic batching of model calls: one task per model, batch by backlog.

Callers ``await batcher.submit(item)``; the batcher task collects queued items
into batches and hands each batch to the model's :class:`InferenceBackend`
(a plain batch function is run in worker threads by a :class:`LocalBackend`)::

    async with trio.open_nursery() as nursery:
        face = Batcher("face", embed_batch, BatcherConfig(max_batch=8))
        await nursery.start(face.run)
        embedding = await face.submit(image)

How a batch is formed:

* a batch is only formed when a worker slot is free (``workers`` slots), so
  jobs that arrive while the model is busy pile up in the queue;
* the batcher waits for the first job, then takes everything already queued,
  up to ``max_batch`` ("batch by backlog");
* only if the batch is still not full does it wait for more, until the oldest
  job of the batch has waited ``max_wait``. Under load the oldest job has
  already waited that long, so the batch leaves at once;
* batchers whose models share worker processes (``shared``, a
  :class:`SharedSlots`) then wait for a free process, the batch whose oldest job
  has waited longest first, and top the batch up from the queue: the processes
  serve the oldest verification's jobs first, whatever their model, and a
  batch's time is its model's alone.

Every buffer is bounded: when ``queue_size`` jobs are waiting, ``submit``
raises :class:`~engine.errors.Overloaded` at once, with a retry hint estimated
from recent batch times. A job whose caller is gone (cancelled, deadline
passed, connection closed) before its batch is formed is dropped, never
computed. So is a job whose caller's deadline (trio's effective deadline at
``submit``) would pass before a batch could finish: its caller gets
:class:`~engine.errors.DeadlineExceeded` at once, and the model's time goes
to jobs that can still be answered in time. Under overload a FIFO queue
otherwise serves exactly the jobs that are about to expire.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import trio

from ..errors import ConfigError, DeadlineExceeded, EngineError, Overloaded
from .backend import InferenceBackend, LocalBackend

if TYPE_CHECKING:
    from engine.ops.metrics import Metrics

__all__ = ["SharedSlots", "BatcherConfig", "Batcher"]

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

#: Weight of the newest batch in the running estimate of batch time.
_EWMA_WEIGHT = 0.3
#: A job is hopeless if its deadline falls within this many batch times:
#: the batch time is a running average, and the oldest viable jobs, which a
#: FIFO queue serves first, are exactly those with the least slack.
_DEADLINE_MARGIN = 1.5
#: Retry hint given to callers refused because the batcher is stopping.
_SHUTDOWN_RETRY_MS = 1000


@dataclass(frozen=True, kw_only=True, slots=True)
class BatcherConfig:
    """Limits of one model's batcher.

    ``max_batch``: most items per call of the batch function.
    ``max_wait``: seconds the oldest job of a partial batch may wait for company.
    ``queue_size``: most jobs waiting for a batch; beyond it, ``Overloaded``.
    ``workers``: batches computing at once (threads running the batch function).
    """

    max_batch: int = 16
    max_wait: float = 0.005
    queue_size: int = 256
    workers: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"batcher {name} must be a positive integer")
        if self.max_batch > 4096:
            raise ConfigError("batcher max_batch must be at most 4096")
        if self.workers > 64:
            raise ConfigError("batcher workers must be at most 64")
        wait = self.max_wait
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0.0 <= wait <= 10.0:
            raise ConfigError("batcher max_wait must be between 0 and 10 seconds")


class _Reply(Generic[Out]):
    """The one-slot reply channel of one job: the first answer wins.

    An event and a slot rather than a trio memory channel, which costs
    about 30 us to create (measured), more than the rest of a job's trip
    through the batcher. ``close()`` without an answer tells the caller
    the batcher stopped.
    """

    __slots__ = ("_event", "_answer")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._answer: tuple[Out | None, BaseException | None] | None = None

    def send(self, output: Out | None, error: BaseException | None) -> None:
        if not self._event.is_set():
            self._answer = (output, error)
            self._event.set()

    def close(self) -> None:
        self._event.set()

    async def receive(self) -> tuple[Out | None, BaseException | None] | None:
        await self._event.wait()
        return self._answer


@dataclass(eq=False, slots=True)
class _Job(Generic[In, Out]):
    item: In
    reply: _Reply[Out]
    enqueued: float
    # The caller's effective deadline (trio clock; inf if none).
    deadline: float
    # Set by the caller once it stops waiting (answered, cancelled or gone).
    gone: bool = field(default=False)


class SharedSlots:
    """Slots of worker processes that several batchers share, granted to the batch whose
    oldest job has waited longest (not to the batch formed first): a verification's face,
    voice and challenge jobs arrive together, and it is answered when the last of them is
    done, so the oldest verification's jobs go first whichever model they are for."""

    def __init__(self, processes: int, *, ahead: int = 1) -> None:
        """Slots for ``processes`` and ``ahead`` more, so that a process that finishes a
        batch finds the next one already handed to it."""
        if processes < 1 or ahead < 0:
            raise ConfigError("shared slots need at least one process")
        self.processes = processes
        self.total = processes + ahead
        self._free = self.total
        self._waiting: list[list] = []  # heap of [enqueued, seq, event, state]
        self._seq = itertools.count()

    async def acquire(self, enqueued: float) -> None:
        """Wait for a slot; ``enqueued`` is the trio time the batch's oldest job was queued."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        entry = [enqueued, next(self._seq), trio.Event(), "waiting"]
        heapq.heappush(self._waiting, entry)
        try:
            await entry[2].wait()
        except BaseException:
            if entry[3] == "granted":  # granted as it was cancelled: pass it on
                self.release()
            else:
                entry[3] = "gone"
            raise

    def release(self) -> None:
        while self._waiting:
            entry = heapq.heappop(self._waiting)
            if entry[3] == "waiting":
                entry[3] = "granted"
                entry[2].set()
                return
        self._free += 1


class Batcher(Generic[In, Out]):
    """Runs ``fn`` on batches of submitted items; see the module docstring.

    ``backend`` (or a batch function ``fn``, run in ``workers`` threads) takes a list
    of inputs and returns one output per input, in order. An output that is an
    ``Exception`` instance fails that item's caller only (e.g. "no face found" for one
    image of the batch). An exception raised by it fails every job of the batch; the
    batcher keeps running.
    """

    def __init__(
        self,
        name: str,
        backend: InferenceBackend[In, Out] | Callable[[list[In]], Sequence[Out | Exception]],
        config: BatcherConfig,
        *,
        metrics: Metrics | None = None,
        shared: SharedSlots | None = None,
    ) -> None:
        if not isinstance(config, BatcherConfig):
            raise ConfigError("Batcher needs a BatcherConfig")
        self.name = name
        if not isinstance(backend, InferenceBackend):
            backend = LocalBackend(backend, threads=config.workers)
        self._backend = backend
        self._config = config
        self._send, self._recv = trio.open_memory_channel[_Job[In, Out]](config.queue_size)
        self._queued = 0  # jobs sent and not yet received by the batcher task
        # A slot is held from the moment a batch starts forming until its
        # computation ends, so a batch is only formed when a worker is free.
        self._slots = trio.CapacityLimiter(config.workers)
        #: Worker processes this batcher shares with others: a formed batch also waits
        #: for one of them, and only then is computed (its time is then the model's alone).
        self.shared = shared
        self._formed = 0  # batches formed and waiting for a shared slot
        self._batch_time: float | None = None
        self._started = False
        self._metrics = metrics
        if metrics is not None:
            self._m_size = metrics.batch_size.labels(model=name)
            self._m_wait = metrics.batch_wait.labels(model=name)
            self._m_time = metrics.model_time.labels(model=name)
            self._m_depth = metrics.queue_depth.labels(model=name)
            self._m_overloaded = metrics.overloaded.labels(where=f"batcher:{name}")
            self._m_abandoned = metrics.abandoned.labels(model=name)

    @property
    def config(self) -> BatcherConfig:
        return self._config

    def depth(self) -> int:
        """Jobs waiting for a batch (including any whose caller has just gone)."""
        return self._queued

    def batch_time(self) -> float | None:
        """Running estimate of the seconds one batch takes (None before the first)."""
        return self._batch_time

    # -- caller side -------------------------------------------------------

    async def submit(self, item: In) -> Out:
        """Queue one item and wait for its output.

        Raises ``Overloaded`` at once if the queue is full (or the batcher is
        stopping), ``DeadlineExceeded`` as soon as the caller's deadline is
        seen to be too close for a batch to finish, the item's own error if
        the batch function returned one for it, and the batch's error if the
        batch function failed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._queued >= self._config.queue_size:
            raise self._overloaded()
        reply: _Reply[Out] = _Reply()
        job = _Job(item, reply, trio.current_time(), trio.current_effective_deadline())
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            raise self._overloaded() from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._stopping() from None
        self._queued += 1
        self._record_depth()
        try:
            answer = await reply.receive()
        finally:
            job.gone = True
        if answer is None:
            raise self._stopping()  # the batcher stopped before answering
        output, error = answer
        if error is not None:
            raise error
        return output  # type: ignore[return-value]

    def _drain_time(self, batches: int, per_batch: float) -> float:
        return per_batch * batches / self._config.workers

    def queue_wait(self) -> float:
        """Estimated seconds a job queued now would wait: :meth:`queued_work` over the
        workers (0 while nothing is queued or no batch has run yet)."""
        return self.queued_work() / self._config.workers

    def queued_work(self) -> float:
        """Estimated seconds of model time queued here: the batches still to form and
        those formed and waiting for a shared slot, times the batch time."""
        if self._batch_time is None:
            return 0.0
        return (math.ceil(self.depth() / self._config.max_batch) + self._formed) * self._batch_time

    def retry_after_ms(self) -> int:
        """Estimated wait before the queue has room: batch time x batches queued (at least one)."""
        cfg = self._config
        per_batch = self._batch_time if self._batch_time is not None else max(cfg.max_wait, 0.001)
        batches = max(1, math.ceil(self.depth() / cfg.max_batch))
        return max(1, math.ceil(1000.0 * self._drain_time(batches, per_batch)))

    def _overloaded(self) -> Overloaded:
        if self._metrics is not None:
            self._m_overloaded.inc()
        return Overloaded(f"the {self.name} model queue is full", retry_after_ms=self.retry_after_ms())

    def _stopping(self) -> Overloaded:
        return Overloaded(f"the {self.name} model is shutting down", retry_after_ms=_SHUTDOWN_RETRY_MS)

    # -- batcher task ------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The batcher task; start it with ``await nursery.start(batcher.run)``.

        When cancelled, batches already computing finish and are answered;
        jobs still queued are refused with ``Overloaded``.
        """
        if self._started:
            raise RuntimeError(f"batcher {self.name!r} was already started")
        self._started = True
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    slot = object()
                    await self._slots.acquire_on_behalf_of(slot)
                    try:
                        jobs = await self._form_batch()
                        if jobs and self.shared is not None:
                            jobs = await self._wait_for_shared(jobs)
                    except BaseException:
                        self._slots.release_on_behalf_of(slot)
                        raise
                    if not jobs:
                        self._slots.release_on_behalf_of(slot)
                        continue
                    nursery.start_soon(self._compute, jobs, slot, name=f"batch:{self.name}")
        finally:
            self._shut_down()

    async def _form_batch(self) -> list[_Job[In, Out]]:
        cfg = self._config
        jobs: list[_Job[In, Out]] = []
        try:
            while not jobs:
                self._take(await self._receive(), jobs)
            self._take_backlog(jobs)
            if len(jobs) < cfg.max_batch:
                with trio.move_on_at(jobs[0].enqueued + cfg.max_wait):
                    while len(jobs) < cfg.max_batch:
                        self._take(await self._receive(), jobs)
                        self._take_backlog(jobs)
        except BaseException:
            for job in jobs:
                job.reply.close()
            raise
        finally:
            self._record_depth()
        # Callers may have left while the batch waited for company.
        live: list[_Job[In, Out]] = []
        for job in jobs:
            self._take(job, live)
        return live

    async def _wait_for_shared(self, jobs: list[_Job[In, Out]]) -> list[_Job[In, Out]]:
        """Hold a formed batch until a shared worker is free, then top it up from the
        queue; the jobs still live (none: the shared slot is given back)."""
        assert self.shared is not None
        self._formed += 1
        try:
            await self.shared.acquire(min(job.enqueued for job in jobs))
        except BaseException:
            for job in jobs:
                job.reply.close()
            raise
        finally:
            self._formed -= 1
        self._take_backlog(jobs)
        self._record_depth()
        live: list[_Job[In, Out]] = []
        for job in jobs:
            self._take(job, live)
        if not live:
            self.shared.release()
        return live

    async def _receive(self) -> _Job[In, Out]:
        job = await self._recv.receive()
        self._queued -= 1
        return job

    def _take_backlog(self, jobs: list[_Job[In, Out]]) -> None:
        while len(jobs) < self._config.max_batch:
            try:
                job = self._recv.receive_nowait()
            except trio.WouldBlock:
                return
            self._queued -= 1
            self._take(job, jobs)

    def _take(self, job: _Job[In, Out], jobs: list[_Job[In, Out]]) -> None:
        if job.gone:
            self._drop(job)
        elif job.deadline < trio.current_time() + _DEADLINE_MARGIN * (self._batch_time or 0.0):
            # Its result would come too late: answer now, compute nothing.
            job.reply.send(None, DeadlineExceeded("the request would not finish within its deadline"))
            self._drop(job)
        else:
            jobs.append(job)

    def _drop(self, job: _Job[In, Out]) -> None:
        job.reply.close()
        if self._metrics is not None:
            self._m_abandoned.inc()

    async def _compute(self, jobs: list[_Job[In, Out]], slot: object) -> None:
        try:
            start = trio.current_time()
            if self._metrics is not None:
                self._m_size.observe(len(jobs))
                for job in jobs:
                    self._m_wait.observe(max(0.0, start - job.enqueued))
            inputs = [job.item for job in jobs]
            try:
                outputs = await self._backend.run(inputs)
            except EngineError as exc:
                self._fail(jobs, exc)
                return
            except Exception as exc:
                self._fail(jobs, self._internal("the batch function raised", exc))
                return
            finally:
                self._record_time(trio.current_time() - start)
            try:
                count = len(outputs)
            except TypeError:
                count = -1
            if count != len(jobs):
                self._fail(
                    jobs,
                    self._internal(f"the batch function returned {count} outputs for {len(jobs)} inputs"),
                )
                return
            for job, output in zip(jobs, outputs, strict=True):
                if isinstance(output, Exception):
                    job.reply.send(None, output)
                else:
                    job.reply.send(output, None)
        finally:
            self._slots.release_on_behalf_of(slot)
            if self.shared is not None:
                self.shared.release()
            for job in jobs:
                job.reply.close()  # no-op once answered

    @staticmethod
    def _fail(jobs: list[_Job[In, Out]], error: EngineError) -> None:
        for job in jobs:
            job.reply.send(None, error)

    def _internal(self, what: str, exc: BaseException | None = None) -> EngineError:
        error_id = secrets.token_hex(6)
        log.error("batcher %s: %s (error id %s)", self.name, what, error_id, exc_info=exc)
        return EngineError(f"internal error (id {error_id})")

    def _record_time(self, elapsed: float) -> None:
        if self._batch_time is None:
            self._batch_time = elapsed
        else:
            self._batch_time += _EWMA_WEIGHT * (elapsed - self._batch_time)
        if self._metrics is not None:
            self._m_time.observe(elapsed)

    def _record_depth(self) -> None:
        if self._metrics is not None:
            self._m_depth.set(self._queued)

    def _shut_down(self) -> None:
        self._send.close()
        while True:
            try:
                job = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._queued -= 1
            job.reply.close()
        self._recv.close()
        self._record_depth()
