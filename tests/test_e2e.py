"""End to end over real TCP with the real models on real data (LFW faces, FSDD digit voices).

The identities are chimeric: an LFW person paired with a Free Spoken Digit Dataset
speaker, who can say any digit string, so the session's spoken challenge is really said.
The data comes from the repository's own ``samples/`` (always present), so these tests
never skip; ``netid compare`` is checked on the LFW protocol pairs when ``../shared/data`` is there.
"""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path

import msgspec
import nacl.signing
import numpy as np
import pytest
import trio

from engine import errors as E
from engine.app import build_engine, run_engine
from engine.wire.client import open_connection, open_holder, open_relying_party
from engine.config import EngineConfig, IndexConfig, LimitsConfig
from engine.matching import TemplateSealer
from engine.store.bulk import BulkCredential, bulk_enroll
from engine.cli.demo import DigitVoices
from engine.ops.registry import import_registry, seal_card_template
from engine.store import CardRecord

from .conftest import DATA, make_rp

pytestmark = pytest.mark.slow

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
LFW = SAMPLES / "lfw"
PEOPLE = {"alice": ("Al_Gore", "george"), "bob": ("Gerhard_Schroeder", "jackson"), "carol": ("Laura_Bush", "theo")}


def img(person: str, i: int) -> bytes:
    return (LFW / person / f"{person}_{i:04d}.jpg").read_bytes()


@pytest.fixture(scope="module")
def extractors():
    from engine.inference.extractors import onnx_extractors
    from engine.inference.models import DEFAULT_MODELS_DIR

    x = onnx_extractors(DEFAULT_MODELS_DIR)
    x.warmup()
    return x


@pytest.fixture(scope="module")
def scores():
    from engine.matching.calibration import ScoreModel
    from engine.inference.models import DEFAULT_MODELS_DIR

    return ScoreModel.load(DEFAULT_MODELS_DIR)


class Clock:
    offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


#: The approximate face index (IVF, 4-bit product codes) forced at a register of a few hundred.
SMALL_IVF = IndexConfig(train_min=300, nlist=8, probe_fraction=1.0)


def prefill(engine, n: int, seed: int) -> None:
    """``n`` credentials of random faces, bulk-enrolled: a register the index is trained on."""
    rng = np.random.default_rng(seed)
    faces = rng.standard_normal((n, 128)).astype(np.float32)
    sealer = TemplateSealer(engine.cipher)
    bulk_enroll(engine.store, [BulkCredential(card_number=f"BG{i:04d}", name="bg", device_key=(i + 1).to_bytes(32, "big"),
                                              templates=[("face", sealer.seal_face(f, f"BG{i:04d}"))]) for i, f in enumerate(faces)],
                actor="test", now=time.time())


@pytest.fixture
async def env(tmp_path, nursery, extractors, scores):
    running, rp = await start_env(tmp_path, nursery, extractors, scores)
    yield running, rp
    running.drain()


async def start_env(tmp_path, nursery, extractors, scores, index: IndexConfig | None = None, background: int = 0):
    cfg = EngineConfig(data_dir=tmp_path / "data", port=0, limits=LimitsConfig(session_ttl=60.0), face_index=index or IndexConfig())
    engine = build_engine(cfg, extractors=extractors, scores=scores)
    engine.clock = Clock()
    if background:
        prefill(engine, background, 23)
    reg = tmp_path / "cards.jsonl"
    reg.write_text(
        "".join(
            json.dumps({"card_number": f"C-{who}", "name": who, "photo": str(LFW / face / f"{face}_0001.jpg"), "status": "valid"}) + "\n"
            for who, (face, _spk) in [*PEOPLE.items(), ("alias", ("Al_Gore", ""))]
        )
    )
    report = import_registry(reg, store=engine.store, cipher=engine.cipher, embed_faces=extractors.face_batch, now=time.time())
    assert report.imported == 4, report.refused
    rp = make_rp(engine.store, "hotel")
    running = await nursery.start(run_engine, engine)
    return running, rp


