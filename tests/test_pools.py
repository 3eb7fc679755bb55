"""The face and voice models in worker processes (engine.inference.extractors.ModelPool): the same
results as in the engine's process, errors one for one, bad models refused at start."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from engine.inference.audio import decode_audio
from engine.errors import ModelIntegrityError, ModelMissing, NoFace, UndecodableSample
from engine.inference.extractors import ModelPool
from engine.inference.face import FaceExtractor
from engine.inference.models import DEFAULT_MODELS_DIR
from engine.inference.voice import VoiceExtractor

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
FACE = SAMPLES / "lfw" / "Al_Gore" / "Al_Gore_0001.jpg"
VOICE = next(iter(sorted((SAMPLES / "speech" / "SPEAKER0024").glob("*.flac"))))


@pytest.fixture(scope="module")
def pool():
    p = ModelPool(DEFAULT_MODELS_DIR, intra_op_threads=1, processes=1)
    p.warmup()
    yield p
    p.close()


def test_the_pool_gives_what_the_models_give_in_process(pool: ModelPool) -> None:
    image, wav = FACE.read_bytes(), decode_audio(VOICE.read_bytes())
    blank = np.zeros((120, 120, 3), np.uint8)
    import cv2

    no_face = cv2.imencode(".png", blank)[1].tobytes()
    faces = pool.face_batch([image, b"not an image", no_face])
    here = FaceExtractor(DEFAULT_MODELS_DIR).embed_batch([image])[0]
    assert np.allclose(faces[0], here, atol=1e-5)
    assert isinstance(faces[1], UndecodableSample) and isinstance(faces[2], NoFace)
    voices = pool.voice_batch([wav, wav])
    here_voice = VoiceExtractor(DEFAULT_MODELS_DIR).embed_pcm_batch([wav])[0]
    assert voices[0].band == here_voice.band == "wide"
    assert np.allclose(voices[0].vector, here_voice.vector, atol=1e-5)
    assert np.allclose(voices[0].vector, voices[1].vector)


def test_a_killed_worker_is_replaced(pool: ModelPool) -> None:
    image = FACE.read_bytes()
    before = pool.face_batch([image])[0]
    for pid in list(pool._pool._processes):  # the pool's own workers
        os.kill(pid, signal.SIGKILL)
    assert np.allclose(pool.face_batch([image])[0], before)  # on a fresh pool


def test_missing_or_tampered_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelMissing):
        ModelPool(tmp_path, intra_op_threads=1, processes=1)
    for name in ("yunet", "sface", "campplus"):
        shutil.copy(DEFAULT_MODELS_DIR / f"{name}.json", tmp_path / f"{name}.json")
        (tmp_path / f"{name}.onnx").symlink_to(DEFAULT_MODELS_DIR / f"{name}.onnx")
    (tmp_path / "campplus.onnx").unlink()
    with pytest.raises(ModelMissing):
        ModelPool(tmp_path, intra_op_threads=1, processes=1)
    data = bytearray((DEFAULT_MODELS_DIR / "campplus.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "campplus.onnx").write_bytes(bytes(data))
    tampered = ModelPool(tmp_path, intra_op_threads=1, processes=1)  # found by the worker that loads it
    try:
        with pytest.raises(ModelIntegrityError):
            tampered.warmup()
    finally:
        tampered.close()


def test_workers_exit_when_the_engine_is_killed(tmp_path: Path) -> None:
    """An engine killed with SIGKILL leaves no worker processes behind."""
    import subprocess
    import sys
    import time

    script = (
        "from engine.inference.extractors import ModelPool\n"
        "from engine.inference.models import DEFAULT_MODELS_DIR\n"
        "import os, sys\n"
        "p = ModelPool(DEFAULT_MODELS_DIR, intra_op_threads=1, processes=2)\n"
        "p.warmup()\n"
        "print(' '.join(str(pid) for pid in p._pool._processes), flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.1)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]]
    assert alive == []
