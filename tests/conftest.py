"""Shared fixtures: an engine on loopback with the fake extractor (fast) or the real models."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NoReturn

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


# ---- services: PostgreSQL (and Redis) on 127.0.0.1, as on every CI machine ------------------------
#: CI (.ci/run) sets NETID_REQUIRE_SERVICES=1: a missing service fails the run instead of skipping.
REQUIRE_SERVICES = os.environ.get("NETID_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get("NETID_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_unreachable_services: dict[str, str] = {}


def service_unreachable(name: str, why: str) -> NoReturn:
    """Skip the calling test because ``name`` cannot be reached, or fail it in CI."""
    _unreachable_services[name] = why
    message = f"{name} is unreachable ({why})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}; NETID_REQUIRE_SERVICES=1 requires it", pytrace=False)
    pytest.skip(message)


def pytest_terminal_summary(terminalreporter) -> None:
    for name, why in _unreachable_services.items():
        done = "failed" if REQUIRE_SERVICES else "skipped"
        terminalreporter.write_line(f"{name} is unreachable ({why}): the tests that need it were {done}")


class PostgresSchemas:
    """Fresh schemas ``netid_test_<run>_<n>`` in the test database, all dropped at the end."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.run = f"netid_test_{secrets.token_hex(4)}"
        self.made: list[str] = []

    def url(self) -> str:
        """A store URL on a schema of its own (created by the store that opens it)."""
        name = f"{self.run}_{len(self.made)}"
        self.made.append(name)
        return f"{self.base_url}{'&' if '?' in self.base_url else '?'}schema={name}"

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(self.base_url, autocommit=True) as conn:
            for name in self.made:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture(scope="session")
def postgres_schemas():
    try:
        import psycopg

        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except Exception as exc:  # not installed, refused, unknown database...
        service_unreachable("PostgreSQL", f"{type(exc).__name__}: {str(exc).strip()[:160]}")
    schemas = PostgresSchemas(POSTGRES_URL)
    yield schemas
    schemas.drop_all()


@pytest.fixture
def postgres_url(postgres_schemas: PostgresSchemas) -> str:
    """A PostgreSQL store URL on a fresh schema (skips or fails as ``service_unreachable``)."""
    return postgres_schemas.url()
