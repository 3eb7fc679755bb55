"""Calibrated operating points and the face + voice decision policy.

The thresholds the engine decides with are measured, never typed in: ``netid calibrate``
scores the calibration part of the benchmark data (LFW identities and speechocean762
speakers that the accuracy report never reports on) and writes
``models/operating_points.json``. This
module loads them and turns scores into decisions.

Scores
------
* **face**: cosine similarity of SFace embeddings; against an enrollment of several
  images, the best over them (as :class:`engine.matching.one_to_one.StoreMatcher` compares).
  The face thresholds are calibrated on such scores: enrollments of ``face_enroll``
  images against single probe images.
* **voice**: channel-aware. Every recording carries its detected band
  (:mod:`engine.inference.speaker`: "wide" 16 kHz capture, "narrow" 8 kHz or telephone band). Each
  embedding is centred on its band: the mean embedding of the calibration part's
  recordings in that band is subtracted and the result L2-normalised, which takes out
  what the band itself adds to every voice (narrow-band impostors otherwise score high).
  An enrollment's templates (centred on the enrollment's band, the narrowest of its
  recordings') are averaged and normalised (``voice_template="centroid"``); the raw score
  is the cosine of the centred probe with that centroid. It is then standardised by the
  mean and standard deviation of the calibration part's impostor scores for the same
  pair of bands (enrollment band > probe band), so one threshold holds the false-match
  rate on every pair: each voice threshold is the highest of the pairs' thresholds at
  its target.
* **fused**: ``w_face * z_face + w_voice * z_voice``, each ``z`` the modality's score
  standardised by the mean and standard deviation of its impostor scores on the
  calibration data; the weights are fixed at calibration (Fisher's discriminant on the
  diagonal: ``w ~ (mean_genuine - mean_impostor) / pooled variance`` in ``z`` units,
  normalised to sum to one).

Decision policy
---------------
A verification passes only if **all three** hold:

1. the face score clears the face floor: the face threshold calibrated at the looser
   ``face_floor_fmr`` (default 1e-3);
2. the voice score clears the voice floor, the voice threshold calibrated at
   ``voice_floor_fmr`` (default 1e-3): a photo of the holder with another person's voice
   is then accepted at most at about that rate, whatever the face score;
3. the fused score clears the fused threshold calibrated at the target FMR (default
   ``target_fmr`` = 1e-6).

The floors mean that another person's face fails on its own even with the genuine
voice (a replayed recording), and another person's voice fails on its own even with the
genuine face (a photo): neither modality can carry the other. The fused threshold holds
the false-accept rate of a zero-effort impostor at the target. The reason is the first
check that failed, in that order: ``face_mismatch``, ``voice_mismatch``,
``fused_below``; a pass is ``match``. A score that is not a number fails its check.

Thresholds are looked up, never interpolated: :meth:`ScoreModel.threshold` at an FMR
that was not calibrated is a :class:`ConfigError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, NamedTuple

import msgspec
import numpy as np

from engine.errors import ConfigError, ModelError, ModelMissing
from engine.inference.speaker import BANDS

__all__ = [
    "OPERATING_POINTS_FILE",
    "voice_templates",
    "Modality",
    "OperatingPoint",
    "ModalityCalibration",
    "BandCentre",
    "PairNorm",
    "FusionSpec",
    "SplitSpec",
    "OperatingPoints",
    "Decision",
    "ScoreModel",
    "load_operating_points",
    "save_operating_points",
    "centre",
    "pair_key",
]

OPERATING_POINTS_FILE = "operating_points.json"
FORMAT_VERSION = 1

Modality = Literal["face", "voice", "fused"]
_MODALITIES: tuple[str, ...] = ("face", "voice", "fused")
#: Every pair of bands a comparison can have: "enrollment band>probe band".
_PAIRS = tuple(f"{e}>{p}" for e in BANDS for p in BANDS)


class OperatingPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One threshold and what it cost on the calibration data."""

    target_fmr: float
    threshold: float
    #: False matches / impostor comparisons at ``threshold`` on the calibration data.
    measured_fmr: float
    #: False non-matches / genuine comparisons at ``threshold`` on the calibration data.
    fnmr: float
    n_genuine: int
    n_impostor: int
    #: True when ``target_fmr * n_impostor < 1``: the data cannot resolve the target, and
    #: the threshold is only known to lie at or above the highest impostor score seen.
    unresolved: bool = False


