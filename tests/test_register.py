"""The register at scale: the template change log (both stores), the face index that follows
it (catch-up after another node's changes, written to disk and read back, rebuilt and
retrained), the exact re-ranking at the duplicate threshold, and the bulk path."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from engine.config import IndexConfig
from engine.crypto import TemplateCipher
from engine.matching import FaissDuplicateSearch, TemplateSealer
from engine.matching.face_index import FaceIndex, IdSet
from engine.store import CardRecord, open_store
from engine.store.bulk import BulkCredential, bulk_enroll

DIM = 32
THRESHOLD = 0.6
#: Small enough to train at the sizes of these tests: the approximate index, forced.
IVF = IndexConfig(train_min=300, nlist=8, codes="PQ16x4fs", probe_fraction=1.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/engine.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def sealer() -> TemplateSealer:
    return TemplateSealer(TemplateCipher(bytes(range(32))))


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def at_cosine(probe: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector whose cosine with the unit ``probe`` is exactly ``cos`` (to float32)."""
    other = rng.standard_normal(DIM)
    other -= (other @ probe) * probe
    other /= np.linalg.norm(other)
    return (cos * probe + np.sqrt(1 - cos * cos) * other).astype(np.float32)


def fill(store, sealer, faces: np.ndarray, *, prefix: str = "B") -> list[str]:
    """Bulk-enrolls one credential per face (cards ``<prefix>00000``...)."""
    rows = [BulkCredential(card_number=f"{prefix}{i:05d}", name="x", device_key=((ord(prefix) << 32) + i).to_bytes(32, "big"),
                           templates=[("face", sealer.seal_face(f, f"{prefix}{i:05d}"))]) for i, f in enumerate(faces)]
    return bulk_enroll(store, rows, actor="test", now=1.0)


def enroll(store, sealer, card: str, faces: np.ndarray, key: int):
    store.import_cards([CardRecord(card_number=card, name=card, photo_path="p", status="valid")], actor="t", now=1.0)
    templates = [("face", sealer.seal_face(f, card)) for f in faces] + [("voice", b"v")]
    cred, rows, _ = store.issue_credential(card_number=card, device_key=(10**9 + key).to_bytes(32, "big"), templates=templates,
                                           actor="t", now=2.0)
    return cred, rows


def search_on(store, sealer, directory: Path | None, config: IndexConfig = IndexConfig()) -> FaissDuplicateSearch:
    return FaissDuplicateSearch(store, sealer, dim=DIM, threshold=THRESHOLD, config=config, directory=directory)


# ---- the change log ------------------------------------------------------------------------------------
def test_the_change_log_follows_issue_void_and_suspension(url: str, sealer, seed: int) -> None:
    store = open_store(url)
    rng = np.random.default_rng(seed)
    try:
        assert store.log_position() == 0 and len(store.store_id()) == 32
        first, rows1 = enroll(store, sealer, "A", unit(rng, 2), 1)
        second, rows2 = enroll(store, sealer, "A", unit(rng, 1), 1)  # a new enrollment voids the first
        third, rows3 = enroll(store, sealer, "B", unit(rng, 1), 2)
        store.report_card_lost("B", actor="t", now=3.0)
        store.import_cards([CardRecord(card_number="A", name="A", photo_path="p", status="lost")], actor="t", now=4.0)
        log = store.template_changes(0, modality="face")
        face = [(c.op, c.template_id, c.credential_id) for c in log if c.modality == "face"]
        ids1 = [r.template_id for r in rows1 if r.modality == "face"]
        (id2,), (id3,) = ([r.template_id for r in rows if r.modality == "face"] for rows in (rows2, rows3))
        assert face == [
            ("add", ids1[0], first.credential_id), ("add", ids1[1], first.credential_id),
            ("remove", ids1[0], first.credential_id), ("remove", ids1[1], first.credential_id),
            ("add", id2, second.credential_id), ("add", id3, third.credential_id),
            ("remove", id3, third.credential_id), ("remove", id2, second.credential_id),
        ]
        seqs = [c.seq for c in log]
        assert seqs == sorted(seqs) and store.log_position() == seqs[-1]
        assert [c.op for c in log if c.modality == "voice"] == ["add", "remove", "add", "add", "remove", "remove"]
        # an addition whose credential is no longer active carries no template to open
        assert all(c.sealed is None for c in log)
        assert store.sealed_by_id([*ids1, id2, id3]) == [] and store.count_templates("face") == 0
        after = [c for c in log if c.op == "remove"][1].seq
        assert [c.template_id for c in store.template_changes(after, modality="face", limit=2)] == [rows1[2].template_id, id2]
    finally:
        store.close()


