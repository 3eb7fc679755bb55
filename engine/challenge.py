"""The spoken challenge: fresh random words per session, and a check that a recording says them.

Challenges
----------
:func:`new_challenge` draws, with :mod:`secrets`, a string of digits (stored as the digit
characters, ``"409172"``, and said one digit at a time) or a sentence from the operator's
phrase list. :func:`load_phrases` checks a phrase list once, when it is loaded: no digits,
not too long, and, when pocketsphinx checks phrases, every word in its pronunciation
dictionary, or it is a :class:`ConfigError` naming the unknown words (Whisper, the default
for phrases, reads any word). :func:`challenge_words` turns a challenge into the words to say.

The check
---------
Each challenge kind has its recogniser (``ChallengeConfig.recognisers``). By default both
digit strings and phrases are checked by **Whisper base** (:mod:`engine.reader`), which
finds how likely the expected words are given the audio, in one pass: the challenge score
is the mean log-probability per expected word, in nats. For the kinds in
``ChallengeConfig.cohort_kinds`` (phrases) each word's log-probability is first taken
relative to the cohort's (:meth:`engine.reader.Reader.relative`): less its mean over a few
recordings of other sentences, which removes how likely the phrase is whatever is said;
the sentence's end after the words (the full stop Whisper writes) counts as one more word,
so that a recording that goes on past them scores lower.
On the benchmark's held-apart sentences and digit strings Whisper passed more genuine
recordings than the pocketsphinx check below, at less CPU (benchmarks/TUNING.md, section 4,
"Whisper for sentences" and "Phrases relative to a cohort of other speech"). pocketsphinx
remains selectable per kind; everything below the next paragraph is about its check.

:class:`ChallengeChecker` scores a recording against the words it should say with the
US-English acoustic model and dictionary shipped in the ``pocketsphinx`` wheel, in two
decoding passes over the same audio:

1. **word alignment**: a grammar holding only the expected words, in order, with
   optional silences between them (``Decoder.set_align_text``), gives each word's frames
   and acoustic log-likelihood. Each word may be said with any of its dictionary
   pronunciations and, for the kinds in ``ChallengeConfig.variant_kinds`` (phrases), with
   the :func:`~engine.pronunciation.pronunciation_variants` of its first one that speakers
   whose first language is not English often use (TH said as S, a final consonant dropped
   or followed by a vowel, ...). A recording that cannot be aligned to the expected words at all
   scores :data:`FAILURE_SCORE`;
2. **free phone loop** (pocketsphinx's ``allphone`` search, uniform phone transitions):
   the background, the best any phone sequence does on the same frames.

The two passes are independent: :meth:`ChallengeChecker.run_passes` runs them one after
the other; the engine's worker pool runs them side by side (:class:`Pass`).

The screen
----------
Every senone is scored in every frame, so the alignment's own score per frame is already
measured against the best senone of each frame; for most recordings it alone says clearly
whether the expected words were said. :meth:`ChallengeChecker.check_batch` therefore
aligns first and, for a kind the calibration gives a :class:`Screen`, passes a recording
whose alignment-only score (the same ratios against no background) is above every wrong
phrase of the calibration part, and fails one below every genuine recording there that the
full check passes; only recordings in between (29-42 % of genuine ones, 1-4 % of wrong
phrases, in the shipped calibration's held-apart part) are decoded through the phone loop
and decided by the challenge score. This takes 29-35 % off the recogniser's work per
verification. By construction the screen
accepts no wrong phrase of the calibration part and rejects no genuine recording there
that the full check passes (it may pass a genuine recording the full check would not, or
reject a wrong phrase it would let through); on the shipped calibration's held-apart part
it passed 1 genuine sentence fewer, the same digit strings and the same wrong phrases.
``ChallengeConfig.screen = False`` decodes both passes for every recording.

For each expected word, its log-likelihood ratio per frame is ``(aligned score -
phone-loop score over the word's frames) / frames``; the silences the aligner inserted
get the same ratio over all their frames together. The challenge score is

    mean over the expected words of (the word ratio - the word's offset)
    + silence_weight * min(0, silence ratio)

(:class:`ScoreParts`), with one silence weight per challenge kind, chosen by the benchmark
on its calibration part, in pocketsphinx score units per frame (log base 1.0001 shifted by
10 bits: one unit is about 0.1 nat). Higher means more likely that the recording says the expected words;
a recording of other words scores far below the calibrated threshold because its words
fit the audio much worse than free phones do, and the speech it pushes into "silence"
fits that worse still.

Word offsets
------------
Some words fit the model badly even when they are said. In the FSDD digit strings a
genuine "six" has a median ratio of -31.8 and a genuine "zero" -15.3, against +0.8 for
"one" (and a wrong word -26 to -67): most likely because their /s/ and /z/ carry most of
their energy above 4 kHz, which these telephone-band recordings do not hold. Without an
offset, every string with a "six" in it scored lower, however well it was said.
For a closed vocabulary (the digit strings), the calibration therefore gives each word an
offset, half-way between the median ratio of that word in genuine and in wrong-phrase
trials of its calibration part (:attr:`ChallengeCalibration.word_offsets`). Phrases get
none: an operator's phrase list holds words the calibration never saw.

Every senone is scored in every frame (``compallsen``), so that both passes share one
per-frame normalisation and their scores can be subtracted. Variants measured with
``netid bench challenge`` (genuine pass at each kind's threshold for 0.1 % wrong-phrase
acceptance, chosen on the calibration part, reported on the held-apart part: 300 FSDD
strings and 150 speechocean762 utterances, 3,000 and 1,500 wrong phrases; the same trials
in every row):

=================================================  ==========  ==========  ================
scoring                                            FSDD        speech      CPU s / audio s
=================================================  ==========  ==========  ================
as below, screen on the alignment alone           95.0 %      87.3 %      0.06-0.07
as below, variants for phrases                     95.3 %      86.7 %      0.11
as below, variants for both kinds                  91.7 %      86.7 %      0.11
every frame, no pruning, weight per kind           95.3 %      69.3 %      0.11
every frame, beam 1e-48, silence weight 1.0        92.3 %      63.3 %      0.11
every 2nd frame (ds=2), beam 1e-48, weight 1.0     87.0 %      64.7 %      0.08
=================================================  ==========  ==========  ================

The silence weight of each kind is chosen on the calibration part with the threshold, and
so are the kinds aligned with pronunciation variants (``ChallengeConfig.variant_kinds``:
phrases; on the calibration part they raised sentences from 83 % to 92 % and lowered digit
strings from 98 % to 94 %). On every held-apart sentence (480, against 4,800 wrong ones)
the point of the table's first row accepted 0.40 % of wrong sentences; the shipped
calibration is chosen on every calibration-part sentence instead (478 against 4,780) and
a new draw of digit strings: weights 0.5 for phrases and 0.75 for digit strings; held
apart, sentences passed 79.6 % with 0.12 % of wrong ones accepted, digit strings 90.0 % with
0.10 %. With each kind at its own frame rate (below) and 600 digit strings per part, the
calibration passed 87.7 % of held-apart sentences with 0.19 % of wrong ones accepted, and
94.5 % of digit strings with 0.08 %; with word offsets for the digit strings (above),
97.0 % of the same digit strings with 0.02 % (1 of 6,000) of wrong ones accepted. The
calibration read both kinds with Whisper instead: 98.5 % of the same held-apart digit
strings passed with 0.05 % (3 of 6,000) of wrong ones accepted, and 90.6 % of the sentences
with 0.06 % (3 of 4,800). The shipped calibration reads phrases relative to the reader's
cohort, with the sentence's end as one more word, and sets each threshold so that the
upper bound of part A's wrong-phrase rate is within the target, on a new draw with 20 wrong
phrases per recording: 97.5 % of held-apart digit strings pass with 0.03 % (4 of 12,000) of
wrong ones accepted, and 97.3 % of the sentences with 0.01 % (1 of 9,600); on a fresh draw
with twice the wrong phrases, 0.037 % (9 of 24,000) and 0.036 % (7 of 19,200)
(benchmarks/TUNING.md, section 4).

On a smaller part-A comparison (100 recordings per set, 500 wrong phrases), scoring only the
senones each search keeps active (0.05 s) lost 10 points on both sets, because each pass
then normalises by its own best active senone; every 3rd frame lost as much; a third pass,
the state alignment of the word path, changed nothing. ``frame_step`` selects another
frame step; a calibration records the one it was measured with, and the checker refuses
a calibration measured with another.

Frames per second
-----------------
The acoustic model analyses 100 frames per second, and its phone models are made for
phones of ordinary length; slow readers draw their words out, and their right words fit
worse than free phones. Each kind is therefore analysed at its own rate
(``ChallengeConfig.frame_rates``, pocketsphinx ``frate``): 55 frames per second for
phrases (on the calibration part, the slow readers passed 70.5 % instead of 51.2 %, and
the other speakers 97.4 % instead of 97.7 %) and 85 for digit strings (97.0 % instead of
95.7 %); both passes of a check use their kind's rate, and the calibration records the
rates (benchmarks/TUNING.md, section 4).

The thresholds are read from ``models/challenge.json``, written by ``netid bench challenge
--write-calibration`` for a target wrong-phrase acceptance: one per challenge kind (digit
strings and phrases score on different scales), and the stricter of the two for a caller
that does not say which kind it checks; the file also gives each kind's silence weight,
screen and word offsets, the frame step, frame rates, Gaussians per codebook and beam it
was measured with, and the kinds it aligned with variants.

Silence and noise are not "a low score": a recording whose loudest part stays below
``min_level_dbfs`` is :class:`NoSpeech`, one shorter than ``min_seconds`` is
:class:`TooLittleSpeech`, one longer than ``max_seconds`` is :class:`SampleTooLarge`.

Threads and cost
----------------
A process loads Whisper once, with the first phrase (or :meth:`ChallengeChecker.load_decoder`),
and its threads share it. pocketsphinx ``Decoder`` objects are not thread-safe, so each thread gets its own
(:class:`threading.local`; one per pronunciation-variant setting and frame rate). The decoder
holds the GIL while it decodes: threads calling
:meth:`ChallengeChecker.check_batch` run one after the other, and parallel scoring needs
processes. Measured cost (``netid bench challenge``, each kind at its frame rate): 0.089
(digit strings) and 0.058 (sentences) s of CPU per second of audio for both passes, half
of it each; with the screen, 0.063 and 0.039 s. Whisper's reading costs 0.039-0.045 s
per second of audio.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pocketsphinx

from .errors import (
    ConfigError,
    ModelError,
    ModelMissing,
    NoSpeech,
    SampleError,
    SampleTooLarge,
    TooLittleSpeech,
    UndecodableSample,
)
from .audio import from_pcm16, to_pcm16
from .models import DEFAULT_MODELS_DIR
from .pronunciation import VARIANTS_VERSION, pronunciation_variants
from .reader import DEFAULT_COHORT_DIR
from .reader import END as READ_END

__all__ = [
    "KINDS",
    "DIGIT_WORDS",
    "FAILURE_SCORE",
    "CALIBRATION_FILE",
    "ChallengeConfig",
    "ChallengeCalibration",
    "ChallengeChecker",
    "ScoreParts",
    "Screen",
    "Verdict",
    "Pass",
    "new_challenge",
    "challenge_words",
    "challenge_kind",
    "load_phrases",
    "load_calibration",
]

KINDS = ("digits", "phrase")
#: what can check a kind of challenge: pocketsphinx's alignment against its phone loop, or
#: Whisper's reading of the expected words (:mod:`engine.reader`)
RECOGNISERS = ("pocketsphinx", "whisper")
#: the recogniser per challenge kind (:attr:`ChallengeConfig.recognisers`)
DEFAULT_RECOGNISERS = {"digits": "whisper", "phrase": "whisper"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: The score of a recording the expected words cannot be aligned to; below any real score.
FAILURE_SCORE = -1000.0
CALIBRATION_FILE = "challenge.json"
SAMPLE_RATE = 16000

#: The model directory inside the pocketsphinx wheel (found from the package, not the
#: environment: pocketsphinx's own ``get_model_path`` reads ``POCKETSPHINX_PATH``).
DEFAULT_POCKETSPHINX_MODEL = Path(pocketsphinx.__file__).resolve().parent / "model" / "en-us"

_MIN_DIGITS, _MAX_DIGITS = 1, 32
_WORD_RE = re.compile(r"[a-z']+")
_PHONE_LOOP = "challenge_phone_loop"
_NULL = "(NULL)"  # the grammar's empty transitions, one frame long, in an alignment
_LEVEL_WINDOW = 480  # 30 ms
_EARLIER_BEAM = 1e-48  # the beam of calibrations that do not record theirs
_EARLIER_TOP_GAUSSIANS = 4  # pocketsphinx's default: calibrations that do not record theirs
_EARLIER_FRAME_RATE = 100  # pocketsphinx's default: calibrations that do not record theirs
#: frames per second per challenge kind (:attr:`ChallengeConfig.frame_rates`)
DEFAULT_FRAME_RATES = {"digits": 85, "phrase": 55}
# below 40 frames per second the 25.6 ms analysis windows no longer overlap
_MIN_FRAME_RATE, _MAX_FRAME_RATE = 40, 200


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, kw_only=True, slots=True)
class ChallengeConfig:
    """How challenges are checked. Validated when built."""

    #: pocketsphinx model directory: ``en-us/`` (acoustic model) and ``cmudict-en-us.dict``.
    model_dir: Path = DEFAULT_POCKETSPHINX_MODEL
    #: where the calibrated operating point is read from.
    calibration_path: Path = DEFAULT_MODELS_DIR / CALIBRATION_FILE
    #: frames per scored frame (pocketsphinx ``ds``); the calibration records it.
    frame_step: int = 1
    #: frames per second of audio the recogniser analyses, per challenge kind (pocketsphinx
    #: ``frate``; the acoustic model was trained at 100). Below 100 a slow reader's drawn-out
    #: words fit the model's phone durations better; chosen per kind on the benchmark's
    #: calibration part, and the calibration records them.
    frame_rates: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_FRAME_RATES))
    #: Gaussians of each codebook that a senone's score is computed from, the best ones in
    #: each frame (pocketsphinx ``topn``; its default is 4); the calibration records it.
    top_gaussians: int = 4
    #: weight of the (negative part of the) silence ratio in the score, for every kind;
    #: ``None``: the weights the calibration chose per kind (1.0 with an explicit threshold).
    silence_weight: float | None = None
    #: search beams of both passes (the same value for every beam: pocketsphinx 5.1.1
    #: breaks word alignments when the word beam differs from the state beam). Wide enough
    #: that nothing is pruned: with 1e-48 the aligner lost the right path of slow readers
    #: and pushed their last words into "silence"; every senone is scored in every frame
    #: anyway, so the wide beam costs nothing measurable.
    beam: float = 1e-300
    #: decide a recording from its alignment alone where the calibration's screen for its
    #: kind is clear (:class:`Screen`), and decode the phone-loop background only for the
    #: rest; ``False``: always both passes.
    screen: bool = True
    #: the challenge kinds whose expected words are aligned with the pronunciations
    #: non-native speakers often use as well as the dictionary's
    #: (:func:`pronunciation_variants`); the calibration records them. Chosen on the
    #: benchmark's calibration part: they help read sentences, and cost digit strings.
    variant_kinds: tuple[str, ...] = ("phrase",)
    min_seconds: float = 0.3
    max_seconds: float = 30.0
    #: a recording whose 95th-percentile 30 ms level stays below this is silence.
    min_level_dbfs: float = -50.0
    #: longest phrase accepted in a phrase list, in words.
    max_phrase_words: int = 24
    #: what checks each challenge kind (:data:`RECOGNISERS`): ``"pocketsphinx"`` aligns the
    #: expected words and scores them against its phone loop; ``"whisper"`` scores how likely
    #: Whisper base finds the expected words (:mod:`engine.reader`). Chosen per kind on the
    #: benchmark: Whisper for read sentences, pocketsphinx for digit strings; the
    #: calibration records them.
    recognisers: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_RECOGNISERS))
    #: where ``whisper.json`` (the Whisper model's manifest) is read from.
    reader_models_dir: Path = DEFAULT_MODELS_DIR
    #: the reader's cohort: recordings of other sentences and their manifest
    #: (:func:`engine.reader.load_cohort`).
    reader_cohort_dir: Path = DEFAULT_COHORT_DIR
    #: the challenge kinds whose Whisper score is relative to the reader's cohort: each
    #: word's log-probability, and the sentence's end's after them, less its mean over
    #: recordings of other sentences (:meth:`engine.reader.Reader.relative`). Chosen on
    #: the benchmark's calibration part: it lifts slow readers' sentences, and the end
    #: keeps a shorter phrase from matching the start of a longer recording. A phrase's
    #: cohort passes run on its first check in each challenge worker and are kept, where
    #: every digit string would need its own.
    #: The calibration records them.
    cohort_kinds: tuple[str, ...] = ("phrase",)

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


@dataclass(frozen=True, slots=True)
class ChallengeCalibration:
    """The operating points in ``models/challenge.json`` (and what they were measured on).

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
    #: (:meth:`ScoreParts.score`); a kind or word without one: none
    word_offsets: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Screen:
    """The first stage of a check, on the alignment pass alone: its score (the same word
    and silence ratios as the challenge score, against no background) at or above
    ``accept`` passes and below ``reject`` fails, both without the phone loop; in between,
    the phone loop is decoded and the challenge score decides. Calibrated per kind on the
    benchmark's calibration part: ``accept`` above every wrong phrase there, ``reject``
    below every genuine recording there that the check passes."""

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


