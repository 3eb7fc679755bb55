"""The pocketsphinx passes of a challenge check: a word alignment and a free phone loop.

:class:`Decoder` wraps one ``pocketsphinx.Decoder`` (used by one thread only) with the
phone-loop search added. Its outputs are the inputs of :func:`engine.challenge.scoring.ratios`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pocketsphinx

from ..errors import ModelError
from engine.challenge.pronunciation import pronunciation_variants
from .config import FAILURE_SCORE, SAMPLE_RATE, ChallengeConfig
from .scoring import Alignment

__all__ = ["Decoder"]

_PHONE_LOOP = "challenge_phone_loop"
_NULL = "(NULL)"  # the grammar's empty transitions, one frame long, in an alignment


class Decoder:
    """One pocketsphinx decoder with the phone loop added, analysing ``frame_rate`` frames
    per second; used by one thread only. With ``variants``, it aligns words with their
    :func:`pronunciation_variants` too (added to its own dictionary as they come).

    Every senone is scored in every frame (``compallsen``), so that both passes share one
    per-frame normalisation and their scores can be subtracted."""

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

    def align(self, pcm: bytes, words: list[str]) -> Alignment | None:
        """The alignment of ``words`` to ``pcm`` as :meth:`_segments`; ``None`` if they
        cannot be aligned to the recording at all."""
        if self.variants:
            self._extend(words)
        self.ps.set_align_text(" ".join(words))
        self._decode(pcm)
        if self.ps.hyp() is None:
            return None
        return self._segments() or None
