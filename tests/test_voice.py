"""Voice: audio decoding, the GE2E front end (VAD trim, mel, partials) and speaker
embedding end to end on speechocean762 recordings (read from ../shared/data/speech)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.audio import (
    HOP,
    N_MELS,
    PARTIAL_FRAMES,
    SAMPLE_RATE,
    _hz_to_mel,
    _mel_to_hz,
    decode_audio,
    mel_filterbank,
    mel_frames,
    partial_mels,
    partial_slices,
    trim_silence,
)
from engine.errors import (
    ConfigError,
    NoSpeech,
    SampleError,
    SampleTooLarge,
    TooLittleSpeech,
    UndecodableSample,
)
from engine.models import DEFAULT_MODELS_DIR
from engine.voice import VoiceConfig, VoiceExtractor

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"
SEED = 20261127

needs_speech = pytest.mark.skipif(
    not SPEECH.is_dir(), reason=f"speechocean762 not found at {SPEECH} (see shared/data/README.md)"
)
needs_model = pytest.mark.skipif(
    not (DEFAULT_MODELS_DIR / "ge2e.onnx").is_file(),
    reason="models/ge2e.onnx missing: run models/build_ge2e.py",
)


def speakers() -> list[Path]:
    return sorted(p for p in SPEECH.iterdir() if p.is_dir() and p.name.startswith("SPEAKER"))


def utterances(speaker: Path) -> list[Path]:
    return sorted(speaker.glob("*.flac"))


def tone(freq: float, seconds: float, *, rate: int = SAMPLE_RATE, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def extractor() -> VoiceExtractor:
    if not (DEFAULT_MODELS_DIR / "ge2e.onnx").is_file():
        pytest.skip("models/ge2e.onnx missing: run models/build_ge2e.py")
    ex = VoiceExtractor(intra_op_threads=1)
    ex.warmup()
    return ex


# --------------------------------------------------------------------------- mel


def test_filterbank_matches_librosa_values() -> None:
    # Reference values from librosa 0.11 filters.mel(sr=16000, n_fft=400, n_mels=40).
    fb = mel_filterbank()
    assert fb.shape == (N_MELS, 201) and fb.dtype == np.float32
    for band, first, last, peak, argmax in [
        (0, 1, 3, 0.012404521, 2),
        (10, 19, 22, 0.01187949, 20),
        (20, 41, 47, 0.0071919174, 44),
        (39, 172, 199, 0.0017249404, 185),
    ]:
        nz = np.nonzero(fb[band])[0]
        assert (nz.min(), nz.max(), int(fb[band].argmax())) == (first, last, argmax)
        assert fb[band].max() == pytest.approx(peak, rel=1e-6)


def test_mel_frames_known_values() -> None:
    # librosa.feature.melspectrogram(y, sr=16000, n_fft=400, hop_length=160, n_mels=40)
    x = np.random.default_rng(0).standard_normal(1600).astype(np.float32) * 0.1
    m = mel_frames(x)
    assert m.shape == (11, N_MELS) and m.dtype == np.float32
    for (t, c), want in {
        (0, 0): 0.018544571474194527,
        (0, 39): 0.015520457178354263,
        (5, 3): 0.054734211415052414,
        (5, 20): 0.04072810336947441,
        (10, 39): 0.03510478883981705,
        (3, 12): 0.026948684826493263,
    }.items():
        assert m[t, c] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("band", [2, 9, 17, 25, 33, 38])
def test_pure_tone_lands_in_its_mel_band(band: int) -> None:
    # Band i's triangle peaks at the (i + 1)-th of n_mels + 2 equally spaced mel points.
    pts = _mel_to_hz(np.linspace(0.0, _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    centres = pts[1:-1]
    m = mel_frames(tone(float(centres[band]), 1.0))
    assert m.shape == (1 + SAMPLE_RATE // HOP, N_MELS)
    steady = m[5:-5]
    assert np.all(steady.argmax(axis=1) == band)
    # Power, not log power: doubling the amplitude multiplies it by four.
    m2 = mel_frames(2 * tone(float(centres[band]), 1.0))
    assert np.allclose(m2[5:-5], 4 * steady, rtol=1e-4)


def test_mel_frames_shape_and_edges() -> None:
    for n in (0, 1, 159, 160, 161, 16000):
        m = mel_frames(np.zeros(n, np.float32))
        assert m.shape == (1 + n // HOP, N_MELS)
        assert not m.any()
    with pytest.raises(ValueError):
        mel_frames(np.zeros((2, 100), np.float32))


# --------------------------------------------------------------------------- partials


@pytest.mark.parametrize(
    "n, starts",
    [  # from resemblyzer 0.1.4 VoiceEncoder.compute_partial_slices(n, 1.3, 0.75)
        (0, [0]),
        (8000, [0]),
        (25600, [0]),
        (31519, [0]),
        (31520, [0, 77]),  # second partial 75 % covered: kept
        (43839, [0, 77]),
        (43840, [0, 77, 154]),
        (80000, [0, 77, 154, 231, 308]),
        (160000, [77 * k for k in range(12)]),
    ],
)
def test_partial_slices_reference(n: int, starts: list[int]) -> None:
    slices = partial_slices(n)
    assert [s.start for s in slices] == starts
    assert all(s.stop - s.start == PARTIAL_FRAMES for s in slices)


def test_partial_slices_rate_and_coverage() -> None:
    assert [s.start for s in partial_slices(31519, rate=2.0)] == [0, 50]
    assert len(partial_slices(31519, min_coverage=0.5)) == 2
    assert len(partial_slices(30 * SAMPLE_RATE)) == 38
    with pytest.raises(ConfigError):
        partial_slices(16000, rate=0.1)  # partials would leave gaps
    with pytest.raises(ConfigError):
        partial_slices(16000, min_coverage=0.0)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=30 * SAMPLE_RATE))
def test_partial_slices_invariants(n: int) -> None:
    slices = partial_slices(n)
    assert [s.start for s in slices] == [77 * k for k in range(len(slices))]
    if len(slices) > 1:  # the last partial is at least 75 % real audio
        assert (n - slices[-1].start * HOP) / (PARTIAL_FRAMES * HOP) >= 0.75
    # The partials cover the audio up to less than one partial's quarter plus a step.
    assert n - slices[-1].stop * HOP < 0.25 * PARTIAL_FRAMES * HOP + 77 * HOP


def test_partial_mels_pads_short_audio() -> None:
    x = tone(500.0, 0.7)
    p = partial_mels(x)
    assert p.shape == (1, PARTIAL_FRAMES, N_MELS) and p.dtype == np.float32
    # Beyond the audio (0.7 s = 70 frames, plus the window overhang) only zeros.
    assert p[0, 75:].max() == 0.0 and p[0, 10:60].min() > 0.0


# --------------------------------------------------------------------------- decoding


@needs_speech
def test_wav_flac_and_raw_pcm_decode_to_the_same_samples() -> None:
    flac = utterances(speakers()[0])[0].read_bytes()
    pcm, rate = soundfile.read(io.BytesIO(flac), dtype="int16")
    assert rate == SAMPLE_RATE
    a = decode_audio(flac)
    b = decode_audio(wav_bytes(pcm, rate))
    c = decode_audio(pcm.astype("<i2").tobytes(), fmt="pcm_s16le")
    assert a.dtype == np.float32 and a.ndim == 1 and len(a) == len(pcm)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert np.array_equal(a, pcm / np.float32(32768.0))


def test_stereo_is_averaged() -> None:
    left = tone(300.0, 0.5)
    right = np.zeros_like(left)
    got = decode_audio(wav_bytes(np.stack([left, right], axis=1), SAMPLE_RATE, "FLOAT"))
    assert np.allclose(got, left / 2, atol=1e-7)


@pytest.mark.parametrize("container", ["wav", "pcm"])
def test_8khz_input_is_resampled(container: str) -> None:
    x = tone(440.0, 1.0, rate=8000)
    if container == "wav":
        got = decode_audio(wav_bytes(x, 8000))
    else:
        pcm = np.round(x * 32767).astype("<i2").tobytes()
        got = decode_audio(pcm, fmt="pcm_s16le", sample_rate=8000)
    assert abs(len(got) - SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(got[2000:-2000]))
    peak_hz = spectrum.argmax() * SAMPLE_RATE / len(got[2000:-2000])
    assert peak_hz == pytest.approx(440.0, abs=2.0)
    assert np.max(np.abs(got[2000:-2000])) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    "data, fmt",
    [
        (b"junk", "auto"),
        (b"", "auto"),
        (b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk", "auto"),
        (b"fLaC" + bytes(200), "auto"),
        (b"OggS" + bytes(200), "auto"),  # a real container, but not accepted
        (b"\x01\x02\x03", "pcm_s16le"),  # odd byte count
        (b"\x00\x00" * 100, "mp3"),
    ],
)
def test_junk_is_undecodable(data: bytes, fmt: str) -> None:
    with pytest.raises(UndecodableSample):
        decode_audio(data, fmt=fmt)


def test_too_long_is_refused_before_decoding() -> None:
    with pytest.raises(SampleTooLarge):
        decode_audio(bytes(2 * 16000 * 31), fmt="pcm_s16le")
    with pytest.raises(SampleTooLarge):
        decode_audio(wav_bytes(np.zeros(16000 * 3, np.float32), 16000), max_seconds=2.0)
    assert len(decode_audio(wav_bytes(np.zeros(16000 * 2, np.float32), 16000), max_seconds=2.0)) == 32000


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.sampled_from([b"", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"RIFF"]),
    body=st.binary(max_size=400),
)
def test_decoder_never_raises_anything_but_sample_errors(prefix: bytes, body: bytes) -> None:
    try:
        out = decode_audio(prefix + body)
    except SampleError:
        return
    assert out.dtype == np.float32 and out.ndim == 1 and np.all(np.isfinite(out))


# --------------------------------------------------------------------------- VAD


def test_trim_silence_removes_long_silences() -> None:
    rng = np.random.default_rng(SEED)
    assert trim_silence(np.zeros(48000, np.float32)).size == 0
    assert trim_silence((rng.standard_normal(48000) * 1e-3).astype(np.float32)).size == 0
    assert trim_silence(np.zeros(0, np.float32)).size == 0


def test_dilation_is_centred_and_zero_outside() -> None:
    from engine.audio import _dilate

    m = np.zeros(12, bool)
    m[5] = True
    assert np.flatnonzero(_dilate(m, 7)).tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert _dilate(np.array([True, False]), 7).tolist() == [True, True]
    assert not _dilate(np.zeros(3, bool), 7).any()


@needs_speech
@pytest.mark.parametrize(
    "speaker, utt, n_in, n_out, abs_sum",
    [  # resemblyzer 0.1.4 preprocess_wav(librosa.load(path, sr=None)[0])
        (0, 0, 35376, 21120, 758.811279296875),
        (1, 0, 52800, 37440, 2009.4150390625),
        (6, 5, 75344, 58560, 4606.78076171875),
        (9, 9, 54720, 39360, 1459.6744384765625),
    ],
)
def test_trim_matches_resemblyzer(speaker: int, utt: int, n_in: int, n_out: int, abs_sum: float) -> None:
    wav = decode_audio(utterances(speakers()[speaker])[utt].read_bytes())
    assert len(wav) == n_in
    kept = trim_silence(wav)
    assert len(kept) == n_out
    assert float(np.abs(kept).sum(dtype=np.float64)) == pytest.approx(abs_sum, rel=1e-5)


@needs_speech
def test_trim_keeps_speech_drops_padding_and_normalises_volume() -> None:
    speech = decode_audio(utterances(speakers()[1])[0].read_bytes())
    quiet = 0.05 * speech
    padded = np.concatenate([np.zeros(32000, np.float32), quiet, np.zeros(32000, np.float32)])
    kept = trim_silence(padded)
    assert len(kept) % 480 == 0
    assert 0.5 * len(speech) < len(kept) <= len(speech) + 0.2 * SAMPLE_RATE
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(kept.astype(np.float64) ** 2)))
    assert rms_dbfs > -30.0  # raised to -30 dBFS overall, then silence removed


# --------------------------------------------------------------------------- extractor


def test_voice_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        VoiceConfig(min_speech_seconds=0.0)
    with pytest.raises(ConfigError):
        VoiceConfig(rate=0.2)
    with pytest.raises(ConfigError):
        VoiceConfig(min_coverage=1.5)
    with pytest.raises(ConfigError):
        VoiceConfig(min_speech_seconds=5.0, max_seconds=4.0)
    with pytest.raises(ConfigError):
        VoiceConfig(max_partials_per_run=0)
    assert VoiceConfig().rate == 1.3


@needs_model
def test_silence_and_noise_are_no_speech(extractor: VoiceExtractor) -> None:
    rng = np.random.default_rng(SEED)
    silence = np.zeros(3 * SAMPLE_RATE, np.float32)
    noise = (rng.standard_normal(3 * SAMPLE_RATE) * 1e-3).astype(np.float32)
    out = extractor.embed_pcm_batch([silence, noise])
    assert all(isinstance(r, NoSpeech) for r in out)
    assert isinstance(extractor.embed_batch([wav_bytes(silence, SAMPLE_RATE)])[0], NoSpeech)


@needs_speech
def test_half_a_second_of_speech_is_too_little(extractor: VoiceExtractor) -> None:
    speech = trim_silence(decode_audio(utterances(speakers()[2])[3].read_bytes()))
    gap = np.zeros(SAMPLE_RATE, np.float32)
    short = np.concatenate([gap, speech[SAMPLE_RATE : SAMPLE_RATE + SAMPLE_RATE // 2], gap])
    (out,) = extractor.embed_pcm_batch([short])
    assert isinstance(out, TooLittleSpeech), out
    lenient = VoiceExtractor(config=VoiceConfig(min_speech_seconds=0.3))
    assert isinstance(lenient.embed_pcm_batch([short])[0], np.ndarray)


@needs_speech
def test_embedding_matches_resemblyzer(extractor: VoiceExtractor) -> None:
    # resemblyzer 0.1.4 VoiceEncoder().embed_utterance(preprocess_wav(wav)) of this file
    # (2 partials): its six largest components and its sum.
    (e,) = extractor.embed_batch([utterances(speakers()[1])[0].read_bytes()])
    assert isinstance(e, np.ndarray)
    assert np.argsort(-e)[:6].tolist() == [2, 218, 160, 244, 169, 224]
    want = [0.21714924, 0.20661134, 0.19532834, 0.18877813, 0.17099154, 0.16530150]
    assert np.allclose(e[[2, 218, 160, 244, 169, 224]], want, atol=2e-5)
    assert float(e.sum()) == pytest.approx(8.902206420898438, abs=1e-3)


@needs_speech
def test_same_speaker_scores_higher_than_different_speakers(extractor: VoiceExtractor) -> None:
    chosen = speakers()[:8]
    firsts = [utterances(s)[0].read_bytes() for s in chosen]
    seconds = [utterances(s)[1].read_bytes() for s in chosen]
    out = extractor.embed_batch(firsts + seconds)
    for e in out:
        assert isinstance(e, np.ndarray) and e.shape == (256,) and e.dtype == np.float32
        assert np.linalg.norm(e) == pytest.approx(1.0, abs=1e-5)
    a, b = np.stack(out[:8]), np.stack(out[8:])
    scores = a @ b.T
    genuine = np.diag(scores)
    impostor = scores[~np.eye(8, dtype=bool)]
    # Single utterances of about 4.5 s: every same-speaker pair beats the typical
    # different-speaker pair, and on average by a wide margin.
    assert genuine.min() > np.median(impostor), (genuine, np.median(impostor))
    assert genuine.mean() - impostor.mean() > 0.15
    # Each speaker's first utterance is closest to the same speaker's second one.
    assert np.mean(scores.argmax(axis=1) == np.arange(8)) >= 7 / 8


@needs_speech
def test_mixed_batch_returns_one_result_per_input(extractor: VoiceExtractor) -> None:
    good = [utterances(s)[2].read_bytes() for s in speakers()[3:5]]
    silence = wav_bytes(np.zeros(2 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    batch = [good[0], b"not audio", silence, good[1], bytes(2 * 16000 * 31)]
    out = extractor.embed_batch(batch)
    assert len(out) == len(batch)
    assert isinstance(out[0], np.ndarray) and isinstance(out[3], np.ndarray)
    assert isinstance(out[1], UndecodableSample)
    assert isinstance(out[2], NoSpeech)
    assert isinstance(out[4], UndecodableSample)  # 'auto' does not take raw PCM
    # Batching does not change an embedding.
    alone = extractor.embed_batch([good[1]])[0]
    assert np.allclose(alone, out[3], atol=1e-5)
    # Raw PCM path and the decoded-audio path agree with the container path.
    raw = extractor.embed_batch([bytes(2 * 16000 * 31)], fmt="pcm_s16le")[0]
    assert isinstance(raw, SampleTooLarge)
    pcm = decode_audio(good[0])
    assert np.allclose(extractor.embed_pcm_batch([pcm])[0], out[0], atol=1e-5)
    assert extractor.embed_batch([]) == []


@needs_speech
def test_chunked_model_runs_match_one_run(extractor: VoiceExtractor) -> None:
    clips = [utterances(s)[4].read_bytes() for s in speakers()[5:8]]
    whole = extractor.embed_batch(clips)
    small = VoiceExtractor(config=VoiceConfig(max_partials_per_run=2)).embed_batch(clips)
    for x, y in zip(whole, small):
        assert np.allclose(x, y, atol=1e-5)


def test_decoded_audio_is_checked(extractor: VoiceExtractor) -> None:
    bad = [
        np.zeros((2, 16000), np.float32),
        np.zeros(16000, np.int16),
        np.full(16000, np.nan, np.float32),
        np.zeros(31 * SAMPLE_RATE, np.float32),
    ]
    out = extractor.embed_pcm_batch(bad)
    assert [type(e) for e in out] == [UndecodableSample, UndecodableSample, UndecodableSample, SampleTooLarge]


def test_rates_and_channel_counts_are_bounded() -> None:
    with pytest.raises(UndecodableSample):
        decode_audio(wav_bytes(np.zeros((1600, 3), np.float32), 16000))
    with pytest.raises(UndecodableSample):
        decode_audio(wav_bytes(np.zeros(1600, np.float32), 192000))
    with pytest.raises(UndecodableSample):
        decode_audio(bytes(200), fmt="pcm_s16le", sample_rate=1000)
    assert len(decode_audio(wav_bytes(np.zeros(4800, np.float32), 48000))) == 1600
