"""Credential lifecycle and relying parties over the real protocol, with the fake extractor.

Levels and upgrades by acceptance points, re-application, new phone (rebind), lost card,
relying-party registry (maximum level, disable, quota), the audit log and the operator CLI.
Samples are ``b"FACE:<who>:<n>"`` and ``b"VOICE:<who>:<said>:<n>"`` (see engine/inference/extractors.py).
Timing (quota refill, the relying-party cache window) runs on the engine's injectable clock,
never on wall-clock sleeps.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import nacl.public
import nacl.signing
import nacl.utils
import pytest
import trio

from engine import errors as E
from engine.wire import protocol as P
from engine.app import Running, build_engine, run_engine
from engine.cli import main as netid
from engine.wire.client import Connection, HolderClient, RelyingPartyClient, open_connection, open_holder, open_relying_party
from engine.config import ChallengeSettings, EngineConfig, LimitsConfig
from engine.inference.extractors import _identity_vector, fake_extractors
from engine.flows import holder as holder_flows
from engine.ops.registry import seal_card_template
from engine.flows import Engine
from engine.store import AcceptancePoint, CardRecord

from .conftest import Clock, FixedScores, RPKeys, face, make_rp, voice

PEOPLE = {"C1": "alice", "C2": "bob", "C3": "carol"}
NAMES = {"C1": "Alice Example", "C2": "Bob Example", "C3": "Carol Example"}


# ---- scores ------------------------------------------------------------------------------------------
class RecordingScores(FixedScores):
    """FixedScores that remembers every score it was asked to decide on."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def decide(self, face: float, voice: float):
        self.seen += [face, voice]
        return super().decide(face, voice)


# ---- an engine on loopback -------------------------------------------------------------------------------
@dataclass
class Env:
    running: Running
    clock: Clock
    data: Path
    hotel: RPKeys  # may ask for "high"
    courier: RPKeys  # "basic" only
    scores: RecordingScores
    keys_dir: Path

    @property
    def engine(self) -> Engine:
        return self.running.engine

    @property
    def port(self) -> int:
        return self.running.port


def card_records(engine: Engine, people: dict[str, str], names: dict[str, str]) -> list[CardRecord]:
    return [
        CardRecord(
            card_number=card,
            name=names[card],
            photo_path=f"{who}.jpg",
            status="valid",
            photo_template=seal_card_template(engine.cipher, _identity_vector("FACE", who, 128), card),
        )
        for card, who in people.items()
    ]


@asynccontextmanager
async def engine_env(tmp_path: Path, nursery: trio.Nursery, *, people=PEOPLE, names=NAMES, limits: LimitsConfig | None = None) -> AsyncIterator[Env]:
    data = tmp_path / "data"
    cfg = EngineConfig(
        data_dir=data,
        port=0,
        voice_wait_with_challenge=0.0,  # the fake recogniser is instant: nothing to wait behind
        limits=limits or LimitsConfig(max_in_flight=16, session_ttl=30.0, max_frame=64 * 1024),
        challenge=ChallengeSettings(kind="digits", length=6),
    )
    scores = RecordingScores()
    engine = build_engine(cfg, extractors=fake_extractors(), scores=scores)
    clock = Clock()
    engine.clock = clock
    engine.store.import_cards(card_records(engine, people, names), actor="test")
    hotel = make_rp(engine.store, "hotel", max_level="high", name="Hotel Example")
    courier = make_rp(engine.store, "courier", max_level="basic", name="Courier")
    running = await nursery.start(run_engine, engine)
    try:
        yield Env(running, clock, data, hotel, courier, scores, tmp_path / "keys")
    finally:
        running.drain()


@pytest.fixture
async def env(tmp_path, nursery) -> AsyncIterator[Env]:
    async with engine_env(tmp_path, nursery) as e:
        yield e


def rp_stream(env: Env, keys: RPKeys):
    return open_relying_party("127.0.0.1", env.port, rp_id=keys.rp_id, signing_key=keys.signing, box_key=keys.box, engine_key=env.engine.keys.verify_key)


def phone(env: Env, key: nacl.signing.SigningKey):
    return open_holder("127.0.0.1", env.port, device_key=key, engine_key=env.engine.keys.verify_key)


async def enroll(env: Env, card: str, key: nacl.signing.SigningKey | None = None, *, who: str | None = None) -> tuple[str, nacl.signing.SigningKey]:
    who = who or PEOPLE[card]
    key = key or nacl.signing.SigningKey.generate()
    async with phone(env, key) as p:
        got = await p.enroll(card, [face(who, 1), face(who, 2)], [voice(who, "enroll", n) for n in (1, 2, 3)])
    assert got.level == "basic"
    return got.credential_id, key


