"""Everything ``netid bench accuracy`` and ``netid calibrate`` measure, computed once.

Faces and voices go through the engine's own extractors (:class:`engine.inference.face.FaceExtractor`,
:class:`engine.inference.voice.VoiceExtractor`), embeddings cached on disk; then LFW 10-fold,
LFW all-against-all by part, voice scores by part and pair of bands (each band centred
and each pair standardised on the calibration part, as ``netid calibrate`` ships them) and
chimeric face + voice scores by part and pair of bands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.bench.datasets import DEFAULT_SALT, Chimera, Lfw, Speech, chimeric_persons, load_lfw, load_speech
from engine.bench.embeddings import Embedded, EmbeddingCache, embed_files, face_cache_key, voice_cache_key
from engine.bench.faces import AllAgainstAll, EnrolledFaces, TenFold, all_against_all, enrolled_faces, ten_fold
from engine.bench.fusion import ChimericScores, chimeric_scores
from engine.bench.stats import ExactScores, eer
from engine.bench.voices import NARROW, VoiceScores, band_centres, band_key, voice_scores
from engine.matching.calibration import pair_key
from engine.errors import ConfigError
from engine.inference.speaker import BANDS

__all__ = ["PAIRS", "MeasureConfig", "Measurements", "measure"]

#: Every (enrollment band, probe band) the benchmark scores.
PAIRS = tuple((e, p) for e in BANDS for p in BANDS)


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
    #: images a face enrollment holds (the engine scores a probe by the best over them)
    face_enroll: int = 2
    voice_enroll: int = 4
    voice_probes: int = 6
    max_seconds: float = 5.0
    chimeric_attempts: int = 6
    #: "max" (best cosine over the enrollment templates) or "centroid" (engine.matching.calibration.voice_templates)
    voice_template: str = "centroid"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if min(self.face_enroll, self.voice_enroll, self.voice_probes, self.chimeric_attempts) < 1:
            raise ConfigError("enroll, probes and attempts must be at least 1")
        if not 1.0 <= self.max_seconds <= 30.0:
            raise ConfigError("max_seconds must be in [1, 30]")
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
    #: part -> probe images against enrollments of ``config.face_enroll`` images (what the
    #: face floor and the fused threshold are calibrated and reported on)
    face_enrolled: dict[str, EnrolledFaces]
    #: band -> centre (mean part-A embedding), as shipped to the engine
    centres: dict[str, np.ndarray]
    #: "enrollment band>probe band" -> (mean, std) of part A's impostor scores
    pair_stats: dict[str, tuple[float, float]]
    #: part -> "wide>wide" scores (the main figures)
    voice: dict[str, VoiceScores]
    #: (part, pair) -> scores of every pair of bands
    voice_bands: dict[tuple[str, str], VoiceScores]
    persons: list[Chimera]
    #: part -> chimeric scores with wide-band voices; (part, pair) -> with every pair of bands
    chimeric: dict[str, ChimericScores]
    chimeric_bands: dict[tuple[str, str], ChimericScores]
    timings: dict[str, float] = field(default_factory=dict)
    #: (recordings, detected as their band) per band: the engine's band detection checked
    band_detection: dict[str, tuple[int, int]] = field(default_factory=dict)


def _embed_faces(cfg: MeasureConfig, lfw: Lfw, timings: dict) -> tuple[Embedded, dict[str, str]]:
    from engine.inference.face import FaceExtractor

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
    from engine.inference.audio import SAMPLE_RATE, decode_audio
    from engine.errors import SampleError
    from engine.inference.voice import VoiceExtractor, band_limited

    ve = VoiceExtractor(cfg.models, intra_op_threads=cfg.threads)
    key, models = voice_cache_key(ve, cfg.max_seconds)
    cache = EmbeddingCache(cfg.cache, "voice", key, ve.dim)
    root = cfg.data
    limit = int(round(cfg.max_seconds * SAMPLE_RATE))

    def load(k: str):
        rel = k.removesuffix(NARROW)
        try:
            wav = decode_audio((root / rel).read_bytes())[:limit]
        except SampleError as e:
            return e
        return band_limited(wav) if k.endswith(NARROW) else wav

    def embed(items: list) -> list:
        good = [i for i, x in enumerate(items) if not isinstance(x, SampleError)]
        outs = ve.embed_pcm_batch([items[i] for i in good]) if good else []
        res = list(items)
        for i, o in zip(good, outs, strict=True):
            res[i] = o
        return res

    keys = [band_key(u.rel, b) for utts in speech.speakers.values() for u in utts for b in BANDS]
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
    t_e = time.perf_counter()
    face_enrolled = {part: enrolled_faces(lfw, faces, part, cfg.face_enroll) for part in ("A", "B")}
    timings["face_enrolled_s"] = time.perf_counter() - t_e

    t2 = time.perf_counter()
    centres = band_centres(speech, voices, "A")

    def score(part: str, pair: tuple[str, str], stats=None) -> VoiceScores:
        return voice_scores(speech, voices, part, centres=centres, enroll_band=pair[0], probe_band=pair[1],
                            enroll=cfg.voice_enroll, probes=cfg.voice_probes, template=cfg.voice_template,
                            pair_stats=stats)

    pair_stats = {}
    for pair in PAIRS:
        _, imp = score("A", pair).scores(False)
        if imp.size < 2:
            raise ConfigError("too few calibration speakers for voice statistics")
        pair_stats[pair_key(*pair)] = (float(imp.mean()), float(max(imp.std(), 1e-6)))
    bands = {(part, pair_key(*pair)): score(part, pair, pair_stats) for part in ("A", "B") for pair in PAIRS}
    voice = {part: bands[(part, "wide>wide")] for part in ("A", "B")}
    timings["voice_scoring_s"] = time.perf_counter() - t2

    persons = chimeric_persons(lfw, speech, min_images=cfg.chimeric_attempts + cfg.face_enroll)
    chim_bands = {key: chimeric_scores(persons, lfw, faces, vs, attempts=cfg.chimeric_attempts,
                                       face_enroll=cfg.face_enroll)
                  for key, vs in bands.items()}
    chim = {part: chim_bands[(part, "wide>wide")] for part in ("A", "B")}
    detection = {}
    for band in BANDS:
        mine = [t for k, t, st in zip(voices.keys, voices.tags or [], voices.status)
                if st == "ok" and k.endswith(NARROW) == (band == "narrow")]
        detection[band] = (len(mine), sum(t == band for t in mine))
    timings["measure_s"] = time.perf_counter() - t0
    return Measurements(cfg, lfw, speech, faces, voices, {**face_models, **voice_models}, tf, aaa,
                        face_enrolled, centres, pair_stats, voice, bands, persons, chim, chim_bands, timings, detection)
