"""Calibrated operating points and the face + voice decision policy.

The thresholds the engine decides with are measured, never typed in: ``netid calibrate``
scores the calibration part of the benchmark data (LFW identities and speechocean762
speakers that the accuracy report never reports on) and writes
``models/operating_points.json`` and the voice cohort ``models/voice_cohort.npy``. This
module loads them and turns scores into decisions.

Scores
------
* **face**: cosine similarity of SFace embeddings; against an enrollment of several
  images, the best over them (as :class:`engine.index.TemplateIndex` compares).
* **voice**: the best cosine of the probe's GE2E embedding over the enrolled templates,
  then adaptive symmetric score normalisation (AS-norm) against a cohort of speakers who
  are neither enrolled nor reported on:
  ``s' = ((s - mu_e) / sd_e + (s - mu_p) / sd_p) / 2``, where ``mu_e, sd_e`` are the mean
  and standard deviation of the ``top_k`` highest cohort scores of the enrollment (each
  cohort entry scored like a probe: best over the templates) and ``mu_p, sd_p`` those of
  the probe. The cohort is searched with a FAISS inner-product index.
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
   ``voice_floor_fmr`` (default 1e-2: the speaker model is the weaker one; at FMR 1e-3
   it falsely rejects 37.2 % of genuine speechocean762 comparisons on the held-apart part,
   ``netid bench accuracy``);
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

import hashlib
import math
from pathlib import Path
from typing import Literal, NamedTuple

import msgspec
import numpy as np

from engine.errors import ConfigError, ModelError, ModelIntegrityError, ModelMissing

__all__ = [
    "OPERATING_POINTS_FILE",
    "voice_templates",
    "Modality",
    "OperatingPoint",
    "ModalityCalibration",
    "CohortSpec",
    "FusionSpec",
    "SplitSpec",
    "OperatingPoints",
    "Decision",
    "VoiceCohort",
    "ScoreModel",
    "load_operating_points",
    "save_operating_points",
    "topk_stats",
    "as_norm",
]

OPERATING_POINTS_FILE = "operating_points.json"
FORMAT_VERSION = 1

Modality = Literal["face", "voice", "fused"]
_MODALITIES: tuple[str, ...] = ("face", "voice", "fused")
#: Lower bound on a standard deviation used as a divisor (scores are cosines).
_MIN_STD = 1e-6


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


class CohortSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The voice cohort used by AS-norm, stored beside the models."""

    file: str
    sha256: str
    top_k: int
    n_embeddings: int
    #: Speaker ids whose utterances form the cohort (calibration part only).
    speakers: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.top_k < 2:
            raise ValueError("cohort top_k must be at least 2")
        if "/" in self.file or "\\" in self.file or self.file.startswith("."):
            raise ValueError("cohort file must be a plain file name")


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
    voice_floor_fmr: float = 1e-2
    face: ModalityCalibration
    voice: ModalityCalibration
    fused: ModalityCalibration
    fusion: FusionSpec
    cohort: CohortSpec | None = None
    split: SplitSpec | None = None
    #: sha256 of the model files the scores came from, by modality.
    models: dict[str, str] = {}
    datasets: dict[str, str] = {}
    command: str = ""
    #: How an enrolled credential's voice templates are scored: "centroid" (the cosine to
    #: their normalised mean) or "max" (the best cosine over them).
    voice_template: str = "max"

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
        if self.voice.score == "as-norm" and self.cohort is None:
            raise ValueError("as-norm voice scores need a cohort")

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


def _load_cohort(models_dir: Path, spec: CohortSpec) -> np.ndarray:
    path = Path(models_dir) / spec.file
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelMissing(f"voice cohort {spec.file} not found") from None
    if hashlib.sha256(raw).hexdigest() != spec.sha256:
        raise ModelIntegrityError(f"voice cohort {spec.file} does not match its digest")
    emb = np.load(path, allow_pickle=False)
    if emb.ndim != 2 or emb.shape[0] != spec.n_embeddings:
        raise ModelIntegrityError(f"voice cohort {spec.file} has shape {emb.shape}")
    return emb


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


