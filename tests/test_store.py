"""The SQLite store: credential lifecycle, registries, audit, durability."""

from __future__ import annotations

import base64
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import errors
from engine.store import sqlite as sqlite_store_module
from engine.store.sqlite import SCHEMA_VERSION, SqliteStore
from engine.store import (
    AcceptancePoint,
    CardRecord,
    Credential,
    RelyingParty,
    Store,
    open_store,
)

SEED = 20240611
ROOT = Path(__file__).resolve().parent.parent


def card(number: str, status: str = "valid", photo_path: str | None = None, **kw) -> CardRecord:
    return CardRecord(
        card_number=number, name=f"Name {number}", photo_path=photo_path or f"/photos/{number}.jpg",
        status=status, **kw,
    )


def tpl(tag: str) -> list[tuple[str, bytes]]:
    return [("face", f"FACE-CIPHER-{tag}-1".encode()), ("face", f"FACE-CIPHER-{tag}-2".encode()),
            ("voice", f"VOICE-CIPHER-{tag}".encode())]


@pytest.fixture
def rng() -> random.Random:
    return random.Random(SEED)


@pytest.fixture
def key(rng: random.Random):
    return lambda: rng.randbytes(32)


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteStore(tmp_path / "engine.db")
    s.import_cards([card("C1"), card("C2"), card("C3", "revoked"), card("C4", "expired")], actor="op", now=1.0)
    yield s
    s.close()


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path)


# -- opening -------------------------------------------------------------------------------


def test_open_store_accepts_paths_and_sqlite_urls(tmp_path: Path, monkeypatch) -> None:
    s = open_store(tmp_path / "a.db")
    assert isinstance(s, SqliteStore) and isinstance(s, Store)
    s.close()
    s = open_store(f"sqlite:///{tmp_path}/b.db")  # absolute: four slashes in the result
    s.close()
    assert (tmp_path / "b.db").exists()
    monkeypatch.chdir(tmp_path)
    open_store("sqlite:///c.db").close()
    assert (tmp_path / "c.db").exists()


