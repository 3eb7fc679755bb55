"""``netid compare``: score pairs of files through exactly the engine's extraction path.

One JSON line per pair: the score the engine would compare, the calibrated
threshold and the decision. With ``--pairs`` every distinct file is embedded
once, in batches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from engine.errors import SampleError

__all__ = ["run_compare", "embed_files"]


def embed_files(paths: list[Path], embed_batch, *, batch: int = 32) -> dict[Path, np.ndarray | SampleError]:
    out: dict[Path, np.ndarray | SampleError] = {}
    for i in range(0, len(paths), batch):
        chunk = paths[i:i + batch]
        blobs = [p.read_bytes() for p in chunk]
        for p, r in zip(chunk, embed_batch(blobs), strict=True):
            out[p] = r
    return out


def run_compare(args: argparse.Namespace) -> int:
    from engine.matching.calibration import ScoreModel
    from engine.inference.models import DEFAULT_MODELS_DIR

    models = args.models or DEFAULT_MODELS_DIR
    if args.pairs:
        pairs = []
        for n, line in enumerate(args.pairs.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                print(f"{args.pairs}:{n}: expected pathA<TAB>pathB", file=sys.stderr)
                return 2
            pairs.append((Path(parts[0]), Path(parts[1])))
    elif args.a and args.b:
        pairs = [(Path(args.a), Path(args.b))]
    else:
        print("give two files, or --pairs FILE", file=sys.stderr)
        return 2
    missing = sorted({str(p) for pair in pairs for p in pair if not p.is_file()})
    if missing:
        print(f"no such file: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), file=sys.stderr)
        return 2

    scores = ScoreModel.load(models)
    if args.modality == "face":
        from engine.inference.face import FaceExtractor

        embed = FaceExtractor(models).embed_batch
    else:
        from engine.inference.voice import VoiceExtractor

        embed = VoiceExtractor(models).embed_batch
    distinct = sorted({p for pair in pairs for p in pair})
    vecs = embed_files(distinct, embed, batch=args.batch)
    threshold = scores.threshold(args.modality, args.target_fmr)
    for a, b in pairs:
        va, vb = vecs[a], vecs[b]
        line: dict = {"a": str(a), "b": str(b), "modality": args.modality}
        bad = next((v for v in (va, vb) if isinstance(v, SampleError)), None)
        if bad is not None:
            line.update(error=bad.code, message=bad.message)
        else:
            if args.modality == "face":
                raw = score = float(np.dot(va, vb))
            else:  # a as the enrollment, b as the recording checked against it
                raw = float(np.dot(va.vector, vb.vector))
                score = scores.voice_score(vb.vector, vb.band, va.vector[None, :], va.band)
            line.update(score=round(score, 6), threshold=round(float(threshold), 6), decision="match" if score >= threshold else "no_match")
            if args.modality == "voice":
                line.update(raw=round(raw, 6), bands=[va.band, vb.band])
        print(json.dumps(line), flush=True)
    return 0
