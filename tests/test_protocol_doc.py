"""PROTOCOL.md matches the engine: its hex example byte for byte, and a client written from it.

The client below uses only what the document says, with the plain ``msgpack`` package and
PyNaCl: no import from ``engine`` touches the wire.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import msgpack
import nacl.bindings
import nacl.public
import nacl.signing
import pytest
import trio

from engine.app import build_engine, run_engine
from engine.config import EngineConfig, LimitsConfig
from engine.inference.extractors import _identity_vector, fake_extractors
from engine.ops.registry import seal_card_template
from engine.store import CardRecord

from . import protocol_example
from .conftest import FixedScores, make_rp

DOC = Path(__file__).resolve().parent.parent / "PROTOCOL.md"


def _doc_example() -> dict[str, str]:
    text = DOC.read_text()
    block = text[text.index("## Worked example, byte by byte") :]
    body = block[block.index("```text\n") + 8 : block.index("\n```", block.index("```text\n"))]
    return dict(line.split(": ", 1) for line in body.splitlines())


def test_the_worked_example_is_what_the_engine_encodes():
    doc = _doc_example()
    ours = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in protocol_example.example().items()}
    assert doc == ours


def test_the_worked_example_reads_as_the_document_says():
    ex = {k: (bytes.fromhex(v) if k != "qr_text" else v) for k, v in _doc_example().items()}
    hello = msgpack.unpackb(ex["hello_frame"][4:])
    assert struct.unpack(">I", ex["hello_frame"][:4])[0] == len(ex["hello_frame"]) - 4
    assert list(hello) == ["type", "version", "nonce", "engine_key", "engine_box_key", "max_frame", "max_in_flight"]
    assert ex["auth_tbs"] == b"netid-auth-v1" + (32).to_bytes(4, "big") + hello["nonce"] + (5).to_bytes(4, "big") + b"hotel"
    nacl.signing.VerifyKey(ex["rp_sign_public"]).verify(ex["auth_tbs"], ex["auth_sig"])
    nacl.signing.VerifyKey(ex["engine_key"]).verify(ex["qr_payload"], ex["qr_sig"])
    rp_box = nacl.public.PrivateKey(bytes([4]) * 32)
    envelope = nacl.public.SealedBox(rp_box).decrypt(ex["sealed"])
    assert envelope == ex["result_envelope"]
    signed = msgpack.unpackb(envelope)
    nacl.signing.VerifyKey(ex["engine_key"]).verify(signed["payload"], signed["sig"])
    result = msgpack.unpackb(signed["payload"])
    assert (result["outcome"], result["reason"], len(result["pseudonym"])) == ("pass", "match", 32)
    assert msgpack.unpackb(ex["result_frame"][4:])["sealed"] == ex["sealed"]


# ---- a client from the document alone ------------------------------------------------------------------
class DocClient:
    """Frames, requests and replies exactly as PROTOCOL.md describes them."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.next_id = 0

    async def read(self) -> dict | None:
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">I", self.buf[:4])[0]:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buf += chunk
        (n,) = struct.unpack(">I", self.buf[:4])
        body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
        return msgpack.unpackb(body)

    async def send(self, msg: dict) -> int:
        self.next_id += 1
        body = msgpack.packb({**msg, "id": self.next_id}, use_bin_type=True)
        await self.stream.send_all(struct.pack(">I", len(body)) + body)
        return self.next_id

    async def request(self, msg: dict, pushes: list | None = None) -> dict:
        rid = await self.send(msg)
        while True:
            reply = await self.read()
            assert reply is not None
            if reply.get("id") == rid:
                return reply
            assert reply["type"] == "result" and "id" not in reply
            if pushes is not None:
                pushes.append(reply)


def _tbs(tag: bytes, *parts: bytes) -> bytes:
    return tag + b"".join(len(p).to_bytes(4, "big") + p for p in parts)


@pytest.fixture
async def engine(tmp_path, nursery):
    cfg = EngineConfig(data_dir=tmp_path / "data", port=0, voice_wait_with_challenge=0.0, limits=LimitsConfig(max_frame=64 * 1024, max_connection_bytes=1 << 20, frame_budget=1 << 20))
    eng = build_engine(cfg, extractors=fake_extractors(), scores=FixedScores())
    vec = _identity_vector("FACE", "alice", 128)
    eng.store.import_cards([CardRecord(card_number="C1", name="Alice", photo_path="a.jpg", status="valid", photo_template=seal_card_template(eng.cipher, vec, "C1"))], actor="test")
    rp = make_rp(eng.store, "hotel")
    running = await nursery.start(run_engine, eng)
    yield running, rp
    running.drain()


