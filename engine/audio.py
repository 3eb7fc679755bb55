"""Audio decoding and the GE2E speaker-encoder front end, in numpy.

The speaker model (``models/ge2e.onnx``, from the ``resemblyzer`` package) was trained
on a fixed front end; this module reproduces it without librosa or torch:

1. :func:`decode_audio` turns WAV, FLAC or raw 16-bit PCM bytes into float32 mono at
   16 kHz (stereo is averaged, other rates are resampled with soxr). Sizes are checked
   from the header before the samples are read.
2. :func:`trim_silence` raises the volume (never lowers it) to -30 dBFS and removes
   silences with the WebRTC VAD exactly as resemblyzer's ``preprocess_wav`` does.
3. :func:`mel_frames` computes the 40-channel mel *power* spectrogram (not log) as
   ``librosa.feature.melspectrogram`` does with resemblyzer's settings: periodic Hann
   window of 400 samples (25 ms), hop 160 (10 ms), ``center=True`` with zero padding
   (librosa >= 0.10), Slaney mel scale with Slaney area normalisation, 0-8 kHz.
4. :func:`partial_slices` cuts an utterance into 160-frame (1.6 s) partials, and
   :func:`partial_mels` stacks them into the ``[P, 160, 40]`` model input.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import soundfile
import soxr
import webrtcvad

from engine.errors import ConfigError, SampleTooLarge, UndecodableSample

__all__ = [
    "SAMPLE_RATE",
    "N_FFT",
    "HOP",
    "N_MELS",
    "PARTIAL_FRAMES",
    "decode_audio",
    "from_pcm16",
    "normalize_volume",
    "to_pcm16",
    "trim_silence",
    "mel_filterbank",
    "mel_frames",
    "frame_step",
    "partial_slices",
    "partial_mels",
]

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s

TARGET_DBFS = -30.0
VAD_WINDOW = 480  # 30 ms at 16 kHz
VAD_MODE = 3
VAD_AVERAGE_WIDTH = 8
VAD_MAX_SILENCE = 6  # windows; dilation by a structure of VAD_MAX_SILENCE + 1

_INT16_MAX = 2**15 - 1
_MIN_RATE = 4000
_MAX_RATE = 96000
_MAX_CHANNELS = 2  # with _MAX_RATE, bounds a decoded 30 s recording to 23 MB


# --------------------------------------------------------------------------- decoding


def decode_audio(
    data: bytes,
    *,
    fmt: str = "auto",
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float = 30.0,
) -> np.ndarray:
    """Decode audio bytes to float32 mono samples in [-1, 1] at 16 kHz.

    ``fmt="auto"`` accepts WAV (``RIFF``/``WAVE``) or FLAC (``fLaC``) by their magic
    bytes; ``fmt="pcm_s16le"`` takes raw little-endian signed 16-bit mono samples at
    ``sample_rate``. Mono or stereo (averaged), 4 to 96 kHz (resampled with soxr "HQ",
    the resampler librosa uses by default).

    Raises :class:`UndecodableSample` for anything else or for a broken file, and
    :class:`SampleTooLarge` when the recording is longer than ``max_seconds`` (checked
    from the header, before the samples are decoded).
    """
    if fmt == "pcm_s16le":
        wav, rate = _decode_pcm_s16le(data, sample_rate, max_seconds)
    elif fmt == "auto":
        wav, rate = _decode_container(data, max_seconds)
    else:
        raise UndecodableSample(f"unsupported audio format {fmt!r}")
    if rate != SAMPLE_RATE and wav.size:
        wav = soxr.resample(wav, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(wav, dtype=np.float32)


def _check_rate(rate: int) -> None:
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise UndecodableSample(f"unsupported sample rate {rate} Hz")


def _decode_pcm_s16le(data: bytes, sample_rate: int, max_seconds: float) -> tuple[np.ndarray, int]:
    _check_rate(sample_rate)
    if len(data) % 2:
        raise UndecodableSample("raw 16-bit PCM has an odd number of bytes")
    if len(data) // 2 > max_seconds * sample_rate:
        raise SampleTooLarge(f"recording longer than {max_seconds:g} s")
    pcm = np.frombuffer(data, dtype="<i2")
    # The same scaling as libsndfile's PCM_16 -> float conversion.
    return pcm.astype(np.float32) / np.float32(32768.0), sample_rate


def _decode_container(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        fmt = "WAV"
    elif head[:4] == b"fLaC":
        fmt = "FLAC"
    else:
        raise UndecodableSample("audio is neither WAV nor FLAC")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            if f.format != fmt:
                raise UndecodableSample("audio is neither WAV nor FLAC")
            _check_rate(rate)
            if not 1 <= channels <= _MAX_CHANNELS:
                raise UndecodableSample(f"unsupported channel count {channels}")
            limit = int(max_seconds * rate)
            if frames > limit:
                raise SampleTooLarge(f"recording longer than {max_seconds:g} s")
            # Never trust the header's frame count alone: read at most limit + 1 frames.
            wav = f.read(frames=limit + 1, dtype="float32", always_2d=True)
    except (UndecodableSample, SampleTooLarge):
        raise
    except Exception:  # libsndfile reports broken input with assorted exception types
        raise UndecodableSample(f"broken {fmt} audio") from None
    if wav.shape[0] > limit:
        raise SampleTooLarge(f"recording longer than {max_seconds:g} s")
    if not np.all(np.isfinite(wav)):
        raise UndecodableSample("audio holds non-finite samples")
    mono = wav[:, 0] if channels == 1 else wav.mean(axis=1, dtype=np.float32)
    return mono, rate


# --------------------------------------------------------------------------- VAD trim


def to_pcm16(wav: np.ndarray) -> bytes:
    """Float samples as the 16-bit PCM a spoken-challenge check reads: clipped to full
    scale, times 32767, truncated."""
    return (np.clip(wav, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def from_pcm16(pcm: bytes) -> np.ndarray:
    """:func:`to_pcm16`'s bytes as float32 samples again (divided by 32767)."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Raise (never lower) the RMS level of ``wav`` to ``target_dbfs``.

    Digital silence is returned unchanged.
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.size == 0:
        return wav
    rms = float(np.sqrt(np.mean(np.square(wav.astype(np.float64) * _INT16_MAX))))
    if rms == 0.0:
        return wav
    change_db = target_dbfs - 20.0 * np.log10(rms / _INT16_MAX)
    if change_db <= 0:
        return wav
    return (wav * np.float32(10.0 ** (change_db / 20.0))).astype(np.float32)


