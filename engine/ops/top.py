"""``netid top``: a live terminal view of a running engine, read from its ``/metrics``.

    netid top --url http://127.0.0.1:9400/metrics          # refresh every second
    netid top --url http://127.0.0.1:9400/metrics --once   # one frame, then exit

Every frame compares two scrapes: rates are counter increments over the interval, and
latency percentiles are interpolated inside the histogram buckets that filled during
the interval (as Prometheus' ``histogram_quantile`` does), so they describe the last
interval, not the engine's whole life. Shown: requests per second by type with their
error share and latency p50/p95/p99; error codes; per model the queue depth, batches
per second, mean batch size, queue wait and model time; requests in flight,
connections, ``overloaded`` and ``rate_limited`` rejections; spoken-challenge checks and
the share the screen decided without the phone loop; credentials by status; readiness
(``/readyz`` on the same port).

Plain ANSI, no dependencies beyond the standard library and prometheus-client's parser.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Snapshot", "scrape", "parse_metrics", "histogram_quantile", "render", "main"]

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Snapshot:
    """One scrape: sample name and sorted labels -> value, and when it was taken."""

    at: float
    samples: dict[tuple[str, Labels], float]
    ready: bool | None = None

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def series(self, name: str) -> dict[Labels, float]:
        return {lab: v for (n, lab), v in self.samples.items() if n == name}


def parse_metrics(text: str, *, at: float | None = None, ready: bool | None = None) -> Snapshot:
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return Snapshot(time.monotonic() if at is None else at, samples, ready)


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-given URL
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def scrape(url: str, *, timeout: float = 5.0) -> Snapshot:
    """Fetch ``url`` (a /metrics endpoint) and the readiness beside it."""
    status, body = _get(url, timeout)
    if status != 200:
        raise OSError(f"{url} answered HTTP {status}")
    parts = urlsplit(url)
    ready: bool | None
    try:
        ready = _get(urlunsplit((parts.scheme, parts.netloc, "/readyz", "", "")), timeout)[0] == 200
    except OSError:
        ready = None
    return parse_metrics(body.decode("utf-8", "replace"), ready=ready)


# ---- arithmetic on two scrapes ----------------------------------------------------------------
def _delta(prev: Snapshot | None, cur: Snapshot, name: str) -> dict[Labels, float]:
    now = cur.series(name)
    if prev is None:
        return now
    before = prev.series(name)
    # a counter that went down means the engine restarted: take the new value
    return {lab: (v - before.get(lab, 0.0) if v >= before.get(lab, 0.0) else v) for lab, v in now.items()}


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Quantile ``q`` from cumulative ``(upper bound, count)`` buckets, interpolated linearly.

    NaN without observations; the largest finite bound when the quantile falls in +Inf.
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _buckets(delta: dict[Labels, float], **match: str) -> list[tuple[float, float]]:
    out: dict[float, float] = defaultdict(float)
    for labels, v in delta.items():
        d = dict(labels)
        if all(d.get(k) == val for k, val in match.items()):
            out[float(d["le"])] += v
    return sorted(out.items())


def _by(delta: dict[Labels, float], key: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, v in delta.items():
        out[dict(labels).get(key, "")] += v
    return dict(out)


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else (f"{x * 1000:.0f}" if x >= 0.01 else f"{x * 1000:.1f}")


def _num(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


# ---- the frame -------------------------------------------------------------------------------------
Rate = Callable[[float], float]
Bold = Callable[[str], str]


def render(prev: Snapshot | None, cur: Snapshot, *, url: str = "", bold: bool = False) -> str:
    """One frame of text; rates and percentiles over ``prev``..``cur`` (whole life if no ``prev``)."""
    b: Bold = (lambda s: f"\x1b[1m{s}\x1b[0m") if bold else (lambda s: s)
    span = (cur.at - prev.at) if prev is not None else math.nan
    window = f"last {span:.1f} s" if prev is not None else "since start"
    rate: Rate = (lambda n: n / span) if prev is not None and span > 0 else (lambda n: math.nan)
    ready = {True: "ready", False: "NOT READY", None: "readiness ?"}[cur.ready]
    lines = [b(f"netid top  {url}  {ready}  {time.strftime('%H:%M:%S')}  ({window})")]

    creds = ", ".join(f"{dict(lab).get('status')} {int(v)}" for lab, v in sorted(cur.series("netid_credentials").items())) or "-"
    lines.append(
        f"in flight {int(cur.get('netid_in_flight'))}   connections {int(cur.get('netid_connections'))}   credentials: {creds}"
    )
    for section in (_requests, _errors, _models, _challenge, _rejections):
        lines += section(prev, cur, rate, b)
    return "\n".join(lines) + "\n"


def _requests(prev: Snapshot | None, cur: Snapshot, rate: Rate, b: Bold) -> list[str]:
    """Requests by type: rates, total, latency percentiles."""
    req = _delta(prev, cur, "netid_requests_total")
    lat_count = _delta(prev, cur, "netid_request_latency_seconds_count")
    lat_b = _delta(prev, cur, "netid_request_latency_seconds_bucket")
    per_type: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for labels, v in req.items():
        d = dict(labels)
        per_type[d.get("type", "?")][0 if d.get("outcome") == "ok" else 1] += v
    lines = ["", b(f"{'REQUESTS':<14}{'req/s':>8}{'ok/s':>8}{'err/s':>8}{'total':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")]
    totals = _by(cur.series("netid_requests_total"), "type")
    for kind in sorted(set(per_type) | set(_by(lat_count, "type"))):
        ok, err = per_type.get(kind, [0.0, 0.0])
        bk = _buckets(lat_b, type=kind)
        q = [histogram_quantile(bk, x) for x in (0.5, 0.95, 0.99)]
        lines.append(
            f"{kind:<14}{_num(rate(ok + err)):>8}{_num(rate(ok)):>8}{_num(rate(err)):>8}{int(totals.get(kind, 0)):>9}"
            f"{_ms(q[0]):>9}{_ms(q[1]):>9}{_ms(q[2]):>9}"
        )
    return lines


def _errors(prev: Snapshot | None, cur: Snapshot, rate: Rate, b: Bold) -> list[str]:
    """Error codes, most frequent first (nothing if none ever)."""
    req = _delta(prev, cur, "netid_requests_total")
    codes = _by({lab: v for lab, v in req.items() if dict(lab).get("outcome") != "ok"}, "outcome")
    all_codes = _by({lab: v for lab, v in cur.series("netid_requests_total").items() if dict(lab).get("outcome") != "ok"}, "outcome")
    if not all_codes:
        return []
    lines = ["", b(f"{'ERRORS':<22}{'/s':>8}{'total':>9}")]
    for code in sorted(all_codes, key=lambda c: -all_codes[c]):
        lines.append(f"{code:<22}{_num(rate(codes.get(code, 0.0))):>8}{int(all_codes[code]):>9}")
    return lines


def _models(prev: Snapshot | None, cur: Snapshot, rate: Rate, b: Bold) -> list[str]:
    """Per model: queue depth, batches, mean batch size, queue wait, model time, abandoned jobs."""
    size_c = _by(_delta(prev, cur, "netid_batch_size_count"), "model")
    size_s = _by(_delta(prev, cur, "netid_batch_size_sum"), "model")
    wait_b = _delta(prev, cur, "netid_batch_wait_seconds_bucket")
    model_b = _delta(prev, cur, "netid_model_seconds_bucket")
    depth = _by(cur.series("netid_queue_depth"), "model")
    abandoned = _by(cur.series("netid_batch_abandoned_total"), "model")
    models = sorted(set(depth) | set(size_c))
    if not models:
        return []
    lines = ["", b(f"{'MODELS':<12}{'queue':>7}{'batch/s':>9}{'items/s':>9}{'mean batch':>12}{'wait p50':>10}{'wait p99':>10}{'model p50':>11}{'abandoned':>11}")]
    for m in models:
        calls, items = size_c.get(m, 0.0), size_s.get(m, 0.0)
        wb, mb = _buckets(wait_b, model=m), _buckets(model_b, model=m)
        mean = items / calls if calls else math.nan
        lines.append(
            f"{m:<12}{int(depth.get(m, 0)):>7}{_num(rate(calls)):>9}{_num(rate(items)):>9}"
            f"{('-' if math.isnan(mean) else f'{mean:.1f}'):>12}{_ms(histogram_quantile(wb, 0.5)):>10}"
            f"{_ms(histogram_quantile(wb, 0.99)):>10}{_ms(histogram_quantile(mb, 0.5)):>11}{int(abandoned.get(m, 0)):>11}"
        )
    return lines


def _challenge(prev: Snapshot | None, cur: Snapshot, rate: Rate, b: Bold) -> list[str]:
    """Spoken-challenge checks: how many the screen decided without the phone loop."""
    if not cur.series("netid_challenge_checks_total"):
        return []
    checks = _delta(prev, cur, "netid_challenge_checks_total")
    stage, stage_all = _by(checks, "stage"), _by(cur.series("netid_challenge_checks_total"), "stage")
    failed = _by(checks, "outcome").get("fail", 0.0)
    n, n_all = sum(stage.values()), sum(stage_all.values())
    # the screen's share of the checks pocketsphinx makes (Whisper's readings have none)
    aligned = (lambda d: sum(v for k, v in d.items() if k != "read"))  # noqa: E731
    share = (lambda d: f"{100 * d.get('screen', 0.0) / aligned(d):.0f} %" if aligned(d) else "-")  # noqa: E731
    line = (f"checks {_num(rate(n)):>7}/s  failed {_num(rate(failed)):>5}/s  total {int(n_all)}   "
            f"decided by the screen {share(stage)} (since start {share(stage_all)})")
    if stage_all.get("read"):
        line += f"   read by Whisper {int(stage_all['read'])} since start"
    return ["", b("CHALLENGE"), line]


def _rejections(prev: Snapshot | None, cur: Snapshot, rate: Rate, b: Bold) -> list[str]:
    """``overloaded`` (by where) and ``rate_limited`` answers."""
    over = _by(_delta(prev, cur, "netid_overloaded_total"), "where")
    over_all = _by(cur.series("netid_overloaded_total"), "where")
    rl = sum(_delta(prev, cur, "netid_rate_limited_total").values())
    rl_all = sum(cur.series("netid_rate_limited_total").values())
    return [
        "",
        b("REJECTIONS"),
        f"overloaded    {_num(rate(sum(over.values()))):>7}/s  total {int(sum(over_all.values()))}"
        + ("  (" + ", ".join(f"{w} {int(v)}" for w, v in sorted(over_all.items())) + ")" if over_all else ""),
        f"rate_limited  {_num(rate(rl)):>7}/s  total {int(rl_all)}",
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netid top", description="Live view of a running engine's metrics.")
    p.add_argument("--url", default="http://127.0.0.1:9400/metrics", help="the engine's /metrics URL")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    p.add_argument("--once", action="store_true", help="print one frame (two scrapes, --interval apart) and exit")
    p.add_argument("--timeout", type=float, default=5.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval <= 0:
        print("--interval must be positive", file=sys.stderr)
        return 2
    tty = sys.stdout.isatty()
    if args.once:
        try:
            first = scrape(args.url, timeout=args.timeout)
            time.sleep(args.interval)
            second = scrape(args.url, timeout=args.timeout)
        except OSError as exc:
            print(f"netid top: cannot read {args.url}: {exc}", file=sys.stderr)
            return 1
        sys.stdout.write(render(first, second, url=args.url, bold=tty))
        return 0
    prev: Snapshot | None = None
    try:
        while True:
            try:
                cur = scrape(args.url, timeout=args.timeout)
                frame = render(prev, cur, url=args.url, bold=tty)
                prev = cur
            except OSError as exc:
                frame = f"netid top: cannot read {args.url}: {exc}\n"
                prev = None
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + frame)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