def load_calibration(path: Path) -> ChallengeCalibration:
    """Read the calibrated operating point; :class:`ModelMissing` if the file is absent."""
    path = Path(path)
    if not path.is_file():
        raise ModelMissing(f"challenge calibration {path.name} not found; run `netid bench challenge --write-calibration`")
    try:
        doc = json.loads(path.read_text())
        threshold = float(doc["threshold"])
        target = float(doc["target_wrong_phrase_acceptance"])
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
        variant_kinds = frozenset(str(k) for k in variant_kinds)
        screens = {
            str(k): Screen(silence_weight=float(v["silence_weight"]), accept=float(v["accept"]), reject=float(v["reject"]))
            for k, v in dict(doc.get("screens", {})).items()
        }
        offsets = {str(k): {str(w): float(x) for w, x in dict(v).items()} for k, v in dict(doc.get("word_offsets", {})).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"challenge calibration {path.name} is malformed") from exc
    if not all(math.isfinite(t) for t in (threshold, *per_kind.values())):
        raise ModelError(f"challenge calibration {path.name} has a threshold that is not a number")
    if not all(0.0 <= w <= 100.0 for w in weights.values()):
        raise ModelError(f"challenge calibration {path.name} has a silence weight outside 0..100")
    if not all(math.isfinite(x) and abs(x) <= 1000.0 for v in offsets.values() for x in v.values()):
        raise ModelError(f"challenge calibration {path.name} has a word offset that is not a number in -1000..1000")
    if any(k not in KINDS for k in (*per_kind, *weights, *variant_kinds, *screens, *offsets)):
        raise ModelError(f"challenge calibration {path.name} names an unknown challenge kind")
    if any(k not in weights for k in per_kind):
        raise ModelError(f"challenge calibration {path.name} has a threshold without its silence weight")
    if any(k not in per_kind for k in screens):
        raise ModelError(f"challenge calibration {path.name} has a screen for a kind without its own threshold")
    if offsets and any(k not in per_kind for k in KINDS):
        # a kind without its own threshold is scored like another kind: not with its words'
        # offsets, nor with offsets of its own the threshold was not measured with
        raise ModelError(f"challenge calibration {path.name} has word offsets but not a threshold for every kind")
    missing = [k for k in KINDS if k not in weights]
    if missing:
        if not per_kind:
            raise ModelError(f"challenge calibration {path.name} gives no silence weight for " + ", ".join(missing))
        # a kind without its own calibration is checked against the highest threshold: score
        # it as the kind that threshold was measured on
        strictest = max(per_kind, key=lambda k: per_kind[k])
        weights.update({k: weights[strictest] for k in missing})
    return ChallengeCalibration(threshold=threshold, target_wrong_phrase_acceptance=target, thresholds=per_kind,
                                silence_weights=weights, info=doc, variants_version=version, variant_kinds=variant_kinds,
                                screens=screens, word_offsets=offsets)


