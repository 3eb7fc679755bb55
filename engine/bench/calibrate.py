"""``netid calibrate``: operating points from measured score distributions.

Measures the calibration part ("A") of the identity-disjoint split only - LFW
identities and speechocean762 speakers that the accuracy report never reports on -
and writes ``operating_points.json`` into the models directory: thresholds per target
FMR for face, voice and fused, the voice bands' centres and each pair of bands'
impostor statistics, the fusion weights, the split and the sample sizes.

    netid calibrate [--data ../shared/data] [--models models/] [--target-fmr 1e-6]
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import numpy as np

from engine.bench.fusion import CrossFused, fisher_weights
from engine.bench.measure import MeasureConfig, Measurements, measure
from engine.bench.stats import ExactScores, ImpostorDistribution, threshold_at_fmr
from engine.bench.voices import band_rows
from engine.matching.calibration import BandCentre, FusionSpec, ModalityCalibration, OperatingPoint, OperatingPoints, PairNorm, SplitSpec, save_operating_points
from engine.inference.models import DEFAULT_MODELS_DIR

__all__ = ["TARGETS", "calibrate", "common_arguments", "measure_config", "main"]

TARGETS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
SPLIT_METHOD = ("identities (LFW names, speechocean762 speakers) ordered by sha256(salt:kind:id), "
                "dealt alternately into A (calibration) and B (report)")
_REPO = Path(__file__).resolve().parents[2]  # the checkout, when run from one
DEFAULT_DATA = _REPO.parent / "shared" / "data"
DEFAULT_OUT = Path("benchmarks") / "out"  # under the folder it is run from


def _points(
    genuine: ExactScores, impostor: ImpostorDistribution, targets: tuple[float, ...]
) -> tuple[OperatingPoint, ...]:
    out = []
    for t in targets:
        thr, resolved, _exact = threshold_at_fmr(impostor, t)
        fm = int(impostor.count_ge(thr))
        fnm = int(genuine.count_lt(thr))
        out.append(OperatingPoint(
            target_fmr=t, threshold=thr, measured_fmr=fm / max(1, impostor.n),
            fnmr=fnm / max(1, genuine.n), n_genuine=genuine.n, n_impostor=int(impostor.n),
            unresolved=not resolved,
        ))
    return tuple(out)


def _voice_points(meas: Measurements, targets: tuple[float, ...]) -> tuple[OperatingPoint, ...]:
    """Each voice threshold is the highest of the pairs' thresholds at its target, so that
    it holds the target on every pair of bands; its figures are over all pairs of part A."""
    pairs = [vs for (part, _), vs in meas.voice_bands.items() if part == "A"]
    gen = ExactScores(np.concatenate([vs.scores(True)[0] for vs in pairs]))
    imp = ExactScores(np.concatenate([vs.scores(True)[1] for vs in pairs]))
    out = []
    for t in targets:
        per_pair = [threshold_at_fmr(ExactScores(vs.scores(True)[1]), t) for vs in pairs]
        thr = max(p[0] for p in per_pair)
        out.append(OperatingPoint(
            target_fmr=t, threshold=thr, measured_fmr=int(imp.count_ge(thr)) / max(1, imp.n),
            fnmr=int(gen.count_lt(thr)) / max(1, gen.n), n_genuine=gen.n, n_impostor=imp.n,
            unresolved=not all(p[1] for p in per_pair),
        ))
    return tuple(out)


def calibrate(
    meas: Measurements, *, target_fmr: float = 1e-6, face_floor_fmr: float = 1e-3,
    voice_floor_fmr: float = 1e-3,
    targets: tuple[float, ...] = TARGETS, command: str = "",
) -> OperatingPoints:
    """Operating points from part A."""
    targets = tuple(sorted(set(targets) | {target_fmr, face_floor_fmr, voice_floor_fmr}, reverse=True))
    face = meas.face_enrolled["A"]
    face_imp_mean, face_imp_std = face.impostor.mean_std()
    face_gen_mean, face_gen_std = face.genuine.mean_std()
    k = meas.config.face_enroll
    face_cal = ModalityCalibration(
        score="cosine", impostor_mean=face_imp_mean, impostor_std=face_imp_std,
        genuine_mean=face_gen_mean, genuine_std=face_gen_std,
        points=_points(face.genuine, face.impostor, targets),
        n_identities=face.identities, n_samples=face.images,
        comparisons=(f"LFW part A: every identity enrolled with its first {k} image{'s' if k > 1 else ''} "
                     f"(the best cosine over them) against every other image of the part, its own "
                     f"(genuine) and every other identity's (impostor)"),
    )

    vs = meas.voice["A"]
    vg, vi = vs.scores(normalised=True)
    v_gen, v_imp = ExactScores(vg), ExactScores(vi)
    vim, vis = v_imp.mean_std()
    vgm, vgs = v_gen.mean_std()
    n_probes = sum(len(v.probe_keys) for (part, _), v in meas.voice_bands.items() if part == "A")
    voice_cal = ModalityCalibration(
        score="band-z", impostor_mean=vim, impostor_std=vis, genuine_mean=vgm, genuine_std=vgs,
        points=_voice_points(meas, targets), n_identities=len(vs.speakers),
        n_samples=n_probes + meas.config.voice_enroll * len(vs.speakers) * 2,
        comparisons=(f"speechocean762 part A, as recorded (wide) and band-limited to 8 kHz (narrow): "
                     f"{meas.config.voice_enroll}-utterance enrollments (centroid of band-centred "
                     f"embeddings) x probes of every speaker of the part (first {meas.config.max_seconds:g} s), "
                     "every pair of bands; each threshold the highest of the pairs' at its target; "
                     "mean and std: wide>wide"),
    )

    ch = meas.chimeric["A"]
    g = ch.genuine_mask
    wf, wv = fisher_weights(ch.face[g], ch.voice[g], (face_imp_mean, face_imp_std), (vim, vis))
    cross = CrossFused(face.impostor, vi, mf=face_imp_mean, sf=face_imp_std, mv=vim, sv=vis, wf=wf, wv=wv)
    fused_gen = ExactScores(wf * (ch.face[g] - face_imp_mean) / face_imp_std + wv * (ch.voice[g] - vim) / vis)
    fgm, fgs = fused_gen.mean_std()
    fused_cal = ModalityCalibration(
        score="fused", impostor_mean=0.0, impostor_std=math.sqrt(wf * wf + wv * wv),
        genuine_mean=fgm, genuine_std=fgs, points=_points(fused_gen, cross, targets),
        n_identities=len(ch.persons), n_samples=int(g.sum()),
        comparisons=(f"chimeric persons of part A (genuine); impostors: {cross.describe()}, "
                     "independent by construction"),
    )

    bands = tuple(BandCentre(band=b, centre=tuple(float(x) for x in c),
                             n_recordings=len(band_rows(meas.speech, meas.voices, "A", b)))
                  for b, c in sorted(meas.centres.items()))
    pairs = tuple(PairNorm(pair=p, mean=m, std=sd, n_impostor=int(meas.voice_bands[("A", p)].scores(False)[1].size))
                  for p, (m, sd) in sorted(meas.pair_stats.items()))
    a_names = {n for n, p in meas.lfw.part.items() if p == "A"}
    split = SplitSpec(
        method=SPLIT_METHOD, salt=meas.config.salt, calibration_part="A",
        face_identities=len(a_names),
        face_images=sum(1 for im in meas.lfw.images if im.name in a_names),
        voice_speakers=tuple(s for s in meas.speech.speakers if meas.speech.part[s] == "A"),
        chimeric_persons=len(ch.persons),
    )
    subset = meas.config.pairs_per_fold is not None or meas.config.max_speakers is not None
    points = OperatingPoints(
        target_fmr=target_fmr, face_floor_fmr=face_floor_fmr, voice_floor_fmr=voice_floor_fmr,
        face=face_cal, voice=voice_cal, fused=fused_cal,
        fusion=FusionSpec(weight_face=wf, weight_voice=1.0 - wf), voice_bands=bands, voice_pairs=pairs, split=split,
        models=dict(sorted(meas.models.items())),
        datasets={"face": "LFW (deep-funneled), all images" if not subset else "LFW subset",
                  "voice": "speechocean762, 10 utterances per speaker" if not subset else "speechocean762 subset"},
        command=command,
        voice_template=meas.config.voice_template,
        face_enroll=meas.config.face_enroll, voice_enroll=meas.config.voice_enroll,
    )
    return points


# --------------------------------------------------------------------------- CLI


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data root holding lfw/ and speech/")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR, help="models directory (extractors)")
    p.add_argument("--cache", type=Path, default=None, help="embedding cache (default: OUT/cache)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--batch", type=int, default=32, help="files per extractor call")
    p.add_argument("--block", type=int, default=1024, help="rows per all-against-all block")
    p.add_argument("--salt", default=MeasureConfig.__dataclass_fields__["salt"].default)
    p.add_argument("--pairs-per-fold", type=int, default=None, help="subset: LFW pairs per fold and kind")
    p.add_argument("--max-speakers", type=int, default=None, help="subset: speakers")
    p.add_argument("--face-enroll", type=int, default=2,
                   help="enrollment images per face identity (the engine takes 1-3; a probe scores the best over them)")
    p.add_argument("--voice-enroll", type=int, default=4,
                   help="enrollment utterances per speaker (the engine takes 3-5)")
    p.add_argument("--voice-probes", type=int, default=6, help="probe utterances per speaker")
    p.add_argument("--max-seconds", type=float, default=5.0, help="cut recordings to this length")
    p.add_argument("--chimeric-attempts", type=int, default=6, help="attempts per chimeric person")
    p.add_argument("--voice-template", choices=["max", "centroid"], default="centroid",
                   help="voice enrollment scoring: the normalised mean of the enrollment embeddings "
                        "(default; measured better) or the best over the templates; written into the "
                        "operating points, and the engine scores the same way")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def measure_config(args: argparse.Namespace, out: Path) -> MeasureConfig:
    return MeasureConfig(
        data=args.data, models=args.models, cache=args.cache or out / "cache", threads=args.threads,
        batch=args.batch, block=args.block, salt=args.salt, pairs_per_fold=args.pairs_per_fold,
        max_speakers=args.max_speakers, face_enroll=args.face_enroll, voice_enroll=args.voice_enroll,
        voice_probes=args.voice_probes,
        max_seconds=args.max_seconds, chimeric_attempts=args.chimeric_attempts,
        voice_template=args.voice_template, show_progress=not args.quiet,
    )


def write_points(points: OperatingPoints, models_dir: Path) -> Path:
    models_dir.mkdir(parents=True, exist_ok=True)
    return save_operating_points(points, models_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netid calibrate", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(p)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="work directory (embedding cache)")
    p.add_argument("--write-to", type=Path, default=None,
                   help="where to write operating_points.json (default: --models)")
    p.add_argument("--target-fmr", type=float, default=1e-6, help="the fused operating point")
    p.add_argument("--face-floor-fmr", type=float, default=1e-3, help="the face floor of the policy")
    p.add_argument("--voice-floor-fmr", type=float, default=1e-3,
                   help="the voice floor of the policy: bounds a photo of the holder with another voice")
    args = p.parse_args(argv)
    meas = measure(measure_config(args, args.out))
    command = "netid calibrate " + shlex.join(argv if argv is not None else sys.argv[1:])
    points = calibrate(meas, target_fmr=args.target_fmr, face_floor_fmr=args.face_floor_fmr,
                       voice_floor_fmr=args.voice_floor_fmr, command=command)
    path = write_points(points, args.write_to or args.models)
    for name in ("face", "voice", "fused"):
        for pt in points.calibration(name).points:
            print(f"{name:5s} FMR {pt.target_fmr:.0e}: threshold {pt.threshold:.6f}  FNMR {pt.fnmr:.4f}"
                  f"  ({pt.n_genuine:,} genuine, {pt.n_impostor:,} impostor{', unresolved' if pt.unresolved else ''})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
