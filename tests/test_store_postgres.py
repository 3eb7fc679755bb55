"""The PostgreSQL store: the ``Store`` contract, and what is PostgreSQL's own.

The contract tests of ``test_store`` (those on its ``store`` and ``audit_store`` fixtures) and
of ``test_lifecycle`` (those on its ``env`` fixture) run here again, on a schema of their own
in the test database (``postgres_url`` in conftest.py: skipped when PostgreSQL is unreachable,
failed instead under ``NETID_REQUIRE_SERVICES=1``). Below them: the URL and schema selection,
migrations, the append-only audit log, transitions racing from two nodes, the enrollment lock
across nodes, and failures (a crash inside a transition, a connection killed mid-transaction,
the database unreachable and back).
"""

from __future__ import annotations

import base64
import functools
import inspect
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg
import pytest

from engine import errors
from engine.app import build_engine
from engine.store import AcceptancePoint, Credential, RelyingParty, Store, open_store
from engine.store import postgres as postgres_module
from engine.store.postgres import SCHEMA_VERSION, PostgresStore

from . import test_lifecycle, test_store
from .conftest import POSTGRES_URL
from .test_store import SEED, card, key, rng, tpl  # noqa: F401 (fixtures the contract tests use)

ROOT = Path(__file__).resolve().parent.parent

# -- the contract, again on PostgreSQL ------------------------------------------------------------------
#: Tests of SQLite's own machinery (its per-thread connections, its module's page size).
SQLITE_ONLY = {"test_connections_of_ended_threads_are_closed", "test_active_templates_pages_through_everything"}
#: Lifecycle tests that open the SQLite file itself.
SQLITE_FILE = {"test_audit_records_every_transition_and_outcome_without_biometrics"}


def _contract(module, fixtures: set[str], skip: set[str]) -> dict[str, object]:
    return {
        name: fn for name, fn in vars(module).items()
        if name.startswith("test_") and callable(fn) and name not in skip
        and fixtures & set(inspect.signature(fn).parameters)
    }


CONTRACT = _contract(test_store, {"store", "audit_store"}, SQLITE_ONLY) | _contract(test_lifecycle, {"env"}, SQLITE_FILE)
globals().update(CONTRACT)


@pytest.fixture
def store(postgres_url: str):
    s = PostgresStore(postgres_url)  # seeded as test_store's fixture is
    s.import_cards([card("C1"), card("C2"), card("C3", "revoked"), card("C4", "expired")], actor="op", now=1.0)
    yield s
    s.close()


@pytest.fixture(scope="module")
def audit_store(postgres_schemas):
    s = PostgresStore(postgres_schemas.url())
    yield s
    s.close()


@pytest.fixture
async def env(tmp_path, nursery, postgres_url: str, monkeypatch):
    """test_lifecycle's engine on loopback, with its store on PostgreSQL, and its operator
    commands (``netid card lost … --data DIR``) on the same store (``--store URL``)."""
    pg = PostgresStore(postgres_url)
    monkeypatch.setattr(test_lifecycle, "build_engine", functools.partial(build_engine, store=pg))
    operator = test_lifecycle.cli
    monkeypatch.setattr(test_lifecycle, "cli", lambda *argv: operator(*argv, "--store", postgres_url))
    try:
        async with test_lifecycle.engine_env(tmp_path, nursery) as e:
            yield e
    finally:
        pg.close()


def test_the_contract_is_not_empty() -> None:
    assert len(CONTRACT) >= 30, sorted(CONTRACT)


# -- helpers -----------------------------------------------------------------------------------------------
def schema_of(url: str) -> str:
    return url.rsplit("schema=", 1)[1]


def admin(url: str) -> psycopg.Connection:
    """A plain connection on the store's schema, as an operator with psql would have."""
    conn = psycopg.connect(POSTGRES_URL, autocommit=True)
    conn.execute(f'SET search_path TO "{schema_of(url)}"')
    return conn


