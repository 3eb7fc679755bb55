"""Voice: audio decoding, the speech check, the CAM++ front end (Kaldi filterbank), band
detection and speaker embedding end to end on real recordings (../shared/data)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.inference.audio import SAMPLE_RATE, decode_audio, trim_silence
from engine.errors import (
    ConfigError,
    NoSpeech,
    SampleError,
    SampleTooLarge,
    TooLittleSpeech,
    UndecodableSample,
)
from engine.inference.models import DEFAULT_MODELS_DIR
from engine.inference.speaker import SpeakerEmbedding, enrollment_band, pack_template, unpack_template
from engine.inference.voice import VoiceConfig, VoiceExtractor, band_limited, detect_band, fbank

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"
DIGITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "digits"
SEED = 20261127

needs_speech = pytest.mark.skipif(
    not SPEECH.is_dir(), reason=f"speechocean762 not found at {SPEECH} (see shared/data/README.md)"
)
needs_model = pytest.mark.skipif(
    not (DEFAULT_MODELS_DIR / "campplus.onnx").is_file(),
    reason="models/campplus.onnx missing: run models/build_campplus.py",
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
    if not (DEFAULT_MODELS_DIR / "campplus.onnx").is_file():
        pytest.skip("models/campplus.onnx missing: run models/build_campplus.py")
    ex = VoiceExtractor(intra_op_threads=1)
    ex.warmup()
    return ex


# --------------------------------------------------------------------------- front end


def test_fbank_shape_and_mean() -> None:
    wav = tone(1000.0, 1.0)
    feats = fbank(wav)
    # snip edges: 1 + (16000 - 400) // 160 frames of 80 bins
    assert feats.shape == (98, 80) and feats.dtype == np.float32
    assert np.allclose(feats.mean(axis=0), 0.0, atol=1e-4)
    assert fbank(np.zeros(300, np.float32)).shape == (0, 80)


def _kaldi_native(wav: np.ndarray) -> np.ndarray:
    """kaldi-native-fbank with the options CAM++ was exported against, minus the mean over
    time: the reference :func:`fbank` is held to."""
    from engine.assets_models.build_campplus import knf_fbank

    raw = knf_fbank(wav)
    return raw - raw.mean(axis=0, keepdims=True)


def test_fbank_is_kaldis() -> None:
    """The numpy filterbank gives kaldi-native-fbank's features (tones, a chirp, noise,
    quiet noise, 16-bit audio) to within the tolerances models/build_campplus.py holds
    kaldi-native-fbank to: 1e-3 where a channel is within 15 nats of its frame's loudest,
    1e-2 anywhere (far below it, float32 rounding of tiny energies shows)."""
    rng = np.random.default_rng(SEED)
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    signals = [
        tone(440.0, 3.0) + 0.05,
        (0.3 * np.sin(2 * np.pi * (50 * t + 7850 / 6 * t**2))).astype(np.float32),
        (0.1 * rng.standard_normal(len(t))).astype(np.float32),
        (1e-3 * rng.standard_normal(len(t))).astype(np.float32),
        (np.round(rng.uniform(-0.5, 0.5, 12345) * 32767) / 32768).astype(np.float32),
    ]
    for wav in signals:
        ours, theirs = fbank(wav), _kaldi_native(wav)
        assert ours.shape == theirs.shape
        diff = np.abs(ours - theirs)
        loud = theirs >= theirs.max(axis=1, keepdims=True) - 15.0
        assert diff[loud].max() < 1e-3 and diff.max() < 1e-2


@needs_speech
@needs_model
def test_fbank_gives_kaldis_embeddings(extractor: VoiceExtractor) -> None:
    """On real recordings the model's embedding from either filterbank is the same."""
    for path in [utterances(s)[0] for s in speakers()[:4]]:
        wav = decode_audio(path.read_bytes())
        ours, theirs = fbank(wav), _kaldi_native(wav)
        assert np.abs(ours - theirs).max() < 1e-2
        run = lambda x: extractor._session.run(None, {extractor._input: x[None]})[0][0]  # noqa: E731
        a, b = run(ours), run(theirs)
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99999


def test_pure_tone_lands_in_its_mel_bins() -> None:
    """A 500 Hz tone's energy sits in lower mel bins than a 3 kHz tone's; a tone twice as
    loud only shifts every log energy by the same amount (which the mean removes)."""
    from engine.inference.voice import _MEL_WEIGHTS

    def energy(w: np.ndarray) -> np.ndarray:
        spectrum = np.abs(np.fft.rfft(w[:400] * np.hanning(400), n=512)[:256]) ** 2
        return spectrum.astype(np.float32) @ _MEL_WEIGHTS

    assert int(np.argmax(energy(tone(500.0, 0.5)))) < int(np.argmax(energy(tone(3000.0, 0.5))))
    assert np.allclose(fbank(tone(500.0, 0.5, amp=0.2)), fbank(tone(500.0, 0.5, amp=0.4)), atol=1e-3)


