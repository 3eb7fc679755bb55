"""A short run of ``netid bench fuzz`` against the real server (fake extractor), over TCP."""

from __future__ import annotations

import argparse

from engine.bench import fuzz


def test_a_short_fuzz_run_leaves_every_frame_answered(tmp_path):
    args = argparse.Namespace(
        engine="fake", seconds=6.0, seed=20261127, connections=8, answer_timeout=20.0, settle=0.5,
        serve_arg=[], engine_set=["limits.max_frame=65536"], workdir=tmp_path,
    )
    out = fuzz.run(args, tmp_path)
    print(f"fuzz seed {args.seed}: {out}")
    assert out["sent"] > 1000 and out["answered"] == out["sent"], out
    assert out["crashes"] == out["closed_without_error"] == out["broken_without_error"] == out["internal"] == 0, out
    assert out["broken_frames"] > 10 and out["unanswered"] == out["liveness_missed"] == 0, out
    assert {"valid", "mutated", "raw"} <= set(out["kinds"]), out
    assert out["log_bytes"] < 200_000, out
    assert out["engine_exit_code"] == 0
