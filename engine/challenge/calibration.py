"""The calibrated operating points of the challenge check, read from ``challenge.json``.

:func:`load_calibration` reads and validates the file that ``netid bench challenge
--write-calibration`` writes; :func:`check_measured_with` refuses a calibration measured
with other settings than the checker's. docs/challenge.md describes the calibration.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError, ModelMissing
from engine.challenge.pronunciation import VARIANTS_VERSION
from .config import KINDS, ChallengeConfig

__all__ = ["ChallengeCalibration", "Screen", "check_measured_with", "load_calibration"]

_EARLIER_BEAM = 1e-48  # the beam of calibrations that do not record theirs
_EARLIER_TOP_GAUSSIANS = 4  # pocketsphinx's default: calibrations that do not record theirs
_EARLIER_FRAME_RATE = 100  # pocketsphinx's default: calibrations that do not record theirs


@dataclass(frozen=True, slots=True)
class Screen:
    """The first stage of a pocketsphinx check, on the alignment pass alone: its score
    (the same word and silence ratios as the challenge score, against no background) at or
    above ``accept`` passes and below ``reject`` fails, both without the phone loop; in
    between, the phone loop is decoded and the challenge score decides. Calibrated per
    kind: ``accept`` above every wrong phrase of the calibration part, ``reject`` below
    every genuine recording there that the full check passes."""

    silence_weight: float
    accept: float
    reject: float

    def __post_init__(self) -> None:
        if not all(math.isfinite(x) for x in (self.silence_weight, self.accept, self.reject)):
            raise ValueError("screen values must be numbers")
        if not 0.0 <= self.silence_weight <= 100.0 or self.reject > self.accept:
            raise ValueError("need a silence weight in 0..100 and reject <= accept")

    def decide(self, score: float) -> bool | None:
        """Pass (True), fail (False), or not clear from the alignment alone (None)."""
        if score >= self.accept:
            return True
        if score < self.reject:
            return False
        return None


@dataclass(frozen=True, slots=True)
class ChallengeCalibration:
    """The operating points in ``challenge.json`` (and what they were measured on).

    ``threshold`` holds for any challenge (the highest of the per-kind ones);
    ``thresholds`` maps a challenge kind (``"digits"``, ``"phrase"``) to the threshold
    calibrated on that kind's own data, for the same target.
    """

    threshold: float
    target_wrong_phrase_acceptance: float
    thresholds: dict[str, float]
    #: the silence weight each kind's threshold was measured with
    silence_weights: dict[str, float]
    info: dict[str, Any]
    #: the version of the pronunciation-variant rules it was measured with (0: none) and
    #: the kinds it applied them to
    variants_version: int = 0
    variant_kinds: frozenset[str] = frozenset()
    #: per challenge kind, the screen on the alignment alone (none: every check decodes both passes)
    screens: dict[str, Screen] = field(default_factory=dict)
    #: per challenge kind, the offset subtracted from each word's ratio before the mean
    #: (:meth:`~engine.challenge.ScoreParts.score`); a kind or word without one: none
    word_offsets: dict[str, dict[str, float]] = field(default_factory=dict)


def load_calibration(path: Path) -> ChallengeCalibration:
    """Read the calibrated operating point; :class:`ModelMissing` if the file is absent,
    :class:`ModelError` if it is malformed or inconsistent."""
    path = Path(path)
    if not path.is_file():
        raise ModelMissing(f"challenge calibration {path.name} not found; run `netid bench challenge --write-calibration`")
    try:
        cal = _parse(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"challenge calibration {path.name} is malformed") from exc
    _validate(cal, path.name)
    missing = [k for k in KINDS if k not in cal.silence_weights]
    if missing:
        if not cal.thresholds:
            raise ModelError(f"challenge calibration {path.name} gives no silence weight for " + ", ".join(missing))
        # a kind without its own calibration is checked against the highest threshold: score
        # it as the kind that threshold was measured on
        strictest = max(cal.thresholds, key=lambda k: cal.thresholds[k])
        cal.silence_weights.update({k: cal.silence_weights[strictest] for k in missing})
    return cal


def _parse(doc: dict[str, Any]) -> ChallengeCalibration:
    """The calibration a parsed ``challenge.json`` holds, its values converted (a wrong
    type or a missing key raises)."""
    per_kind = {str(k): float(v) for k, v in dict(doc.get("thresholds", {})).items()}
    per_kind_weights = doc.get("silence_weights")
    if per_kind_weights is None:  # one weight for every kind
        weights = {kind: float(doc.get("silence_weight", 1.0)) for kind in KINDS}
    else:
        weights = {str(k): float(v) for k, v in dict(per_kind_weights).items()}
    # before the file recorded them, no kind was aligned with variants
    version = int(doc.get("pronunciation_variants", 0))
    variant_kinds = doc.get("variant_kinds", [])
    if not isinstance(variant_kinds, list) or version < 0 or (version > 0) != bool(variant_kinds):
        raise ValueError("pronunciation_variants and variant_kinds disagree")
    screens = {
        str(k): Screen(silence_weight=float(v["silence_weight"]), accept=float(v["accept"]), reject=float(v["reject"]))
        for k, v in dict(doc.get("screens", {})).items()
    }
    offsets = {str(k): {str(w): float(x) for w, x in dict(v).items()} for k, v in dict(doc.get("word_offsets", {})).items()}
    return ChallengeCalibration(
        threshold=float(doc["threshold"]), target_wrong_phrase_acceptance=float(doc["target_wrong_phrase_acceptance"]),
        thresholds=per_kind, silence_weights=weights, info=doc, variants_version=version,
        variant_kinds=frozenset(str(k) for k in variant_kinds), screens=screens, word_offsets=offsets,
    )


def _validate(cal: ChallengeCalibration, name: str) -> None:
    """:class:`ModelError` if the calibration's values are out of range or disagree."""
    per_kind, weights, offsets = cal.thresholds, cal.silence_weights, cal.word_offsets
    if not all(math.isfinite(t) for t in (cal.threshold, *per_kind.values())):
        raise ModelError(f"challenge calibration {name} has a threshold that is not a number")
    if not all(0.0 <= w <= 100.0 for w in weights.values()):
        raise ModelError(f"challenge calibration {name} has a silence weight outside 0..100")
    if not all(math.isfinite(x) and abs(x) <= 1000.0 for v in offsets.values() for x in v.values()):
        raise ModelError(f"challenge calibration {name} has a word offset that is not a number in -1000..1000")
    if any(k not in KINDS for k in (*per_kind, *weights, *cal.variant_kinds, *cal.screens, *offsets)):
        raise ModelError(f"challenge calibration {name} names an unknown challenge kind")
    if any(k not in weights for k in per_kind):
        raise ModelError(f"challenge calibration {name} has a threshold without its silence weight")
    if any(k not in per_kind for k in cal.screens):
        raise ModelError(f"challenge calibration {name} has a screen for a kind without its own threshold")
    if offsets and any(k not in per_kind for k in KINDS):
        # a kind without its own threshold is scored like another kind: not with its words'
        # offsets, nor with offsets of its own the threshold was not measured with
        raise ModelError(f"challenge calibration {name} has word offsets but not a threshold for every kind")


