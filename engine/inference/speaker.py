"""A speaker embedding as the engine keeps it: the vector and the band it was heard in.

The band is the recording's effective bandwidth (:func:`engine.inference.voice.detect_band`):
"wide" for a 16 kHz capture, "narrow" for 8 kHz or telephone-band audio. Scores are
normalised for the bands of both sides (:meth:`engine.matching.calibration.ScoreModel.voice_score`),
so a stored voice template carries its band: a version byte, a band byte, then the
float32 vector (little-endian), sealed like every template.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

__all__ = ["BANDS", "Band", "SpeakerEmbedding", "enrollment_band", "pack_template", "unpack_template"]

Band = Literal["wide", "narrow"]
BANDS: tuple[Band, ...] = ("wide", "narrow")
_TEMPLATE_VERSION = 1


class SpeakerEmbedding(NamedTuple):
    """A recording's L2-normalised speaker embedding and its detected band."""

    vector: np.ndarray  # (d,) float32
    band: Band


def enrollment_band(bands: Sequence[str]) -> Band:
    """An enrollment's band: the narrowest of its recordings'."""
    return "narrow" if "narrow" in bands else "wide"


def pack_template(vector: np.ndarray, band: str) -> bytes:
    """A voice template's plaintext: version, band code, float32 vector."""
    return struct.pack("<BB", _TEMPLATE_VERSION, BANDS.index(band)) + np.asarray(vector, dtype="<f4").tobytes()


def unpack_template(plaintext: bytes) -> SpeakerEmbedding:
    """The inverse of :func:`pack_template`; ``ValueError`` for anything else."""
    if len(plaintext) < 6 or (len(plaintext) - 2) % 4 or plaintext[0] != _TEMPLATE_VERSION \
            or plaintext[1] >= len(BANDS):
        raise ValueError("not a voice template of this engine")
    vec = np.frombuffer(plaintext, dtype="<f4", offset=2).astype(np.float32)
    return SpeakerEmbedding(vec, BANDS[plaintext[1]])
