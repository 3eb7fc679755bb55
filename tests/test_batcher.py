"""Dynamic batcher: batch formation, admission, cancellation, failures, concurrency.

Most tests run the batch function on the trio thread (``inline_model``) so
that the autojump clock stays deterministic: while a real worker thread runs,
the run loop is idle and the mock clock would jump. The fake model "takes"
``model_time`` virtual seconds. One test drives the real worker threads.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from engine.inference.batcher import Batcher, BatcherConfig, SharedSlots
from engine.errors import ConfigError, DeadlineExceeded, EngineError, ModelError, NoFace, Overloaded
from engine.ops.metrics import Metrics


@dataclass
class InlineModel:
    model_time: float = 0.0


@pytest.fixture
def inline_model(monkeypatch: pytest.MonkeyPatch) -> InlineModel:
    state = InlineModel()

    async def run_sync(fn: Any, *args: Any, **_: Any) -> Any:
        result = fn(*args)
        with trio.CancelScope(shield=True):  # like a thread, it cannot be cancelled
            await trio.sleep(state.model_time)
        return result

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    return state


@dataclass
class FakeFn:
    """Doubles numbers; records (virtual start time, items) of every batch."""

    batches: list[tuple[float, list[Any]]] = field(default_factory=list)

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append((trio.current_time(), list(items)))
        return [self.answer(x) for x in items]

    def answer(self, x: Any) -> Any:
        return x * 2

    @property
    def sizes(self) -> list[int]:
        return [len(items) for _, items in self.batches]

    @property
    def times(self) -> list[float]:
        return [t for t, _ in self.batches]


@dataclass
class Raised:
    """What ``submit`` raised (as opposed to returned)."""

    exc: Exception


async def submit_all(nursery: trio.Nursery, batcher: Batcher, items: list[Any], out: dict[Any, Any]) -> None:
    async def one(x: Any) -> None:
        try:
            out[x] = (await batcher.submit(x), trio.current_time())
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out[x] = (Raised(exc), trio.current_time())

    for x in items:
        nursery.start_soon(one, x)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- configuration ---------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch": 0},
        {"queue_size": 0},
        {"workers": 0},
        {"max_wait": -0.001},
        {"max_wait": math.inf},
        {"max_batch": 2.5},
        {"workers": True},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        BatcherConfig(**kwargs)


def test_config_is_frozen_and_keyword_only() -> None:
    cfg = BatcherConfig()
    assert (cfg.max_batch, cfg.max_wait, cfg.queue_size, cfg.workers) == (16, 0.005, 256, 1)
    with pytest.raises(AttributeError):
        cfg.max_batch = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        BatcherConfig(4)  # type: ignore[misc]


# -- batch formation -------------------------------------------------------


async def test_batch_forms_at_max_batch_before_max_wait(autojump_clock: Any, inline_model: InlineModel) -> None:
    fn = FakeFn()
    batcher = Batcher("m", fn, BatcherConfig(max_batch=4, max_wait=1.0))
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, list(range(6)), out)
            nursery.cancel_scope.cancel()
    # The first four leave at once; the two left over wait max_wait.
    assert fn.sizes == [4, 2]
    assert fn.times == [0.0, pytest.approx(1.0)]
    assert {x: r for x, (r, _) in out.items()} == {x: 2 * x for x in range(6)}
    assert sorted(t for _, t in out.values()) == [0.0] * 4 + [pytest.approx(1.0)] * 2


async def test_lone_job_goes_at_max_wait_counted_from_oldest(
    autojump_clock: Any, inline_model: InlineModel
) -> None:
    fn = FakeFn()
    batcher = Batcher("m", fn, BatcherConfig(max_batch=8, max_wait=0.5))
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, [1], out)
                await trio.sleep(0.3)
                await submit_all(callers, batcher, [2], out)
            nursery.cancel_scope.cancel()
    assert fn.batches == [(pytest.approx(0.5), [1, 2])]
    assert out[1] == (2, pytest.approx(0.5))
    assert out[2] == (4, pytest.approx(0.5))


async def test_backlog_is_taken_at_once(autojump_clock: Any, inline_model: InlineModel) -> None:
    inline_model.model_time = 1.0
    fn = FakeFn()
    batcher = Batcher("m", fn, BatcherConfig(max_batch=4, max_wait=0.1))
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, [0], out)
                await trio.sleep(0.5)  # the model is busy with [0] until t=1.1
                await submit_all(callers, batcher, list(range(1, 11)), out)
            nursery.cancel_scope.cancel()
    # When the model frees up, the queued jobs leave without waiting max_wait again.
    assert fn.sizes == [1, 4, 4, 2]
    assert fn.times == pytest.approx([0.1, 1.1, 2.1, 3.1])
    assert sorted(x for _, items in fn.batches for x in items) == list(range(11))
    assert all(r == 2 * x for x, (r, _) in out.items())


# -- admission -------------------------------------------------------------


async def test_full_queue_raises_overloaded_at_once(autojump_clock: Any, inline_model: InlineModel) -> None:
    inline_model.model_time = 10.0
    metrics = Metrics()
    fn = FakeFn()
    batcher = Batcher("m", fn, BatcherConfig(max_batch=1, max_wait=0.0, queue_size=2), metrics=metrics)
    out: dict[int, Any] = {}
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, [1], out)
                await trio.testing.wait_all_tasks_blocked()  # [1] is computing
                await submit_all(callers, batcher, [2, 3], out)
                await trio.testing.wait_all_tasks_blocked()
                assert batcher.depth() == 2
                assert sample(metrics, "netid_queue_depth", model="m") == 2

                before = trio.current_time()
                with pytest.raises(Overloaded) as refused:
                    await batcher.submit(99)
                assert trio.current_time() == before
                assert refused.value.code == "overloaded"
                assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms >= 1
                assert sample(metrics, "netid_overloaded_total", where="batcher:m") == 1

                # Once a batch has been timed, the hint is batch time x batches queued.
                await trio.sleep_until(10.5)  # [1] done, [2] computing, [3] queued
                await submit_all(callers, batcher, [4], out)
                await trio.testing.wait_all_tasks_blocked()
                assert batcher.depth() == 2
                with pytest.raises(Overloaded) as refused:
                    await batcher.submit(100)
                assert refused.value.retry_after_ms == 20_000
            nursery.cancel_scope.cancel()
    assert sorted(out) == [1, 2, 3, 4]
    assert all(r == 2 * x for x, (r, _) in out.items())
    assert sorted(x for _, items in fn.batches for x in items) == [1, 2, 3, 4]
    assert sample(metrics, "netid_overloaded_total", where="batcher:m") == 2


async def test_cancelled_caller_is_skipped_in_queue(autojump_clock: Any, inline_model: InlineModel) -> None:
    inline_model.model_time = 1.0
    metrics = Metrics()
    fn = FakeFn()
    batcher = Batcher("m", fn, BatcherConfig(max_batch=4, max_wait=0.0), metrics=metrics)
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, [1], out)
                await trio.testing.wait_all_tasks_blocked()  # [1] computing until t=1
                with trio.move_on_after(0.5) as gone:
                    await batcher.submit(2)
                assert gone.cancelled_caught
                await submit_all(callers, batcher, [3], out)
            nursery.cancel_scope.cancel()
    assert [items for _, items in fn.batches] == [[1], [3]]
    assert 2 not in out
    assert sample(metrics, "netid_batch_abandoned_total", model="m") == 1


async def test_caller_gone_while_batch_waits_is_skipped(autojump_clock: Any, inline_model: InlineModel) -> None:
    fn = FakeFn()
    batcher = Batcher("m", fn, BatcherConfig(max_batch=4, max_wait=1.0))
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            # Alone and gone before max_wait: the model is never called.
            with trio.move_on_after(0.5):
                await batcher.submit(1)
            await trio.sleep(2)
            assert fn.batches == []
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, [2], out)
                with trio.move_on_after(0.5):
                    await batcher.submit(3)
            nursery.cancel_scope.cancel()
    assert fn.batches == [(pytest.approx(3.5), [2])]
    assert out == {2: (4, pytest.approx(3.5))}


async def test_job_that_would_finish_late_is_not_computed(
    autojump_clock: Any, inline_model: InlineModel
) -> None:
    inline_model.model_time = 1.0
    metrics = Metrics()
    fn = FakeFn()
    batcher = Batcher("m", fn, BatcherConfig(max_batch=4, max_wait=0.0), metrics=metrics)
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, [1], out)  # batches take 1 s from now on
                await trio.testing.wait_all_tasks_blocked()
                # Queued at t=0 behind [1] (done at t=1), with a deadline at t=1.5:
                # a batch started at t=1 would end at t=2, too late.
                with trio.move_on_after(1.5), pytest.raises(DeadlineExceeded):
                    await batcher.submit(2)
                assert trio.current_time() == pytest.approx(1.0)
                await submit_all(callers, batcher, [3], out)
                with trio.fail_after(1.5):  # a batch started now ends in time
                    assert await batcher.submit(4) == 8
            nursery.cancel_scope.cancel()
    assert sorted(x for _, items in fn.batches for x in items) == [1, 3, 4]  # never 2
    assert out[3][0] == 6
    assert sample(metrics, "netid_batch_abandoned_total", model="m") == 1


# -- failures --------------------------------------------------------------


async def test_exception_output_fails_only_its_caller(autojump_clock: Any, inline_model: InlineModel) -> None:
    class Picky(FakeFn):
        def answer(self, x: Any) -> Any:
            return NoFace() if x == 2 else x * 2

    fn = Picky()
    batcher = Batcher("m", fn, BatcherConfig(max_batch=4, max_wait=0.1))
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, [1, 2, 3], out)
            nursery.cancel_scope.cancel()
    assert fn.sizes == [3]
    assert isinstance(out[2][0], Raised) and isinstance(out[2][0].exc, NoFace)
    assert out[1][0] == 2 and out[3][0] == 6


async def test_raising_fn_fails_the_batch_and_batcher_survives(
    autojump_clock: Any, inline_model: InlineModel, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[list[Any]] = []

    def fn(items: list[Any]) -> list[Any]:
        calls.append(list(items))
        if len(calls) == 1:
            raise ModelError("onnx session failed")
        if len(calls) == 2:
            raise RuntimeError("secret detail")
        return [x * 2 for x in items]

    batcher = Batcher("m", fn, BatcherConfig(max_batch=4, max_wait=0.1))
    first: dict[int, Any] = {}
    second: dict[int, Any] = {}
    third: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            for out, items in ((first, [1, 2]), (second, [3, 4]), (third, [5, 6])):
                async with trio.open_nursery() as callers:
                    await submit_all(callers, batcher, items, out)
            nursery.cancel_scope.cancel()
    assert [sorted(c) for c in calls] == [[1, 2], [3, 4], [5, 6]]
    # An engine error reaches every caller of the batch as is.
    assert all(type(r.exc) is ModelError for r, _ in first.values())
    # Anything else is wrapped; the detail goes to the log under an opaque id.
    for r, _ in second.values():
        assert type(r.exc) is EngineError and r.exc.code == "internal"
        assert "secret" not in str(r.exc)
        error_id = str(r.exc).split("id ")[1].rstrip(")")
        assert any(error_id in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert {x: r for x, (r, _) in third.items()} == {5: 10, 6: 12}


async def test_output_count_mismatch_fails_every_job(autojump_clock: Any, inline_model: InlineModel) -> None:
    calls: list[list[Any]] = []

    def fn(items: list[Any]) -> list[Any]:
        calls.append(list(items))
        return [x * 2 for x in items][:-1] if len(calls) == 1 else [x * 2 for x in items]

    batcher = Batcher("m", fn, BatcherConfig(max_batch=4, max_wait=0.1))
    first: dict[int, Any] = {}
    second: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, [1, 2, 3], first)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, [4], second)
            nursery.cancel_scope.cancel()
    assert len(first) == 3
    assert all(type(r.exc) is EngineError for r, _ in first.values())
    assert second[4][0] == 8


# -- concurrency and lifecycle ---------------------------------------------


@pytest.mark.parametrize(("workers", "finish"), [(1, [1.0, 1.0, 2.0, 2.0]), (2, [1.0] * 4)])
async def test_workers_compute_batches_concurrently(
    autojump_clock: Any, inline_model: InlineModel, workers: int, finish: list[float]
) -> None:
    inline_model.model_time = 1.0
    fn = FakeFn()
    batcher = Batcher("m", fn, BatcherConfig(max_batch=2, max_wait=0.0, workers=workers))
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, [1, 2, 3, 4], out)
            nursery.cancel_scope.cancel()
    assert fn.sizes == [2, 2]
    assert sorted(t for _, t in out.values()) == pytest.approx(finish)


async def test_real_threads_run_two_batches_at_once() -> None:
    # Real worker threads, real clock: each batch waits at a two-party
    # barrier, which only opens if two batches compute at the same time.
    barrier = threading.Barrier(2, timeout=5)
    threads: set[int] = set()

    def fn(items: list[int]) -> list[int]:
        threads.add(threading.get_ident())
        barrier.wait()
        return [x + 1 for x in items]

    batcher = Batcher("m", fn, BatcherConfig(max_batch=2, max_wait=0.0, workers=2))
    results: dict[int, int] = {}

    async def one(x: int) -> None:
        results[x] = await batcher.submit(x)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                for x in range(4):
                    callers.start_soon(one, x)
            nursery.cancel_scope.cancel()
    assert results == {0: 1, 1: 2, 2: 3, 3: 4}
    assert len(threads) == 2 and threading.get_ident() not in threads


async def test_metrics_are_recorded(autojump_clock: Any, inline_model: InlineModel) -> None:
    inline_model.model_time = 0.25
    metrics = Metrics()
    batcher = Batcher("face", FakeFn(), BatcherConfig(max_batch=4, max_wait=0.5), metrics=metrics)
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, batcher, list(range(5)), out)
            nursery.cancel_scope.cancel()
    assert sample(metrics, "netid_batch_size_count", model="face") == 2
    assert sample(metrics, "netid_batch_size_sum", model="face") == 5
    assert sample(metrics, "netid_batch_wait_seconds_count", model="face") == 5
    # Four jobs left at once; the fifth waited for the first batch, then max_wait.
    assert sample(metrics, "netid_batch_wait_seconds_sum", model="face") == pytest.approx(0.5)
    assert sample(metrics, "netid_model_seconds_sum", model="face") == pytest.approx(0.5)
    assert sample(metrics, "netid_queue_depth", model="face") == 0
    assert batcher.batch_time() == pytest.approx(0.25)


async def test_stopping_refuses_queued_and_new_jobs(autojump_clock: Any, inline_model: InlineModel) -> None:
    inline_model.model_time = 1.0
    fn = FakeFn()
    batcher = Batcher("m", fn, BatcherConfig(max_batch=1, max_wait=0.0))
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as callers:
            async with trio.open_nursery() as nursery:
                await nursery.start(batcher.run)
                await submit_all(callers, batcher, [1], out)
                await trio.testing.wait_all_tasks_blocked()  # [1] computing
                await submit_all(callers, batcher, [2], out)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        with pytest.raises(Overloaded):
            await batcher.submit(3)
        with pytest.raises(RuntimeError):
            await batcher.run()
    # The batch computing when the batcher stopped was still answered.
    assert out[1][0] == 2
    assert isinstance(out[2][0].exc, Overloaded)
    assert [items for _, items in fn.batches] == [[1]]


async def test_batchers_sharing_processes_take_turns_oldest_first(autojump_clock: Any, inline_model: InlineModel) -> None:
    """Two batchers on one shared worker: never two batches at once, the oldest job's batch
    first, each batch's time its own (1 s, not the wait), and the queued work of both
    counted."""
    inline_model.model_time = 1.0
    shared = SharedSlots(1, ahead=0)
    face_fn, voice_fn = FakeFn(), FakeFn()
    cfg = BatcherConfig(max_batch=1, max_wait=0.0, workers=2)
    face = Batcher("face", face_fn, cfg, shared=shared)
    voice = Batcher("voice", voice_fn, cfg, shared=shared)
    out: dict[int, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(face.run)
            await nursery.start(voice.run)
            async with trio.open_nursery() as callers:
                await submit_all(callers, face, [1], out)
                await trio.sleep(0.1)
                await submit_all(callers, voice, [10], out)
                await trio.sleep(0.1)
                await submit_all(callers, face, [2], out)
                await trio.sleep(0.1)
                await submit_all(callers, voice, [20], out)
                await trio.sleep(0.1)
                await submit_all(callers, voice, [30], out)
                await trio.sleep(2.1)
                # at 2.5 s: face 2 computing, voice 20 and 30 formed and waiting for the worker
                assert face.queued_work() == 0.0 and voice.queued_work() == pytest.approx(2.0)
            nursery.cancel_scope.cancel()
    starts = sorted((t, x) for fn in (face_fn, voice_fn) for t, items in fn.batches for x in items)
    assert [x for _, x in starts] == [1, 10, 2, 20, 30]
    assert [t for t, _ in starts] == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])
    assert face.batch_time() == pytest.approx(1.0) and voice.batch_time() == pytest.approx(1.0)
    assert {x: v for x, (v, _) in out.items()} == {1: 2, 2: 4, 10: 20, 20: 40, 30: 60}


async def test_shared_slots_go_to_the_oldest_waiter(autojump_clock: Any) -> None:
    slots = SharedSlots(1, ahead=0)
    granted: list[float] = []

    async def take(key: float) -> None:
        await slots.acquire(key)
        granted.append(key)
        await trio.sleep(1.0)
        slots.release()

    await slots.acquire(0.0)  # held while the others queue, out of order
    async with trio.open_nursery() as nursery:
        for key in (0.3, 0.1, 0.2):
            nursery.start_soon(take, key)
            await trio.sleep(0.01)
        with trio.move_on_after(0.01) as gone:  # a waiter that leaves is skipped
            await slots.acquire(0.05)
        assert gone.cancelled_caught
        slots.release()
    assert granted == [0.1, 0.2, 0.3]
    await slots.acquire(9.0)  # all released: free again at once