# --------------------------------------------------------------------------- challenges


def new_challenge(*, kind: str = "digits", length: int = 6, phrases: Sequence[str] = ()) -> str:
    """A fresh random challenge: ``length`` digits (``"409172"``) or one of ``phrases``."""
    if kind == "digits":
        if not _MIN_DIGITS <= length <= _MAX_DIGITS:
            raise ConfigError(f"digit challenge length must be {_MIN_DIGITS}..{_MAX_DIGITS}")
        return "".join(secrets.choice("0123456789") for _ in range(length))
    if kind == "phrase":
        if not phrases:
            raise ConfigError("a phrase challenge needs a non-empty phrase list")
        return secrets.choice(list(phrases))
    raise ConfigError("challenge kind must be 'digits' or 'phrase'")


def _is_digit_challenge(challenge: str) -> bool:
    compact = "".join(challenge.split())
    return bool(compact) and compact.isascii() and compact.isdigit()


def challenge_kind(challenge: str) -> str:
    """``"digits"`` for a digit string (spaces allowed), else ``"phrase"``."""
    return "digits" if _is_digit_challenge(challenge) else "phrase"


def challenge_words(challenge: str) -> list[str]:
    """The words a challenge is said as: ``"409172"`` -> ``["four", "zero", "nine", ...]``;
    a phrase -> its lower-case words (letters and apostrophes). Digits inside a phrase, or a
    challenge without words, are a :class:`ConfigError` (spell numbers out in phrases)."""
    if _is_digit_challenge(challenge):
        return [DIGIT_WORDS[int(c)] for c in challenge if not c.isspace()]
    text = challenge.lower()
    if any(c.isdigit() for c in text):
        raise ConfigError("a phrase challenge must spell numbers out")
    words = _WORD_RE.findall(text)
    words = [w.strip("'") for w in words if w.strip("'")]
    if not words:
        raise ConfigError("a challenge must contain at least one word")
    return words


