"""Loading the shipped ONNX models: manifest, integrity check, onnxruntime session.

Every model in ``models/`` ships as ``NAME.onnx`` beside a manifest ``NAME.json`` that
records where the file came from, its sha256 and size, its licence, and its input and
output spec. :func:`open_session` refuses a file whose digest does not match the
manifest, so a corrupted or swapped model never runs.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import msgspec
import onnxruntime

from engine.assets import asset_dir

from engine.errors import ModelError, ModelIntegrityError, ModelMissing

__all__ = [
    "DEFAULT_MODELS_DIR",
    "ModelManifest",
    "load_manifest",
    "open_session",
    "sha256_file",
]

#: The shipped ``models/`` (package data of a wheel, or the checkout's folder).
DEFAULT_MODELS_DIR: Path = asset_dir("models")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_CHUNK = 1 << 20


class ModelManifest(msgspec.Struct, frozen=True, kw_only=True):
    """The manifest ``models/NAME.json`` written by the model's build script."""

    name: str
    file: str
    sha256: str
    bytes: int
    licence: str
    licence_file: str
    #: ``{"package", "version", "wheel_sha256", "member", "member_sha256"}``
    source: dict[str, Any]
    input: dict[str, Any]
    output: dict[str, Any]
    preprocessing: str
    conversion: str
    #: Operating points calibrated on measured data, when a benchmark has stored them.
    thresholds: dict[str, Any] = msgspec.field(default_factory=dict)


def limit_blas_threads(threads: int = 1) -> None:
    """Hold numpy's BLAS (OpenBLAS) to ``threads`` threads in this process, for good.

    The voice front end's mel product is small; OpenBLAS splits it over every core anyway
    and its threads spin while they wait, which doubled the voice model's CPU per recording
    (43-52 ms against 21 ms at the same wall time, batch of 2) and took those cores from
    the other models. Parallelism comes from the batchers and worker processes instead.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name) or ".." in name:
        raise ModelError(f"invalid model {what} {name!r}")


def load_manifest(models_dir: Path, name: str) -> ModelManifest:
    """Read and validate ``models_dir/NAME.json``.

    Raises :class:`ModelMissing` if it does not exist and :class:`ModelError` if it is
    not a valid manifest.
    """
    _check_name(name, "name")
    path = Path(models_dir) / f"{name}.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelMissing(f"model manifest {path} not found") from None
    except OSError as e:
        raise ModelError(f"cannot read model manifest {path}: {e.strerror}") from None
    try:
        manifest = msgspec.json.decode(raw, type=ModelManifest)
    except msgspec.DecodeError as e:
        raise ModelError(f"invalid model manifest {path}: {e}") from None
    if manifest.name != name:
        raise ModelError(f"model manifest {path} is for {manifest.name!r}, not {name!r}")
    _check_name(manifest.file, "file")
    if not re.fullmatch(r"[0-9a-f]{64}", manifest.sha256):
        raise ModelError(f"model manifest {path}: sha256 is not 64 lowercase hex digits")
    return manifest


def open_session(
    models_dir: Path,
    name: str,
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
) -> tuple[onnxruntime.InferenceSession, ModelManifest]:
    """Check the model file against its manifest and open a CPU onnxruntime session.

    The session runs sequentially with the given thread counts and with idle-thread
    spinning off, so that several models can share a few cores.
    """
    if intra_op_threads < 1 or inter_op_threads < 1:
        raise ModelError("thread counts must be at least 1")
    manifest = load_manifest(models_dir, name)
    path = Path(models_dir) / manifest.file
    try:
        data = path.read_bytes()  # hash and load the same bytes
    except FileNotFoundError:
        raise ModelMissing(f"model file {path} not found") from None
    except OSError as e:
        raise ModelError(f"cannot read model file {path}: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256 or len(data) != manifest.bytes:
        raise ModelIntegrityError(
            f"model file {path} does not match its manifest: sha256 {digest} "
            f"({len(data)} bytes), expected {manifest.sha256} ({manifest.bytes} bytes)"
        )
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(
            data, sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own untyped exceptions
        raise ModelError(f"onnxruntime cannot load {path}: {e}") from None
    return session, manifest
