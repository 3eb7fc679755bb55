"""Calibration, decision policy and the accuracy harness's statistics."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.bench.datasets import Lfw, LfwImage, LfwPair, split_of
from engine.bench.embeddings import Embedded
from engine.bench.faces import all_against_all, best_threshold, enrolled_faces, ten_fold
from engine.bench.fusion import CrossFused, fisher_weights
from engine.bench.stats import (
    ExactScores,
    TailHistogram,
    binom_cdf,
    clopper_pearson,
    operating_point,
    rate_interval,
    threshold_at_fmr,
)
from engine.matching.calibration import BandCentre, Decision, FusionSpec, ModalityCalibration, OperatingPoint, OperatingPoints, PairNorm, ScoreModel, load_operating_points, save_operating_points
from engine.errors import ConfigError, ModelError, ModelMissing
from engine.inference.models import DEFAULT_MODELS_DIR

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SEED = 20240611


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# --------------------------------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (5, 10, 0.1870860, 0.8129140),  # R: binom.test(5, 10)$conf.int
        (1, 100, 0.0002531460, 0.05445939),  # R: binom.test(1, 100)
        (9, 10, 0.5549839, 0.9974714),
        (0, 10, 0.0, 1 - 0.025 ** (1 / 10)),  # closed form at k = 0
        (10, 10, 0.025 ** (1 / 10), 1.0),  # closed form at k = n
    ],
)
def test_clopper_pearson_known_values(k, n, lo, hi):
    got_lo, got_hi = clopper_pearson(k, n)
    assert got_lo == pytest.approx(lo, rel=1e-5, abs=1e-12)
    assert got_hi == pytest.approx(hi, rel=1e-5, abs=1e-12)


def test_clopper_pearson_k1_closed_form_large_n():
    n = 87_000_000
    lo, hi = clopper_pearson(1, n)
    assert lo == pytest.approx(1 - (1 - 0.025) ** (1 / n), rel=1e-6)
    assert 1 - binom_cdf(0, n, lo) == pytest.approx(0.025, rel=1e-6)
    assert binom_cdf(1, n, hi) == pytest.approx(0.025, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), data=st.data())
def test_clopper_pearson_properties(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = clopper_pearson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    # symmetric in errors and successes
    lo2, hi2 = clopper_pearson(n - k, n)
    assert lo == pytest.approx(1 - hi2, abs=1e-9)
    assert hi == pytest.approx(1 - lo2, abs=1e-9)
    # the defining tail equations
    if k < n:
        assert binom_cdf(k, n, hi) == pytest.approx(0.025, abs=1e-7)
    if k > 0:
        assert 1 - binom_cdf(k - 1, n, lo) == pytest.approx(0.025, abs=1e-7)


def test_rule_of_three_at_zero_errors():
    r = rate_interval(0, 3_000_000)
    assert r.method == "rule-of-three"
    assert r.rate == 0.0 and r.lower == 0.0
    assert r.upper == pytest.approx(1e-6)
    assert rate_interval(0, 2).upper == 1.0  # capped
    r = rate_interval(3, 1000)
    assert r.method == "clopper-pearson"
    assert r.lower < 0.003 < r.upper


# --------------------------------------------------------------------------- distributions


def test_tail_histogram_matches_exact_scores():
    rng = np.random.default_rng(SEED)
    scores = (rng.standard_normal(300_000) * 0.1).astype(np.float32)
    th = TailHistogram(2000)
    for chunk in np.array_split(scores, 13):
        th.add(chunk)
    ex = ExactScores(scores)
    assert th.n == ex.n
    for allowed in (0, 1, 7, 300, 1999):
        assert th.threshold_for(allowed) == ex.threshold_for(allowed)
        thr, exact = th.threshold_for(allowed)
        assert exact
        assert int(ex.count_ge(thr)) <= allowed < int(ex.count_ge(np.nextafter(np.float32(thr), np.float32(-1))))
    for t in (0.2, 0.3, float(th.floor) + 1e-4):  # exact above the floor
        assert int(th.count_ge(t)) == int(ex.count_ge(t))
    for t in (-0.2, 0.0, 0.1):  # histogram: exact to one bin
        lo, hi = int(ex.count_ge(t + 1e-4)), int(ex.count_ge(t - 1e-4))
        assert lo <= int(th.count_ge(t)) <= hi
    # past the exact tail the threshold is a bin edge that still keeps the promise
    thr, exact = th.threshold_for(50_000)
    assert not exact
    assert int(ex.count_ge(thr)) <= 50_000
    mean, std = th.mean_std()
    assert mean == pytest.approx(float(scores.mean()), abs=1e-6)
    assert std == pytest.approx(float(scores.std()), rel=1e-4)


def test_tail_histogram_keeps_pairs():
    th = TailHistogram(3)
    s = np.array([0.1, 0.9, 0.5, 0.8, 0.2], dtype=np.float32)
    th.add(s, lambda sel: np.stack((sel, sel + 100), axis=1).astype(np.int32))
    tail, pairs = th.tail()
    assert tail.tolist() == pytest.approx([0.9, 0.8, 0.5])
    assert pairs[:, 0].tolist() == [1, 3, 2]
    assert pairs[:, 1].tolist() == [101, 103, 102]


def test_fnmr_at_fmr_on_gaussian_scores():
    """Impostors N(0, 1), genuine N(4, 1): FNMR at FMR 1e-3 is Phi(z_0.999 - 4)."""
    rng = np.random.default_rng(SEED)
    imp = rng.standard_normal(1_000_000).astype(np.float32) / np.float32(8)  # keep in [-1, 1]
    gen = (rng.standard_normal(100_000).astype(np.float32) + np.float32(4)) / np.float32(8)
    th = TailHistogram(3000)
    for chunk in np.array_split(imp, 7):
        th.add(chunk)
    z999 = 3.090232306167813
    res = operating_point(gen, th, 1e-3)
    assert res.resolved and res.exact
    assert res.fmr.errors <= 1000
    assert res.threshold * 8 == pytest.approx(z999, abs=0.03)
    assert res.fnmr.rate == pytest.approx(_phi(z999 - 4.0), abs=0.01)
    assert res.fnmr.lower < res.fnmr.rate < res.fnmr.upper
    # same answer from every score kept
    assert operating_point(gen, ExactScores(imp), 1e-3).threshold == res.threshold
    # beyond what the data can show
    unresolved = operating_point(gen, th, 1e-7)
    assert not unresolved.resolved
    assert unresolved.fmr.errors == 0 and unresolved.fmr.method == "rule-of-three"


def test_threshold_never_exceeds_allowed_impostors():
    imp = ExactScores(np.array([0.1, 0.5, 0.5, 0.5, 0.7], dtype=np.float32))
    thr, resolved, _ = threshold_at_fmr(imp, 0.2)  # one impostor allowed
    assert resolved
    assert int(imp.count_ge(thr)) == 1  # ties at 0.5 are all excluded together
    thr, resolved, _ = threshold_at_fmr(imp, 0.1)
    assert not resolved and int(imp.count_ge(thr)) == 0


def test_cross_fused_counts_match_brute_force():
    rng = np.random.default_rng(SEED)
    face = rng.normal(0.05, 0.08, 400).astype(np.float32)
    voice = rng.normal(0.0, 1.0, 50)
    params = dict(mf=0.05, sf=0.08, mv=0.0, sv=1.0, wf=0.7, wv=0.3)
    cross = CrossFused(ExactScores(face), voice, **params)
    fused = (0.7 * (face.astype(np.float64)[:, None] - 0.05) / 0.08 + 0.3 * voice[None, :]).ravel()
    for t in (-1.0, 0.5, 1.5, 2.5):
        # float32 face scores: allow for rounding at the boundary
        assert abs(int(cross.count_ge(t)) - int((fused >= t).sum())) <= 1
    thr, _ = cross.threshold_for(10)
    assert int(cross.count_ge(thr)) <= 10 < int((fused >= thr - 1e-6).sum())
    floors = (0.1, 0.5)
    pol = CrossFused(ExactScores(face), voice, floors=floors, **params)
    ok = (face[:, None] >= 0.1) & (voice[None, :] >= 0.5)
    assert abs(int(pol.count_ge(0.0)) - int(((fused >= 0.0) & ok.ravel()).sum())) <= 1


def test_fisher_weights_favour_the_separating_modality():
    wf, wv = fisher_weights(np.full(10, 0.6), np.full(10, 0.5), (0.0, 0.1), (0.0, 1.0))
    assert wf + wv == pytest.approx(1.0)
    assert wf > wv


# --------------------------------------------------------------------------- faces harness


def _synthetic_lfw(seed: int = SEED):
    rng = np.random.default_rng(seed)
    images, embs = [], []
    for p in range(40):
        centre = rng.standard_normal(16)
        for k in range(1 + p % 4):
            images.append(LfwImage(f"P{p:03d}", k + 1, f"lfw/images/P{p:03d}/P{p:03d}_{k + 1:04d}.jpg"))
            e = centre + 0.6 * rng.standard_normal(16)
            embs.append(e / np.linalg.norm(e))
    emb = np.asarray(embs, dtype=np.float32)
    status = ["ok"] * len(images)
    status[5], emb[5] = "no_face", np.nan
    part = split_of([im.name for im in images])
    pairs = [LfwPair(i % 10, i, i + 1, images[i].name == images[i + 1].name) for i in range(len(images) - 1)]
    return Lfw(Path("."), images, pairs, part), Embedded([im.rel for im in images], emb, status)


def test_all_against_all_matches_brute_force():
    lfw, faces = _synthetic_lfw()
    res = all_against_all(lfw, faces, block=5, tail_fraction=0.05, show_progress=False)
    ok = faces.ok
    for key in ("all", "A", "B"):
        gen, imp = [], []
        for i, j in itertools.combinations(range(len(lfw.images)), 2):
            if not (ok[i] and ok[j]):
                continue
            pi, pj = lfw.part[lfw.images[i].name], lfw.part[lfw.images[j].name]
            if key != "all" and not (pi == pj == key):
                continue
            s = float(faces.emb[i] @ faces.emb[j])
            (gen if lfw.images[i].name == lfw.images[j].name else imp).append(s)
        ps = res.parts[key]
        assert ps.genuine.n == len(gen) and ps.impostor.n == len(imp)
        np.testing.assert_allclose(ps.genuine.sorted, np.sort(gen), atol=1e-5)
        tail, pairs = ps.impostor.tail()
        np.testing.assert_allclose(tail, np.sort(imp)[::-1][: tail.size], atol=1e-5)
        i, j = pairs[0]
        assert lfw.images[i].name != lfw.images[j].name
        assert float(faces.emb[i] @ faces.emb[j]) == pytest.approx(float(tail[0]), abs=1e-5)
    n = len(lfw.images)
    assert res.images_failed == 1
    assert res.comparisons_lost == n - 1


@pytest.mark.parametrize("enroll", [1, 2, 3])
def test_enrolled_faces_match_brute_force(enroll):
    """A probe against an enrollment of several images scores the best over them, as the
    engine compares; an enrollment with an image that failed to acquire is not made."""
    lfw, faces = _synthetic_lfw()
    ok = faces.ok
    for part in ("A", "B"):
        by_name: dict[str, list[int]] = {}
        for i, im in enumerate(lfw.images):
            if lfw.part[im.name] == part:
                by_name.setdefault(im.name, []).append(i)
        gen, imp, enrolled, failed = [], [], 0, 0
        for name, imgs in by_name.items():
            if len(imgs) < enroll:
                continue
            if not ok[imgs[:enroll]].all():
                failed += 1
                continue
            enrolled += 1
            for other, probes in by_name.items():
                for j in probes[enroll:] if other == name else probes:
                    if ok[j]:
                        s = max(float(faces.emb[e] @ faces.emb[j]) for e in imgs[:enroll])
                        (gen if other == name else imp).append(s)
        res = enrolled_faces(lfw, faces, part, enroll, block=3)
        assert (res.identities, res.failed_to_enroll) == (enrolled, failed)
        assert res.genuine.n == len(gen) and res.impostor.n == len(imp)
        np.testing.assert_allclose(res.genuine.sorted, np.sort(gen), atol=1e-5)
        np.testing.assert_allclose(res.impostor.sorted, np.sort(imp), atol=1e-5)


def test_best_threshold_counts_failures_as_rejections():
    scores = np.array([0.9, 0.8, 0.2, 0.1, np.nan, np.nan])
    same = np.array([True, True, False, False, True, False])
    thr, correct = best_threshold(scores, same)
    assert 0.2 < thr < 0.8
    assert correct == 5  # the failed same-person pair is always wrong


def test_ten_fold_on_synthetic_pairs():
    lfw, faces = _synthetic_lfw()
    tf = ten_fold(lfw, faces)
    assert len(tf.accuracies) == 10
    assert tf.pairs_with_fta == 2
    assert 0.5 < tf.mean <= 1.0


# --------------------------------------------------------------------------- operating points


def _modality(score: str, thresholds: dict[float, float], mean=0.0, std=1.0) -> ModalityCalibration:
    pts = tuple(
        OperatingPoint(target_fmr=f, threshold=t, measured_fmr=f, fnmr=0.01, n_genuine=100, n_impostor=10**7)
        for f, t in sorted(thresholds.items(), reverse=True)
    )
    return ModalityCalibration(score=score, impostor_mean=mean, impostor_std=std, genuine_mean=mean + 5 * std,
                               genuine_std=std, points=pts, n_identities=10, n_samples=100)


DIM = 8
_CENTRES = {"wide": (0.1,) * DIM, "narrow": (0.3,) + (0.0,) * (DIM - 1)}
_PAIR_STATS = {"wide>wide": (0.1, 0.1), "wide>narrow": (0.2, 0.12), "narrow>wide": (0.2, 0.12),
               "narrow>narrow": (0.3, 0.08)}


def _points(**kw) -> OperatingPoints:
    base = dict(
        face=_modality("cosine", {1e-3: 0.30, 1e-4: 0.36, 1e-6: 0.45}, mean=0.0, std=0.1),
        voice=_modality("band-z", {1e-2: 0.60, 1e-3: 0.70, 1e-6: 0.80}, mean=0.3, std=0.1),
        fused=_modality("fused", {1e-3: 3.0, 1e-6: 4.5}),
        fusion=FusionSpec(weight_face=0.5, weight_voice=0.5),
        voice_bands=tuple(BandCentre(band=b, centre=c, n_recordings=10) for b, c in _CENTRES.items()),
        voice_pairs=tuple(PairNorm(pair=p, mean=m, std=sd, n_impostor=100) for p, (m, sd) in _PAIR_STATS.items()),
    )
    base.update(kw)
    return OperatingPoints(**base)


@pytest.mark.parametrize(
    ("face", "voice", "expected"),
    [
        (0.95, 0.10, Decision(False, "voice_mismatch")),  # strong face, another person's voice
        (0.10, 0.99, Decision(False, "face_mismatch")),  # another person's face, strong voice
        (0.31, 0.71, Decision(False, "fused_below")),  # both just over their floors
        (0.70, 0.85, Decision(True, "match")),
        (0.20, 0.20, Decision(False, "face_mismatch")),  # the first failed check is the reason
        (float("nan"), 0.99, Decision(False, "face_mismatch")),
        (0.95, float("nan"), Decision(False, "voice_mismatch")),
    ],
)
def test_decide_policy(face, voice, expected):
    model = ScoreModel(_points())
    assert model.decide(face, voice) == expected
    assert bool(model.accept_mask(np.array([face]), np.array([voice]))[0]) == expected.passed


def test_fused_score_and_thresholds():
    model = ScoreModel(_points())
    # 0.5 * (0.7 - 0) / 0.1 + 0.5 * (0.85 - 0.3) / 0.1
    assert model.fuse(0.7, 0.85) == pytest.approx(6.25)
    assert model.threshold("fused") == 4.5  # the model's target, 1e-6
    assert model.threshold("face") == 0.45
    assert model.threshold("face", 1e-4) == 0.36
    assert model.floors() == (0.30, 0.70, 4.5)  # face at 1e-3, voice at 1e-3, fused at 1e-6
    points = _points(voice_floor_fmr=1e-2)
    assert points.floor_fmr("voice") == 1e-2
    assert ScoreModel(points).floors() == (0.30, 0.60, 4.5)
    with pytest.raises(ConfigError):
        model.threshold("face", 1e-5)  # not calibrated: never interpolated
    with pytest.raises(ConfigError):
        model.threshold("iris")
    strict = ScoreModel(_points(), target_fmr=1e-3)
    assert strict.threshold("fused") == 3.0
    with pytest.raises(ConfigError):
        ScoreModel(_points(), target_fmr=1e-5)


def test_operating_points_need_their_policy_points():
    with pytest.raises(ValueError):
        _points(fused=_modality("fused", {1e-3: 3.0}))  # no point at the target 1e-6
    with pytest.raises(ValueError):
        _points(voice=_modality("as-norm", {1e-2: 1.5, 1e-3: 2.0, 1e-6: 4.0}))  # not a score this engine computes
    with pytest.raises(ValueError):
        _points(voice_pairs=())  # band-z without its pairs' statistics
    with pytest.raises(ValueError):
        _points(voice_bands=_points().voice_bands[:1])  # a band without its centre


def test_operating_points_round_trip(tmp_path):
    points = _points(command="netid calibrate --test")
    save_operating_points(points, tmp_path)
    assert load_operating_points(tmp_path) == points
    json.loads((tmp_path / "operating_points.json").read_text())  # plain JSON


def test_operating_points_errors(tmp_path):
    with pytest.raises(ModelMissing):
        load_operating_points(tmp_path)
    (tmp_path / "operating_points.json").write_text('{"format": 1}')
    with pytest.raises(ModelError):
        load_operating_points(tmp_path)
    (tmp_path / "operating_points.json").write_text("not json")
    with pytest.raises(ModelError):
        load_operating_points(tmp_path)


# --------------------------------------------------------------------------- voice by band


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _centred(x, band):
    y = np.atleast_2d(x) - np.asarray(_CENTRES[band])
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.mark.parametrize(("enrolled_band", "probe_band"), [("wide", "wide"), ("wide", "narrow"), ("narrow", "narrow")])
def test_voice_score_centres_each_band_and_standardises_the_pair(enrolled_band, probe_band):
    model = ScoreModel(_points())
    rng = np.random.default_rng(SEED)
    enrolled, probe = _unit(rng, 3, DIM), _unit(rng, 1, DIM)[0]
    c = _centred(enrolled, enrolled_band).mean(axis=0)
    c /= np.linalg.norm(c)
    raw = float(_centred(probe, probe_band)[0] @ c)
    mean, std = _PAIR_STATS[f"{enrolled_band}>{probe_band}"]
    assert model.voice_score(probe, probe_band, enrolled, enrolled_band) == pytest.approx((raw - mean) / std, abs=1e-5)


def test_voice_score_refuses_an_unknown_band():
    model = ScoreModel(_points())
    rng = np.random.default_rng(SEED)
    with pytest.raises(ConfigError):
        model.voice_score(_unit(rng, 1, DIM)[0], "ultra", _unit(rng, 3, DIM), "wide")


def _synthetic_speech(n_speakers: int = 6, per: int = 5, seed: int = SEED):
    """Speakers in two bands: a narrow copy is the wide embedding plus a shared channel offset."""
    from engine.bench.datasets import Speech, Utterance
    from engine.bench.voices import band_key

    rng = np.random.default_rng(seed)
    channel = rng.standard_normal(DIM)
    speakers, keys, embs, tags = {}, [], [], []
    for k in range(n_speakers):
        spk = f"{k:04d}"
        centre = rng.standard_normal(DIM)
        utts = []
        for u in range(per):
            rel = f"speech/SPEAKER{spk}/{spk}{u:03d}.flac"
            utts.append(Utterance(f"{spk}{u:03d}", spk, rel))
            e = centre + 0.8 * rng.standard_normal(DIM)
            for band, v in (("wide", e), ("narrow", e + 2.0 * channel)):
                keys.append(band_key(rel, band))
                embs.append(v / np.linalg.norm(v))
                tags.append(band)
        speakers[spk] = utts
    part = split_of(list(speakers), kind="speech")
    return Speech(Path("."), speakers, part), Embedded(keys, np.asarray(embs, np.float32), ["ok"] * len(keys), tags)


def test_voice_scores_follow_the_engine_rule():
    from engine.bench.voices import band_centres, band_key, voice_scores

    speech, voices = _synthetic_speech()
    centres = band_centres(speech, voices, "A")
    emb = dict(zip(voices.keys, voices.emb))
    stats = {"wide>narrow": (0.05, 0.2)}
    vs = voice_scores(speech, voices, "A", centres=centres, enroll_band="wide", probe_band="narrow",
                      enroll=2, probes=3, pair_stats=stats)
    assert vs.pair == "wide>narrow"
    points = _points(voice_bands=tuple(BandCentre(band=b, centre=tuple(map(float, c)), n_recordings=1)
                                       for b, c in centres.items()),
                     voice_pairs=tuple(PairNorm(pair=p, mean=0.05, std=0.2, n_impostor=1) for p in _PAIR_STATS))
    model = ScoreModel(points)
    for i, spk in enumerate(vs.speakers):
        enrolled = np.stack([emb[band_key(u.rel, "wide")] for u in speech.speakers[spk][:2]])
        for j, key in enumerate(vs.probe_keys):
            assert key.endswith("#narrow")
            assert vs.norm[i, j] == pytest.approx(model.voice_score(emb[key], "narrow", enrolled, "wide"), abs=1e-4)
    g, imp = vs.scores(True)
    assert g.size == 3 * len(vs.speakers) and imp.size == 3 * len(vs.speakers) * (len(vs.speakers) - 1)


def test_chimeric_face_scores_take_the_best_over_the_enrolled_images():
    from engine.bench.datasets import Chimera
    from engine.bench.fusion import chimeric_scores
    from engine.bench.voices import band_centres, voice_scores

    lfw, faces = _synthetic_lfw()
    speech, voices = _synthetic_speech()
    vs = voice_scores(speech, voices, "A", centres=band_centres(speech, voices, "A"), enroll=2, probes=3)
    names = sorted({im.name for im in lfw.images if lfw.part[im.name] == "A"
                    and sum(j.name == im.name for j in lfw.images) >= 4})
    persons = [Chimera("A", spk, face) for spk, face in zip(vs.speakers, names)]
    ch = chimeric_scores(persons, lfw, faces, vs, attempts=2, face_enroll=2)
    assert persons and len(ch.persons) == len(persons) and ch.attempt_person.size == 2 * len(persons)
    for col, row in enumerate(ch.attempt_person):
        imgs = sorted((i for i, im in enumerate(lfw.images) if im.name == persons[row].face),
                      key=lambda i: lfw.images[i].number)
        probe = imgs[2 + int((ch.attempt_person[:col] == row).sum())]
        expect = max(float(faces.emb[e] @ faces.emb[probe]) for e in imgs[:2])
        assert ch.face[row, col] == pytest.approx(expect, abs=1e-5)


def test_band_centres_take_out_the_channel():
    """Uncentred, a narrow probe scores high against any narrow enrollment (the shared
    channel); centred on its band, impostors fall back towards zero."""
    from engine.bench.voices import band_centres, voice_scores

    speech, voices = _synthetic_speech(n_speakers=10, per=6)
    centres = band_centres(speech, voices, "A")
    zero = {b: np.zeros(DIM) for b in centres}
    kw = dict(enroll_band="narrow", probe_band="narrow", enroll=3, probes=3)
    _, raw_imp = voice_scores(speech, voices, "A", centres=zero, **kw).scores(False)
    _, centred_imp = voice_scores(speech, voices, "A", centres=centres, **kw).scores(False)
    assert raw_imp.mean() > 0.5 and abs(centred_imp.mean()) < 0.3


# --------------------------------------------------------------------------- shipped points


def test_shipped_operating_points_load():
    points = load_operating_points(DEFAULT_MODELS_DIR)
    model = ScoreModel.load(DEFAULT_MODELS_DIR)
    assert points.target_fmr == 1e-6
    assert points.split is not None and points.split.calibration_part == "A"
    for name in ("face", "voice", "fused"):
        targets = {p.target_fmr for p in points.calibration(name).points}
        assert {1e-3, 1e-4, 1e-5, 1e-6} <= targets
    face = {p.target_fmr: p for p in points.face.points}
    assert face[1e-6].n_impostor >= 3_000_000 and not face[1e-6].unresolved
    assert face[1e-3].threshold < face[1e-6].threshold
    assert {b.band for b in points.voice_bands} == {"wide", "narrow"}
    assert {p.pair for p in points.voice_pairs} == {"wide>wide", "wide>narrow", "narrow>wide", "narrow>narrow"}
    # the engine's own operating point rejects a zero-score attempt and accepts a perfect one
    assert not model.decide(0.0, 0.0).passed
    assert model.decide(1.0, 50.0).passed


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_harness_on_a_tiny_real_subset(tmp_path):
    if not (DATA / "lfw" / "pairs.txt").exists() or not (DATA / "speech" / "utt2spk").exists():
        pytest.skip("shared data not present")
    from engine.bench import accuracy, calibrate

    # the subset's identities have one or two images: one image per face enrollment
    common = ["--data", str(DATA), "--pairs-per-fold", "2", "--max-speakers", "8", "--voice-probes", "2",
              "--chimeric-attempts", "1", "--face-enroll", "1", "--cache", str(tmp_path / "cache"), "--quiet",
              "--threads", "1"]
    assert calibrate.main(common + ["--out", str(tmp_path), "--write-to", str(tmp_path / "models")]) == 0
    points = load_operating_points(tmp_path / "models")
    assert points.split is not None and len(points.split.voice_speakers) == 4
    ScoreModel.load(tmp_path / "models")
    assert accuracy.main(common + ["--out", str(tmp_path / "out")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    figures = {d["figure"] for d in lines}
    assert {"lfw_10fold", "failure_to_acquire", "fnmr_at_fmr", "held_apart", "policy", "eer"} <= figures
    tenfold = next(d for d in lines if d["figure"] == "lfw_10fold")
    assert tenfold["pairs"] == 40 and tenfold["mean_accuracy"] > 0.8
    for d in lines:
        if d["figure"] == "fnmr_at_fmr":
            assert d["fmr"]["n"] > 0 and d["fnmr"]["n"] > 0
    for name in ("det_face.png", "det_voice.png", "det_fused.png", "hist_face.png", "report.md"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    # the accuracy run found every embedding in the cache the calibration run filled
    t = next(d for d in lines if d["figure"] == "timing")
    assert t["face_embedded"] == 0 and t["voice_embedded"] == 0


def test_the_policy_over_every_genuine_pair_counts_each_face_with_each_voice():
    from engine.bench.fusion import cross_genuine_policy

    face = np.array([0.9, 0.8, 0.2, 0.7])  # one face below a floor of 0.5
    voice = np.array([5.0, 1.0, 6.0])  # one voice below a floor of 2.0

    def accept(f, v):
        return (f >= 0.5) & (v >= 2.0)

    out = cross_genuine_policy(face, voice, accept, replicates=500, seed=3)
    assert out["n"] == 12 and (out["n_face"], out["n_voice"]) == (4, 3)
    assert out["rate"] == 1 - (3 * 2) / 12  # 3 faces x 2 voices pass
    assert 0 <= out["low"] <= out["rate"] <= out["high"] <= 1