async def test_a_client_written_from_the_document(engine):
    running, rp_keys = engine
    with trio.fail_after(20):
        rp = DocClient(await trio.open_tcp_stream("127.0.0.1", running.port))
        hello = await rp.read()
        assert hello["type"] == "hello" and hello["version"] == 1 and hello["max_frame"] == 64 * 1024
        engine_key = hello["engine_key"]
        sig = rp_keys.signing.sign(_tbs(b"netid-auth-v1", hello["nonce"], b"hotel")).signature
        assert (await rp.request({"type": "auth", "rp_id": "hotel", "sig": sig}))["type"] == "authenticated"
        opened = await rp.request({"type": "open_session", "level": "basic", "purpose": "check-in"})
        assert opened["type"] == "session_opened"
        nacl.signing.VerifyKey(engine_key).verify(opened["qr"]["payload"], opened["qr"]["sig"])
        qr = msgpack.unpackb(opened["qr"]["payload"])

        phone = DocClient(await trio.open_tcp_stream("127.0.0.1", running.port))
        await phone.read()
        device = nacl.signing.SigningKey.generate()
        dk = bytes(device.verify_key)
        faces = [b"FACE:alice:1"]
        voices = [f"VOICE:alice:enroll:{n}".encode() for n in (1, 2, 3)]
        tbs = _tbs(b"netid-enroll-v1", b"C1", dk, *[hashlib.sha256(f).digest() for f in faces], b"|", *[hashlib.sha256(v).digest() for v in voices])
        enrolled = await phone.request({"type": "enroll", "card_number": "C1", "device_key": dk, "faces": faces, "voices": voices, "sig": device.sign(tbs).signature})
        assert enrolled["type"] == "enrolled", enrolled
        cred = enrolled["credential_id"]
        face, voice = b"FACE:alice:9", f"VOICE:alice:{qr['challenge']}:9".encode()
        vt = _tbs(b"netid-verify-v1", qr["session_id"].encode(), qr["nonce"], cred.encode(), hashlib.sha256(face).digest(), hashlib.sha256(voice).digest())
        verified = await phone.request({"type": "verify", "session_id": qr["session_id"], "credential_id": cred, "nonce": qr["nonce"],
                                        "device_key": dk, "face": face, "voice": voice, "sig": device.sign(vt).signature})
        assert verified["type"] == "verified"
        # the holder's copy: sealed to the device key converted to X25519
        holder_box = nacl.public.PrivateKey(nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(device._signing_key))
        mine = msgpack.unpackb(nacl.public.SealedBox(holder_box).decrypt(verified["sealed"]))

        pushes: list[dict] = []
        fetched = await rp.request({"type": "fetch_result", "session_id": qr["session_id"]}, pushes)
        if not pushes:
            pushes.append(await rp.read())
        for sealed in (pushes[0]["sealed"], fetched["sealed"]):
            envelope = msgpack.unpackb(nacl.public.SealedBox(rp_keys.box).decrypt(sealed))
            nacl.signing.VerifyKey(engine_key).verify(envelope["payload"], envelope["sig"])
            result = msgpack.unpackb(envelope["payload"])
            assert (result["v"], result["session_id"], result["rp_id"], result["outcome"]) == (1, qr["session_id"], "hotel", "pass")
            assert envelope["payload"] == mine["payload"]
        # a body that is not a request: answered with its id, the connection lives on
        bad = msgpack.packb({"type": "ping", "id": 41, "x": [1, 2]})[:-1]
        await rp.stream.send_all(struct.pack(">I", len(bad)) + bad)
        reply = await rp.read()
        assert reply["type"] == "error" and reply["code"] == "invalid_message"
        assert (await rp.request({"type": "ping"}))["type"] == "pong"
        # a broken frame: the error arrives, then the end of the stream
        await rp.stream.send_all(struct.pack(">I", 10**9))
        assert (await rp.read())["code"] == "frame_too_large"
        assert await rp.read() is None
        assert re.fullmatch(r"[a-z2-7]{32}", result["pseudonym"])
