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
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.bench._common import emit
from engine.bench.challenge_calibration import (
    _apply_operating_point,
    _choose_operating_point,
    _screens_json,
    _shipped_operating_point,
)
from engine.bench.challenge_report import emit_run, human_summary, report_cost, report_part_b, save_scores, write_calibration
from engine.bench.challenge_scoring import run_tasks
from engine.bench.challenge_trials import Task, bandlimited_tasks, digit_tasks, speech_tasks
from engine.challenge import CALIBRATION_FILE, ChallengeChecker, ChallengeConfig
from engine.errors import ConfigError, ModelError
from engine.inference.models import DEFAULT_MODELS_DIR

# the benchmark's parts live in challenge_trials (what is scored), challenge_scoring (scoring
# it), challenge_calibration (the operating point on part A) and challenge_report (part B and
# the calibration file); what the tests take from this module stays importable from it
from engine.bench.challenge_calibration import MIN_WORD_RATIOS, apply_weight, choose_word_offsets, threshold_for  # noqa: F401
from engine.bench.challenge_trials import Result  # noqa: F401

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[2]  # the checkout, when run from one
TARGET = 0.001


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


def build_parser() -> argparse.ArgumentParser:
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
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = _parse_args(p, argv)
    command = "netid bench challenge " + shlex.join(argv if argv is not None else sys.argv[1:])
    config, shipped = _config(p, args)
    wall0 = time.perf_counter()
    tasks, info = _draw_tasks(p, args, config, shipped)
    if not tasks:
        print(f"no data found under {args.data}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"challenge benchmark: {len(tasks)} recordings, {sum(len(t.expected) for t in tasks)} trials, "
              f"{args.workers} worker(s)", file=sys.stderr, flush=True)
    results = run_tasks(tasks, config, args.workers, not args.quiet)
    wall = time.perf_counter() - wall0

    if args.save_scores is not None:
        save_scores(args.save_scores, results)
    sets = [s for s in ("speech", "digits") if any(r.task.set == s for r in results)]
    if shipped is not None:
        point = _shipped_operating_point(shipped, sets)
        emit({"figure": "challenge_operating_point", "threshold": point.threshold, "rule": f"given: models/{CALIBRATION_FILE}",
              "per_set": {s: v["threshold"] for s, v in point.per_set.items()}, "silence_weights": point.weights,
              "screens": _screens_json(point.screens), "word_offsets": point.offsets})
    else:
        point = _choose_operating_point(results, sets, args)
    _apply_operating_point(results, point)

    report = report_part_b(results, sets, point)
    cost = report_cost(results, sets, report)
    emit_run(results, args, config, point, info, wall, command)
    if args.write_calibration:
        write_calibration(args, config, point, sets, report, command)
    human_summary(args, point, report, cost, wall, command)
    return 0


def _parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments, ``--quick`` and ``--limit`` applied, the combinations refused checked."""
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
    return args


def _config(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[ChallengeConfig, ChallengeChecker | None]:
    """The checker's settings from the flags, and with ``--calibrated`` the shipped checker."""
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
    return config, shipped


def _draw_tasks(p: argparse.ArgumentParser, args: argparse.Namespace, config: ChallengeConfig,
                shipped: ChallengeChecker | None) -> tuple[list[Task], dict[str, Any]]:
    """The trials of each set with data under ``--data`` (part B only with ``--calibrated``),
    and what was left out of them."""
    # a stream per set: what one set draws (its usable sentences, the reader's cohort left
    # out) does not change another set's trials
    rng = {name: np.random.default_rng([args.seed, i]) for i, name in enumerate(("speech", "speech-8k", "digits"))}
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
    return tasks, info


if __name__ == "__main__":
    sys.exit(main())