VOICES = DigitVoices(SAMPLES / "digits", range(0, 2))
PROBE_VOICES = DigitVoices(SAMPLES / "digits", range(2, 5))


async def enroll(port: int, who: str, rng: random.Random):
    face, spk = PEOPLE[who]
    key = nacl.signing.SigningKey.generate()
    voices = [VOICES.say(spk, "".join(rng.choice("0123456789") for _ in range(8)), rng) for _ in range(3)]
    async with open_holder("127.0.0.1", port, device_key=key) as phone:
        got = await phone.enroll(f"C-{who}", [img(face, 2), img(face, 3)], voices)
    return got.credential_id, key


async def attempt(running, rp_keys, cred, key, *, face: bytes, speaker: str, say=None, rng):
    async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
        opened = await rp.open_session()
        async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
            qr = phone.scan(opened.qr_text)
            said = qr.challenge if say is None else say(qr.challenge)
            mine = await phone.verify(cred, qr, face=face, voice=PROBE_VOICES.say(speaker, said, rng))
        pushed = await rp.results().__anext__()
    assert mine == pushed
    return pushed


def other_digits(challenge: str) -> str:
    """Other words: a different digit in every position (the recogniser scores a string as a
    whole, and a near-miss of one digit is not what this checks; see the challenge benchmark)."""
    return "".join(str((int(d) + 5) % 10) for d in challenge)


def differing(a: str, b: str) -> int:
    return sum(x != y for x, y in zip(a, b))


async def test_genuine_passes_impostors_fail(env, seed):
    running, rp = env
    rng = random.Random(seed)
    with trio.fail_after(120):
        cred, key = await enroll(running.port, "alice", rng)
        face, spk = PEOPLE["alice"]
        # the session's digits come from the engine's own randomness, and a genuine attempt
        # fails now and then (FSDD genuine pass ~95 %): up to three attempts, as a holder would
        for _attempt in range(3):
            ok = await attempt(running, rp, cred, key, face=img(face, 4), speaker=spk, rng=rng)
            if ok.outcome == "pass":
                break
        assert (ok.outcome, ok.reason) == ("pass", "match")
        other_face = await attempt(running, rp, cred, key, face=img(PEOPLE["bob"][0], 1), speaker=spk, rng=rng)
        assert (other_face.outcome, other_face.reason) == ("fail", "biometric_mismatch")
        wrong_words = await attempt(running, rp, cred, key, face=img(face, 6), speaker=spk, say=other_digits, rng=rng)
        assert (wrong_words.outcome, wrong_words.reason) == ("fail", "challenge_mismatch")


async def test_session_rules_and_keys(env, seed):
    running, rp_keys = env
    rng = random.Random(seed)
    face, spk = PEOPLE["alice"]
    with trio.fail_after(120):
        cred, key = await enroll(running.port, "alice", rng)
        async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
            # a recording from an earlier session does not answer this one. Challenges come
            # from the engine's own randomness, so take a pair that differs in every digit (a
            # one-digit near miss is the recogniser's known weak spot, measured separately);
            # a genuine attempt fails now and then (FSDD genuine pass ~95 %, speaker FNMR),
            # so the recording may answer its own session at the second or third attempt.
            async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
                for _attempt in range(3):
                    q1 = phone.scan((await rp.open_session()).qr)
                    q2 = phone.scan((await rp.open_session()).qr)
                    while differing(q1.challenge, q2.challenge) < 6:
                        q2 = phone.scan((await rp.open_session()).qr)
                    old_recording = PROBE_VOICES.say(spk, q1.challenge, rng)
                    stale = await phone.verify(cred, q2, face=img(face, 4), voice=old_recording)
                    assert (stale.outcome, stale.reason) == ("fail", "challenge_mismatch")
                    ok = await phone.verify(cred, q1, face=img(face, 4), voice=old_recording)
                    if ok.outcome == "pass":
                        break
                assert ok.outcome == "pass", ok
                with pytest.raises(E.SessionUsed):  # replay
                    await phone.verify(cred, q1, face=img(face, 4), voice=old_recording)

            thief = nacl.signing.SigningKey.generate()
            async with open_holder("127.0.0.1", running.port, device_key=thief) as phone:
                q = phone.scan((await rp.open_session()).qr)
                with pytest.raises(E.WrongDeviceKey):
                    await phone.verify(cred, q, face=img(face, 4), voice=PROBE_VOICES.say(spk, q.challenge, rng))

            async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
                q = phone.scan((await rp.open_session()).qr)
                running.engine.clock.offset += 61.0
                with pytest.raises(E.SessionExpired):
                    await phone.verify(cred, q, face=img(face, 4), voice=PROBE_VOICES.say(spk, q.challenge, rng))
                running.engine.clock.offset = 0.0

            # bad samples get their own codes
            async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
                q = phone.scan((await rp.open_session()).qr)
                with pytest.raises(E.UndecodableSample):
                    await phone.verify(cred, q, face=b"not an image", voice=PROBE_VOICES.say(spk, q.challenge, rng))


