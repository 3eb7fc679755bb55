"""Protocol and flows over real TCP, with the deterministic fake extractor."""

from __future__ import annotations

import socket
import struct
import time

import msgspec
import nacl.signing
import numpy as np
import pytest
import trio

from engine import errors as E
from engine.wire import protocol as P
from engine.app import build_engine, run_engine
from engine.wire.client import open_connection, open_holder, open_relying_party
from engine.config import ChallengeSettings, EngineConfig, LimitsConfig
from engine.inference.extractors import _identity_vector, fake_extractors
from engine.ops.registry import seal_card_template
from engine.store import CardRecord

from .conftest import Clock, FixedScores, face, make_rp, voice


@pytest.fixture
async def env(tmp_path, nursery):
    cfg = EngineConfig(
        data_dir=tmp_path / "data",
        port=0,
        voice_wait_with_challenge=0.0,  # the fake recogniser is instant: nothing to wait behind
        limits=LimitsConfig(max_in_flight=8, session_ttl=30.0, max_frame=64 * 1024),
        challenge=ChallengeSettings(kind="digits", length=6),
    )
    engine = build_engine(cfg, extractors=fake_extractors(), scores=FixedScores())
    engine.clock = Clock()
    cards = []
    for card, who in (("C1", "alice"), ("C2", "bob"), ("C3", "carol")):
        vec = _identity_vector("FACE", who, 128)
        cards.append(
            CardRecord(card_number=card, name=who.title(), photo_path=f"{who}.jpg", status="valid", photo_template=seal_card_template(engine.cipher, vec, card))
        )
    engine.store.import_cards(cards, actor="test")
    rp = make_rp(engine.store, "hotel")
    rp2 = make_rp(engine.store, "courier", max_level="basic", name="Courier")
    running = await nursery.start(run_engine, engine)
    yield running, rp, rp2
    running.drain()


async def enroll(port: int, card: str, who: str, key: nacl.signing.SigningKey | None = None):
    key = key or nacl.signing.SigningKey.generate()
    async with open_holder("127.0.0.1", port, device_key=key) as phone:
        enrolled = await phone.enroll(card, [face(who, 1), face(who, 2)], [voice(who, "enroll", n) for n in (1, 2, 3)])
    return enrolled.credential_id, key