async def next_result(rp: RelyingPartyClient) -> P.ResultPayload:
    with trio.fail_after(5):
        msg = await rp.conn.pushes.receive()
    return rp.open(msg.sealed)


async def verify_once(
    p: HolderClient, rp: RelyingPartyClient, cred: str, *, level: str = "basic", who: str, voice_of: str | None = None, n: int = 7
) -> tuple[P.ResultPayload, P.ResultPayload]:
    """Open a session at ``level``, verify on it; the holder's copy and the relying party's push."""
    opened = await rp.open_session(level=level, purpose="check-in")
    qr = p.scan(opened.qr_text)
    mine = await p.verify(cred, qr, face=face(who, n), voice=voice(voice_of or who, qr.challenge, n))
    return mine, await next_result(rp)


def attestation(ap_key: nacl.signing.SigningKey, *, ap_id: str, credential_id: str, card_number: str, level: str = "high", checked_at: float | None = None) -> P.Signed:
    body = P.encode(
        P.Attestation(
            ap_id=ap_id,
            credential_id=credential_id,
            card_number=card_number,
            level=level,
            checked_at=time.time() if checked_at is None else checked_at,
            nonce=nacl.utils.random(16),
        )
    )
    return P.Signed(payload=body, sig=ap_key.sign(body).signature)


def add_ap(env: Env, ap_id: str = "counter-1", status: str = "active") -> nacl.signing.SigningKey:
    key = nacl.signing.SigningKey.generate()
    env.engine.store.add_acceptance_point(
        AcceptancePoint(ap_id=ap_id, name="City counter", sign_key=bytes(key.verify_key), status=status, created_at=time.time()), actor="test"
    )
    return key


async def upgrade(conn: Connection, signed: P.Signed) -> P.Upgraded:
    return await conn.request(P.Upgrade, attestation=signed)


