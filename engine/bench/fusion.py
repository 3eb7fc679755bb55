"""Face + voice fusion on chimeric persons.

No public data set holds the same people's faces and voices, so a person here is
*chimeric*: a speechocean762 speaker paired with an LFW identity by the fixed mapping
of :func:`engine.bench.datasets.chimeric_persons`. Such a person enrolls with the first
``face_enroll`` images of their face identity (a probe's face score is the best over
them, as the engine compares) and the enrollment utterances of their speaker; attempt
``k`` (from 1) presents face image ``face_enroll + k`` together with voice probe ``k``.
An attempt whose face or voice fails to acquire is a rejection (counted apart).

Direct comparisons are few (tens of persons). Because the mapping is arbitrary, the
face score and the voice score of an impostor attempt are independent by construction,
so the fused impostor distribution is also estimated on the *cross product* of all face
impostor comparisons and all voice impostor comparisons of the same part
(:class:`CrossFused`); figures from it say so and give both counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.bench.datasets import Chimera, Lfw
from engine.bench.embeddings import Embedded
from engine.bench.faces import first_images
from engine.bench.stats import ExactScores, ImpostorDistribution
from engine.bench.voices import VoiceScores

__all__ = ["ChimericScores", "chimeric_scores", "CrossFused", "cross_genuine_policy", "fisher_weights"]


@dataclass
class ChimericScores:
    part: str
    persons: list[Chimera]
    #: claimed person (row) x attempt (column) scores
    face: np.ndarray
    voice: np.ndarray
    attempt_person: np.ndarray  # (m,) index into persons
    failed_to_enroll: int
    attempts_failed: int  # attempts lost to a failure to acquire (face or voice)
    genuine_attempts_failed: int

    @property
    def genuine_mask(self) -> np.ndarray:
        return np.arange(len(self.persons))[:, None] == self.attempt_person[None, :]


def chimeric_scores(
    persons: list[Chimera], lfw: Lfw, faces: Embedded, voices: VoiceScores, *, attempts: int = 6,
    face_enroll: int = 2,
) -> ChimericScores:
    """Scores of every chimeric person of a part against every attempt of that part."""
    part = voices.part
    by_name = first_images(lfw)
    pidx = voices.probe_index()
    spk_row = {s: i for i, s in enumerate(voices.speakers)}
    ok = faces.ok
    kept: list[Chimera] = []
    enroll_face: list[np.ndarray] = []
    attempt_face: list[np.ndarray] = []
    attempt_voice_col: list[int] = []
    attempt_person: list[int] = []
    failed_enroll = failed_attempts = 0
    genuine_failed = 0
    for p in persons:
        if p.part != part:
            continue
        imgs = by_name[p.face]
        if len(imgs) < face_enroll or not ok[imgs[:face_enroll]].all() or p.speaker not in spk_row:
            failed_enroll += 1
            continue
        kept.append(p)
        enroll_face.append(faces.emb[imgs[:face_enroll]])
        voice_probe_keys = voices.planned_probes[p.speaker]
        for k in range(min(attempts, len(voice_probe_keys))):
            if face_enroll + k >= len(imgs):
                break
            face_i = imgs[face_enroll + k]
            if voice_probe_keys[k] not in pidx or not ok[face_i]:
                failed_attempts += 1
                genuine_failed += 1
                continue
            attempt_face.append(faces.emb[face_i])
            attempt_voice_col.append(pidx[voice_probe_keys[k]])
            attempt_person.append(len(kept) - 1)
    d = faces.emb.shape[1]
    ef = np.asarray(enroll_face, dtype=np.float32).reshape(-1, d)  # face_enroll rows per person
    af = np.asarray(attempt_face, dtype=np.float32).reshape(-1, d)
    face = (ef @ af.T).reshape(len(kept), face_enroll, len(attempt_face)).max(axis=1).astype(np.float64)
    vm = voices.norm if voices.norm is not None else voices.raw
    rows = [spk_row[p.speaker] for p in kept]
    voice = vm[np.ix_(rows, attempt_voice_col)] if rows and attempt_voice_col else np.zeros((len(rows), 0))
    return ChimericScores(part, kept, face, voice, np.asarray(attempt_person, dtype=np.int64),
                          failed_enroll, failed_attempts, genuine_failed)


def fisher_weights(
    face_genuine: np.ndarray, voice_genuine: np.ndarray,
    face_imp: tuple[float, float], voice_imp: tuple[float, float],
) -> tuple[float, float]:
    """Weights of the z-scored modalities: (mean_g - mean_i) / pooled variance, summing to 1."""
    out = []
    for g, (mi, si) in ((face_genuine, face_imp), (voice_genuine, voice_imp)):
        z = (np.asarray(g, dtype=np.float64) - mi) / si
        w = float(z.mean()) / (0.5 * (float(z.var()) + 1.0)) if z.size else 0.0
        out.append(max(w, 0.0))
    total = sum(out)
    if total <= 0:
        return 0.5, 0.5
    return out[0] / total, out[1] / total


class CrossFused:
    """Fused impostor scores over the cross product of face and voice impostor scores.

    ``fused = wf * (f - mf) / sf + wv * (v - mv) / sv``; with ``floors`` only pairs with
    ``f >= face_floor`` and ``v >= voice_floor`` can be accepted (the policy).
    """

    def __init__(
        self, face: ImpostorDistribution, voice: np.ndarray, *, mf: float, sf: float, mv: float,
        sv: float, wf: float, wv: float, floors: tuple[float, float] | None = None,
    ) -> None:
        if wf <= 0:
            raise ValueError("the face weight must be positive for the cross product")
        self.face = face
        self.voice = np.sort(np.asarray(voice, dtype=np.float64))
        self.mf, self.sf, self.mv, self.sv, self.wf, self.wv = mf, sf, mv, sv, wf, wv
        self.floors = floors
        self.n = int(face.n) * int(self.voice.size)
        self.n_face = int(face.n)
        self.n_voice = int(self.voice.size)

    def _face_thresholds(self, t: np.ndarray) -> np.ndarray:
        zv = (self.voice - self.mv) / self.sv
        return self.mf + self.sf * (t[:, None] - self.wv * zv[None, :]) / self.wf

    def count_ge(self, t: np.ndarray | float) -> np.ndarray:
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        out = np.zeros(t.shape, dtype=np.int64)
        for start in range(0, t.size, 64):
            ft = self._face_thresholds(t[start : start + 64])
            if self.floors is not None:
                ft = np.maximum(ft, self.floors[0])
            counts = np.asarray(self.face.count_ge(ft.reshape(-1)), dtype=np.int64).reshape(ft.shape)
            if self.floors is not None:
                counts = counts * (self.voice >= self.floors[1])[None, :]
            out[start : start + 64] = counts.sum(axis=1)
        return out if out.size > 1 else out.reshape(())

    def threshold_for(self, allowed: int) -> tuple[float, bool]:
        """Bisection for the lowest fused threshold with at most ``allowed`` accepted."""
        hi = self.wf * (1.0 - self.mf) / self.sf + self.wv * (float(self.voice[-1]) - self.mv) / self.sv + 1.0
        lo = self.wf * (-1.0 - self.mf) / self.sf + self.wv * (float(self.voice[0]) - self.mv) / self.sv - 1.0
        if int(self.count_ge(lo)) <= allowed:
            return lo, False
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if int(self.count_ge(mid)) <= allowed:
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-9:
                break
        return hi, False

    def describe(self) -> str:
        return (f"cross product of {self.n_face:,} face x {self.n_voice:,} voice impostor "
                f"comparisons ({self.n:.3g} combinations)")


def direct_genuine_impostor(ch: ChimericScores, fused: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = ch.genuine_mask
    return fused[g], fused[~g]


def fused_exact(ch: ChimericScores, fuse) -> tuple[ExactScores, ExactScores]:
    fused = fuse(ch.face, ch.voice)
    g, i = direct_genuine_impostor(ch, fused)
    return ExactScores(g), ExactScores(i)



def cross_genuine_policy(
    face_genuine: np.ndarray, voice_genuine: np.ndarray, accept, *, replicates: int = 2000, seed: int = 19,
) -> dict:
    """The policy's FNMR over the cross product of genuine face and genuine voice comparisons.

    The chimeric persons pair face identities and speakers arbitrarily, so a genuine
    attempt's face and voice scores are independent by construction, exactly as the
    impostor side of :class:`CrossFused` assumes: any genuine face comparison of the part
    with any genuine voice comparison is a genuine attempt. This uses every identity of the
    part (not only the few paired with a speaker). ``accept(face, voice)`` is the policy,
    vectorised. The 95 % interval is a percentile bootstrap resampling the face and the
    voice comparisons independently (comparisons, not persons, are the unit).
    """
    f = np.asarray(face_genuine, dtype=np.float64).reshape(-1)
    v = np.asarray(voice_genuine, dtype=np.float64).reshape(-1)
    ok = np.asarray(accept(f[:, None], v[None, :]), dtype=np.float64)  # (faces, voices)
    nf, nv = ok.shape
    rng = np.random.default_rng(seed)
    wf = rng.multinomial(nf, np.full(nf, 1.0 / nf), size=replicates).astype(np.float64)
    wv = rng.multinomial(nv, np.full(nv, 1.0 / nv), size=replicates).astype(np.float64)
    boot = 1.0 - ((wf @ ok) * wv).sum(axis=1) / (nf * nv)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"rate": float(1.0 - ok.mean()), "low": float(lo), "high": float(hi),
            "n_face": nf, "n_voice": nv, "n": nf * nv, "method": f"bootstrap ({replicates}) of both sides"}