def run_threads(target, n: int, timeout: float = 60.0) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- opening: URL, schema, migrations ------------------------------------------------------------------------
def test_open_store_dispatches_postgresql_urls_to_their_schema(postgres_url: str) -> None:
    s = open_store(postgres_url)
    assert isinstance(s, PostgresStore) and isinstance(s, Store)
    assert s.schema == schema_of(postgres_url)
    s.close()
    s.close()  # idempotent
    with pytest.raises(errors.StoreError, match="closed"):
        s.get_card("C1")
    with admin(postgres_url) as c:
        tables = {r[0] for r in c.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (s.schema,))}
        assert {"schema_version", "cards", "credentials", "templates", "retired_devices", "attestations",
                "relying_parties", "acceptance_points", "audit", "template_log", "meta"} == tables
        public = c.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
                           " AND table_name = 'credentials'").fetchone()[0]
    assert public == 0  # nothing outside the chosen schema
    postgres_url = postgres_url.replace("postgresql://", "postgres://", 1)
    open_store(postgres_url).close()


@pytest.mark.parametrize("url", [
    "postgresql://u:hunter2@h/db?schema=Bad-Name", "postgresql://u:hunter2@h/db?schema=a&schema=b",
    "postgresql:///db", "postgresql://u:hunter2@h/db?schema=" + "x" * 64, "postgresql://u:hunter2@h/db?no_such_parameter=1",
])
def test_malformed_urls_are_config_errors_without_the_password(url: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        PostgresStore(url)
    assert "hunter2" not in str(exc.value)


def test_unreachable_database_is_unavailable_with_a_retry_hint() -> None:
    started = time.monotonic()
    with pytest.raises(errors.StoreUnavailable) as exc:
        open_store(f"postgresql://netid:hunter2@127.0.0.1:{free_port()}/test?schema=x")
    assert exc.value.code == "unavailable" and exc.value.retry_after_ms == 1000
    assert isinstance(exc.value, errors.StoreError) and isinstance(exc.value, errors.Unavailable)
    assert "hunter2" not in str(exc.value) and time.monotonic() - started < 10


def test_migrations_are_versioned_idempotent_and_safe_at_concurrent_start_up(postgres_url: str) -> None:
    stores: list[PostgresStore] = []
    barrier = threading.Barrier(4)

    def start(i: int) -> None:
        barrier.wait()
        stores.append(PostgresStore(postgres_url))

    run_threads(start, 4)
    assert len(stores) == 4
    stores[0].import_cards([card("C1")], actor="op", now=1.0)
    for s in stores:
        s.close()
    PostgresStore(postgres_url).close()  # again: nothing to do
    with admin(postgres_url) as c:
        assert [r[0] for r in c.execute("SELECT version FROM schema_version ORDER BY version")] == [1, SCHEMA_VERSION] == [1, 2]
        assert c.execute("SELECT count(*) FROM cards").fetchone()[0] == 1
        c.execute("INSERT INTO schema_version(version) VALUES (99)")
    with pytest.raises(errors.StoreError, match="99"):
        PostgresStore(postgres_url)


def test_bytes_are_bytea_and_row_ids_come_from_identity_columns(postgres_url: str) -> None:
    PostgresStore(postgres_url).close()
    with admin(postgres_url) as c:
        types = {(t, col): (dtype, ident) for t, col, dtype, ident in c.execute(
            "SELECT table_name, column_name, data_type, is_identity FROM information_schema.columns"
            " WHERE table_schema = %s", (schema_of(postgres_url),))}
    for table, col in [("cards", "photo_template"), ("credentials", "device_key"), ("templates", "ciphertext"),
                       ("retired_devices", "device_key"), ("attestations", "attestation"),
                       ("relying_parties", "sign_key"), ("relying_parties", "box_key"), ("acceptance_points", "sign_key")]:
        assert types[table, col][0] == "bytea", (table, col)
    for table, col in [("templates", "template_id"), ("audit", "seq"), ("credentials", "seq")]:
        assert types[table, col] == ("bigint", "YES"), (table, col)


def test_template_ids_are_never_reused_across_nodes(postgres_url: str, key) -> None:
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url)
    a.import_cards([card("C1"), card("C2")], actor="op", now=1.0)
    seen: list[int] = []
    for i, s in enumerate([a, b, a, b]):
        _, rows, _ = s.issue_credential(card_number="C1", device_key=key(), templates=tpl(str(i)), actor="h", now=1.0 + i)
        seen += [r.template_id for r in rows]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert {r.template_id for r in b.active_templates()} == set(seen[-3:])
    a.close()
    b.close()