class ModalityCalibration(msgspec.Struct, frozen=True, kw_only=True):
    """The calibration of one score (face, voice or fused)."""

    #: "cosine" (face), "as-norm" or "cosine" (voice), "fused".
    score: str
    impostor_mean: float
    impostor_std: float
    genuine_mean: float
    genuine_std: float
    points: tuple[OperatingPoint, ...]
    #: How many identities (face), speakers (voice) or chimeric persons (fused) and
    #: samples the calibration saw, and how the impostor comparisons were formed.
    n_identities: int
    n_samples: int
    comparisons: str = ""

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a modality needs at least one operating point")
        if not (self.impostor_std > 0 and math.isfinite(self.impostor_std)):
            raise ValueError("impostor_std must be positive")


class BandCentre(msgspec.Struct, frozen=True, kw_only=True):
    """The mean embedding of the calibration part's recordings in one band."""

    band: str
    centre: tuple[float, ...]
    n_recordings: int

    def __post_init__(self) -> None:
        if self.band not in BANDS:
            raise ValueError(f"unknown band {self.band!r}")
        if not self.centre or not all(math.isfinite(x) for x in self.centre):
            raise ValueError("a band centre must be a finite vector")


class PairNorm(msgspec.Struct, frozen=True, kw_only=True):
    """Impostor score statistics of one pair of bands (``"wide>narrow"``: a wide-band
    enrollment against a narrow-band recording) on the calibration part."""

    pair: str
    mean: float
    std: float
    n_impostor: int

    def __post_init__(self) -> None:
        if self.pair not in _PAIRS:
            raise ValueError(f"unknown band pair {self.pair!r}")
        if not (self.std > 0 and math.isfinite(self.std) and math.isfinite(self.mean)):
            raise ValueError("a band pair needs a finite mean and a positive std")


class FusionSpec(msgspec.Struct, frozen=True, kw_only=True):
    weight_face: float
    weight_voice: float
    method: str = "fisher-diagonal"

    def __post_init__(self) -> None:
        if self.weight_face < 0 or self.weight_voice < 0:
            raise ValueError("fusion weights must be non-negative")
        if not math.isclose(self.weight_face + self.weight_voice, 1.0, abs_tol=1e-9):
            raise ValueError("fusion weights must sum to one")


class SplitSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Which part of the data the thresholds were calibrated on."""

    method: str
    salt: str
    calibration_part: str
    face_identities: int
    face_images: int
    voice_speakers: tuple[str, ...]
    chimeric_persons: int


class OperatingPoints(msgspec.Struct, frozen=True, kw_only=True):
    """Everything ``netid calibrate`` measured that the running engine needs."""

    format: int = FORMAT_VERSION
    target_fmr: float = 1e-6
    face_floor_fmr: float = 1e-3
    voice_floor_fmr: float = 1e-3
    face: ModalityCalibration
    voice: ModalityCalibration
    fused: ModalityCalibration
    fusion: FusionSpec
    voice_bands: tuple[BandCentre, ...] = ()
    voice_pairs: tuple[PairNorm, ...] = ()
    split: SplitSpec | None = None
    #: sha256 of the model files the scores came from, by modality.
    models: dict[str, str] = {}
    datasets: dict[str, str] = {}
    command: str = ""
    #: How an enrolled credential's voice templates are scored: "centroid" (the cosine to
    #: their normalised mean) or "max" (the best cosine over them).
    voice_template: str = "centroid"
    #: The enrollment the thresholds were calibrated for: images of the face and
    #: recordings of the voice per credential (the holder's app sends as many).
    face_enroll: int = 1
    voice_enroll: int = 3

    def __post_init__(self) -> None:
        if self.format != FORMAT_VERSION:
            raise ValueError(f"unsupported operating points format {self.format}")
        for name in ("target_fmr", "face_floor_fmr", "voice_floor_fmr"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1)")
        if _find(self.fused.points, self.target_fmr) is None:
            raise ValueError("fused calibration lacks the target_fmr point")
        for name in ("face", "voice"):
            if _find(getattr(self, name).points, self.floor_fmr(name)) is None:
                raise ValueError(f"{name} calibration lacks its floor point")
        if self.voice_template not in ("max", "centroid"):
            raise ValueError("voice_template must be 'max' or 'centroid'")
        if self.face_enroll < 1 or self.voice_enroll < 1:
            raise ValueError("face_enroll and voice_enroll must be at least 1")
        if self.voice.score != "band-z":
            raise ValueError(f"voice score {self.voice.score!r} is not one this engine computes (band-z)")
        if sorted(b.band for b in self.voice_bands) != sorted(BANDS):
            raise ValueError("band-z voice scores need one centre per band")
        if sorted(p.pair for p in self.voice_pairs) != sorted(_PAIRS):
            raise ValueError("band-z voice scores need the statistics of every pair of bands")

    def floor_fmr(self, modality: str) -> float:
        """The FMR at which the policy's floor of ``modality`` (face, voice) is set."""
        if modality == "face":
            return self.face_floor_fmr
        if modality == "voice":
            return self.voice_floor_fmr
        raise ConfigError(f"no floor for modality {modality!r}")

    def calibration(self, modality: str) -> ModalityCalibration:
        if modality not in _MODALITIES:
            raise ConfigError(f"unknown modality {modality!r}")
        return getattr(self, modality)