@lru_cache(maxsize=4)
def _dictionary_words(path: Path) -> frozenset[str]:
    """Every word of a pocketsphinx dictionary (alternative pronunciations folded)."""
    if not path.is_file():
        raise ModelMissing(f"pronunciation dictionary {path.name} not found")
    words = set()
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            head = line.split(maxsplit=1)
            if head:
                words.add(head[0].split("(", 1)[0])
    return frozenset(words)


def _unknown_words(words: Iterable[str], config: ChallengeConfig) -> list[str]:
    known = _dictionary_words(config.dictionary)
    return sorted({w for w in words if w not in known})


def load_phrases(phrases: Iterable[str], *, config: ChallengeConfig = ChallengeConfig()) -> tuple[str, ...]:
    """Check an operator's phrase list once, when it is loaded.

    Blank lines are dropped, whitespace is collapsed and duplicates removed (first kept).
    A phrase with digits, with more than ``max_phrase_words`` words, or, when pocketsphinx
    checks phrases, with a word its pronunciation dictionary does not hold, is a
    :class:`ConfigError` that names it (Whisper reads any word).
    """
    out: list[str] = []
    seen: set[str] = set()
    unknown: set[str] = set()
    for raw in phrases:
        phrase = " ".join(raw.split())
        if not phrase:
            continue
        if _is_digit_challenge(phrase):
            raise ConfigError(f"phrase {phrase!r} is a digit string; use the digits challenge")
        words = challenge_words(phrase)
        if len(words) > config.max_phrase_words:
            raise ConfigError(f"phrase {phrase!r} has more than {config.max_phrase_words} words")
        if config.recognisers["phrase"] == "pocketsphinx":
            unknown.update(_unknown_words(words, config))
        key = " ".join(words)
        if key not in seen:
            seen.add(key)
            out.append(phrase)
    if unknown:
        raise ConfigError("words not in the pronunciation dictionary: " + ", ".join(sorted(unknown)))
    if not out:
        raise ConfigError("the phrase list is empty")
    return tuple(out)


# --------------------------------------------------------------------------- the checker


class ScoreParts(NamedTuple):
    """The two measurements a challenge score combines, in score units per frame."""

    #: mean over the expected words of each word's log-likelihood ratio per frame
    words: float
    #: the same ratio over all the silences the aligner inserted, together (0.0: none)
    silence: float
    #: ``words`` and ``silence`` of the alignment alone, against no background: what the
    #: :class:`Screen` decides on
    aligned_words: float = math.nan
    aligned_silence: float = 0.0
    #: each expected word (as the dictionary spells it, without ``(2)``) and its ratio, in
    #: the order said: what :attr:`ChallengeCalibration.word_offsets` apply to
    word_ratios: tuple[tuple[str, float], ...] = ()

    def score(self, silence_weight: float, word_offsets: Mapping[str, float] | None = None) -> float:
        """The challenge score: ``words + silence_weight * min(0, silence)``; with
        ``word_offsets``, ``words`` is the mean of each word's ratio minus its offset (a
        word without one: 0)."""
        words = self.words
        if word_offsets and self.word_ratios:
            words = float(np.mean([ratio - word_offsets.get(word, 0.0) for word, ratio in self.word_ratios]))
        return float(words + silence_weight * min(0.0, self.silence))

    def screen_score(self, silence_weight: float) -> float:
        """The score of the alignment alone, as :meth:`score` of ``aligned_words`` and
        ``aligned_silence``: what :meth:`Screen.decide` takes."""
        return ScoreParts(self.aligned_words, self.aligned_silence).score(silence_weight)


