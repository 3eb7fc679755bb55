"""Turn measurements into figures: every figure a dict with its sample sizes.

Each figure is one JSON line of ``results.jsonl``. Error rates carry their counts and
95 % bounds (Clopper-Pearson; rule of three when no error was seen).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.bench.fusion import CrossFused, cross_genuine_policy
from engine.bench.measure import Measurements
from engine.bench.stats import (
    ExactScores,
    ImpostorDistribution,
    OperatingPointResult,
    RateInterval,
    det_curve,
    eer,
    operating_point,
    rate_interval,
)
from engine.matching.calibration import OperatingPoints, ScoreModel

__all__ = ["Evaluation", "evaluate", "rate", "TARGETS"]

TARGETS = (1e-3, 1e-4, 1e-5, 1e-6)


def rate(ri: RateInterval) -> dict:
    return {"errors": ri.errors, "n": ri.n, "rate": ri.rate, "lower95": ri.lower, "upper95": ri.upper,
            "bound": ri.method}


def _op(res: OperatingPointResult, cross: bool = False) -> dict:
    """An operating point as a figure. Over a cross product the comparisons are not
    independent trials, so no binomial bound is given for the FMR there."""
    fmr = rate(res.fmr)
    if cross:
        fmr.update(lower95=None, upper95=None, bound="none: cross product, not independent trials")
    return {"target_fmr": res.target_fmr, "threshold": res.threshold, "fmr": fmr,
            "fnmr": rate(res.fnmr), "resolved": res.resolved, "exact_threshold": res.exact}


@dataclass
class Det:
    label: str
    fmr: np.ndarray
    fnmr: np.ndarray
    n_impostor: int
    style: str = "-"


@dataclass
class Evaluation:
    figures: list[dict] = field(default_factory=list)
    dets: dict[str, list[Det]] = field(default_factory=dict)
    hists: dict[str, dict] = field(default_factory=dict)
    top_impostors: list[dict] = field(default_factory=list)
    points_source: str = ""

    def add(self, figure: str, **kw) -> dict:
        d = {"figure": figure, **kw}
        self.figures.append(d)
        return d

    def find(self, figure: str, **match) -> list[dict]:
        return [f for f in self.figures if f["figure"] == figure and all(f.get(k) == v for k, v in match.items())]


def _curve(ev: Evaluation, key: str, label: str, gen, imp: ImpostorDistribution, style: str = "-") -> None:
    thresholds = None
    if isinstance(imp, CrossFused):  # a dense grid: bisection per point would be slow
        top, _ = imp.threshold_for(0)
        lo = float(gen.sorted[0]) if gen.n else top - 10.0
        thresholds = np.linspace(min(lo, top - 10.0), top, 1500)
    _, fmr, fnmr = det_curve(gen, imp, points=300, thresholds=thresholds)
    ev.dets.setdefault(key, []).append(Det(label, fmr, fnmr, int(imp.n), style))


def _describe_fixed(gen: ExactScores, imp: ImpostorDistribution, thr: float, target: float) -> dict:
    return _op(operating_point(gen, imp, target, threshold=thr), cross=isinstance(imp, CrossFused))


def evaluate(meas: Measurements, points: OperatingPoints, points_source: str) -> Evaluation:
    ev = Evaluation(points_source=points_source)
    _faces(ev, meas)
    _voices(ev, meas)
    model = ScoreModel(points)
    _fusion(ev, meas, points, model)
    _held_apart(ev, meas, points, model)
    return ev


# --------------------------------------------------------------------------- faces


def _faces(ev: Evaluation, meas: Measurements) -> None:
    f = meas.faces
    failed = int((~f.ok).sum())
    ev.add("failure_to_acquire", modality="face", dataset="LFW", images=len(f.keys),
           **{"fta": rate(rate_interval(failed, len(f.keys)))}, by_reason=f.failures())
    tf = meas.ten_fold
    ev.add("lfw_10fold", modality="face", dataset="LFW pairs.txt (View 2)", mean_accuracy=tf.mean,
           std_accuracy=tf.std, folds=tf.accuracies, thresholds=tf.thresholds, pairs=tf.n_pairs,
           pairs_with_fta=tf.pairs_with_fta, fta_counted_as="rejection",
           mean_accuracy_without_fta_pairs=tf.mean_without_fta, std_without_fta_pairs=tf.std_without_fta,
           pair_eer=tf.pair_eer)
    aaa = meas.aaa
    for key, ps in aaa.parts.items():
        if ps.genuine.n == 0 or ps.impostor.n == 0:
            continue
        e, e_thr = eer(ps.genuine, ps.impostor)
        base = dict(modality="face", dataset="LFW all-against-all", part=key, images=ps.images,
                    identities=ps.identities, genuine_identities=ps.genuine_identities,
                    largest_identity=ps.largest_identity, largest_identity_share=ps.largest_identity_share)
        ev.add("eer", **base, eer=e, threshold=e_thr, n_genuine=ps.genuine.n, n_impostor=ps.impostor.n)
        for t in TARGETS:
            ev.add("fnmr_at_fmr", **base, threshold_from="same data (DET point)",
                   **_op(operating_point(ps.genuine, ps.impostor, t)))
        _curve(ev, "face", f"LFW {_part_label(key)} ({ps.impostor.n:,} impostor pairs)", ps.genuine, ps.impostor)
    for part, fe in meas.face_enrolled.items():
        if fe.genuine.n == 0 or fe.impostor.n == 0:
            continue
        base = dict(modality="face", dataset=f"LFW, enrollments of {fe.enroll} images", part=part,
                    enroll=fe.enroll, identities=fe.identities, genuine_identities=fe.genuine_identities,
                    failed_to_enroll=fe.failed_to_enroll, images=fe.images)
        e, e_thr = eer(fe.genuine, fe.impostor)
        ev.add("face_enrolled_eer", **base, eer=e, threshold=e_thr, n_genuine=fe.genuine.n, n_impostor=fe.impostor.n)
        for t in TARGETS:
            ev.add("face_enrolled", **base, threshold_from="same data (DET point)",
                   **_op(operating_point(fe.genuine, fe.impostor, t)))
    ev.add("all_against_all_scoring", modality="face", images_scored=aaa.images_used,
           images_failed=aaa.images_failed, comparisons_lost_to_fta=aaa.comparisons_lost, seconds=aaa.seconds,
           comparisons=aaa.parts["all"].genuine.n + aaa.parts["all"].impostor.n)
    from engine.bench.faces import face_as_norm

    normed, k = face_as_norm(meas.lfw, f, block=meas.config.block)
    raw_b = aaa.parts["B"]
    for t in TARGETS:
        for score, ps in (("cosine", raw_b), ("as-norm", normed)):
            ev.add("face_score_normalisation", modality="face", part="B", score=score,
                   cohort=f"part A images, top {k}" if score == "as-norm" else None,
                   **_op(operating_point(ps.genuine, ps.impostor, t)))
    for score, ps in (("cosine", raw_b), ("as-norm", normed)):
        ev.add("eer", modality="face", dataset="LFW all-against-all", part="B", score=score,
               normalisation_check=True, eer=eer(ps.genuine, ps.impostor)[0],
               n_genuine=ps.genuine.n, n_impostor=ps.impostor.n)
    full = aaa.parts["all"]
    tail, pairs = full.impostor.tail()
    for s, (i, j) in zip(tail[:10].tolist(), pairs[:10].tolist()):
        a, b = meas.lfw.images[i], meas.lfw.images[j]
        ev.top_impostors.append({"score": s, "a": f"{a.name}_{a.number:04d}", "b": f"{b.name}_{b.number:04d}"})
    edges = np.append(full.impostor.edges(), full.impostor.hi + 1.0 / full.impostor.scale)
    ev.hists["face"] = {"genuine": full.genuine.sorted, "edges": edges,
                        "counts": full.impostor.counts, "title": "Face (SFace cosine), LFW all-against-all"}


def _part_label(key: str) -> str:
    return {"all": "all images", "A": "part A (calibration)", "B": "part B (report)"}[key]


# --------------------------------------------------------------------------- voices


def _voices(ev: Evaluation, meas: Measurements) -> None:
    v = meas.voices
    failed = int((~v.ok).sum())
    ev.add("failure_to_acquire", modality="voice", dataset="speechocean762 (as recorded and band-limited)",
           recordings=len(v.keys), fta=rate(rate_interval(failed, len(v.keys))), by_reason=v.failures(),
           cut_to_seconds=meas.config.max_seconds)
    for band, (n, right) in meas.band_detection.items():
        ev.add("band_detection", modality="voice", band=band, recordings=n, detected=right,
               missed=rate(rate_interval(n - right, n)))
    for (part, pair), vs in meas.voice_bands.items():
        for normalised in (False, True):
            g, i = vs.scores(normalised)
            if g.size == 0 or i.size == 0:
                continue
            gen, imp = ExactScores(g), ExactScores(i)
            score = "band-z" if normalised else "centred cosine"
            base = dict(modality="voice", dataset="speechocean762", part=part, pair=pair, score=score,
                        speakers=len(vs.speakers), probes=len(vs.probe_keys),
                        enroll_utterances=meas.config.voice_enroll, failed_to_enroll=len(vs.failed_to_enroll),
                        probes_failed=vs.probes_failed)
            e, e_thr = eer(gen, imp)
            ev.add("eer", **base, eer=e, threshold=e_thr, n_genuine=gen.n, n_impostor=imp.n)
            for t in TARGETS:
                ev.add("fnmr_at_fmr", **base, threshold_from="same data (DET point)",
                       **_op(operating_point(gen, imp, t)))
            if normalised and part == "B":
                _curve(ev, "voice", f"part B, {pair} ({len(vs.speakers)} speakers)", gen, imp,
                       "-" if pair == "wide>wide" else "--")
    g, i = meas.voice["B"].scores(True)
    edges = np.linspace(min(g.min(initial=0), i.min(initial=0)) - 0.5,
                        max(g.max(initial=1), i.max(initial=1)) + 0.5, 401)
    counts, _ = np.histogram(i, bins=edges)
    ev.hists["voice"] = {"genuine": g, "edges": edges, "counts": counts,
                         "title": "Voice (CAM++, band-z), speechocean762 part B, wide>wide", "xlabel": "band-z score"}


# --------------------------------------------------------------------------- fusion


def _cross(meas: Measurements, points: OperatingPoints, part: str, *, floors=None, face=None, voice=None) -> CrossFused:
    f, v = points.face, points.voice
    face_dist = face if face is not None else meas.face_enrolled[part].impostor
    if voice is None:
        _, voice = meas.voice[part].scores(True)
    return CrossFused(face_dist, voice, mf=f.impostor_mean, sf=f.impostor_std, mv=v.impostor_mean,
                      sv=v.impostor_std, wf=points.fusion.weight_face, wv=points.fusion.weight_voice,
                      floors=floors)


def _fusion(ev: Evaluation, meas: Measurements, points: OperatingPoints, model: ScoreModel) -> None:
    for part in ("A", "B"):
        ch = meas.chimeric[part]
        if not ch.persons or ch.attempt_person.size == 0:
            continue
        g = ch.genuine_mask
        fused = model.fuse_batch(ch.face, ch.voice)
        gen = ExactScores(fused[g])
        cross = _cross(meas, points, part)
        base = dict(modality="fused", dataset="chimeric LFW face + speechocean762 voice", part=part,
                    persons=len(ch.persons), genuine_attempts=int(g.sum()),
                    failed_to_enroll=ch.failed_to_enroll, attempts_failed=ch.attempts_failed,
                    impostors=cross.describe(), weights=[points.fusion.weight_face, points.fusion.weight_voice])
        direct_imp = ExactScores(fused[~g])
        for t in TARGETS:
            ev.add("fnmr_at_fmr", **base, threshold_from="same data (DET point), cross product",
                   **_op(operating_point(gen, cross, t), cross=True))
        e, e_thr = eer(gen, direct_imp)
        ev.add("eer", **base, score="fused, direct chimeric attempts", eer=e, threshold=e_thr,
               n_genuine=gen.n, n_impostor=direct_imp.n)
        if part == "B":
            # one held-apart DET per modality on the same persons' genuine attempts
            face_gen = ExactScores(ch.face[g])
            voice_gen = ExactScores(ch.voice[g])
            _, vi = meas.voice[part].scores(True)
            face_imp = meas.face_enrolled[part].impostor
            _curve(ev, "fused", f"face alone ({face_imp.n:,} impostor comparisons)", face_gen, face_imp, "--")
            _curve(ev, "fused", f"voice alone, band-z ({vi.size:,} impostor pairs)", voice_gen, ExactScores(vi), ":")
            _curve(ev, "fused", f"fused (cross product, {cross.n:.2g})", gen, cross, "-")
            for t in TARGETS:
                for name, gs, imp in (("face", face_gen, face_imp), ("voice", voice_gen, ExactScores(vi)),
                                      ("fused", gen, cross)):
                    ev.add("fusion_gain", part=part, modality=name, persons=len(ch.persons),
                           **_op(operating_point(gs, imp, t), cross=name == "fused"))
            edges = np.linspace(min(fused.min(), -6) - 1, max(fused.max(), 6) + 1, 401)
            counts, _ = np.histogram(fused[~g], bins=edges)
            ev.hists["fused"] = {"genuine": fused[g], "edges": edges, "counts": counts,
                                 "title": "Fused face + voice, chimeric persons, part B (direct attempts)",
                                 "xlabel": "fused score",
                                 "thresholds": {f"{model.target_fmr:.0e}": model.threshold("fused")}}


# --------------------------------------------------------------------------- held apart


def _held_apart(ev: Evaluation, meas: Measurements, points: OperatingPoints, model: ScoreModel) -> None:
    """The calibrated thresholds (from part A) applied to part B."""
    face_b = meas.face_enrolled["B"]
    ch = meas.chimeric["B"]
    g = ch.genuine_mask
    fused_b = model.fuse_batch(ch.face, ch.voice)
    cross = _cross(meas, points, "B")
    vg, vi = meas.voice["B"].scores(True)
    for modality, gen, imp in (("face", face_b.genuine, face_b.impostor), ("voice", ExactScores(vg), ExactScores(vi)),
                               ("fused", ExactScores(fused_b[g]), cross)):
        if gen.n == 0 or imp.n == 0:
            continue
        for pt in points.calibration(modality).points:
            ev.add("held_apart", modality=modality, part="B", calibrated_on="A",
                   pair="wide>wide" if modality != "face" else None,
                   calibration_fnmr=pt.fnmr, calibration_n_impostor=pt.n_impostor,
                   calibration_unresolved=pt.unresolved,
                   **_describe_fixed(gen, imp, pt.threshold, pt.target_fmr))
    for (part, pair), vs in meas.voice_bands.items():
        pg, pi = vs.scores(True)
        if part != "B" or pair == "wide>wide" or pg.size == 0 or pi.size == 0:
            continue
        for pt in points.voice.points:
            ev.add("held_apart", modality="voice", part="B", calibrated_on="A", pair=pair,
                   calibration_fnmr=pt.fnmr, calibration_n_impostor=pt.n_impostor,
                   calibration_unresolved=pt.unresolved,
                   **_describe_fixed(ExactScores(pg), ExactScores(pi), pt.threshold, pt.target_fmr))
    for (part, pair), chp in meas.chimeric_bands.items():
        if part == "B" and chp.attempt_person.size:
            _policy(ev, meas, points, model, pair, chp)


def _policy(ev: Evaluation, meas: Measurements, points: OperatingPoints, model: ScoreModel, pair: str,
            ch) -> None:
    """The whole policy at the default operating point on part B's chimeric persons with
    one pair of bands, and the two attacks of one modality on the other."""
    g = ch.genuine_mask
    ff, fv, ft = model.floors()
    accept = model.accept_mask(ch.face, ch.voice)
    reasons: dict[str, int] = {}
    for d in model.decide_batch(ch.face[g], ch.voice[g]):
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
    n_gen = int(g.sum())
    rejected = n_gen - int(accept[g].sum())
    _, vi = meas.voice_bands[("B", pair)].scores(True)
    policy_cross = _cross(meas, points, "B", floors=(ff, fv), voice=vi)
    fm_cross = int(policy_cross.count_ge(ft))
    face_attack = _cross(meas, points, "B", floors=(ff, fv), voice=ch.voice[g])  # impostor face, genuine voice
    voice_attack = _cross(meas, points, "B", floors=(ff, fv), face=ExactScores(ch.face[g]), voice=vi)
    face_imp = meas.face_enrolled["B"].impostor
    voice_gen, _ = meas.voice_bands[("B", pair)].scores(True)
    fnmr_cross = cross_genuine_policy(meas.face_enrolled["B"].genuine.sorted, voice_gen, model.accept_mask)
    ev.add(
        "policy", part="B", pair=pair, target_fmr=model.target_fmr, face_floor_fmr=points.face_floor_fmr,
        voice_floor_fmr=points.voice_floor_fmr,
        face_floor=ff, voice_floor=fv, fused_threshold=ft, persons=len(ch.persons),
        fnmr=rate(rate_interval(rejected, n_gen)), reasons=reasons, fnmr_cross=fnmr_cross,
        frr_with_fta=rate(rate_interval(rejected + ch.genuine_attempts_failed, n_gen + ch.genuine_attempts_failed)),
        genuine_attempts_failed_to_acquire=ch.genuine_attempts_failed,
        fmr_direct=rate(rate_interval(int(accept[~g].sum()), int((~g).sum()))),
        fmr_cross={"accepted": fm_cross, "n": policy_cross.n, "rate": fm_cross / max(1, policy_cross.n),
                   "comparisons": policy_cross.describe()},
        # Each attack: the rate over the cross product of the genuine side's attempts and the
        # other side's impostor comparisons, and its bound: the attack cannot pass more often
        # than the impostor side clears its floor (independent comparisons, Clopper-Pearson).
        impostor_face_genuine_voice={
            "accepted": int(face_attack.count_ge(ft)), "n": face_attack.n,
            "rate": int(face_attack.count_ge(ft)) / max(1, face_attack.n),
            "bound": rate(rate_interval(int(face_imp.count_ge(ff)), int(face_imp.n)))},
        genuine_face_impostor_voice={
            "accepted": int(voice_attack.count_ge(ft)), "n": voice_attack.n,
            "rate": int(voice_attack.count_ge(ft)) / max(1, voice_attack.n),
            "bound": rate(rate_interval(int((vi >= fv).sum()), int(vi.size)))},
    )
