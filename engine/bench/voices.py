"""Voice figures on speechocean762, per pair of bands: several-utterance enrollment.

Every utterance is embedded twice: as recorded (16 kHz, "wide") and band-limited to
8 kHz ("narrow", :func:`engine.inference.voice.band_limited`: what a telephone-band capture of the
same speech gives). A pair of bands ``"wide>narrow"`` is a wide-band enrollment scored
against narrow-band probes.

Protocol, per speaker (utterances in id order): the first ``enroll`` utterances are the
enrollment, the next ``probes`` are probes. A probe is scored against a speaker as the
engine scores it (:class:`engine.matching.calibration.ScoreModel`): both sides centred on their
band, the enrollment's centroid, the cosine, then standardised by the pair's impostor
statistics. Every probe is compared with every enrolled speaker of the same part: its own
(genuine) and all others (impostor). Recordings are cut to their first ``max_seconds``
(realistic 2-5 s phrases); one that the engine refuses is a failure to acquire, counted,
and its comparisons are lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.bench.datasets import Speech
from engine.bench.embeddings import Embedded
from engine.matching.calibration import centre, pair_key, voice_templates

__all__ = ["NARROW", "VoiceScores", "band_key", "band_centres", "band_rows", "voice_scores"]

#: The suffix of a band-limited copy's key in the embedding cache.
NARROW = "#narrow"


def band_key(rel: str, band: str) -> str:
    """The embedding-cache key of an utterance in a band."""
    return rel + NARROW if band == "narrow" else rel


@dataclass
class VoiceScores:
    part: str
    pair: str  # "enrollment band>probe band"
    speakers: list[str]  # enrolled speakers (rows)
    probe_keys: list[str]  # acquired probes (columns)
    probe_speaker: np.ndarray  # (m,) str
    raw: np.ndarray  # (n_spk, m) centred cosine to the enrollment's template
    norm: np.ndarray | None  # (n_spk, m) standardised for the pair, when its statistics were given
    failed_to_enroll: list[str]
    probes_failed: int  # probes that failed to acquire
    enroll_failed_utterances: int
    #: every planned probe of each enrolled speaker, acquired or not, in order
    planned_probes: dict[str, list[str]]

    @property
    def genuine_mask(self) -> np.ndarray:
        return np.asarray(self.speakers)[:, None] == self.probe_speaker[None, :]

    def scores(self, normalised: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(genuine, impostor) score arrays."""
        m = self.norm if (normalised and self.norm is not None) else self.raw
        g = self.genuine_mask
        return m[g], m[~g]

    def probe_index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.probe_keys)}


def band_rows(speech: Speech, voices: Embedded, part: str, band: str) -> list[int]:
    """Rows of ``voices`` holding the acquired utterances of a part in a band."""
    idx = {k: i for i, k in enumerate(voices.keys)}
    rows = [idx[band_key(u.rel, band)] for spk, utts in speech.speakers.items() if speech.part[spk] == part
            for u in utts]
    return [r for r in rows if voices.status[r] == "ok"]


def band_centres(speech: Speech, voices: Embedded, part: str) -> dict[str, np.ndarray]:
    """Each band's centre: the mean embedding of every acquired utterance of a part."""
    return {band: voices.emb[band_rows(speech, voices, part, band)].mean(axis=0, dtype=np.float64)
            for band in ("wide", "narrow")}


def voice_scores(
    speech: Speech, voices: Embedded, part: str, *, centres: dict[str, np.ndarray],
    enroll_band: str = "wide", probe_band: str = "wide", enroll: int = 3, probes: int = 7,
    template: str = "centroid", pair_stats: dict[str, tuple[float, float]] | None = None,
) -> VoiceScores:
    """Scores of every probe of a part against every enrolled speaker of that part."""
    idx = {k: i for i, k in enumerate(voices.keys)}
    speakers, templates, failed = [], [], []
    enroll_failed = 0
    probe_rows, probe_keys, probe_spk, probes_failed = [], [], [], 0
    planned: dict[str, list[str]] = {}
    for spk, utts in speech.speakers.items():
        if speech.part[spk] != part:
            continue
        rows = [idx[band_key(u.rel, enroll_band)] for u in utts[:enroll]]
        good = [r for r in rows if voices.status[r] == "ok"]
        enroll_failed += len(rows) - len(good)
        if not good:
            failed.append(spk)
            continue
        speakers.append(spk)
        templates.append(voice_templates(centre(voices.emb[good], centres[enroll_band]), template))
        planned[spk] = [band_key(u.rel, probe_band) for u in utts[enroll : enroll + probes]]
        for key in planned[spk]:
            if voices.status[idx[key]] == "ok":
                probe_rows.append(idx[key])
                probe_keys.append(key)
                probe_spk.append(spk)
            else:
                probes_failed += 1
    dim = voices.emb.shape[1]
    probe_emb = centre(voices.emb[probe_rows], centres[probe_band]) if probe_rows else np.zeros((0, dim), np.float32)
    raw = np.stack([(probe_emb @ t.T).max(axis=1) for t in templates]) if speakers else np.zeros((0, 0))
    pair = pair_key(enroll_band, probe_band)
    norm = None
    if pair_stats is not None:
        mean, std = pair_stats[pair]
        norm = (raw.astype(np.float64) - mean) / std
    return VoiceScores(part, pair, speakers, probe_keys, np.asarray(probe_spk), raw.astype(np.float64), norm,
                       failed, probes_failed, enroll_failed, planned)
