"""1:1 matching: a probe against the credential's own templates, read through the store.

No template is held in memory between verifications: each match reads the credential
and its templates in one indexed query (:meth:`Store.credential_with_templates`),
opens them and scores the probe. A credential that is no longer active (its card
reported lost, re-applied for) is refused with the error that says why.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from ..errors import UnknownCredential
from ..ops.layer_cpu import LayerCpu
from engine.inference.speaker import SpeakerEmbedding, enrollment_band
from ..store import Credential, Store, raise_unless_active
from .index import normalise
from .templates import TemplateSealer

__all__ = ["Enrolled", "Match", "Matcher", "StoreMatcher"]


class Enrolled(NamedTuple):
    """A credential's templates, opened: normalised rows, and the band of its voice enrollment."""

    credential: Credential
    faces: np.ndarray  # (k, face_dim)
    voices: np.ndarray  # (k, voice_dim)
    band: str


class Match(NamedTuple):
    credential: Credential  # as it is now
    face: float
    voice: float
    decision: Any  # the score model's decision: .passed, .reason
    enrolled_band: str


@runtime_checkable
class Matcher(Protocol):
    def match(self, credential_id: str, face: np.ndarray, voice: SpeakerEmbedding) -> Match:
        """Score a probe against the credential's templates (blocking: call it from a
        worker thread). Raises the credential's status error if it is not active."""
        ...


class StoreMatcher:
    """Face: best cosine over the enrolled faces. Voice: as the score model calibrated it
    (centroid or best), normalised for the bands of the enrollment and the probe."""

    def __init__(
        self, store: Store, templates: TemplateSealer, scores: Any, *, face_dim: int, voice_dim: int, cpu: LayerCpu | None = None,
    ) -> None:
        self.store = store
        self.cpu = cpu  # the store's read counted as the store layer's
        self.templates = templates
        self.scores = scores
        self.face_dim = face_dim
        self.voice_dim = voice_dim

    def enrolled(self, credential_id: str) -> Enrolled:
        read = functools.partial(self.store.credential_with_templates, credential_id)
        cred, rows = self.cpu.call("store", read) if self.cpu is not None else read()
        cred = raise_unless_active(cred)
        faces = [self.templates.open_face(r.ciphertext, cred.card_number) for r in rows if r.modality == "face"]
        voices = [self.templates.open_voice(r.ciphertext, cred.card_number) for r in rows if r.modality == "voice"]
        if not faces or not voices:
            raise UnknownCredential("no templates for this credential")
        return Enrolled(
            cred,
            normalise(np.stack(faces), self.face_dim),
            normalise(np.stack([v.vector for v in voices]), self.voice_dim),
            enrollment_band([v.band for v in voices]),
        )

    def match(self, credential_id: str, face: np.ndarray, voice: SpeakerEmbedding) -> Match:
        e = self.enrolled(credential_id)
        f = float((e.faces @ normalise(face[None, :], self.face_dim)[0]).max())
        v = self.scores.voice_score(voice.vector, voice.band, e.voices, e.band)
        return Match(e.credential, f, v, self.scores.decide(f, v), e.band)
