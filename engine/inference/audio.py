"""Audio decoding and the speech check, in numpy.

1. :func:`decode_audio` turns WAV, FLAC or raw 16-bit PCM bytes into float32 mono at
   16 kHz (stereo is averaged, other rates are resampled with soxr). Sizes are checked
   from the header before the samples are read.
2. :func:`trim_silence` raises the volume (never lowers it) to -30 dBFS and keeps the
   voiced parts found by the WebRTC VAD: how much speech a recording holds (a recording
   without enough is refused before the speaker model runs).
3. :func:`to_pcm16` and :func:`from_pcm16`: the 16-bit form the spoken-challenge check reads.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile
import soxr
import webrtcvad

from engine.errors import SampleTooLarge, UndecodableSample

__all__ = [
    "SAMPLE_RATE",
    "decode_audio",
    "from_pcm16",
    "normalize_volume",
    "to_pcm16",
    "trim_silence",
]

SAMPLE_RATE = 16000

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
