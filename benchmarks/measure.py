"""Everything ``netid bench accuracy`` and ``netid calibrate`` measure, computed once.

Faces and voices go through the engine's own extractors (:class:`engine.face.FaceExtractor`,
:class:`engine.voice.VoiceExtractor`), embeddings cached on disk; then LFW 10-fold,
LFW all-against-all by part, voice scores by part (AS-norm with the calibration part
as cohort) and chimeric face + voice scores by part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.datasets import DEFAULT_SALT, Chimera, Lfw, Speech, chimeric_persons, load_lfw, load_speech
from benchmarks.embeddings import Embedded, EmbeddingCache, embed_files, face_cache_key, voice_cache_key
from benchmarks.faces import AllAgainstAll, TenFold, all_against_all, ten_fold
from benchmarks.fusion import ChimericScores, chimeric_scores
from benchmarks.stats import ExactScores, eer
from benchmarks.voices import VoiceScores, cohort_of, voice_scores
from engine.calibration import VoiceCohort
from engine.errors import ConfigError

__all__ = ["COHORT_K_CANDIDATES", "MeasureConfig", "Measurements", "measure"]

#: AS-norm top-k values tried on part A when none is given.
COHORT_K_CANDIDATES = (25, 50, 100, 200)


@dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    data: Path
    models: Path
    cache: Path
    threads: int = 2
    batch: int = 32
    block: int = 1024
    salt: str = DEFAULT_SALT
    #: subset runs: the first n same and n different pairs of each LFW fold (and their
    #: images only), and the first n speakers in split order
    pairs_per_fold: int | None = None
    max_speakers: int | None = None
    voice_enroll: int = 3
    voice_probes: int = 7
    max_seconds: float = 5.0
    chimeric_attempts: int = 7
    #: AS-norm top-k; None: the one of COHORT_K_CANDIDATES with the lowest EER on part A
    cohort_top_k: int | None = None
    #: "max" (best cosine over the enrollment templates) or "centroid" (engine.calibration.voice_templates)
    voice_template: str = "max"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.voice_enroll < 1 or self.voice_probes < 1 or self.chimeric_attempts < 1:
            raise ConfigError("enroll, probes and attempts must be at least 1")
        if not 1.0 <= self.max_seconds <= 30.0:
            raise ConfigError("max_seconds must be in [1, 30]")
        if self.cohort_top_k is not None and self.cohort_top_k < 2:
            raise ConfigError("cohort_top_k must be at least 2")
        if self.voice_template not in ("max", "centroid"):
            raise ConfigError("voice_template must be max or centroid")


@dataclass
class Measurements:
    config: MeasureConfig
    lfw: Lfw
    speech: Speech
    faces: Embedded
    voices: Embedded
    models: dict[str, str]
    ten_fold: TenFold
    aaa: AllAgainstAll
    cohort: np.ndarray  # float32 values of the float16 cohort shipped to the engine
    cohort_labels: list[str]
    cohort_top_k: int
    voice: dict[str, VoiceScores]
    persons: list[Chimera]
    chimeric: dict[str, ChimericScores]
    timings: dict[str, float] = field(default_factory=dict)
    #: AS-norm top-k -> equal error rate on part A (the choice of top-k)
    cohort_sweep: dict[int, float] = field(default_factory=dict)


def _embed_faces(cfg: MeasureConfig, lfw: Lfw, timings: dict) -> tuple[Embedded, dict[str, str]]:
    from engine.face import FaceExtractor

    fe = FaceExtractor(cfg.models, intra_op_threads=cfg.threads)
    key, models = face_cache_key(fe)
    cache = EmbeddingCache(cfg.cache, "face", key, fe.dim)
    root = cfg.data
    emb, t = embed_files([im.rel for im in lfw.images], lambda k: (root / k).read_bytes(),
                         fe.embed_batch, cache, batch=cfg.batch, desc="faces",
                         show_progress=cfg.show_progress)
    timings.update({f"face_{k}": v for k, v in t.items()})
    return emb, models


def _embed_voices(cfg: MeasureConfig, speech: Speech, timings: dict) -> tuple[Embedded, dict[str, str]]:
    from engine.audio import SAMPLE_RATE, decode_audio
    from engine.errors import SampleError
    from engine.voice import VoiceExtractor

    ve = VoiceExtractor(cfg.models, intra_op_threads=cfg.threads)
    key, models = voice_cache_key(ve, cfg.max_seconds)
    cache = EmbeddingCache(cfg.cache, "voice", key, ve.dim)
    root = cfg.data
    limit = int(round(cfg.max_seconds * SAMPLE_RATE))

    def load(k: str):
        try:
            return decode_audio((root / k).read_bytes())[:limit]
        except SampleError as e:
            return e

    def embed(items: list) -> list:
        good = [i for i, x in enumerate(items) if not isinstance(x, SampleError)]
        outs = ve.embed_pcm_batch([items[i] for i in good]) if good else []
        res = list(items)
        for i, o in zip(good, outs, strict=True):
            res[i] = o
        return res

    keys = [u.rel for utts in speech.speakers.values() for u in utts]
    emb, t = embed_files(keys, load, embed, cache, batch=cfg.batch, desc="voices",
                         show_progress=cfg.show_progress)
    timings.update({f"voice_{k}": v for k, v in t.items()})
    return emb, models


def measure(cfg: MeasureConfig) -> Measurements:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    lfw = load_lfw(cfg.data, salt=cfg.salt, pairs_per_fold=cfg.pairs_per_fold)
    speech = load_speech(cfg.data, salt=cfg.salt, max_speakers=cfg.max_speakers)
    faces, face_models = _embed_faces(cfg, lfw, timings)
    voices, voice_models = _embed_voices(cfg, speech, timings)
    timings["embed_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    tf = ten_fold(lfw, faces)
    timings["ten_fold_s"] = time.perf_counter() - t1
    aaa = all_against_all(lfw, faces, block=cfg.block, show_progress=cfg.show_progress)
    timings["all_against_all_s"] = aaa.seconds

    t2 = time.perf_counter()
    cohort, labels, _ = cohort_of(speech, voices, "A")
    cohort = cohort.astype(np.float16).astype(np.float32)  # exactly what the engine loads
    per_speaker = max((labels.count(s) for s in set(labels)), default=0)
    largest = len(labels) - 2 * per_speaker  # cohort left after leaving two speakers out
    if largest < 2:
        raise ConfigError("too few calibration speakers for a voice cohort")
    def score(part: str, cohort_k: VoiceCohort, leave_out: bool) -> VoiceScores:
        return voice_scores(speech, voices, part, enroll=cfg.voice_enroll, probes=cfg.voice_probes,
                            template=cfg.voice_template, cohort=cohort_k, leave_out=leave_out)

    candidates = [cfg.cohort_top_k] if cfg.cohort_top_k is not None else \
        sorted({min(k, largest) for k in COHORT_K_CANDIDATES})
    sweep: dict[int, float] = {}
    scored: dict[int, VoiceScores] = {}
    for k in candidates:
        k = min(k, largest)
        scored[k] = score("A", VoiceCohort(cohort, top_k=k, labels=labels), True)
        g, i = scored[k].scores(True)
        sweep[k] = eer(g, ExactScores(i))[0] if g.size and i.size else float("nan")
    top_k = min(sweep, key=lambda k: (sweep[k], k))
    voice = {
        "A": scored[top_k],
        "B": score("B", VoiceCohort(cohort, top_k=top_k), False),
    }
    timings["voice_scoring_s"] = time.perf_counter() - t2

    persons = chimeric_persons(lfw, speech, min_images=cfg.chimeric_attempts + 1)
    chim = {p: chimeric_scores(persons, lfw, faces, voice[p], attempts=cfg.chimeric_attempts)
            for p in ("A", "B")}
    timings["measure_s"] = time.perf_counter() - t0
    return Measurements(cfg, lfw, speech, faces, voices, {**face_models, **voice_models}, tf, aaa,
                        cohort, labels, top_k, voice, persons, chim, timings, sweep)
