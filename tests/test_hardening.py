"""What a hostile or broken client can do: every bad frame answered, limits, attempts, quotas."""

from __future__ import annotations

import logging
import struct

import msgspec
import nacl.signing
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import errors as E
from engine.wire import protocol as P
from engine.app import build_engine, run_engine
from engine.wire.client import open_connection, open_holder, open_relying_party
from engine.config import ChallengeSettings, EngineConfig, LimitsConfig
from engine.inference.extractors import _identity_vector, fake_extractors
from engine.wire.framing import encode_frame
from engine.ops.registry import seal_card_template
from engine.server.listener import Server
from engine.server.connection import UNPACED
from engine.store import CardRecord

from .conftest import Clock, FixedScores, face, make_rp, voice


def _engine(tmp_path, **limits):
    cfg = EngineConfig(
        data_dir=tmp_path / "data",
        port=0,
        voice_wait_with_challenge=0.0,
        limits=LimitsConfig(**{"max_frame": 64 * 1024, "max_connection_bytes": 64 * 1024, "frame_budget": 64 * 1024, **limits}),
        challenge=ChallengeSettings(kind="digits", length=6),
    )
    engine = build_engine(cfg, extractors=fake_extractors(), scores=FixedScores())
    engine.clock = Clock()
    vec = _identity_vector("FACE", "alice", 128)
    engine.store.import_cards(
        [CardRecord(card_number="C1", name="Alice", photo_path="a.jpg", status="valid", photo_template=seal_card_template(engine.cipher, vec, "C1"))],
        actor="test",
    )
    return engine


