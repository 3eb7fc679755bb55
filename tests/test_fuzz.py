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


def test_the_soak_side_load_runs_in_its_own_process_and_reports(tmp_path):
    import subprocess
    import sys

    from engine.bench.side_load import read_stats

    eng, rp_id, key = fuzz.start_engine("fake", tmp_path, sets=["limits.max_frame=65536"], serve_args=[])
    try:
        key_file = tmp_path / "rp.sign.key"
        key_file.write_bytes(bytes(key))
        stats = tmp_path / "side.json"
        done = subprocess.run(
            [sys.executable, "-m", "engine.bench.side_load", "--port", str(eng.port), "--seconds", "4", "--seed", "3",
             "--fuzz-connections", "2", "--idle", "5", "--rp-id", rp_id, "--rp-key", str(key_file),
             "--max-frame", "65536", "--stats", str(stats), "--every", "0.5"],
            timeout=60,
        )
        assert done.returncode == 0
        out = read_stats(stats)
        assert out["sent"] > 100 and out["answered"] == out["sent"], out
        assert out["closed_without_error"] == out["internal"] == out["crashes"] == 0, out
        assert out["idle"]["connects"] >= 5, out
    finally:
        assert eng.stop() == 0