async def cli(*argv: str) -> int:
    """``netid ARGV`` in a worker thread (it blocks on SQLite), leaving the test's logging as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return await trio.to_thread.run_sync(netid, ["--log-level", "warning", *argv])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---- assurance levels and acceptance points ----------------------------------------------------------
async def test_basic_credential_on_a_high_session_is_a_level_too_low_fail(env):
    cred, key = await enroll(env, "C1")
    with trio.fail_after(10):
        async with rp_stream(env, env.hotel) as rp, phone(env, key) as p:
            opened = await rp.open_session(level="high")
            qr = p.scan(opened.qr)
            assert qr.level == "high"
            mine = await p.verify(cred, qr, face=face("alice", 5), voice=voice("alice", qr.challenge, 5))
            pushed = await next_result(rp)
            # a result, not an error and certainly not a pass; the session is consumed
            assert (mine.outcome, mine.reason, mine.level) == ("fail", "level_too_low", "basic")
            assert (pushed.outcome, pushed.reason, pushed.level) == ("fail", "level_too_low", "basic")
            assert pushed.session_id == opened.session_id and pushed.pseudonym == mine.pseudonym
            with pytest.raises(E.SessionUsed):
                await p.verify(cred, qr, face=face("alice", 5), voice=voice("alice", qr.challenge, 5))
            # the same credential passes a basic session
            mine, pushed = await verify_once(p, rp, cred, who="alice")
            assert (pushed.outcome, pushed.reason, pushed.level) == ("pass", "match", "basic")


async def test_relying_party_may_not_ask_above_its_maximum(env):
    with trio.fail_after(10):
        async with rp_stream(env, env.courier) as rp:
            with pytest.raises(E.LevelNotAllowed):
                await rp.open_session(level="high")
            assert (await rp.open_session(level="basic")).payload.level == "basic"


async def test_upgrade_by_a_registered_acceptance_point(env):
    cred, key = await enroll(env, "C1")
    ap_key = add_ap(env)
    with trio.fail_after(10):
        async with open_connection("127.0.0.1", env.port) as conn, rp_stream(env, env.hotel) as rp, phone(env, key) as p:
            done = await upgrade(conn, attestation(ap_key, ap_id="counter-1", credential_id=cred, card_number="C1"))
            assert (done.credential_id, done.level) == (cred, "high")
            assert (await p.status(cred)).level == "high"
            mine, pushed = await verify_once(p, rp, cred, level="high", who="alice")
            assert (mine.outcome, pushed.outcome, pushed.level) == ("pass", "pass", "high")
        async with rp_stream(env, env.courier) as rp, phone(env, key) as p:  # a basic-only party sees the level
            _mine, pushed = await verify_once(p, rp, cred, level="basic", who="alice")
            assert (pushed.outcome, pushed.level) == ("pass", "high")
    levels = [e for e in env.engine.store.audit_log(limit=1000, subject=cred) if e.action == "credential.level"]
    assert [(e.actor, e.detail["from"], e.detail["to"]) for e in levels] == [("counter-1", "basic", "high")]


async def test_upgrade_refusals_leave_the_level_alone(env):
    cred, key = await enroll(env, "C1")
    bob_cred, _ = await enroll(env, "C2")
    ap_key = add_ap(env, "counter-1")
    add_ap(env, "counter-closed", status="disabled")
    closed_key = nacl.signing.SigningKey.generate()  # whatever key: a disabled point is refused first
    forger = nacl.signing.SigningKey.generate()
    with trio.fail_after(10):
        async with open_connection("127.0.0.1", env.port) as conn, phone(env, key) as p:
            # forged: the registered point's id, another key
            with pytest.raises(E.BadSignature):
                await upgrade(conn, attestation(forger, ap_id="counter-1", credential_id=cred, card_number="C1"))
            # tampered: a genuine signature over another statement
            genuine = attestation(ap_key, ap_id="counter-1", credential_id=bob_cred, card_number="C2")
            tampered = P.Signed(payload=attestation(ap_key, ap_id="counter-1", credential_id=cred, card_number="C1").payload, sig=genuine.sig)
            with pytest.raises(E.BadSignature):
                await upgrade(conn, tampered)
            # unknown and disabled acceptance points
            with pytest.raises(E.UnknownAcceptancePoint):
                await upgrade(conn, attestation(forger, ap_id="counter-9", credential_id=cred, card_number="C1"))
            with pytest.raises(E.UnknownAcceptancePoint):
                await upgrade(conn, attestation(closed_key, ap_id="counter-closed", credential_id=cred, card_number="C1"))
            # a genuine attestation of another card does not upgrade this credential
            with pytest.raises(E.BadSignature):
                await upgrade(conn, attestation(ap_key, ap_id="counter-1", credential_id=cred, card_number="C2"))
            # an old statement, and an unknown credential
            with pytest.raises(E.InvalidMessage):
                await upgrade(conn, attestation(ap_key, ap_id="counter-1", credential_id=cred, card_number="C1", checked_at=time.time() - 2 * 86400))
            with pytest.raises(E.UnknownCredential):
                await upgrade(conn, attestation(ap_key, ap_id="counter-1", credential_id="no-such-credential", card_number="C1"))
            assert (await p.status(cred)).level == "basic"
            # disabling a point takes effect at once
            env.engine.store.set_acceptance_point_status("counter-1", "disabled", actor="test")
            with pytest.raises(E.UnknownAcceptancePoint):
                await upgrade(conn, attestation(ap_key, ap_id="counter-1", credential_id=cred, card_number="C1"))
            assert (await p.status(cred)).level == "basic"
    assert not [e for e in env.engine.store.audit_log(limit=1000) if e.action == "credential.level"]


# ---- re-application ---------------------------------------------------------------------------------------
async def test_reapply_voids_the_old_credential(env):
    ap_key = add_ap(env)
    old, old_key = await enroll(env, "C1")
    async with open_connection("127.0.0.1", env.port) as conn:
        await upgrade(conn, attestation(ap_key, ap_id="counter-1", credential_id=old, card_number="C1"))
    new, new_key = await enroll(env, "C1")  # a new phone applies again from the same card
    assert new != old
    with trio.fail_after(10):
        async with rp_stream(env, env.hotel) as rp:
            async with phone(env, old_key) as p:
                opened = await rp.open_session()
                qr = p.scan(opened.qr)
                with pytest.raises(E.CredentialVoided):
                    await p.verify(old, qr, face=face("alice", 3), voice=voice("alice", qr.challenge, 3))
                # a voided credential's verify does not count: the session stays open
                with pytest.raises(E.ResultPending):
                    await rp.fetch_result(opened.session_id)
                assert (await p.status(old)).status == "voided"
                with pytest.raises(E.CredentialVoided):  # no upgrade of a voided credential
                    await upgrade(p.conn, attestation(ap_key, ap_id="counter-1", credential_id=old, card_number="C1"))
            async with phone(env, new_key) as p:
                st = await p.status(new)
                assert (st.status, st.level) == ("active", "basic")  # a new version starts at basic
                mine, pushed = await verify_once(p, rp, new, who="alice")
                assert (mine.outcome, pushed.outcome) == ("pass", "pass")
    v1, v2 = env.engine.store.get_credential(old), env.engine.store.get_credential(new)
    assert (v1.version, v1.status, v2.version, v2.status) == (1, "voided", 2, "active")
    assert env.engine.store.templates_of(old) == []
    voids = [e for e in env.engine.store.audit_log(limit=1000, subject=old) if e.action == "credential.void"]
    assert len(voids) == 1


async def test_reapply_with_the_same_phone(env):
    old, key = await enroll(env, "C1")
    new, _ = await enroll(env, "C1", key)
    async with phone(env, key) as p, rp_stream(env, env.hotel) as rp:
        with trio.fail_after(10):
            assert (await p.status(old)).status == "voided"
            mine, _pushed = await verify_once(p, rp, new, who="alice")
            assert mine.outcome == "pass"


# ---- new phone --------------------------------------------------------------------------------------------
async def test_rebind_refuses_the_old_key_and_tells_the_old_device(env):
    cred, old_key = await enroll(env, "C1")
    new_key = nacl.signing.SigningKey.generate()
    with trio.fail_after(10):
        async with phone(env, new_key) as new_phone:
            with pytest.raises(E.VerificationFailed):  # someone else's face: nothing changes
                await new_phone.rebind(cred, face=face("bob", 4), voice=voice("alice", "x", 4))
            with pytest.raises(E.VerificationFailed):
                await new_phone.rebind(cred, face=face("alice", 4), voice=voice("bob", "x", 4))
            async with phone(env, old_key) as old_phone:
                assert (await old_phone.status(cred)).status == "active"
            assert (await new_phone.rebind(cred, face=face("alice", 4), voice=voice("alice", "x", 4))).credential_id == cred
        async with rp_stream(env, env.hotel) as rp:
            async with phone(env, old_key) as old_phone:
                with pytest.raises(E.CredentialDeleted):
                    await old_phone.status(cred)
                opened = await rp.open_session()
                qr = old_phone.scan(opened.qr)
                with pytest.raises(E.CredentialDeleted):
                    await old_phone.verify(cred, qr, face=face("alice", 5), voice=voice("alice", qr.challenge, 5))
                with pytest.raises(E.ResultPending):  # the old phone's attempt did not count
                    await rp.fetch_result(opened.session_id)
                with pytest.raises(E.CredentialDeleted):  # nor can the old phone report the card lost
                    await old_phone.report_lost(cred, face=face("alice", 5), voice=voice("alice", "", 5))
            stranger = nacl.signing.SigningKey.generate()
            async with phone(env, stranger) as p:
                with pytest.raises(E.WrongDeviceKey):  # never bound: not told to delete anything
                    await p.status(cred)
            async with phone(env, new_key) as new_phone:
                st = await new_phone.status(cred)
                assert (st.status, st.level) == ("active", "basic")
                mine, pushed = await verify_once(new_phone, rp, cred, who="alice")
                assert (mine.outcome, pushed.outcome) == ("pass", "pass")
    assert env.engine.store.get_credential(cred).device_key == bytes(new_key.verify_key)
    audit = env.engine.store.audit_log(limit=1000, subject=cred)
    assert [e.outcome for e in audit if e.action == "rebind"] == ["refused", "refused"]
    assert len([e for e in audit if e.action == "device.rebind"]) == 1


async def test_concurrent_rebinds_one_wins_the_other_conflicts(env, monkeypatch):
    """Two new phones rebind the same credential at once; both pass the face + voice check.
    The race is lined up so that both checks overlap and one rebind commits while the other
    is still between its check and the store: that one must lose."""
    cred, old_key = await enroll(env, "C1")
    engine = env.engine
    checked: list[trio.Event] = []
    both_checked = trio.Event()
    go = [trio.Event(), trio.Event()]
    real_check = holder_flows.fresh_check

    async def racing_check(*args, **kwargs):
        await real_check(*args, **kwargs)
        turn = len(checked)
        checked.append(trio.Event())
        if len(checked) == 2:
            both_checked.set()
        await go[turn].wait()

    monkeypatch.setattr(holder_flows, "fresh_check", racing_check)
    keys = [nacl.signing.SigningKey.generate() for _ in range(2)]
    outcomes: dict[int, object] = {}
    answered = [trio.Event(), trio.Event()]

    async def rebind(i: int) -> None:
        async with phone(env, keys[i]) as p:
            try:
                outcomes[i] = await p.rebind(cred, face=face("alice", 10 + i), voice=voice("alice", "", 10 + i))
            except E.EngineError as exc:
                outcomes[i] = exc
        answered[i].set()

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(rebind, 0)
            n.start_soon(rebind, 1)
            await both_checked.wait()  # both checks done, neither has reached the store
            go[0].set()  # the first checked goes on and commits...
            while len(outcomes) < 1:
                await trio.sleep(0.01)
            go[1].set()  # ...then the other one
    won = [i for i, o in outcomes.items() if isinstance(o, P.Rebound)]
    lost = [i for i, o in outcomes.items() if isinstance(o, E.Conflict)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    winner, loser = keys[won[0]], keys[lost[0]]
    assert engine.store.get_credential(cred).device_key == bytes(winner.verify_key)
    with trio.fail_after(10):
        async with phone(env, winner) as p:
            assert (await p.status(cred)).status == "active"
        async with phone(env, loser) as p:
            with pytest.raises(E.WrongDeviceKey):
                await p.status(cred)
        async with phone(env, old_key) as p:
            with pytest.raises(E.CredentialDeleted):
                await p.status(cred)
    assert len([e for e in engine.store.audit_log(limit=1000, subject=cred) if e.action == "device.rebind"]) == 1


async def test_rebinds_racing_freely_never_both_bind(env):
    """Four rebinds pipelined on one stream, racing freely: however they interleave, the key
    bound at the end is one that was answered ``rebound``, the others got ``conflict`` or were
    replaced afterwards, and the audit log holds one rebind per ``rebound`` answer."""
    cred, _ = await enroll(env, "C1")
    keys = [nacl.signing.SigningKey.generate() for _ in range(4)]
    outcomes: dict[int, object] = {}
    async with phone(env, keys[0]) as p0:
        phones = [HolderClient(p0.conn, k, engine_key=p0.engine_key) for k in keys]  # one stream, requests pipelined

        async def rebind(i: int) -> None:
            try:
                outcomes[i] = await phones[i].rebind(cred, face=face("alice", 20 + i), voice=voice("alice", "", 20 + i))
            except E.Conflict as exc:
                outcomes[i] = exc

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for i in range(len(keys)):
                    n.start_soon(rebind, i)
    won = [i for i, o in outcomes.items() if isinstance(o, P.Rebound)]
    assert len(outcomes) == 4 and won, outcomes
    bound = env.engine.store.get_credential(cred).device_key
    assert bound in {bytes(keys[i].verify_key) for i in won}
    # every answered rebind is in the audit log, none that was refused
    assert len([e for e in env.engine.store.audit_log(limit=1000, subject=cred) if e.action == "device.rebind"]) == len(won)


# ---- lost ID card -------------------------------------------------------------------------------------------
async def test_holder_reports_the_card_lost_and_an_open_session_fails(env):
    cred, key = await enroll(env, "C1")
    bob, bob_key = await enroll(env, "C2")
    with trio.fail_after(10):
        async with rp_stream(env, env.hotel) as rp, phone(env, key) as p:
            opened = await rp.open_session()  # opened before the report
            qr = p.scan(opened.qr)
            with pytest.raises(E.VerificationFailed):  # a thief with the phone cannot report it
                await p.report_lost(cred, face=face("bob", 2), voice=voice("bob", "", 2))
            assert (await p.status(cred)).status == "active"
            assert (await p.report_lost(cred, face=face("alice", 2), voice=voice("alice", "", 2))).suspended == 1
            assert (await p.status(cred)).status == "suspended"
            with pytest.raises(E.CredentialSuspended):
                await p.verify(cred, qr, face=face("alice", 3), voice=voice("alice", qr.challenge, 3))
            with pytest.raises(E.ResultPending):  # a suspended credential's attempt does not count
                await rp.fetch_result(opened.session_id)
            with pytest.raises(E.CardLost):  # no enrollment from a lost card
                await p.enroll("C1", [face("alice", 1)], [voice("alice", "", n) for n in (1, 2, 3)])
        async with rp_stream(env, env.hotel) as rp, phone(env, bob_key) as p:  # other cards are untouched
            mine, _ = await verify_once(p, rp, bob, who="bob")
            assert mine.outcome == "pass"
    assert env.engine.store.get_card("C1").status == "lost"
    lost = [e for e in env.engine.store.audit_log(limit=1000, subject="C1") if e.action == "card.lost"]
    assert [(e.actor, e.detail["suspended"]) for e in lost] == [("holder", 1)]


@pytest.mark.parametrize(
    "flow, change, expected",
    [
        ("verify", "holder_reports_lost", E.CredentialSuspended),
        ("verify", "operator_reports_lost", E.CredentialSuspended),
        ("verify", "reapply", E.CredentialVoided),
        ("rebind", "holder_reports_lost", E.CredentialSuspended),
        ("rebind", "operator_reports_lost", E.CredentialSuspended),
        ("rebind", "reapply", E.CredentialVoided),
        ("report_lost", "holder_reports_lost", E.CredentialSuspended),
        ("report_lost", "reapply", E.CredentialVoided),
    ],
)
async def test_a_change_while_a_request_is_in_flight_wins_with_its_own_code(env, monkeypatch, flow, change, expected):
    """A holder request has checked the credential and is in the models when the card is
    reported lost or the holder re-applies: the request fails with the code of the change."""
    cred, key = await enroll(env, "C1")
    engine = env.engine
    in_models, release = trio.Event(), trio.Event()
    real_face = engine.ctx.face

    async def slow_face(image: bytes):
        out = await real_face(image)
        if image == face("alice", 8):
            in_models.set()
            await release.wait()
        return out

    monkeypatch.setattr(engine.ctx, "face", slow_face)
    outcome: list = []
    with trio.fail_after(10):
        async with rp_stream(env, env.hotel) as rp:
            qr_text = (await rp.open_session()).qr_text

            async def request() -> None:
                async with phone(env, key if flow != "rebind" else nacl.signing.SigningKey.generate()) as p:
                    try:
                        if flow == "verify":
                            qr = p.scan(qr_text)
                            outcome.append(await p.verify(cred, qr, face=face("alice", 8), voice=voice("alice", qr.challenge, 8)))
                        elif flow == "rebind":
                            outcome.append(await p.rebind(cred, face=face("alice", 8), voice=voice("alice", "", 8)))
                        else:
                            outcome.append(await p.report_lost(cred, face=face("alice", 8), voice=voice("alice", "", 8)))
                    except E.EngineError as exc:
                        outcome.append(exc)

            async with trio.open_nursery() as n:
                n.start_soon(request)
                await in_models.wait()
                if change == "holder_reports_lost":
                    async with phone(env, key) as p:
                        assert (await p.report_lost(cred, face=face("alice", 2), voice=voice("alice", "", 2))).suspended == 1
                elif change == "operator_reports_lost":
                    assert await cli("card", "lost", "C1", "--data", str(env.data)) == 0
                else:
                    await enroll(env, "C1")
                release.set()
            if flow == "verify":
                pushed = await next_result(rp)
                assert (pushed.outcome, pushed.reason) == ("fail", "credential_inactive")
    assert len(outcome) == 1 and isinstance(outcome[0], expected), outcome
    assert env.engine.store.get_credential(cred).device_key == bytes(key.verify_key)


async def test_reissued_card_needs_a_new_enrollment(env):
    cred, key = await enroll(env, "C1")
    assert await cli("card", "lost", "C1", "--data", str(env.data)) == 0
    assert await cli("card", "reissue", "C1", "--data", str(env.data)) == 0
    assert env.engine.store.get_card("C1").status == "valid"
    with trio.fail_after(10):
        async with rp_stream(env, env.hotel) as rp:
            async with phone(env, key) as p:
                assert (await p.status(cred)).status == "suspended"  # not lifted by the reissue
                opened = await rp.open_session()
                qr = p.scan(opened.qr)
                with pytest.raises(E.CredentialSuspended):
                    await p.verify(cred, qr, face=face("alice", 3), voice=voice("alice", qr.challenge, 3))
                with pytest.raises(E.CredentialSuspended):
                    await p.rebind(cred, face=face("alice", 3), voice=voice("alice", "", 3))
            new, new_key = await enroll(env, "C1", key)
            async with phone(env, new_key) as p:
                assert (await p.status(cred)).status == "voided"
                mine, pushed = await verify_once(p, rp, new, who="alice")
                assert (mine.outcome, pushed.outcome) == ("pass", "pass")


# ---- relying parties ---------------------------------------------------------------------------------------
async def test_disabled_relying_party_is_refused(env):
    with trio.fail_after(10):
        async with rp_stream(env, env.hotel) as rp:
            opened = await rp.open_session()
            assert await cli("rp", "disable", "hotel", "--data", str(env.data)) == 0
            # the live connection is refused once the cached record is older than its window (2 s)
            env.clock.offset += 2.5
            with pytest.raises(E.RelyingPartyDisabled):
                await rp.open_session()
            with pytest.raises(E.RelyingPartyDisabled):
                await rp.fetch_result(opened.session_id)
            await rp.conn.ping()  # an error, not a dropped connection
            # a new connection is refused at once
            with pytest.raises(E.RelyingPartyDisabled):
                async with rp_stream(env, env.hotel):
                    pass
        # other parties are not affected; enabling again works at the next connection
        async with rp_stream(env, env.courier) as rp:
            await rp.open_session()
        env.engine.store.set_relying_party_status("hotel", "active", actor="test")
        async with rp_stream(env, env.hotel) as rp:
            await rp.open_session()


async def test_quota_exceeded_is_rate_limited_not_a_timeout(env):
    tiny = make_rp(env.engine.store, "kiosk", max_level="basic", quota=3, name="Kiosk")
    with trio.fail_after(10):
        async with rp_stream(env, tiny) as rp:
            for _ in range(3):
                await rp.open_session()
            started = time.monotonic()
            with pytest.raises(E.RateLimited) as info:
                await rp.open_session()
            assert time.monotonic() - started < 5.0  # answered at once, far from the 10 s deadline
            retry = info.value.retry_after_ms
            assert retry is not None and 0 < retry <= 20_001  # 3 a minute: one every 20 s
            with pytest.raises(E.UnknownSession):  # collecting results has a quota of its own
                await rp.fetch_result("whatever")
            # the quota is per relying party, across its connections
            async with rp_stream(env, tiny) as rp2:
                with pytest.raises(E.RateLimited):
                    await rp2.open_session()
            async with rp_stream(env, env.courier) as other:
                await other.open_session()
            env.clock.offset += retry / 1000 + 0.01
            await rp.open_session()
            with pytest.raises(E.RateLimited):
                await rp.open_session()
    assert env.engine.metrics.rate_limited._value.get() >= 3


# ---- audit -----------------------------------------------------------------------------------------------------
async def test_audit_records_every_transition_and_outcome_without_biometrics(env):
    ap_key = add_ap(env)
    cred, key = await enroll(env, "C1")
    with trio.fail_after(15):
        async with phone(env, nacl.signing.SigningKey.generate()) as p:
            with pytest.raises(E.CardPhotoMismatch):
                await p.enroll("C3", [face("bob", 1)], [voice("bob", "", n) for n in (1, 2, 3)])
        async with open_connection("127.0.0.1", env.port) as conn:
            await upgrade(conn, attestation(ap_key, ap_id="counter-1", credential_id=cred, card_number="C1"))
        async with rp_stream(env, env.hotel) as rp, phone(env, key) as p:
            await verify_once(p, rp, cred, who="alice")  # pass
            await verify_once(p, rp, cred, who="bob")  # biometric fail
            await verify_once(p, rp, cred, who="alice", voice_of="alice", n=9)
        key2 = nacl.signing.SigningKey.generate()
        async with phone(env, key2) as p:
            with pytest.raises(E.VerificationFailed):
                await p.rebind(cred, face=face("carol", 1), voice=voice("carol", "", 1))
            await p.rebind(cred, face=face("alice", 1), voice=voice("alice", "", 1))
        cred2, key3 = await enroll(env, "C1")
        async with phone(env, key3) as p:
            with pytest.raises(E.VerificationFailed):
                await p.report_lost(cred2, face=face("bob", 1), voice=voice("alice", "", 1))
            await p.report_lost(cred2, face=face("alice", 1), voice=voice("alice", "", 1))
        assert await cli("card", "reissue", "C1", "--data", str(env.data)) == 0
        env.engine.store.set_relying_party_status("courier", "disabled", actor="operator")

    log = env.engine.store.audit_log(limit=10_000)
    actions = {(e.action, e.outcome) for e in log}
    for expected in [
        ("rp.add", "ok"), ("ap.add", "ok"), ("registry.import", "ok"), ("rp_connect", "ok"),
        ("credential.issue", "ok"), ("enroll", "refused"), ("credential.level", "ok"),
        ("verify", "pass"), ("verify", "fail"), ("rebind", "refused"), ("device.rebind", "ok"), ("report_lost", "refused"),
        ("credential.void", "ok"), ("credential.suspend", "ok"), ("card.lost", "ok"), ("card.reissue", "ok"),
        ("rp.status", "ok"),
    ]:
        assert expected in actions, expected
    by_subject = {(e.action, e.subject) for e in log}
    assert {("credential.issue", cred), ("credential.issue", cred2), ("credential.void", cred), ("device.rebind", cred), ("credential.level", cred)} <= by_subject
    verifies = [e for e in log if e.action == "verify"]
    assert [e.outcome for e in verifies] == ["pass", "fail", "pass"]
    assert all(e.detail.get("reason") for e in verifies)
    seqs = [e.seq for e in log]
    assert seqs == sorted(seqs) and all(e.ts > 0 and e.actor for e in log)

    # nothing biometric: no sample bytes, no embedding, no score, no blobs
    forbidden = [b"FACE:", b"VOICE:"]
    embeddings = fake_extractors().face_batch([face("alice", n) for n in (1, 2)])
    with sqlite3.connect(env.data / "engine.db") as db:
        rows = db.execute("SELECT actor, action, subject, outcome, detail FROM audit").fetchall()
        kinds = db.execute("SELECT DISTINCT typeof(actor), typeof(action), typeof(subject), typeof(outcome), typeof(detail) FROM audit").fetchall()
    assert kinds == [("text",) * 5]
    scores = set(env.scores.seen)
    assert scores
    for row in rows:
        text = "\x1f".join(row).encode()
        assert not any(f in text for f in forbidden), row
        assert not any(repr(float(vec[0])).encode() in text for vec in embeddings)
        detail = json.loads(row[4])
        for v in detail.values():
            assert isinstance(v, (str, int, float)) and len(str(v)) <= 256
            assert not (isinstance(v, float) and v in scores), row


# ---- operator command line --------------------------------------------------------------------------------------
async def test_cli_relying_parties_acceptance_points_cards_and_audit(env, capsys):
    data = str(env.data)
    keys = env.keys_dir
    capsys.readouterr()
    assert await cli("rp", "add", "--id", "shop", "--name", "Corner Shop", "--max-level", "basic", "--quota", "50", "--keys-out", str(keys), "--data", data) == 0
    added = json_lines(capsys.readouterr().out)[0]
    assert added["rp_id"] == "shop" and len(bytes.fromhex(added["box_key"])) == 32
    for name in ("shop.sign.key", "shop.box.key"):
        assert (keys / name).stat().st_mode & 0o077 == 0
    shop = RPKeys("shop", nacl.signing.SigningKey((keys / "shop.sign.key").read_bytes()), nacl.public.PrivateKey((keys / "shop.box.key").read_bytes()))
    assert bytes(shop.signing.verify_key).hex() == added["sign_key"]

    assert await cli("rp", "list", "--data", data) == 0
    listed = {r["rp_id"]: r for r in json_lines(capsys.readouterr().out)}
    assert set(listed) == {"hotel", "courier", "shop"}
    assert (listed["shop"]["max_level"], listed["shop"]["quota_per_minute"], listed["shop"]["status"]) == ("basic", 50, "active")

    cred, key = await enroll(env, "C1")
    with trio.fail_after(10):
        async with rp_stream(env, shop) as rp, phone(env, key) as p:
            with pytest.raises(E.LevelNotAllowed):
                await rp.open_session(level="high")
            mine, pushed = await verify_once(p, rp, cred, who="alice")
            assert pushed.outcome == "pass" and pushed.rp_id == "shop"

    assert await cli("rp", "disable", "shop", "--data", data) == 0
    assert json_lines(capsys.readouterr().out) == [{"rp_id": "shop", "status": "disabled"}]
    with trio.fail_after(10), pytest.raises(E.RelyingPartyDisabled):
        async with rp_stream(env, shop):
            pass

    assert await cli("ap", "add", "--id", "counter-7", "--name", "Town hall", "--keys-out", str(keys), "--data", data) == 0
    ap = json_lines(capsys.readouterr().out)[0]
    ap_key = nacl.signing.SigningKey((keys / "counter-7.sign.key").read_bytes())
    assert ap["sign_key"] == bytes(ap_key.verify_key).hex()
    with trio.fail_after(10):
        async with open_connection("127.0.0.1", env.port) as conn:
            assert (await upgrade(conn, attestation(ap_key, ap_id="counter-7", credential_id=cred, card_number="C1"))).level == "high"

    assert await cli("card", "lost", "C1", "--data", data) == 0
    assert json_lines(capsys.readouterr().out) == [{"card_number": "C1", "status": "lost", "suspended_credentials": 1}]
    assert env.engine.store.get_credential(cred).status == "suspended"
    assert await cli("card", "lost", "NO-SUCH-CARD", "--data", data) == 2
    err = capsys.readouterr().err
    assert json.loads(err.strip().splitlines()[-1])["error"] == "unknown_card"

    assert await cli("audit", "--data", data, "--subject", "C1") == 0
    entries = json_lines(capsys.readouterr().out)
    assert [(e["action"], e["actor"]) for e in entries] == [("card.lost", "operator")]
    assert await cli("audit", "--data", data, f"--subject={cred}") == 0  # an id may start with "-"
    assert [e["action"] for e in json_lines(capsys.readouterr().out)] == ["credential.issue", "verify", "credential.level", "credential.suspend"]
    assert await cli("audit", "--data", data, "--limit", "3") == 0
    three = json_lines(capsys.readouterr().out)
    assert len(three) == 3 and [e["seq"] for e in three] == sorted(e["seq"] for e in three)
    assert {"seq", "ts", "actor", "action", "subject", "outcome", "detail"} == set(three[0])
