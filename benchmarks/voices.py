"""Voice figures on speechocean762: enrollment from several utterances, AS-norm.

Protocol, per speaker (utterances in id order): the first ``enroll`` utterances are the
enrollment, each kept as a template as the engine keeps them; the next ``probes`` are
probes. A probe is scored against a speaker as the engine scores it: the best cosine
over that speaker's templates. Every probe is compared with every enrolled speaker of
the same part: its own (genuine) and all others (impostor). Recordings are cut to their
first ``max_seconds`` (realistic 2-5 s phrases); one that the engine refuses is a
failure to acquire, counted, and its comparisons are lost.

AS-norm uses :class:`engine.calibration.VoiceCohort`, the engine's own code. On the
calibration part the cohort is made of that part's own utterances, so each comparison
leaves out of the cohort both speakers it involves; on the report part the cohort is
the calibration part's, as shipped to the engine, and nothing needs leaving out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.datasets import Speech
from benchmarks.embeddings import Embedded
from engine.calibration import VoiceCohort, as_norm, topk_stats, voice_templates

__all__ = ["VoiceScores", "voice_scores", "cohort_of"]


@dataclass
class VoiceScores:
    part: str
    speakers: list[str]  # enrolled speakers (rows)
    probe_keys: list[str]  # acquired probes (columns)
    probe_speaker: np.ndarray  # (m,) str
    raw: np.ndarray  # (n_spk, m) best cosine over the row speaker's templates
    norm: np.ndarray | None  # (n_spk, m) AS-norm, when a cohort was given
    templates: dict[str, np.ndarray]
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


def cohort_of(speech: Speech, voices: Embedded, part: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(embeddings, speaker label per row, keys) of every usable utterance of a part."""
    idx = {k: i for i, k in enumerate(voices.keys)}
    rows, labels, keys = [], [], []
    for spk, utts in speech.speakers.items():
        if speech.part[spk] != part:
            continue
        for u in utts:
            i = idx[u.rel]
            if voices.status[i] == "ok":
                rows.append(voices.emb[i])
                labels.append(spk)
                keys.append(u.rel)
    return np.asarray(rows, dtype=np.float32).reshape(-1, voices.emb.shape[1]), labels, keys


def voice_scores(
    speech: Speech, voices: Embedded, part: str, *, enroll: int = 3, probes: int = 7,
    cohort: VoiceCohort | None = None, leave_out: bool = False, template: str = "max",
) -> VoiceScores:
    """Scores of every probe of a part against every enrolled speaker of that part.

    ``template="max"`` keeps each enrollment utterance as a template and scores the best
    cosine over them; ``"centroid"`` enrolls the normalised mean (the engine applies the rule its operating points record).
    """
    if template not in ("max", "centroid"):
        raise ValueError(f"unknown voice template rule {template!r}")
    idx = {k: i for i, k in enumerate(voices.keys)}
    speakers, templates, failed = [], {}, []
    enroll_failed = 0
    probe_keys, probe_spk, probes_failed = [], [], 0
    planned: dict[str, list[str]] = {}
    for spk, utts in speech.speakers.items():
        if speech.part[spk] != part:
            continue
        rows = [idx[u.rel] for u in utts[:enroll]]
        good = [r for r in rows if voices.status[r] == "ok"]
        enroll_failed += len(rows) - len(good)
        if not good:
            failed.append(spk)
            continue
        speakers.append(spk)
        templates[spk] = voice_templates(voices.emb[good], template)
        planned[spk] = [u.rel for u in utts[enroll : enroll + probes]]
        for u in utts[enroll : enroll + probes]:
            if voices.status[idx[u.rel]] == "ok":
                probe_keys.append(u.rel)
                probe_spk.append(spk)
            else:
                probes_failed += 1
    probe_emb = np.asarray([voices.emb[idx[k]] for k in probe_keys], dtype=np.float32).reshape(-1, voices.emb.shape[1])
    probe_spk_arr = np.asarray(probe_spk)
    raw = np.stack([(probe_emb @ templates[s].T).max(axis=1) for s in speakers]) if speakers else np.zeros((0, 0))
    norm = None
    if cohort is not None and speakers:
        norm = _as_norm_matrix(cohort, speakers, templates, probe_emb, probe_spk_arr, raw, leave_out)
    return VoiceScores(part, speakers, probe_keys, probe_spk_arr, raw.astype(np.float64), norm,
                       templates, failed, probes_failed, enroll_failed, planned)


def _as_norm_matrix(
    cohort: VoiceCohort, speakers: list[str], templates: dict[str, np.ndarray],
    probe_emb: np.ndarray, probe_spk: np.ndarray, raw: np.ndarray, leave_out: bool,
) -> np.ndarray:
    n, m = raw.shape
    me, se = np.empty((n, m)), np.empty((n, m))
    mp, sp = np.empty((n, m)), np.empty((n, m))
    if not leave_out:
        for i, s in enumerate(speakers):
            me[i], se[i] = cohort.stats(templates[s])
        for j in range(m):
            mp[:, j], sp[:, j] = cohort.stats(probe_emb[j : j + 1])
    else:
        # each comparison leaves out of the cohort the claimed and the probe's speaker
        def excl(s: str, t: str) -> tuple[str, ...]:
            return (s, t) if s != t else (s,)

        probe_speakers = sorted(set(probe_spk.tolist()))
        col = {t: k for k, t in enumerate(probe_speakers)}
        for i, s in enumerate(speakers):
            m_s, s_s = topk_stats(cohort.topk_many(templates[s], [excl(s, t) for t in probe_speakers]))
            cols = np.array([col[t] for t in probe_spk])
            me[i], se[i] = m_s[cols], s_s[cols]
        for j in range(m):
            mp[:, j], sp[:, j] = topk_stats(
                cohort.topk_many(probe_emb[j : j + 1], [excl(s, str(probe_spk[j])) for s in speakers]))
    return as_norm(raw, (me, se), (mp, sp))
