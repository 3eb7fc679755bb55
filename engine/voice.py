"""Speaker embedding with the GE2E d-vector encoder (``models/ge2e.onnx``).

For each recording of a batch: decode (:func:`engine.audio.decode_audio`), normalise
the volume and trim silences (:func:`engine.audio.trim_silence`), check that enough
speech is left, and cut the mel spectrogram into 1.6 s partials. The partials of the
whole batch go through the model together (``[P, 160, 40]``); a recording's
embedding is the L2-normalised mean of its partial embeddings, compared by cosine.

A bad recording never spoils a batch: :meth:`VoiceExtractor.embed_batch` returns, for
each input in order, either a float32 ``(256,)`` embedding or the
:class:`~engine.errors.SampleError` instance for that input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.audio import (
    N_MELS,
    PARTIAL_FRAMES,
    SAMPLE_RATE,
    decode_audio,
    frame_step,
    partial_mels,
    trim_silence,
)
from engine.errors import (
    ConfigError,
    ModelError,
    NoSpeech,
    SampleError,
    SampleTooLarge,
    TooLittleSpeech,
    UndecodableSample,
)
from engine.models import DEFAULT_MODELS_DIR, open_session

__all__ = ["VoiceConfig", "VoiceExtractor"]


@dataclass(frozen=True, kw_only=True)
class VoiceConfig:
    """Settings of the voice pipeline; validated when built."""

    #: Speech left after silence trimming below which a recording is refused
    #: (:class:`TooLittleSpeech`; none at all is :class:`NoSpeech`). The encoder is poor
    #: under about a second of speech.
    min_speech_seconds: float = 1.0
    #: Longest recording accepted, before trimming (:class:`SampleTooLarge`).
    max_seconds: float = 30.0
    #: Partials (1.6 s each) started per second of trimmed speech.
    rate: float = 1.3
    #: The last partial is kept if at least this fraction of it is real audio.
    min_coverage: float = 0.75
    #: Bound on the partials sent through the model in one run (memory: the LSTM holds
    #: about 0.65 MB per partial); larger batches are split into several runs.
    max_partials_per_run: int = 256

    def __post_init__(self) -> None:
        if not 0.0 < self.min_speech_seconds <= 10.0:
            raise ConfigError("min_speech_seconds must be in (0, 10]")
        if not 1.0 <= self.max_seconds <= 600.0:
            raise ConfigError("max_seconds must be in [1, 600]")
        if self.min_speech_seconds > self.max_seconds:
            raise ConfigError("min_speech_seconds must not exceed max_seconds")
        frame_step(self.rate)  # raises ConfigError if out of range
        if not 0.0 < self.min_coverage <= 1.0:
            raise ConfigError("min_coverage must be in (0, 1]")
        if self.max_partials_per_run < 1:
            raise ConfigError("max_partials_per_run must be positive")


class VoiceExtractor:
    """GE2E speaker embeddings for batches of recordings."""

    modality = "voice"
    dim = 256

    def __init__(
        self,
        models_dir: Path = DEFAULT_MODELS_DIR,
        *,
        config: VoiceConfig = VoiceConfig(),
        intra_op_threads: int = 1,
    ) -> None:
        self.config = config
        self._session, self.manifest = open_session(
            models_dir, "ge2e", intra_op_threads=intra_op_threads
        )
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or inputs[0].shape[-1] != N_MELS \
                or outputs[0].shape[-1] != self.dim:
            raise ModelError("ge2e model does not have the expected [N, T, 40] -> [N, 256] signature")
        self._input = inputs[0].name
        self._output = outputs[0].name

    # ------------------------------------------------------------------ public API

    def embed_batch(self, audios: Sequence[bytes], *, fmt: str = "auto") -> list[np.ndarray | SampleError]:
        """Embed encoded recordings (WAV or FLAC, or raw PCM with ``fmt="pcm_s16le"``)."""
        wavs: list[np.ndarray | SampleError] = []
        for data in audios:
            try:
                wavs.append(decode_audio(data, fmt=fmt, max_seconds=self.config.max_seconds))
            except SampleError as e:
                wavs.append(e)
        return self._embed(wavs)

    def embed_pcm_batch(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray | SampleError]:
        """Embed already decoded recordings: 1-D float32 arrays, 16 kHz mono, in [-1, 1]."""
        checked: list[np.ndarray | SampleError] = []
        for wav in wavs:
            try:
                checked.append(self._check_pcm(wav))
            except SampleError as e:
                checked.append(e)
        return self._embed(checked)

    def warmup(self) -> None:
        """Run the model once so that the first real batch does not pay for set-up."""
        rng = np.random.default_rng(0)
        x = rng.exponential(0.1, (1, PARTIAL_FRAMES, N_MELS)).astype(np.float32)
        self._session.run([self._output], {self._input: x})

    # ------------------------------------------------------------------ internals

    def _check_pcm(self, wav: np.ndarray) -> np.ndarray:
        wav = np.asarray(wav)
        if wav.ndim != 1 or not np.issubdtype(wav.dtype, np.floating):
            raise UndecodableSample("decoded audio must be a 1-D float array")
        if len(wav) > self.config.max_seconds * SAMPLE_RATE:
            raise SampleTooLarge(f"recording longer than {self.config.max_seconds:g} s")
        if not np.all(np.isfinite(wav)):
            raise UndecodableSample("audio holds non-finite samples")
        return wav.astype(np.float32, copy=False)

    def _partials(self, wav: np.ndarray) -> np.ndarray:
        speech = trim_silence(wav)
        if speech.size == 0:
            raise NoSpeech()
        if speech.size < self.config.min_speech_seconds * SAMPLE_RATE:
            raise TooLittleSpeech(
                f"{speech.size / SAMPLE_RATE:.2f} s of speech, at least "
                f"{self.config.min_speech_seconds:g} s needed"
            )
        return partial_mels(speech, rate=self.config.rate, min_coverage=self.config.min_coverage)

    def _embed(self, wavs: Sequence[np.ndarray | SampleError]) -> list[np.ndarray | SampleError]:
        results: list[np.ndarray | SampleError] = list(wavs)
        chunks: list[np.ndarray] = []
        owners: list[tuple[int, int, int]] = []  # (item, first partial, partial count)
        n = 0
        for i, wav in enumerate(wavs):
            if isinstance(wav, SampleError):
                continue
            try:
                mels = self._partials(wav)
            except SampleError as e:
                results[i] = e
                continue
            chunks.append(mels)
            owners.append((i, n, len(mels)))
            n += len(mels)
        if not chunks:
            return results
        partial_embeds = self._run(np.concatenate(chunks))
        for i, start, count in owners:
            part = partial_embeds[start : start + count]
            # A partial whose ReLU output is all zero has no direction (NaN after the
            # graph's L2 normalisation): leave it out of the mean.
            part = part[np.all(np.isfinite(part), axis=1)]
            mean = part.mean(axis=0, dtype=np.float64) if len(part) else None
            norm = float(np.linalg.norm(mean)) if mean is not None else 0.0
            if not norm > 0.0:
                results[i] = NoSpeech("no usable speech in the recording")
                continue
            results[i] = (mean / norm).astype(np.float32)
        return results

    def _run(self, mels: np.ndarray) -> np.ndarray:
        step = self.config.max_partials_per_run
        outs = [
            self._session.run([self._output], {self._input: mels[k : k + step]})[0]
            for k in range(0, len(mels), step)
        ]
        out = np.concatenate(outs) if len(outs) > 1 else outs[0]
        if out.shape != (len(mels), self.dim):
            raise ModelError(f"ge2e returned shape {out.shape} for {len(mels)} partials")
        return out
