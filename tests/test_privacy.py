"""What a relying party can learn: only session id, outcome, reason class, level, time, pseudonym.

Every byte a relying party receives is captured at the frame level (its streams are read raw
with ``engine.wire.framing``), in passing and failing flows and in every error it can provoke; the
sealed results are opened and their signatures checked; then the raw bytes and the decoded
content are searched for card numbers, names, scores, templates and device keys.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgspec
import nacl.public
import nacl.signing
import pytest
import trio

from engine import errors as E
from engine.wire import protocol as P
from engine.wire.client import open_result
from engine.config import LimitsConfig
from engine.crypto import device_box_key, sha256, unseal
from engine.inference.extractors import _identity_vector, fake_extractors
from engine.wire.framing import FrameReader, encode_frame
from engine.flows import REASONS

from .conftest import RPKeys, make_rp
from .test_lifecycle import Env, engine_env, face, phone, rp_stream, verify_once, voice

CARDS = {"ID-4471-0932-5518": "alice", "ID-8820-1147-3306": "bob", "ID-6093-5521-7740": "carol"}
NAMES = {"ID-4471-0932-5518": "Alice Liddell-Hargreaves", "ID-8820-1147-3306": "Robert Tablespoon", "ID-6093-5521-7740": "Carol Wintergreen"}
ALICE, BOB, CAROL = CARDS

#: Keys each message a relying party may receive is allowed to have.
ALLOWED_KEYS = {
    "hello": {"type", "version", "nonce", "engine_key", "engine_box_key", "max_frame", "max_in_flight"},
    "authenticated": {"type", "id", "rp_id", "display_name", "max_level"},
    "session_opened": {"type", "id", "session_id", "qr", "expires_at"},
    "result": {"type", "id", "session_id", "sealed"},
    "error": {"type", "id", "code", "message", "retry_after_ms"},
    "pong": {"type", "id"},
}
QR_KEYS = {"v", "session_id", "rp_name", "nonce", "expires_at", "challenge", "level", "purpose"}
RESULT_KEYS = {"v", "session_id", "rp_id", "outcome", "reason", "level", "time", "pseudonym"}
FLOAT_KEYS = {"expires_at", "time"}


# ---- a relying party read raw, every frame kept -----------------------------------------------------
@dataclass
class Tap:
    port: int
    #: every frame received, with the X25519 key of the party the connection spoke for
    frames: list[tuple[nacl.public.PrivateKey | None, bytes]] = field(default_factory=list)

    @asynccontextmanager
    async def connect(self, keys: RPKeys | None = None, *, sign_with: nacl.signing.SigningKey | None = None) -> AsyncIterator["RawRP"]:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        try:
            rp = RawRP(self, stream, keys.box if keys is not None else None)
            hello = await rp.read()
            assert hello is not None and hello["type"] == "hello"
            rp.hello = hello
            if keys is not None:
                sig = (sign_with or keys.signing).sign(P.auth_message(hello["nonce"], keys.rp_id)).signature
                rp.auth_reply = await rp.request("auth", rp_id=keys.rp_id, sig=sig)
            yield rp
        finally:
            await trio.aclose_forcefully(stream)


class RawRP:
    def __init__(self, tap: Tap, stream: trio.SocketStream, box: nacl.public.PrivateKey | None) -> None:
        self.tap = tap
        self.box = box
        self.stream = stream
        self.reader = FrameReader(stream, max_frame=P.MAX_FRAME_BYTES)
        self.ids = itertools.count(1)
        self.pushes: list[dict] = []
        self.others: list[dict] = []
        self.hello: dict = {}
        self.auth_reply: dict = {}

    async def read(self) -> dict | None:
        body = await self.reader.read()
        if body is None:
            return None
        self.tap.frames.append((self.box, body))
        return msgspec.msgpack.decode(body)

    async def send(self, msg_type: str, **fields) -> int:
        rid = next(self.ids)
        await self.stream.send_all(encode_frame(msgspec.msgpack.encode({"type": msg_type, "id": rid, **fields})))
        return rid

    async def reply_to(self, rid: int) -> dict:
        for i, m in enumerate(self.others):
            if m.get("id") == rid:
                return self.others.pop(i)
        while True:
            m = await self.read()
            assert m is not None, "connection closed"
            if m.get("id") == rid:
                return m
            (self.pushes if m["type"] == "result" and m.get("id") is None else self.others).append(m)

    async def request(self, msg_type: str, **fields) -> dict:
        return await self.reply_to(await self.send(msg_type, **fields))

    async def push(self) -> dict:
        while not self.pushes:
            m = await self.read()
            assert m is not None, "connection closed"
            (self.pushes if m["type"] == "result" and m.get("id") is None else self.others).append(m)
        return self.pushes.pop(0)

    async def drain(self) -> None:
        """Read until the engine closes the connection."""
        while await self.read() is not None:
            pass


def qr_of(opened: dict) -> P.QrPayload:
    signed = P.Signed(payload=opened["qr"]["payload"], sig=opened["qr"]["sig"])
    return P.decode_signed(signed, P.QrPayload)


# ---- what must never show up ----------------------------------------------------------------------------
@dataclass
class Secrets:
    texts: list[str]  # card numbers, names, photo paths, sample markers
    blobs: list[bytes]  # device keys, templates (plain and sealed), encoded scores
    scores: set[float]

    def check_bytes(self, data: bytes, where: str) -> None:
        low = data.lower()
        for t in self.texts:
            assert t.lower().encode() not in low, f"{t!r} in {where}"
        for b in self.blobs:
            assert b not in data, f"a secret blob in {where}"

    def check_value(self, value, where: str, key: str | None = None) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                self.check_value(k, where)
                self.check_value(v, f"{where}.{k}", k)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.check_value(v, where, key)
        elif isinstance(value, str):
            for t in self.texts:
                assert t.lower() not in value.lower(), f"{t!r} in {where}"
        elif isinstance(value, (bytes, bytearray)):
            self.check_bytes(bytes(value), where)
        elif isinstance(value, float):
            assert key in FLOAT_KEYS, f"a number at {where}"
            assert value not in self.scores, f"a score at {where}"


def secrets_of(env: Env, holder_keys: list[nacl.signing.SigningKey], extra_scores: list[float] = ()) -> Secrets:
    texts = [*CARDS, *NAMES.values(), *(f"{w}.jpg" for w in CARDS.values()), "FACE:", "VOICE:"]
    with sqlite3.connect(env.data / "engine.db") as db:  # credential ids would link a person across parties
        texts += [r[0] for r in db.execute("SELECT credential_id FROM credentials").fetchall()]
        # every template ciphertext still stored, and the card photos'
        rows = db.execute("SELECT ciphertext FROM templates").fetchall() + db.execute("SELECT photo_template FROM cards").fetchall()
    blobs: list[bytes] = []
    for k in holder_keys:
        pub = bytes(k.verify_key)
        blobs += [pub, device_box_key(pub)]
        texts.append(pub.hex())
    x = fake_extractors()
    for who in CARDS.values():  # the enrolled templates in the clear (see enroll below), and the card photo's
        enrolled = x.face_batch([face(who, 1), face(who, 2)]) + x.voice_batch([voice(who, "enroll", n) for n in (1, 2, 3)])
        for vec in [*enrolled, _identity_vector("FACE", who, 128)]:
            blobs.append(getattr(vec, "vector", vec).tobytes()[:16])
    blobs += [bytes(r[0])[:24] for r in rows if r[0]]
    scores = set(env.scores.seen) | set(extra_scores)
    blobs += [struct.pack(">d", s) for s in scores]
    return Secrets(texts=texts, blobs=blobs, scores=scores)


def inspect(frames: list[tuple[nacl.public.PrivateKey | None, bytes]], secrets: Secrets, *, engine_key: bytes) -> tuple[list[P.ResultPayload], list[dict]]:
    """Check every frame; return the opened results and the errors."""
    results, errors = [], []
    for i, (box_key, body) in enumerate(frames):
        where = f"frame {i}"
        secrets.check_bytes(body, where)
        msg = msgspec.msgpack.decode(body)
        assert isinstance(msg, dict) and msg.get("type") in ALLOWED_KEYS, msg
        assert set(msg) <= ALLOWED_KEYS[msg["type"]], msg
        secrets.check_value({k: v for k, v in msg.items() if k not in ("sealed", "qr")}, where)
        if msg["type"] == "session_opened":
            payload = msgspec.msgpack.decode(msg["qr"]["payload"])
            assert set(payload) == QR_KEYS
            secrets.check_value(payload, f"{where}.qr")
        elif msg["type"] == "result":
            assert box_key is not None, "a result on a connection that never authenticated"
            opened = unseal(box_key, msg["sealed"])
            secrets.check_bytes(opened, f"{where}.sealed")
            signed = msgspec.msgpack.decode(opened)
            payload = msgspec.msgpack.decode(signed["payload"])
            assert set(signed) == {"payload", "sig"} and set(payload) == RESULT_KEYS, payload
            secrets.check_value(payload, f"{where}.result")
            result = open_result(msg["sealed"], box_key, engine_key)  # signature checked
            assert result.reason in REASONS and len(result.pseudonym) in (0, 32)
            results.append(result)
        elif msg["type"] == "error":
            code, text = msg["code"], msg["message"]
            assert code in E.ERRORS_BY_CODE, code
            if code == "internal":  # an unexpected exception: only an incident id, never its text
                assert re.fullmatch(r"internal error \(incident [0-9a-f]{12}\)", text), text
            errors.append(msg)
    return results, errors


@pytest.fixture
async def env(tmp_path, nursery) -> AsyncIterator[Env]:
    limits = LimitsConfig(max_in_flight=6, session_ttl=30.0, max_frame=64 * 1024, max_open_sessions=40, request_deadline=2.0)
    async with engine_env(tmp_path, nursery, people=CARDS, names=NAMES, limits=limits) as e:
        yield e


async def enroll(env: Env, card: str, key: nacl.signing.SigningKey | None = None) -> tuple[str, nacl.signing.SigningKey]:
    who = CARDS[card]
    key = key or nacl.signing.SigningKey.generate()
    async with phone(env, key) as p:
        got = await p.enroll(card, [face(who, 1), face(who, 2)], [voice(who, "enroll", n) for n in (1, 2, 3)])
    return got.credential_id, key


# ---- the test ---------------------------------------------------------------------------------------------
async def test_relying_party_learns_nothing_but_the_answer(env, monkeypatch):
    engine = env.engine
    tap = Tap(env.port)
    holder_keys: list[nacl.signing.SigningKey] = []
    alice, alice_key = await enroll(env, ALICE)
    bob, bob_key = await enroll(env, BOB)
    carol, carol_key = await enroll(env, CAROL)
    holder_keys += [alice_key, bob_key, carol_key]
    tiny = make_rp(engine.store, "kiosk", max_level="basic", quota=1, name="Kiosk")
    make_rp(engine.store, "gone", name="Gone")
    engine.store.set_relying_party_status("gone", "disabled", actor="test")

    async def holder_attempt(rp: RawRP, cred: str, key, *, level="basic", face_of: str, voice_of: str, say_right=True, n=5, expect=None, counts=True):
        opened = await rp.request("open_session", level=level, purpose="check-in")
        assert opened["type"] == "session_opened", opened
        qr = qr_of(opened)
        async with phone(env, key) as p:
            said = qr.challenge if say_right else "000000"
            f = face(face_of, n) if face_of != "none" else face("none", n)
            if expect is None:
                await p.verify(cred, qr, face=f, voice=voice(voice_of, said, n))
            else:
                with pytest.raises(expect):
                    await p.verify(cred, qr, face=f, voice=voice(voice_of, said, n))
        return opened["session_id"], (await rp.push() if counts else None)

    reasons: dict[str, str] = {}
    with trio.fail_after(30):
        async with tap.connect(env.hotel) as rp:
            assert rp.auth_reply["type"] == "authenticated"
            sid, _ = await holder_attempt(rp, alice, alice_key, face_of="alice", voice_of="alice")
            reasons[sid] = "match"
            fetched = await rp.request("fetch_result", session_id=sid)
            assert fetched["type"] == "result"
            sid, _ = await holder_attempt(rp, alice, alice_key, face_of="bob", voice_of="alice")
            reasons[sid] = "biometric_mismatch"
            sid, _ = await holder_attempt(rp, alice, alice_key, face_of="alice", voice_of="carol")
            reasons[sid] = "biometric_mismatch"
            sid, _ = await holder_attempt(rp, alice, alice_key, face_of="alice", voice_of="alice", say_right=False)
            reasons[sid] = "challenge_mismatch"
            sid, _ = await holder_attempt(rp, alice, alice_key, face_of="none", voice_of="alice", expect=E.NoFace)
            reasons[sid] = "sample_quality"
            sid, _ = await holder_attempt(rp, alice, alice_key, level="high", face_of="alice", voice_of="alice")
            reasons[sid] = "level_too_low"
            thief = nacl.signing.SigningKey.generate()
            holder_keys.append(thief)
            # not the bound key of an active credential: the attempt does not count, no result
            await holder_attempt(rp, alice, thief, face_of="alice", voice_of="alice", expect=E.WrongDeviceKey, counts=False)
            # bob moves to a new phone: the old one is told to delete; then he re-applies (void)
            bob_new = nacl.signing.SigningKey.generate()
            holder_keys.append(bob_new)
            async with phone(env, bob_new) as p:
                await p.rebind(bob, face=face("bob", 3), voice=voice("bob", "", 3))
            await holder_attempt(rp, bob, bob_key, face_of="bob", voice_of="bob", expect=E.CredentialDeleted, counts=False)
            bob2, bob2_key = await enroll(env, BOB)
            holder_keys.append(bob2_key)
            await holder_attempt(rp, bob, bob_new, face_of="bob", voice_of="bob", expect=E.CredentialVoided, counts=False)
            # carol's card is lost: a session opened before the report fails
            opened = await rp.request("open_session", level="basic")
            async with phone(env, carol_key) as p:
                await p.report_lost(carol, face=face("carol", 4), voice=voice("carol", "", 4))
                with pytest.raises(E.CredentialSuspended):
                    await p.verify(carol, qr_of(opened), face=face("carol", 5), voice=voice("carol", qr_of(opened).challenge, 5))
            # a session a stranger keeps trying: closed with a result after max_failed_attempts
            opened = await rp.request("open_session", level="basic")
            async with phone(env, thief) as p:
                for k in range(engine.config.limits.max_failed_attempts):
                    with pytest.raises(E.WrongDeviceKey):
                        await p.verify(alice, qr_of(opened), face=face("alice", 7), voice=voice("alice", qr_of(opened).challenge, 7))
            reasons[opened["session_id"]] = "too_many_attempts"
            await rp.push()
            # an expired session: the holder is told, the relying party gets nothing
            opened = await rp.request("open_session", level="basic")
            async with phone(env, alice_key) as p:
                env.clock.offset += 31.0
                with pytest.raises(E.SessionExpired):
                    await p.verify(alice, qr_of(opened), face=face("alice", 6), voice=voice("alice", qr_of(opened).challenge, 6))
                env.clock.offset -= 31.0

            # every error a relying party can provoke on a live stream
            assert (await rp.request("fetch_result", session_id=opened["session_id"]))["code"] == "result_pending"
            assert (await rp.request("fetch_result", session_id="no-such-session"))["code"] == "unknown_session"
            assert (await rp.request("open_session", level="ultra"))["code"] == "invalid_message"
            assert (await rp.request("warp"))["code"] == "unknown_message"
            await rp.stream.send_all(encode_frame(msgspec.msgpack.encode([1, 2, 3])))

            async def failing(conn, req):
                raise RuntimeError(f"bug while looking at {ALICE} {NAMES[ALICE]}")

            monkeypatch.setattr(engine, "handle_fetch_result", failing)
            assert (await rp.request("fetch_result", session_id=opened["session_id"]))["code"] == "internal"
            monkeypatch.undo()

            hang = trio.Event()

            async def hanging_ping(conn, req):
                await hang.wait()

            monkeypatch.setattr(engine, "handle_ping", hanging_ping)
            held = [await rp.send("ping") for _ in range(6)]
            assert (await rp.request("ping"))["code"] == "too_many_in_flight"
            assert {(await rp.reply_to(rid))["code"] for rid in held} == {"deadline_exceeded"}
            monkeypatch.undo()

        async with tap.connect(env.courier) as rp:
            assert (await rp.request("open_session", level="high"))["code"] == "level_not_allowed"
            sid, _ = await holder_attempt(rp, alice, alice_key, face_of="alice", voice_of="alice")
            assert (await rp.request("fetch_result", session_id=sid))["type"] == "result"
        async with tap.connect(env.hotel) as rp:  # another party's session is unknown here
            assert (await rp.request("fetch_result", session_id=sid))["code"] == "unknown_session"
        async with tap.connect(tiny) as rp:
            await rp.request("open_session")
            limited = await rp.request("open_session")
            assert limited["code"] == "rate_limited" and limited["retry_after_ms"] > 0
        async with tap.connect() as rp:
            assert (await rp.request("open_session"))["code"] == "not_authenticated"
        async with tap.connect(env.hotel, sign_with=nacl.signing.SigningKey.generate()) as rp:
            assert rp.auth_reply["code"] == "bad_signature"
        async with tap.connect(RPKeys("nobody", nacl.signing.SigningKey.generate(), env.hotel.box)) as rp:
            assert rp.auth_reply["code"] == "unknown_relying_party"
        async with tap.connect(RPKeys("gone", nacl.signing.SigningKey.generate(), env.hotel.box)) as rp:
            assert rp.auth_reply["code"] == "relying_party_disabled"
        async with tap.connect() as rp:
            await rp.stream.send_all(struct.pack(">I", 10**9))
            await rp.drain()
        async with tap.connect() as rp:
            await rp.stream.send_all(struct.pack(">I", 0))
            await rp.drain()
        async with tap.connect() as rp:
            await rp.stream.send_all(struct.pack(">I", 100) + b"\x81")
            await rp.stream.send_eof()
            await rp.drain()
        async with tap.connect(env.hotel) as rp:
            for _ in range(41):
                reply = await rp.request("open_session")
                if reply["type"] == "error":
                    break
            assert reply["code"] == "overloaded" and reply["retry_after_ms"] > 0

    # everything captured, from every connection: hotel, courier, kiosk and the raw ones
    secrets = secrets_of(env, holder_keys)
    assert len(secrets.scores) >= 6
    results, errors = inspect(tap.frames, secrets, engine_key=engine.keys.verify_key)
    assert {r.rp_id for r in results} == {"hotel", "courier"}
    # every result the hotel was sent is there, with the expected coarse reason only
    hotel = {r.session_id: r for r in results if r.rp_id == "hotel"}
    assert {sid: hotel[sid].reason for sid in reasons} == reasons
    assert {r.reason for r in results} == {"match", "biometric_mismatch", "challenge_mismatch", "sample_quality", "level_too_low", "too_many_attempts"}
    assert all(r.outcome == ("pass" if r.reason == "match" else "fail") for r in results)
    codes = {e["code"] for e in errors}
    assert codes == {
        "result_pending", "unknown_session", "invalid_message", "unknown_message", "internal", "too_many_in_flight",
        "deadline_exceeded", "level_not_allowed", "rate_limited", "not_authenticated", "bad_signature",
        "unknown_relying_party", "relying_party_disabled", "frame_too_large", "malformed_frame", "overloaded",
    }, codes


async def test_the_holder_copy_is_sealed_to_the_device_only(env):
    cred, key = await enroll(env, ALICE)
    with trio.fail_after(10):
        async with rp_stream(env, env.hotel) as rp, phone(env, key) as p:
            qr = p.scan((await rp.open_session()).qr)
            f, v = face("alice", 3), voice("alice", qr.challenge, 3)
            tbs = P.verify_message(qr.session_id, qr.nonce, cred, sha256(f), sha256(v))
            reply = await p.conn.request(
                P.Verify, session_id=qr.session_id, credential_id=cred, nonce=qr.nonce, device_key=p.public_key, face=f, voice=v, sig=key.sign(tbs).signature
            )
            pushed = await rp.conn.pushes.receive()
    device = key.to_curve25519_private_key()
    mine = open_result(reply.sealed, device, env.engine.keys.verify_key)
    theirs = open_result(pushed.sealed, env.hotel.box, env.engine.keys.verify_key)
    assert mine == theirs and mine.outcome == "pass"
    with pytest.raises(E.BadSignature):  # each copy opens only with its recipient's key
        unseal(env.hotel.box, reply.sealed)
    with pytest.raises(E.BadSignature):
        unseal(device, pushed.sealed)
    with pytest.raises(E.BadSignature):  # and a result signed by anyone but the engine is refused
        open_result(pushed.sealed, env.hotel.box, bytes(nacl.signing.SigningKey.generate().verify_key))


async def test_pseudonyms_are_pairwise_and_stable(env):
    alice, alice_key = await enroll(env, ALICE)
    bob, bob_key = await enroll(env, BOB)
    seen: dict[tuple[str, str], set[str]] = {}
    with trio.fail_after(20):
        for rp_keys in (env.hotel, env.courier):
            async with rp_stream(env, rp_keys) as rp:
                for cred, key, who in ((alice, alice_key, "alice"), (bob, bob_key, "bob")):
                    async with phone(env, key) as p:
                        for n in range(2):
                            mine, pushed = await verify_once(p, rp, cred, who=who, n=n)
                            assert mine.pseudonym == pushed.pseudonym and pushed.outcome == "pass"
                            seen.setdefault((rp_keys.rp_id, who), set()).add(pushed.pseudonym)
                    # a failed attempt by the identified credential carries the same pseudonym
                    async with phone(env, key) as p:
                        _mine, pushed = await verify_once(p, rp, cred, who="carol", voice_of=who, n=9)
                        assert pushed.outcome == "fail"
                        seen[(rp_keys.rp_id, who)].add(pushed.pseudonym)
        # stable across a new phone and a re-application (it is the person, not the credential)
        new_key = nacl.signing.SigningKey.generate()
        async with phone(env, new_key) as p:
            await p.rebind(alice, face=face("alice", 4), voice=voice("alice", "", 4))
        alice2, alice2_key = await enroll(env, ALICE)
        async with rp_stream(env, env.hotel) as rp:
            async with phone(env, alice2_key) as p:
                _mine, pushed = await verify_once(p, rp, alice2, who="alice")
                seen[("hotel", "alice")].add(pushed.pseudonym)
    assert all(len(s) == 1 for s in seen.values()), seen
    names = {k: next(iter(v)) for k, v in seen.items()}
    assert len(set(names.values())) == 4  # two people at two parties: all different
    assert names[("hotel", "alice")] != names[("courier", "alice")]
    for p in names.values():
        assert re.fullmatch(r"[a-z2-7]{32}", p)