def test_a_version_1_sqlite_database_is_migrated_with_its_templates_in_the_log(tmp_path: Path, sealer, seed: int) -> None:
    path = tmp_path / "engine.db"
    store = open_store(path)
    cred, rows = enroll(store, sealer, "A", unit(np.random.default_rng(seed), 2), 1)
    store.close()
    with sqlite3.connect(path) as conn:  # back to version 1: no log, no store id
        conn.execute("DROP TABLE template_log")
        conn.execute("DELETE FROM meta WHERE key = 'store_id'")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store = open_store(path)
    try:
        assert [(c.op, c.template_id, c.modality) for c in store.template_changes(0, modality="face")] == \
            [("add", r.template_id, r.modality) for r in rows]
        assert len(store.store_id()) == 32 and store.count_templates("face") == 2
    finally:
        store.close()


def test_bulk_enrollment_writes_credentials_templates_and_the_log(url: str, sealer, seed: int) -> None:
    store = open_store(url)
    try:
        faces = unit(np.random.default_rng(seed), 5)
        ids = fill(store, sealer, faces)
        assert store.count_credentials()["active"] == 5 and store.count_templates("face") == 5
        changes = store.template_changes(0, modality="face")
        assert [c.credential_id for c in changes] == ids and all(c.op == "add" for c in changes)
        opened = sealer.open_face(changes[3].sealed.ciphertext, changes[3].sealed.card_number)
        assert np.allclose(opened, faces[3])
        assert store.audit_log(limit=5)[-1].action == "registry.bulk_enroll"
    finally:
        store.close()


