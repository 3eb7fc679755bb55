"""The spoken challenge: drawing challenges, their words, phrase lists, calibration, and the
recogniser on real speech (speechocean762, Free Spoken Digit Dataset; skipped when absent).

Decision recorded here: a silent recording is a :class:`NoSpeech` sample error, never a
low score (a score says how well the words fit; silence holds no words to fit).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.challenge import (
    DIGIT_WORDS,
    FAILURE_SCORE,
    ChallengeChecker,
    ChallengeConfig,
    Pass,
    ScoreParts,
    Screen,
    Verdict,
    challenge_words,
    load_calibration,
    load_phrases,
    new_challenge,
)
from engine.challenge.decoder import Decoder as _Decoder
from engine.challenge.scoring import ratios as _ratios
from engine.errors import (
    ConfigError,
    ModelError,
    ModelMissing,
    NoSpeech,
    SampleError,
    SampleTooLarge,
    TooLittleSpeech,
    UndecodableSample,
)
from engine.challenge.pronunciation import VARIANTS_VERSION, pronunciation_variants

from .conftest import POCKETSPHINX_ONLY

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SPEECH = DATA / "speech"
DIGITS = DATA / "digits"
SR = 16000

# A speechocean762 utterance (part of the corpus's fluent majority) and another sentence.
UTT, SPEAKER = "000240031", "0024"
OTHER_SENTENCE = "MOSTLY THE AMERICAN COMMUNITY IN EUROPE FOLLOWS THE GAME"


# --------------------------------------------------------------------------- challenges


def test_digit_challenges_are_random_and_well_formed() -> None:
    draws = [new_challenge() for _ in range(400)]
    assert all(len(d) == 6 and d.isascii() and d.isdigit() for d in draws)
    assert len(set(draws)) > 390  # 1e6 possibilities: repeats are rare
    counts = Counter("".join(draws))
    assert set(counts) == set("0123456789")
    assert min(counts.values()) > 150  # 2400 digits, 240 expected each
    assert len(new_challenge(length=9)) == 9


def test_phrase_challenges_come_from_the_list() -> None:
    phrases = ("open the door", "the sun is warm", "we have climbed one step")
    draws = {new_challenge(kind="phrase", phrases=phrases) for _ in range(200)}
    assert draws == set(phrases)


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="phrase"), dict(kind="emoji"), dict(length=0), dict(length=33)],
)
def test_bad_challenge_requests_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        new_challenge(**kwargs)


def test_challenge_words() -> None:
    assert challenge_words("409172") == ["four", "zero", "nine", "one", "seven", "two"]
    assert challenge_words("4 0 9") == ["four", "zero", "nine"]
    assert challenge_words("Don't stop, NOW!") == ["don't", "stop", "now"]
    with pytest.raises(ConfigError):
        challenge_words("meet me at 5")
    with pytest.raises(ConfigError):
        challenge_words(" ,.; ")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=32))
def test_digit_words_round_trip(digits: str) -> None:
    words = challenge_words(digits)
    assert "".join(str(DIGIT_WORDS.index(w)) for w in words) == digits


def test_phrase_list_is_checked_when_loaded() -> None:
    loaded = load_phrases(["  open   the door ", "", "Open the door", "the sun is warm"])
    assert loaded == ("open the door", "the sun is warm")
    # pocketsphinx needs every word in its dictionary; Whisper (the default for phrases) does not
    aligned = ChallengeConfig(recognisers={"digits": "pocketsphinx", "phrase": "pocketsphinx"})
    with pytest.raises(ConfigError, match="blorptastic"):
        load_phrases(["open the door", "a blorptastic morning"], config=aligned)
    assert load_phrases(["open the door", "a blorptastic morning"]) == ("open the door", "a blorptastic morning")
    with pytest.raises(ConfigError):
        load_phrases(["", "   "])
    with pytest.raises(ConfigError):
        load_phrases(["123456"])
    with pytest.raises(ConfigError):
        load_phrases([" ".join(["word"] * 30)])


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        ChallengeConfig(beam=0.0)
    with pytest.raises(ConfigError):
        ChallengeConfig(min_seconds=5.0, max_seconds=1.0)
    with pytest.raises(ConfigError):
        ChallengeConfig(silence_weight=-1.0)
    for gaussians in (0, 17):
        with pytest.raises(ConfigError, match="top_gaussians"):
            ChallengeConfig(top_gaussians=gaussians)
    for rates in ({"digits": 100}, {"digits": 100, "phrase": 39}, {"digits": 100, "phrase": 55.5}, {"digits": 100, "phrase": 55, "x": 1}):
        with pytest.raises(ConfigError, match="frame_rates"):
            ChallengeConfig(frame_rates=rates)


# --------------------------------------------------------------------------- calibration

# the scoring tests below are of pocketsphinx's alignment, for both kinds (POCKETSPHINX_ONLY)


def _calibration(tmp_path: Path, threshold: float, *, measured: dict | None = None, **per_kind: float) -> ChallengeConfig:
    path = tmp_path / "challenge.json"
    doc = {"threshold": threshold, "target_wrong_phrase_acceptance": 0.001, "frame_step": 1, "beam": ChallengeConfig().beam,
           "top_gaussians": ChallengeConfig().top_gaussians, "frame_rates": dict(ChallengeConfig().frame_rates),
           "pronunciation_variants": VARIANTS_VERSION, "variant_kinds": ["phrase"], "recognisers": POCKETSPHINX_ONLY,
           **(measured or {})}
    if per_kind:
        doc["thresholds"] = per_kind
    path.write_text(json.dumps(doc))
    return ChallengeConfig(calibration_path=path, recognisers=POCKETSPHINX_ONLY)


def test_accept_uses_the_calibrated_threshold(tmp_path: Path) -> None:
    checker = ChallengeChecker(config=_calibration(tmp_path, -12.5))
    assert checker.threshold == -12.5
    assert checker.accept(-12.5) and checker.accept(3.0)
    assert not checker.accept(-12.5001)
    assert not checker.accept(math.nan)
    assert not checker.accept(FAILURE_SCORE)
    assert ChallengeChecker(config=_calibration(tmp_path, -12.5), threshold=1.0).threshold == 1.0


def test_each_challenge_kind_has_its_own_threshold(tmp_path: Path) -> None:
    checker = ChallengeChecker(config=_calibration(tmp_path, -20.0, digits=-20.0, phrase=-30.0))
    assert checker.threshold_for("409172") == -20.0
    assert checker.threshold_for("open the door") == -30.0
    assert checker.accept(-25.0, "open the door")
    assert not checker.accept(-25.0, "409172")
    assert not checker.accept(-25.0)  # without the kind: the stricter threshold
    only_one = ChallengeChecker(config=_calibration(tmp_path, -20.0, digits=-22.0))
    assert only_one.thresholds == {"digits": -22.0, "phrase": -20.0}


def test_the_score_is_computed_as_it_was_calibrated(tmp_path: Path) -> None:
    """Each kind's silence weight comes from the calibration, and a calibration measured on
    other frames or with another beam is refused."""
    measured = {"silence_weights": {"digits": 1.5, "phrase": 0.25}, "frame_step": 1, "beam": ChallengeConfig().beam}
    config = _calibration(tmp_path, -10.0, measured=measured)
    checker = ChallengeChecker(config=config)
    assert checker.silence_weights == {"digits": 1.5, "phrase": 0.25}
    with pytest.raises(ModelError, match="silence_weight"):
        ChallengeChecker(config=dataclasses.replace(config, silence_weight=1.5))
    with pytest.raises(ModelError, match="frame_step"):
        ChallengeChecker(config=dataclasses.replace(config, frame_step=2))
    with pytest.raises(ModelError, match="beam"):
        ChallengeChecker(config=dataclasses.replace(config, beam=1e-48))
    with pytest.raises(ModelError, match="top_gaussians"):
        ChallengeChecker(config=dataclasses.replace(config, top_gaussians=config.top_gaussians % 4 + 1))
    with pytest.raises(ModelError, match="frame rates"):
        ChallengeChecker(config=dataclasses.replace(config, frame_rates={**config.frame_rates, "phrase": 70}))
    for kinds in ((), ("digits", "phrase")):
        with pytest.raises(ModelError, match="variants"):
            ChallengeChecker(config=dataclasses.replace(config, variant_kinds=kinds))
    # an older calibration: one weight for every kind, and neither beam (it was 1e-48), the
    # Gaussians per codebook (pocketsphinx's 4), the frame rates (100 for both kinds) nor
    # pronunciation variants recorded (there were none)
    one = _calibration(tmp_path, -10.0, measured={"silence_weight": 0.5, "frame_step": 1})
    doc = json.loads(one.calibration_path.read_text())
    del doc["beam"], doc["top_gaussians"], doc["frame_rates"], doc["pronunciation_variants"], doc["variant_kinds"]
    one.calibration_path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="beam"):
        ChallengeChecker(config=one)
    with pytest.raises(ModelError, match="top_gaussians"):
        ChallengeChecker(config=dataclasses.replace(one, beam=1e-48, top_gaussians=2))
    with pytest.raises(ModelError, match="frame rates"):
        ChallengeChecker(config=dataclasses.replace(one, beam=1e-48, top_gaussians=4))
    with pytest.raises(ModelError, match="variants"):
        ChallengeChecker(config=dataclasses.replace(one, beam=1e-48, top_gaussians=4, frame_rates={"digits": 100, "phrase": 100}))
    # variants recorded without the kinds they applied to, or kinds without a version
    for fields in ({"pronunciation_variants": 1}, {"variant_kinds": ["phrase"]}, {"pronunciation_variants": 1, "variant_kinds": "phrase"},
                   {"pronunciation_variants": 1, "variant_kinds": ["sentences"]}):
        (tmp_path / "bad").mkdir(exist_ok=True)
        bad = _calibration(tmp_path / "bad", -10.0, measured=fields)
        doc = json.loads(bad.calibration_path.read_text())
        for key in ("pronunciation_variants", "variant_kinds"):
            if key not in fields:
                del doc[key]
        bad.calibration_path.write_text(json.dumps(doc))
        for kinds in ((), ("phrase",)):
            with pytest.raises(ModelError, match="malformed|unknown"):
                ChallengeChecker(config=dataclasses.replace(bad, variant_kinds=kinds))
    older = dataclasses.replace(one, beam=1e-48, variant_kinds=(), frame_rates={"digits": 100, "phrase": 100})
    assert ChallengeChecker(config=older).silence_weights == {"digits": 0.5, "phrase": 0.5}
    assert ChallengeChecker(config=dataclasses.replace(older, silence_weight=0.5)).silence_weights["digits"] == 0.5
    assert ChallengeChecker(threshold=0.0).silence_weights == {"digits": 1.0, "phrase": 1.0}


def test_a_kind_without_its_own_calibration_is_scored_like_the_strictest(tmp_path: Path) -> None:
    config = _calibration(tmp_path, -20.0, measured={"silence_weights": {"digits": 2.0}}, digits=-20.0)
    checker = ChallengeChecker(config=config)
    assert checker.silence_weights == {"digits": 2.0, "phrase": 2.0}
    assert checker.thresholds == {"digits": -20.0, "phrase": -20.0}


def test_score_batch_weighs_silence_by_the_challenge_kind(tmp_path: Path) -> None:
    measured = {"silence_weights": {"digits": 2.0, "phrase": 0.25}}
    checker = ChallengeChecker(config=_calibration(tmp_path, -10.0, measured=measured, digits=-40.0, phrase=-10.0))
    parts = [ScoreParts(words=-10.0, silence=-10.0), ScoreParts(words=-10.0, silence=-10.0), None, NoSpeech()]
    checker.parts_batch = lambda items, run_passes=None: parts  # type: ignore[method-assign]
    wav = np.zeros(SR, dtype=np.float32)
    out = checker.score_batch([(wav, "409172"), (wav, "open the door"), (wav, "409172"), (wav, "409172")])
    assert out[:3] == [-30.0, -12.5, FAILURE_SCORE]
    assert isinstance(out[3], NoSpeech)


_SCREENS = {"screens": {"digits": {"silence_weight": 1.0, "accept": -60.0, "reject": -90.0}},
            "silence_weights": {"digits": 1.0, "phrase": 1.0}}


def _fake_passes(align_score: dict[str, float], loop_per_frame: float, log: list[Pass]):
    """Decoding passes of fixed scores: each alignment is one word of 100 frames scoring
    ``align_score[first expected word]`` per frame, and the phone loop scores
    ``loop_per_frame`` in every frame; every pass run is logged."""

    def run(passes: list[Pass]) -> list:
        log.extend(passes)
        return [np.full(100, loop_per_frame) if p.kind == "loop" else [(p.words[0], 0, 100, 100 * align_score[p.words[0]])]
                for p in passes]

    return run


def test_one_recording_checked_as_two_kinds_gets_a_background_at_each_rate() -> None:
    """The phone loop of a recording is decoded at the frame rate of each kind it is
    checked as, and each alignment is scored against the background at its own rate."""
    config = ChallengeConfig(frame_rates={"digits": 85, "phrase": 55}, recognisers=POCKETSPHINX_ONLY)
    checker = ChallengeChecker(config=config, threshold=-50.0)
    seen: list[Pass] = []

    def run(passes: list[Pass]) -> list:
        seen.extend(passes)
        # the background per frame depends on the rate: -10 at 85, -1000 at 55
        return [np.full(100, -10.0 if p.frame_rate == 85 else -1000.0) if p.kind == "loop"
                else [(p.words[0], 0, 100, -2000.0)] for p in passes]

    wav = np.sin(np.arange(SR, dtype=np.float32) / 7.0) * 0.3
    digits, phrase = checker.check_batch([(wav, "1"), (wav, "open")], run_passes=run)
    assert sorted((p.kind, p.frame_rate) for p in seen) == [("align", 55), ("align", 85), ("loop", 55), ("loop", 85)]
    assert (digits.score, digits.passed) == (-10.0, True)  # (-2000 - 100 * -10) / 100
    assert (phrase.score, phrase.passed) == (980.0, True)  # (-2000 - 100 * -1000) / 100
    with pytest.raises(ConfigError, match="frame_rates"):
        ChallengeConfig(frame_rates=["digits", "phrase"])  # type: ignore[arg-type]
    rates = {"digits": 85, "phrase": 55}
    config = ChallengeConfig(frame_rates=rates)
    rates["phrase"] = 100
    assert config.frame_rates == {"digits": 85, "phrase": 55}


def test_the_screen_decides_clear_alignments_without_the_phone_loop(tmp_path: Path) -> None:
    config = _calibration(tmp_path, -20.0, measured=_SCREENS, digits=-20.0, phrase=-20.0)
    checker = ChallengeChecker(config=config)
    assert checker.screens == {"digits": Screen(silence_weight=1.0, accept=-60.0, reject=-90.0)}
    wav = (np.random.default_rng(3).standard_normal(SR) * 0.1).astype(np.float32)
    log: list[Pass] = []
    # "one": clear pass; "two": clear fail; "three": in between (-80 against no background,
    # -80 - (-70) = -10 per frame against the phone loop: passes at -20)
    run = _fake_passes({"one": -50.0, "two": -95.0, "three": -80.0, "four": -80.0}, -70.0, log)
    out = checker.check_batch([(wav, "1"), (wav, "2"), (wav, "3")], run_passes=run)
    assert out == [Verdict(True, -50.0, "screen"), Verdict(False, -95.0, "screen"), Verdict(True, -10.0, "background")]
    assert [p.kind for p in log] == ["align", "align", "align", "loop"]  # one phone loop, for "3" only
    # a kind without a screen decodes both passes at once; the threshold decides
    log.clear()
    out = checker.check_batch([(wav, "four"), (wav, "1")], run_passes=run)
    assert out == [Verdict(True, -10.0, "background"), Verdict(True, -50.0, "screen")]
    assert [p.kind for p in log] == ["align", "align", "loop"]
    # without the screen (configured off, or with an explicit weight): both passes, every time
    for off in (dataclasses.replace(config, screen=False), dataclasses.replace(config, silence_weight=1.0)):
        plain = ChallengeChecker(config=off)
        assert plain.screens == {}
        log.clear()
        assert plain.check_batch([(wav, "1"), (wav, "2")], run_passes=run) == [
            Verdict(True, 20.0, "background"), Verdict(False, -25.0, "background")]
        assert sorted(p.kind for p in log) == ["align", "align", "loop"]
    # unusable recordings keep their place
    silent = np.zeros(SR, dtype=np.float32)
    out = checker.check_batch([(silent, "1"), (wav, "1")], run_passes=run)
    assert isinstance(out[0], NoSpeech) and out[1] == Verdict(True, -50.0, "screen")


def test_word_offsets_apply_to_their_kind_only(tmp_path: Path) -> None:
    """A kind's word offsets are subtracted from each of its words' ratios before the mean;
    another kind's words, and words without an offset, count as measured."""
    offsets = {"digits": {"six": -40.0, "one": -5.0}}
    config = _calibration(tmp_path, -20.0, measured={"silence_weights": {"digits": 1.0, "phrase": 1.0}, "word_offsets": offsets},
                          digits=10.0, phrase=-20.0)
    checker = ChallengeChecker(config=config)
    assert checker.word_offsets == offsets
    log: list[Pass] = []
    # every word scores its own per frame against a phone loop of 0
    run = _fake_passes({"six": -45.0, "one": -10.0, "two": -30.0}, 0.0, log)
    wav = (np.random.default_rng(4).standard_normal(SR) * 0.1).astype(np.float32)
    out = checker.check_batch([(wav, "6"), (wav, "1"), (wav, "2"), (wav, "six")], run_passes=run)
    # "6": -45 - (-40); "1": -10 - (-5); "2": no offset; the phrase "six": no offsets for phrases
    assert [(v.score, v.passed) for v in out] == [(-5.0, False), (-5.0, False), (-30.0, False), (-45.0, False)]
    assert checker.score_batch([(wav, "6")], run_passes=run) == [-5.0]
    parts = ScoreParts(words=-20.0, silence=-10.0, word_ratios=(("six", -30.0), ("one", -10.0)))
    assert parts.score(0.5) == -25.0
    assert parts.score(0.5, {"six": -40.0}) == -5.0  # mean(10, -10) - 5
    assert ScoreParts(words=-20.0, silence=0.0).score(1.0, {"six": -40.0}) == -20.0  # no words known: as measured
    # offsets for a kind without a threshold of its own, an unknown kind, a value that is
    # not a number, or a file without a threshold for every kind
    for bad, per_kind in (({"phrase": {"a": 1.0}}, {"digits": -20.0}), ({"numbers": {"six": 1.0}}, {"digits": -20.0, "phrase": -20.0}),
                          ({"digits": {"six": math.nan}}, {"digits": -20.0, "phrase": -20.0}),
                          ({"digits": {"six": "low"}}, {"digits": -20.0, "phrase": -20.0}),
                          ({"digits": {"six": 1.0}}, {"digits": -20.0})):
        with pytest.raises(ModelError):
            ChallengeChecker(config=_calibration(tmp_path, -20.0, measured={"word_offsets": bad}, **per_kind))


