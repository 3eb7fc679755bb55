"""Error rates with honest confidence bounds, and score distributions too big to keep.

* :func:`clopper_pearson` - the exact binomial interval, by bisection on the binomial
  distribution function (the same quantity as the regularised incomplete beta that
  defines the interval; no scipy needed).
* :func:`rate_interval` - a rate with its 95 % bounds; with no error seen, the upper
  bound is the rule of three (3 / n).
* :class:`TailHistogram` - a streaming distribution of impostor scores: a fine
  histogram of everything plus the exact highest scores (with who produced them), so
  that thresholds at FMR 1e-3 ... 1e-6 come from exact order statistics while 87
  million scores are never held in memory.
* :func:`operating_point` / :func:`det_curve` / :func:`eer` - FNMR at a target FMR,
  the DET curve and the equal error rate from genuine scores and an impostor
  distribution (a :class:`TailHistogram` or anything with the same ``count_ge``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "binom_cdf",
    "clopper_pearson",
    "RateInterval",
    "rate_interval",
    "ImpostorDistribution",
    "ExactScores",
    "TailHistogram",
    "OperatingPointResult",
    "operating_point",
    "threshold_at_fmr",
    "det_curve",
    "eer",
]


# --------------------------------------------------------------------------- binomial


#: Terms further than this many standard deviations from the mean are below e^-110.
_SD_WINDOW = 15.0
#: Above this many errors (and successes) the interval is the normal approximation,
#: which then agrees with Clopper-Pearson to a few parts in ten thousand of its width.
_NORMAL_ABOVE = 1_000_000


def _binom_cdf_fn(k: int, n: int):
    """p -> P(X <= k) for X ~ Binomial(n, p), summed in log space.

    Only the terms within ``_SD_WINDOW`` standard deviations of the mean (and up to
    ``k``) are summed, so memory and time stay small for any ``n`` (the fused
    cross product has 1e11 comparisons and 1e8 errors); outside that window the
    probability mass is far below double precision.
    """
    if k < 0:
        return lambda p: 0.0
    if k >= n:
        return lambda p: 1.0
    log_n_fact = math.lgamma(n + 1.0)

    def cdf(p: float) -> float:
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        mean = n * p
        sd = math.sqrt(n * p * (1.0 - p))
        if mean - _SD_WINDOW * sd - 1.0 > k:
            return 0.0
        if mean + _SD_WINDOW * sd + 1.0 < k:
            return 1.0
        j0 = max(0, math.floor(min(float(k), mean) - _SD_WINDOW * sd - 10.0))
        log_pmf0 = (log_n_fact - math.lgamma(j0 + 1.0) - math.lgamma(n - j0 + 1.0)
                    + j0 * math.log(p) + (n - j0) * math.log1p(-p))
        j = np.arange(j0 + 1, k + 1, dtype=np.float64)
        steps = np.log(n - j + 1.0) - np.log(j) + (math.log(p) - math.log1p(-p))
        log_pmf = np.concatenate(([log_pmf0], log_pmf0 + np.cumsum(steps)))
        top = float(log_pmf.max())
        return min(1.0, math.exp(top) * float(np.exp(log_pmf - top).sum()))

    return cdf


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return _binom_cdf_fn(k, n)(p)


def _bisect_decreasing(f, target: float, lo: float, hi: float) -> float:
    """x in [lo, hi] with f(x) = target for f decreasing in x."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi) or hi - lo <= 1e-12 * hi:
            break
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval for ``k`` events in ``n`` trials.

    The upper bound solves P(X <= k | p) = alpha/2, the lower P(X >= k | p) = alpha/2.
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k} n={n}")
    alpha = 1.0 - confidence
    phat = k / n
    if min(k, n - k) > _NORMAL_ABOVE:
        z = _z(1.0 - alpha / 2)
        half = z * math.sqrt(phat * (1.0 - phat) / n)
        return max(0.0, phat - half), min(1.0, phat + half)
    lower = 0.0 if k == 0 else _bisect_decreasing(
        _binom_cdf_fn(k - 1, n), 1.0 - alpha / 2, 0.0, phat
    )
    upper = 1.0 if k == n else _bisect_decreasing(
        _binom_cdf_fn(k, n), alpha / 2, phat, 1.0
    )
    return lower, upper