# ---- the index that follows the log ---------------------------------------------------------------------
def test_a_node_catches_up_with_another_nodes_enrollment_and_removal(url: str, sealer, seed: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(seed)
    node_a, node_b = open_store(url), open_store(url)
    try:
        fill(node_a, sealer, unit(rng, 400))
        search = search_on(node_a, sealer, tmp_path / "a", IVF)
        assert search.load() == 400 and search.index.kind == "ivf"
        alice = unit(rng, 1)
        cred, _ = enroll(node_b, sealer, "ALICE", alice, 9)  # on the other node
        assert search.search(alice) == {cred.credential_id}
        node_b.report_card_lost("ALICE", actor="t", now=5.0)
        assert search.search(alice) == set() and len(search) == 400
        assert search.position == node_a.log_position()
    finally:
        node_a.close()
        node_b.close()


def test_the_index_is_written_with_its_position_and_read_back(tmp_path: Path, sealer, seed: int, monkeypatch) -> None:
    rng = np.random.default_rng(seed)
    store = open_store(tmp_path / "engine.db")
    directory = tmp_path / "index"
    try:
        fill(store, sealer, unit(rng, 400))
        first = search_on(store, sealer, directory, IVF)
        first.load()
        meta = FaceIndex.read_meta(directory)
        assert meta["position"] == store.log_position() and meta["kind"] == "ivf" and meta["templates"] == 400
        bob = unit(rng, 1)
        cred, _ = enroll(store, sealer, "BOB", bob, 7)  # after the file was written
        # a second node reads the file (no scan of the store) and replays the log written since
        monkeypatch.setattr(store, "sealed_templates", lambda modality: pytest.fail("the index was rebuilt"))
        again = search_on(store, sealer, directory, IVF)
        assert again.load() == 401 and again.search(bob) == {cred.credential_id}
        assert FaceIndex.read_meta(directory)["position"] == store.log_position()  # written again
        assert sorted(p.name for p in directory.iterdir()) == sorted(["face.json", meta_files(directory)[0], meta_files(directory)[1]])
    finally:
        store.close()


def meta_files(directory: Path) -> tuple[str, str]:
    meta = FaceIndex.read_meta(directory)
    return meta["index_file"], meta["ids_file"]


def test_an_index_of_another_store_is_not_used(tmp_path: Path, sealer, seed: int) -> None:
    rng = np.random.default_rng(seed)
    one, other = open_store(tmp_path / "one.db"), open_store(tmp_path / "other.db")
    try:
        fill(one, sealer, unit(rng, 3))
        search_on(one, sealer, tmp_path / "index").load()
        carol = unit(rng, 1)
        cred, _ = enroll(other, sealer, "CAROL", carol, 3)
        search = search_on(other, sealer, tmp_path / "index")
        assert search.load() == 1 and search.search(carol) == {cred.credential_id}
        assert FaceIndex.read_meta(tmp_path / "index")["store_id"] == other.store_id()
    finally:
        one.close()
        other.close()


def test_rebuild_retrains_and_status_advises_it_past_the_growth_factor(tmp_path: Path, sealer, seed: int) -> None:
    rng = np.random.default_rng(seed)
    store = open_store(tmp_path / "engine.db")
    try:
        fill(store, sealer, unit(rng, 100), prefix="A")
        config = IndexConfig(train_min=300, nlist=4, codes="PQ16x4fs", retrain_factor=2.0)
        search = search_on(store, sealer, tmp_path / "index", config)
        search.load()
        assert search.status()["kind"] == "flat" and not search.status()["rebuild_advised"]
        fill(store, sealer, unit(rng, 300), prefix="B")
        search.catch_up()
        assert search.status()["kind"] == "flat" and search.status()["rebuild_advised"]  # past train_min
        after = search.rebuild()
        assert (after["kind"], after["templates"], after["trained_for"], after["rebuild_advised"]) == ("ivf", 400, 400, False)
        fill(store, sealer, unit(rng, 500), prefix="C")
        search.catch_up()
        assert search.status()["growth"] == pytest.approx(900 / 400) and search.status()["rebuild_advised"]
        assert search_on(store, sealer, tmp_path / "index", config).rebuild()["trained_for"] == 900
    finally:
        store.close()


def test_the_decision_at_the_threshold_is_exact_for_every_candidate(tmp_path: Path, sealer, seed: int) -> None:
    """Two credentials at cosine threshold + 1e-4 and threshold - 1e-4 from the probe: the
    approximate index (4-bit codes, errors of a few hundredths here) cannot tell them apart,
    the re-ranking on the stored templates does."""
    rng = np.random.default_rng(seed)
    store = open_store(tmp_path / "engine.db")
    try:
        fill(store, sealer, unit(rng, 400))
        probe = unit(rng, 1)[0]
        above, _ = enroll(store, sealer, "ABOVE", at_cosine(probe, THRESHOLD + 1e-4, rng)[None], 11)
        below, _ = enroll(store, sealer, "BELOW", at_cosine(probe, THRESHOLD - 1e-4, rng)[None], 12)
        search = search_on(store, sealer, None, dataclasses.replace(IVF, rerank_margin=0.4))
        search.rebuild()
        assert search.index.kind == "ivf"
        found = search.candidates(probe[None])
        assert {above.credential_id, below.credential_id} <= {t.credential_id for t in found}
        exact = search.exact_scores(probe[None], found)
        assert exact[above.credential_id] >= THRESHOLD > exact[below.credential_id]
        assert search.search(probe[None]) == {above.credential_id}
        approx, ids = search.index.search(probe[None], 8)
        exact_of = {t.template_id: exact[t.credential_id] for t in found
                    if t.credential_id in (above.credential_id, below.credential_id)}
        off = [abs(a - exact_of[i]) for a, i in zip(approx[0].tolist(), ids[0].tolist()) if i in exact_of]
        assert len(off) == 2 and max(off) > 1e-3  # the index's own scores could not decide
    finally:
        store.close()


def test_the_id_set_adds_and_removes_once(seed: int) -> None:
    rng = np.random.default_rng(seed)
    index = FaceIndex.empty(DIM, IndexConfig())
    faces = unit(rng, 4)
    assert index.add(np.array([5, 5, 70_000, 3]), faces) == 3  # a repeated id is added once
    assert index.add(np.array([3, 9]), faces[:2]) == 1  # 3 is held already
    assert index.remove(np.array([3, 3, 12345])) == 1 and len(index) == 3
    ids = IdSet()
    ids.add(np.array([0, 63, 64, 1 << 20]))
    assert ids.contains(np.array([0, 63, 64, 65, 1 << 20, 1 << 40])).tolist() == [True, True, True, False, True, False]
    assert IdSet(ids.words).count == 4


def test_a_search_probes_its_fraction_of_the_lists_and_never_fewer_than_min_probe(seed: int) -> None:
    faces = unit(np.random.default_rng(seed), 2000)
    for min_probe, eighth, half in ((10, 10, 20), (1, 5, 20), (100, 40, 40)):
        config = IndexConfig(train_min=1, nlist=40, codes="PQ16x4fs", min_probe=min_probe)
        index = FaceIndex.trained(faces, expected=len(faces), config=config)
        assert (index.probe(1 / 8), index.probe(1 / 2)) == (eighth, half)  # 5 and 20 of the 40 asked for


def test_a_version_1_postgresql_schema_is_migrated_with_its_templates_in_the_log(postgres_url: str, sealer, seed: int,
                                                                                 monkeypatch) -> None:
    from engine.store import postgres_schema

    with monkeypatch.context() as m:  # an engine of migration 1 creates the schema and enrolls
        m.setattr(postgres_schema, "MIGRATIONS", postgres_schema.MIGRATIONS[:1])
        m.setattr(postgres_schema, "SCHEMA_VERSION", 1)
        old = open_store(postgres_url)
        old.import_cards([CardRecord(card_number="A", name="A", photo_path="p", status="valid")], actor="t", now=1.0)
        with old._write() as conn:
            conn.execute("INSERT INTO credentials(credential_id, card_number, version, level, device_key, status,"
                         " created_at, updated_at) VALUES ('cA', 'A', 1, 'basic', %s, 'active', 1, 1)", (bytes(32),))
            ids = [conn.execute("INSERT INTO templates(credential_id, modality, ciphertext) VALUES ('cA', %s, 'x')"
                                " RETURNING template_id", (m_,)).fetchone()[0] for m_ in ("face", "voice")]
        old.close()
    store = open_store(postgres_url)
    try:
        assert [(c.op, c.template_id) for c in store.template_changes(0, modality="face")] == [("add", i) for i in ids]
        assert len(store.store_id()) == 32
    finally:
        store.close()


def test_netid_index_rebuild_and_status(tmp_path: Path, seed: int, capsys) -> None:
    from engine.cli import main

    data = tmp_path / "data"
    sealer = TemplateSealer(TemplateCipher.load_or_create(data / "template.key"))
    store = open_store(data / "engine.db")
    fill(store, sealer, unit(np.random.default_rng(seed), 400))
    store.close()
    common = ["--data", str(data), "--dim", str(DIM)]
    assert main(["index", "status", *common]) == 0  # no file yet: built as a node would, exact
    assert json.loads(capsys.readouterr().out)["kind"] == "flat"
    assert main(["index", "rebuild", *common, "--train-min", "300", "--nlist", "4", "--codes", "PQ16x4fs"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert (built["kind"], built["templates"], built["nlist"]) == ("ivf", 400, 4)
    assert main(["index", "status", *common]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["kind"], status["rebuild_advised"], status["position"]) == ("ivf", False, built["position"])
