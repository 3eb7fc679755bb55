"""The operating point of ``netid bench challenge``, chosen on part A of each set: word
offsets, silence weight, threshold and screen; or read from a calibrated checker. Also the
figures both the calibration and the report are made of (scores by set, part and label,
rates with their intervals, distributions).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np

from engine.bench._common import emit
from engine.bench.challenge_trials import KIND_OF_SET, Result
from engine.bench.stats import ExactScores, rate_interval
from engine.challenge import FAILURE_SCORE, ChallengeChecker, Screen

__all__ = [
    "WORD_OFFSET_SETS", "MIN_WORD_RATIOS", "SILENCE_WEIGHTS", "OperatingPoint", "choose_word_offsets", "apply_weight",
    "choose_weight", "choose_screen", "apply_screen", "threshold_for", "rates",
]

#: the sets whose words get offsets (a closed vocabulary: every word is in part A many times)
WORD_OFFSET_SETS = ("digits",)
#: the fewest genuine and wrong-phrase ratios of a word in part A that give it an offset
MIN_WORD_RATIOS = 20
#: silence weights tried on part A of each set when ``--silence-weight`` is not given
SILENCE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def choose_word_offsets(results: list[Result], set_: str) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Each word's offset, on part A of one set: half-way between the median of its ratios
    in genuine trials and in wrong-phrase trials; a word with fewer than
    ``MIN_WORD_RATIOS`` of either gets none. Also, per word, the medians and counts."""
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in results:
        if r.task.set != set_ or r.task.part != "A":
            continue
        for p, lab in zip(r.parts, r.task.labels):
            if p is not None and lab in ("genuine", "wrong"):
                for word, ratio in p.word_ratios:
                    ratios[(word, lab)].append(ratio)
    offsets: dict[str, float] = {}
    detail: dict[str, dict[str, Any]] = {}
    for w in sorted({w for w, _ in ratios}):
        gen, wrong = ratios[(w, "genuine")], ratios[(w, "wrong")]
        detail[w] = {"n_genuine": len(gen), "n_wrong": len(wrong), "genuine_median": float(np.median(gen)) if gen else math.nan,
                     "wrong_median": float(np.median(wrong)) if wrong else math.nan}
        if min(len(gen), len(wrong)) >= MIN_WORD_RATIOS:
            offsets[w] = (detail[w]["genuine_median"] + detail[w]["wrong_median"]) / 2
    return offsets, detail


def apply_weight(results: list[Result], set_: str, weight: float, offsets: dict[str, float] | None = None) -> None:
    """Fill in the scores of one set's results at one silence weight (and word offsets)."""
    for r in results:
        if r.task.set == set_:
            r.scores = [FAILURE_SCORE if p is None else p.score(weight, offsets) for p in r.parts]


def choose_weight(results: list[Result], set_: str, target: float,
                  offsets: dict[str, float] | None = None, bound: str = "point") -> tuple[float, list[dict[str, Any]]]:
    """The silence weight that lets most part-A genuine trials through at part A's own
    threshold for ``target`` (the smaller weight on a tie), and the whole grid."""
    grid: list[dict[str, Any]] = []
    if not any(r.task.set == set_ and r.task.part == "A" and "genuine" in r.task.labels for r in results):
        return 1.0, grid  # nothing to choose on
    for w in SILENCE_WEIGHTS:
        apply_weight(results, set_, w, offsets)
        wa, ga = _scores(results, set_, "A", "wrong"), _scores(results, set_, "A", "genuine")
        thr, _ = threshold_for(wa, target, bound)
        grid.append({"silence_weight": w, "threshold": thr, "genuine_pass_A": float((ga >= thr).mean()) if ga.size else math.nan})
    best = max(grid, key=lambda g: (g["genuine_pass_A"], -g["silence_weight"]))
    return best["silence_weight"], grid


def _screen_scores(results: list[Result], set_: str, part: str, label: str, weight: float) -> np.ndarray:
    out = [FAILURE_SCORE if p is None else p.screen_score(weight) for r in results if r.task.set == set_ and r.task.part == part
           for p, lab in zip(r.parts, r.task.labels) if lab == label]
    return np.asarray(out, dtype=np.float64)


