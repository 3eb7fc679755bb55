"""The report of ``netid bench load``: the summary of a run's steps with its three load
checks, the plot of throughput and latency against offered load, and the human summary.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .load_steps import Generator

__all__ = ["run_summary", "plot", "human_summary"]


def run_summary(rows: list[dict[str, Any]], limit: dict[str, Any] | None, gen: Generator, challenge: bool, args: argparse.Namespace) -> dict[str, Any]:
    limit_rps = limit["limit_rps"] if limit else None
    named = {r["step"]: r for r in rows}
    # saturation steps in rounds (a comparison): "saturation-1", "saturation-2"...; their mean
    rounds = [r for r in rows if r["step"].startswith("saturation-")]
    if rounds and "saturation" not in named:
        named["saturation"] = {
            **rounds[0], "step": "saturation",
            "throughput_rps": round(sum(r["throughput_rps"] for r in rounds) / len(rounds), 3),
            "rounds": [r["throughput_rps"] for r in rounds],
        }
        cpu_ms = [r["engine_cpu_ms_per_verification"] for r in rounds if r.get("engine_cpu_ms_per_verification")]
        shares = [r["cpu"]["engine_cpu_share"] for r in rounds if r["cpu"].get("engine_cpu_share") is not None]
        if cpu_ms:
            named["saturation"]["engine_cpu_ms_per_verification"] = round(sum(cpu_ms) / len(cpu_ms), 1)
        if shares:
            named["saturation"]["cpu"] = {**rounds[0]["cpu"], "engine_cpu_share": round(sum(shares) / len(shares), 4)}
    best = max(rows, key=lambda r: r["throughput_rps"])
    throughput = named["saturation"]["throughput_rps"] if "saturation" in named else best["throughput_rps"]
    at80 = named.get("80%", best)
    errors: Counter[str] = Counter()
    for r in rows:
        errors.update(r["errors"])
    gen_share = [r["cpu"].get("generator_cpu_share") for r in rows if r["cpu"].get("generator_cpu_share") is not None]
    out: dict[str, Any] = {
        "throughput_rps": throughput,
        "limit_rps": limit_rps,
        "ratio": round(throughput / limit_rps, 3) if limit_rps else None,
        "limit_rps_before_after": [limit["limit_rps_before"], limit["limit_rps_after"]] if limit and "limit_rps_before" in limit else None,
        "offered_rps": named["saturation"]["offered_rps"] if "saturation" in named else best["offered_rps"],
        "p50_ms": at80["p50_ms"],
        "p99_ms": at80["p99_ms"],
        "latency_at": at80["step"],
        "overloaded": sum(r["overloaded"] for r in rows),
        "unanswered": sum(r["unanswered"] for r in rows),
        "errors": dict(errors),
        "residents": len(gen.residents),
        "relying_parties": len(gen.rps),
        "challenge_check": challenge,
        "generator_cpu_share_max": max(gen_share) if gen_share else None,
    }
    if "rounds" in named.get("saturation", {}):
        out["saturation_rounds"] = named["saturation"]["rounds"]
    if limit and "best" in limit:
        # CPU per verification does not depend on how much of the shared machine each got
        out["limit_layout"] = {k: limit["best"][k] for k in ("batch", "threads", "intra", "processes")}
        out["limit_cpu_share"] = limit["best"].get("cpu_share")
        out["limit_cpu_ms_per_verification"] = limit["best"]["cpu_ms_per_verification"]
        sat = named.get("saturation", best)
        engine_ms = sat.get("engine_cpu_ms_per_verification")
        if engine_ms:
            # On a shared machine the wall-clock ratio mostly says how much CPU each side got;
            # CPU per verification says how much work the engine adds to the models' own.
            out["engine_cpu_share"] = sat["cpu"].get("engine_cpu_share")
            out["engine_cpu_ms_per_verification"] = engine_ms
            out["cpu_efficiency"] = round(limit["best"]["cpu_ms_per_verification"] / engine_ms, 3)
    layers = at80.get("layer_cpu_ms_per_verification")
    if layers is not None:
        # measured at 80 %: no refused work in it, every request carried to its result
        out["layer_cpu_ms_per_verification"] = layers
        out["services_cpu_ms_per_verification"] = at80.get("services_cpu_ms_per_verification")
        for key in ("services_cpu_raw_ms_per_verification", "services_idle_cpu_ms_per_s",
                    "layer_cpu_raw_ms_per_verification", "layer_idle_cpu_ms_per_s"):
            if at80.get(key) is not None:
                out[key] = at80[key]
        out["store_state_cpu_ms_per_verification"] = round(sum(v for k, v in layers.items() if k in ("store", "state")) + (at80.get("services_cpu_ms_per_verification") or 0.0), 2)
    if "saturation" in named and limit_rps:
        out["checks"] = {
            "saturation_ratio_ge_0.90": {
                "value": out["ratio"],
                "cpu_efficiency": out.get("cpu_efficiency"),
                "limit_cpu_share": out.get("limit_cpu_share"),
                "engine_cpu_share": out.get("engine_cpu_share"),
                "pass": out["ratio"] is not None and out["ratio"] >= 0.90,
            },
        }
        if "80%" in named:
            p99 = named["80%"]["p99_ms"]
            out["checks"]["p99_le_1s_at_80pct"] = {"value_ms": p99, "pass": p99 is not None and p99 <= 1000.0}
            engine_ms = named["80%"].get("engine_cpu_ms_per_verification")
            if engine_ms and named["80%"].get("arrived_rps"):
                # what queueing alone gives at this load and cost: one core per verification
                out["checks"]["p99_le_1s_at_80pct"]["queue_model_ms"] = queue_p99_ms(
                    named["80%"]["arrived_rps"], engine_ms, os.cpu_count() or 1)
        if "200%" in named:
            s2 = named["200%"]
            good = s2["throughput_rps"] / throughput if throughput else 0.0
            over_ok = s2["overloaded_p99_ms"] is None or s2["overloaded_p99_ms"] <= 100.0
            out["checks"]["overload_at_2x"] = {
                "goodput_vs_capacity": round(good, 3),
                "overloaded": s2["overloaded"],
                "overloaded_p99_ms": s2["overloaded_p99_ms"],
                "unanswered": s2["unanswered"],
                "other_errors": {k: v for k, v in s2["errors"].items() if k != "overloaded"},
                "pass": good >= 0.90 and over_ok and s2["unanswered"] == 0,
            }
    if "store_state_cpu_ms_per_verification" in out:
        out.setdefault("checks", {})["store_state_cpu_le_5ms"] = {
            "value_ms": out["store_state_cpu_ms_per_verification"], "pass": out["store_state_cpu_ms_per_verification"] <= 5.0,
        }
    out["steps"] = rows
    return out


def queue_p99_ms(rate: float, service_ms: float, servers: int, *, arrivals: int = 200_000, seed: int = 0) -> float:
    """The 99th percentile of the time in system of an M/D/c queue: Poisson arrivals at
    ``rate`` per second, each served for ``service_ms`` by the first of ``servers`` free,
    first come first served. The floor a verification's p99 stands on at that load when
    each one takes ``service_ms`` of one core and the cores are the servers."""
    import heapq

    import numpy as np

    arrive = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, arrivals)).tolist()
    free = [0.0] * servers  # when each server is next free: a heap, the earliest first
    service, spent = service_ms / 1000.0, []
    for t in arrive:
        start = max(t, free[0])  # the first server to be free takes it
        heapq.heapreplace(free, start + service)
        spent.append(start + service - t)
    return round(float(np.quantile(spent, 0.99)) * 1000.0, 1)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # x: the arrival rate the step really produced (Poisson: near the nominal rate, not equal)
    rows = sorted(summary["steps"], key=lambda r: r["arrived_rps"])
    x = [r["arrived_rps"] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    a.plot(x, [r["throughput_rps"] for r in rows], "o-", label="throughput (answered verifications/s)")
    top = max(x + [r["throughput_rps"] for r in rows]) * 1.1
    a.plot([0, top], [0, top], ":", color="grey", label="offered")
    if summary.get("limit_rps"):
        a.axhline(summary["limit_rps"], color="red", linestyle="--", label=f"model-bound limit {summary['limit_rps']:.2f}/s")
    a.set_ylabel("verifications / s")
    a.legend(loc="upper left", fontsize=8)
    a.grid(alpha=0.3)
    for key, style, label in (("p50_ms", "o-", "p50"), ("p99_ms", "s-", "p99"), ("overloaded_p99_ms", "^--", "overloaded answer p99")):
        pts = [(r["arrived_rps"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            b.plot(*zip(*pts), style, label=label)
    b.axhline(1000, color="red", linestyle=":", linewidth=1, label="1 s")
    b.set_yscale("log")
    b.set_xlabel("offered load (arrivals / s, Poisson)")
    b.set_ylabel("latency (ms)")
    b.legend(loc="best", fontsize=8)
    b.grid(alpha=0.3, which="both")
    fig.suptitle(f"netid-engine under load ({os.cpu_count()} cores, challenge check {'on' if summary.get('challenge_check') else 'off'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def human_summary(s: dict[str, Any]) -> None:
    print(
        f"LOAD throughput {s['throughput_rps']:.2f}/s {'at saturation' if 'checks' in s else 'at the best step'} (offered {s['offered_rps']:.2f}/s); "
        f"limit {s['limit_rps'] if s['limit_rps'] is None else format(s['limit_rps'], '.2f')}/s"
        f"{' (before/after: {} / {})'.format(*s['limit_rps_before_after']) if s.get('limit_rps_before_after') else ''}; ratio {s['ratio']}; "
        f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms at {s['latency_at']}; overloaded {s['overloaded']}; "
        f"unanswered {s['unanswered']}; errors {s['errors']}; generator CPU at most {100 * (s['generator_cpu_share_max'] or 0):.1f} % of the machine"
    )
    if s.get("cpu_efficiency"):
        print(
            f"  CPU per verification: limit {s['limit_cpu_ms_per_verification']} ms, engine {s['engine_cpu_ms_per_verification']} ms "
            f"(efficiency {s['cpu_efficiency']}); machine share while measuring: limit {s['limit_cpu_share']}, engine {s['engine_cpu_share']}"
        )
    if s.get("store"):
        print(f"  store {s['store']}, {s.get('nodes', 1)} node(s)")
    if s.get("layer_cpu_ms_per_verification") is not None:
        services = s.get("services_cpu_ms_per_verification")
        print(
            f"  store and state CPU per verification at {s['latency_at']}: {s['store_state_cpu_ms_per_verification']} ms "
            f"(engine threads {s['layer_cpu_ms_per_verification']}"
            f"{f', PostgreSQL and Redis processes {services}' if services is not None else ''})"
        )
        if s.get("services_idle_cpu_ms_per_s") is not None:
            print(f"    counted above the idle rates of the processes, {s['services_idle_cpu_ms_per_s']} ms/s, and of the engine threads, "
                  f"{s.get('layer_idle_cpu_ms_per_s')} ms/s; with the idle work: processes "
                  f"{s['services_cpu_raw_ms_per_verification']} ms, engine threads {s.get('layer_cpu_raw_ms_per_verification')} ms "
                  f"(match: the opening and scoring of templates, not in the sum)")
    base = s.get("baseline")
    if base:
        print(
            f"  baseline {base['store']}, 1 node, same limit: throughput {base['throughput_rps']:.2f}/s, ratio {base['ratio']}, "
            f"p99 {base['p99_ms']} ms at {base['latency_at']}, unanswered {base['unanswered']}, errors {base['errors']}"
            f"{'; store and state CPU ' + str(base['store_state_cpu_ms_per_verification']) + ' ms' if base.get('store_state_cpu_ms_per_verification') is not None else ''}"
        )
    for name, check in s.get("checks", {}).items():
        print(f"  check {name}: {'PASS' if check['pass'] else 'FAIL'} {({k: v for k, v in check.items() if k != 'pass'})}")
    print(f"  plot: {s['plot']}; engine exit code {s.get('engine_exit_code')}")
