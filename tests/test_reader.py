"""Whisper's reading of the expected words (engine/challenge/reader.py), and how the challenge
checker uses it for the kinds it is configured to check (phrases, by default).

The model tests run the real Whisper base on a speechocean762 recording shipped in
``samples/``, so they never skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.inference.audio import decode_audio, from_pcm16, to_pcm16
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
from engine.inference.models import DEFAULT_MODELS_DIR
from engine.challenge.reader import COHORT_FILE, DEFAULT_COHORT_DIR, END, MANIFEST_FILE, Reader, check_cohort, load_cohort, log_mel, reader_text

from .conftest import POCKETSPHINX_ONLY

SR = 16000
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "speech" / "SPEAKER0024"
SAID = "this is a pretty good place to start"  # 000240152
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
    wav = decode_audio((SAMPLE / "000240152.flac").read_bytes())
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
    from engine.inference.extractors import ChallengePool

    path = _copy_manifest(tmp_path)
    doc = json.loads(path.read_text())
    doc["files"]["config.json"]["sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    checker = ChallengeChecker(config=ChallengeConfig(reader_models_dir=tmp_path, cohort_kinds=()), threshold=0.0)
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
    # a phrase's words are read with the sentence's end after them
    assert parts == ScoreParts(words=-0.5, silence=0.0, aligned_words=-0.5,
                               word_ratios=(("open", -0.5), ("the", -0.5), ("door", -0.5), (END, -0.5)))
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
    checker = ChallengeChecker()  # the calibrated thresholds: phrases relative to the cohort
    checker.load_decoder("phrase")
    assert isinstance(checker._reader_model, Reader)
    assert not getattr(checker._local, "decoders", {})  # no pocketsphinx decoder for phrases
    wav = decode_audio((SAMPLE / "000240152.flac").read_bytes())
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

        def relative(self, reading: tuple) -> tuple:
            return tuple((w, lp + 3.0) for w, lp in reading)

    checker._reader_model = FakeReader()
    a = np.sin(np.arange(SR, dtype=np.float32) / 7.0) * 0.3
    b = np.sin(np.arange(SR, dtype=np.float32) / 5.0) * 0.3
    scores = checker.score_batch([(a, "open it"), (a, "close it"), (a, "409172"), (b, "open it")])
    # phrases relative to the cohort (by default) and read with the sentence's end, digit
    # strings as read
    assert scores == [2.0, 2.0, -1.0, 2.0]
    assert calls == [[["open", "it", END], ["close", "it", END], ["four", "zero", "nine", "one", "seven", "two"]],
                     [["open", "it", END]]]


# --------------------------------------------------------------------------- the cohort


def _small_cohort(tmp_path: Path, said: dict[str, str]) -> Path:
    """A cohort folder of the shipped sample recordings ``said`` (file -> words)."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    recordings = []
    for name, words in said.items():
        shutil.copy(SAMPLE / name, folder / name)
        recordings.append({"file": name, "words": words, "sha256": hashlib.sha256((SAMPLE / name).read_bytes()).hexdigest()})
    (folder / COHORT_FILE).write_text(json.dumps({"format": 1, "recordings": recordings}))
    return folder


def test_the_shipped_cohort_is_whole_and_from_calibration_speakers() -> None:
    from engine.bench.datasets import load_speech

    recordings, digest = load_cohort()
    assert len(recordings) == 8 and digest == check_cohort() and len(digest) == 64
    assert all(r.wav.dtype == np.float32 and r.wav.size > 2 * SR and r.words for r in recordings)
    doc = json.loads((DEFAULT_COHORT_DIR / COHORT_FILE).read_text())
    # the split is over every speaker of the corpus, so it needs the data set
    data = DEFAULT_MODELS_DIR.parent.parent / "shared" / "data"
    if not (data / "speech" / "utt2spk").is_file():
        pytest.skip("the speechocean762 set is not beside the repository")
    part = load_speech(data).part
    assert sorted(part[r["speaker"]] for r in doc["recordings"]) == ["A"] * 8