@pytest.fixture
async def env(tmp_path, nursery):
    engine = _engine(tmp_path)
    rp = make_rp(engine.store, "hotel")
    running = await nursery.start(run_engine, engine)
    yield running, rp
    running.drain()


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _split(data: bytes) -> list[dict]:
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        out.append(msgspec.msgpack.decode(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


async def _exchange(port: int, payload: bytes, *, until_eof: bool = False, replies: int = 0) -> list[dict]:
    """Send raw bytes after hello; read until ``replies`` frames came (or the engine closes)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    with trio.fail_after(10):
        await stream.send_all(payload)
        while until_eof or len(_split(data)) < replies + 1:
            chunk = await stream.receive_some()  # a reset would raise here
            if not chunk:
                break
            data += chunk
    await stream.aclose()
    return _split(data)[1:]


#: Well-framed bodies that are not requests, each answered and the connection kept.
BAD_BODIES = {
    "invalid UTF-8 in the type": (b"\x82\xa4type\xa4p\xffng\xa2id\x07", 7),
    "invalid UTF-8 in a field": (b"\x83\xa4type\xacfetch_result\xa2id\x08\xaasession_id\xa2\xff\xfe", 8),
    "nesting 5,000 deep": (b"\x83\xa4type\xa4ping\xa2id\x09\xa1x" + b"\x91" * 5000 + b"\x01", 9),
    "an array": (b"\x92\x01\x02", None),
    "id over 2^53": (msgspec.msgpack.encode({"type": "ping", "id": 2**53 + 1}), None),
    "id negative": (msgspec.msgpack.encode({"type": "ping", "id": -1}), None),
    "a lone nil": (b"\xc0", None),
    "trailing bytes": (msgspec.msgpack.encode({"type": "ping", "id": 10}) + b"\x00", 10),
    "truncated map": (b"\x82\xa4type", None),
    "ext as id": (b"\x82\xa4type\xa4ping\xa2id\xd4\x01\x01", None),
    "upgrade, attestation with invalid UTF-8": (
        msgspec.msgpack.encode({"type": "upgrade", "id": 11, "attestation": {"payload": b"\x81\xa5ap_id\xa2\xff\xfe", "sig": b"s" * 64}}),
        11,
    ),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
async def test_every_undecodable_body_is_answered_and_the_connection_lives(env, name):
    running, _ = env
    body, rid = BAD_BODIES[name]
    ping = msgspec.msgpack.encode({"type": "ping", "id": 99})
    got = await _exchange(running.port, _frame(body) + _frame(ping), replies=2)
    errors = [m for m in got if m["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] in ("invalid_message", "unknown_message"), got
    assert errors[0].get("id") == rid
    assert {"type": "pong", "id": 99} in got


async def test_odd_but_valid_requests_are_served(env):
    running, _ = env
    odd = msgspec.msgpack.encode(
        {"type": "fetch_result", "id": 2**32, "session_id": "s", "x": [1.5, {"a": None}], "y": msgspec.msgpack.Ext(5, b"xx"), "z": -(2**63)}
    )
    got = await _exchange(running.port, _frame(odd), replies=1)
    assert got == [{"type": "error", "id": 2**32, "code": "not_authenticated", "message": got[0]["message"]}]
    assert running.engine.metrics.requests.labels(type="fetch_result", outcome="internal")._value.get() == 0


async def test_a_broken_frame_answers_what_is_in_flight_then_errors_then_closes_gracefully(env, monkeypatch):
    running, _ = env

    async def slow_ping(conn, req):
        await trio.sleep(0.3)
        return P.Pong(id=req.id)

    monkeypatch.setattr(running.engine, "handle_ping", slow_ping)
    ping = msgspec.msgpack.encode({"type": "ping", "id": 5})
    # a ping in flight, then a length over max_frame followed by bytes the engine never reads
    got = await _exchange(running.port, _frame(ping) + struct.pack(">I", 10**9) + b"x" * 100_000, until_eof=True)
    assert got[0] == {"type": "pong", "id": 5}
    assert got[1]["type"] == "error" and got[1]["code"] == "frame_too_large" and "id" not in got[1]
    assert len(got) == 2
    for raw in (struct.pack(">I", 0), struct.pack(">I", 100) + b"\x81"):
        got = await _exchange(running.port, raw if raw[3] == 0 else raw, until_eof=raw[3] == 0, replies=0 if raw[3] else 1)
        if raw[3] == 0:
            assert got[-1]["code"] == "malformed_frame"


@settings(deadline=None, max_examples=300)
@given(body=st.binary(max_size=200))
def test_decode_request_is_total(body):
    try:
        req = P.decode_request(body)
    except (E.InvalidMessage, E.UnknownMessage):
        return
    assert type(req).__struct_config__.tag in P.REQUEST_TYPES


@settings(deadline=None, max_examples=200)
@given(obj=st.recursive(st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20),
       kind=st.sampled_from(sorted(P.REQUEST_TYPES)))
def test_decode_request_is_total_on_maps(obj, kind):
    body = msgspec.msgpack.encode({"type": kind, "id": 1, "extra": obj, **(obj if isinstance(obj, dict) else {})})
    try:
        P.decode_request(body)
    except (E.InvalidMessage, E.UnknownMessage):
        pass


async def test_client_mistakes_are_logged_once_per_connection(env, caplog):
    running, _ = env
    caplog.set_level(logging.INFO, logger="engine.server.listener")
    bad = b"".join(_frame(b"\x92\x01\x02") for _ in range(50))
    got = await _exchange(running.port, bad, replies=50)
    assert len(got) == 50 and all(m["code"] == "invalid_message" for m in got)
    lines = [r for r in caplog.records if r.name == "engine.server.listener"]
    assert len(lines) == 1 and not lines[0].exc_info
    assert running.engine.metrics.requests.labels(type="invalid", outcome="invalid_message")._value.get() == 50


# ---- limits, on memory streams with the autojump clock -----------------------------------------------------
async def _serve_one(server: Server, nursery: trio.Nursery):
    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server._run_connection, served)
    return client


async def _read_all(client) -> list[dict]:
    data = b""
    with trio.fail_after(3600):
        while chunk := await client.receive_some():
            data += chunk
    return _split(data)


async def test_idle_timeouts_at_every_stage(tmp_path, nursery, autojump_clock):
    engine = _engine(tmp_path, first_frame_timeout=5.0, idle_timeout=20.0)
    server = Server(engine)
    silent = await _serve_one(server, nursery)
    msgs = await _read_all(silent)
    assert msgs[0]["type"] == "hello" and msgs[-1]["code"] == "idle_timeout"
    assert 5.0 <= trio.current_time() < 7.0
    t0 = trio.current_time()
    once = await _serve_one(server, nursery)
    await once.send_all(_frame(msgspec.msgpack.encode({"type": "ping", "id": 1})))
    msgs = await _read_all(once)
    assert [m["type"] for m in msgs] == ["hello", "pong", "error"] and msgs[-1]["code"] == "idle_timeout"
    assert 20.0 <= trio.current_time() - t0 < 22.0
    assert engine.metrics.connections_closed.labels(reason="idle_timeout")._value.get() == 2


async def test_a_slow_sender_inside_a_frame_is_closed(tmp_path, nursery, autojump_clock):
    engine = _engine(tmp_path, min_receive_rate=1000, rate_window=5.0)
    server = Server(engine)
    slow = await _serve_one(server, nursery)
    await slow.send_all(_frame(msgspec.msgpack.encode({"type": "ping", "id": 1})))
    body = msgspec.msgpack.encode({"type": "ping", "id": 2, "pad": b"x" * 20_000})
    frame = _frame(body)

    async def trickle():
        for i in range(0, len(frame), 100):  # 100 bytes a second
            try:
                await slow.send_all(frame[i : i + 100])
            except trio.BrokenResourceError:
                return
            await trio.sleep(1.0)

    nursery.start_soon(trickle)
    t0 = trio.current_time()
    msgs = await _read_all(slow)
    assert msgs[-1]["code"] == "too_slow" and trio.current_time() - t0 < 12.0
    assert engine.metrics.frame_bytes._value.get() == 0  # the reservation went back


async def test_partial_frames_stay_within_the_budget(tmp_path, nursery, autojump_clock):
    engine = _engine(tmp_path, max_frame=200_000, max_connection_bytes=200_000, frame_budget=400_000)
    server = Server(engine)
    holders = []
    for _ in range(2):  # two almost-complete 150 kB frames: 300 kB of the 400 kB budget
        c = await _serve_one(server, nursery)
        await c.send_all(struct.pack(">I", 150_000) + b"x" * 149_000)
        holders.append(c)
    await trio.sleep(0.5)
    assert server.budget.used == 300_000
    third = await _serve_one(server, nursery)
    await third.send_all(struct.pack(">I", 150_000) + b"x" * 100)
    msgs = await _read_all(third)
    assert msgs[-1]["code"] == "frame_budget" and msgs[-1]["retry_after_ms"] > 0
    small = await _serve_one(server, nursery)  # frames up to 64 KiB are never refused for it
    await small.send_all(_frame(msgspec.msgpack.encode({"type": "ping", "id": 3, "pad": b"p" * 60_000})))
    with trio.fail_after(5):
        got = b""
        while len(_split(got)) < 2:
            got += await small.receive_some()
    assert _split(got)[1] == {"type": "pong", "id": 3}
    assert server.budget.peak <= 400_000
    assert engine.metrics.frame_bytes._value.get() == 300_000


async def test_idle_connections_cannot_lock_out_a_relying_party(tmp_path, nursery):
    """Caps of 6 connections, 4 unauthenticated: idle peers are evicted, relying parties connect."""
    engine = _engine(tmp_path, max_connections=6, max_unauthenticated=4)
    rp_keys = make_rp(engine.store, "hotel")
    running = await nursery.start(run_engine, engine)
    idle = []
    for _ in range(10):
        s = await trio.open_tcp_stream("127.0.0.1", running.port)
        idle.append(s)
    with trio.fail_after(10):
        async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
            for _ in range(10):  # more idle peers once the relying party is in
                idle.append(await trio.open_tcp_stream("127.0.0.1", running.port))
            async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp2:
                await rp.open_session()
                await rp2.open_session()
                cred, key = await _enroll(running.port)
                opened = await rp.open_session()
                async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
                    qr = phone.scan(opened.qr)
                    mine = await phone.verify(cred, qr, face=face("alice", 5), voice=voice("alice", qr.challenge, 5))
                assert mine.outcome == "pass"
    assert running.server.table.evicted >= 10
    assert running.server.table.unauthenticated <= 4
    for s in idle:
        await s.aclose()
    running.drain()


async def _enroll(port: int):
    key = nacl.signing.SigningKey.generate()
    async with open_holder("127.0.0.1", port, device_key=key) as phone:
        got = await phone.enroll("C1", [face("alice", 1)], [voice("alice", "enroll", n) for n in (1, 2, 3)])
    return got.credential_id, key


# ---- sessions: strangers, attempts, results ---------------------------------------------------------------
async def test_a_strangers_verify_leaves_the_session_usable_by_its_holder(env):
    running, rp_keys = env
    cred, key = await _enroll(running.port)
    with trio.fail_after(10):
        async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
            opened = await rp.open_session()
            stranger = nacl.signing.SigningKey.generate()
            async with open_holder("127.0.0.1", running.port, device_key=stranger) as thief:
                qr = thief.scan(opened.qr)  # saw the QR code over the counter
                with pytest.raises(E.WrongDeviceKey):
                    await thief.verify(cred, qr, face=face("mallory", 1), voice=voice("mallory", qr.challenge, 1))
                with pytest.raises(E.UnknownCredential):
                    await thief.verify("no-such-credential", qr, face=face("mallory", 1), voice=voice("mallory", qr.challenge, 1))
            with pytest.raises(E.ResultPending):
                await rp.fetch_result(opened.session_id)
            async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
                mine = await phone.verify(cred, phone.scan(opened.qr), face=face("alice", 2), voice=voice("alice", qr.challenge, 2))
            pushed = await rp.results().__anext__()
    assert mine.outcome == pushed.outcome == "pass" and pushed.session_id == opened.session_id
    assert running.engine.metrics.failed_attempts.labels(code="wrong_device_key")._value.get() == 1


async def test_a_session_takes_a_bounded_number_of_failed_attempts(env):
    running, rp_keys = env
    cred, key = await _enroll(running.port)
    limit = running.engine.config.limits.max_failed_attempts
    with trio.fail_after(10):
        async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
            opened = await rp.open_session()
            async with open_holder("127.0.0.1", running.port, device_key=nacl.signing.SigningKey.generate()) as thief:
                qr = thief.scan(opened.qr)
                for _ in range(limit):
                    with pytest.raises(E.WrongDeviceKey):
                        await thief.verify(cred, qr, face=face("mallory", 1), voice=voice("mallory", qr.challenge, 1))
            pushed = await rp.results().__anext__()
            assert (pushed.session_id, pushed.outcome, pushed.reason, pushed.pseudonym) == (opened.session_id, "fail", "too_many_attempts", "")
            async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
                with pytest.raises(E.SessionUsed):
                    await phone.verify(cred, qr, face=face("alice", 2), voice=voice("alice", qr.challenge, 2))


async def test_a_full_outbox_keeps_the_result_for_fetch(env):
    running, rp_keys = env
    engine = running.engine
    cred, key = await _enroll(running.port)
    full_send, _full_recv = trio.open_memory_channel(0)  # a stream that takes nothing
    engine.state.subscribe("hotel", full_send)
    with trio.fail_after(10):
        async with open_relying_party("127.0.0.1", running.port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
            opened = await rp.open_session()
            async with open_holder("127.0.0.1", running.port, device_key=key) as phone:
                qr = phone.scan(opened.qr)
                await phone.verify(cred, qr, face=face("alice", 2), voice=voice("alice", qr.challenge, 2))
            fetched = await rp.fetch_result(opened.session_id)
    assert fetched.outcome == "pass"
    assert engine.metrics.results_not_pushed.labels(why="outbox_full")._value.get() == 1


async def test_fetching_is_not_starved_by_opening(tmp_path, nursery):
    engine = _engine(tmp_path)
    tiny = make_rp(engine.store, "kiosk", quota=2)
    running = await nursery.start(run_engine, engine)
    with trio.fail_after(10):
        async with open_relying_party("127.0.0.1", running.port, rp_id="kiosk", signing_key=tiny.signing, box_key=tiny.box) as rp:
            opened = [await rp.open_session() for _ in range(2)]
            with pytest.raises(E.RateLimited):
                await rp.open_session()
            for _ in range(4):  # its own bucket: twice the open quota
                with pytest.raises(E.ResultPending):
                    await rp.fetch_result(opened[0].session_id)
            with pytest.raises(E.RateLimited):
                await rp.fetch_result(opened[1].session_id)
    running.drain()


def test_frames_encode_as_documented():
    assert encode_frame(msgspec.msgpack.encode({"type": "ping", "id": 1}))[:4] == b"\x00\x00\x00\x0f"


# ---- the pieces, on their own -------------------------------------------------------------------------
class _Peer:
    def __init__(self, quiet: float, in_flight: int = 0) -> None:
        self.quiet, self.in_flight, self.evicted = quiet, in_flight, False

    def quiet_since(self) -> float:
        return self.quiet

    def evict(self) -> None:
        self.evicted = True


def test_the_table_evicts_the_quietest_idle_unauthenticated_connection():
    from engine.server.limits import ConnectionTable

    table = ConnectionTable(max_connections=3, max_unauthenticated=2)
    a, b, busy = _Peer(5.0), _Peer(1.0), _Peer(0.0, in_flight=1)
    assert table.admit(a) and table.admit(busy)
    assert table.admit(b) and a.evicted and not busy.evicted  # a request in flight is never evicted
    table.authenticated(b)
    c = _Peer(9.0)
    assert table.admit(c) and (table.total, table.unauthenticated) == (3, 2)
    c.in_flight = 1
    assert not table.admit(_Peer(10.0))  # full, and nothing idle and unauthenticated to evict
    assert not b.evicted and table.refused == 1
    table.remove(busy)
    assert table.admit(_Peer(11.0))


def test_log_lines_are_paced_and_the_rest_counted(caplog):
    from engine.server.limits import LogPacer

    now = [0.0]
    pacer = LogPacer(logging.getLogger("engine.test"), per_second=1.0, burst=3, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="engine.test")
    written = [pacer.log(logging.INFO, "line %d", k) for k in range(10)]
    assert written == [True] * 3 + [False] * 7
    now[0] = 2.0
    assert pacer.log(logging.INFO, "later")
    assert caplog.records[-1].getMessage() == "later (7 similar lines held back)"
    assert pacer.suppressed_total == 7


async def test_a_client_that_waits_is_kept_alive_by_its_pings(tmp_path, nursery, autojump_clock):
    """engine.wire.client pings within the first-frame timeout, then every keepalive seconds."""
    from engine.wire.client import Connection
    from engine.wire.framing import FrameReader

    engine = _engine(tmp_path, first_frame_timeout=10.0, idle_timeout=60.0)
    server = Server(engine)
    client = await _serve_one(server, nursery)
    reader = FrameReader(client, max_frame=1 << 20)
    hello = P.decode_server_message(await reader.read())
    conn = Connection(client, hello, reader)
    nursery.start_soon(conn._read_loop)
    nursery.start_soon(conn._keepalive, 30.0)
    await trio.sleep(300.0)  # five minutes without a request of its own
    await conn.ping()
    assert engine.metrics.connections_closed.labels(reason="idle_timeout")._value.get() == 0
    assert engine.metrics.requests.labels(type="ping", outcome="ok")._value.get() >= 10


async def test_a_client_provoking_errors_fast_is_answered_at_the_error_pace(tmp_path, nursery, autojump_clock):
    engine = _engine(tmp_path, error_rate=10.0, error_burst=20)
    server = Server(engine)
    client = await _serve_one(server, nursery)
    t0 = trio.current_time()
    await client.send_all(_frame(b"\x92\x01\x02") * 60 + _frame(msgspec.msgpack.encode({"type": "ping", "id": 7})))
    data = b""

    def complete(buf: bytes) -> int:
        n = 0
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
            buf = buf[4 + struct.unpack(">I", buf[:4])[0] :]
            n += 1
        return n

    while complete(data) < 62:  # hello, 60 errors, pong
        data += await client.receive_some()
    msgs = _split(data)
    assert all(m["code"] == "invalid_message" for m in msgs[1:61]) and msgs[61]["type"] == "pong"
    # 20 at once (the burst), the other 40 and the ping at 10 a second; the connection lives on
    assert 3.5 <= trio.current_time() - t0 < 5.0
    assert engine.metrics.paced_seconds._value.get() > 3.5
    # replies about the engine's state or the protocol's course are not counted
    assert "result_pending" in UNPACED and "overloaded" in UNPACED