def test_active_templates_pages_through_everything(store: PostgresStore, key, monkeypatch) -> None:
    monkeypatch.setattr(postgres_module, "_TEMPLATE_PAGE", 2)
    made = []
    for number in ("C1", "C2"):
        made += store.issue_credential(card_number=number, device_key=key(), templates=tpl(number), actor="h", now=1.0)[1]
    assert list(store.active_templates()) == made
    assert list(store.active_templates("face")) == [r for r in made if r.modality == "face"]


# -- what test_store checks on the SQLite file, here on the schema ------------------------------------------------
def test_set_level_keeps_the_attestation(store: PostgresStore, postgres_url: str, key) -> None:
    cred, _, _ = store.issue_credential(card_number="C1", device_key=key(), templates=tpl("a"), actor="h", now=1.0)
    store.set_level(cred.credential_id, "high", actor="ap:counter-1", now=5.0, attestation=b"SIGNED-ATTEST")
    with admin(postgres_url) as c:
        assert c.execute("SELECT credential_id, level, attestation, actor FROM attestations").fetchall() == [
            (cred.credential_id, "high", b"SIGNED-ATTEST", "ap:counter-1")]
    assert store.audit_log(subject=cred.credential_id)[-1].detail["to"] == "high"


def test_audit_log_is_append_only_even_for_the_owner(store: PostgresStore, postgres_url: str) -> None:
    store.audit(actor="op", action="verify", subject="s", outcome="ok", detail={"i": 1}, now=1.0)
    before = store.audit_log(limit=1000)
    with admin(postgres_url) as c:  # the test connects as a superuser
        for statement in ("UPDATE audit SET outcome = 'forged'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(psycopg.Error, match="append-only"):
                c.execute(statement)
    assert store.audit_log(limit=1000) == before


def test_audit_never_holds_biometric_or_key_bytes(store: PostgresStore, postgres_url: str, key) -> None:
    store.set_card_photo_template("C1", b"PHOTO-CIPHER-SECRET")
    keys = [key() for _ in range(4)]
    c1, _, _ = store.issue_credential(card_number="C1", device_key=keys[0], templates=tpl("a"), actor="h", now=2.0)
    store.rebind_device(c1.credential_id, expected_device_key=keys[0], new_device_key=keys[1], actor="h", now=3.0)
    store.set_level(c1.credential_id, "high", actor="ap", now=4.0, attestation=b"ATTESTATION-BYTES")
    store.issue_credential(card_number="C1", device_key=keys[2], templates=tpl("b"), actor="h", now=5.0)
    store.issue_credential(card_number="C2", device_key=keys[3], templates=tpl("c"), actor="h", now=5.0)
    store.report_card_lost("C2", actor="op", now=6.0)
    store.reissue_card("C2", actor="op", now=7.0)
    with admin(postgres_url) as c:
        rows = c.execute("SELECT ts, actor, action, subject, outcome, detail FROM audit").fetchall()
        types = {r for r in c.execute("SELECT column_name, data_type FROM information_schema.columns"
                                      " WHERE table_schema = %s AND table_name = 'audit'", (store.schema,))}
    assert types == {("seq", "bigint"), ("ts", "double precision")} | {
        (col, "text") for col in ("actor", "action", "subject", "outcome", "detail")}
    dump = repr(rows)
    for s in [b"CIPHER", b"PHOTO", b"ATTESTATION"] + keys:
        for form in (s.decode("latin-1"), s.hex(), base64.b64encode(s).decode()):
            assert form not in dump
    actions = {r[2] for r in rows}
    assert {"registry.import", "credential.issue", "device.rebind", "credential.level", "credential.void",
            "card.lost", "credential.suspend", "card.reissue"} <= actions


def test_another_node_sees_everything(store: PostgresStore, postgres_url: str, key) -> None:
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
    other = open_store(postgres_url)
    assert other.get_credential(c1.credential_id) == c1
    assert other.credential_with_templates(c2.credential_id) == (store.get_credential(c2.credential_id), rows2)
    assert list(other.active_templates()) == rows1
    assert other.retired_device(old) == c1.credential_id
    assert other.get_card("C2").status == "lost"
    assert other.get_relying_party("rp") == rp and other.get_acceptance_point("ap") == ap
    assert other.audit_log(limit=1000) == store.audit_log(limit=1000)
    assert other.count_credentials() == {"active": 1, "voided": 0, "suspended": 1}
    other.close()


# -- two nodes racing ----------------------------------------------------------------------------------------------
def test_concurrent_rebinds_on_two_nodes_one_wins(postgres_url: str, rng: random.Random) -> None:
    nodes = [PostgresStore(postgres_url), PostgresStore(postgres_url)]
    nodes[0].import_cards([card("C1")], actor="op", now=1.0)
    cred, _, _ = nodes[0].issue_credential(card_number="C1", device_key=rng.randbytes(32), templates=tpl("a"),
                                           actor="h", now=1.0)
    for round_ in range(8):
        current = nodes[1].get_credential(cred.credential_id).device_key
        candidates = [rng.randbytes(32), rng.randbytes(32)]
        barrier = threading.Barrier(2)
        outcomes: list[object] = [None, None]

        def attempt(i: int) -> None:
            barrier.wait()
            try:
                outcomes[i] = nodes[i].rebind_device(cred.credential_id, expected_device_key=current,
                                                     new_device_key=candidates[i], actor=f"h{i}", now=2.0 + round_)
            except errors.EngineError as exc:
                outcomes[i] = exc

        run_threads(attempt, 2)
        wins = [o for o in outcomes if isinstance(o, Credential)]
        assert len(wins) == 1 and sum(isinstance(o, errors.Conflict) for o in outcomes) == 1, outcomes
        assert nodes[0].get_credential(cred.credential_id).device_key == wins[0].device_key
        assert nodes[1].retired_device(current) == cred.credential_id
    assert len([e for e in nodes[0].audit_log(limit=1000) if e.action == "device.rebind"]) == 8
    for n in nodes:
        n.close()


def test_concurrent_issues_on_two_nodes_keep_versions_contiguous(postgres_url: str) -> None:
    nodes = [PostgresStore(postgres_url), PostgresStore(postgres_url)]
    nodes[0].import_cards([card("C1")], actor="op", now=1.0)

    def enroll(worker: int) -> None:
        r = random.Random(SEED + worker)
        for i in range(5):
            nodes[worker % 2].issue_credential(card_number="C1", device_key=r.randbytes(32),
                                               templates=tpl(f"{worker}-{i}"), actor="h", now=float(i))

    run_threads(enroll, 4)
    with admin(postgres_url) as c:
        versions = [v for (v,) in c.execute("SELECT version FROM credentials ORDER BY version")]
    assert versions == list(range(1, 21))
    assert nodes[1].count_credentials() == {"active": 1, "voided": 19, "suspended": 0}
    (live,) = {r.credential_id for r in nodes[0].active_templates()}
    assert nodes[1].get_credential(live).version == 20
    for n in nodes:
        n.close()


# -- the enrollment lock ---------------------------------------------------------------------------------------------
def waiting_for_advisory_locks(url: str) -> int:
    with admin(url) as c:
        return c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0]


