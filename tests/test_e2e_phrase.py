"""End to end over real TCP with the real models: phrase challenges (read English sentences).

The resident is chimeric, as in ``test_e2e.py``: an LFW person paired with a
speechocean762 speaker from ``samples/``, who read three sentences. The engine draws each
session's challenge from those three sentences, and Whisper base checks that the recording
says it: the recording of the asked sentence passes; the same voice reading another of the
sentences, or a recording made for an earlier session, fails with ``challenge_mismatch``.
Two of the recordings enroll the voice, and only sessions asking for those two sentences
are answered (see ``ENROLLED``).

The recordings and their transcripts (``samples/speech/text``) come from ``samples/``,
so these tests never skip.
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

import nacl.signing
import pytest
import trio

from engine.app import build_engine, run_engine
from engine.challenge import load_phrases
from engine.wire.client import open_holder, open_relying_party
from engine.config import ChallengeSettings, EngineConfig, LimitsConfig
from engine.errors import ConfigError
from engine.ops.registry import import_registry

from .conftest import make_rp

pytestmark = pytest.mark.slow

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
LFW, SPEECH = SAMPLES / "lfw", SAMPLES / "speech"
TRANSCRIPTS = SPEECH / "text"


def _resident() -> tuple[str, dict[str, Path]]:
    """The first identity in ``samples/identities.json`` whose speaker's four sentences make
    a valid phrase list: its LFW face, and each sentence with its recording."""
    text = dict(ln.split(" ", 1) for ln in TRANSCRIPTS.read_text().splitlines() if ln.strip())
    for ident in json.loads((SAMPLES / "identities.json").read_text()):
        utts = sorted((SPEECH / ident["speech_speaker"]).glob("*.flac")) if ident["speech_speaker"] else []
        if len(utts) != 4 or any(u.stem not in text for u in utts):
            continue
        try:
            phrases = load_phrases([text[u.stem] for u in utts])
        except ConfigError:
            continue
        if len(phrases) == 4:
            return ident["face"], dict(zip(phrases, utts))
    raise AssertionError("no speaker in samples/ has four usable sentences")


FACE, RECORDING = _resident()
PHRASES = tuple(RECORDING)
#: The three sentences whose recordings enroll the resident's voice. Sessions are answered only
#: when they ask for one of these (a holder may leave a session to expire), so that what a
#: test checks is the spoken challenge, never the speaker model's false non-match rate.
ENROLLED = PHRASES[:3]
CARD = "C-resident"


def img(i: int) -> bytes:
    return (LFW / FACE / f"{FACE}_{i:04d}.jpg").read_bytes()


def said(phrase: str) -> bytes:
    """The resident's recording of ``phrase`` (FLAC bytes, as a phone may send them)."""
    return RECORDING[phrase].read_bytes()


@pytest.fixture(scope="module")
def extractors():
    from engine.inference.extractors import onnx_extractors
    from engine.inference.models import DEFAULT_MODELS_DIR

    x = onnx_extractors(DEFAULT_MODELS_DIR, challenge_kind="phrase")  # the workers preload Whisper
    x.warmup()
    yield x
    x.close()


@pytest.fixture(scope="module")
def scores():
    from engine.matching.calibration import ScoreModel
    from engine.inference.models import DEFAULT_MODELS_DIR

    return ScoreModel.load(DEFAULT_MODELS_DIR)


@pytest.fixture
async def env(tmp_path, nursery, extractors, scores):
    """An engine whose sessions ask for one of the resident's sentences, with the resident
    enrolled from their phone: (running engine, relying party's keys, credential, device key)."""
    cfg = EngineConfig(data_dir=tmp_path / "data", port=0, limits=LimitsConfig(session_ttl=60.0),
                       challenge=ChallengeSettings(kind="phrase", phrases=PHRASES))
    engine = build_engine(cfg, extractors=extractors, scores=scores)
    reg = tmp_path / "cards.jsonl"
    reg.write_text(json.dumps({"card_number": CARD, "name": FACE, "photo": str(LFW / FACE / f"{FACE}_0001.jpg"), "status": "valid"}) + "\n")
    report = import_registry(reg, store=engine.store, cipher=engine.cipher, embed_faces=extractors.face_batch, now=time.time())
    assert report.imported == 1, report.refused
    rp = make_rp(engine.store, "hotel")
    running = await nursery.start(run_engine, engine)
    key = nacl.signing.SigningKey.generate()
    with trio.fail_after(180):
        async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
            got = await phone.enroll(CARD, [img(2), img(3)], [said(p) for p in ENROLLED])
    yield running, rp, got.credential_id, key
    running.drain()


@asynccontextmanager
async def connected(env):
    """The relying party and the resident's phone, both connected: (rp, phone, credential)."""
    running, rp_keys, cred, key = env
    async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
        async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
            yield rp, phone, cred


async def session(rp, phone, phrase: str | None = None):
    """A fresh session that asks for ``phrase`` (default: one of the ``ENROLLED`` sentences)."""
    for _ in range(100):
        qr = phone.scan((await rp.open_session()).qr)
        assert qr.challenge in PHRASES
        if qr.challenge == phrase or (phrase is None and qr.challenge in ENROLLED):
            return qr
    raise AssertionError(f"no session asked for {phrase or 'an enrolled sentence'}")


async def test_the_asked_sentence_passes_other_words_fail(env):
    with trio.fail_after(180):
        async with connected(env) as (rp, phone, cred):
            # each enrolled sentence, when the engine asks for it, said by the resident
            # (Whisper's score of a recording is the same every time: no retries)
            for phrase in ENROLLED:
                qr = await session(rp, phone, phrase)
                ok = await phone.verify(cred, qr, face=img(4), voice=said(qr.challenge))
                assert ok == await rp.results().__anext__()  # the holder's copy is the pushed one
                assert (ok.outcome, ok.reason) == ("pass", "match"), phrase
            # the resident's own voice reading the other enrolled sentence
            qr = await session(rp, phone)
            other = await phone.verify(cred, qr, face=img(4), voice=said(next(p for p in ENROLLED if p != qr.challenge)))
            assert other == await rp.results().__anext__()
            assert (other.outcome, other.reason) == ("fail", "challenge_mismatch")


async def test_a_recording_from_an_earlier_session_fails(env):
    with trio.fail_after(180):
        async with connected(env) as (rp, phone, cred):
            # the recording made for the first session answers it, but not a later one
            # that asks for another sentence
            for _attempt in range(3):
                q1 = await session(rp, phone)
                q2 = await session(rp, phone)
                while q2.challenge == q1.challenge:
                    q2 = await session(rp, phone)
                old_recording = said(q1.challenge)
                stale = await phone.verify(cred, q2, face=img(5), voice=old_recording)
                assert (stale.outcome, stale.reason) == ("fail", "challenge_mismatch")
                ok = await phone.verify(cred, q1, face=img(5), voice=old_recording)
                if ok.outcome == "pass":
                    break
            assert (ok.outcome, ok.reason) == ("pass", "match")