def test_each_word_keeps_its_own_ratio() -> None:
    """An alignment's words (without their pronunciation number) and their ratios per frame,
    in order; silences count apart."""
    entries = [("<sil>", 0, 10, -100.0), ("six(2)", 10, 20, -400.0), ("<sil>", 30, 5, -50.0), ("one", 35, 10, -50.0)]
    parts = _ratios(entries, np.full(45, -5.0))
    assert parts is not None
    assert parts.word_ratios == (("six", -15.0), ("one", 0.0))
    assert parts.words == -7.5
    assert parts.silence == pytest.approx((-150.0 + 75.0) / 15)
    assert _ratios([("<sil>", 0, 10, -100.0)], None) is None


def test_the_benchmark_measures_word_offsets_between_genuine_and_wrong() -> None:
    from engine.bench.challenge import MIN_WORD_RATIOS, Result, Task, apply_weight, choose_word_offsets

    def result(part: str, ratios: list[tuple[tuple[str, float], ...]]) -> Result:
        task = Task("digits", part, "george", ("digits",), ("6",) * len(ratios), ("genuine",) + ("wrong",) * (len(ratios) - 1))
        return Result(task, parts=[ScoreParts(words=0.0, silence=0.0, word_ratios=r) for r in ratios])

    a = [result("A", [(("six", -30.0), ("one", -2.0)), (("six", -70.0), ("one", -40.0))]) for _ in range(MIN_WORD_RATIOS)]
    a.append(result("A", [(("two", 0.0),), (("two", -50.0),)]))  # too few to measure
    b = [result("B", [(("six", 100.0),), (("six", 100.0),)])]  # part B never counts
    offsets, detail = choose_word_offsets(a + b, "digits")
    assert offsets == {"six": -50.0, "one": -21.0}
    assert detail["two"] == {"n_genuine": 1, "n_wrong": 1, "genuine_median": 0.0, "wrong_median": -50.0}
    apply_weight(a, "digits", 0.0, offsets)
    assert a[0].scores == [pytest.approx((20.0 + 19.0) / 2), pytest.approx((-20.0 - 19.0) / 2)]
    assert choose_word_offsets(a + b, "speech") == ({}, {})