def test_enrollment_lock_serialises_two_nodes(postgres_url: str) -> None:
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url)
    events: list[str] = []
    b_done = threading.Event()

    def node_b() -> None:
        with b.enrollment_lock():
            events.append("b")
        b_done.set()

    with a.enrollment_lock():
        events.append("a in")
        thread = threading.Thread(target=node_b)
        thread.start()
        deadline = time.monotonic() + 10
        while waiting_for_advisory_locks(postgres_url) == 0:  # b is queued behind a in the database
            assert time.monotonic() < deadline, "node b never waited for the lock"
            time.sleep(0.01)
        assert not b_done.is_set()
        events.append("a out")
    thread.join(timeout=10)
    assert events == ["a in", "a out", "b"]
    a.close()
    b.close()


def test_enrollment_lock_lets_one_of_many_check_then_insert(postgres_url: str, rng: random.Random) -> None:
    """The duplicate search and the insert under the lock: of eight enrollments of "one face"
    (here: the check that no credential is active yet) on two nodes, exactly one goes in."""
    nodes = [PostgresStore(postgres_url), PostgresStore(postgres_url)]
    nodes[0].import_cards([card(f"C{i}") for i in range(8)], actor="op", now=1.0)
    keys = [rng.randbytes(32) for _ in range(8)]
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def enroll(i: int) -> None:
        store = nodes[i % 2]
        barrier.wait()
        with store.enrollment_lock():
            if store.count_credentials()["active"]:
                outcomes.append("duplicate")
                return
            store.issue_credential(card_number=f"C{i}", device_key=keys[i], templates=tpl(str(i)), actor="h", now=2.0)
            outcomes.append("issued")

    run_threads(enroll, 8)
    assert sorted(outcomes) == ["duplicate"] * 7 + ["issued"]
    assert nodes[1].count_credentials()["active"] == 1
    for n in nodes:
        n.close()


