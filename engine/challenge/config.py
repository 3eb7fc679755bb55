"""How the spoken challenge is checked: :class:`ChallengeConfig` and the constants it uses.

A frozen, keyword-only object, validated when built. Which recogniser checks each kind of
challenge, the pocketsphinx settings a calibration records, the limits on a recording, and
where the calibration, the Whisper manifest and the reader's cohort are read from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pocketsphinx

from ..errors import ConfigError
from engine.inference.models import DEFAULT_MODELS_DIR
from engine.challenge.reader import DEFAULT_COHORT_DIR

__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_FRAME_RATES",
    "DEFAULT_POCKETSPHINX_MODEL",
    "DEFAULT_RECOGNISERS",
    "DIGIT_WORDS",
    "FAILURE_SCORE",
    "KINDS",
    "RECOGNISERS",
    "SAMPLE_RATE",
    "ChallengeConfig",
]

KINDS = ("digits", "phrase")
#: what can check a kind of challenge: pocketsphinx's alignment against its phone loop, or
#: Whisper's reading of the expected words (:mod:`engine.challenge.reader`)
RECOGNISERS = ("pocketsphinx", "whisper")
#: the recogniser per challenge kind (:attr:`ChallengeConfig.recognisers`)
DEFAULT_RECOGNISERS = {"digits": "whisper", "phrase": "whisper"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: The score of a recording the expected words cannot be aligned to; below any real score.
FAILURE_SCORE = -1000.0
#: the calibration's file name in a models directory
CALIBRATION_FILE = "challenge.json"
SAMPLE_RATE = 16000

#: The model directory inside the pocketsphinx wheel (found from the package, not the
#: environment: pocketsphinx's own ``get_model_path`` reads ``POCKETSPHINX_PATH``).
DEFAULT_POCKETSPHINX_MODEL = Path(pocketsphinx.__file__).resolve().parent / "model" / "en-us"

#: frames per second per challenge kind (:attr:`ChallengeConfig.frame_rates`)
DEFAULT_FRAME_RATES = {"digits": 85, "phrase": 55}
# below 40 frames per second the 25.6 ms analysis windows no longer overlap
_MIN_FRAME_RATE, _MAX_FRAME_RATE = 40, 200


@dataclass(frozen=True, kw_only=True, slots=True)
class ChallengeConfig:
    """How challenges are checked. Validated when built. docs/challenge.md explains the
    check and how the defaults were chosen."""

    #: pocketsphinx model directory: ``en-us/`` (acoustic model) and ``cmudict-en-us.dict``.
    model_dir: Path = DEFAULT_POCKETSPHINX_MODEL
    #: where the calibrated operating point is read from (:meth:`for_models` sets it).
    calibration_path: Path = DEFAULT_MODELS_DIR / CALIBRATION_FILE
    #: frames per scored frame (pocketsphinx ``ds``); the calibration records it.
    frame_step: int = 1
    #: frames per second of audio pocketsphinx analyses, per challenge kind (``frate``; the
    #: acoustic model was trained at 100, slow readers fit better below it); the
    #: calibration records them.
    frame_rates: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_FRAME_RATES))
    #: Gaussians of each codebook a senone's score is computed from (pocketsphinx ``topn``);
    #: the calibration records it.
    top_gaussians: int = 4
    #: weight of the (negative part of the) silence ratio in the score, for every kind;
    #: ``None``: the weights the calibration chose per kind (1.0 with an explicit threshold).
    silence_weight: float | None = None
    #: search beams of both pocketsphinx passes (one value for every beam: pocketsphinx
    #: 5.1.1 breaks word alignments when the word beam differs from the state beam). Wide
    #: enough that nothing is pruned; every senone is scored in every frame anyway.
    beam: float = 1e-300
    #: decide a recording from its alignment alone where the calibration's screen for its
    #: kind is clear (:class:`~engine.challenge.Screen`); ``False``: always both passes.
    screen: bool = True
    #: the kinds whose expected words pocketsphinx also aligns with the pronunciations
    #: non-native speakers often use (:func:`~engine.challenge.pronunciation.pronunciation_variants`);
    #: the calibration records them.
    variant_kinds: tuple[str, ...] = ("phrase",)
    min_seconds: float = 0.3
    max_seconds: float = 30.0
    #: a recording whose 95th-percentile 30 ms level stays below this is silence.
    min_level_dbfs: float = -50.0
    #: longest phrase accepted in a phrase list, in words.
    max_phrase_words: int = 24
    #: what checks each challenge kind (:data:`RECOGNISERS`): ``"whisper"`` scores how likely
    #: Whisper base finds the expected words (:mod:`engine.challenge.reader`); ``"pocketsphinx"``
    #: aligns them and scores them against its phone loop. The calibration records them.
    recognisers: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_RECOGNISERS))
    #: where ``whisper.json`` (the Whisper model's manifest) is read from (:meth:`for_models`
    #: sets it).
    reader_models_dir: Path = DEFAULT_MODELS_DIR
    #: the reader's cohort: recordings of other sentences and their manifest
    #: (:func:`engine.challenge.reader.load_cohort`).
    reader_cohort_dir: Path = DEFAULT_COHORT_DIR
    #: the kinds whose Whisper score is relative to the reader's cohort: each word's
    #: log-probability, and the sentence's end's after them, less its mean over recordings
    #: of other sentences (:meth:`engine.challenge.reader.Reader.relative`). A phrase's cohort passes
    #: run once per challenge worker and are kept. The calibration records them.
    cohort_kinds: tuple[str, ...] = ("phrase",)

    @classmethod
    def for_models(cls, models_dir: Path, **kw) -> ChallengeConfig:
        """The configuration that reads the calibration (``challenge.json``) and the Whisper
        manifest (``whisper.json``) from ``models_dir``."""
        return cls(calibration_path=Path(models_dir) / CALIBRATION_FILE, reader_models_dir=Path(models_dir), **kw)

    def __post_init__(self) -> None:
        if self.silence_weight is not None and not 0.0 <= self.silence_weight <= 100.0:
            raise ConfigError("silence_weight must be between 0 and 100")
        if not 1 <= self.frame_step <= 4:
            raise ConfigError("frame_step must be 1..4")
        if not isinstance(self.frame_rates, Mapping) or set(self.frame_rates) != set(KINDS) or not all(
            type(r) is int and _MIN_FRAME_RATE <= r <= _MAX_FRAME_RATE for r in self.frame_rates.values()
        ):
            raise ConfigError(f"frame_rates must give every challenge kind ({', '.join(KINDS)}) "
                              f"a whole number of frames per second in {_MIN_FRAME_RATE}..{_MAX_FRAME_RATE}")
        # a copy of its own: not shared with the caller's mapping or another config
        object.__setattr__(self, "frame_rates", dict(self.frame_rates))
        if not 1 <= self.top_gaussians <= 16:
            raise ConfigError("top_gaussians must be 1..16")
        if not 0.0 < self.beam < 1.0:
            raise ConfigError("beam must be in (0, 1)")
        if not 0.0 < self.min_seconds < self.max_seconds <= 600.0:
            raise ConfigError("need 0 < min_seconds < max_seconds <= 600")
        if not -120.0 <= self.min_level_dbfs <= 0.0:
            raise ConfigError("min_level_dbfs must be between -120 and 0")
        if self.max_phrase_words < 1:
            raise ConfigError("max_phrase_words must be positive")
        if not set(self.variant_kinds) <= set(KINDS):
            raise ConfigError("variant_kinds must name challenge kinds: " + ", ".join(KINDS))
        if isinstance(self.cohort_kinds, str) or not set(self.cohort_kinds) <= set(KINDS):
            raise ConfigError("cohort_kinds must name challenge kinds: " + ", ".join(KINDS))
        object.__setattr__(self, "cohort_kinds", tuple(self.cohort_kinds))
        if not isinstance(self.recognisers, Mapping) or set(self.recognisers) != set(KINDS) or not all(
            r in RECOGNISERS for r in self.recognisers.values()
        ):
            raise ConfigError(f"recognisers must give every challenge kind ({', '.join(KINDS)}) one of: "
                              + ", ".join(RECOGNISERS))
        object.__setattr__(self, "recognisers", dict(self.recognisers))
        if "whisper" in self.recognisers.values() and self.max_seconds > 30.0:
            raise ConfigError("Whisper reads at most 30 s: max_seconds must be 30 or less")

    @property
    def relative_kinds(self) -> tuple[str, ...]:
        """The kinds scored relative to the reader's cohort: those of ``cohort_kinds``
        that Whisper reads (pocketsphinx has its phone loop)."""
        return tuple(k for k in KINDS if k in self.cohort_kinds and self.recognisers[k] == "whisper")

    @property
    def acoustic_model(self) -> Path:
        return Path(self.model_dir) / "en-us"

    @property
    def dictionary(self) -> Path:
        return Path(self.model_dir) / "cmudict-en-us.dict"