def test_a_screen_must_be_consistent(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Screen(silence_weight=1.0, accept=-90.0, reject=-60.0)
    with pytest.raises(ValueError):
        Screen(silence_weight=1.0, accept=math.nan, reject=-60.0)
    for screens in ({"digits": {"silence_weight": 1.0, "accept": -90.0, "reject": -60.0}},  # reject above accept
                    {"digits": {"accept": -60.0, "reject": -90.0}},  # no weight
                    {"numbers": {"silence_weight": 1.0, "accept": -60.0, "reject": -90.0}}):  # unknown kind
        with pytest.raises(ModelError):
            ChallengeChecker(config=_calibration(tmp_path, -20.0, measured={**_SCREENS, "screens": screens}, digits=-20.0))
    # a screen for a kind the file has no threshold of its own for
    with pytest.raises(ModelError, match="screen"):
        ChallengeChecker(config=_calibration(tmp_path, -20.0, measured=_SCREENS, phrase=-20.0))


def test_pronunciation_variants_each_rule_alone() -> None:
    assert pronunciation_variants("TH R IY".split()) == [("S", "R", "IY"), ("TH", "R", "IH")]
    # a devoiced final consonant, the final consonant dropped, a vowel added after it
    assert pronunciation_variants("D AA G Z".split()) == [("D", "AA", "G", "S"), ("D", "AA", "G"), ("D", "AA", "G", "Z", "AH")]
    assert pronunciation_variants("V EH R IY".split()) == [("W", "EH", "R", "IY"), ("V", "EH", "R", "IH")]
    assert pronunciation_variants("DH AH".split()) == [("D", "AH")]
    assert pronunciation_variants(["AH"]) == [] and pronunciation_variants([]) == []


def test_the_decoder_adds_each_words_variants_once() -> None:
    dec = _Decoder(ChallengeConfig(), variants=True, frame_rate=55)
    ps = dec.ps
    added: list[str] = []

    class Counting:  # the decoder's dictionary, with its additions counted
        def __getattr__(self, name: str):
            return getattr(ps, name)

        def add_word(self, word: str, phones: str, update: bool = True) -> int:
            added.append(word)
            return ps.add_word(word, phones, update)

    dec.ps = Counting()  # type: ignore[assignment]
    assert ps.lookup_word("the(2)") == "DH IY" and ps.lookup_word("the(3)") is None
    dec._extend(["the", "three", "the"])
    dec._extend(["three"])
    assert added == ["the(3)", "three(2)", "three(3)"]
    assert [ps.lookup_word(w) for w in ("the(3)", "three(2)", "three(3)", "three(4)")] == ["D AH", "S R IY", "TH R IH", None]
    assert ps.lookup_word("the") == "DH AH" and ps.lookup_word("three") == "TH R IY"  # the dictionary's own come first
    plain = _Decoder(ChallengeConfig(), frame_rate=55)
    pcm = (np.sin(np.arange(SR) / 7.0) * 8000).astype("<i2").tobytes()
    plain.align(pcm, ["three"])
    assert plain.ps.lookup_word("three(2)") is None


def test_only_the_configured_kinds_are_aligned_with_variants() -> None:
    """Phrases are aligned with pronunciation variants, digit strings (by default) not: each
    on its own decoder, so a digit word in a phrase does not change how digits are scored."""
    digits, phrase = 100, 55
    config = ChallengeConfig(frame_rates={"digits": digits, "phrase": phrase}, recognisers=POCKETSPHINX_ONLY)
    checker = ChallengeChecker(config=config, threshold=0.0)
    seen: list = []
    checker.run_passes = lambda passes: seen.extend(passes) or [np.zeros(200) if p.kind == "loop" else None for p in passes]  # type: ignore[method-assign]
    wav = np.sin(np.arange(SR, dtype=np.float32) / 7.0) * 0.3
    checker.parts_batch([(wav, "409172"), (wav, "one two three")])
    assert [(p.kind, p.variants, p.frame_rate) for p in seen] == [
        ("loop", False, digits), ("align", False, digits), ("loop", False, phrase), ("align", True, phrase)]
    # decoded for real: "three" said in a phrase gains its variants on one decoder only
    real = ChallengeChecker(config=checker.config, threshold=0.0)
    real.parts_batch([(wav, "one two three"), (wav, "333")])
    assert real._decoder(True, phrase).ps.lookup_word("three(2)") == "S R IY"
    assert real._decoder(False, digits).ps.lookup_word("three(2)") is None
    # each kind's decoders analyse its own frames per second
    assert float(real._decoder(True, phrase).ps.config["frate"]) == phrase
    assert float(real._decoder(False, digits).ps.config["frate"]) == digits
    with pytest.raises(ConfigError):
        ChallengeConfig(variant_kinds=("sentences",))


def test_a_worker_preloads_the_decoder_of_the_engines_challenge_kind() -> None:
    config = ChallengeConfig(frame_rates={"digits": 85, "phrase": 55}, recognisers=POCKETSPHINX_ONLY)
    checker = ChallengeChecker(config=config, threshold=0.0)
    checker.load_decoder("phrase")
    assert set(checker._local.decoders) == {(False, 55)} and checker._reader_model is None


def test_score_parts_weigh_only_silence_that_fits_worse_than_free_phones() -> None:
    assert ScoreParts(words=-20.0, silence=-10.0).score(1.5) == -35.0
    assert ScoreParts(words=-20.0, silence=4.0).score(1.5) == -20.0
    assert ScoreParts(words=-20.0, silence=-10.0).score(0.0) == -20.0


def test_shipped_calibration_is_the_default() -> None:
    path = ChallengeConfig().calibration_path
    if not path.is_file():
        pytest.skip("models/challenge.json not written yet (netid bench challenge --write-calibration)")
    doc = json.loads(path.read_text())
    assert doc["frame_step"] == ChallengeConfig().frame_step
    assert doc["beam"] == ChallengeConfig().beam
    assert doc["variant_kinds"] == list(ChallengeConfig().variant_kinds) and doc["pronunciation_variants"] == VARIANTS_VERSION
    assert doc["recognisers"] == ChallengeConfig().recognisers
    checker = ChallengeChecker()
    assert checker.silence_weights == doc["silence_weights"]
    assert checker.threshold == doc["threshold"]
    assert doc["target_wrong_phrase_acceptance"] == 0.001
    assert checker.accept(doc["threshold"]) and not checker.accept(doc["threshold"] - 0.01)
    for kind, thr in doc.get("thresholds", {}).items():
        assert checker.thresholds[kind] == thr <= doc["threshold"]


def test_the_benchmark_reports_the_shipped_operating_point_as_shipped() -> None:
    """``netid bench challenge --calibrated`` takes each set's weight, threshold and screen
    from the shipped calibration, by the set's challenge kind."""
    from engine.bench.challenge import _shipped_operating_point

    path = ChallengeConfig().calibration_path
    if not path.is_file():
        pytest.skip("models/challenge.json not written yet (netid bench challenge --write-calibration)")
    doc = json.loads(path.read_text())
    weights, per_set, screens, operating, offsets = _shipped_operating_point(ChallengeChecker(), ["speech", "digits"])
    assert offsets == {s: doc["word_offsets"][kind] for s, kind in (("speech", "phrase"), ("digits", "digits"))
                       if kind in doc.get("word_offsets", {})}
    assert weights == {"speech": doc["silence_weights"]["phrase"], "digits": doc["silence_weights"]["digits"]}
    assert per_set["speech"]["threshold"] == doc["thresholds"]["phrase"]
    assert per_set["digits"]["threshold"] == doc["thresholds"]["digits"]
    assert operating == doc["threshold"]
    for set_, kind in (("speech", "phrase"), ("digits", "digits")):
        if doc["recognisers"][kind] == "pocketsphinx":
            assert screens[set_] is not None and screens[set_].accept == doc["screens"][kind]["accept"]
        else:  # read by Whisper in one pass: no screen
            assert screens[set_] is None and kind not in doc["screens"]


def test_missing_or_broken_calibration(tmp_path: Path) -> None:
    with pytest.raises(ModelMissing):
        ChallengeChecker(config=ChallengeConfig(calibration_path=tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    for text in ('{"threshold": "high"}', '{"threshold": 1, "target_wrong_phrase_acceptance": 0.001, "thresholds": {"emoji": 1}}',
                 '{"threshold": 1, "target_wrong_phrase_acceptance": 0.001, "thresholds": {"digits": NaN}}',
                 '{"threshold": 1, "target_wrong_phrase_acceptance": 0.001, "silence_weights": {"digits": -1}}',
                 '{"threshold": 1, "target_wrong_phrase_acceptance": 0.001, "silence_weights": {"emoji": 1}}',
                 '{"threshold": 1, "target_wrong_phrase_acceptance": 0.001, "thresholds": {"digits": 1, "phrase": 0},'
                 ' "silence_weights": {"digits": 2}}',
                 '{"threshold": 1, "target_wrong_phrase_acceptance": 0.001, "silence_weights": {"digits": 2}}', "not json"):
        bad.write_text(text)
        with pytest.raises(ModelError):
            load_calibration(bad)


# --------------------------------------------------------------------------- samples


@pytest.fixture(scope="module")
def checker() -> ChallengeChecker:
    return ChallengeChecker(threshold=0.0)


def test_unusable_recordings_are_sample_errors_one_for_one(checker: ChallengeChecker) -> None:
    rng = np.random.default_rng(11)
    items = [
        (np.zeros(2 * SR, dtype=np.float32), "409172"),  # silence
        ((rng.standard_normal(SR // 10) * 0.1).astype(np.float32), "409172"),  # 0.1 s
        (np.zeros((2, SR), dtype=np.float32), "409172"),  # not mono
        (np.full(SR, np.nan, dtype=np.float32), "409172"),
        ((rng.standard_normal(31 * SR) * 0.1).astype(np.float32), "409172"),  # too long
    ]
    out = checker.score_batch(items)
    assert len(out) == len(items)
    assert [type(x) for x in out] == [NoSpeech, TooLittleSpeech, UndecodableSample, UndecodableSample, SampleTooLarge]
    assert all(isinstance(x, SampleError) for x in out)
    assert checker.score_batch([]) == []


def test_unknown_words_at_scoring_are_config_errors() -> None:
    """For a kind pocketsphinx aligns (Whisper reads any word: tests/test_reader.py)."""
    aligned = ChallengeChecker(config=ChallengeConfig(recognisers=POCKETSPHINX_ONLY), threshold=0.0)
    with pytest.raises(ConfigError):
        aligned.score_batch([(np.zeros(SR, dtype=np.float32), "the blorptastic door")])


# --------------------------------------------------------------------------- real speech

needs_speech = pytest.mark.skipif(not (SPEECH / f"SPEAKER{SPEAKER}" / f"{UTT}.flac").is_file(), reason="speechocean762 absent")
needs_digits = pytest.mark.skipif(not (DIGITS / "0_jackson_0.flac").is_file(), reason="FSDD absent")


def _speech(utt: str, speaker: str) -> tuple[np.ndarray, str]:
    from engine.inference.audio import decode_audio

    text = dict(ln.split(" ", 1) for ln in (SPEECH / "text").read_text().splitlines() if ln.strip())
    return decode_audio((SPEECH / f"SPEAKER{speaker}" / f"{utt}.flac").read_bytes()), text[utt]


def _digit_string(speaker: str, digits: str, seed: int) -> np.ndarray:
    """One speaker's FSDD recordings of ``digits`` joined by short noise gaps, 8 -> 16 kHz."""
    import soundfile
    import soxr

    rng = np.random.default_rng(seed)
    parts = [(rng.standard_normal(2400) * 1e-3).astype(np.float32)]
    for i, d in enumerate(digits):
        wav, rate = soundfile.read(DIGITS / f"{d}_{speaker}_{i + 10}.flac", dtype="float32")
        assert rate == 8000
        parts += [wav, (rng.standard_normal(int(rng.uniform(0.1, 0.25) * 8000)) * 1e-3).astype(np.float32)]
    return soxr.resample(np.concatenate(parts), 8000, SR, quality="HQ").astype(np.float32)


@pytest.mark.slow
@needs_speech
def test_sentence_scores_higher_against_its_own_transcript(checker: ChallengeChecker) -> None:
    wav, said = _speech(UTT, SPEAKER)
    # read by Whisper (the default for phrases): log-probability per word, in nats
    own, other = checker.score_batch([(wav, said), (wav, OTHER_SENTENCE)])
    assert isinstance(own, float) and isinstance(other, float)
    assert own > -1.0 and own > other + 3.0, (own, other)
    # aligned by pocketsphinx: log-likelihood ratio per frame against its phone loop
    aligned = ChallengeChecker(config=ChallengeConfig(recognisers=POCKETSPHINX_ONLY), threshold=0.0)
    own, other = aligned.score_batch([(wav, said), (wav, OTHER_SENTENCE)])
    assert isinstance(own, float) and isinstance(other, float)
    assert own > other + 10.0, (own, other)


@pytest.mark.slow
@needs_digits
def test_digit_string_scores_higher_for_the_right_digits(checker: ChallengeChecker) -> None:
    wav = _digit_string("jackson", "409172", seed=3)
    right, wrong, silent = checker.score_batch([(wav, "409172"), (wav, "835560"), (np.zeros(SR, np.float32), "409172")])
    assert isinstance(silent, NoSpeech)
    assert right > wrong + 3.0, (right, wrong)  # read by Whisper (the default): nats per word
    aligned = ChallengeChecker(config=ChallengeConfig(recognisers=POCKETSPHINX_ONLY), threshold=0.0)
    right, wrong = aligned.score_batch([(wav, "409172"), (wav, "835560")])
    assert right > wrong + 10.0, (right, wrong)  # pocketsphinx's ratio per frame


@pytest.mark.slow
@needs_speech
def test_threads_each_get_their_own_decoder(checker: ChallengeChecker) -> None:
    wav, said = _speech(UTT, SPEAKER)
    # a pocketsphinx digit string and a sentence read by Whisper (one model, shared)
    items = [(wav, "409172"), (wav, said)]
    expected = checker.score_batch(items)
    results: list = [None, None]

    def work(i: int) -> None:
        results[i] = checker.score_batch(items)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [expected, expected]


def test_the_threshold_keeps_the_wrong_phrase_rate_within_the_target_with_confidence() -> None:
    """``--bound upper`` lets through as many of part A's wrong phrases as keep the 95 %
    upper bound of their rate within the target; ``point`` lets through target x n."""
    from engine.bench.challenge import threshold_for
    from engine.bench.stats import rate_interval

    wrong = np.random.default_rng(5).normal(size=9400)
    top = np.sort(wrong)[::-1]
    thr, allowed = threshold_for(wrong, 0.001, "point")
    assert allowed == 9 and int((wrong >= thr).sum()) == 9 and thr > top[9]
    thr, allowed = threshold_for(wrong, 0.001, "upper")
    assert allowed == 3 and int((wrong >= thr).sum()) == 3
    assert rate_interval(3, 9400).upper <= 0.001 < rate_interval(4, 9400).upper
    # too few trials for the target: none let through (the rule of three is still above it)
    thr, allowed = threshold_for(wrong[:1000], 0.001, "upper")
    assert allowed == 0 and int((wrong[:1000] >= thr).sum()) == 0


def test_the_engine_reads_the_challenge_files_from_its_models_directory(tmp_path: Path) -> None:
    """``netid serve --models DIR``: the Whisper manifest and the calibration are DIR's."""
    import shutil

    from engine.inference.extractors import onnx_extractors
    from engine.inference.models import DEFAULT_MODELS_DIR

    assert ChallengeConfig.for_models(tmp_path).calibration_path == tmp_path / "challenge.json"
    with pytest.raises(ModelMissing, match="whisper.json"):
        onnx_extractors(tmp_path)
    shutil.copy(DEFAULT_MODELS_DIR / "whisper.json", tmp_path)
    with pytest.raises(ModelMissing, match="challenge.json"):
        onnx_extractors(tmp_path)