def choose_screen(results: list[Result], set_: str, threshold: float) -> tuple[Screen | None, list[dict[str, Any]]]:
    """The screen of one set, on part A: for each silence weight, ``accept`` just above
    every wrong phrase's screen score (so the screen lets no wrong phrase of A through) and
    ``reject`` just below every genuine recording of A that the check passes (so it fails
    none of them); the weight leaving fewest genuine recordings of A to the phone loop
    wins (the smaller weight on a tie). ``None`` if part A has no trials."""
    grid: list[dict[str, Any]] = []
    for w in SILENCE_WEIGHTS:
        wrong, genuine = _screen_scores(results, set_, "A", "wrong", w), _screen_scores(results, set_, "A", "genuine", w)
        full = _scores(results, set_, "A", "genuine")
        if not wrong.size or not genuine.size:
            return None, grid
        accept = float(wrong.max()) + 1e-6
        passing = genuine[(genuine >= accept) | (full >= threshold)]
        reject = min(accept, float(passing.min()) - 1e-6) if passing.size else accept
        grid.append({"silence_weight": w, "accept": accept, "reject": reject,
                     "genuine_to_loop_A": float(((genuine >= reject) & (genuine < accept)).mean())})
    best = min(grid, key=lambda g: (g["genuine_to_loop_A"], g["silence_weight"]))
    return Screen(silence_weight=best["silence_weight"], accept=best["accept"], reject=best["reject"]), grid


def apply_screen(results: list[Result], set_: str, screen: Screen | None, weight: float, threshold: float,
                 offsets: dict[str, float] | None = None) -> None:
    """The engine's decision on each trial of a set: the screen where it is clear, else
    the challenge score (at ``weight`` and ``offsets``) against ``threshold``."""
    for r in results:
        if r.task.set != set_:
            continue
        r.passed, r.screened = [], []
        for p in r.parts:
            decided = None if p is None or screen is None else screen.decide(p.screen_score(screen.silence_weight))
            # no parts: the alignment failed (the screen fails it) or a pass was refused
            r.screened.append(decided is not None or (p is None and screen is not None))
            r.passed.append(bool(decided) if decided is not None else p is not None and p.score(weight, offsets) >= threshold)