def test_a_changed_missing_or_malformed_cohort_is_refused(tmp_path: Path) -> None:
    folder = _small_cohort(tmp_path, {"000240010.flac": OTHER})
    assert [r.words for r in load_cohort(folder)[0]] == [tuple(OTHER.split())]
    assert check_cohort(folder) == load_cohort(folder)[1]
    data = (folder / "000240010.flac").read_bytes()
    (folder / "000240010.flac").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    for check in (check_cohort, load_cohort):
        with pytest.raises(ModelIntegrityError, match="000240010"):
            check(folder)
    (folder / "000240010.flac").unlink()
    with pytest.raises(ModelMissing):
        load_cohort(folder)
    for text in ("not json", '{"recordings": []}', '{"recordings": [{"file": "../x.flac", "words": "a", "sha256": "0"}]}',
                 '{"recordings": [{"file": "x.flac", "words": "", "sha256": "0"}]}', '{"recordings": [{"file": "x.flac"}]}',
                 '{"recordings": [{"file": "..", "words": "a", "sha256": "0"}]}',
                 # words as a challenge's are written: lower case, no punctuation around them
                 '{"recordings": [{"file": "x.flac", "words": "That\'s it", "sha256": "0"}]}',
                 '{"recordings": [{"file": "x.flac", "words": "it is done.", "sha256": "0"}]}'):
        (folder / COHORT_FILE).write_text(text)
        with pytest.raises(ModelError) as err:
            load_cohort(folder)
        assert type(err.value) is ModelError, text
    (folder / COHORT_FILE).unlink()
    with pytest.raises(ModelMissing):
        load_cohort(folder)
    # a checker that scores a kind relative to the cohort refuses to start without it
    with pytest.raises(ModelMissing):
        ChallengeChecker(config=ChallengeConfig(reader_cohort_dir=folder), threshold=0.0)
    assert ChallengeChecker(config=ChallengeConfig(reader_cohort_dir=folder, cohort_kinds=()), threshold=0.0)


@pytest.mark.slow
def test_the_prior_is_the_mean_over_recordings_of_other_words(tmp_path: Path) -> None:
    cohort = {"000240010.flac": OTHER, "000240152.flac": SAID}
    reader = Reader(cohort_dir=_small_cohort(tmp_path, cohort))
    readings, wavs = {}, {}
    for name, words in cohort.items():
        wav = decode_audio((SAMPLE / name).read_bytes())
        wavs[name] = wav = from_pcm16(to_pcm16(wav))  # as the cohort is read
        readings[name] = {w: reader.word_logprobs(wav, w.split()) for w in (OTHER, SAID, "open the door")}
    # words no cohort recording says: the mean of both readings, word by word
    want = np.mean([[lp for _, lp in readings[n]["open the door"]] for n in cohort], axis=0)
    assert reader.prior("open the door".split()) == pytest.approx(want, abs=1e-4)
    # a cohort recording of the very words is left out: the other recording alone
    assert reader.prior(SAID.split()) == pytest.approx([lp for _, lp in readings["000240010.flac"][SAID]], abs=1e-4)
    # relative: each word less its prior
    got = reader.relative(readings["000240152.flac"][SAID])
    assert [w for w, _ in got] == SAID.split()
    assert [lp for _, lp in got] == pytest.approx(
        [a - b for (_, a), b in zip(readings["000240152.flac"][SAID], reader.prior(SAID.split()))], abs=1e-9)
    assert np.mean([lp for _, lp in got]) > 2.0  # the recording makes its own words far likelier than other speech does
    # the sentence's end: the full stop's token alone, scored after the words; the cohort's
    # recording of the very words is left out of its prior too
    assert reader.tokens(["it", END]) == [reader.tokens(["it"])[0], reader._tokenizer.encode(".", add_special_tokens=False).ids]
    ended = [*SAID.split(), END]
    assert reader.prior(ended) == pytest.approx([lp for _, lp in reader.word_logprobs(wavs["000240010.flac"], ended)], abs=1e-4)
    said = reader.word_logprobs(wavs["000240152.flac"], ended)
    assert [w for w, _ in said] == ended
    assert [lp for _, lp in said[:-1]] == pytest.approx([lp for _, lp in readings["000240152.flac"][SAID]], abs=1e-4)
    # where the recording ends with the words, the end is likelier than on other speech;
    # cut short, the end is unlikely where the recording goes on
    assert reader.relative(said)[-1][1] > 0.5
    short = reader.word_logprobs(wavs["000240152.flac"], ["we", "have", END])
    assert short[-1][1] < said[-1][1] - 2.0


