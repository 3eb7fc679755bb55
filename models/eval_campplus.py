"""Accuracy and speed of ``models/campplus.onnx`` on a folder of recordings.

Embeds every ``SPEAKER*/*.flac`` (16 kHz mono) under ``--data`` one utterance at a
time, exactly as the engine will: kaldi-native-fbank log-mel features
(``build_campplus.fbank_options``) minus their mean over the utterance, the ONNX model
on onnxruntime's CPU provider with one intra-op thread, the embedding L2-normalised.
Every pair of utterances is scored by cosine; same speaker = target pair.  Prints the
EER, the FRR at a FAR of 1 % and 0.1 %, and the CPU milliseconds per utterance (model
alone, and the features).

``--int8`` also quantises the model with onnxruntime's dynamic quantisation
(``quantize_dynamic``) into a temporary file and measures it the same way, for each
weight type and operator set asked for.

Runs in the project venv (onnxruntime, numpy, soundfile) with ``kaldi-native-fbank``,
or in the build venv of ``build_campplus.py``::

    .venv/bin/python models/eval_campplus.py --data ../shared/data/speech
    .venv/bin/python models/eval_campplus.py --data ../shared/data/speech --int8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_campplus import INPUT_NAME, OUTPUT_NAME, SAMPLE_RATE, fbank_options, knf_fbank  # noqa: E402

#: (weight type, per-channel weight scales) tried by --int8, always with the operator
#: types below.  Every layer of CAM++ is a Conv (the graph has no MatMul or Gemm), so only
#: quantising Conv (as ConvInteger, activations quantised per call) changes anything.
#: With onnxruntime 1.32, per_channel=True writes the same ConvInteger model as False.
INT8_VARIANTS = [("QInt8", False), ("QUInt8", False)]
INT8_OPS = ("Conv", "MatMul", "Gemm")


def load_features(data: Path, limit: int = 0):
    """Mean-removed features [1, T, 80] of every recording, the speaker labels, timing."""
    import soundfile as sf

    files = sorted(data.glob("SPEAKER*/*.flac"))
    if limit:
        files = files[:limit]
    if not files:
        raise SystemExit(f"no SPEAKER*/*.flac under {data}")
    opts = fbank_options()
    feats, speakers, seconds, cpu = [], [], 0.0, 0.0
    for path in files:
        wav, sr = sf.read(path, dtype="float32")
        if sr != SAMPLE_RATE or wav.ndim != 1:
            raise SystemExit(f"{path}: expected 16 kHz mono, got {sr} Hz shape {wav.shape}")
        t0 = time.process_time()
        f = knf_fbank(wav, opts)
        x = (f - f.mean(axis=0, keepdims=True))[None].astype(np.float32)
        cpu += time.process_time() - t0
        feats.append(x)
        speakers.append(path.parent.name)
        seconds += len(wav) / SAMPLE_RATE
    return feats, np.array(speakers), seconds, cpu


def embed_all(model: Path | bytes, feats, threads: int = 1):
    """L2-normalised embeddings [n, 192], CPU and wall seconds of the model runs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])
    for x in feats[:5]:  # warm-up
        sess.run([OUTPUT_NAME], {INPUT_NAME: x})
    out, cpu, wall = [], 0.0, 0.0
    for x in feats:
        c0, w0 = time.process_time(), time.perf_counter()
        (e,) = sess.run([OUTPUT_NAME], {INPUT_NAME: x})
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        out.append(e[0])
    emb = np.asarray(out, dtype=np.float64)
    if not np.all(np.isfinite(emb)):
        raise SystemExit("non-finite embedding")
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), cpu, wall