def _find(points: tuple[OperatingPoint, ...], fmr: float) -> OperatingPoint | None:
    for p in points:
        if math.isclose(p.target_fmr, fmr, rel_tol=1e-9):
            return p
    return None


class Decision(NamedTuple):
    passed: bool
    #: "match", "face_mismatch", "voice_mismatch" or "fused_below".
    reason: str


# --------------------------------------------------------------------------- files


def load_operating_points(models_dir: Path) -> OperatingPoints:
    """Read ``models_dir/operating_points.json``; :class:`ModelMissing` if absent."""
    path = Path(models_dir) / OPERATING_POINTS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelMissing(f"{OPERATING_POINTS_FILE} not found; run `netid calibrate`") from None
    try:
        return msgspec.json.decode(data, type=OperatingPoints)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise ModelError(f"{OPERATING_POINTS_FILE} is invalid: {exc}") from None


def save_operating_points(points: OperatingPoints, models_dir: Path) -> Path:
    """Write the operating points (pretty JSON, stable key order) atomically."""
    path = Path(models_dir) / OPERATING_POINTS_FILE
    body = msgspec.json.format(msgspec.json.encode(points), indent=2) + b"\n"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(body)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- AS-norm


def voice_templates(enrolled: np.ndarray, rule: str) -> np.ndarray:
    """The voice templates a probe is scored against, ``(m, d)``: every enrolled one
    (``"max"``: the best of them counts), or their normalised mean (``"centroid"``)."""
    if rule == "max":
        return enrolled
    if rule != "centroid":
        raise ValueError("voice_template must be 'max' or 'centroid'")
    c = np.asarray(enrolled).mean(axis=0, dtype=np.float64)
    return (c / np.linalg.norm(c)).astype(np.float32)[None, :]


def pair_key(enrolled_band: str, probe_band: str) -> str:
    """The key of a pair of bands: ``"wide>narrow"`` for a wide-band enrollment and a
    narrow-band recording."""
    return f"{enrolled_band}>{probe_band}"