def _z(q: float) -> float:
    """The standard normal quantile, by bisection on erf."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True, slots=True)
class RateInterval:
    errors: int
    n: int
    rate: float
    lower: float
    upper: float
    #: "clopper-pearson" or "rule-of-three" (no error seen: upper = 3 / n).
    method: str


def rate_interval(k: int, n: int, confidence: float = 0.95) -> RateInterval:
    """An error rate with its 95 % bounds (rule of three when no error was seen)."""
    if n <= 0:
        return RateInterval(k, n, math.nan, 0.0, 1.0, "none")
    if k == 0 and confidence == 0.95:
        return RateInterval(0, n, 0.0, 0.0, min(1.0, 3.0 / n), "rule-of-three")
    lo, hi = clopper_pearson(k, n, confidence)
    method = "normal-approximation" if min(k, n - k) > _NORMAL_ABOVE else "clopper-pearson"
    return RateInterval(k, n, k / n, lo, hi, method)


# --------------------------------------------------------------------------- distributions


class ImpostorDistribution(Protocol):
    """What the figures need of an impostor score distribution."""

    n: int

    def count_ge(self, t: np.ndarray | float) -> np.ndarray: ...

    def threshold_for(self, allowed: int) -> tuple[float, bool]:
        """The lowest threshold with at most ``allowed`` scores >= it, and whether it
        is exact (just above an order statistic) or bounded by a histogram bin."""
        ...


class ExactScores:
    """A score distribution small enough to keep every score (sorted ascending)."""

    def __init__(self, scores: np.ndarray) -> None:
        s = np.asarray(scores, dtype=np.float32).reshape(-1)
        self.sorted = np.sort(s)
        self.n = int(s.size)

    def count_ge(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return self.n - np.searchsorted(self.sorted, t, side="left")

    def count_lt(self, t: np.ndarray | float) -> np.ndarray:
        return np.searchsorted(self.sorted, np.asarray(t, dtype=np.float64), side="left")

    def kth_highest(self, k: int) -> float:
        """The k-th highest score (1-based); -inf past the lowest."""
        return -math.inf if k > self.n else float(self.sorted[self.n - k])

    def threshold_for(self, allowed: int) -> tuple[float, bool]:
        return _just_above(self.kth_highest(allowed + 1)), True

    def mean_std(self) -> tuple[float, float]:
        if self.n == 0:
            return math.nan, math.nan
        return float(self.sorted.mean(dtype=np.float64)), float(self.sorted.std(dtype=np.float64))


class TailHistogram:
    """Streaming histogram over ``[lo, hi)`` plus the exact ``keep`` highest scores.

    Invariant: every score added that is strictly above ``floor`` is in the tail. Counts
    at thresholds above ``floor`` are therefore exact; below it they come from the
    histogram, exact to one bin (``1 / bins_per_unit``).
    """

    def __init__(self, keep: int, *, lo: float = -1.0, hi: float = 1.0, bins_per_unit: int = 10_000) -> None:
        self.keep = max(1, int(keep))
        self.lo, self.hi, self.scale = float(lo), float(hi), int(bins_per_unit)
        self.n_bins = int(round((hi - lo) * bins_per_unit)) + 1  # last bin catches s == hi
        self.counts = np.zeros(self.n_bins, dtype=np.int64)
        self.n = 0
        self.floor = -math.inf
        self._buf: list[np.ndarray] = []
        self._buf_idx: list[np.ndarray] = []
        self._buf_len = 0
        self._sum = 0.0
        self._sumsq = 0.0
        self._final: tuple[np.ndarray, np.ndarray] | None = None

    def _bins(self, s: np.ndarray) -> np.ndarray:
        b = ((s - np.float32(self.lo)) * np.float32(self.scale)).astype(np.int64)
        return np.clip(b, 0, self.n_bins - 1, out=b)

    def add(self, scores: np.ndarray, pairs: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """Add 1-D float32 scores; ``pairs`` says who produced each: an (n, 2) array, or
        a function from the positions of the scores kept for the tail to their pairs
        (so that pairs are worked out only for the few that reach the tail)."""
        s = np.asarray(scores, dtype=np.float32).reshape(-1)
        if s.size == 0:
            return
        self._final = None
        self.n += int(s.size)
        self.counts += np.bincount(self._bins(s), minlength=self.n_bins)
        s64 = s.astype(np.float64)
        self._sum += float(s64.sum())
        self._sumsq += float(np.dot(s64, s64))
        sel = np.flatnonzero(s > self.floor)
        if sel.size:
            self._buf.append(s[sel])
            if pairs is None:
                idx = np.full((sel.size, 2), -1, np.int32)
            elif callable(pairs):
                idx = pairs(sel)
            else:
                idx = np.asarray(pairs)[sel]
            self._buf_idx.append(np.asarray(idx, dtype=np.int32))
            self._buf_len += int(sel.size)
            if self._buf_len > 2 * self.keep:
                self._prune()

    def _prune(self) -> None:
        s = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        idx = np.concatenate(self._buf_idx) if len(self._buf_idx) > 1 else self._buf_idx[0]
        if s.size > self.keep:
            part = np.argpartition(s, s.size - self.keep)[s.size - self.keep :]
            s, idx = s[part], idx[part]
            self.floor = float(s.min())
            # keep only what is strictly above the new floor plus ties at it; the strict
            # invariant holds because everything dropped is <= floor.
        self._buf, self._buf_idx, self._buf_len = [s], [idx], int(s.size)

    def tail(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact tail scores sorted descending, with their pairs."""
        if self._final is None:
            if not self._buf:
                self._final = (np.zeros(0, np.float32), np.zeros((0, 2), np.int32))
            else:
                self._prune()
                s, idx = self._buf[0], self._buf_idx[0]
                order = np.argsort(-s, kind="stable")
                self._final = (s[order], idx[order])
        return self._final

    def mean_std(self) -> tuple[float, float]:
        if self.n == 0:
            return math.nan, math.nan
        mean = self._sum / self.n
        return mean, math.sqrt(max(0.0, self._sumsq / self.n - mean * mean))

    def edges(self) -> np.ndarray:
        return self.lo + np.arange(self.n_bins, dtype=np.float64) / self.scale

    def count_ge(self, t: np.ndarray | float) -> np.ndarray:
        """How many scores are >= t (exact above ``floor``, to one bin below it)."""
        t = np.asarray(t, dtype=np.float64)
        tail, _ = self.tail()
        asc = tail[::-1]
        exact = asc.size - np.searchsorted(asc, t, side="left")
        # histogram: bins whose lower edge is >= t (bin b covers [lo + b/scale, ...)).
        ge_from_bin = np.concatenate((np.cumsum(self.counts[::-1])[::-1], [0]))
        b = np.clip(np.ceil((t - self.lo) * self.scale - 1e-9).astype(np.int64), 0, self.n_bins)
        approx = ge_from_bin[b]
        return np.where(t > self.floor, exact, approx)

    def threshold_for(self, allowed: int) -> tuple[float, bool]:
        """Exact (just above the (allowed+1)-th highest) when the tail holds it;
        otherwise the upper edge of the histogram bin that holds it."""
        k = allowed + 1
        if k > self.n:
            return -math.inf, True
        tail, _ = self.tail()
        if k <= tail.size:
            return _just_above(float(tail[k - 1])), True
        cum = np.cumsum(self.counts[::-1])
        b = self.n_bins - 1 - int(np.searchsorted(cum, k, side="left"))
        return float(self.lo + (b + 1) / self.scale), False

    def max_score(self) -> float:
        tail, _ = self.tail()
        return float(tail[0]) if tail.size else -math.inf


