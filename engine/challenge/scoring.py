"""Challenge scores: what a decoding pass's output adds up to, and the verdict of a check.

:class:`ScoreParts` holds the measurements a score combines; :func:`ratios` and
:func:`score_parts` compute them from a pocketsphinx alignment and its phone-loop
background, :func:`read_parts` from Whisper's reading. :class:`Verdict` is one check's outcome.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np

__all__ = ["Alignment", "ScoreParts", "Verdict", "ratios", "read_parts", "score_parts"]

#: an alignment's words and fillers: (name, first frame, frames, acoustic score)
Alignment = Sequence[tuple[str, int, int, float]]


class ScoreParts(NamedTuple):
    """The measurements a challenge score combines: for pocketsphinx, log-likelihood ratios
    per frame against the phone loop, in score units; for Whisper, log-probabilities per
    expected word, in nats."""

    #: mean over the expected words of each word's ratio (or log-probability)
    words: float
    #: the same ratio over all the silences the aligner inserted, together (0.0: none)
    silence: float
    #: ``words`` and ``silence`` of the alignment alone, against no background: what the
    #: :class:`~engine.challenge.Screen` decides on
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


def ratios(entries: Alignment, background: np.ndarray | None) -> ScoreParts | None:
    """The mean word ratio and the silence ratio of an alignment against a phone-loop
    background of the same recording (one score per frame), or against none (``None``);
    ``None`` if it holds no word."""
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


def score_parts(entries: Alignment, background: np.ndarray) -> ScoreParts | None:
    """The score parts of an alignment against the phone-loop background of the same
    recording, and against none."""
    full, alone = ratios(entries, background), ratios(entries, None)
    if full is None or alone is None:
        return None
    return full._replace(aligned_words=alone.words, aligned_silence=alone.silence)


def read_parts(word_logprobs: Sequence[tuple[str, float]] | None) -> ScoreParts | None:
    """The score parts of Whisper's reading (:meth:`engine.challenge.reader.Reader.word_logprobs`):
    ``words`` the mean log-probability per expected word (the sentence's end, where read,
    counted as one), and no silence."""
    if not word_logprobs:
        return None
    mean = float(np.mean([lp for _, lp in word_logprobs]))
    return ScoreParts(words=mean, silence=0.0, aligned_words=mean, word_ratios=tuple(word_logprobs))
