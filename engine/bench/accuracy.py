"""``netid bench accuracy``: false-match and false-non-match rates, honestly measured.

Faces on LFW (10-fold protocol and all-against-all), voices on speechocean762 as recorded
and band-limited to 8 kHz (every pair of bands), face + voice fusion on chimeric persons,
the attacks of one modality against the other, and the calibrated operating points applied
to the held-apart part of the data. Writes ``results.jsonl``, DET and histogram PNGs and
``report.md`` under ``--out`` (default ``benchmarks/out/``).

    netid bench accuracy [--data ../shared/data] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from engine.bench.calibrate import DEFAULT_OUT, calibrate, common_arguments, measure_config
from engine.bench.evaluate import evaluate
from engine.bench.measure import Measurements, measure
from engine.bench.report import write_jsonl, write_plots, write_report
from engine.matching.calibration import OperatingPoints, load_operating_points
from engine.errors import ModelError

__all__ = ["main", "choose_points"]


def _shown(path: Path) -> str:
    """``path`` relative to the project (``models/...`` for the bundled models), else as given."""
    root = Path(__file__).resolve().parents[2]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def choose_points(meas: Measurements, points_dir: Path | None) -> tuple[OperatingPoints, str]:
    """The shipped operating points if they were calibrated on this very set-up, else a
    fresh calibration on part A (the report says which)."""
    subset = meas.config.pairs_per_fold is not None or meas.config.max_speakers is not None
    reason = ""
    if points_dir is not None and not subset:
        try:
            shipped = load_operating_points(points_dir)
        except ModelError as e:
            reason = f"no usable shipped operating points ({e.code})"
        else:
            if shipped.models != dict(sorted(meas.models.items())):
                reason = "shipped operating points were calibrated with other model files"
            elif shipped.split is None or shipped.split.salt != meas.config.salt:
                reason = "shipped operating points used another split"
            elif (shipped.face_enroll, shipped.voice_enroll) != (meas.config.face_enroll, meas.config.voice_enroll):
                reason = "shipped operating points were calibrated for another enrollment"
            elif not _same_centres({b.band: b.centre for b in shipped.voice_bands}, meas.centres):
                reason = "shipped voice band centres differ from this run's"
            else:
                return shipped, f"shipped `{_shown(points_dir / 'operating_points.json')}`"
    elif subset:
        reason = "subset run"
    points = calibrate(meas)
    return points, f"calibrated in memory on part A ({reason or 'no points directory'})"


#: Largest difference of a voice band centre's coordinates that is still the same centre:
#: embeddings recomputed with other thread counts differ by about 1e-8.
CENTRE_TOLERANCE = 1e-6


def _same_centres(shipped: dict, measured: dict) -> bool:
    return shipped.keys() == measured.keys() and all(
        np.shape(shipped[b]) == np.shape(measured[b]) and np.allclose(shipped[b], measured[b], rtol=0.0, atol=CENTRE_TOLERANCE)
        for b in shipped)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netid bench accuracy", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(p)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (git-ignored)")
    p.add_argument("--points", type=Path, default=None,
                   help="directory of operating_points.json to evaluate (default: --models)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    meas = measure(measure_config(args, out))
    points, source = choose_points(meas, args.points or args.models)
    t1 = time.perf_counter()
    ev = evaluate(meas, points, source)
    timings = dict(meas.timings)
    timings["evaluate_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    write_plots(out, ev)
    timings["plots_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    command = "netid bench accuracy " + shlex.join(argv if argv is not None else sys.argv[1:])
    extra: list[dict] = [{"figure": "timing", **timings},
                         {"figure": "run", "command": command, "points": source, "models": meas.models}]
    jl = write_jsonl(out / "results.jsonl", ev, extra)
    md = write_report(out / "report.md", meas, ev, points, timings,
                      ["netid calibrate        # part A -> models/operating_points.json",
                       command + "   # part B -> " + str(out)])
    _summary(ev, jl, md)
    return 0


def _summary(ev, jl: Path, md: Path) -> None:
    tf = ev.find("lfw_10fold")[0]
    print(f"LFW 10-fold accuracy: {100 * tf['mean_accuracy']:.2f} % ± {100 * tf['std_accuracy']:.2f}")
    for r in ev.find("fnmr_at_fmr", modality="face", part="all"):
        f, n = r["fnmr"], r["fmr"]
        print(f"face all-vs-all FMR {r['target_fmr']:.0e}: FNMR {f['rate']:.4f} [{f['lower95']:.4f}, "
              f"{f['upper95']:.4f}] ({n['n']:,} impostor, {f['n']:,} genuine)")
    pol = ev.find("policy")
    if pol:
        p = pol[0]
        print(f"policy at fused FMR {p['target_fmr']:.0e} on held-apart part B: FNMR {p['fnmr']['rate']:.4f} "
              f"({p['fnmr']['errors']}/{p['fnmr']['n']}), impostors accepted {p['fmr_cross']['accepted']} "
              f"of {p['fmr_cross']['n']:.3g}")
    print(f"wrote {jl} and {md}")


if __name__ == "__main__":
    sys.exit(main())