def _just_above(s: float) -> float:
    """The next float32 above ``s``: accepting ``score >= it`` excludes ``s`` itself."""
    if s == -math.inf:
        return -math.inf
    return float(np.nextafter(np.float32(s), np.float32(np.inf)))


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True, slots=True)
class OperatingPointResult:
    target_fmr: float
    threshold: float
    fmr: RateInterval
    fnmr: RateInterval
    #: target_fmr * n_impostor >= 1: the data resolves the target at all.
    resolved: bool
    #: the threshold is an exact order statistic (not a histogram bin edge).
    exact: bool


def threshold_at_fmr(impostor: ImpostorDistribution, target_fmr: float) -> tuple[float, bool, bool]:
    """The lowest threshold accepting at most ``floor(target * n)`` impostors.

    Accept means ``score >= threshold``. Returns ``(threshold, resolved, exact)``:
    ``resolved`` is false when ``target * n < 1`` (then no impostor may pass and the
    threshold sits just above the highest one: the data cannot show the target).
    """
    allowed = math.floor(target_fmr * impostor.n * (1 + 1e-12))
    thr, exact = impostor.threshold_for(allowed)
    return thr, allowed >= 1, exact


def operating_point(
    genuine: np.ndarray | ExactScores, impostor: ImpostorDistribution, target_fmr: float,
    threshold: float | None = None,
) -> OperatingPointResult:
    """FNMR at the threshold for ``target_fmr`` (or at a given, calibrated ``threshold``)."""
    gen = genuine if isinstance(genuine, ExactScores) else ExactScores(genuine)
    if threshold is None:
        thr, resolved, exact = threshold_at_fmr(impostor, target_fmr)
    else:
        thr, resolved, exact = float(threshold), target_fmr * impostor.n >= 1, True
    fm = int(impostor.count_ge(thr))
    fnm = int(gen.count_lt(thr))
    return OperatingPointResult(
        target_fmr, thr, rate_interval(fm, impostor.n), rate_interval(fnm, gen.n), resolved, exact
    )