def centre(embeddings: np.ndarray, centre_vec: np.ndarray) -> np.ndarray:
    """Embeddings ``(n, d)`` less their band's centre, L2-normalised (float32)."""
    x = np.atleast_2d(np.asarray(embeddings, dtype=np.float64)) - np.asarray(centre_vec, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------- decisions


class ScoreModel:
    """Normalises, fuses and decides with calibrated operating points.

    ``target_fmr`` (default: the calibrated ``points.target_fmr``) picks the fused
    threshold the policy uses; it must be one of the calibrated points.
    """

    def __init__(self, points: OperatingPoints, *, target_fmr: float | None = None) -> None:
        self.points = points
        self.target_fmr = points.target_fmr if target_fmr is None else float(target_fmr)
        self.voice_template = points.voice_template
        self._centres = {b.band: np.asarray(b.centre, dtype=np.float64) for b in points.voice_bands}
        self._pairs = {p.pair: (p.mean, p.std) for p in points.voice_pairs}
        f, v = points.face, points.voice
        self._face_z = (f.impostor_mean, f.impostor_std)
        self._voice_z = (v.impostor_mean, v.impostor_std)
        self._w = (points.fusion.weight_face, points.fusion.weight_voice)
        self._face_floor = self.threshold("face", points.face_floor_fmr)
        self._voice_floor = self.threshold("voice", points.voice_floor_fmr)
        self._fused_thr = self.threshold("fused", self.target_fmr)

    @classmethod
    def load(cls, models_dir: Path, *, target_fmr: float | None = None) -> ScoreModel:
        return cls(load_operating_points(models_dir), target_fmr=target_fmr)

    # ---- thresholds

    def threshold(self, modality: str, target_fmr: float | None = None) -> float:
        """The calibrated threshold of ``modality`` (face, voice, fused) at ``target_fmr``.

        Without ``target_fmr``: at this model's target (``netid compare`` and single-
        modality checks). The policy's floors are ``threshold(m, points.floor_fmr(m))``
        (see :meth:`floors`). A target that was not calibrated is a
        :class:`ConfigError`: thresholds are never interpolated.
        """
        cal = self.points.calibration(modality)
        if target_fmr is None:
            target_fmr = self.target_fmr
        point = _find(cal.points, target_fmr)
        if point is None:
            have = ", ".join(f"{p.target_fmr:g}" for p in cal.points)
            raise ConfigError(f"no {modality} threshold calibrated at FMR {target_fmr:g} (have {have})")
        return point.threshold

    def floors(self) -> tuple[float, float, float]:
        """(face floor, voice floor, fused threshold) that :meth:`decide` applies."""
        return self._face_floor, self._voice_floor, self._fused_thr

    # ---- voice scores

    def centre(self, embeddings: np.ndarray, band: str) -> np.ndarray:
        """Embeddings ``(n, d)`` centred on ``band`` and L2-normalised."""
        try:
            return centre(embeddings, self._centres[band])
        except KeyError:
            raise ConfigError(f"no calibrated centre for band {band!r}") from None

    def template(self, enrolled: np.ndarray, band: str) -> np.ndarray:
        """The templates a probe is compared with, ``(m, d)``, from an enrollment's
        embeddings ``(k, d)`` and its band."""
        return voice_templates(self.centre(enrolled, band), self.voice_template)

    def standardise(self, raw: np.ndarray | float, enrolled_band: str, probe_band: str) -> np.ndarray:
        """Raw centred cosines of one pair of bands as standardised voice scores."""
        try:
            mean, std = self._pairs[pair_key(enrolled_band, probe_band)]
        except KeyError:
            raise ConfigError(f"no calibration for bands {pair_key(enrolled_band, probe_band)!r}") from None
        return (np.asarray(raw, dtype=np.float64) - mean) / std

    def voice_score(self, probe: np.ndarray, probe_band: str, enrolled: np.ndarray, enrolled_band: str) -> float:
        """The voice score of one recording ``(d,)`` against an enrollment's embeddings ``(k, d)``."""
        templates = self.template(enrolled, enrolled_band)
        raw = float((templates @ self.centre(probe, probe_band)[0]).max())
        return float(self.standardise(raw, enrolled_band, probe_band))

    # ---- fusion and decision

    def fuse_batch(self, face: np.ndarray, voice: np.ndarray) -> np.ndarray:
        """Fused scores from raw face cosines and (normalised) voice scores."""
        face = np.asarray(face, dtype=np.float64)
        voice = np.asarray(voice, dtype=np.float64)
        zf = (face - self._face_z[0]) / self._face_z[1]
        zv = (voice - self._voice_z[0]) / self._voice_z[1]
        return self._w[0] * zf + self._w[1] * zv

    def fuse(self, face: float, voice: float) -> float:
        return float(self.fuse_batch(np.array([face]), np.array([voice]))[0])

    def decide_batch(self, face: np.ndarray, voice: np.ndarray) -> list[Decision]:
        face = np.asarray(face, dtype=np.float64).reshape(-1)
        voice = np.asarray(voice, dtype=np.float64).reshape(-1)
        if face.shape != voice.shape:
            raise ValueError("face and voice must have the same length")
        fused = self.fuse_batch(face, voice)
        out: list[Decision] = []
        for f, v, s in zip(face.tolist(), voice.tolist(), fused.tolist()):
            # `not (x >= t)` so that a NaN fails rather than slipping through.
            if not f >= self._face_floor:
                out.append(Decision(False, "face_mismatch"))
            elif not v >= self._voice_floor:
                out.append(Decision(False, "voice_mismatch"))
            elif not s >= self._fused_thr:
                out.append(Decision(False, "fused_below"))
            else:
                out.append(Decision(True, "match"))
        return out

    def decide(self, face: float, voice: float) -> Decision:
        return self.decide_batch(np.array([face]), np.array([voice]))[0]

    def accept_mask(self, face: np.ndarray, voice: np.ndarray) -> np.ndarray:
        """Vectorised pass/fail of the policy (the benchmark evaluates millions)."""
        face = np.asarray(face, dtype=np.float64)
        voice = np.asarray(voice, dtype=np.float64)
        fused = self.fuse_batch(face, voice)
        return (face >= self._face_floor) & (voice >= self._voice_floor) & (fused >= self._fused_thr)
