"""SIGKILL a real ``netid serve`` in the middle of enrollments, re-applications and rebinds.

A real engine process (the real models, LFW faces, Free Spoken Digit Dataset voices, as in
test_e2e: chimeric identities) is driven over TCP with many lifecycle transitions at once and
killed while some are answered and others are in flight. It is then restarted on the same data
directory, and every credential must be either fully before or fully after its transition (an
answered transition always after), the audit log must agree with the state, and the restarted
engine must serve: bound keys, old keys told to delete, its template indexes rebuilt (the 1:N
search finds an enrolled face; an untouched credential verifies).
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nacl.public
import nacl.signing
import pytest
import trio

from engine.bench._engine import EngineProcess
from engine import errors as E
from engine.wire.client import open_holder, open_relying_party
from engine.cli.demo import DigitVoices

from .conftest import DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "lfw").is_dir() or not (DATA / "digits").is_dir(), reason="needs ../shared/data (lfw, digits)"),
]

LFW = DATA / "lfw" / "images"
SPEAKERS = ("george", "jackson", "theo", "nicolas", "lucas", "yweweler")
BYSTANDER = ("Colin_Powell", "george")  # the pair test_e2e verifies: enrolled before, untouched by the crash
N_EARLY = 6  # enrolled before the first kill; they re-apply and rebind in every round
N_FRESH = 6  # enroll for the first time in the rounds
ENROLL_VOICES = DigitVoices(DATA / "digits", range(0, 3))
PROBE_VOICES = DigitVoices(DATA / "digits", range(10, 40))
ROOT = Path(__file__).resolve().parent.parent


def netid(*args: str) -> list[str]:
    """The ``netid`` command (``engine.cli``), run from the project root."""
    return [sys.executable, "-m", "engine.cli", *args]


def img(person: str, i: int) -> bytes:
    return (LFW / person / f"{person}_{i:04d}.jpg").read_bytes()


@dataclass
class Person:
    card: str
    face: str
    speaker: str
    key: nacl.signing.SigningKey = field(default_factory=nacl.signing.SigningKey.generate)
    credential: str | None = None
    version: int = 0
    rebinds: int = 0  # completed rebinds of the current credential


@dataclass
class Transition:
    kind: str  # "enroll" (a first one), "reapply", "rebind"
    person: Person
    new_key: nacl.signing.SigningKey
    answered: str | None = None  # the credential id the engine answered with
    error: str | None = None  # an error code, or "connection: ..." when the engine was killed
    after: bool = False  # found fully after the transition once restarted
    old_credential: str | None = None
    old_key: nacl.signing.SigningKey | None = None


def people_for(rng: random.Random) -> list[Person]:
    names = sorted(p.name for p in LFW.iterdir() if p.is_dir() and p.name != BYSTANDER[0] and len(list(p.glob("*.jpg"))) >= 4)
    rng.shuffle(names)
    return [Person(f"K-{i:03d}", n, SPEAKERS[i % len(SPEAKERS)]) for i, n in enumerate(names[: N_EARLY + N_FRESH])]


def sigkill(engine: EngineProcess) -> None:
    assert engine.proc is not None and engine.proc.poll() is None, "the engine died on its own"
    engine.kill()
    assert engine.proc.returncode == -signal.SIGKILL


def run(*args: str) -> dict:
    out = subprocess.run(netid("--log-level", "warning", *args), capture_output=True, check=True, timeout=120, cwd=ROOT)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


async def enroll(port: int, person: Person, key: nacl.signing.SigningKey, rng: random.Random, *, samples: int = 3) -> str:
    faces = [img(person.face, 2 + i) for i in range(samples)]
    voices = [ENROLL_VOICES.say(person.speaker, "".join(rng.choice("0123456789") for _ in range(8)), rng) for _ in range(samples)]
    async with open_holder("127.0.0.1", port, device_key=key) as phone:
        return (await phone.enroll(person.card, faces, voices)).credential_id


async def rebind(port: int, person: Person, key: nacl.signing.SigningKey, rng: random.Random) -> str:
    voice = PROBE_VOICES.say(person.speaker, "".join(rng.choice("0123456789") for _ in range(8)), rng)
    async with open_holder("127.0.0.1", port, device_key=key) as phone:
        return (await phone.rebind(person.credential, face=img(person.face, 3), voice=voice)).credential_id


ROUNDS = (1, 4, 7)  # answers awaited before each kill: early, a third, most of the way


async def test_sigkill_during_transitions_leaves_each_credential_before_or_after(tmp_path, seed):
    rng = random.Random(seed)
    data, keys = tmp_path / "data", tmp_path / "keys"
    people = people_for(rng)
    bystander = Person("K-BYSTANDER", *BYSTANDER)
    alias = Person("K-ALIAS", *BYSTANDER)  # a second card with the bystander's photo
    cards = tmp_path / "cards.jsonl"
    cards.write_text(
        "".join(
            json.dumps({"card_number": p.card, "name": p.face.replace("_", " "), "photo": str(LFW / p.face / f"{p.face}_0001.jpg"), "status": "valid"}) + "\n"
            for p in [*people, bystander, alias]
        )
    )
    imported = run("registry", "import", str(cards), "--data", str(data))
    refused = {c["card_number"] for c in imported["refused"]}
    assert bystander.card not in refused and alias.card not in refused, imported
    people = [p for p in people if p.card not in refused]
    assert len(people) >= N_EARLY + N_FRESH - 2, imported
    run("rp", "add", "--id", "hotel", "--name", "Hotel", "--max-level", "basic", "--keys-out", str(keys), "--data", str(data))

    engine = EngineProcess(data, serve_args=["--no-challenge-check"], log_path=tmp_path / "engine.log", ready_timeout=60.0)
    try:
        await trio.to_thread.run_sync(engine.start)
        # ---- before: the bystander and the early half are enrolled --------------------------------
        bystander.credential, bystander.version = await enroll(engine.port, bystander, bystander.key, rng), 1
        early = people[:N_EARLY]

        async def first(p: Person) -> None:
            try:
                p.credential, p.version = await enroll(engine.port, p, p.key, rng), 1
            except (E.CardPhotoMismatch, E.DuplicateIdentity):
                pass  # this LFW photo pair does not pass the card check: it starts without a credential

        async with trio.open_nursery() as n:
            for p in early:
                n.start_soon(first, p)
        assert sum(p.credential is not None for p in early) >= 4, "too few early enrollments to test anything"

        cut_short = 0  # rounds in which the kill caught transitions in flight
        for kill_after in ROUNDS:
            # ---- during: a transition for everyone at once, killed part-way ------------------------
            transitions = []
            for i, p in enumerate(people):
                kind = "enroll" if p.credential is None else ("reapply", "rebind")[(i + kill_after) % 2]
                transitions.append(Transition(kind, p, nacl.signing.SigningKey.generate()))
            answered = trio.Semaphore(0)

            async def drive(t: Transition) -> None:
                try:
                    if t.kind == "rebind":
                        t.answered = await rebind(engine.port, t.person, t.new_key, rng)
                    else:
                        t.answered = await enroll(engine.port, t.person, t.new_key, rng)
                except E.EngineError as exc:
                    t.error = exc.code
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    t.error = f"connection: {type(exc).__name__}"
                answered.release()

            with trio.fail_after(120):
                async with trio.open_nursery() as n:
                    for t in transitions:
                        n.start_soon(drive, t)
                    for _ in range(kill_after):
                        await answered.acquire()
                    await trio.sleep(rng.uniform(0.0, 0.05))  # land anywhere, the store's commits included
                    sigkill(engine)
            print(f"killed after {kill_after} answers:", [(t.kind, "answered" if t.answered else t.error) for t in transitions])
            cut_short += any(t.error and t.error.startswith("connection") for t in transitions)

            # ---- after: restart on the same data directory -----------------------------------------
            await trio.to_thread.run_sync(engine.start)
            with sqlite3.connect(data / "engine.db") as db:
                check_store(db, transitions, bystander)
            with trio.fail_after(120):
                await check_serving(engine, transitions, bystander)
        # a late kill may land after every answer on a quiet machine; the early ones never do
        assert cut_short >= 1, "no round killed the engine with transitions in flight"
        with trio.fail_after(120):
            await check_indexes(engine, bystander, alias, keys, random.Random(seed + 1))  # its own rng: same samples every run
    finally:
        engine.stop()


def check_store(db: sqlite3.Connection, transitions: list[Transition], bystander: Person) -> None:
    """Each credential is whole and before or after its transition; the audit log agrees. Then
    the people's state is moved on to what the store holds."""
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    creds = {r[0]: (r[0], r[1], r[2], bytes(r[3]), r[4]) for r in db.execute("SELECT credential_id, card_number, version, device_key, status FROM credentials")}
    templates: dict[str, list[str]] = {}
    for cid, modality in db.execute("SELECT credential_id, modality FROM templates"):
        templates.setdefault(cid, []).append(modality)
    audit = db.execute("SELECT action, subject, detail FROM audit").fetchall()
    retired = [(bytes(k), c) for k, c in db.execute("SELECT device_key, credential_id FROM retired_devices ORDER BY id")]

    # whole: live credentials with all their templates, voided ones with none; one live
    # credential per card, versions 1..n; the audit log holds exactly the transitions made
    issued = {s: json.loads(d)["templates"] for a, s, d in audit if a == "credential.issue"}
    for cid, _card, _version, _key, status in creds.values():
        mine = templates.get(cid, [])
        if status == "active":
            assert len(mine) == issued[cid] and {"face", "voice"} == set(mine), (cid, mine)
        else:
            assert mine == [], (cid, status)
    by_card: dict[str, list[tuple]] = {}
    for row in sorted(creds.values(), key=lambda r: r[2]):
        by_card.setdefault(row[1], []).append(row)
    for card, rows in by_card.items():
        assert [r[2] for r in rows] == list(range(1, len(rows) + 1)), card
        assert [r[4] for r in rows] == ["voided"] * (len(rows) - 1) + ["active"], rows
    assert sorted(s for a, s, _d in audit if a == "credential.issue") == sorted(creds)
    assert sorted(s for a, s, _d in audit if a == "credential.void") == sorted(c for c, r in creds.items() if r[4] == "voided")
    assert sorted(s for a, s, _d in audit if a == "device.rebind") == sorted(c for _k, c in retired)

    for t in transitions:
        p, old_key, new_key = t.person, bytes(t.person.key.verify_key), bytes(t.new_key.verify_key)
        rows = by_card.get(p.card, [])
        latest = rows[-1] if rows else None
        if t.kind == "enroll":
            before = rows == []
            t.after = len(rows) == 1 and latest[3] == new_key
        elif t.kind == "reapply":
            before = latest[0] == p.credential and latest[3] == old_key
            t.after = latest[2] == p.version + 1 and latest[3] == new_key and creds[p.credential][4] == "voided"
        else:
            moved = [k for k, c in retired if c == p.credential]
            before = latest[0] == p.credential and latest[3] == old_key and len(moved) == p.rebinds
            t.after = latest[0] == p.credential and latest[3] == new_key and len(moved) == p.rebinds + 1 and moved[-1] == old_key
        assert before != t.after, (t.kind, t.answered, t.error, rows)
        if t.answered:  # answered means committed
            assert t.after, (t.kind, t.answered, rows)
        if t.after:
            t.old_credential, t.old_key = p.credential, p.key
            p.key, p.credential, p.version = t.new_key, latest[0], latest[2]
            p.rebinds = p.rebinds + 1 if t.kind == "rebind" else 0
    row = creds[bystander.credential]
    assert (row[3], row[4]) == (bytes(bystander.key.verify_key), "active")
    print("after the restart:", [(t.kind, "after" if t.after else "before") for t in transitions])