def test_enrollment_lock_wait_is_bounded_and_the_lock_is_released_on_errors(postgres_url: str) -> None:
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url, enrollment_wait_s=0.2)
    with a.enrollment_lock():
        with pytest.raises(errors.Overloaded) as exc:
            with b.enrollment_lock():
                pass
        assert exc.value.retry_after_ms == 1000
    with pytest.raises(errors.DuplicateIdentity):
        with a.enrollment_lock():
            raise errors.DuplicateIdentity()
    with b.enrollment_lock():  # free again on both nodes
        pass
    a.close()
    b.close()


def test_enrollment_lock_survives_its_session_being_killed(postgres_url: str) -> None:
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url, enrollment_wait_s=0.2)
    with a.enrollment_lock():
        pid = a._lock_conn.info.backend_pid
    with psycopg.connect(POSTGRES_URL, autocommit=True) as c:  # as a database restart would
        c.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with a.enrollment_lock():  # reconnects at once instead of failing this enrollment
        assert a._lock_conn.info.backend_pid != pid
        with pytest.raises(errors.Overloaded):  # and it is held again
            with b.enrollment_lock():
                pass
    with b.enrollment_lock():
        pass
    a.close()
    b.close()


# -- failures: nothing half-written ----------------------------------------------------------------------------------
def snapshot(url: str) -> list[list[tuple]]:
    with admin(url) as c:
        return [c.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("cards", "credentials", "templates", "retired_devices", "attestations", "audit")]


def test_a_crash_inside_a_transition_leaves_nothing_half_written(store: PostgresStore, postgres_url: str, key,
                                                                 monkeypatch) -> None:
    first, rows, _ = store.issue_credential(card_number="C1", device_key=key(), templates=tpl("a"), actor="h", now=1.0)
    store.report_card_lost("C2", actor="op", now=1.5)
    before = snapshot(postgres_url)
    real_audit = PostgresStore._audit

    def crash_at_the_last_step(conn, **kw):
        real_audit(conn, **kw)  # the rows of this step are written, inside the transaction
        if kw["action"] in ("credential.issue", "card.reissue", "device.rebind"):
            raise RuntimeError("crash")

    monkeypatch.setattr(PostgresStore, "_audit", staticmethod(crash_at_the_last_step))
    with pytest.raises(RuntimeError):  # voids the first credential and deletes its templates first
        store.issue_credential(card_number="C1", device_key=key(), templates=tpl("b"), actor="h", now=2.0)
    with pytest.raises(RuntimeError):
        store.reissue_card("C2", actor="op", now=2.0)
    with pytest.raises(RuntimeError):
        store.rebind_device(first.credential_id, expected_device_key=first.device_key, new_device_key=key(),
                            actor="h", now=2.0)
    assert snapshot(postgres_url) == before
    monkeypatch.undo()
    second, _, voided = store.issue_credential(card_number="C1", device_key=key(), templates=tpl("c"), actor="h", now=3.0)
    assert voided == [first.credential_id] and second.version == 2  # the failed attempt used no version


