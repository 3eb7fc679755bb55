"""The challenge checker: does a recording say the words its session asked for?

:class:`ChallengeChecker` scores batches of (recording, expected challenge) against the
calibrated thresholds: by Whisper's reading, or by pocketsphinx's alignment screened on
its own and, where unclear, against the phone loop. docs/challenge.md explains the check.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.inference.audio import from_pcm16
from ..errors import ConfigError, ModelError, ModelMissing, SampleError
from engine.challenge.reader import Reader, check_cohort, check_installed
from .calibration import ChallengeCalibration, Screen, check_measured_with, load_calibration
from .config import FAILURE_SCORE, KINDS, ChallengeConfig
from .decoder import Decoder
from .phrases import challenge_kind, challenge_words
from .plan import BatchPlan, Pass, RunPasses, read_words
from .scoring import ScoreParts, Verdict, ratios, read_parts, score_parts

__all__ = ["ChallengeChecker"]

_Item = tuple[np.ndarray, str]


class ChallengeChecker:
    """Scores recordings against their expected challenge.

    ``threshold=None`` loads the calibrated operating points from
    ``config.calibration_path`` (:class:`ModelMissing` if it is absent): one threshold
    for any challenge, and where calibrated, one per challenge kind. An explicit
    ``threshold`` is used for every kind.

    A process loads Whisper once and its threads share it; each thread gets its own
    pocketsphinx decoders (they are not thread-safe, and hold the GIL while they decode:
    parallel scoring needs processes, as the engine's challenge pool does).
    """

    def __init__(self, *, config: ChallengeConfig = ChallengeConfig(), threshold: float | None = None) -> None:
        self.config = config
        for path in (config.acoustic_model, config.dictionary):
            if not Path(path).exists():
                raise ModelMissing(f"pocketsphinx model file {Path(path).name} not found")
        if "whisper" in config.recognisers.values():
            check_installed(config.reader_models_dir)  # here, not first in a worker process
        #: the sha256 of the reader cohort's manifest, where a kind is scored relative to it
        self.cohort_digest: str | None = check_cohort(config.reader_cohort_dir) if config.relative_kinds else None
        per_kind: dict[str, float] = {}
        screens: dict[str, Screen] = {}
        self.calibration: ChallengeCalibration | None = None
        if threshold is None:
            cal = self.calibration = load_calibration(config.calibration_path)
            check_measured_with(cal, config, self.cohort_digest)
            weights = dict(cal.silence_weights)
            threshold, per_kind = cal.threshold, dict(cal.thresholds)
            if config.screen and config.silence_weight is None:
                screens = dict(cal.screens)
        else:
            weights = {kind: 1.0 if config.silence_weight is None else config.silence_weight for kind in KINDS}
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

    # ---- loading ----------------------------------------------------------------------------

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
        reader, words = self._reader(), read_words(self.config, challenge, challenge_words(challenge))
        if reader.knows(words):
            return False
        reader.prior(words)
        return True

    def _reader(self) -> Any:
        """This process's Whisper model (:class:`engine.challenge.reader.Reader`), loaded once and
        shared by its threads."""
        with self._reader_lock:
            if self._reader_model is None:
                self._reader_model = Reader(self.config.reader_models_dir, cohort_dir=self.config.reader_cohort_dir,
                                            cohort_digest=self.cohort_digest)
            return self._reader_model

    def _decoder(self, variants: bool, frame_rate: int) -> Decoder:
        """This thread's decoder with or without pronunciation variants, at ``frame_rate``
        (one decoder each, so that words extended for one kind of challenge stay as they
        are for the other)."""
        decoders = self._local.__dict__.setdefault("decoders", {})
        dec = decoders.get((variants, frame_rate))
        if dec is None:
            dec = decoders[(variants, frame_rate)] = Decoder(self.config, variants=variants, frame_rate=frame_rate)
        return dec

    # ---- checking a batch -------------------------------------------------------------------

    def _score(self, parts: ScoreParts, challenge: str) -> float:
        """The challenge score of ``parts`` as calibrated for ``challenge``'s kind."""
        kind = challenge_kind(challenge)
        return parts.score(self.silence_weights[kind], self.word_offsets.get(kind))

    def score_batch(self, items: Sequence[_Item], *, run_passes: RunPasses | None = None) -> list[float | SampleError]:
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

    def parts_batch(self, items: Sequence[_Item], *, run_passes: RunPasses | None = None) -> list[ScoreParts | None | SampleError]:
        """Like :meth:`score_batch`, but the :class:`ScoreParts` of each score (``None``:
        not aligned), for a benchmark that weighs them itself. Every pass runs in one go.

        The decoding passes run through ``run_passes`` (default: :meth:`run_passes`, one
        after the other in this thread); a pool of worker processes passes its own, which
        runs them side by side.
        """
        plan = BatchPlan(self.config, items)
        for i in plan.usable():
            if plan.reads(i):
                plan.read(i)
            else:
                plan.loop(i)
                plan.align(i)
        plan.run(run_passes or self.run_passes)
        out: list[ScoreParts | None | SampleError] = []
        for i in range(len(items)):
            if (error := plan.error(i)) is not None:
                out.append(error)
            elif plan.reads(i):
                out.append(read_parts(plan.readings[i]))
            else:
                background, alignment = plan.background(i), plan.alignments[i]
                out.append(None if background is None or alignment is None else score_parts(alignment, background))
        return out

    def check_batch(self, items: Sequence[_Item], *, run_passes: RunPasses | None = None) -> list[Verdict | SampleError]:
        """Check each (float32 mono 16 kHz audio, expected challenge): a :class:`Verdict`,
        or the recording's :class:`SampleError`.

        A kind Whisper checks is decided by its reading. A pocketsphinx kind is aligned
        first; with a :class:`Screen` (from the calibration), a clear screen score decides
        at once, and only the others are decoded through the phone loop and decided by the
        challenge score against their kind's threshold. A kind without a screen decodes
        both passes side by side from the start. Passes run through ``run_passes`` as in
        :meth:`parts_batch`. Unknown words are a :class:`ConfigError`, as there.
        """
        run = run_passes or self.run_passes
        plan = BatchPlan(self.config, items)
        out: list[Verdict | SampleError | None] = [plan.error(i) for i in range(len(items))]
        usable = plan.usable()
        read = [i for i in usable if plan.reads(i)]
        aligned = [i for i in usable if not plan.reads(i)]
        for i in aligned:
            plan.align(i)
        for i in read:
            plan.read(i)
        for i in aligned:
            if plan.kind(i) not in self.screens:
                plan.loop(i)
        plan.run(run)
        for i in read:
            parts = read_parts(plan.readings[i])
            score = FAILURE_SCORE if parts is None else self._score(parts, items[i][1])
            out[i] = Verdict(self.accept(score, items[i][1]), score, "read")
        pending: list[int] = []
        for i in aligned:
            out[i] = self._screened(plan.alignments[i], plan.kind(i))
            if out[i] is None:
                pending.append(i)
                plan.loop(i)
        plan.run(run)
        for i in pending:
            background, challenge = plan.background(i), items[i][1]
            parts = None if background is None else ratios(plan.alignments[i], background)
            score = FAILURE_SCORE if parts is None else self._score(parts, challenge)
            out[i] = Verdict(self.accept(score, challenge), score, "background")
        return out  # type: ignore[return-value]

    def _screened(self, alignment: Any, kind: str) -> Verdict | None:
        """The verdict on an alignment alone: a failure if there is none, else its kind's
        screen's decision where it is clear; ``None``: decide against the phone loop."""
        screen = self.screens.get(kind)
        if alignment is None:
            return Verdict(False, FAILURE_SCORE, "screen" if screen is not None else "background")
        if screen is None:
            return None
        alone = ratios(alignment, None)
        score = FAILURE_SCORE if alone is None else alone.score(screen.silence_weight)
        decided = screen.decide(score)
        return None if decided is None else Verdict(decided, float(score), "screen")

    # ---- running passes ---------------------------------------------------------------------

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

    # ---- deciding ---------------------------------------------------------------------------

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