async def check_serving(engine: EngineProcess, transitions: list[Transition], bystander: Person) -> None:
    """The restarted engine knows every binding: current keys, and old ones told to delete."""
    port = engine.port
    for p in [bystander, *(t.person for t in transitions)]:
        if p.credential is None:
            continue
        async with open_holder("127.0.0.1", port, device_key=p.key) as phone:
            assert (await phone.status(p.credential)).status == "active"
    for t in transitions:
        if t.after and t.kind == "rebind":
            async with open_holder("127.0.0.1", port, device_key=t.old_key) as old_phone:
                with pytest.raises(E.CredentialDeleted):
                    await old_phone.status(t.old_credential)
        elif t.after and t.kind == "reapply":
            async with open_holder("127.0.0.1", port, device_key=t.old_key) as old_phone:
                assert (await old_phone.status(t.old_credential)).status == "voided"


async def check_indexes(engine: EngineProcess, bystander: Person, alias: Person, keys: Path, rng: random.Random) -> None:
    """The template indexes were rebuilt from the store."""
    port = engine.port
    # 1:N: the bystander's face is found when someone enrolls it under another card
    async with open_holder("127.0.0.1", port, device_key=alias.key) as phone:
        with pytest.raises(E.DuplicateIdentity):
            await phone.enroll(alias.card, [img(alias.face, 5)], [ENROLL_VOICES.say(alias.speaker, d, rng) for d in ("13572468", "97531864", "24680135")])
    # 1:1: the untouched credential verifies against its templates
    engine_key = bytes.fromhex(engine.ready["engine_key"])
    rp_keys = dict(signing_key=nacl.signing.SigningKey((keys / "hotel.sign.key").read_bytes()), box_key=nacl.public.PrivateKey((keys / "hotel.box.key").read_bytes()))
    async with open_relying_party("127.0.0.1", port, rp_id="hotel", engine_key=engine_key, **rp_keys) as rp:
        opened = await rp.open_session()
        async with open_holder("127.0.0.1", port, device_key=bystander.key, engine_key=engine_key) as phone:
            qr = phone.scan(opened.qr_text)
            mine = await phone.verify(bystander.credential, qr, face=img(bystander.face, 4), voice=PROBE_VOICES.say(bystander.speaker, qr.challenge, rng))
        pushed = await rp.results().__anext__()
    assert (mine.outcome, pushed.outcome, pushed.reason) == ("pass", "pass", "match")
