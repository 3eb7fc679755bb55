"""The report of ``netid bench challenge``: part B of each set at the operating point, the
recogniser's CPU cost, the run's settings, the calibration file (``--write-calibration``)
and the human summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from engine.bench._common import emit
from engine.bench.challenge_calibration import (
    OperatingPoint,
    _decisions,
    _dist,
    _genuine_by_group,
    _rate,
    _read,
    _scores,
    _screens_json,
    rates,
)
from engine.bench.challenge_trials import KIND_OF_SET, Result
from engine.challenge import CALIBRATION_FILE, ChallengeConfig
from engine.challenge.pronunciation import VARIANTS_VERSION
from engine.challenge.reader import check_cohort

__all__ = ["save_scores", "report_part_b", "report_cost", "emit_run", "write_calibration", "human_summary"]


def save_scores(path: Path, results: list[Result]) -> None:
    """Every trial's score parts, one JSON line per recording (``--save-scores``)."""
    with Path(path).open("w") as fh:
        for r in results:
            fh.write(json.dumps({"set": r.task.set, "part": r.task.part, "group": r.task.group,
                                 "audio": r.task.audio[1] if r.task.audio[0] != "digits" else list(r.task.audio[1]),
                                 "expected": r.task.expected, "labels": r.task.labels,
                                 "parts": [None if x is None else list(x) for x in r.parts],
                                 "errors": r.errors, "audio_s": r.audio_s, "genuine_cpu_s": r.genuine_cpu_s}) + "\n")


# --------------------------------------------------------------------------- part B


def report_part_b(results: list[Result], sets: list[str], point: OperatingPoint) -> dict[str, dict[str, Any]]:
    """One row per set on part B (and the 8 kHz speech, if scored), each emitted."""
    report: dict[str, Any] = {}
    for s in sets + (["speech-8k"] if any(r.task.set == "speech-8k" for r in results) else []):
        row = _report_row(results, s, point)
        report[s] = row
        emit(row)
    return report


def _report_row(results: list[Result], s: str, point: OperatingPoint) -> dict[str, Any]:
    per_set, operating = point.per_set, point.threshold
    gb, wb = _scores(results, s, "B", "genuine"), _scores(results, s, "B", "wrong")
    row: dict[str, Any] = {"figure": "challenge_report", "set": s, "part": "B",
                           "at_operating_point": rates(gb, wb, operating)}
    own = per_set.get(s if s != "speech-8k" else "speech")
    if own is not None:
        row["at_kind_threshold"] = rates(gb, wb, own["threshold"])
        row["engine"] = _engine_decisions(results, s, own["threshold"], point.screens)
    if s == "digits":
        _near_misses(results, s, row, own["threshold"] if own is not None else operating)
    if s == "speech":
        # the corpus's speakers 96xx read markedly slower and less fluently (their
        # utterances average 6.2 s against 3.8 s for the others)
        by_speaker = _genuine_by_group(results, s, "B")
        for name, slow in (("speakers_96xx", True), ("other_speakers", False)):
            g = [x for spk, xs in by_speaker.items() if spk.startswith("96") == slow for x in xs]
            row[name] = _rate(sum(x >= own["threshold"] for x in g), len(g))
    if s == "speech-8k" and "speech" in per_set:
        row["paired_full_band"] = _paired_full_band(results, s, per_set["speech"]["threshold"])
    # diagnostic only: the best genuine pass with no wrong phrase accepted on B itself
    zero = float(wb.max()) + 1e-9 if wb.size else math.nan
    row["diagnostic_zero_wrong_on_B"] = {"threshold": zero, "genuine_pass": _rate(int((gb >= zero).sum()), int(gb.size))}
    row["genuine"], row["wrong"] = _dist(gb), _dist(wb)
    return row