async def test_genuine_pass_and_results_to_both(env):
    running, rp_keys, _ = env
    port = running.port
    cred, key = await enroll(port, "C1", "alice")
    with trio.fail_after(10):
        async with open_relying_party("127.0.0.1", port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
            opened = await rp.open_session(level="basic", purpose="check-in")
            async with open_holder("127.0.0.1", port, device_key=key) as phone:
                qr = phone.scan(opened.qr_text)
                assert qr.challenge.isdigit() and len(qr.challenge) == 6
                mine = await phone.verify(cred, qr, face=face("alice", 9), voice=voice("alice", qr.challenge, 9))
            pushed = await rp.results().__anext__()
            fetched = await rp.fetch_result(opened.session_id)
    assert mine.outcome == pushed.outcome == fetched.outcome == "pass"
    assert pushed.session_id == opened.session_id and pushed.reason == "match"
    assert pushed.pseudonym == mine.pseudonym and len(pushed.pseudonym) == 32


@pytest.mark.parametrize(
    "probe_face, probe_voice_who, say_right, reason",
    [
        ("bob", "alice", True, "biometric_mismatch"),
        ("alice", "bob", True, "biometric_mismatch"),
        ("alice", "alice", False, "challenge_mismatch"),
    ],
)
async def test_impostors_fail(env, probe_face, probe_voice_who, say_right, reason):
    running, rp_keys, _ = env
    cred, key = await enroll(running.port, "C1", "alice")
    with trio.fail_after(10):
        async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
            opened = await rp.open_session()
            async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
                qr = phone.scan(opened.qr)
                said = qr.challenge if say_right else "000000"
                mine = await phone.verify(cred, qr, face=face(probe_face, 5), voice=voice(probe_voice_who, said, 5))
            pushed = await rp.results().__anext__()
    assert mine.outcome == pushed.outcome == "fail"
    assert pushed.reason == reason


async def test_replay_wrong_key_expired(env):
    running, rp_keys, _ = env
    port = running.port
    cred, key = await enroll(port, "C1", "alice")
    with trio.fail_after(10):
        async with open_relying_party("127.0.0.1", port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
            async with open_holder("127.0.0.1", port, device_key=key) as phone:
                qr = phone.scan((await rp.open_session()).qr)
                ok = await phone.verify(cred, qr, face=face("alice"), voice=voice("alice", qr.challenge))
                assert ok.outcome == "pass"
                with pytest.raises(E.SessionUsed):
                    await phone.verify(cred, qr, face=face("alice"), voice=voice("alice", qr.challenge))

            thief = nacl.signing.SigningKey.generate()
            async with open_holder("127.0.0.1", port, device_key=thief) as phone:
                qr = phone.scan((await rp.open_session()).qr)
                with pytest.raises(E.WrongDeviceKey):
                    await phone.verify(cred, qr, face=face("alice"), voice=voice("alice", qr.challenge))

            async with open_holder("127.0.0.1", port, device_key=key) as phone:
                opened = await rp.open_session()
                qr = phone.scan(opened.qr)
                running.engine.clock.offset += 31.0
                with pytest.raises(E.SessionExpired):
                    await phone.verify(cred, qr, face=face("alice"), voice=voice("alice", qr.challenge))
                with pytest.raises(E.SessionExpired):
                    phone.scan(opened.qr, now=time.time() + 31.0)


async def test_bad_samples_get_specific_codes(env):
    running, rp_keys, _ = env
    cred, key = await enroll(running.port, "C1", "alice")
    async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
        async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
            qr = phone.scan((await rp.open_session()).qr)
            with pytest.raises(E.NoFace):
                await phone.verify(cred, qr, face=face("none"), voice=voice("alice", qr.challenge))
            pushed = await rp.results().__anext__()
            assert pushed.outcome == "fail" and pushed.reason == "sample_quality"
            with pytest.raises(E.UnknownCard):
                await phone.enroll("NOPE", [face("alice")], [voice("alice", "enroll", n) for n in (1, 2, 3)])


async def test_malformed_and_oversized_frames_keep_server_alive(env):
    running, rp_keys, _ = env
    port = running.port
    with trio.fail_after(10):
        async with open_connection("127.0.0.1", port) as conn:
            # valid frame, invalid message: error reply, connection lives on
            await conn.send_raw(struct.pack(">I", 3) + b"\x93\x01\x02")
            await conn.send_raw(_frame({}))
            await conn.send_raw(_frame({"type": "open_session", "id": 5, "level": "ultra"}))
            await conn.send_raw(_frame({"type": "warp", "id": 77}))
            await conn.ping()
            with pytest.raises(E.NotAuthenticated):
                await conn.request(P.OpenSession)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(struct.pack(">I", 10**9))
        data = b""
        while True:
            chunk = await stream.receive_some()
            if not chunk:
                break
            data += chunk
        msgs = _split_frames(data)
        assert msgs[0]["type"] == "hello"
        assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == "frame_too_large"
        # others still served
        async with open_connection("127.0.0.1", port) as conn:
            await conn.ping()


def _split_frames(data: bytes) -> list[dict]:
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(msgspec.msgpack.decode(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


async def test_unknown_type_answers_with_id(env):
    running, *_ = env
    async with open_connection("127.0.0.1", running.port) as conn:
        send, recv = trio.open_memory_channel(1)
        conn._waiting[77] = send
        await conn.send_raw(_frame({"type": "warp", "id": 77}))
        with trio.fail_after(5):
            reply = await recv.receive()
        assert isinstance(reply, P.Error) and reply.code == "unknown_message" and reply.id == 77


def _frame(obj) -> bytes:
    body = msgspec.msgpack.encode(obj)
    return struct.pack(">I", len(body)) + body


async def test_pipelining_and_in_flight_cap(env):
    running, rp_keys, _ = env
    async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
        got = []

        async def one() -> None:
            got.append((await rp.open_session()).session_id)

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for _ in range(40):
                    n.start_soon(one)
        assert len(set(got)) == 40


async def test_rp_auth_failures(env):
    running, rp_keys, _ = env
    wrong = nacl.signing.SigningKey.generate()
    with pytest.raises(E.BadSignature):
        async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=wrong, box_key=rp_keys.box):
            pass
    with pytest.raises(E.UnknownRelyingParty):
        async with open_relying_party("127.0.0.1", running.port, rp_id="nobody", signing_key=wrong, box_key=rp_keys.box):
            pass


async def test_made_up_relying_party_names_are_not_kept(env):
    running, rp_keys, _ = env
    wrong = nacl.signing.SigningKey.generate()
    for k in range(20):
        with pytest.raises(E.UnknownRelyingParty):
            async with open_relying_party("127.0.0.1", running.port, rp_id=f"nobody-{k}", signing_key=wrong, box_key=rp_keys.box):
                pass
    async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
        assert (await rp.open_session()).session_id
    assert set(running.engine.ctx._rp_cache) == {"hotel"}


async def test_rp_with_several_addresses_takes_the_first_that_answers(env):
    running, rp_keys, _ = env
    with socket.socket() as unused:  # bound, never listening: connections to it are refused
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
        keys = dict(rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box)
        with trio.fail_after(10):
            async with open_relying_party(hosts=f"127.0.0.1:{dead},127.0.0.1:{running.port}", **keys) as rp:
                assert rp.address == ("127.0.0.1", running.port)
                assert (await rp.open_session()).session_id
            with pytest.raises(trio.ClosedResourceError):  # after the block: an error, not a wait for a fail-over
                await rp.open_session()
            with pytest.raises(OSError):  # a whole round refused before any stream: the last error
                async with open_relying_party(hosts=[("127.0.0.1", dead)], **keys):
                    pass
            with pytest.raises(E.BadSignature):  # refused by the engine on every node
                async with open_relying_party(hosts=[("127.0.0.1", running.port)] * 2, rp_id="hotel",
                                              signing_key=nacl.signing.SigningKey.generate(), box_key=rp_keys.box):
                    pass


def test_fake_extractor_is_deterministic():
    x = fake_extractors()
    a, b = x.face_batch([face("alice", 1), face("alice", 1)])
    assert np.array_equal(a, b)


async def test_tls_when_configured(tmp_path, nursery):
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "chain.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cfg = EngineConfig(data_dir=tmp_path / "data", host="127.0.0.1", port=0, tls_cert=tmp_path / "chain.pem", tls_key=tmp_path / "key.pem")
    engine = build_engine(cfg, extractors=fake_extractors(), scores=FixedScores())
    rp_keys = make_rp(engine.store, "hotel")
    running = await nursery.start(run_engine, engine)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with trio.fail_after(10):
        # open_ssl_over_tcp_stream checks the certificate against the host name given
        async with open_relying_party("localhost", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box, ssl_context=client_ctx) as rp:
            opened = await rp.open_session()
            assert opened.payload.rp_name == "Hotel Example"
    # a plain-TCP client gets no hello from the TLS port (the engine waits for a TLS handshake)
    got_hello = False
    with trio.move_on_after(1):
        try:
            async with open_connection("127.0.0.1", running.port):
                got_hello = True
        except (trio.BrokenResourceError, E.EngineError, msgspec.DecodeError):
            pass
    assert not got_hello
    running.drain()


async def test_silent_connection_is_closed(tmp_path, nursery, autojump_clock):
    """A peer that connects and never sends a frame is dropped after first_frame_timeout."""
    cfg = EngineConfig(data_dir=tmp_path / "data", port=0, limits=LimitsConfig(first_frame_timeout=5.0))
    engine = build_engine(cfg, extractors=fake_extractors(), scores=FixedScores())
    from engine.server.listener import Server

    server = Server(engine)
    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server._run_connection, served)
    hello = await client.receive_some()
    assert hello  # the engine speaks first
    with trio.fail_after(60):
        while await client.receive_some():
            pass  # EOF once the engine gives up on the silent peer
    assert trio.current_time() >= 5.0


async def test_concurrent_enrollments_of_one_face_under_two_cards(env):
    """Two cards carrying the same person's photo, enrolled at the same moment: one is refused."""
    running, *_ = env
    engine = running.engine
    vec = _identity_vector("FACE", "alice", 128)
    engine.store.import_cards(
        [CardRecord(card_number="C9", name="Alias", photo_path="a.jpg", status="valid", photo_template=seal_card_template(engine.cipher, vec, "C9"))],
        actor="test",
    )
    outcomes = []

    async def one(card: str) -> None:
        try:
            await enroll(running.port, card, "alice")
            outcomes.append("enrolled")
        except E.DuplicateIdentity:
            outcomes.append("duplicate_identity")

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(one, "C1")
            n.start_soon(one, "C9")
    assert sorted(outcomes) == ["duplicate_identity", "enrolled"]