async def test_bad_frames_do_not_hurt_other_connections(env):
    running, _ = env
    with trio.fail_after(30):
        bad = await trio.open_tcp_stream("127.0.0.1", running.port)
        await bad.send_all(struct.pack(">I", 64 * 1024 * 1024))
        async with open_connection("127.0.0.1", running.port) as conn:
            await conn.send_raw(struct.pack(">I", 1) + b"\xc1")
            await conn.ping()
        data = b""
        while chunk := await bad.receive_some():
            data += chunk
        n = struct.unpack(">I", data[:4])[0]
        rest = data[4 + n :]
        err = msgspec.msgpack.decode(rest[4:])
        assert err["code"] == "frame_too_large"


@pytest.fixture(params=["exact", "approximate"])
async def refusals_env(request, tmp_path, nursery, extractors, scores):
    if request.param == "exact":
        running, rp = await start_env(tmp_path, nursery, extractors, scores)
    else:
        running, rp = await start_env(tmp_path, nursery, extractors, scores, index=SMALL_IVF, background=400)
    yield running, request.param
    running.drain()


async def test_enrollment_refusals(refusals_env, seed):
    running, kind = refusals_env
    assert running.engine.duplicates.index.kind == {"exact": "flat", "approximate": "ivf"}[kind]
    rng = random.Random(seed)
    face, spk = PEOPLE["alice"]
    key = nacl.signing.SigningKey.generate()
    voices = [VOICES.say(spk, d, rng) for d in ("12345678", "86420975", "31415926")]
    with trio.fail_after(120):
        async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
            with pytest.raises(E.CardPhotoMismatch):  # bob's face against alice's card
                await phone.enroll("C-alice", [img(PEOPLE["bob"][0], 2)], voices)
            await phone.enroll("C-alice", [img(face, 2)], voices)
            with pytest.raises(E.CardPhotoMismatch):
                await phone.enroll("C-carol", [img(face, 3)], voices)
            # a second card carrying the same person's photo: the 1:N search finds the first enrollment
            with pytest.raises(E.DuplicateIdentity):
                await phone.enroll("C-alias", [img(face, 3)], voices)