def _engine_decisions(results: list[Result], s: str, threshold: float, screens: dict[str, Any]) -> dict[str, Any]:
    """What the engine decides: the screen where it is clear, else the kind's threshold."""
    (gp, gs), (wp, ws) = _decisions(results, s, "B", "genuine"), _decisions(results, s, "B", "wrong")
    return {"threshold": threshold, "screen": screens.get(s if s != "speech-8k" else "speech") is not None,
            "genuine_pass": _rate(int(gp.sum()), int(gp.size)), "wrong_accept": _rate(int(wp.sum()), int(wp.size)),
            "to_phone_loop": {"genuine": float(1 - gs.mean()) if gs.size else math.nan,
                              "wrong": float(1 - ws.mean()) if ws.size else math.nan}}


def _near_misses(results: list[Result], s: str, row: dict[str, Any], nm_thr: float) -> None:
    """The digit strings with one digit changed, at ``nm_thr`` (the threshold the engine uses
    for digit strings), and the genuine pass by speaker."""
    nm = _scores(results, s, "B", "near_miss")
    row["near_miss_accept"] = {"threshold": nm_thr, **_rate(int((nm >= nm_thr).sum()), int(nm.size))}
    nmp, _ = _decisions(results, s, "B", "near_miss")
    if "engine" in row:
        row["engine"]["near_miss_accept"] = _rate(int(nmp.sum()), int(nmp.size))
    row["near_miss"] = _dist(nm)
    # six speakers with four accents: where the misses come from
    row["genuine_pass_by_speaker"] = {
        spk: _rate(sum(x >= nm_thr for x in xs), len(xs)) for spk, xs in sorted(_genuine_by_group(results, s, "B").items())
    }


def _paired_full_band(results: list[Result], s: str, thr: float) -> dict[str, Any]:
    """The 8 kHz utterances against the same utterances at full band, at the speech threshold."""
    full = {r.task.audio[1]: r.scores[0] for r in results if r.task.set == "speech" and r.task.part == "B"}
    pairs = [(full[r.task.audio[1]], r.scores[0]) for r in results if r.task.set == s and r.task.audio[1] in full]
    fb = np.asarray([a for a, _ in pairs])
    nb = np.asarray([b for _, b in pairs])
    return {
        "threshold": thr,
        "genuine_pass": _rate(int((fb >= thr).sum()), int(fb.size)),
        "genuine_pass_8k": _rate(int((nb >= thr).sum()), int(nb.size)),
        "median_full_band": float(np.median(fb)) if fb.size else math.nan,
        "median_8k": float(np.median(nb)) if nb.size else math.nan,
        "median_change": float(np.median(nb - fb)) if fb.size else math.nan,
    }


# --------------------------------------------------------------------------- cost and run


def report_cost(results: list[Result], sets: list[str], report: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The recogniser's CPU seconds per second of audio, per set, emitted."""
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
    return cost


def emit_run(results: list[Result], args: argparse.Namespace, config: ChallengeConfig, point: OperatingPoint,
             info: dict[str, Any], wall: float, command: str) -> None:
    """The run's settings, its sample errors and what it chose."""
    weights, screens, offsets = point.weights, point.screens, point.offsets
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


# --------------------------------------------------------------------------- calibration file and summary


def write_calibration(args: argparse.Namespace, config: ChallengeConfig, point: OperatingPoint, sets: list[str],
                      report: dict[str, dict[str, Any]], command: str) -> None:
    """The operating point chosen on part A, with part B's figures, in ``models/challenge.json``."""
    weights, per_set, screens, operating, offsets = point
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


def human_summary(args: argparse.Namespace, point: OperatingPoint, report: dict[str, dict[str, Any]],
                  cost: dict[str, dict[str, Any]], wall: float, command: str) -> None:
    """The figures that matter, on stderr."""
    weights, per_set, _, operating, offsets = point
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


def _fmt(r: dict[str, Any]) -> str:
    return f"{r['k']}/{r['n']} = {100 * r['rate']:.2f} % [{100 * r['lower']:.2f}, {100 * r['upper']:.2f}]"
