"""TemplateIndex against brute-force numpy on seeded random vectors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import errors
from engine.matching.index import TemplateIndex

SEED = 7


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def populate(rng: np.random.Generator, dim: int, owners: int) -> tuple[TemplateIndex, dict[str, np.ndarray], dict]:
    """An index with 1-3 templates per owner under sparse, shuffled ids."""
    index = TemplateIndex(dim)
    per_owner = rng.integers(1, 4, size=owners)
    ids = rng.choice(10**9, size=int(per_owner.sum()), replace=False).astype(np.int64)
    vectors = rng.normal(size=(len(ids), dim)).astype(np.float32)
    names = [f"cred-{i}" for i, n in enumerate(per_owner) for _ in range(n)]
    index.add(ids, names, vectors)
    by_owner: dict[str, list[np.ndarray]] = {}
    ids_of: dict[str, list[int]] = {}
    for i, name, v in zip(ids, names, vectors):
        by_owner.setdefault(name, []).append(v)
        ids_of.setdefault(name, []).append(int(i))
    return index, {k: np.stack(v) for k, v in by_owner.items()}, ids_of


def brute_search(by_owner: dict[str, np.ndarray], probes: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    p = unit(probes)
    out = []
    for row in p:
        best = sorted(((name, float((unit(t) @ row).max())) for name, t in by_owner.items()),
                      key=lambda x: -x[1])
        out.append(best[:k])
    return out


def assert_same_ranking(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [name for name, _ in g] == [name for name, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=1e-5)


def test_search_matches_brute_force() -> None:
    rng = np.random.default_rng(SEED)
    index, by_owner, _ = populate(rng, 64, 200)
    probes = rng.normal(size=(25, 64))
    for k in (1, 5, 20):
        assert_same_ranking(index.search(probes, k), brute_search(by_owner, probes, k))
    assert len(index) == sum(len(v) for v in by_owner.values())
    assert index.owner_count() == 200


def test_search_finds_the_enrolled_owner_of_a_noisy_probe() -> None:
    rng = np.random.default_rng(SEED)
    index, by_owner, _ = populate(rng, 128, 100)
    names = list(by_owner)
    picks = rng.choice(len(names), size=10, replace=False)
    probes = np.stack([by_owner[names[i]][0] + 0.1 * rng.normal(size=128) for i in picks])
    hits = index.search(probes, 1)
    assert [h[0][0] for h in hits] == [names[i] for i in picks]
    assert all(h[0][1] > 0.9 for h in hits)


def test_search_returns_k_distinct_owners_even_when_one_owner_dominates() -> None:
    rng = np.random.default_rng(SEED)
    dim = 16
    index = TemplateIndex(dim)
    target = rng.normal(size=dim)
    close = target + 0.01 * rng.normal(size=(10, dim))  # ten templates of one owner near the probe
    index.add(np.arange(10), ["big"] * 10, close)
    index.add(np.arange(10, 13), ["x", "y", "z"], rng.normal(size=(3, dim)))
    (hits,) = index.search(target[None, :], 3)
    assert hits[0][0] == "big"
    assert len(hits) == 3 and len({name for name, _ in hits}) == 3
    (everyone,) = index.search(target[None, :], 50)
    assert {name for name, _ in everyone} == {"big", "x", "y", "z"}


def test_compare_and_vectors_of_match_brute_force() -> None:
    rng = np.random.default_rng(SEED)
    index, by_owner, _ = populate(rng, 32, 50)
    probes = rng.normal(size=(7, 32))
    for name, templates in list(by_owner.items())[:10]:
        want = (unit(probes) @ unit(templates).T).max(axis=1)
        np.testing.assert_allclose(index.compare(name, probes), want, atol=1e-5)
        got = index.vectors_of(name)
        assert got.shape == templates.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, unit(templates), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_remove_owner() -> None:
    rng = np.random.default_rng(SEED)
    index, by_owner, ids_of = populate(rng, 32, 40)
    total = len(index)
    removed = list(by_owner)[::3]
    for name in removed:
        assert index.remove_owner(name) == len(by_owner[name])
        assert name not in index
    assert index.remove_owner(removed[0]) == 0
    assert index.remove_owner("never-there") == 0
    kept = {k: v for k, v in by_owner.items() if k not in removed}
    assert len(index) == total - sum(len(by_owner[n]) for n in removed)
    probes = rng.normal(size=(20, 32))
    assert_same_ranking(index.search(probes, 10), brute_search(kept, probes, 10))
    with pytest.raises(errors.UnknownCredential):
        index.compare(removed[0], probes)
    with pytest.raises(errors.UnknownCredential):
        index.vectors_of(removed[0])
    # the removed ids can be used again
    name = removed[0]
    index.add(np.asarray(ids_of[name]), [name] * len(ids_of[name]), by_owner[name])
    np.testing.assert_allclose(index.vectors_of(name), unit(by_owner[name]), atol=1e-6)


def test_empty_index() -> None:
    index = TemplateIndex(8)
    assert len(index) == 0
    assert index.search(np.ones((3, 8)), 5) == [[], [], []]
    with pytest.raises(errors.UnknownCredential):
        index.compare("x", np.ones((1, 8)))
    index.add(np.zeros(0, dtype=np.int64), [], np.zeros((0, 8)))
    assert len(index) == 0


@pytest.mark.parametrize(("ids", "owners", "vectors"), [
    (np.array([1, 2]), ["a", "b"], np.ones((2, 7))),  # wrong dim
    (np.array([1, 2]), ["a"], np.ones((2, 8))),  # lengths differ
    (np.array([1, 1]), ["a", "b"], np.ones((2, 8))),  # repeated id
    (np.array([1, 2]), ["a", "b"], np.vstack([np.ones(8), np.zeros(8)])),  # zero vector
    (np.array([1, 2]), ["a", "b"], np.full((2, 8), np.nan)),  # not finite
    (np.array([1.5, 2.0]), ["a", "b"], np.ones((2, 8))),  # non-integer ids
    (np.array([1, 2]), ["a", ""], np.ones((2, 8))),  # empty owner
    (np.array([1, 2]), ["a", "b"], np.ones(8)),  # not a batch
])
def test_add_refuses_bad_input(ids, owners, vectors) -> None:
    index = TemplateIndex(8)
    with pytest.raises(ValueError):
        index.add(ids, owners, vectors)
    assert len(index) == 0


def test_add_refuses_an_id_already_present_atomically() -> None:
    index = TemplateIndex(4)
    index.add(np.array([1, 2]), ["a", "a"], np.eye(4)[:2])
    with pytest.raises(ValueError):
        index.add(np.array([3, 2]), ["b", "b"], np.eye(4)[2:])
    assert len(index) == 2 and "b" not in index
    with pytest.raises(ValueError):
        index.search(np.ones((1, 3)), 1)
    with pytest.raises(ValueError):
        index.search(np.ones((1, 4)), 0)
    with pytest.raises(errors.ConfigError):
        TemplateIndex(0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), owners=st.integers(1, 30), k=st.integers(1, 8),
       drop=st.integers(0, 10))
def test_property_search_and_remove_agree_with_brute_force(seed: int, owners: int, k: int, drop: int) -> None:
    rng = np.random.default_rng(seed)
    index, by_owner, _ = populate(rng, 12, owners)
    for name in list(by_owner)[:drop]:
        index.remove_owner(name)
        del by_owner[name]
    probes = rng.normal(size=(4, 12))
    assert_same_ranking(index.search(probes, k), brute_search(by_owner, probes, k))


def test_concurrent_add_remove_search() -> None:
    dim = 32
    index = TemplateIndex(dim)
    failures: list[BaseException] = []

    def writer(w: int) -> None:
        rng = np.random.default_rng(SEED + w)
        try:
            for i in range(60):
                base = (w * 1000 + i) * 4
                index.add(np.arange(base, base + 3), [f"w{w}-{i}"] * 3, rng.normal(size=(3, dim)))
                if i % 2:
                    assert index.remove_owner(f"w{w}-{i - 1}") == 3
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    def reader() -> None:
        rng = np.random.default_rng(SEED)
        try:
            for _ in range(100):
                for hits in index.search(rng.normal(size=(4, dim)), 5):
                    assert len({name for name, _ in hits}) == len(hits)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)] + [
        threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    assert len(index) == 3 * 30 * 3 and index.owner_count() == 90