def test_cohort_kinds_are_validated_and_must_match_the_calibration(tmp_path: Path) -> None:
    for bad in (("emoji",), "phrase"):
        with pytest.raises(ConfigError):
            ChallengeConfig(cohort_kinds=bad)  # type: ignore[arg-type]
    assert ChallengeConfig().relative_kinds == ("phrase",)
    assert ChallengeConfig(cohort_kinds=("digits", "phrase")).relative_kinds == ("digits", "phrase")
    # pocketsphinx has its own background: a kind it checks is never relative to the cohort
    assert ChallengeConfig(cohort_kinds=("digits", "phrase"), recognisers=POCKETSPHINX_ONLY).relative_kinds == ()
    path = tmp_path / "challenge.json"
    doc = json.loads(ChallengeConfig().calibration_path.read_text())
    for change in ({"relative_kinds": []}, {"relative_kinds": ["digits", "phrase"]}, {"reader_cohort": "0" * 64}):
        path.write_text(json.dumps({**doc, **change}))
        with pytest.raises(ModelError, match="cohort"):
            ChallengeChecker(config=ChallengeConfig(calibration_path=path))
    # measured before the sentence's end was scored: refused too
    path.write_text(json.dumps({k: v for k, v in doc.items() if k != "relative_end"}))
    with pytest.raises(ModelError, match="sentence's end"):
        ChallengeChecker(config=ChallengeConfig(calibration_path=path))
    path.write_text(json.dumps(doc))
    assert ChallengeChecker(config=ChallengeConfig(calibration_path=path)).thresholds["phrase"] == doc["thresholds"]["phrase"]


@pytest.mark.slow
def test_a_cohort_other_than_the_calibrated_one_is_refused(tmp_path: Path) -> None:
    folder = _small_cohort(tmp_path, {"000240010.flac": OTHER})
    digest = check_cohort(folder)
    assert Reader(cohort_dir=folder, cohort_digest=digest).prior(["open", "it"])
    with pytest.raises(ModelIntegrityError, match="calibration"):
        Reader(cohort_dir=folder, cohort_digest="0" * 64).prior(["open", "it"])


class _CohortReader:
    """A reader whose readings are -1.0 per word and whose cohort passes are counted (and
    fail where told to)."""

    def __init__(self, fail: bool = False) -> None:
        self.priors: dict[tuple[str, ...], tuple[float, ...]] = {}
        self.runs, self.fail = 0, fail

    def read_many(self, wav: np.ndarray, texts: list[list[str]]) -> list:
        return [tuple((w, -1.0) for w in words) for words in texts]

    def knows(self, words: list[str]) -> bool:
        return tuple(words) in self.priors

    def prior(self, words: list[str]) -> tuple[float, ...]:
        if self.fail:
            raise RuntimeError("out of memory")
        if tuple(words) not in self.priors:
            self.runs += 1
            self.priors[tuple(words)] = tuple(-4.0 for _ in words)
        return self.priors[tuple(words)]

    def relative(self, reading: tuple) -> tuple:
        return tuple((w, lp - p) for (w, lp), p in zip(reading, self.prior([w for w, _ in reading])))


def test_a_phrase_prepares_its_cohort_passes_once() -> None:
    checker = ChallengeChecker(threshold=0.0)
    checker._reader_model = fake = _CohortReader()
    assert checker.prepare("Open the door") and fake.runs == 1
    assert list(fake.priors) == [("open", "the", "door", END)]  # the words and the end, as the check reads them
    assert not checker.prepare("open the door.") and fake.runs == 1  # the same words
    assert not checker.prepare("409172") and fake.runs == 1  # digit strings: scored as read
    wav = np.sin(np.arange(SR, dtype=np.float32) / 7.0) * 0.3
    assert checker.score_batch([(wav, "open the door"), (wav, "409172")]) == [3.0, -1.0]
    assert fake.runs == 1


def test_a_failure_in_the_cohort_passes_is_the_models_not_the_recordings() -> None:
    """A recording the reader refuses fails its check; the cohort failing is a model error
    (the resident's reading is not to be failed for it)."""
    checker = ChallengeChecker(threshold=0.0)
    checker._reader_model = _CohortReader(fail=True)
    wav = np.sin(np.arange(SR, dtype=np.float32) / 7.0) * 0.3
    assert checker.score_batch([(wav, "409172")]) == [-1.0]  # no cohort for digit strings
    with pytest.raises(ModelError, match="cohort"):
        checker.score_batch([(wav, "open the door")])