@needs_speech
def test_band_detection_on_real_recordings() -> None:
    wide = [decode_audio(utterances(s)[0].read_bytes()) for s in speakers()[:6]]
    assert [detect_band(w) for w in wide] == ["wide"] * 6
    assert [detect_band(band_limited(w)) for w in wide] == ["narrow"] * 6
    if DIGITS.is_dir():  # 8 kHz telephone-band recordings, upsampled by the decoder
        digits = [decode_audio(p.read_bytes()) for p in sorted(DIGITS.glob("*_0.flac"))[:6]]
        assert [detect_band(w) for w in digits] == ["narrow"] * 6
    assert detect_band(np.zeros(100, np.float32)) == "narrow"  # too short to tell: the cautious answer


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=16), st.sampled_from(["wide", "narrow"]))
def test_voice_template_round_trip(values: list[float], band: str) -> None:
    vec = np.asarray(values, np.float32)
    back = unpack_template(pack_template(vec, band))
    assert back.band == band and np.array_equal(back.vector, vec)


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x02\x00" + bytes(8), b"\x01\x07" + bytes(8), b"\x01\x00abc"])
def test_a_foreign_template_is_refused(blob: bytes) -> None:
    with pytest.raises(ValueError):
        unpack_template(blob)


def test_enrollment_band_is_the_narrowest() -> None:
    assert enrollment_band(["wide", "wide", "wide"]) == "wide"
    assert enrollment_band(["wide", "narrow", "wide"]) == "narrow"


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
    from engine.inference.audio import _dilate

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
        VoiceConfig(max_seconds=0.5)
    with pytest.raises(ConfigError):
        VoiceConfig(min_speech_seconds=5.0, max_seconds=4.0)
    assert VoiceConfig().min_speech_seconds == 1.0


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
    assert isinstance(lenient.embed_pcm_batch([short])[0], SpeakerEmbedding)


@needs_speech
def test_embedding_is_independent_of_volume_and_batch(extractor: VoiceExtractor) -> None:
    wav = decode_audio(utterances(speakers()[1])[0].read_bytes())
    loud, soft = extractor.embed_pcm_batch([wav, 0.25 * wav])
    assert loud.band == "wide" and soft.band == "wide"
    assert float(loud.vector @ soft.vector) > 0.999
    (narrow,) = extractor.embed_pcm_batch([band_limited(wav)])
    assert narrow.band == "narrow"
    assert float(loud.vector @ narrow.vector) > 0.5  # the same voice, heard through a telephone band


@needs_speech
def test_same_speaker_scores_higher_than_different_speakers(extractor: VoiceExtractor) -> None:
    chosen = speakers()[:8]
    firsts = [utterances(s)[0].read_bytes() for s in chosen]
    seconds = [utterances(s)[1].read_bytes() for s in chosen]
    out = extractor.embed_batch(firsts + seconds)
    for e in out:
        assert isinstance(e, SpeakerEmbedding) and e.band == "wide"
        assert e.vector.shape == (192,) and e.vector.dtype == np.float32
        assert np.linalg.norm(e.vector) == pytest.approx(1.0, abs=1e-5)
    a, b = np.stack([e.vector for e in out[:8]]), np.stack([e.vector for e in out[8:]])
    scores = a @ b.T
    genuine = np.diag(scores)
    impostor = scores[~np.eye(8, dtype=bool)]
    # Single utterances of about 4.5 s: every same-speaker pair beats every different-speaker
    # pair of these eight speakers (CAM++'s equal error rate on this set is about 1 %).
    assert genuine.min() > impostor.max(), (genuine, impostor.max())
    assert genuine.mean() - impostor.mean() > 0.4


@needs_speech
def test_mixed_batch_returns_one_result_per_input(extractor: VoiceExtractor) -> None:
    good = [utterances(s)[2].read_bytes() for s in speakers()[3:5]]
    silence = wav_bytes(np.zeros(2 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    batch = [good[0], b"not audio", silence, good[1], bytes(2 * 16000 * 31)]
    out = extractor.embed_batch(batch)
    assert len(out) == len(batch)
    assert isinstance(out[0], SpeakerEmbedding) and isinstance(out[3], SpeakerEmbedding)
    assert isinstance(out[1], UndecodableSample)
    assert isinstance(out[2], NoSpeech)
    assert isinstance(out[4], UndecodableSample)  # 'auto' does not take raw PCM
    # Batching does not change an embedding.
    alone = extractor.embed_batch([good[1]])[0]
    assert np.allclose(alone.vector, out[3].vector, atol=1e-5)
    # Raw PCM path and the decoded-audio path agree with the container path.
    raw = extractor.embed_batch([bytes(2 * 16000 * 31)], fmt="pcm_s16le")[0]
    assert isinstance(raw, SampleTooLarge)
    pcm = decode_audio(good[0])
    assert np.allclose(extractor.embed_pcm_batch([pcm])[0].vector, out[0].vector, atol=1e-5)
    assert extractor.embed_batch([]) == []


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