class Verdict(NamedTuple):
    """The outcome of one check (:meth:`ChallengeChecker.check_batch`)."""

    passed: bool
    #: the score it was decided on: the challenge score, or the screen's score
    score: float
    #: ``"screen"``: decided on the alignment alone; ``"background"``: against the phone loop
    #: too; ``"read"``: by Whisper's reading of the expected words
    stage: Literal["screen", "background", "read"]


def _is_filler(name: str) -> bool:
    """Silence and noise entries of an alignment (``<sil>``, ``<s>``, ``[NOISE]``, ``+SPN+``)."""
    return name[:1] in ("<", "[", "+")


class _Decoder:
    """One pocketsphinx decoder with the phone loop added, analysing ``frame_rate`` frames
    per second; used by one thread only. With ``variants``, it aligns words with their
    :func:`pronunciation_variants` too (added to its own dictionary as they come)."""

    def __init__(self, config: ChallengeConfig, *, frame_rate: int, variants: bool = False) -> None:
        beam = config.beam
        try:
            self.ps = pocketsphinx.Decoder(
                hmm=str(config.acoustic_model),
                dict=str(config.dictionary),
                lm=None,
                samprate=SAMPLE_RATE,
                loglevel="FATAL",
                bestpath=False,
                compallsen=True,
                ds=config.frame_step,
                frate=frame_rate,
                topn=config.top_gaussians,
                beam=beam,
                wbeam=beam,
                pbeam=beam,
                lpbeam=beam,
                lponlybeam=beam,
            )
            self.ps.add_allphone_file(_PHONE_LOOP, None)
        except (RuntimeError, ValueError) as exc:
            raise ModelError("the pocketsphinx model could not be loaded") from exc
        self.log_base = math.log(float(self.ps.config["logbase"]))
        self.variants = variants
        self._extended: set[str] = set()  # words whose variants are in the dictionary

    def _extend(self, words: Iterable[str]) -> None:
        """Add the :func:`pronunciation_variants` of each word not extended yet, as further
        alternative pronunciations (``word(3)``, ...) that the alignment may choose."""
        for word in words:
            if word in self._extended:
                continue
            have: list[tuple[str, ...]] = []  # the dictionary's: word, word(2), ...
            name = word
            while (phones := self.ps.lookup_word(name)) is not None:
                have.append(tuple(phones.split()))
                name = f"{word}({len(have) + 1})"
            k = len(have)
            for variant in pronunciation_variants(have[0]) if have else []:
                if variant not in have:
                    k += 1
                    self.ps.add_word(f"{word}({k})", " ".join(variant), True)
            self._extended.add(word)

    def _decode(self, pcm: bytes) -> None:
        # a fresh front end for every pass: its noise tracker would otherwise carry over
        # from the previous recording, and a score would depend on what was decoded before
        self.ps.reinit_feat()
        self.ps.start_utt()
        self.ps.process_raw(pcm, full_utt=True)
        self.ps.end_utt()

    def _segments(self) -> list[tuple[str, int, int, float]]:
        """The last decode's words and fillers as (name, first frame, frames, acoustic score)."""
        out = []
        for seg in self.ps.seg():
            start, dur = seg.start_frame, seg.end_frame + 1 - seg.start_frame
            if seg.word == _NULL or dur <= 0:
                continue
            # the binding returns base**score: take it back to decoder units
            score = math.log(seg.ascore) / self.log_base if seg.ascore > 0.0 else FAILURE_SCORE * dur
            out.append((seg.word, start, dur, score))
        return out

    def phone_loop(self, pcm: bytes) -> np.ndarray:
        """Per-frame scores of the best free phone sequence (each segment spread evenly)."""
        self.ps.activate_search(_PHONE_LOOP)
        self._decode(pcm)
        n_frames = self.ps.n_frames()
        frames = np.zeros(n_frames, dtype=np.float64)
        for _, start, dur, score in self._segments():
            frames[start : min(start + dur, n_frames)] = score / dur
        return frames

    def align(self, pcm: bytes, words: list[str]) -> list[tuple[str, int, int, float]] | None:
        """The alignment of ``words`` to ``pcm`` as :meth:`_segments`; ``None`` if they
        cannot be aligned to the recording at all."""
        if self.variants:
            self._extend(words)
        self.ps.set_align_text(" ".join(words))
        self._decode(pcm)
        if self.ps.hyp() is None:
            return None
        return self._segments() or None


def _ratios(entries: Sequence[tuple[str, int, int, float]], background: np.ndarray | None) -> ScoreParts | None:
    """The mean word ratio and the silence ratio of an alignment (:meth:`_Decoder.align`)
    against a phone-loop background of the same recording (:meth:`_Decoder.phone_loop`),
    or against none (``None``); ``None`` if it holds no word."""
    word_ratios: list[tuple[str, float]] = []
    sil_sum, sil_frames = 0.0, 0
    for name, start, dur, score in entries:
        ratio_sum = score - (0.0 if background is None else float(background[start : start + dur].sum()))
        if _is_filler(name):
            sil_sum += ratio_sum
            sil_frames += dur
        else:
            # "six(2)": the second pronunciation of "six"
            word_ratios.append((name.split("(", 1)[0], ratio_sum / dur))
    if not word_ratios:
        return None
    return ScoreParts(words=float(np.mean([r for _, r in word_ratios])), silence=sil_sum / sil_frames if sil_frames else 0.0,
                      word_ratios=tuple(word_ratios))


def _score_parts(entries: Sequence[tuple[str, int, int, float]], background: np.ndarray) -> ScoreParts | None:
    """The score parts of an alignment against the phone-loop background of the same
    recording, and against none."""
    full, alone = _ratios(entries, background), _ratios(entries, None)
    if full is None or alone is None:
        return None
    return full._replace(aligned_words=alone.words, aligned_silence=alone.silence)


def _read_parts(word_logprobs: Sequence[tuple[str, float]] | None) -> ScoreParts | None:
    """The score parts of Whisper's reading (:meth:`engine.reader.Reader.word_logprobs`):
    ``words`` the mean log-probability per expected word (the sentence's end, where read,
    counted as one), and no silence."""
    if not word_logprobs:
        return None
    mean = float(np.mean([lp for _, lp in word_logprobs]))
    return ScoreParts(words=mean, silence=0.0, aligned_words=mean, word_ratios=tuple(word_logprobs))


