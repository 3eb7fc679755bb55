"""The store and state layers' CPU meter, and what ``netid bench load`` adds for many nodes: a
schema and key prefix of the run's own (removed at the end), the database servers found by
their ports, and the comparison with a SQLite baseline."""

from __future__ import annotations

import os
import secrets
import socket
import time

import pytest

from engine.bench._common import listening_pids, services_cpu_seconds
from engine.bench.load import compare
from engine.bench.services import RunServices
from engine.ops.layer_cpu import LayerCpu
from engine.ops.metrics import Metrics

from .conftest import POSTGRES_URL, service_unreachable

REDIS_URL = os.environ.get("NETID_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _spin(seconds: float) -> int:
    end, n = time.thread_time() + seconds, 0
    while time.thread_time() < end:
        n += 1
    return n


def test_layer_cpu_counts_the_calling_threads_cpu_per_layer():
    meter = LayerCpu()
    assert meter.call("store", lambda: _spin(0.05)) > 0
    meter.call("state", lambda: time.sleep(0.05))  # waiting is not CPU
    got = meter.seconds()
    assert 0.045 <= got["store"] < 0.5
    assert got["state"] < 0.02


def test_a_call_inside_another_counts_for_its_own_layer_only():
    meter = LayerCpu()

    def match() -> None:
        _spin(0.03)
        meter.call("store", lambda: _spin(0.06))

    meter.call("match", match)
    got = meter.seconds()
    assert 0.055 <= got["store"] < 0.5
    assert 0.025 <= got["match"] < 0.055  # its own 0.03 s, not the store's 0.06 s as well
    assert got["state"] == 0.0
    meter.call("store", lambda: _spin(0.01))  # a later top-level call in the same thread
    assert meter.seconds()["match"] == got["match"]


def test_layer_cpu_is_exported_and_counts_a_failed_call():
    metrics = Metrics()
    with pytest.raises(ZeroDivisionError):
        metrics.layer_cpu.call("state", lambda: _spin(0.02) / 0)
    text = metrics.render().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith('netid_layer_cpu_seconds_total{layer="state"}'))
    assert float(line.split()[-1]) >= 0.015
    assert 'netid_layer_cpu_seconds_total{layer="store"} 0.0' in text


def test_the_run_works_in_a_schema_and_prefix_of_its_own_unless_given():
    own = RunServices("postgresql://postgres@127.0.0.1:5432/test?sslmode=disable", "redis://127.0.0.1:6379/0", "abc123")
    assert own.store == "postgresql://postgres@127.0.0.1:5432/test?sslmode=disable&schema=netid_bench_abc123"
    assert own.state == "redis://127.0.0.1:6379/0?prefix=netid_bench_abc123"
    assert own.shared and own.ports() == [5432, 6379]
    assert own.serve_args() == ["--store", own.store, "--state", own.state]
    given = RunServices("postgresql://127.0.0.1/test?schema=mine", "redis://127.0.0.1:6390/1?prefix=p", "abc123")
    assert given.store.endswith("schema=mine") and given.state.endswith("prefix=p")
    assert given.ports() == [5432, 6390]
    sqlite = RunServices(None, None, "abc123")
    assert not sqlite.shared and sqlite.serve_args() == [] and sqlite.ports() == []


