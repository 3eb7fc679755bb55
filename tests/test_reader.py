"""Whisper's reading of the expected words (engine/reader.py), and how the challenge
checker uses it for the kinds it is configured to check (phrases, by default).

The model tests run the real Whisper base on a speechocean762 recording shipped in
``samples/``, so they never skip.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.audio import decode_audio
from engine.challenge import (
    DEFAULT_RECOGNISERS,
    FAILURE_SCORE,
    ChallengeChecker,
    ChallengeConfig,
    Pass,
    ScoreParts,
    Verdict,
)
from engine.errors import ConfigError, ModelError, ModelIntegrityError, ModelMissing, NoSpeech
from engine.models import DEFAULT_MODELS_DIR
from engine.reader import MANIFEST_FILE, Reader, log_mel, reader_text

from .conftest import POCKETSPHINX_ONLY

SR = 16000
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "speech" / "SPEAKER0024"
SAID = "we have climbed one step up the ladder"  # 000240031
OTHER = "it was good for me"  # 000240010, the same speaker


# --------------------------------------------------------------------------- features


def test_log_mel_frames_and_range() -> None:
    t = np.arange(SR, dtype=np.float32) / SR
    tone = (0.3 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    feats = log_mel(tone)
    assert feats.shape == (80, 100) and feats.dtype == np.float32  # 10 ms frames, the last one dropped
    # log10 power floored 8 below its peak, then (x + 4) / 4: a span of at most 2
    assert feats.max() - feats.min() <= 2.0 + 1e-6
    # a 1 kHz tone lands in the band centred on 1 kHz: 15 mels (Slaney: 200/3 Hz per mel up to
    # 1 kHz), with 82 edges spread over the 45.2 mels up to 8 kHz -> filter 15 / 0.551 - 1 = 26
    band = int(np.argmax(feats[:, 50]))
    assert band == 26, band
    assert log_mel(np.zeros(40 * SR, np.float32)).shape == (80, 3000)  # at most Whisper's 30 s
    with pytest.raises(ValueError):
        log_mel(np.zeros(100, np.float32))


def test_words_are_written_as_in_a_sentence() -> None:
    assert reader_text(["i", "think", "i'm", "right", "said", "i"]) == ["I", "think", "I'm", "right", "said", "I"]
    assert reader_text(["we", "have", "it"]) == ["We", "have", "it"]
    assert reader_text([]) == []


# --------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def reader() -> Reader:
    return Reader()


@pytest.mark.slow
def test_the_right_words_are_likely_and_other_words_are_not(reader: Reader) -> None:
    wav = decode_audio((SAMPLE / "000240031.flac").read_bytes())
    right = reader.word_logprobs(wav, SAID.split())
    wrong = reader.word_logprobs(wav, OTHER.split())
    assert [w for w, _ in right] == SAID.split() and [w for w, _ in wrong] == OTHER.split()
    mean_right, mean_wrong = np.mean([lp for _, lp in right]), np.mean([lp for _, lp in wrong])
    assert mean_right > -1.0 and mean_right > mean_wrong + 3.0, (right, wrong)
    assert all(lp <= 0.0 for _, lp in right + wrong)
    # the same recording, the same words: the same reading
    assert reader.word_logprobs(wav, SAID.split()) == right
    with pytest.raises(ValueError):  # past Whisper's 30 s window: refused, not cut
        reader.word_logprobs(np.zeros(31 * SR, np.float32), ["open"])


class _Aligned:
    def __init__(self, probs: list[float]) -> None:
        self.text_token_probs = probs


@pytest.mark.slow
def test_each_word_gets_the_sum_of_its_tokens(reader: Reader, monkeypatch: pytest.MonkeyPatch) -> None:
    words = ["i", "acquaintance", "said"]
    per_word = reader.tokens(words)
    assert [len(t) for t in per_word] == [1, 2, 1]  # " acquaintance": " acquaint" + "ance"
    n = sum(len(t) for t in per_word)
    probs = [0.25, 0.5, 0.5, 1.0]

    class Model:
        def __init__(self, probs: list[float]) -> None:
            self.probs = probs

        def encode(self, *_a, **_k):
            return None

        def align(self, _enc, start, tokens, frames):
            assert start == reader._start and tokens == [[t for w in per_word for t in w]] and frames == [100]
            return [_Aligned(self.probs)]

    monkeypatch.setattr(reader, "_model", Model(probs))
    wav = np.zeros(SR, np.float32)
    got = reader.word_logprobs(wav, words)
    assert [w for w, _ in got] == words
    assert got[0][1] == pytest.approx(np.log(0.25))
    assert got[1][1] == pytest.approx(2 * np.log(0.5)) and got[2][1] == 0.0
    monkeypatch.setattr(reader, "_model", Model([0.5] * (n - 1)))  # a probability short
    with pytest.raises(ModelError):
        reader.word_logprobs(wav, words)


def _copy_manifest(tmp_path: Path) -> Path:
    shutil.copy(DEFAULT_MODELS_DIR / MANIFEST_FILE, tmp_path / MANIFEST_FILE)
    return tmp_path / MANIFEST_FILE


@pytest.mark.slow
def test_a_model_file_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    path = _copy_manifest(tmp_path)
    doc = json.loads(path.read_text())
    doc["files"]["config.json"]["sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelIntegrityError, match="config.json"):
        Reader(tmp_path)


def test_a_missing_manifest_or_package_is_model_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelMissing):
        Reader(tmp_path)
    path = _copy_manifest(tmp_path)
    doc = json.loads(path.read_text())
    doc["files"]["config.json"]["parts"][0]["package"] = "no_such_whisper_package"
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelMissing):
        Reader(tmp_path)
    for text in ('{"files": {"model.bin": {"parts": "nothing"}}}', '{"files": []}', "not json",
                 '{"files": {"model.bin": {"parts": [{"package": "x", "member": "y"}], "sha256": "0", "bytes": 1}}}'):
        path.write_text(text)
        with pytest.raises(ModelError) as err:
            Reader(tmp_path)
        assert type(err.value) is ModelError, text
    # the checker refuses a kind it cannot read when it is built, not with the first phrase
    with pytest.raises(ModelError):
        ChallengeChecker(config=ChallengeConfig(reader_models_dir=tmp_path), threshold=0.0)
    assert ChallengeChecker(config=ChallengeConfig(reader_models_dir=tmp_path, recognisers=POCKETSPHINX_ONLY), threshold=0.0)


@pytest.mark.slow
def test_a_worker_that_cannot_load_whisper_says_why(tmp_path: Path) -> None:
    """A digest mismatch found while a challenge worker loads the model is raised by
    warmup, as the specific error, not as a broken pool."""
    from engine.extract import ChallengePool

    path = _copy_manifest(tmp_path)
    doc = json.loads(path.read_text())
    doc["files"]["config.json"]["sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    checker = ChallengeChecker(config=ChallengeConfig(reader_models_dir=tmp_path), threshold=0.0)
    pool = ChallengePool(checker, 1, kind="phrase")
    try:
        with pytest.raises(ModelIntegrityError):
            pool.warmup(timeout=120)
    finally:
        pool.close()


# --------------------------------------------------------------------------- in the checker


def _fake_reading(passes: list[Pass]) -> list:
    """A reading per pass: -0.5 per word for "open", -6.0 for any other first word; no
    reading at all for "nothing"."""
    out: list = []
    for p in passes:
        assert p.kind == "read", p
        if p.words[0] == "nothing":
            out.append(None)
        else:
            out.append(tuple((w, -0.5 if p.words[0] == "open" else -6.0) for w in p.words))
    return out


def test_a_phrase_is_read_in_one_pass_and_decided_on_its_mean() -> None:
    checker = ChallengeChecker(threshold=-2.0)  # default recognisers: both kinds read by Whisper
    assert checker.config.recognisers == DEFAULT_RECOGNISERS == {"digits": "whisper", "phrase": "whisper"}
    wav = np.sin(np.arange(SR, dtype=np.float32) / 7.0) * 0.3
    right, wrong, none, silent = checker.check_batch(
        [(wav, "open the door"), (wav, "close the door"), (wav, "nothing here"), (np.zeros(SR, np.float32), "open")],
        run_passes=_fake_reading)
    assert right == Verdict(True, -0.5, "read")
    assert wrong == Verdict(False, -6.0, "read")
    assert none == Verdict(False, FAILURE_SCORE, "read")
    assert isinstance(silent, NoSpeech)
    parts = checker.parts_batch([(wav, "open the door")], run_passes=_fake_reading)[0]
    assert parts == ScoreParts(words=-0.5, silence=0.0, aligned_words=-0.5,
                               word_ratios=(("open", -0.5), ("the", -0.5), ("door", -0.5)))
    assert checker.score_batch([(wav, "close it")], run_passes=_fake_reading) == [-6.0]
    # Whisper reads words pocketsphinx's dictionary does not hold; pocketsphinx refuses them
    assert checker.check_batch([(wav, "open a blorptastic door")], run_passes=_fake_reading)[0].passed
    with pytest.raises(ConfigError, match="blorptastic"):
        ChallengeChecker(config=ChallengeConfig(recognisers=POCKETSPHINX_ONLY), threshold=-2.0).check_batch(
            [(wav, "open a blorptastic door")], run_passes=_fake_reading)


def test_each_kind_goes_to_its_own_recogniser() -> None:
    checker = ChallengeChecker(config=ChallengeConfig(recognisers={"digits": "pocketsphinx", "phrase": "whisper"}), threshold=-50.0)
    seen: list[Pass] = []

    def run(passes: list[Pass]) -> list:
        seen.extend(passes)
        return [np.full(100, -10.0) if p.kind == "loop" else tuple((w, -0.5) for w in p.words) if p.kind == "read"
                else [(p.words[0], 0, 100, -2000.0)] for p in passes]

    wav = np.sin(np.arange(SR, dtype=np.float32) / 7.0) * 0.3
    digits, phrase = checker.check_batch([(wav, "1"), (wav, "open it")], run_passes=run)
    assert digits.stage == "background" and phrase == Verdict(True, -0.5, "read")
    assert sorted(p.kind for p in seen) == ["align", "loop", "read"]


def test_recognisers_are_validated_and_must_match_the_calibration(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):  # Whisper reads at most 30 s
        ChallengeConfig(max_seconds=60.0)
    assert ChallengeConfig(max_seconds=60.0, recognisers=POCKETSPHINX_ONLY).max_seconds == 60.0
    for bad in ({"digits": "whisper"}, {"digits": "pocketsphinx", "phrase": "kaldi"}, ["phrase"],
                {"digits": "pocketsphinx", "phrase": "whisper", "emoji": "whisper"}):
        with pytest.raises(ConfigError):
            ChallengeConfig(recognisers=bad)  # type: ignore[arg-type]
    mine = {"digits": "pocketsphinx", "phrase": "whisper"}
    config = ChallengeConfig(recognisers=mine)
    mine["phrase"] = "pocketsphinx"
    assert config.recognisers["phrase"] == "whisper"  # a copy of its own
    # a calibration measured with pocketsphinx for phrases (or one from before it said) is
    # refused by a checker that reads phrases with Whisper, and the other way round
    path = tmp_path / "challenge.json"
    doc = json.loads(ChallengeConfig().calibration_path.read_text())
    for measured, wanted in ((None, DEFAULT_RECOGNISERS), ({"digits": "pocketsphinx", "phrase": "pocketsphinx"}, DEFAULT_RECOGNISERS),
                             (DEFAULT_RECOGNISERS, {"digits": "pocketsphinx", "phrase": "pocketsphinx"})):
        if measured is None:
            doc.pop("recognisers", None)
        else:
            doc["recognisers"] = measured
        path.write_text(json.dumps(doc))
        cfg = dataclasses.replace(ChallengeConfig(calibration_path=path), recognisers=wanted)
        with pytest.raises(ModelError, match="recognisers"):
            ChallengeChecker(config=cfg)


@pytest.mark.slow
def test_the_checker_loads_whisper_for_a_kind_it_reads() -> None:
    checker = ChallengeChecker(threshold=-2.0)
    checker.load_decoder("phrase")
    assert isinstance(checker._reader_model, Reader)
    assert not getattr(checker._local, "decoders", {})  # no pocketsphinx decoder for phrases
    wav = decode_audio((SAMPLE / "000240031.flac").read_bytes())
    right, other = checker.check_batch([(wav, SAID.upper()), (wav, OTHER.upper())])
    assert (right.passed, right.stage, other.passed) == (True, "read", False), (right, other)


def test_readings_of_one_recording_encode_it_once() -> None:
    """The benchmark checks a recording against many wrong phrases: one encoding for all."""
    checker = ChallengeChecker(threshold=-2.0)
    calls: list[list[list[str]]] = []

    class FakeReader:
        def read_many(self, wav: np.ndarray, texts: list[list[str]]) -> list:
            calls.append(texts)
            return [tuple((w, -1.0) for w in words) for words in texts]

    checker._reader_model = FakeReader()
    a = np.sin(np.arange(SR, dtype=np.float32) / 7.0) * 0.3
    b = np.sin(np.arange(SR, dtype=np.float32) / 5.0) * 0.3
    scores = checker.score_batch([(a, "open it"), (a, "close it"), (a, "409172"), (b, "open it")])
    assert scores == [-1.0, -1.0, -1.0, -1.0]
    assert calls == [[["open", "it"], ["close", "it"], ["four", "zero", "nine", "one", "seven", "two"]], [["open", "it"]]]