class Pass(NamedTuple):
    """One decoding pass over a recording: ``"loop"`` (the phone-loop background) or
    ``"align"`` (the expected ``words``), or ``"read"`` (Whisper's reading of the expected
    ``words``; the whole check of a kind Whisper checks). The two pocketsphinx passes of a
    check are independent, so they can run at the same time on two cores
    (:meth:`ChallengeChecker.run_passes`)."""

    kind: Literal["loop", "align", "read"]
    pcm: bytes
    #: frames per second (:attr:`ChallengeConfig.frame_rates`); both passes of a check use
    #: the same, so that their scores can be subtracted frame by frame
    frame_rate: int
    words: tuple[str, ...] = ()
    #: align with the words' pronunciation variants too
    variants: bool = False
    #: a reading taken relative to the reader's cohort (:attr:`ChallengeConfig.cohort_kinds`)
    relative: bool = False


class ChallengeChecker:
    """Scores recordings against their expected challenge; see the module docstring.

    ``threshold=None`` loads the calibrated operating points from
    ``config.calibration_path`` (:class:`ModelMissing` if it is absent): one threshold
    for any challenge, and where calibrated, one per challenge kind. An explicit
    ``threshold`` is used for every kind.
    """

    def __init__(self, *, config: ChallengeConfig = ChallengeConfig(), threshold: float | None = None) -> None:
        self.config = config
        for path in (config.acoustic_model, config.dictionary):
            if not Path(path).exists():
                raise ModelMissing(f"pocketsphinx model file {Path(path).name} not found")
        if "whisper" in config.recognisers.values():
            from .reader import check_installed

            check_installed(config.reader_models_dir)  # here, not first in a worker process
        #: the sha256 of the reader cohort's manifest, where a kind is scored relative to it
        self.cohort_digest: str | None = None
        if config.relative_kinds:
            from .reader import check_cohort

            self.cohort_digest = check_cohort(config.reader_cohort_dir)
        per_kind: dict[str, float] = {}
        if threshold is None:
            self.calibration: ChallengeCalibration | None = load_calibration(config.calibration_path)
            measured = self.calibration.info
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
            if relative != list(config.relative_kinds) or (relative and measured.get("reader_cohort") != self.cohort_digest):
                wanted = ", ".join(config.relative_kinds) or "no kind"
                raise ModelError(f"challenge calibration {name} was not measured with {wanted} relative to this reader cohort")
            if relative and not measured.get("relative_end", False):
                raise ModelError(f"challenge calibration {name} was not measured with the sentence's end scored "
                                 "after the words (relative_end)")
            cal = self.calibration
            if cal.variant_kinds != set(config.variant_kinds) or (cal.variant_kinds and cal.variants_version != VARIANTS_VERSION):
                wanted = ", ".join(config.variant_kinds) or "none"
                raise ModelError(f"challenge calibration {name} was not measured with pronunciation variants for {wanted}")
            weights = dict(self.calibration.silence_weights)
            if config.silence_weight is not None and any(w != config.silence_weight for w in weights.values()):
                measured_with = ", ".join(f"{k} {w:g}" for k, w in weights.items())
                raise ModelError(f"challenge calibration {name} was measured with silence_weight {measured_with}")
            threshold = self.calibration.threshold
            per_kind = dict(self.calibration.thresholds)
            screens = dict(self.calibration.screens) if config.screen and config.silence_weight is None else {}
        else:
            self.calibration = None
            weights = {kind: 1.0 if config.silence_weight is None else config.silence_weight for kind in KINDS}
            screens = {}
        #: per challenge kind, the first stage of :meth:`check_batch` (none: both passes always)
        self.screens: dict[str, Screen] = screens
        #: per challenge kind, the offset of each word's ratio in the score (none: no offsets)
        self.word_offsets: dict[str, dict[str, float]] = dict(self.calibration.word_offsets) if self.calibration else {}
        #: the weight of the silence ratio in the score, per challenge kind
        self.silence_weights = weights
        if not math.isfinite(threshold):
            raise ConfigError("the challenge threshold must be a finite number")
        self.threshold = float(threshold)
        #: threshold per challenge kind; a kind without its own calibration uses ``threshold``
        self.thresholds = {kind: per_kind.get(kind, self.threshold) for kind in KINDS}
        self._local = threading.local()
        self._reader_lock = threading.Lock()
        self._reader_model: Any = None

    def load_decoder(self, kind: str) -> None:
        """Load what checks challenges of ``kind`` now rather than on the first recording:
        Whisper (with the cohort encoded, for a kind relative to it), or this thread's
        pocketsphinx decoder without variants at the kind's frame rate, which its phone loop
        (and a digit string's alignment) uses. Any other decoder (~28 MB and 0.17 s each)
        loads with the first challenge that needs it."""
        if self.config.recognisers[kind] == "whisper":
            reader = self._reader()
            if kind in self.config.relative_kinds:
                reader.encode_cohort()
        else:
            self._decoder(False, self.config.frame_rates[kind])

    def prepare(self, challenge: str) -> bool:
        """Run now what checking ``challenge`` needs once whatever the recording: for a
        kind scored relative to the reader's cohort, the phrase's cohort passes (the reader
        keeps their result). Whether there was anything to run."""
        if challenge_kind(challenge) not in self.config.relative_kinds:
            return False
        reader, words = self._reader(), self._read_words(challenge, challenge_words(challenge))
        if reader.knows(words):
            return False
        reader.prior(words)
        return True

    def _reads(self, challenge: str) -> bool:
        """Whether Whisper checks ``challenge`` (its kind's recogniser)."""
        return self.config.recognisers[challenge_kind(challenge)] == "whisper"

    def _reader(self) -> Any:
        """This process's Whisper model (:class:`engine.reader.Reader`), loaded once and
        shared by its threads."""
        with self._reader_lock:
            if self._reader_model is None:
                from .reader import Reader

                self._reader_model = Reader(self.config.reader_models_dir, cohort_dir=self.config.reader_cohort_dir,
                                            cohort_digest=self.cohort_digest)
            return self._reader_model

    def _frame_rate(self, challenge: str) -> int:
        """The frames per second ``challenge`` is decoded at: its kind's."""
        return self.config.frame_rates[challenge_kind(challenge)]

    def _pass(self, kind: Literal["loop", "align"], pcm: bytes, challenge: str, words: Sequence[str] = ()) -> Pass:
        """A decoding pass of a recording checked against ``challenge``, with its kind's
        frame rate (and, for an alignment, its kind's pronunciation variants)."""
        variants = kind == "align" and challenge_kind(challenge) in self.config.variant_kinds
        return Pass(kind, pcm, self._frame_rate(challenge), tuple(words), variants)

    def _read_words(self, challenge: str, words: Sequence[str]) -> tuple[str, ...]:
        """What Whisper reads for ``challenge``: its words, and for a kind relative to the
        cohort the sentence's end after them (:data:`engine.reader.END`)."""
        if challenge_kind(challenge) in self.config.relative_kinds:
            return (*words, READ_END)
        return tuple(words)

    def _read_pass(self, pcm: bytes, challenge: str, words: Sequence[str]) -> Pass:
        """Whisper's reading of a recording against ``challenge``, relative to the cohort
        if its kind is (with the sentence's end scored too)."""
        return Pass("read", pcm, 0, self._read_words(challenge, words),
                    relative=challenge_kind(challenge) in self.config.relative_kinds)

    def _decoder(self, variants: bool, frame_rate: int) -> _Decoder:
        """This thread's decoder with or without pronunciation variants, at ``frame_rate``
        (one decoder each, so that words extended for one kind of challenge stay as they
        are for the other)."""
        decoders = self._local.__dict__.setdefault("decoders", {})
        dec = decoders.get((variants, frame_rate))
        if dec is None:
            dec = decoders[(variants, frame_rate)] = _Decoder(self.config, variants=variants, frame_rate=frame_rate)
        return dec

    def _score(self, parts: ScoreParts, challenge: str) -> float:
        """The challenge score of ``parts`` as calibrated for ``challenge``'s kind."""
        kind = challenge_kind(challenge)
        return parts.score(self.silence_weights[kind], self.word_offsets.get(kind))

    def _pcm(self, audio: Any) -> bytes:
        """Check one recording and turn it into 16-bit PCM; raises the SampleError."""
        wav = np.asarray(audio)
        if wav.ndim != 1 or wav.dtype.kind != "f":
            raise UndecodableSample("expected mono float audio")
        seconds = wav.size / SAMPLE_RATE
        if seconds > self.config.max_seconds:
            raise SampleTooLarge(f"recording longer than {self.config.max_seconds:g} s")
        if seconds < self.config.min_seconds:
            raise TooLittleSpeech(f"recording shorter than {self.config.min_seconds:g} s")
        wav = wav.astype(np.float32, copy=False)
        if not np.all(np.isfinite(wav)):
            raise UndecodableSample("audio holds non-finite samples")
        usable = wav[: wav.size - wav.size % _LEVEL_WINDOW].reshape(-1, _LEVEL_WINDOW)
        rms = np.sqrt(np.mean(np.square(usable, dtype=np.float64), axis=1))
        level = 20.0 * math.log10(float(np.percentile(rms, 95)) + 1e-12)
        if level < self.config.min_level_dbfs:
            raise NoSpeech("no speech found in the recording")
        return to_pcm16(wav)

    def score_batch(
        self, items: Sequence[tuple[np.ndarray, str]], *, run_passes: Callable[[list[Pass]], list[Any]] | None = None
    ) -> list[float | SampleError]:
        """One score per (float32 mono 16 kHz audio, expected challenge), in order.

        A recording that cannot be used gives its :class:`SampleError` in its place; one
        the expected words cannot be aligned to scores :data:`FAILURE_SCORE`. An expected
        challenge with words outside the dictionary is a :class:`ConfigError` for the whole
        batch (phrase lists are checked by :func:`load_phrases` when loaded).
        """
        out: list[float | SampleError] = []
        for (_, challenge), parts in zip(items, self.parts_batch(items, run_passes=run_passes)):
            if isinstance(parts, SampleError):
                out.append(parts)
            elif parts is None:
                out.append(FAILURE_SCORE)
            else:
                out.append(self._score(parts, challenge))
        return out

    def check_batch(
        self, items: Sequence[tuple[np.ndarray, str]], *, run_passes: Callable[[list[Pass]], list[Any]] | None = None
    ) -> list[Verdict | SampleError]:
        """Check each (float32 mono 16 kHz audio, expected challenge): a :class:`Verdict`,
        or the recording's :class:`SampleError`.

        First every recording is aligned to its expected words; for a kind with a
        :class:`Screen` (from the calibration), a clear screen score decides at once, and
        only the others are decoded through the phone loop and decided by the challenge
        score against their kind's threshold. A kind without a screen decodes both passes
        side by side from the start. Passes run through ``run_passes`` as in
        :meth:`parts_batch`. Unknown words are a :class:`ConfigError`, as there.
        """
        run = run_passes or self.run_passes
        expected = self._expected(items)
        pcms = self._pcms(items)
        out: list[Verdict | SampleError | None] = [None] * len(items)
        alignments: dict[int, Any] = {}  # item -> its alignment
        # (id(audio), frame rate) -> the recording's phone-loop background at that rate
        backgrounds: dict[tuple[int, int], Any] = {}
        readings: dict[int, Any] = {}  # item -> Whisper's word log-probabilities
        pending: list[int] = []

        def loop_key(i: int) -> tuple[int, int]:
            return id(items[i][0]), self._frame_rate(items[i][1])

        def stage(want_align: Sequence[int], want_loop: Sequence[int], want_read: Sequence[int] = ()) -> None:
            passes = [self._pass("align", pcms[id(items[i][0])], items[i][1], expected[i])  # type: ignore[arg-type]
                      for i in want_align]
            passes += [self._read_pass(pcms[id(items[i][0])], items[i][1], expected[i]) for i in want_read]  # type: ignore[arg-type]
            loops: dict[tuple[int, int], int] = {}  # each background wanted, and an item that wants it
            for i in want_loop:
                if loop_key(i) not in backgrounds:
                    loops.setdefault(loop_key(i), i)
            passes += [self._pass("loop", pcms[id(items[i][0])], items[i][1]) for i in loops.values()]  # type: ignore[arg-type]
            done = run(passes) if passes else []
            alignments.update(zip(want_align, done))
            readings.update(zip(want_read, done[len(want_align):]))
            backgrounds.update(zip(loops, done[len(want_align) + len(want_read):]))

        usable: list[int] = []
        for i, (audio, _) in enumerate(items):
            if isinstance(pcm := pcms[id(audio)], SampleError):
                out[i] = pcm
            else:
                usable.append(i)
        read = [i for i in usable if self._reads(items[i][1])]
        aligned = [i for i in usable if not self._reads(items[i][1])]
        stage(aligned, [i for i in aligned if challenge_kind(items[i][1]) not in self.screens], read)
        for i in read:
            parts = _read_parts(readings[i])
            score = FAILURE_SCORE if parts is None else self._score(parts, items[i][1])
            out[i] = Verdict(self.accept(score, items[i][1]), score, "read")
        for i in aligned:
            kind = challenge_kind(items[i][1])
            screen = self.screens.get(kind)
            alignment = alignments[i]
            if alignment is None:
                out[i] = Verdict(False, FAILURE_SCORE, "screen" if screen is not None else "background")
                continue
            if screen is not None:
                alone = _ratios(alignment, None)
                score = FAILURE_SCORE if alone is None else alone.score(screen.silence_weight)
                decided = screen.decide(score)
                if decided is not None:
                    out[i] = Verdict(decided, float(score), "screen")
                    continue
            pending.append(i)
        stage([], pending)
        for i in pending:
            background, challenge = backgrounds[loop_key(i)], items[i][1]
            parts = None if background is None else _ratios(alignments[i], background)
            score = FAILURE_SCORE if parts is None else self._score(parts, challenge)
            out[i] = Verdict(self.accept(score, challenge), score, "background")
        return out  # type: ignore[return-value]

    def _expected(self, items: Sequence[tuple[np.ndarray, str]]) -> list[list[str]]:
        expected = [challenge_words(challenge) for _, challenge in items]
        aligned = (words for (_, challenge), words in zip(items, expected) if not self._reads(challenge))
        unknown = _unknown_words((w for words in aligned for w in words), self.config)
        if unknown:
            raise ConfigError("words not in the pronunciation dictionary: " + ", ".join(unknown))
        return expected

    def _pcms(self, items: Sequence[tuple[np.ndarray, str]]) -> dict[int, bytes | SampleError]:
        """Each distinct recording (one may be checked against several challenges in a
        batch: the benchmark's wrong phrases) checked and turned into PCM once."""
        pcms: dict[int, bytes | SampleError] = {}
        for audio, _ in items:
            if id(audio) not in pcms:
                try:
                    pcms[id(audio)] = self._pcm(audio)
                except SampleError as exc:
                    pcms[id(audio)] = exc
        return pcms

    def parts_batch(
        self, items: Sequence[tuple[np.ndarray, str]], *, run_passes: Callable[[list[Pass]], list[Any]] | None = None
    ) -> list[ScoreParts | None | SampleError]:
        """Like :meth:`score_batch`, but the :class:`ScoreParts` of each score (``None``:
        not aligned), for a benchmark that weighs them itself.

        The decoding passes run through ``run_passes`` (default: :meth:`run_passes`, one
        after the other in this thread); a pool of worker processes passes its own, which
        runs them side by side.
        """
        expected = self._expected(items)
        pcms = self._pcms(items)
        passes: list[Pass] = []
        # one recording scored against several challenges (of one frame rate) is decoded
        # through the phone loop once
        loops: dict[tuple[int, int], tuple[bytes, int] | SampleError] = {}
        plan: list[tuple[int, int] | SampleError] = []  # per item: (its loop pass, or -1 for a reading; its align or read pass)
        for (audio, challenge), words in zip(items, expected):
            if self._reads(challenge):
                pcm = pcms[id(audio)]
                if isinstance(pcm, SampleError):
                    plan.append(pcm)
                else:
                    plan.append((-1, len(passes)))
                    passes.append(self._read_pass(pcm, challenge, words))
                continue
            key = id(audio), self._frame_rate(challenge)
            if key not in loops:
                pcm = pcms[id(audio)]
                if isinstance(pcm, SampleError):
                    loops[key] = pcm
                else:
                    loops[key] = (pcm, len(passes))
                    passes.append(self._pass("loop", pcm, challenge))
            loop = loops[key]
            if isinstance(loop, SampleError):
                plan.append(loop)
            else:
                plan.append((loop[1], len(passes)))
                passes.append(self._pass("align", loop[0], challenge, words))
        done = (run_passes or self.run_passes)(passes) if passes else []
        out: list[ScoreParts | None | SampleError] = []
        for step in plan:
            if isinstance(step, SampleError):
                out.append(step)
                continue
            if step[0] < 0:
                out.append(_read_parts(done[step[1]]))
                continue
            background, alignment = done[step[0]], done[step[1]]
            out.append(None if background is None or alignment is None else _score_parts(alignment, background))
        return out

    def run_passes(self, passes: Sequence[Pass]) -> list[Any]:
        """Run decoding passes in this thread, in order: a phone-loop background array, an
        alignment or a reading (``None``: not aligned, or refused) per pass."""
        out: list[Any] = []
        # consecutive readings of one recording (the benchmark's wrong phrases) encode it once
        for recording, group in itertools.groupby(passes, key=lambda p: id(p.pcm) if p.kind == "read" else None):
            if recording is None:
                out += [self._decode(p) for p in group]
            else:
                out += self._read_together(list(group))
        return out

    def _read_together(self, passes: list[Pass]) -> list[Any]:
        """Whisper's readings of one recording against each pass's words (``None`` each
        if CTranslate2 or the reader refused the recording)."""
        wav = from_pcm16(passes[0].pcm)
        reader = self._reader()
        try:
            readings = reader.read_many(wav, [list(p.words) for p in passes])
        except (RuntimeError, ValueError):
            return [None] * len(passes)
        try:  # the cohort's passes: a failure there is the model's, not this recording's
            return [reader.relative(r) if p.relative else r for p, r in zip(passes, readings)]
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"the reader's cohort passes failed: {exc}") from exc

    def _decode(self, p: Pass) -> Any:
        """One pocketsphinx pass: a phone-loop background array or an alignment (``None``:
        not aligned, or refused by the decoder)."""
        dec = self._decoder(p.variants, p.frame_rate)
        try:
            if p.kind == "loop":
                return dec.phone_loop(p.pcm)
            if p.kind == "align":
                return dec.align(p.pcm, list(p.words))
            raise ValueError(f"unknown decoding pass {p.kind!r}")
        except RuntimeError:
            # pocketsphinx refused this recording mid-way; its decoder state is not to
            # be trusted any more: start this thread afresh with a new one.
            self._local.decoders.pop((p.variants, p.frame_rate), None)
            return None

    def threshold_for(self, challenge: str) -> float:
        """The threshold calibrated for this challenge's kind (digits or phrase)."""
        return self.thresholds[challenge_kind(challenge)]

    def accept(self, score: float, challenge: str | None = None) -> bool:
        """Whether a challenge score clears the calibrated threshold (NaN never does).

        With the expected ``challenge``, its kind's own threshold is used; without it, the
        highest of the kinds' thresholds. Their scores are in different units (nats per
        word, relative to the reader's cohort for phrases, as read for digit strings; or
        pocketsphinx's ratios), so a check without its challenge is only meaningful with an
        explicit threshold.
        """
        threshold = self.threshold if challenge is None else self.threshold_for(challenge)
        return bool(score >= threshold)
