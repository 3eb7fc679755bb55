"""Batch planning: which decoding passes a batch of checks needs, and whose result is whose.

A check is one or more :class:`Pass` es (Whisper's reading; or pocketsphinx's alignment and
phone-loop background). :class:`BatchPlan` checks each recording once, queues the passes a
stage of the check wants, has them run (in this thread or a pool of worker processes) and
files each result under the item, or the recording, it belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from engine.inference.audio import to_pcm16
from ..errors import ConfigError, NoSpeech, SampleError, SampleTooLarge, TooLittleSpeech, UndecodableSample
from engine.challenge.reader import END as READ_END
from .config import SAMPLE_RATE, ChallengeConfig
from .phrases import challenge_kind, challenge_words, unknown_words

__all__ = ["BatchPlan", "Pass", "RunPasses", "read_words", "recording_pcm"]

_LEVEL_WINDOW = 480  # 30 ms


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


#: what runs a list of passes and returns one result per pass, in order
RunPasses = Callable[[list[Pass]], list[Any]]


def read_words(config: ChallengeConfig, challenge: str, words: Sequence[str]) -> tuple[str, ...]:
    """What Whisper reads for ``challenge``: its words, and for a kind relative to the
    cohort the sentence's end after them (:data:`engine.challenge.reader.END`)."""
    if challenge_kind(challenge) in config.relative_kinds:
        return (*words, READ_END)
    return tuple(words)


def recording_pcm(config: ChallengeConfig, audio: Any) -> bytes:
    """Check one recording (float32 mono 16 kHz) and turn it into 16-bit PCM; raises its
    :class:`SampleError`: too long, too short, not finite, or silence."""
    wav = np.asarray(audio)
    if wav.ndim != 1 or wav.dtype.kind != "f":
        raise UndecodableSample("expected mono float audio")
    seconds = wav.size / SAMPLE_RATE
    if seconds > config.max_seconds:
        raise SampleTooLarge(f"recording longer than {config.max_seconds:g} s")
    if seconds < config.min_seconds:
        raise TooLittleSpeech(f"recording shorter than {config.min_seconds:g} s")
    wav = wav.astype(np.float32, copy=False)
    if not np.all(np.isfinite(wav)):
        raise UndecodableSample("audio holds non-finite samples")
    usable = wav[: wav.size - wav.size % _LEVEL_WINDOW].reshape(-1, _LEVEL_WINDOW)
    rms = np.sqrt(np.mean(np.square(usable, dtype=np.float64), axis=1))
    level = 20.0 * math.log10(float(np.percentile(rms, 95)) + 1e-12)
    if level < config.min_level_dbfs:
        raise NoSpeech("no speech found in the recording")
    return to_pcm16(wav)


class BatchPlan:
    """The passes for a batch of (audio, expected challenge) items, queued stage by stage.

    Each distinct recording is checked and turned into PCM once (one may be checked against
    several challenges in a batch: the benchmark's wrong phrases), and decoded through the
    phone loop once per frame rate, however many of its checks want it. Passes run in the
    order they were queued. Unknown words in a challenge pocketsphinx checks are a
    :class:`ConfigError` for the whole batch (phrase lists are checked when loaded).
    """

    def __init__(self, config: ChallengeConfig, items: Sequence[tuple[Any, str]]) -> None:
        self.config = config
        self.items = items
        self.words = [challenge_words(challenge) for _, challenge in items]
        aligned = (w for (_, challenge), words in zip(items, self.words) if not self.reads_challenge(challenge) for w in words)
        unknown = unknown_words(aligned, config)
        if unknown:
            raise ConfigError("words not in the pronunciation dictionary: " + ", ".join(unknown))
        self._pcms: dict[int, bytes | SampleError] = {}
        for audio, _ in items:
            if id(audio) not in self._pcms:
                try:
                    self._pcms[id(audio)] = recording_pcm(config, audio)
                except SampleError as exc:
                    self._pcms[id(audio)] = exc
        #: item -> its alignment (``None``: not aligned)
        self.alignments: dict[int, Any] = {}
        #: item -> Whisper's word log-probabilities (``None``: refused)
        self.readings: dict[int, Any] = {}
        # (id(audio), frame rate) -> the recording's phone-loop background at that rate
        self._backgrounds: dict[tuple[int, int], Any] = {}
        self._queue: list[tuple[dict, Any, Pass]] = []  # (where the result goes, its key, the pass)

    def reads_challenge(self, challenge: str) -> bool:
        """Whether Whisper checks ``challenge`` (its kind's recogniser)."""
        return self.config.recognisers[challenge_kind(challenge)] == "whisper"

    def reads(self, i: int) -> bool:
        return self.reads_challenge(self.items[i][1])

    def kind(self, i: int) -> str:
        return challenge_kind(self.items[i][1])

    def error(self, i: int) -> SampleError | None:
        """Item ``i``'s recording's :class:`SampleError`, if it cannot be used."""
        pcm = self._pcms[id(self.items[i][0])]
        return pcm if isinstance(pcm, SampleError) else None

    def usable(self) -> list[int]:
        return [i for i in range(len(self.items)) if self.error(i) is None]

    def _pcm(self, i: int) -> bytes:
        return self._pcms[id(self.items[i][0])]  # type: ignore[return-value]

    def _loop_key(self, i: int) -> tuple[int, int]:
        return id(self.items[i][0]), self.config.frame_rates[self.kind(i)]

    def align(self, i: int) -> None:
        """Queue the alignment of item ``i``'s expected words, with its kind's frame rate
        and pronunciation variants."""
        p = Pass("align", self._pcm(i), self.config.frame_rates[self.kind(i)], tuple(self.words[i]),
                 self.kind(i) in self.config.variant_kinds)
        self._queue.append((self.alignments, i, p))

    def read(self, i: int) -> None:
        """Queue Whisper's reading of item ``i``, relative to the cohort if its kind is
        (with the sentence's end scored too)."""
        challenge = self.items[i][1]
        p = Pass("read", self._pcm(i), 0, read_words(self.config, challenge, self.words[i]),
                 relative=self.kind(i) in self.config.relative_kinds)
        self._queue.append((self.readings, i, p))

    def loop(self, i: int) -> None:
        """Queue the phone-loop background item ``i`` needs, unless it is queued or done."""
        key = self._loop_key(i)
        if key in self._backgrounds or any(k == key for where, k, _ in self._queue if where is self._backgrounds):
            return
        p = Pass("loop", self._pcm(i), key[1])
        self._queue.append((self._backgrounds, key, p))

    def background(self, i: int) -> Any:
        """Item ``i``'s phone-loop background (``None``: refused by the decoder)."""
        return self._backgrounds[self._loop_key(i)]

    def run(self, run_passes: RunPasses) -> None:
        """Run the queued passes, in the order queued, and file their results."""
        queue, self._queue = self._queue, []
        done = run_passes([p for _, _, p in queue]) if queue else []
        for (where, key, _), result in zip(queue, done):
            where[key] = result