def check_measured_with(cal: ChallengeCalibration, config: ChallengeConfig, cohort_digest: str | None) -> None:
    """:class:`ModelError` unless ``cal`` was measured with ``config``'s settings (and,
    for kinds scored relative to the reader's cohort, that cohort: ``cohort_digest``)."""
    measured = cal.info
    name = Path(config.calibration_path).name
    if measured.get("frame_step", 1) != config.frame_step:
        raise ModelError(f"challenge calibration {name} was not measured with frame_step={config.frame_step}")
    # before the file recorded its beam, every calibration was measured with 1e-48
    if float(measured.get("beam", _EARLIER_BEAM)) != config.beam:
        raise ModelError(f"challenge calibration {name} was not measured with beam={config.beam:g}")
    if measured.get("top_gaussians", _EARLIER_TOP_GAUSSIANS) != config.top_gaussians:
        raise ModelError(f"challenge calibration {name} was not measured with top_gaussians={config.top_gaussians}")
    rates = measured.get("frame_rates", {kind: _EARLIER_FRAME_RATE for kind in KINDS})
    if not isinstance(rates, dict) or any(rates.get(k) != r for k, r in config.frame_rates.items()):
        wanted = ", ".join(f"{k} {r}" for k, r in config.frame_rates.items())
        raise ModelError(f"challenge calibration {name} was not measured with frame rates {wanted}")
    recognisers = measured.get("recognisers", {kind: "pocketsphinx" for kind in KINDS})
    if recognisers != config.recognisers:
        wanted = ", ".join(f"{k} {r}" for k, r in config.recognisers.items())
        raise ModelError(f"challenge calibration {name} was not measured with recognisers {wanted}")
    relative = measured.get("relative_kinds", [])
    if relative != list(config.relative_kinds) or (relative and measured.get("reader_cohort") != cohort_digest):
        wanted = ", ".join(config.relative_kinds) or "no kind"
        raise ModelError(f"challenge calibration {name} was not measured with {wanted} relative to this reader cohort")
    if relative and not measured.get("relative_end", False):
        raise ModelError(f"challenge calibration {name} was not measured with the sentence's end scored "
                         "after the words (relative_end)")
    if cal.variant_kinds != set(config.variant_kinds) or (cal.variant_kinds and cal.variants_version != VARIANTS_VERSION):
        wanted = ", ".join(config.variant_kinds) or "none"
        raise ModelError(f"challenge calibration {name} was not measured with pronunciation variants for {wanted}")
    weights = cal.silence_weights
    if config.silence_weight is not None and any(w != config.silence_weight for w in weights.values()):
        measured_with = ", ".join(f"{k} {w:g}" for k, w in weights.items())
        raise ModelError(f"challenge calibration {name} was measured with silence_weight {measured_with}")