def det_curve(
    genuine: np.ndarray | ExactScores, impostor: ImpostorDistribution, *, points: int = 400,
    thresholds: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, FMR, FNMR) from the lowest genuine score to above every impostor.

    Thresholds are spread evenly in score and, where FMR falls by decades, at the
    thresholds for geometrically spaced numbers of accepted impostors.
    """
    gen = genuine if isinstance(genuine, ExactScores) else ExactScores(genuine)
    if thresholds is None:
        allowed = np.unique(np.geomspace(1, max(1, impostor.n), points).astype(np.int64)) - 1
        qs = np.array([impostor.threshold_for(int(a))[0] for a in allowed], dtype=np.float64)
        qs = qs[np.isfinite(qs)]
        lo = float(gen.sorted[0]) if gen.n else (float(qs.min()) if qs.size else -1.0)
        hi = max(float(qs.max()) if qs.size else 1.0, float(gen.sorted[-1]) if gen.n else 1.0)
        thresholds = np.unique(np.concatenate((np.linspace(lo, hi, points), qs)))
    thresholds = np.asarray(thresholds, dtype=np.float64)
    fmr = np.asarray(impostor.count_ge(thresholds), dtype=np.float64) / max(1, impostor.n)
    fnmr = np.asarray(gen.count_lt(thresholds), dtype=np.float64) / max(1, gen.n)
    return thresholds, fmr, fnmr


def eer(genuine: np.ndarray | ExactScores, impostor: ImpostorDistribution) -> tuple[float, float]:
    """Equal error rate and the threshold where FMR and FNMR cross."""
    thr, fmr, fnmr = det_curve(genuine, impostor, points=4000)
    i = int(np.argmin(np.abs(fmr - fnmr)))
    return float(0.5 * (fmr[i] + fnmr[i])), float(thr[i])
