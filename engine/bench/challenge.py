"""netid bench challenge: does the spoken-challenge check tell the right words from other words?

Two real sets, each split into a calibration part (A) and a reporting part (B):

* **speech** - speechocean762 (``speech/``): read English sentences by adult native
  speakers of Mandarin. Each utterance is scored against its own transcript (genuine)
  and against other transcripts of the corpus (wrong phrase). Speakers are split into
  A and B with :func:`engine.bench.datasets.split_of` (the split the voice benchmarks use).
  Transcripts with a word outside the pronunciation dictionary are left out (counted).
* **digits** - Free Spoken Digit Dataset (``digits/``): one speaker's single-digit
  recordings (8 kHz, resampled to 16 kHz) concatenated with short low-level noise gaps
  into random 6-digit strings, scored against the right string (genuine), other random
  strings (wrong phrase) and, for information, the string with one digit changed
  (near miss). Recordings are split into A and B by hash; all 6 speakers are in both.

On A, for a target wrong-phrase acceptance (default 0.1 %) on each set, the benchmark
first measures, for a set whose words are a closed vocabulary (digits), each word's offset:
half-way between the median ratio of that word in genuine trials and in wrong-phrase
trials. A word whose sounds the recogniser fits badly even when it is said (``six``, most
likely because 8 kHz recordings hold little of its /s/) then no longer drags down every
string it is in. Then it chooses the
silence weight of the score (from ``SILENCE_WEIGHTS``, the one passing
most genuine A trials at A's own threshold), then the threshold at that weight. By default
(``--bound upper``) the threshold lets through as many of A's wrong phrases as keep the 95 %
upper bound of their rate within the target, so that the rate itself is within it with
confidence (at 0.1 % of 9,400 trials: 3 instead of 9); ``--bound point`` lets through target
x n of them, and the rate on B then lands either side of the target. It is the
threshold of that challenge kind (speech: phrases, digits: digit strings) in
``models/challenge.json``, which also holds the higher of the two for a
caller that does not name the kind. Part B reports the genuine pass rate and the
wrong-phrase acceptance with their trial counts and 95 % Clopper-Pearson bounds (rule of
three when nothing was accepted), and the recogniser's CPU cost per second of audio.

A diagnostic for the 8 kHz digits: part-B speech utterances band-limited to 8 kHz
(downsampled and back, as the FSDD recordings are) are scored again, which isolates what
the telephone bandwidth alone costs the recogniser.

Output: JSON lines on stdout, a short human summary on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import multiprocessing
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile
import soxr

from engine.bench._common import emit
from engine.bench.datasets import DEFAULT_SALT, split_of
from engine.bench.stats import ExactScores, rate_interval
from engine.audio import decode_audio
from engine.challenge import (
    CALIBRATION_FILE,
    FAILURE_SCORE,
    ChallengeChecker,
    ChallengeConfig,
    Pass,
    ScoreParts,
    Screen,
    challenge_words,
    load_phrases,
)
from engine.errors import ConfigError, ModelError, SampleError
from engine.models import DEFAULT_MODELS_DIR
from engine.pronunciation import VARIANTS_VERSION
from engine.reader import COHORT_FILE, check_cohort

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[2]  # the checkout, when run from one
TARGET = 0.001
#: the challenge kind each set stands for
KIND_OF_SET = {"speech": "phrase", "digits": "digits"}
DIGIT_LEN = 6
#: the sets whose words get offsets (a closed vocabulary: every word is in part A many times)
WORD_OFFSET_SETS = ("digits",)
#: the fewest genuine and wrong-phrase ratios of a word in part A that give it an offset
MIN_WORD_RATIOS = 20
#: silence weights tried on part A of each set when ``--silence-weight`` is not given
SILENCE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
_GAP_DBFS = -60.0
_SR = 16000


# --------------------------------------------------------------------------- trials


@dataclass(frozen=True, slots=True)
class Task:
    """One recording and the challenges it is scored against (first one: genuine)."""

    set: str  # "speech", "digits" or "speech-8k"
    part: str  # "A" or "B"
    group: str  # speaker (speech) or speaker name (digits)
    audio: tuple  # ("file", path) | ("file8k", path) | ("digits", paths, gaps, lead, trail, seed)
    expected: tuple[str, ...]
    labels: tuple[str, ...]  # "genuine" | "wrong" | "near_miss", one per expected


@dataclass
class Result:
    task: Task
    #: one per expected challenge: the score's parts, None where nothing could be aligned
    parts: list[ScoreParts | None] = field(default_factory=list)
    #: the scores at the silence weight chosen for the task's set (filled in by ``main``)
    scores: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    genuine_cpu_s: float = 0.0
    #: the genuine check's CPU by decoding pass ("align", "loop")
    pass_cpu_s: dict[str, float] = field(default_factory=dict)
    audio_s: float = 0.0
    #: per expected challenge, the engine's decision with the screen (filled in by ``main``)
    passed: list[bool] = field(default_factory=list)
    #: CPU seconds of what the genuine challenge needs once, before its first check in a
    #: worker: a phrase's cohort passes (0: done before, or a kind without them)
    prepare_cpu_s: float = 0.0
    #: per expected challenge, whether the screen decided it without the phone loop
    screened: list[bool] = field(default_factory=list)


def _speech_root(root: Path) -> Path:
    return root / "speech"


def speech_tasks(root: Path, *, per_part: int | None, wrong: int, rng: np.random.Generator,
                 config: ChallengeConfig) -> tuple[list[Task], dict[str, int]]:
    """Genuine + wrong-phrase tasks on speechocean762, ``per_part`` utterances per part."""
    sroot = _speech_root(root)
    text = dict(ln.split(" ", 1) for ln in (sroot / "text").read_text().splitlines() if ln.strip())
    utt2spk = dict(ln.split() for ln in (sroot / "utt2spk").read_text().splitlines() if ln.strip())
    usable: dict[str, str] = {}
    excluded = 0
    for utt, sentence in sorted(text.items()):
        try:
            # the sentences pocketsphinx can align too, whichever recogniser reads them: both
            # are measured on the same trials
            load_phrases([sentence], config=dataclasses.replace(config, recognisers={**config.recognisers, "phrase": "pocketsphinx"}))
        except ConfigError:
            excluded += 1
            continue
        usable[utt] = sentence.strip()
    part_of = split_of(sorted(set(utt2spk.values())), DEFAULT_SALT, "speech")
    if config.relative_kinds:
        # the reader's cohort: calibration speakers only, and none of its recordings a trial
        cohort = json.loads((Path(config.reader_cohort_dir) / COHORT_FILE).read_text())["recordings"]
        outside = sorted({c["speaker"] for c in cohort if part_of.get(c["speaker"]) != "A"})
        if outside:
            raise ConfigError(f"the reader cohort holds speakers outside part A: {', '.join(outside)}")
        for c in cohort:
            usable.pop(Path(c["file"]).stem, None)
    sentences = sorted({" ".join(challenge_words(s)) for s in usable.values()})
    tasks: list[Task] = []
    for part in ("A", "B"):
        utts = [u for u in sorted(usable) if part_of[utt2spk[u]] == part]
        if per_part is not None and per_part < len(utts):
            utts = sorted(rng.choice(utts, size=per_part, replace=False).tolist())
        for utt in utts:
            own = " ".join(challenge_words(usable[utt]))
            others = [s for s in sentences if s != own]
            picks = rng.choice(len(others), size=wrong, replace=False)
            expected = (usable[utt],) + tuple(others[i] for i in picks)
            path = sroot / f"SPEAKER{utt2spk[utt]}" / f"{utt}.flac"
            tasks.append(Task("speech", part, utt2spk[utt], ("file", str(path)), expected,
                              ("genuine",) + ("wrong",) * wrong))
    return tasks, {"excluded_out_of_dictionary": excluded, "usable_utterances": len(usable)}


def bandlimited_tasks(tasks: list[Task], n: int, wrong: int, rng: np.random.Generator) -> list[Task]:
    """``n`` part-B speech tasks again, their audio band-limited to 8 kHz."""
    b = [t for t in tasks if t.set == "speech" and t.part == "B"]
    if not b or n <= 0:
        return []
    picks = sorted(rng.choice(len(b), size=min(n, len(b)), replace=False).tolist())
    out = []
    for i in picks:
        t = b[i]
        k = 1 + min(wrong, len(t.expected) - 1)
        out.append(Task("speech-8k", "B", t.group, ("file8k", t.audio[1]), t.expected[:k], t.labels[:k]))
    return out


def digit_tasks(root: Path, *, per_part: int, wrong: int, rng: np.random.Generator) -> list[Task]:
    """Genuine, wrong and near-miss tasks on FSDD 6-digit strings, ``per_part`` strings per part."""
    files = sorted((root / "digits").glob("*.flac"))
    if not files:
        return []
    part_of = split_of([f.stem for f in files], DEFAULT_SALT, "digits-recordings")
    pool: dict[tuple[str, str, int], list[str]] = defaultdict(list)
    for f in files:
        digit, speaker, _ = f.stem.split("_")
        pool[(part_of[f.stem], speaker, int(digit))].append(str(f))
    speakers = sorted({k[1] for k in pool})
    tasks: list[Task] = []
    for part in ("A", "B"):
        for i in range(per_part):
            speaker = speakers[i % len(speakers)]
            digits = [int(d) for d in rng.integers(0, 10, DIGIT_LEN)]
            paths = tuple(pool[(part, speaker, d)][int(rng.integers(len(pool[(part, speaker, d)])))] for d in digits)
            gaps = tuple(int(rng.uniform(0.08, 0.30) * _SR) for _ in range(DIGIT_LEN - 1))
            lead, trail = int(rng.uniform(0.2, 0.4) * _SR), int(rng.uniform(0.1, 0.3) * _SR)
            right = "".join(map(str, digits))
            others: list[str] = []
            while len(others) < wrong:
                s = "".join(str(int(d)) for d in rng.integers(0, 10, DIGIT_LEN))
                if s != right and s not in others:
                    others.append(s)
            near = list(digits)
            pos = int(rng.integers(DIGIT_LEN))
            near[pos] = (near[pos] + int(rng.integers(1, 10))) % 10
            expected = (right, *others, "".join(map(str, near)))
            labels = ("genuine",) + ("wrong",) * wrong + ("near_miss",)
            seed = int(rng.integers(2**31))
            tasks.append(Task("digits", part, speaker, ("digits", paths, gaps, lead, trail, seed), expected, labels))
    return tasks


def load_audio(spec: tuple) -> np.ndarray:
    """The float32 16 kHz recording a task describes."""
    kind = spec[0]
    if kind == "file":
        return decode_audio(Path(spec[1]).read_bytes())
    if kind == "file8k":
        wav = decode_audio(Path(spec[1]).read_bytes())
        narrow = soxr.resample(wav, _SR, 8000, quality="HQ")
        return soxr.resample(narrow, 8000, _SR, quality="HQ").astype(np.float32)
    if kind == "digits":
        # built at the recordings' own 8 kHz and resampled once, as a narrow-band recording
        # of the whole string would be (noise gaps made at 16 kHz would put energy above
        # 4 kHz between the digits and none within them)
        _, paths, gaps, lead, trail, seed = spec
        noise = np.random.default_rng(seed)
        amp = 10 ** (_GAP_DBFS / 20)

        def gap(n16: int) -> np.ndarray:
            return (noise.standard_normal(n16 // 2) * amp).astype(np.float32)

        parts = [gap(lead)]
        for i, p in enumerate(paths):
            wav, rate = soundfile.read(p, dtype="float32", always_2d=False)
            if rate != 8000 or wav.ndim != 1:
                raise ValueError(f"{p}: expected 8 kHz mono")
            parts.append(wav)
            parts.append(gap(gaps[i] if i < len(gaps) else trail))
        return soxr.resample(np.concatenate(parts), 8000, _SR, quality="HQ").astype(np.float32)
    raise ValueError(f"unknown audio spec {kind!r}")


# --------------------------------------------------------------------------- scoring

_checker: ChallengeChecker | None = None


def _init_worker(config: ChallengeConfig) -> None:
    global _checker
    _checker = ChallengeChecker(config=config, threshold=0.0)
    for kind in KIND_OF_SET.values():  # loaded before the first recording, so not in its CPU time
        _checker.load_decoder(kind)


def score_task(task: Task) -> Result:
    """Score one task in this process (the genuine challenge first, timed on its own)."""
    assert _checker is not None
    wav = load_audio(task.audio)
    res = Result(task, audio_s=wav.size / _SR)
    cpu: dict[str, float] = defaultdict(float)

    def timed(passes: list[Pass]) -> list[Any]:
        out = []
        for p in passes:
            t = time.process_time()
            out += _checker.run_passes([p])
            cpu[p.kind] += time.process_time() - t
        return out

    # a phrase's cohort passes run once, on its first check (the reader keeps them): timed
    # apart, so that the genuine check's time is what every later check of it costs
    t0 = time.process_time()
    if _checker.prepare(task.expected[0]):
        res.prepare_cpu_s = time.process_time() - t0
    t0 = time.process_time()
    first = _checker.parts_batch([(wav, task.expected[0])], run_passes=timed)
    res.genuine_cpu_s = time.process_time() - t0
    res.pass_cpu_s = dict(cpu)
    rest = _checker.parts_batch([(wav, e) for e in task.expected[1:]]) if len(task.expected) > 1 else []
    for r in first + rest:
        if isinstance(r, SampleError):
            res.parts.append(None)
            res.errors.append(r.code)
        else:
            res.parts.append(r)
            res.errors.append("")
    return res


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


def run_tasks(tasks: list[Task], config: ChallengeConfig, workers: int, progress: bool) -> list[Result]:
    results: list[Result] = []
    t0 = time.perf_counter()

    def tick(i: int) -> None:
        if progress and (i % 20 == 0 or i == len(tasks)):
            print(f"  scored {i}/{len(tasks)} recordings in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    if workers <= 1:
        _init_worker(config)
        for i, t in enumerate(tasks, 1):
            results.append(score_task(t))
            tick(i)
        return results
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
        for i, r in enumerate(pool.imap(score_task, tasks, chunksize=2), 1):
            results.append(r)
            tick(i)
    return results


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


def _fmt(r: dict[str, Any]) -> str:
    return f"{r['k']}/{r['n']} = {100 * r['rate']:.2f} % [{100 * r['lower']:.2f}, {100 * r['upper']:.2f}]"


# --------------------------------------------------------------------------- main


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


def _parse_per_kind(text: str, defaults: Mapping[str, Any], flag: str, metavar: str, value: Callable[[str], Any],
                    what: str) -> dict[str, Any]:
    """``"digits=A,phrase=B"`` as a mapping of ``value(A)``...; a kind left out keeps its default."""
    out = dict(defaults)
    for item in (x.strip() for x in text.split(",") if x.strip()):
        kind, sep, raw = item.partition("=")
        if not sep or kind not in out:
            raise ValueError(f"{flag}: expected KIND={metavar} with KIND one of {', '.join(out)}, got {item!r}")
        try:
            out[kind] = value(raw.strip())
        except ValueError:
            raise ValueError(f"{flag}: {kind} needs {what}, got {raw!r}") from None
    return out


def parse_recognisers(text: str) -> dict[str, str]:
    """``"digits=pocketsphinx,phrase=whisper"``: the recogniser per kind (ChallengeConfig checks the names)."""
    return _parse_per_kind(text, ChallengeConfig().recognisers, "--recognisers", "NAME", str, "a recogniser's name")


def parse_frame_rates(text: str) -> dict[str, int]:
    """``"digits=100,phrase=55"``: frames per second per kind."""
    return _parse_per_kind(text, ChallengeConfig().frame_rates, "--frame-rates", "RATE", int, "a whole number of frames per second")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netid bench challenge", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="data root with speech/ and digits/")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--target", type=float, default=TARGET, help="target wrong-phrase acceptance (default 0.001)")
    p.add_argument("--speech-utts", type=int, default=150, help="speechocean762 utterances per part (0: none)")
    p.add_argument("--digit-strings", type=int, default=300, help="FSDD 6-digit strings per part (0: none)")
    p.add_argument("--wrong", type=int, default=10, help="wrong phrases per recording")
    p.add_argument("--bound", choices=("upper", "point"), default="upper",
                   help="the threshold on part A lets through as many wrong phrases as keep the 95 %% upper bound "
                        "of their rate within the target (upper, the default), or target x n of them (point)")
    p.add_argument("--bandlimited", type=int, default=20, help="part-B speech utterances re-scored at 8 kHz bandwidth (0: skip)")
    p.add_argument("--silence-weight", type=float, default=None,
                   help="weight of the silence ratio for both sets (default: chosen per set on part A)")
    p.add_argument("--frame-step", type=int, default=ChallengeConfig().frame_step, help="frames per scored frame (pocketsphinx ds)")
    p.add_argument("--frame-rates", default=",".join(f"{k}={r}" for k, r in ChallengeConfig().frame_rates.items()),
                   metavar="KIND=RATE,...", help="frames per second the recogniser analyses, per challenge kind "
                                                 "(pocketsphinx frate; default %(default)s)")
    p.add_argument("--top-gaussians", type=int, default=ChallengeConfig().top_gaussians,
                   help="Gaussians per codebook each senone is scored from (pocketsphinx topn; default %(default)s)")
    p.add_argument("--variant-kinds", default=",".join(ChallengeConfig().variant_kinds), metavar="KINDS",
                   help="challenge kinds aligned with pronunciation variants too (comma-separated; '' for none; default %(default)s)")
    p.add_argument("--recognisers", default=",".join(f"{k}={r}" for k, r in ChallengeConfig().recognisers.items()),
                   metavar="KIND=NAME,...", help="what checks each challenge kind: pocketsphinx or whisper (default %(default)s)")
    p.add_argument("--cohort-kinds", default=",".join(ChallengeConfig().cohort_kinds), metavar="KINDS",
                   help="challenge kinds whose Whisper score is relative to the reader's cohort "
                        "(comma-separated; '' for none; default %(default)s)")
    p.add_argument("--no-word-offsets", action="store_true",
                   help="no word offsets: every word's ratio counts as measured (default: offsets for the digit strings)")
    p.add_argument("--no-screen", action="store_true",
                   help="no screen on the alignment alone: every check decodes the phone loop too")
    p.add_argument("--workers", type=int, default=2, help="scoring processes (pocketsphinx holds the GIL)")
    p.add_argument("--quick", action="store_true", help="small run: 12 utterances, 12 strings per part, 3 wrong each")
    p.add_argument("--limit", type=int, default=None, help="cap utterances and strings per part")
    p.add_argument("--write-calibration", action="store_true",
                   help=f"write the operating point to models/{CALIBRATION_FILE} (use --wrong 40 or more: the threshold "
                        "rests on part A's few highest wrong phrases; then check it with --calibrated on a new --seed)")
    p.add_argument("--calibrated", action="store_true",
                   help=f"report part B at the operating point already in models/{CALIBRATION_FILE} (chosen on part A "
                        "by an earlier --write-calibration run) instead of choosing one; part A is not scored")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR, help="where --write-calibration writes and --calibrated reads")
    p.add_argument("--save-scores", type=Path, default=None, help="also write every trial's score parts (mean word ratio, silence ratio; JSON lines) here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.quick:
        args.speech_utts, args.digit_strings = min(args.speech_utts, 12), min(args.digit_strings, 12)
        args.wrong, args.bandlimited = min(args.wrong, 3), min(args.bandlimited, 6)
    if args.limit is not None:
        args.speech_utts, args.digit_strings = min(args.speech_utts, args.limit), min(args.digit_strings, args.limit)
        args.bandlimited = min(args.bandlimited, args.limit)
    if not 0.0 < args.target < 1.0 or args.wrong < 1:
        p.error("need 0 < --target < 1 and --wrong >= 1")
    if args.write_calibration and args.calibrated:
        p.error("--calibrated reports the operating point already written; it cannot write one")
    if args.write_calibration and (args.quick or args.limit is not None or min(args.speech_utts, args.digit_strings) <= 0):
        p.error("--write-calibration needs both sets at full size (no --quick, --limit or empty set)")
    command = "netid bench challenge " + shlex.join(argv if argv is not None else sys.argv[1:])
    try:
        config = ChallengeConfig(silence_weight=args.silence_weight, frame_step=args.frame_step, top_gaussians=args.top_gaussians,
                                 variant_kinds=tuple(k for k in args.variant_kinds.split(",") if k),
                                 frame_rates=parse_frame_rates(args.frame_rates),
                                 recognisers=parse_recognisers(args.recognisers),
                                 cohort_kinds=tuple(k for k in args.cohort_kinds.split(",") if k))
        args.recognisers = dict(config.recognisers)
    except (ConfigError, ValueError) as exc:
        p.error(str(exc))
    shipped: ChallengeChecker | None = None
    if args.calibrated:
        try:  # refused if it was measured with other settings than these
            shipped = ChallengeChecker(config=dataclasses.replace(config, calibration_path=Path(args.models) / CALIBRATION_FILE))
        except (ConfigError, ModelError) as exc:
            p.error(f"--calibrated: {exc}")
    # a stream per set: what one set draws (its usable sentences, the reader's cohort left
    # out) does not change another set's trials
    rng = {name: np.random.default_rng([args.seed, i]) for i, name in enumerate(("speech", "speech-8k", "digits"))}
    wall0 = time.perf_counter()

    tasks: list[Task] = []
    info: dict[str, Any] = {}
    if args.speech_utts > 0 and (args.data / "speech" / "text").is_file():
        try:
            st, info["speech"] = speech_tasks(args.data, per_part=args.speech_utts, wrong=args.wrong, rng=rng["speech"], config=config)
        except ConfigError as exc:
            p.error(str(exc))
        tasks += st
        tasks += bandlimited_tasks(st, args.bandlimited, min(args.wrong, 3), rng["speech-8k"])
    if args.digit_strings > 0 and (args.data / "digits").is_dir():
        tasks += digit_tasks(args.data, per_part=args.digit_strings, wrong=args.wrong, rng=rng["digits"])
    if shipped is not None:  # the operating point is given: part A is not needed
        tasks = [t for t in tasks if t.part == "B"]
    if not tasks:
        print(f"no data found under {args.data}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"challenge benchmark: {len(tasks)} recordings, {sum(len(t.expected) for t in tasks)} trials, "
              f"{args.workers} worker(s)", file=sys.stderr, flush=True)
    results = run_tasks(tasks, config, args.workers, not args.quiet)
    wall = time.perf_counter() - wall0

    if args.save_scores is not None:
        with Path(args.save_scores).open("w") as fh:
            for r in results:
                fh.write(json.dumps({"set": r.task.set, "part": r.task.part, "group": r.task.group,
                                     "audio": r.task.audio[1] if r.task.audio[0] != "digits" else list(r.task.audio[1]),
                                     "expected": r.task.expected, "labels": r.task.labels,
                                     "parts": [None if x is None else list(x) for x in r.parts],
                                     "errors": r.errors, "audio_s": r.audio_s, "genuine_cpu_s": r.genuine_cpu_s}) + "\n")
    sets = [s for s in ("speech", "digits") if any(r.task.set == s for r in results)]
    if shipped is not None:
        point = _shipped_operating_point(shipped, sets)
        emit({"figure": "challenge_operating_point", "threshold": point.threshold, "rule": f"given: models/{CALIBRATION_FILE}",
              "per_set": {s: v["threshold"] for s, v in point.per_set.items()}, "silence_weights": point.weights,
              "screens": _screens_json(point.screens), "word_offsets": point.offsets})
    else:
        point = _choose_operating_point(results, sets, args)
    _apply_operating_point(results, point)
    weights, per_set, screens, operating, offsets = point

    # ---- report on part B
    report: dict[str, Any] = {}
    for s in sets + (["speech-8k"] if any(r.task.set == "speech-8k" for r in results) else []):
        gb, wb = _scores(results, s, "B", "genuine"), _scores(results, s, "B", "wrong")
        row: dict[str, Any] = {"figure": "challenge_report", "set": s, "part": "B",
                               "at_operating_point": rates(gb, wb, operating)}
        own = per_set.get(s if s != "speech-8k" else "speech")
        if own is not None:
            row["at_kind_threshold"] = rates(gb, wb, own["threshold"])
            # what the engine decides: the screen where it is clear, else the kind's threshold
            (gp, gs), (wp, ws) = _decisions(results, s, "B", "genuine"), _decisions(results, s, "B", "wrong")
            row["engine"] = {"threshold": own["threshold"], "screen": screens.get(s if s != "speech-8k" else "speech") is not None,
                             "genuine_pass": _rate(int(gp.sum()), int(gp.size)), "wrong_accept": _rate(int(wp.sum()), int(wp.size)),
                             "to_phone_loop": {"genuine": float(1 - gs.mean()) if gs.size else math.nan,
                                               "wrong": float(1 - ws.mean()) if ws.size else math.nan}}
        if s == "digits":
            nm = _scores(results, s, "B", "near_miss")
            # at the threshold the engine uses for digit strings
            nm_thr = own["threshold"] if own is not None else operating
            row["near_miss_accept"] = {"threshold": nm_thr, **_rate(int((nm >= nm_thr).sum()), int(nm.size))}
            nmp, _ = _decisions(results, s, "B", "near_miss")
            if "engine" in row:
                row["engine"]["near_miss_accept"] = _rate(int(nmp.sum()), int(nmp.size))
            row["near_miss"] = _dist(nm)
            # six speakers with four accents: where the misses come from
            row["genuine_pass_by_speaker"] = {
                spk: _rate(sum(x >= nm_thr for x in xs), len(xs)) for spk, xs in sorted(_genuine_by_group(results, s, "B").items())
            }
        if s == "speech":
            # the corpus's speakers 96xx read markedly slower and less fluently (their
            # utterances average 6.2 s against 3.8 s for the others)
            by_speaker = _genuine_by_group(results, s, "B")
            for name, slow in (("speakers_96xx", True), ("other_speakers", False)):
                g = [x for spk, xs in by_speaker.items() if spk.startswith("96") == slow for x in xs]
                row[name] = _rate(sum(x >= own["threshold"] for x in g), len(g))
        if s == "speech-8k" and "speech" in per_set:
            full = {r.task.audio[1]: r.scores[0] for r in results if r.task.set == "speech" and r.task.part == "B"}
            pairs = [(full[r.task.audio[1]], r.scores[0]) for r in results if r.task.set == s and r.task.audio[1] in full]
            fb = np.asarray([a for a, _ in pairs])
            nb = np.asarray([b for _, b in pairs])
            thr = per_set["speech"]["threshold"]
            row["paired_full_band"] = {
                "threshold": thr,
                "genuine_pass": _rate(int((fb >= thr).sum()), int(fb.size)),
                "genuine_pass_8k": _rate(int((nb >= thr).sum()), int(nb.size)),
                "median_full_band": float(np.median(fb)) if fb.size else math.nan,
                "median_8k": float(np.median(nb)) if nb.size else math.nan,
                "median_change": float(np.median(nb - fb)) if fb.size else math.nan,
            }
        # diagnostic only: the best genuine pass with no wrong phrase accepted on B itself
        zero = float(wb.max()) + 1e-9 if wb.size else math.nan
        row["diagnostic_zero_wrong_on_B"] = {"threshold": zero, "genuine_pass": _rate(int((gb >= zero).sum()), int(gb.size))}
        row["genuine"], row["wrong"] = _dist(gb), _dist(wb)
        report[s] = row
        emit(row)

    # ---- cost
    cost: dict[str, Any] = {}
    for s in sets + (["speech-8k"] if "speech-8k" in report else []):
        rs = [r for r in results if r.task.set == s]
        cpu, audio = sum(r.genuine_cpu_s for r in rs), sum(r.audio_s for r in rs)
        # the engine decodes the phone loop only where the screen leaves the genuine check open
        screened = sum(r.pass_cpu_s.get("read", 0.0) + r.pass_cpu_s.get("align", 0.0)
                       + (0.0 if r.screened and r.screened[0] else r.pass_cpu_s.get("loop", 0.0)) for r in rs)
        cost[s] = {"cpu_s": cpu, "audio_s": audio, "cpu_s_per_audio_s": cpu / audio if audio else math.nan,
                   "engine_cpu_s_per_audio_s": screened / audio if audio else math.nan,
                   "align_cpu_s_per_audio_s": sum(r.pass_cpu_s.get("align", 0.0) for r in rs) / audio if audio else math.nan,
                   "loop_cpu_s_per_audio_s": sum(r.pass_cpu_s.get("loop", 0.0) for r in rs) / audio if audio else math.nan,
                   "read_cpu_s_per_audio_s": sum(r.pass_cpu_s.get("read", 0.0) for r in rs) / audio if audio else math.nan,
                   "recordings": len(rs), "mean_audio_s": audio / len(rs) if rs else math.nan}
        firsts = [r.prepare_cpu_s for r in rs if r.prepare_cpu_s > 0.0]
        if firsts:
            cost[s]["phrase_first_use_cpu_s"] = {"n": len(firsts), "mean": float(np.mean(firsts)),
                                                 "what": "the cohort passes of a phrase, once per phrase and worker"}
    emit({"figure": "challenge_cost", "what": "CPU seconds per second of audio of one check: both decoding passes "
          "(cpu_s_per_audio_s), and as the engine runs it, the phone loop only where the screen leaves it open "
          "(engine_cpu_s_per_audio_s)", **cost})
    errors = defaultdict(int)
    for r in results:
        for e in r.errors:
            if e:
                errors[e] += 1
    emit({"figure": "run", "command": command, "seed": args.seed, "wall_s": wall, "workers": args.workers,
          "sample_errors": dict(errors), "data": info, "silence_weights": weights, "word_offsets": offsets,
          "screens": _screens_json(screens),
          "frame_step": config.frame_step, "frame_rates": dict(config.frame_rates), "top_gaussians": config.top_gaussians,
          "beam": config.beam, "variant_kinds": list(config.variant_kinds), "recognisers": dict(config.recognisers),
          "relative_kinds": list(config.relative_kinds)})

    if args.write_calibration:
        path = Path(args.models) / CALIBRATION_FILE
        doc = {
            "format": 1,
            "threshold": operating,
            "target_wrong_phrase_acceptance": args.target,
            "bound": args.bound,
            "thresholds": {KIND_OF_SET[s]: per_set[s]["threshold"] for s in sets},
            "score": "pocketsphinx: mean per-word log-likelihood ratio (forced alignment vs free phone loop, every "
                     "senone scored) less the word's offset, + silence_weight * min(0, silence ratio); whisper: mean "
                     "per-word log-probability of the expected words, the decoder forced through them, for relative_kinds each "
                     "word's, and the sentence's end (the full stop after the words) as one more word, less its mean over the reader "
                     "cohort's recordings (samples/reader_cohort); engine/challenge/",
            "recognisers": dict(config.recognisers),
            "relative_kinds": list(config.relative_kinds),
            "relative_end": bool(config.relative_kinds),
            "reader_cohort": check_cohort(config.reader_cohort_dir) if config.relative_kinds else None,
            "silence_weights": {KIND_OF_SET[s]: weights[s] for s in sets},
            "word_offsets": {KIND_OF_SET[s]: v for s, v in offsets.items()},
            "frame_step": config.frame_step,
            "frame_rates": dict(config.frame_rates),
            "top_gaussians": config.top_gaussians,
            "beam": config.beam,
            "screens": {KIND_OF_SET[s]: dataclasses.asdict(v) for s, v in screens.items() if v is not None},
            "pronunciation_variants": VARIANTS_VERSION if config.variant_kinds else 0,
            "variant_kinds": list(config.variant_kinds),
            "recogniser": f"pocketsphinx {importlib.metadata.version('pocketsphinx')}, en-us acoustic model and cmudict from the wheel; "
                          f"Whisper base (models/whisper.json) run by ctranslate2 {importlib.metadata.version('ctranslate2')}, int8",
            "rule": "per challenge kind, on part A of its set: for a closed vocabulary (digits), each word's offset "
                    "half-way between the medians of its ratio in genuine and in wrong-phrase trials; the silence weight "
                    "passing most genuine trials at the target, then its threshold (letting through as many wrong phrases as "
                    + ("keep the 95 % upper bound of their rate within the target" if args.bound == "upper" else "target x n")
                    + "); threshold: the highest of them; screen: accept above every wrong "
                    "phrase's alignment-only score, reject below every passing genuine one, the weight leaving fewest "
                    "genuine trials to the phone loop",
            "measured_on": {s: {"part": "A", **{k: v for k, v in per_set[s].items() if k != "genuine_pass"},
                                "genuine_pass_at_own_threshold": per_set[s]["genuine_pass"]["rate"]} for s in sets},
            "reported_on_B": {s: {"engine": report[s]["engine"], "at_kind_threshold": report[s]["at_kind_threshold"],
                                  "at_threshold": report[s]["at_operating_point"]} for s in sets},
            "data": {"speech": "speechocean762 (speech/), speakers split by engine.bench.datasets.split_of",
                     "digits": "Free Spoken Digit Dataset (digits/), 6-digit strings, recordings split by hash"},
            "command": command,
            "seed": args.seed,
        }
        path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
        print(f"wrote {path}", file=sys.stderr)

    # ---- human summary
    out = sys.stderr
    per_set_text = ", ".join(f"{s} {v['threshold']:.2f}" for s, v in per_set.items())
    weights_text = ", ".join(f"{s} {w:g}" for s, w in weights.items())
    offsets_text = "; ".join(f"{s} word offsets " + ", ".join(f"{w} {x:.1f}" for w, x in v.items()) for s, v in offsets.items())
    print(f"\nspoken challenge, target wrong-phrase acceptance {100 * args.target:g} %  "
          f"(operating threshold {operating:.2f}; per set {per_set_text}; silence weight {weights_text})", file=out)
    if offsets_text:
        print(f"  {offsets_text}", file=out)
    for s, row in report.items():
        # the engine checks each challenge against its own kind's threshold
        own, op = row.get("at_kind_threshold"), row["at_operating_point"]
        first = own if own is not None else op
        if "engine" in row:
            e = row["engine"]
            how = (f"screen, then {e['threshold']:.2f} for the {100 * e['to_phone_loop']['genuine']:.0f} % of genuine and "
                   f"{100 * e['to_phone_loop']['wrong']:.1f} % of wrong left to the phone loop") if e["screen"] else f"at {e['threshold']:.2f}"
            print(f"  {s:9s} part B, as the engine decides ({how}): genuine pass {_fmt(e['genuine_pass'])}   "
                  f"wrong phrase accepted {_fmt(e['wrong_accept'])}", file=out)
        print(f"  {s if 'engine' not in row else '':9s} part B, {'read by Whisper' if _read(args, s) else 'both passes always'}, at {first['threshold']:.2f}: genuine pass {_fmt(first['genuine_pass'])}   "
              f"wrong phrase accepted {_fmt(first['wrong_accept'])}", file=out)
        if own is not None and op["threshold"] != own["threshold"]:
            print(f"  {'':9s} at the threshold for any kind {op['threshold']:.2f}: genuine {_fmt(op['genuine_pass'])}   "
                  f"wrong {_fmt(op['wrong_accept'])}", file=out)
        if "paired_full_band" in row:
            pf = row["paired_full_band"]
            print(f"  {'':9s} the same utterances at full band: genuine {_fmt(pf['genuine_pass'])}; "
                  f"median genuine score {pf['median_full_band']:.1f} -> {pf['median_8k']:.1f} at 8 kHz", file=out)
        if "near_miss_accept" in row:
            print(f"  {'':9s} one digit changed (information), at its kind's threshold: accepted {_fmt(row['near_miss_accept'])}"
                  + (f"; as the engine decides: {_fmt(row['engine']['near_miss_accept'])}" if "near_miss_accept" in row.get("engine", {}) else ""), file=out)
        if "genuine_pass_by_speaker" in row:
            per = ", ".join(f"{spk} {v['k']}/{v['n']}" for spk, v in row["genuine_pass_by_speaker"].items())
            print(f"  {'':9s} genuine pass by speaker, at its kind's threshold: {per}", file=out)
        if "speakers_96xx" in row:
            print(f"  {'':9s} genuine pass, speakers 96xx {_fmt(row['speakers_96xx'])}; others {_fmt(row['other_speakers'])}", file=out)
        d = row["diagnostic_zero_wrong_on_B"]
        print(f"  {'':9s} (diagnostic) no wrong phrase accepted on B at {d['threshold']:.2f}: genuine {_fmt(d['genuine_pass'])}", file=out)
    for s, c in cost.items():
        if _read(args, s):
            print(f"  cost {s:9s}: {c['engine_cpu_s_per_audio_s']:.3f} CPU s per audio s, read by Whisper "
                  f"({c['recordings']} recordings, mean {c['mean_audio_s']:.1f} s)", file=out)
            if "phrase_first_use_cpu_s" in c:
                print(f"  {'':14s} and once per phrase and worker, its cohort passes: "
                      f"{c['phrase_first_use_cpu_s']['mean']:.2f} CPU s", file=out)
            continue
        print(f"  cost {s:9s}: {c['engine_cpu_s_per_audio_s']:.3f} CPU s per audio s as the engine checks (both passes always "
              f"{c['cpu_s_per_audio_s']:.3f}; {c['recordings']} recordings, mean {c['mean_audio_s']:.1f} s)", file=out)
    print(f"  wall {wall:.0f} s with {args.workers} worker(s); command: {command}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