def _moving_average(flags: np.ndarray, width: int) -> np.ndarray:
    padded = np.concatenate((np.zeros((width - 1) // 2), flags, np.zeros(width // 2)))
    acc = np.cumsum(padded, dtype=float)
    acc[width:] = acc[width:] - acc[:-width]
    return acc[width - 1 :] / width


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary dilation by a centred run of ``size`` ones (odd), zero outside the array."""
    half = size // 2
    hits = np.convolve(mask.astype(np.int64), np.ones(size, dtype=np.int64), mode="full")
    return hits[half : half + len(mask)] > 0


def trim_silence(wav: np.ndarray) -> np.ndarray:
    """Volume-normalise to -30 dBFS and keep only the voiced parts of a 16 kHz recording.

    As resemblyzer: the WebRTC VAD (mode 3) flags 30 ms windows, the flags are smoothed
    by a moving average of 8 windows and rounded, and the voiced regions are dilated by
    3 windows on each side, so no kept silence is longer than about 180 ms. The tail
    that does not fill a 30 ms window is dropped. Returns float32 (possibly empty).
    Samples pushed beyond full scale by the gain are clipped for the VAD only (resemblyzer
    would wrap them around).
    """
    wav = normalize_volume(wav)
    wav = wav[: len(wav) - len(wav) % VAD_WINDOW]
    if wav.size == 0:
        return wav
    pcm = np.clip(np.round(wav * _INT16_MAX), -_INT16_MAX - 1, _INT16_MAX).astype("<i2").tobytes()
    vad = webrtcvad.Vad(VAD_MODE)
    step = VAD_WINDOW * 2
    flags = np.fromiter(
        (vad.is_speech(pcm[i : i + step], SAMPLE_RATE) for i in range(0, len(pcm), step)),
        dtype=bool,
        count=len(wav) // VAD_WINDOW,
    )
    mask = np.round(_moving_average(flags.astype(float), VAD_AVERAGE_WIDTH)).astype(bool)
    # Binary dilation by a centred structure of ones (odd length), zero outside.
    mask = _dilate(mask, VAD_MAX_SILENCE + 1)
    return wav[np.repeat(mask, VAD_WINDOW)]


# --------------------------------------------------------------------------- mel


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(
        f >= min_log_hz,
        min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep,
        f / f_sp,
    )


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(
        m >= min_log_mel,
        min_log_hz * np.exp(logstep * (m - min_log_mel)),
        f_sp * m,
    )


@lru_cache(maxsize=4)
def mel_filterbank(
    sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS
) -> np.ndarray:
    """Triangular Slaney mel filters with area normalisation, ``(n_mels, 1 + n_fft // 2)``.

    The same matrix as ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)``
    (``htk=False, norm="slaney"``, 0 Hz to ``sr / 2``). Read-only.
    """
    fft_freqs = np.linspace(0.0, sr / 2, 1 + n_fft // 2)
    mel_pts = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2)
    mel_f = _mel_to_hz(mel_pts)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    """Periodic Hann window (``scipy.signal.get_window("hann", N_FFT, fftbins=True)``)."""
    n = np.arange(N_FFT)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)
    w.setflags(write=False)
    return w


def mel_frames(wav: np.ndarray) -> np.ndarray:
    """Mel power spectrogram of 16 kHz audio, float32 ``(1 + len(wav) // 160, 40)``."""
    wav = np.asarray(wav, dtype=np.float64)
    if wav.ndim != 1:
        raise ValueError("mel_frames expects mono audio (a 1-D array)")
    padded = np.pad(wav, N_FFT // 2, mode="constant")
    n_frames = 1 + (len(padded) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:n_frames]
    spec = np.fft.rfft(frames * _hann(), n=N_FFT, axis=1)
    power = spec.real**2 + spec.imag**2
    return (power @ mel_filterbank().T.astype(np.float64)).astype(np.float32)


# --------------------------------------------------------------------------- partials


def frame_step(rate: float) -> int:
    """Frames between the starts of two partials at ``rate`` partials per second."""
    step = int(np.round((SAMPLE_RATE / rate) / HOP))
    if not 0 < step <= PARTIAL_FRAMES:
        raise ConfigError(
            f"partial rate {rate} must give a step of 1..{PARTIAL_FRAMES} frames"
        )
    return step


def partial_slices(
    n_samples: int, *, rate: float = 1.3, min_coverage: float = 0.75
) -> list[slice]:
    """Mel-frame ranges of the 160-frame partials of an utterance of ``n_samples``.

    resemblyzer's ``compute_partial_slices``: a partial starts every
    ``round(16000 / rate / 160)`` frames (77 at 1.3 per second) while the partials cover
    the utterance; the last one is dropped if less than ``min_coverage`` of its samples
    are real audio, unless it is the only one. Partial ``s`` covers samples
    ``s.start * 160`` to ``s.stop * 160``; the audio must be zero-padded up to the last
    stop before :func:`mel_frames` (see :func:`partial_mels`).
    """
    if not 0 < min_coverage <= 1:
        raise ConfigError("min_coverage must be in (0, 1]")
    if n_samples < 0:
        raise ValueError("n_samples must be non-negative")
    step = frame_step(rate)
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    steps = max(1, n_frames - PARTIAL_FRAMES + step + 1)
    slices = [slice(i, i + PARTIAL_FRAMES) for i in range(0, steps, step)]
    last = slices[-1]
    coverage = (n_samples - last.start * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < min_coverage and len(slices) > 1:
        slices.pop()
    return slices


def partial_mels(wav: np.ndarray, *, rate: float = 1.3, min_coverage: float = 0.75) -> np.ndarray:
    """The ``[P, 160, 40]`` float32 model input for one trimmed utterance."""
    slices = partial_slices(len(wav), rate=rate, min_coverage=min_coverage)
    needed = slices[-1].stop * HOP
    if needed >= len(wav):
        wav = np.pad(wav, (0, needed - len(wav)), mode="constant")
    mel = mel_frames(wav)
    return np.stack([mel[s] for s in slices])