@pytest.mark.parametrize("url", ["redis://x", "mysql://u:p@h/d"])
def test_open_store_refuses_other_schemes(url: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        open_store(url)
    assert "sqlite" in str(exc.value) and url.split("://")[0] in str(exc.value)
    assert "hunter2" not in str(exc.value) and "@" not in str(exc.value)


@pytest.mark.parametrize("url", [":memory:", "sqlite:///:memory:", "", "sqlite://", "sqlite://x.db"])
def test_open_store_needs_a_file(url: str) -> None:
    with pytest.raises(errors.ConfigError):
        open_store(url)


def test_schema_pragmas_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "engine.db"
    s = SqliteStore(path)
    conn = s._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    s.close()
    with raw(path) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert (path.stat().st_mode & 0o777) == 0o600


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "engine.db"
    SqliteStore(path).close()
    with raw(path) as c:
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(errors.StoreError, match="99"):
        SqliteStore(path)


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(errors.StoreError):
        SqliteStore(path)


def test_locked_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "engine.db"
    s = SqliteStore(path, busy_timeout_ms=50)
    s.import_cards([card("C1")], actor="op", now=1.0)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(errors.StoreError):
            s.report_card_lost("C1", actor="op", now=2.0)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert s.get_card("C1").status == "valid"
    s.report_card_lost("C1", actor="op", now=2.0)  # works once the lock is gone
    s.close()


def test_connections_of_ended_threads_are_closed(store: SqliteStore) -> None:
    for _ in range(3):
        threads = [threading.Thread(target=store.get_card, args=("C1",)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    last = threading.Thread(target=store.get_card, args=("C1",))
    last.start()
    last.join(timeout=30)
    assert len(store._conns) == 2  # this thread's and the last thread's; the other 24 were closed


def test_closed_store_refuses_calls(store: SqliteStore) -> None:
    store.close()
    with pytest.raises(errors.StoreError):
        store.get_card("C1")
    store.close()  # idempotent


# -- ID-card registry --------------------------------------------------------------------------


def test_import_upserts_and_keeps_photo_template_only_for_the_same_photo(store: SqliteStore) -> None:
    store.set_card_photo_template("C1", b"PHOTO-CIPHER")
    assert store.get_card("C1").photo_template == b"PHOTO-CIPHER"
    n = store.import_cards([CardRecord(card_number="C1", name="Renamed", photo_path="/photos/C1.jpg",
                                       status="valid"), card("C9")], actor="op", now=5.0)
    assert n == 2
    c1 = store.get_card("C1")
    assert c1.name == "Renamed" and c1.photo_template == b"PHOTO-CIPHER" and c1.updated_at == 5.0
    store.import_cards([card("C1", photo_path="/photos/new.jpg")], actor="op", now=6.0)
    assert store.get_card("C1").photo_template is None
    assert store.get_card("C9").status == "valid"
    assert store.get_card("nope") is None
    with pytest.raises(errors.UnknownCard):
        store.set_card_photo_template("nope", b"x")


def test_import_is_one_transaction(store: SqliteStore) -> None:
    with pytest.raises(errors.InvalidMessage):
        store.import_cards([card("N1"), card("N2", status="stolen"), card("N3")], actor="op", now=2.0)
    assert store.get_card("N1") is None and store.get_card("N3") is None


def test_import_marking_a_card_lost_suspends_its_credentials(store: SqliteStore, key) -> None:
    cred, _, _ = store.issue_credential(card_number="C1", device_key=key(), templates=tpl("a"), actor="op", now=2.0)
    store.import_cards([card("C1", status="lost")], actor="op", now=3.0)
    assert store.get_credential(cred.credential_id).status == "suspended"
    assert list(store.active_templates()) == []


# -- issuing and re-applying ------------------------------------------------------------------------


def test_issue_credential(store: SqliteStore, key) -> None:
    k = key()
    cred, rows, voided = store.issue_credential(card_number="C1", device_key=k, templates=tpl("a"),
                                                actor="holder", now=10.0)
    assert voided == []
    assert (cred.card_number, cred.version, cred.level, cred.status) == ("C1", 1, "basic", "active")
    assert cred.device_key == k and cred.created_at == cred.updated_at == 10.0
    assert len(cred.credential_id) >= 20
    assert store.get_credential(cred.credential_id) == cred
    assert store.credential_by_device(k) == cred
    assert [r.modality for r in rows] == ["face", "face", "voice"]
    assert len({r.template_id for r in rows}) == 3
    assert store.templates_of(cred.credential_id) == rows
    assert list(store.active_templates("voice")) == [rows[2]]
    assert list(store.active_templates()) == rows
    assert store.count_credentials() == {"active": 1, "voided": 0, "suspended": 0}


def test_reapply_voids_earlier_credentials_and_deletes_their_templates(store: SqliteStore, key) -> None:
    k1, k2 = key(), key()
    first, first_rows, _ = store.issue_credential(card_number="C1", device_key=k1, templates=tpl("a"),
                                                  actor="holder", now=10.0)
    other, other_rows, _ = store.issue_credential(card_number="C2", device_key=key(), templates=tpl("o"),
                                                  actor="holder", now=10.0)
    second, rows, voided = store.issue_credential(card_number="C1", device_key=k2, templates=tpl("b"),
                                                  actor="holder", now=20.0)
    assert voided == [first.credential_id]
    assert second.version == 2 and second.status == "active"
    old = store.get_credential(first.credential_id)
    assert old.status == "voided" and old.updated_at == 20.0
    assert store.templates_of(first.credential_id) == []
    assert store.templates_of(other.credential_id) == other_rows  # other cards untouched
    assert {r.template_id for r in store.active_templates()} == {r.template_id for r in rows + other_rows}
    # template ids are never reused, so stale FAISS ids cannot alias new templates
    assert min(r.template_id for r in rows) > max(r.template_id for r in first_rows + other_rows)
    # the same phone may re-apply: its key moves to the new version
    third, _, voided = store.issue_credential(card_number="C1", device_key=k2, templates=tpl("c"),
                                              actor="holder", now=30.0)
    assert third.version == 3 and voided == [second.credential_id]
    assert store.credential_by_device(k2) == third
    # a key only found on voided credentials points at the newest of them
    assert store.credential_by_device(k1).credential_id == first.credential_id
    assert store.count_credentials() == {"active": 2, "voided": 2, "suspended": 0}


def test_reapply_rolls_back_entirely_when_the_transaction_fails(store: SqliteStore, key) -> None:
    first, rows, _ = store.issue_credential(card_number="C1", device_key=key(), templates=tpl("a"),
                                            actor="holder", now=10.0)
    # the audit row is written last; an invalid actor aborts after the void and the deletes
    with pytest.raises(errors.InvalidMessage):
        store.issue_credential(card_number="C1", device_key=key(), templates=tpl("b"), actor="x" * 1000, now=20.0)
    assert store.get_credential(first.credential_id).status == "active"
    assert store.templates_of(first.credential_id) == rows
    assert store.count_credentials()["active"] == 1


@pytest.mark.parametrize(("number", "error"), [("C3", errors.CardNotValid), ("C4", errors.CardNotValid),
                                               ("C404", errors.UnknownCard)])
def test_issue_refuses_cards_that_are_not_valid(store: SqliteStore, key, number: str, error) -> None:
    with pytest.raises(error):
        store.issue_credential(card_number=number, device_key=key(), templates=tpl("a"), actor="h", now=1.0)
    assert store.count_credentials() == {"active": 0, "voided": 0, "suspended": 0}


def test_issue_refuses_bad_arguments_and_keys_bound_elsewhere(store: SqliteStore, key) -> None:
    k = key()
    store.issue_credential(card_number="C1", device_key=k, templates=tpl("a"), actor="h", now=1.0)
    with pytest.raises(errors.Conflict):
        store.issue_credential(card_number="C2", device_key=k, templates=tpl("b"), actor="h", now=2.0)
    with pytest.raises(errors.InvalidMessage):
        store.issue_credential(card_number="C2", device_key=b"short", templates=tpl("b"), actor="h", now=2.0)
    with pytest.raises(errors.InvalidMessage):
        store.issue_credential(card_number="C2", device_key=key(), templates=[], actor="h", now=2.0)
    with pytest.raises(errors.InvalidMessage):
        store.issue_credential(card_number="C2", device_key=key(), templates=[("iris", b"x")], actor="h", now=2.0)
    assert store.count_credentials()["active"] == 1


# -- lost card -----------------------------------------------------------------------------------------


def test_lost_card_suspends_and_reissue_needs_new_enrollment(store: SqliteStore, key) -> None:
    k = key()
    cred, _, _ = store.issue_credential(card_number="C1", device_key=k, templates=tpl("a"), actor="h", now=1.0)
    other, _, _ = store.issue_credential(card_number="C2", device_key=key(), templates=tpl("b"), actor="h", now=1.0)
    assert store.report_card_lost("C1", actor="op", now=2.0) == [cred.credential_id]
    assert store.get_card("C1").status == "lost"
    assert store.get_credential(cred.credential_id).status == "suspended"
    assert store.get_credential(other.credential_id).status == "active"
    assert {r.credential_id for r in store.active_templates()} == {other.credential_id}
    assert store.report_card_lost("C1", actor="op", now=3.0) == []  # idempotent
    with pytest.raises(errors.CardLost):
        store.issue_credential(card_number="C1", device_key=key(), templates=tpl("c"), actor="h", now=4.0)
    with pytest.raises(errors.CredentialSuspended):
        store.rebind_device(cred.credential_id, expected_device_key=k, new_device_key=key(), actor="h", now=4.0)
    with pytest.raises(errors.CredentialSuspended):
        store.set_level(cred.credential_id, "high", actor="ap", now=4.0, attestation=b"att")

    store.reissue_card("C1", actor="op", now=5.0)
    assert store.get_card("C1").status == "valid"
    assert store.get_credential(cred.credential_id).status == "suspended"
    assert store.credential_by_device(k).status == "suspended"
    new, _, voided = store.issue_credential(card_number="C1", device_key=k, templates=tpl("d"), actor="h", now=6.0)
    assert voided == [cred.credential_id] and new.version == 2
    assert store.get_credential(cred.credential_id).status == "voided"
    with pytest.raises(errors.UnknownCard):
        store.report_card_lost("C404", actor="op", now=7.0)
    with pytest.raises(errors.UnknownCard):
        store.reissue_card("C404", actor="op", now=7.0)


# -- new phone -------------------------------------------------------------------------------------------


def test_rebind_is_compare_and_set(store: SqliteStore, key) -> None:
    old, new, other_new = key(), key(), key()
    cred, _, _ = store.issue_credential(card_number="C1", device_key=old, templates=tpl("a"), actor="h", now=1.0)
    assert store.retired_device(old) is None
    moved = store.rebind_device(cred.credential_id, expected_device_key=old, new_device_key=new,
                                actor="h", now=2.0)
    assert moved.device_key == new and moved.updated_at == 2.0 and moved.version == cred.version
    assert store.get_credential(cred.credential_id) == moved
    assert store.credential_by_device(new) == moved
    assert store.credential_by_device(old) is None
    assert store.retired_device(old) == cred.credential_id
    assert store.retired_device(new) is None
    # a second rebind from the same expected key lost the race
    with pytest.raises(errors.Conflict):
        store.rebind_device(cred.credential_id, expected_device_key=old, new_device_key=other_new,
                            actor="h", now=3.0)
    assert store.get_credential(cred.credential_id).device_key == new
    # templates and version are untouched by a rebind
    assert len(store.templates_of(cred.credential_id)) == 3
    # moving back to the old phone: the old key is bound again, no longer "retired"
    store.rebind_device(cred.credential_id, expected_device_key=new, new_device_key=old, actor="h", now=4.0)
    assert store.retired_device(old) is None
    assert store.retired_device(new) == cred.credential_id


def test_rebind_refusals(store: SqliteStore, key) -> None:
    k1, k2 = key(), key()
    c1, _, _ = store.issue_credential(card_number="C1", device_key=k1, templates=tpl("a"), actor="h", now=1.0)
    store.issue_credential(card_number="C2", device_key=k2, templates=tpl("b"), actor="h", now=1.0)
    with pytest.raises(errors.Conflict):  # the new key is bound to another credential
        store.rebind_device(c1.credential_id, expected_device_key=k1, new_device_key=k2, actor="h", now=2.0)
    with pytest.raises(errors.Conflict):  # already bound to this one
        store.rebind_device(c1.credential_id, expected_device_key=k1, new_device_key=k1, actor="h", now=2.0)
    with pytest.raises(errors.UnknownCredential):
        store.rebind_device("nope", expected_device_key=k1, new_device_key=key(), actor="h", now=2.0)
    with pytest.raises(errors.InvalidMessage):
        store.rebind_device(c1.credential_id, expected_device_key=k1, new_device_key=b"x" * 31, actor="h", now=2.0)
    store.issue_credential(card_number="C1", device_key=key(), templates=tpl("c"), actor="h", now=3.0)
    with pytest.raises(errors.CredentialVoided):
        store.rebind_device(c1.credential_id, expected_device_key=k1, new_device_key=key(), actor="h", now=4.0)
    assert store.retired_device(k1) is None


def test_concurrent_rebinds_one_wins(tmp_path: Path, rng: random.Random) -> None:
    store = SqliteStore(tmp_path / "engine.db")
    store.import_cards([card("C1")], actor="op", now=1.0)
    old = rng.randbytes(32)
    cred, _, _ = store.issue_credential(card_number="C1", device_key=old, templates=tpl("a"), actor="h", now=1.0)
    for round_ in range(8):
        current = store.get_credential(cred.credential_id).device_key
        candidates = [rng.randbytes(32), rng.randbytes(32)]
        barrier = threading.Barrier(2)
        outcomes: list[object] = [None, None]

        def attempt(i: int) -> None:
            barrier.wait()
            try:
                outcomes[i] = store.rebind_device(cred.credential_id, expected_device_key=current,
                                                  new_device_key=candidates[i], actor=f"h{i}", now=2.0 + round_)
            except errors.EngineError as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        wins = [o for o in outcomes if isinstance(o, Credential)]
        losses = [o for o in outcomes if isinstance(o, errors.Conflict)]
        assert len(wins) == 1 and len(losses) == 1, outcomes
        assert store.get_credential(cred.credential_id).device_key == wins[0].device_key
        assert store.retired_device(current) == cred.credential_id
    rebinds = [e for e in store.audit_log(limit=1000) if e.action == "device.rebind"]
    assert len(rebinds) == 8
    store.close()


def test_concurrent_issues_keep_versions_contiguous(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "engine.db")
    store.import_cards([card("C1")], actor="op", now=1.0)

    def enroll(worker: int) -> None:
        r = random.Random(SEED + worker)
        for i in range(5):
            store.issue_credential(card_number="C1", device_key=r.randbytes(32), templates=tpl(f"{worker}-{i}"),
                                   actor="h", now=float(i))

    threads = [threading.Thread(target=enroll, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    conn = store._conn()
    versions = [v for (v,) in conn.execute("SELECT version FROM credentials ORDER BY version")]
    assert versions == list(range(1, 21))
    assert store.count_credentials() == {"active": 1, "voided": 19, "suspended": 0}
    (live,) = {r.credential_id for r in store.active_templates()}
    assert store.get_credential(live).version == 20
    store.close()


# -- level ---------------------------------------------------------------------------------------------


def test_set_level_keeps_the_attestation(tmp_path: Path, key) -> None:
    path = tmp_path / "engine.db"
    store = SqliteStore(path)
    store.import_cards([card("C1")], actor="op", now=1.0)
    cred, _, _ = store.issue_credential(card_number="C1", device_key=key(), templates=tpl("a"), actor="h", now=1.0)
    high = store.set_level(cred.credential_id, "high", actor="ap:counter-1", now=5.0, attestation=b"SIGNED-ATTEST")
    assert high.level == "high" and high.updated_at == 5.0
    assert store.get_credential(cred.credential_id) == high
    with raw(path) as c:
        assert c.execute("SELECT credential_id, level, attestation, actor FROM attestations").fetchall() == [
            (cred.credential_id, "high", b"SIGNED-ATTEST", "ap:counter-1")]
    entry = store.audit_log(subject=cred.credential_id)[-1]
    assert (entry.action, entry.actor, entry.detail["from"], entry.detail["to"]) == (
        "credential.level", "ap:counter-1", "basic", "high")
    with pytest.raises(errors.InvalidMessage):
        store.set_level(cred.credential_id, "ultra", actor="ap", now=6.0, attestation=b"a")
    with pytest.raises(errors.InvalidMessage):
        store.set_level(cred.credential_id, "high", actor="ap", now=6.0, attestation=b"")
    with pytest.raises(errors.UnknownCredential):
        store.set_level("nope", "high", actor="ap", now=6.0, attestation=b"a")
    # a re-application starts again at basic
    again, _, _ = store.issue_credential(card_number="C1", device_key=key(), templates=tpl("b"), actor="h", now=7.0)
    assert again.level == "basic"
    with pytest.raises(errors.CredentialVoided):
        store.set_level(cred.credential_id, "high", actor="ap", now=8.0, attestation=b"a")
    store.close()


# -- relying parties and acceptance points ----------------------------------------------------------


def test_relying_parties(store: SqliteStore, key) -> None:
    rp = RelyingParty(rp_id="hotel", display_name="Hotel", sign_key=key(), box_key=key(), max_level="basic",
                      quota_per_minute=60, status="active", created_at=3.0)
    store.add_relying_party(rp, actor="op")
    assert store.get_relying_party("hotel") == rp
    assert store.get_relying_party("bank") is None
    with pytest.raises(errors.Conflict):
        store.add_relying_party(rp, actor="op")
    bank = RelyingParty(rp_id="bank", display_name="Bank", sign_key=key(), box_key=key(), max_level="high",
                        quota_per_minute=600, status="active", created_at=4.0)
    store.add_relying_party(bank, actor="op")
    assert store.list_relying_parties() == [bank, rp]
    disabled = store.set_relying_party_status("hotel", "disabled", actor="op", now=5.0)
    assert disabled.status == "disabled" and store.get_relying_party("hotel") == disabled
    with pytest.raises(errors.UnknownRelyingParty):
        store.set_relying_party_status("nope", "disabled", actor="op")
    with pytest.raises(errors.InvalidMessage):
        store.set_relying_party_status("hotel", "paused", actor="op")
    with pytest.raises(errors.InvalidMessage):
        store.add_relying_party(RelyingParty(rp_id="x", display_name="X", sign_key=b"k", box_key=key(),
                                             max_level="basic", quota_per_minute=1, status="active",
                                             created_at=1.0), actor="op")
    with pytest.raises(errors.InvalidMessage):
        store.add_relying_party(RelyingParty(rp_id="x", display_name="X", sign_key=key(), box_key=key(),
                                             max_level="basic", quota_per_minute=0, status="active",
                                             created_at=1.0), actor="op")
    actions = [(e.action, e.subject) for e in store.audit_log(limit=1000) if e.action.startswith("rp.")]
    assert actions == [("rp.add", "hotel"), ("rp.add", "bank"), ("rp.status", "hotel")]


def test_acceptance_points(store: SqliteStore, key) -> None:
    ap = AcceptancePoint(ap_id="counter-1", name="Counter 1", sign_key=key(), status="active", created_at=2.0)
    store.add_acceptance_point(ap, actor="op")
    assert store.get_acceptance_point("counter-1") == ap
    assert store.list_acceptance_points() == [ap]
    assert store.get_acceptance_point("nope") is None
    with pytest.raises(errors.Conflict):
        store.add_acceptance_point(ap, actor="op")
    assert store.set_acceptance_point_status("counter-1", "disabled", actor="op").status == "disabled"
    assert store.get_acceptance_point("counter-1").status == "disabled"
    with pytest.raises(errors.UnknownAcceptancePoint):
        store.set_acceptance_point_status("nope", "active", actor="op")


# -- audit -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("detail", [
    {"template": b"\x00\x01"}, {"emb": bytearray(b"x")}, {"emb": memoryview(b"x")}, {"nested": {"a": 1}},
    {"list": [1, 2]}, {"score": float("nan")}, {"flag": True}, {"long": "x" * 1000}, {"": 1}, {1: "a"},
    {f"k{i}": i for i in range(100)}, {"big": 2**70},
])
def test_audit_refuses_bytes_and_structures(store: SqliteStore, detail) -> None:
    before = len(store.audit_log(limit=10_000))
    with pytest.raises(errors.InvalidMessage):
        store.audit(actor="op", action="x", subject="s", outcome="ok", detail=detail, now=1.0)
    assert len(store.audit_log(limit=10_000)) == before


@pytest.fixture(scope="module")
def audit_store(tmp_path_factory):
    store = SqliteStore(tmp_path_factory.mktemp("audit") / "engine.db")
    yield store
    store.close()


@settings(max_examples=60, deadline=None)
@given(detail=st.dictionaries(
    st.text(min_size=1, max_size=20),
    st.one_of(st.text(max_size=50), st.integers(-(2**63), 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False)),
    max_size=8,
))
def test_audit_detail_round_trips(audit_store: SqliteStore, detail) -> None:
    last = audit_store.audit_log(limit=10**6)
    since = last[-1].seq if last else 0
    audit_store.audit(actor="op", action="verify", subject="sess", outcome="pass", detail=detail, now=12.5)
    (entry,) = audit_store.audit_log(since_seq=since)
    assert entry.detail == detail and entry.ts == 12.5 and entry.outcome == "pass"


def test_audit_log_is_append_only_and_filterable(tmp_path: Path) -> None:
    path = tmp_path / "engine.db"
    store = SqliteStore(path)
    for i in range(10):
        store.audit(actor="op", action="verify", subject=f"s{i % 3}", outcome="ok", detail={"i": i}, now=float(i))
    log = store.audit_log()
    assert [e.seq for e in log] == sorted(e.seq for e in log) and len(log) == 10
    assert [e.detail["i"] for e in store.audit_log(subject="s1")] == [1, 4, 7]
    assert [e.detail["i"] for e in store.audit_log(since_seq=log[6].seq)] == [7, 8, 9]
    assert [e.detail["i"] for e in store.audit_log(limit=2)] == [0, 1]
    assert store.audit_log(limit=0) == []
    store.close()
    with raw(path) as c:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            c.execute("UPDATE audit SET outcome = 'forged'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            c.execute("DELETE FROM audit")


def test_audit_never_holds_biometric_or_key_bytes(tmp_path: Path, key) -> None:
    path = tmp_path / "engine.db"
    store = SqliteStore(path)
    store.import_cards([card("C1"), card("C2")], actor="op", now=1.0)
    store.set_card_photo_template("C1", b"PHOTO-CIPHER-SECRET")
    keys = [key() for _ in range(4)]
    c1, _, _ = store.issue_credential(card_number="C1", device_key=keys[0], templates=tpl("a"), actor="h", now=2.0)
    store.rebind_device(c1.credential_id, expected_device_key=keys[0], new_device_key=keys[1], actor="h", now=3.0)
    store.set_level(c1.credential_id, "high", actor="ap", now=4.0, attestation=b"ATTESTATION-BYTES")
    store.issue_credential(card_number="C1", device_key=keys[2], templates=tpl("b"), actor="h", now=5.0)
    store.issue_credential(card_number="C2", device_key=keys[3], templates=tpl("c"), actor="h", now=5.0)
    store.report_card_lost("C2", actor="op", now=6.0)
    store.reissue_card("C2", actor="op", now=7.0)
    store.close()
    with raw(path) as c:
        rows = c.execute("SELECT * FROM audit").fetchall()
        types = {t for (t,) in c.execute(
            "SELECT DISTINCT typeof(actor) || typeof(action) || typeof(subject) || typeof(outcome) ||"
            " typeof(detail) FROM audit")}
    assert len(rows) >= 10
    assert types == {"texttexttexttexttext"}
    dump = repr(rows)
    secrets_ = [b"CIPHER", b"PHOTO", b"ATTESTATION"] + keys
    for s in secrets_:
        for form in (s.decode("latin-1"), s.hex(), base64.b64encode(s).decode()):
            assert form not in dump
    # every lifecycle transition left its entry
    actions = [r[3] for r in rows]
    for action in ("registry.import", "credential.issue", "device.rebind", "credential.level",
                   "credential.void", "card.lost", "credential.suspend", "card.reissue"):
        assert action in actions


# -- durability ----------------------------------------------------------------------------------------------


def test_reopening_keeps_everything(tmp_path: Path, key) -> None:
    path = tmp_path / "engine.db"
    store = SqliteStore(path)
    store.import_cards([card("C1"), card("C2")], actor="op", now=1.0)
    c1, rows1, _ = store.issue_credential(card_number="C1", device_key=key(), templates=tpl("a"), actor="h", now=2.0)
    old = c1.device_key
    c1 = store.rebind_device(c1.credential_id, expected_device_key=old, new_device_key=key(), actor="h", now=3.0)
    c1 = store.set_level(c1.credential_id, "high", actor="ap", now=4.0, attestation=b"a")
    c2, rows2, _ = store.issue_credential(card_number="C2", device_key=key(), templates=tpl("b"), actor="h", now=5.0)
    store.report_card_lost("C2", actor="op", now=6.0)
    rp = RelyingParty(rp_id="rp", display_name="RP", sign_key=key(), box_key=key(), max_level="high",
                      quota_per_minute=10, status="active", created_at=7.0)
    store.add_relying_party(rp, actor="op")
    ap = AcceptancePoint(ap_id="ap", name="AP", sign_key=key(), status="active", created_at=8.0)
    store.add_acceptance_point(ap, actor="op")
    log = store.audit_log(limit=1000)
    store.close()

    again = open_store(f"sqlite:///{path}")
    assert again.get_credential(c1.credential_id) == c1
    assert again.get_credential(c2.credential_id).status == "suspended"
    assert again.templates_of(c1.credential_id) == rows1 and again.templates_of(c2.credential_id) == rows2
    assert list(again.active_templates()) == rows1
    assert again.retired_device(old) == c1.credential_id
    assert again.get_card("C2").status == "lost"
    assert again.get_relying_party("rp") == rp and again.get_acceptance_point("ap") == ap
    assert again.audit_log(limit=1000) == log
    assert again.count_credentials() == {"active": 1, "voided": 0, "suspended": 1}
    again.close()


def test_active_templates_pages_through_everything(store: SqliteStore, key, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_store_module, "_TEMPLATE_PAGE", 2)
    made = []
    for number in ("C1", "C2"):
        _, rows, _ = store.issue_credential(card_number=number, device_key=key(), templates=tpl(number),
                                            actor="h", now=1.0)
        made += rows
    assert list(store.active_templates()) == made
    assert list(store.active_templates("face")) == [r for r in made if r.modality == "face"]
    with pytest.raises(errors.InvalidMessage):
        list(store.active_templates("iris"))


CRASH_WORKER = textwrap.dedent(
    """
    import random, sqlite3, sys
    from engine.store import CardRecord, open_store

    path, seed, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = random.Random(seed)
    store = open_store(path)
    cards = [f"K{i}" for i in range(5)]
    missing = [c for c in cards if store.get_card(c) is None]
    if missing:
        store.import_cards([CardRecord(card_number=c, name="N", photo_path="p", status="valid")
                            for c in missing], actor="op")
    peek = sqlite3.connect(path)
    log = open(log_path, "a", buffering=1)
    log.write("ready\\n")
    n = 0
    while True:
        n += 1
        number = rng.choice(cards)
        status = store.get_card(number).status
        op = rng.random()
        if status == "lost":
            store.reissue_card(number, actor="op", now=n)
            continue
        if op < 0.05:
            store.report_card_lost(number, actor="op", now=n)
            continue
        live = peek.execute("SELECT credential_id, device_key FROM credentials"
                            " WHERE card_number = ? AND status = 'active'", (number,)).fetchone()
        if op < 0.5 or live is None:
            tag = f"{seed}-{n}".encode()
            cred, _, _ = store.issue_credential(
                card_number=number, device_key=rng.randbytes(32),
                templates=[("face", b"f1" + tag), ("face", b"f2" + tag), ("voice", b"v" + tag)],
                actor="holder", now=n)
            log.write(f"issue {cred.credential_id}\\n")
        else:
            new = rng.randbytes(32)
            store.rebind_device(live[0], expected_device_key=live[1], new_device_key=new,
                                actor="holder", now=n)
            log.write(f"rebind {live[0]} {new.hex()}\\n")
    """
)


def check_consistent(path: Path, committed: list[str]) -> dict[str, int]:
    store = open_store(path)  # reopening recovers the WAL
    c = sqlite3.connect(path)
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("PRAGMA foreign_key_check").fetchall() == []
        creds = c.execute("SELECT credential_id, card_number, version, status, device_key FROM credentials").fetchall()
        cards = dict(c.execute("SELECT card_number, status FROM cards").fetchall())
        tcount = dict(c.execute("SELECT credential_id, COUNT(*) FROM templates GROUP BY credential_id").fetchall())
        audit = {}
        for action, subject, n in c.execute("SELECT action, subject, COUNT(*) FROM audit GROUP BY action, subject"):
            audit[(action, subject)] = n
        retired = dict(c.execute("SELECT credential_id, COUNT(*) FROM retired_devices GROUP BY credential_id"))
        by_card: dict[str, list[tuple]] = {}
        for row in creds:
            by_card.setdefault(row[1], []).append(row)
        for number, rows in by_card.items():
            rows.sort(key=lambda r: r[2])
            assert [r[2] for r in rows] == list(range(1, len(rows) + 1)), "versions must be contiguous"
            live = [r for r in rows if r[3] != "voided"]
            assert len(live) <= 1, "at most one live credential per card"
            if live:
                assert live[0][2] == len(rows), "the live credential is the newest version"
                if live[0][3] == "active":
                    assert cards[number] == "valid", "no active credential on a card that is not valid"
        for cid, _, _, status, _ in creds:
            expected = 0 if status == "voided" else 3
            assert tcount.get(cid, 0) == expected, f"templates of a {status} credential"
            assert audit.get(("credential.issue", cid)) == 1
            assert audit.get(("credential.void", cid), 0) == (1 if status == "voided" else 0)
            assert audit.get(("device.rebind", cid), 0) == retired.get(cid, 0)
            if status == "suspended":
                assert audit.get(("credential.suspend", cid), 0) >= 1
        keys = [r[4] for r in creds if r[3] != "voided"]
        assert len(keys) == len(set(keys)), "a device key is bound once"
        active = {r[0] for r in creds if r[3] == "active"}
        assert sum(1 for _ in store.active_templates()) == 3 * len(active)
        # everything the worker saw committed is there
        ids = {r[0] for r in creds}
        for line in committed:
            parts = line.split()
            assert parts[1] in ids
            if parts[0] == "rebind":
                key = bytes.fromhex(parts[2])
                assert c.execute("SELECT 1 FROM credentials WHERE credential_id = ? AND device_key = ? UNION ALL"
                                 " SELECT 1 FROM retired_devices WHERE credential_id = ? AND device_key = ?",
                                 (parts[1], key, parts[1], key)).fetchone()
        return {s: sum(1 for r in creds if r[3] == s) for s in ("active", "suspended", "voided")}
    finally:
        c.close()
        store.close()


@pytest.mark.slow
def test_sigkill_in_the_middle_of_transitions_leaves_consistent_state(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    path = tmp_path / "engine.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    committed_total = 0
    for run in range(6):
        log_path = tmp_path / f"run{run}.log"
        log_path.touch()
        proc = subprocess.Popen([sys.executable, "-c", CRASH_WORKER, str(path), str(SEED + run), str(log_path)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not log_path.read_text().startswith("ready") and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.01)
            time.sleep(rng.uniform(0.1, 0.5))
            assert proc.poll() is None, f"worker died on its own (seed {SEED + run}): {proc.stderr.read().decode()}"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        text = log_path.read_text()
        lines = [ln for ln in text.split("\n")[1:-1] if ln]  # the last line may be cut off
        committed_total += len(lines)
        counts = check_consistent(path, lines)
        assert counts["active"] + counts["suspended"] <= 5, f"seed {SEED + run}"
    assert committed_total >= 20, "the worker should have made progress before the kills"