async def test_compare_cli_gives_the_engines_scores(env, extractors, tmp_path, capsys, seed):
    """`netid compare face` on LFW pairs scores exactly as verification does (stored, encrypted templates)."""
    from engine.cli import main

    if not (DATA / "lfw" / "pairs.txt").is_file():
        pytest.skip("needs ../shared/data/lfw for the protocol pairs")
    running, _ = env
    engine = running.engine
    lfw = DATA / "lfw" / "images"
    lines = (DATA / "lfw" / "pairs.txt").read_text().splitlines()[1:]
    same = [line.split() for line in lines[:300] if len(line.split()) == 3][:4]
    pairs = []
    for name, i, j in same:
        a = lfw / name / f"{name}_{int(i):04d}.jpg"
        b = lfw / name / f"{name}_{int(j):04d}.jpg"
        pairs.append((a, b))
    pairs_file = tmp_path / "pairs.tsv"
    pairs_file.write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    capsys.readouterr()
    assert main(["compare", "face", "--pairs", str(pairs_file)]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(cli) == len(pairs)
    rng = random.Random(seed)
    for (a, b), row in zip(pairs, cli):
        # enroll A as the only face template of a fresh credential, then score B as a verification would
        key = nacl.signing.SigningKey.generate()
        card_template = seal_card_template(engine.cipher, extractors.face_batch([a.read_bytes()])[0], "C-cmp")
        engine.store.import_cards(
            [CardRecord(card_number="C-cmp", name="x", photo_path=str(a), status="valid", photo_template=card_template)], actor="test"
        )
        async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
            got = await phone.enroll("C-cmp", [a.read_bytes()], [VOICES.say("lucas", d, rng) for d in ("12345678", "86420975", "31415926")])
        probe = extractors.face_batch([b.read_bytes()])[0]
        enrolled = engine.matcher.enrolled(got.credential_id)  # what a verification scores against
        engine_score = float((enrolled.faces @ (probe / np.linalg.norm(probe))).max())
        assert abs(engine_score - row["score"]) < 1e-5, (a, b, engine_score, row)


SPEECH = SAMPLES / "speech"
SPEECH_FACES = ("Al_Gore", "Gerhard_Schroeder", "Laura_Bush", "Howard_Dean")


@pytest.fixture
async def speech_env(tmp_path, nursery, extractors, scores):
    """Voices from speechocean762 (the channel the voice operating point was calibrated on).

    Its speakers read fixed sentences and cannot say the session's digits, so this engine
    runs with the spoken-challenge check off: it tests the speaker check alone.
    """
    from engine.config import ChallengeSettings

    cfg = EngineConfig(data_dir=tmp_path / "data", port=0, challenge=ChallengeSettings(check=False))
    engine = build_engine(cfg, extractors=extractors, scores=scores)
    reg = tmp_path / "cards.jsonl"
    reg.write_text("".join(
        json.dumps({"card_number": f"C-{face.replace('_', '-')}", "name": face, "photo": str(LFW / face / f"{face}_0001.jpg"), "status": "valid"}) + "\n"
        for face in SPEECH_FACES
    ))
    assert import_registry(reg, store=engine.store, cipher=engine.cipher, embed_faces=extractors.face_batch, now=time.time()).imported == 4
    rp = make_rp(engine.store, "hotel")
    running = await nursery.start(run_engine, engine)
    return running, rp


async def test_another_persons_voice_fails(speech_env):
    """Four residents, each verified with their own voice and with another resident's.

    Each enrolls with three recordings and verifies with a fourth. Every impostor voice must
    fail. The genuine rate reflects the measured false non-match rate at the operating point
    (see the accuracy report), so three of the four genuine attempts must pass on this fixed
    sample.
    """
    running, rp_keys = speech_env
    speakers = sorted(p.name for p in SPEECH.iterdir())[:4]
    utts = {s: sorted((SPEECH / s).glob("*.flac")) for s in speakers}
    keys = {face: nacl.signing.SigningKey.generate() for face in SPEECH_FACES}
    creds = {}
    with trio.fail_after(180):
        for face, spk in zip(SPEECH_FACES, speakers):
            async with open_holder("127.0.0.1", running.port, device_key=keys[face]) as phone:
                got = await phone.enroll(f"C-{face.replace('_', '-')}", [img(face, 2), img(face, 3)], [p.read_bytes() for p in utts[spk][:3]])
                creds[face] = got.credential_id
        genuine, impostor = [], []
        async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
            for n, (face, spk) in enumerate(zip(SPEECH_FACES, speakers)):
                other = speakers[(n + 1) % len(speakers)]
                for voice_of, into in ((spk, genuine), (other, impostor)):
                    async with open_holder("127.0.0.1", running.port, device_key=keys[face]) as phone:
                        qr = phone.scan((await rp.open_session()).qr)
                        r = await phone.verify(creds[face], qr, face=img(face, 4), voice=utts[voice_of][3].read_bytes())
                        into.append((r.outcome, r.reason))
    assert impostor == [("fail", "biometric_mismatch")] * 4
    assert sum(o == "pass" for o, _ in genuine) >= 3, genuine
