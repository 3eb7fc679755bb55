"""CPU time the engine spends in its store, state and matching layers.

The store (SQLite or PostgreSQL through psycopg), the shared state (Redis through
redis-py, and its PostgreSQL tables) and the 1:1 matcher are called from trio worker
threads; a :class:`LayerCpu` runs each such call and adds the thread CPU time it took
(``time.thread_time``: user and system time of that thread alone, so the model workers and
the event loop running beside it are not counted) to its layer's total. A call made inside
another (the matcher's read of the templates from the store) counts for its own layer only:
the matcher's total is the opening and scoring of the templates, the same on every store.
The totals are exported as ``netid_layer_cpu_seconds_total{layer="store"|"state"|"match"}``;
``netid bench load`` divides their growth by the verifications answered. What the database
servers themselves spend is theirs, outside this process (``netid bench load`` measures it
from ``/proc``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["LAYERS", "LayerCpu"]

T = TypeVar("T")

#: The layers measured.
LAYERS = ("store", "state", "match")


class LayerCpu(Collector):
    """Thread CPU seconds per layer, thread-safe; a Prometheus collector of its totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = dict.fromkeys(LAYERS, 0.0)
        self._nested = threading.local()  # per thread: CPU of the calls inside the running one

    def call(self, layer: str, fn: Callable[[], T]) -> T:
        """``fn()`` in the calling (worker) thread, its CPU time added to ``layer``, less
        what calls made inside it counted for their own layers."""
        outer = getattr(self._nested, "spent", None)
        self._nested.spent = 0.0
        t0 = time.thread_time()
        try:
            return fn()
        finally:
            spent = time.thread_time() - t0
            inner, self._nested.spent = self._nested.spent, outer
            if outer is not None:
                self._nested.spent = outer + spent
            with self._lock:
                self._seconds[layer] += spent - inner

    def seconds(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "netid_layer_cpu_seconds",
            "CPU seconds spent in the worker threads that call the store, the session state and the 1:1 matcher, by layer.",
            labels=["layer"],
        )
        for layer, seconds in self.seconds().items():
            family.add_metric([layer], seconds)
        yield family