def test_a_connection_killed_mid_transaction_is_unavailable_and_rolled_back(store: PostgresStore, postgres_url: str,
                                                                            key, monkeypatch) -> None:
    first, _, _ = store.issue_credential(card_number="C1", device_key=key(), templates=tpl("a"), actor="h", now=1.0)
    before = snapshot(postgres_url)
    real_audit = PostgresStore._audit

    def killed_before_commit(conn, **kw):
        real_audit(conn, **kw)
        if kw["action"] == "credential.issue":
            with psycopg.connect(POSTGRES_URL, autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))

    monkeypatch.setattr(PostgresStore, "_audit", staticmethod(killed_before_commit))
    with pytest.raises(errors.StoreUnavailable) as exc:
        store.issue_credential(card_number="C1", device_key=key(), templates=tpl("b"), actor="h", now=2.0)
    assert exc.value.retry_after_ms == 1000
    monkeypatch.undo()
    assert snapshot(postgres_url) == before
    # the pool replaced the dead connection: the next call works
    assert store.get_credential(first.credential_id).status == "active"
    store.issue_credential(card_number="C1", device_key=key(), templates=tpl("c"), actor="h", now=3.0)


_KILLED_CHILD = textwrap.dedent("""
    import os, sys
    from engine.store.postgres import PostgresStore
    store = PostgresStore(sys.argv[1])
    real = PostgresStore._audit
    def stall(conn, **kw):
        real(conn, **kw)
        if kw["action"] == "credential.issue":
            print("inside", flush=True)
            sys.stdin.readline()  # the parent SIGKILLs us here, before COMMIT
    PostgresStore._audit = staticmethod(stall)
    store.issue_credential(card_number="C1", device_key=os.urandom(32), templates=[("face", b"F")], actor="h", now=2.0)
""")


def test_sigkill_inside_a_transition_leaves_the_state_before_it(store: PostgresStore, postgres_url: str, key) -> None:
    store.issue_credential(card_number="C1", device_key=key(), templates=tpl("a"), actor="h", now=1.0)
    before = snapshot(postgres_url)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, postgres_url], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().strip() == "inside"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    deadline = time.monotonic() + 10  # the server notices the dead client and rolls back
    while snapshot(postgres_url) != before:
        assert time.monotonic() < deadline, "the killed transition left rows behind"
        time.sleep(0.05)
    assert store.count_credentials() == {"active": 1, "voided": 0, "suspended": 0}


class Link:
    """A TCP relay to PostgreSQL that the test can cut (every connection dropped, new ones
    refused) and restore, to play the database becoming unreachable and coming back."""

    def __init__(self) -> None:
        self.port = free_port()
        self._up = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._up.set()
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        self._up.clear()
        try:  # wakes the thread blocked in accept(); close() alone would not
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._up.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", 5432))
            with self._lock:
                self._socks += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_database_unreachable_then_back_the_store_recovers_by_itself(postgres_url: str, key) -> None:
    link = Link()
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{link.port}")
    assert url != postgres_url
    store = PostgresStore(url, timeout_s=1.0, max_connections=2)
    try:
        store.import_cards([card("C1")], actor="op", now=1.0)
        link.cut()
        for call in (lambda: store.get_card("C1"), lambda: store.report_card_lost("C1", actor="op", now=2.0),
                     lambda: store.audit(actor="op", action="x", subject="s", outcome="ok", now=2.0)):
            started = time.monotonic()
            with pytest.raises(errors.StoreUnavailable) as exc:
                call()
            assert time.monotonic() - started < 5 and exc.value.code == "unavailable"
        with pytest.raises(errors.StoreUnavailable):
            with store.enrollment_lock():
                pass
        link.restore()
        deadline = time.monotonic() + 15
        while True:
            try:
                card_now = store.get_card("C1")
                break
            except errors.StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not come back"
        assert card_now.status == "valid"  # the refused transition wrote nothing
        assert store.report_card_lost("C1", actor="op", now=3.0) == []
        with store.enrollment_lock():
            pass
        assert [e.action for e in store.audit_log()] == ["registry.import", "card.lost"]
    finally:
        store.close()
        link.cut()