def topk_stats(topk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each row of top-k cohort scores, ``(n, k)``."""
    topk = np.atleast_2d(np.asarray(topk, dtype=np.float64))
    mean = topk.mean(axis=1)
    std = np.maximum(topk.std(axis=1), _MIN_STD)
    return mean, std


def as_norm(
    raw: np.ndarray,
    enrolled_stats: tuple[np.ndarray, np.ndarray],
    probe_stats: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Adaptive symmetric normalisation of raw scores given both sides' cohort stats."""
    raw = np.asarray(raw, dtype=np.float64)
    (me, se), (mp, sp) = enrolled_stats, probe_stats
    return 0.5 * ((raw - me) / se + (raw - mp) / sp)


class VoiceCohort:
    """A cohort of L2-normalised voice embeddings behind a FAISS inner-product index.

    A side of a comparison is a set of templates (an enrollment holds several; a probe
    is a set of one), scored against a cohort entry as the engine scores it against a
    probe: the best cosine over the templates. :meth:`topk` returns the ``top_k``
    highest such cohort scores. Each template's own ``top_k`` nearest entries are found
    by FAISS; the best-over-templates top ``k`` is always among them, so the merge is
    exact. ``labels`` (a speaker per entry) let a benchmark leave chosen speakers out.
    """

    def __init__(self, embeddings: np.ndarray, *, top_k: int, labels: list[str] | None = None) -> None:
        import faiss  # imported lazily: most callers of this module need no cohort

        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] < top_k or top_k < 2:
            raise ConfigError("voice cohort must be (n, d) with n >= top_k >= 2")
        if labels is not None and len(labels) != emb.shape[0]:
            raise ConfigError("one cohort label per embedding")
        self.top_k = top_k
        self.dim = emb.shape[1]
        self.size = emb.shape[0]
        self.labels = np.asarray(labels if labels is not None else [""] * self.size)
        self._index = faiss.IndexFlatIP(self.dim)
        self._index.add(emb)

    def search(self, emb: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``depth`` highest cohort similarities of each row and their indices."""
        q = np.ascontiguousarray(np.atleast_2d(emb), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"embedding has {q.shape[1]} dimensions, cohort {self.dim}")
        return self._index.search(q, min(depth, self.size))

    def merge(self, scores: np.ndarray, idx: np.ndarray, excluded: np.ndarray | None = None) -> np.ndarray:
        """Top ``top_k`` of best-over-templates scores from per-template search results."""
        best = np.full(self.size, -np.inf)
        keep = idx >= 0
        if excluded is not None:
            keep &= ~excluded[np.maximum(idx, 0)]
        np.maximum.at(best, idx[keep], scores[keep].astype(np.float64))
        found = best[np.isfinite(best)]
        if found.size < self.top_k:
            raise ConfigError("voice cohort too small after exclusions")
        return -np.sort(-found)[: self.top_k]

    def topk(self, templates: np.ndarray, exclude: tuple[str, ...] = ()) -> np.ndarray:
        """The ``top_k`` best cohort scores of a template set, leaving out ``exclude``."""
        excluded = np.isin(self.labels, list(exclude)) if exclude else None
        depth = self.top_k + (int(excluded.sum()) if excluded is not None else 0)
        scores, idx = self.search(templates, depth)
        return self.merge(scores, idx, excluded)

    def topk_many(self, templates: np.ndarray, excludes: list[tuple[str, ...]]) -> np.ndarray:
        """:meth:`topk` of one template set under several exclusions, ``(len, top_k)``.

        One search deep enough for the largest exclusion serves them all (a deeper
        search finds the same top ``k``), which is what a benchmark leaving speakers out
        of the cohort pair by pair needs.
        """
        most = max((int(np.isin(self.labels, list(e)).sum()) for e in excludes), default=0)
        scores, idx = self.search(templates, self.top_k + most)
        best = np.full(self.size, -np.inf)
        keep = idx >= 0
        np.maximum.at(best, idx[keep], scores[keep].astype(np.float64))
        cand = np.flatnonzero(np.isfinite(best))
        order = np.argsort(-best[cand], kind="stable")
        cand = cand[order]
        values, labels = best[cand], self.labels[cand]
        out = np.empty((len(excludes), self.top_k))
        for row, e in enumerate(excludes):
            v = values[~np.isin(labels, list(e))] if e else values
            if v.size < self.top_k:
                raise ConfigError("voice cohort too small after exclusions")
            out[row] = v[: self.top_k]
        return out

    def stats(self, templates: np.ndarray, exclude: tuple[str, ...] = ()) -> tuple[float, float]:
        mean, std = topk_stats(self.topk(templates, exclude))
        return float(mean[0]), float(std[0])


# --------------------------------------------------------------------------- decisions


class ScoreModel:
    """Normalises, fuses and decides with calibrated operating points.

    ``target_fmr`` (default: the calibrated ``points.target_fmr``) picks the fused
    threshold the policy uses; it must be one of the calibrated points. The voice
    cohort comes from ``cohort`` or, when not given, from ``models_dir``.
    """

    def __init__(
        self,
        points: OperatingPoints,
        cohort: np.ndarray | None = None,
        *,
        models_dir: Path | None = None,
        target_fmr: float | None = None,
    ) -> None:
        self.points = points
        self.target_fmr = points.target_fmr if target_fmr is None else float(target_fmr)
        self.voice_template = points.voice_template
        self._cohort: VoiceCohort | None = None
        if points.voice.score == "as-norm":
            if cohort is None and models_dir is not None and points.cohort is not None:
                cohort = _load_cohort(models_dir, points.cohort)
            if cohort is None or points.cohort is None:
                raise ConfigError("as-norm voice scores need the cohort embeddings")
            self._cohort = VoiceCohort(cohort, top_k=points.cohort.top_k)
        f, v = points.face, points.voice
        self._face_z = (f.impostor_mean, f.impostor_std)
        self._voice_z = (v.impostor_mean, v.impostor_std)
        self._w = (points.fusion.weight_face, points.fusion.weight_voice)
        self._face_floor = self.threshold("face", points.face_floor_fmr)
        self._voice_floor = self.threshold("voice", points.voice_floor_fmr)
        self._fused_thr = self.threshold("fused", self.target_fmr)

    @classmethod
    def load(cls, models_dir: Path, *, target_fmr: float | None = None) -> ScoreModel:
        return cls(load_operating_points(models_dir), models_dir=models_dir, target_fmr=target_fmr)

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

    # ---- voice normalisation

    @property
    def normalises_voice(self) -> bool:
        return self._cohort is not None

    def normalise_voice(self, probe: np.ndarray, enrolled: np.ndarray, raw: float) -> float:
        """AS-norm of a raw voice score.

        ``probe`` is one embedding ``(d,)``; ``enrolled`` the credential's templates
        ``(k, d)`` (or one ``(d,)``); ``raw`` the engine's score: the best cosine of the
        probe over the templates. Without a cohort the raw score is returned.
        """
        if self._cohort is None:
            return float(raw)
        me, se = self._cohort.stats(np.atleast_2d(enrolled))
        mp, sp = self._cohort.stats(np.atleast_2d(probe)[:1])
        return float(as_norm(np.array([raw]), (np.array([me]), np.array([se])),
                             (np.array([mp]), np.array([sp])))[0])

    def normalise_voice_batch(
        self, probes: np.ndarray, enrolled: list[np.ndarray], raw: np.ndarray
    ) -> np.ndarray:
        """AS-norm of a batch: probe ``i`` (row) against template set ``enrolled[i]``."""
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        probes = np.atleast_2d(probes)
        if not (len(probes) == len(enrolled) == len(raw)):
            raise ValueError("probes, enrolled and raw must have the same length")
        return np.array([self.normalise_voice(p, e, r) for p, e, r in zip(probes, enrolled, raw)])

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