def test_clean_up_removes_the_runs_schema_and_keys_and_nothing_else():
    try:
        import psycopg
        import redis

        pg = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
        r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        r.ping()
    except Exception as exc:  # noqa: BLE001 - not installed, refused...
        service_unreachable("PostgreSQL or Redis", f"{type(exc).__name__}: {str(exc).strip()[:160]}")
    tag = secrets.token_hex(3)
    run = RunServices(POSTGRES_URL, REDIS_URL, tag)
    other = f"netid_bench_{tag}x"  # a neighbour with the same start survives
    with pg:
        pg.execute(f'CREATE SCHEMA "{run.name}"')
        pg.execute(f'CREATE TABLE "{run.name}".t (x int)')
        pg.execute(f'CREATE SCHEMA "{other}"')
        r.set(f"{run.name}:s:1", "x")
        r.set(f"{other}:s:1", "y")
        try:
            run.clean_up()
            schemas = {row[0] for row in pg.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'netid_bench_%%'")}
            assert run.name not in schemas and other in schemas
            assert r.get(f"{run.name}:s:1") is None and r.get(f"{other}:s:1") == b"y"
        finally:
            pg.execute(f'DROP SCHEMA IF EXISTS "{other}" CASCADE')
            pg.execute(f'DROP SCHEMA IF EXISTS "{run.name}" CASCADE')
            r.delete(f"{other}:s:1", f"{run.name}:s:1")
            r.close()


def test_the_servers_are_found_by_their_listening_ports():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert listening_pids([port]) == [os.getpid()]
    assert listening_pids([port]) == []
    assert services_cpu_seconds([os.getpid()]) > 0.0
    assert services_cpu_seconds([]) == 0.0


def _summary(ratio: float | None, store: str) -> dict:
    return {"ratio": ratio, "store": store, "throughput_rps": 10.0, "steps": [], "checks": {"x": {"pass": True}}}


@pytest.mark.parametrize(("shared", "baseline", "passes"), [(0.90, 0.92, True), (0.95, 0.90, False), (0.87, 0.90, True)])
def test_compare_checks_the_ratio_against_the_sqlite_baseline(shared, baseline, passes):
    out = compare([_summary(baseline, "sqlite"), _summary(shared, "postgresql")])
    check = out["checks"]["ratio_within_0.03_of_sqlite"]
    assert check["pass"] is passes and check["value"] == round(shared - baseline, 3)
    assert out["store"] == "postgresql" and out["baseline"]["store"] == "sqlite" and "steps" not in out["baseline"]
    assert out["checks"]["x"]["pass"]


def test_compare_of_one_run_is_that_run():
    one = _summary(0.9, "sqlite")
    assert compare([one]) is one and "ratio_within_0.03_of_sqlite" not in one["checks"]


def test_a_comparisons_capacity_is_the_mean_of_its_alternating_saturation_steps():
    import argparse

    from engine.bench.load_report import run_summary

    def row(step: str, rps: float, cpu_ms: float, **extra) -> dict:
        return {"step": step, "offered_rps": 15.0, "throughput_rps": rps, "p50_ms": 400.0, "p99_ms": 900.0,
                "overloaded": 0, "overloaded_p99_ms": None, "unanswered": 0, "errors": {}, "cpu": {"engine_cpu_share": 0.9},
                "engine_cpu_ms_per_verification": cpu_ms, **extra}

    rows = [row("saturation-1", 11.0, 160.0), row("saturation-2", 12.0, 170.0), row("50%", 5.7, 160.0),
            row("80%", 9.2, 165.0, layer_cpu_ms_per_verification={"match": 0.5, "state": 1.5, "store": 1.0},
                services_cpu_ms_per_verification=2.0),
            row("200%", 11.3, 166.0)]
    gen = argparse.Namespace(residents=[1, 2], rps=[1])
    limit = {"limit_rps": 12.5, "best": {"batch": 2, "threads": 2, "intra": 1, "processes": 1, "cpu_ms_per_verification": 150.0, "cpu_share": 0.95}}
    s = run_summary(rows, limit, gen, True, argparse.Namespace())
    assert s["throughput_rps"] == 11.5 and s["saturation_rounds"] == [11.0, 12.0] and s["ratio"] == round(11.5 / 12.5, 3)
    assert s["engine_cpu_ms_per_verification"] == 165.0
    # the matcher's opening and scoring of the templates is the same on every store: not counted
    assert s["store_state_cpu_ms_per_verification"] == 4.5 and s["checks"]["store_state_cpu_le_5ms"]["pass"]
    assert s["checks"]["overload_at_2x"]["goodput_vs_capacity"] == round(11.3 / 11.5, 3)


def test_the_queue_model_is_the_service_time_when_nothing_waits_and_grows_with_the_load():
    from engine.bench.load_report import queue_p99_ms

    assert queue_p99_ms(0.01, 150.0, 2, arrivals=5_000) == 150.0  # one in a hundred seconds: no queue
    light, busy = (queue_p99_ms(r, 150.0, 2, arrivals=20_000) for r in (5.0, 12.0))
    assert 150.0 < light < busy
    assert queue_p99_ms(12.0, 150.0, 4, arrivals=20_000) < busy  # more servers, less waiting
