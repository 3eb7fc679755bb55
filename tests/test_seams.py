"""The seams' contracts, checked on every implementation the engine has.

Session state and quotas: a session is claimed exactly once, a release makes it usable
again, failures close it at the limit, results go to their own relying party only.
Matching: 1:1 reads a credential's own templates through the store and refuses a
credential that is no longer active; the duplicate search finds an enrolled face. The
store's enrollment lock serialises enrollments.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trio

from engine import errors as E
from engine.wire import protocol as P
from engine.crypto import TemplateCipher
from engine.inference.extractors import _identity_vector
from engine.matching import FaissDuplicateSearch, NoDuplicateSearch, StoreMatcher, TemplateSealer
from engine.inference.speaker import SpeakerEmbedding
from engine.state import MemoryQuotas, MemorySessionState, Session
from engine.store import CardRecord, open_store

from .conftest import FixedScores

STATES = [MemorySessionState]
QUOTAS = [MemoryQuotas]


def session(sid: str = "s1", rp: str = "hotel", *, now: float = 100.0) -> Session:
    return Session(session_id=sid, rp_id=rp, level="basic", purpose="p", nonce=b"n" * 16, challenge="123456",
                   created_at=now, expires_at=now + 60.0)


@pytest.fixture(params=STATES)
async def state(request):
    return request.param()


async def test_a_session_is_claimed_once_and_a_release_reopens_it(state) -> None:
    await state.open(session(), now=100.0, max_open=10)
    with pytest.raises(E.UnknownSession):
        await state.claim("s1", b"x" * 16, 101.0)  # a wrong nonce claims nothing
    with pytest.raises(E.UnknownSession):
        await state.claim("nope", b"n" * 16, 101.0)
    claims = []

    async def claim() -> None:
        try:
            claims.append(await state.claim("s1", b"n" * 16, 101.0))
        except E.SessionUsed:
            pass

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(claim)
    assert len(claims) == 1 and claims[0].challenge == "123456"
    await state.release("s1")
    await state.claim("s1", b"n" * 16, 102.0)
    await state.open(session("s2"), now=100.0, max_open=10)
    with pytest.raises(E.SessionExpired):
        await state.claim("s2", b"n" * 16, 160.0)


async def test_open_sessions_are_bounded(state) -> None:
    await state.open(session("a"), now=100.0, max_open=1)
    with pytest.raises(E.Overloaded):
        await state.open(session("b"), now=100.0, max_open=1)


async def test_failures_close_the_session_at_the_limit(state) -> None:
    await state.open(session(), now=100.0, max_open=10)
    with pytest.raises(E.UnknownSession):
        await state.count_failure("s1", b"x" * 16, 101.0, limit=3)  # another nonce: not this session
    assert [await state.count_failure("s1", b"n" * 16, 101.0, limit=3) for _ in range(3)] == [None, None, session()]
    with pytest.raises(E.SessionUsed):  # closed: counted no more
        await state.count_failure("s1", b"n" * 16, 101.0, limit=3)
    with pytest.raises(E.SessionUsed):
        await state.claim("s1", b"n" * 16, 101.0)
    await state.open(session("s2"), now=100.0, max_open=10)
    with pytest.raises(E.SessionExpired):
        await state.count_failure("s2", b"n" * 16, 160.0, limit=3)


async def test_a_result_is_kept_and_pushed_to_its_relying_party_only(state) -> None:
    s = session()
    await state.open(s, now=100.0, max_open=10)
    mine, my_inbox = trio.open_memory_channel(4)
    theirs, their_inbox = trio.open_memory_channel(4)
    state.subscribe("hotel", mine)
    state.subscribe("courier", theirs)
    await state.claim("s1", b"n" * 16, 101.0)
    with pytest.raises(E.ResultPending):
        await state.result("s1", "hotel")
    assert await state.finish(s, b"sealed", retain_until=700.0) == (1, 0)
    assert my_inbox.receive_nowait() == P.ResultMsg(session_id="s1", sealed=b"sealed")
    with pytest.raises(trio.WouldBlock):
        their_inbox.receive_nowait()
    assert await state.result("s1", "hotel") == b"sealed"
    with pytest.raises(E.UnknownSession):
        await state.result("s1", "courier")
    state.unsubscribe("hotel", mine)
    assert await state.finish(s, b"sealed", retain_until=700.0) == (0, 0)


@pytest.mark.parametrize("make", QUOTAS)
async def test_a_quota_refuses_past_its_minute_and_refills(make) -> None:
    q = make()
    for _ in range(3):
        await q.take("hotel", "open", 3, 0.0)
    with pytest.raises(E.RateLimited) as info:
        await q.take("hotel", "open", 3, 0.0)
    assert 0 < info.value.retry_after_ms <= 20_001
    await q.take("hotel", "fetch", 3, 0.0)  # another bucket
    await q.take("hotel", "open", 3, 20.0)  # one request back after 60/3 s


# ---- matching, through the store ----------------------------------------------------------------------
@pytest.fixture
def enrolled(tmp_path: Path):
    store = open_store(f"sqlite:///{tmp_path}/engine.db")
    sealer = TemplateSealer(TemplateCipher(bytes(32)))
    store.import_cards([CardRecord(card_number=c, name=c, photo_path=f"{c}.jpg", status="valid") for c in ("C1", "C2")],
                       actor="test", now=1.0)
    faces = np.stack([_identity_vector("FACE", "alice", 128)] * 2)
    voice = SpeakerEmbedding(_identity_vector("VOICE", "alice", 192), "narrow")
    templates = [("face", sealer.seal_face(f, "C1")) for f in faces] + [("voice", sealer.seal_voice(voice, "C1"))]
    cred, rows, _ = store.issue_credential(card_number="C1", device_key=bytes(32), templates=templates, actor="test", now=2.0)
    yield store, sealer, cred, rows
    store.close()


def test_one_to_one_reads_the_credentials_own_templates(enrolled) -> None:
    store, sealer, cred, _rows = enrolled
    matcher = StoreMatcher(store, sealer, FixedScores(), face_dim=128, voice_dim=192)
    alice_voice = SpeakerEmbedding(_identity_vector("VOICE", "alice", 192), "wide")
    alice = matcher.match(cred.credential_id, _identity_vector("FACE", "alice", 128), alice_voice)
    assert alice.decision.passed and alice.face == pytest.approx(1.0, abs=1e-5) and alice.enrolled_band == "narrow"
    bob = matcher.match(cred.credential_id, _identity_vector("FACE", "bob", 128), alice_voice)
    assert not bob.decision.passed
    with pytest.raises(E.UnknownCredential):
        matcher.match("nobody", _identity_vector("FACE", "alice", 128), alice_voice)
    store.report_card_lost("C1", actor="test", now=3.0)
    with pytest.raises(E.CredentialSuspended):
        matcher.match(cred.credential_id, _identity_vector("FACE", "alice", 128), alice_voice)


def test_the_duplicate_search_loads_from_the_store_and_finds_the_face(enrolled) -> None:
    store, sealer, cred, rows = enrolled
    search = FaissDuplicateSearch(store, sealer, dim=128, threshold=0.9)
    assert search.load() == 2  # the face templates only
    alice, bob = _identity_vector("FACE", "alice", 128)[None, :], _identity_vector("FACE", "bob", 128)[None, :]
    assert search.search(alice) == {cred.credential_id}
    assert search.search(bob) == set()
    # the index follows the store: a credential issued there is found, one suspended is not
    bob_cred, bob_rows, _ = store.issue_credential(
        card_number="C2", device_key=bytes([1]) * 32, templates=[("face", sealer.seal_face(bob[0], "C2"))], actor="test", now=3.0)
    search.add(bob_cred.credential_id, [r.template_id for r in bob_rows], bob)
    assert search.search(bob) == {bob_cred.credential_id}
    store.report_card_lost("C1", actor="test", now=4.0)
    search.remove_owner(cred.credential_id)
    assert search.search(alice) == set() and len(search) == 1
    assert NoDuplicateSearch().search(alice) == set()


def test_the_enrollment_lock_is_one_per_database_and_serialises(enrolled, tmp_path: Path) -> None:
    store = enrolled[0]
    again = open_store(tmp_path / "engine.db")
    other = open_store(tmp_path / "other.db")
    try:
        assert again.enrollment_lock() is store.enrollment_lock()
        assert other.enrollment_lock() is not store.enrollment_lock()
        inside: list[int] = []
        overlap = []

        def enroll(i: int) -> None:
            with store.enrollment_lock():
                overlap.append(len(inside))
                inside.append(i)
                time.sleep(0.01)
                inside.remove(i)

        threads = [threading.Thread(target=enroll, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert overlap == [0, 0, 0, 0]
    finally:
        again.close()
        other.close()