def error_rates(emb: np.ndarray, speakers: np.ndarray) -> dict:
    """EER and FRR at FAR 1 % / 0.1 % over all pairs, accepting when score >= threshold."""
    scores = emb @ emb.T
    iu = np.triu_indices(len(emb), 1)
    s = scores[iu]
    same = (speakers[:, None] == speakers[None, :])[iu]
    tar, non = np.sort(s[same]), np.sort(s[~same])
    thr = np.unique(s)
    far = 1.0 - np.searchsorted(non, thr, side="left") / len(non)
    frr = np.searchsorted(tar, thr, side="left") / len(tar)
    i = int(np.argmin(np.abs(far - frr)))
    out = {"eer": (far[i] + frr[i]) / 2, "targets": len(tar), "nontargets": len(non)}
    for a in (0.01, 0.001):
        out[f"frr@far{a:g}"] = float(frr[far <= a].min())
    return out


def report(label: str, rates: dict, cpu: float, wall: float, n: int, seconds: float) -> None:
    print(f"{label:<34} EER {100 * rates['eer']:5.2f} %  FRR@FAR1% {100 * rates['frr@far0.01']:5.2f} %  "
          f"FRR@FAR0.1% {100 * rates['frr@far0.001']:5.2f} %  "
          f"CPU {1000 * cpu / n:6.1f} ms/utt ({1000 * cpu / seconds:4.1f} ms per s of audio), "
          f"wall {1000 * wall / n:6.1f} ms/utt", flush=True)


def quantised(model: Path, weight_type: str, per_channel: bool, workdir: Path) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = workdir / f"int8-{weight_type}-{int(per_channel)}.onnx"
    quantize_dynamic(model, out, weight_type=getattr(QuantType, weight_type),
                     op_types_to_quantize=list(INT8_OPS), per_channel=per_channel)
    return out.read_bytes()


def op_counts(model: Path | bytes) -> str:
    import onnx

    graph = (onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    names = ("Conv", "MatMul", "Gemm", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")
    return ", ".join(f"{k} {counts[k]}" for k in names if k in counts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=HERE / "campplus.onnx")
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "speech")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--limit", type=int, default=0, help="only the first N recordings (0: all)")
    ap.add_argument("--int8", action="store_true", help="also measure dynamic int8 quantisations")
    args = ap.parse_args(argv)

    feats, speakers, seconds, fcpu = load_features(args.data, args.limit)
    n = len(feats)
    print(f"{n} utterances, {len(set(speakers))} speakers, {seconds / n:.2f} s per utterance on "
          f"average; features {1000 * fcpu / n:.1f} ms CPU per utterance")
    emb, cpu, wall = embed_all(args.model, feats, args.threads)
    rates = error_rates(emb, speakers)
    print(f"{rates['targets']} target pairs, {rates['nontargets']} non-target pairs; "
          f"onnxruntime, {args.threads} intra-op thread(s)")
    report(f"{args.model.name} (float32)", rates, cpu, wall, n, seconds)
    if args.int8:
        print(f"{'':<34} {op_counts(args.model)}")
        with tempfile.TemporaryDirectory() as tmp:
            for weight_type, per_channel in INT8_VARIANTS:
                label = f"int8 {weight_type} {'per-channel' if per_channel else 'per-tensor'}"
                try:
                    model = quantised(args.model, weight_type, per_channel, Path(tmp))
                    q, qcpu, qwall = embed_all(model, feats, args.threads)
                except Exception as e:  # an operator onnxruntime cannot run quantised
                    print(f"{label:<34} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                agree = float(np.mean(np.sum(q * emb, axis=1)))
                qrates = error_rates(q, speakers)
                report(label, qrates, qcpu, qwall, n, seconds)
                print(f"{'':<34} {len(model)} bytes ({op_counts(model)}); "
                      f"mean cosine to the float32 embedding {agree:.4f}")
                print(f"{'':<34} vs float32: EER {100 * (qrates['eer'] - rates['eer']):+.3f} points, "
                      f"FRR@FAR0.1% {100 * (qrates['frr@far0.001'] - rates['frr@far0.001']):+.2f} points, "
                      f"CPU x{qcpu / cpu:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
