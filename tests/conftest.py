"""Shared fixtures: an engine on loopback with the fake extractor (fast) or the real models."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import nacl.public
import nacl.signing
import pytest

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
#: ChallengeConfig.recognisers for tests of pocketsphinx's alignment, for both kinds
POCKETSPHINX_ONLY = {"digits": "pocketsphinx", "phrase": "pocketsphinx"}


class _Decision(NamedTuple):
    passed: bool
    reason: str


class FixedScores:
    """Score model for the fake extractor: cosine 0.5 per modality, no fusion."""

    def threshold(self, modality: str, target_fmr: float | None = None) -> float:
        return 0.5

    def voice_score(self, probe, probe_band: str, enrolled, enrolled_band: str) -> float:
        """The best raw cosine over the templates, whatever the bands."""
        return float((enrolled @ probe).max())

    def decide(self, face: float, voice: float) -> _Decision:
        if face < 0.5:
            return _Decision(False, "face_mismatch")
        if voice < 0.5:
            return _Decision(False, "voice_mismatch")
        return _Decision(True, "match")


# ---- samples the fake extractors understand, and a clock the test moves -----------------------
def face(who: str, n: int = 0) -> bytes:
    """A face "image" of ``who`` for the fake extractor (``n``: another photo of them)."""
    return f"FACE:{who}:{n}".encode()


def voice(who: str, said: str = "", n: int = 0) -> bytes:
    """A "recording" of ``who`` saying ``said`` for the fake extractor."""
    return f"VOICE:{who}:{said}:{n}".encode()


class Clock:
    """The engine's wall clock, moved forward by the test instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class RPKeys:
    rp_id: str
    signing: nacl.signing.SigningKey
    box: nacl.public.PrivateKey


def make_rp(store, rp_id: str = "hotel", *, max_level: str = "high", quota: int = 100_000, name: str = "Hotel Example") -> RPKeys:
    from engine.store import RelyingParty

    keys = RPKeys(rp_id, nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate())
    store.add_relying_party(
        RelyingParty(
            rp_id=rp_id,
            display_name=name,
            sign_key=bytes(keys.signing.verify_key),
            box_key=bytes(keys.box.public_key),
            max_level=max_level,
            quota_per_minute=quota,
            status="active",
            created_at=time.time(),
        ),
        actor="test",
    )
    return keys


@pytest.fixture
def seed() -> int:
    return 20261127