def _decisions(results: list[Result], set_: str, part: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """The engine's decisions on one set, part and label, and whether the screen took them."""
    rows = [(ok, sc) for r in results if r.task.set == set_ and r.task.part == part
            for ok, sc, lab in zip(r.passed, r.screened, r.task.labels) if lab == label]
    return np.asarray([a for a, _ in rows], dtype=bool), np.asarray([b for _, b in rows], dtype=bool)


# --------------------------------------------------------------------------- figures


def _genuine_by_group(results: list[Result], set_: str, part: str) -> dict[str, list[float]]:
    """Genuine scores of one set and part, by speaker."""
    out: dict[str, list[float]] = defaultdict(list)
    for r in results:
        if r.task.set == set_ and r.task.part == part:
            out[r.task.group] += [x for x, lab in zip(r.scores, r.task.labels) if lab == "genuine"]
    return out


def _scores(results: list[Result], set_: str, part: str, label: str) -> np.ndarray:
    out = [s for r in results if r.task.set == set_ and r.task.part == part
           for s, lab in zip(r.scores, r.task.labels) if lab == label]
    return np.asarray(out, dtype=np.float64)


def threshold_for(wrong: np.ndarray, target: float, bound: str = "point") -> tuple[float, int]:
    """Lowest threshold letting through at most ``allowed`` of the n wrong-phrase scores:
    ``bound="point"``, floor(target * n); ``"upper"``, the most whose 95 % upper bound
    (Clopper-Pearson; rule of three for none) is still within the target (0 if none is)."""
    if bound == "point":
        allowed = int(math.floor(target * wrong.size + 1e-9))
    else:
        allowed = 0
        while allowed < wrong.size and rate_interval(allowed + 1, int(wrong.size)).upper <= target:
            allowed += 1
    thr, _ = ExactScores(wrong).threshold_for(allowed)
    return float(thr), allowed


def _rate(k: int, n: int) -> dict[str, Any]:
    ri = rate_interval(k, n)
    return {"k": ri.errors, "n": ri.n, "rate": ri.rate, "lower": ri.lower, "upper": ri.upper, "method": ri.method}


def rates(genuine: np.ndarray, wrong: np.ndarray, thr: float) -> dict[str, Any]:
    return {
        "threshold": thr,
        "genuine_pass": _rate(int((genuine >= thr).sum()), int(genuine.size)),
        "wrong_accept": _rate(int((wrong >= thr).sum()), int(wrong.size)),
    }


def _dist(x: np.ndarray) -> dict[str, Any]:
    real = x[x > FAILURE_SCORE]
    q = np.percentile(real, [1, 5, 50, 95, 99]).tolist() if real.size else [math.nan] * 5
    return {"n": int(x.size), "unaligned": int((x <= FAILURE_SCORE).sum()),
            "p01": q[0], "p05": q[1], "p50": q[2], "p95": q[3], "p99": q[4], "max": float(x.max()) if x.size else math.nan}


# --------------------------------------------------------------------------- the operating point


class OperatingPoint(NamedTuple):
    """How each set is scored and decided: chosen on part A, or read from a calibration."""

    #: per set: the silence weight of its score
    weights: dict[str, float]
    #: per set: ``{"threshold": ...}`` (and, when chosen here, part A's figures)
    per_set: dict[str, dict[str, Any]]
    #: per set: its screen on the alignment alone (None: both passes always)
    screens: dict[str, Screen | None]
    #: the threshold for a caller that does not name the kind: the highest of the sets'
    threshold: float
    #: per set with a closed vocabulary: each word's offset
    offsets: dict[str, dict[str, float]]


def _choose_operating_point(results: list[Result], sets: list[str], args: argparse.Namespace) -> OperatingPoint:
    """Silence weights, thresholds and screens per set, chosen on part A, the operating
    threshold for any kind, and the word offsets per set."""
    # ---- the word offsets of each set with a closed vocabulary, measured on part A
    offsets: dict[str, dict[str, float]] = {}
    for s in sets:
        # offsets make up for words pocketsphinx's model fits badly when said well
        if s in WORD_OFFSET_SETS and not args.no_word_offsets and not _read(args, s):
            offsets[s], detail = choose_word_offsets(results, s)
            emit({"figure": "challenge_word_offsets", "set": s, "part": "A", "rule": "half-way between the medians of "
                  "each word's ratio in genuine and in wrong-phrase trials", "offsets": offsets[s], "words": detail})
    # ---- the silence weight of each set, chosen on part A
    weights: dict[str, float] = {}
    for s in sets:
        if args.silence_weight is not None:
            weights[s] = args.silence_weight
        else:
            weights[s], grid = choose_weight(results, s, args.target, offsets.get(s), args.bound)
            emit({"figure": "challenge_silence_weight", "set": s, "part": "A", "chosen": weights[s], "grid": grid})
        apply_weight(results, s, weights[s], offsets.get(s))
    # ---- calibration on part A
    per_set: dict[str, dict[str, Any]] = {}
    for s in sets:
        wa, ga = _scores(results, s, "A", "wrong"), _scores(results, s, "A", "genuine")
        thr, allowed = threshold_for(wa, args.target, args.bound)
        per_set[s] = {"threshold": thr, "allowed": allowed, "n_wrong": int(wa.size), "n_genuine": int(ga.size),
                      "genuine_pass": _rate(int((ga >= thr).sum()), int(ga.size))}
        emit({"figure": "challenge_calibration", "set": s, "part": "A", "target_wrong_phrase_acceptance": args.target,
              **per_set[s], "genuine": _dist(ga), "wrong": _dist(wa)})
    # ---- the screen of each set, on part A, at its threshold
    screens: dict[str, Screen | None] = {}
    for s in sets:
        # a kind Whisper reads is checked in one pass: nothing to screen
        no_screen = args.no_screen or _read(args, s)
        screens[s], grid = (None, []) if no_screen else choose_screen(results, s, per_set[s]["threshold"])
        if screens[s] is not None:
            emit({"figure": "challenge_screen", "set": s, "part": "A", "chosen": dataclasses.asdict(screens[s]), "grid": grid})
    operating = max(v["threshold"] for v in per_set.values())
    emit({"figure": "challenge_operating_point", "threshold": operating, "rule": "highest of the per-set thresholds",
          "per_set": {s: v["threshold"] for s, v in per_set.items()}})
    return OperatingPoint(weights, per_set, screens, operating, offsets)


def _apply_operating_point(results: list[Result], point: OperatingPoint) -> None:
    """Each trial's score and the engine's decision at the chosen point, every part; the
    8 kHz speech trials at the speech set's."""
    for s, weight in point.weights.items():
        offsets = point.offsets.get(s)
        for set_ in (s, "speech-8k") if s == "speech" else (s,):
            apply_weight(results, set_, weight, offsets)
            apply_screen(results, set_, point.screens[s], weight, point.per_set[s]["threshold"], offsets)


def _shipped_operating_point(checker: ChallengeChecker, sets: list[str]) -> OperatingPoint:
    """The same, as a calibrated checker holds them (``--calibrated``)."""
    weights = {s: checker.silence_weights[KIND_OF_SET[s]] for s in sets}
    per_set: dict[str, dict[str, Any]] = {s: {"threshold": checker.thresholds[KIND_OF_SET[s]]} for s in sets}
    screens = {s: checker.screens.get(KIND_OF_SET[s]) for s in sets}
    offsets = {s: checker.word_offsets[KIND_OF_SET[s]] for s in sets if KIND_OF_SET[s] in checker.word_offsets}
    return OperatingPoint(weights, per_set, screens, checker.threshold, offsets)


def _read(args: argparse.Namespace, set_: str) -> bool:
    """Whether the set's challenges are read in one pass (Whisper), not aligned by pocketsphinx."""
    return args.recognisers[KIND_OF_SET.get(set_, "phrase")] != "pocketsphinx"  # speech-8k: phrases


def _screens_json(screens: dict[str, Screen | None]) -> dict[str, Any]:
    return {s: None if v is None else dataclasses.asdict(v) for s, v in screens.items()}
