"""Duplicates: planted exact and near copies are found, chains are cut by the star rule, threshold
edges, empty input, unreadable sources, and the Parquet outputs."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phiclip import schema
from phiclip.collection import dedup
from phiclip.collection.dedup import (
    exact_duplicates,
    find_duplicates,
    group_pairs,
    near_duplicate_pairs,
    source_reader,
    write_duplicates,
)
from phiclip.collection.vectors import l2_normalize


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).normal(size=(n, d))).astype(np.float32)


def _planted(n: int = 200, d: int = 32, seed: int = 0):
    """n random unit vectors plus near copies (noise 0.01 per axis) of rows 3 (two copies), n/4 and 3n/5."""
    base = _unit(n, d, seed)
    rng = np.random.default_rng(seed + 1)
    originals = [3, 3, n // 4, 3 * n // 5]
    copies = l2_normalize(base[originals] + 0.01 * rng.normal(size=(len(originals), d))).astype(np.float32)
    vectors = np.vstack([base, copies])
    ids = [f"img{i:03d}" for i in range(n)] + ["copy3a", "copy3b", f"copy{n // 4}", f"copy{3 * n // 5}"]
    return ids, vectors


def _groups(report, kind=None) -> list[set[str]]:
    by_gid: dict[int, set[str]] = {}
    for gid, item, _rep, _sim, k in report.groups:
        if kind is None or k == kind:
            by_gid.setdefault(gid, set()).add(item)
    return sorted(by_gid.values(), key=sorted)


def test_planted_near_copies_are_found():
    ids, vectors = _planted()
    report = find_duplicates(ids, vectors, threshold=0.95)
    assert _groups(report) == [{"copy120", "img120"}, {"copy3a", "copy3b", "img003"}, {"copy50", "img050"}]
    assert report.method.startswith("exact range search")
    assert len(report.keep) == len(ids) - 4
    kept = set(report.keep)
    for group in _groups(report):
        assert len(group & kept) == 1  # one per group
    for _gid, item, rep, sim, kind in report.groups:
        assert kind == "near"
        i, r = ids.index(item), ids.index(rep)
        assert sim == pytest.approx(
            float(vectors[i] @ vectors[r]) / np.linalg.norm(vectors[i]) / np.linalg.norm(vectors[r]), abs=1e-5
        )
        assert sim >= 0.95
        if item == rep:
            assert sim == 1.0
    assert report.n_groups == 3


def test_exact_copies_by_bytes_and_near_copies_together():
    ids, vectors = _planted(n=60)
    ids = ids[:60] + ["dupbytes"]  # same bytes as img007, vector of img007 as well
    vectors = np.vstack([vectors[:60], vectors[7:8]])
    content = {i: i.encode() for i in ids}
    content["dupbytes"] = content["img007"]
    report = find_duplicates(ids, vectors, threshold=0.95, read_bytes=content.__getitem__)
    assert _groups(report, "exact") == [{"img007", "dupbytes"}]
    assert [r for r in report.groups if r[4] == "exact"] == [
        (0, "img007", "img007", 1.0, "exact"),
        (0, "dupbytes", "img007", 1.0, "exact"),
    ]
    # the exact copy takes no part in near grouping: img007 has no other near copy, so no near group
    assert _groups(report, "near") == []
    assert "dupbytes" not in report.keep and "img007" in report.keep
    assert len(report.keep) == 60


def test_exact_group_representative_inside_a_near_group():
    v = l2_normalize(np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.05, 0.0], [0.0, 1.0, 0.0]]))
    ids = ["a", "a2", "b", "c"]
    data = {"a": b"x", "a2": b"x", "b": b"y", "c": b"z"}
    report = find_duplicates(ids, v, threshold=0.99, read_bytes=data.__getitem__)
    assert _groups(report, "exact") == [{"a", "a2"}]
    assert _groups(report, "near") == [{"a", "b"}]
    near_rep = next(r[2] for r in report.groups if r[4] == "near")
    # a2 is a's exact copy; of the near pair {a, b} only the representative stays; c is a singleton
    assert sorted(report.keep) == sorted([near_rep, "c"])
    assert set(report.group_of("a2")) == {"a", "a2"} and set(report.group_of("a", "near")) == {"a", "b"}


def test_unreadable_sources_are_reported_not_fatal(tmp_path):
    files = {}
    for name, data in (("one.jpg", b"AAA"), ("two.jpg", b"AAA"), ("three.jpg", b"BBB")):
        (tmp_path / name).write_bytes(data)
        files[name] = schema.path_to_source(str(tmp_path / name))
    ids = ["one", "two", "three", "gone", "remote", "empty"]
    sources = [
        files["one.jpg"],
        files["two.jpg"],
        files["three.jpg"],
        str(tmp_path / "gone.jpg"),
        "https://x/y.jpg",
        "",
    ]
    groups, unreadable = exact_duplicates(ids, source_reader(ids, sources))
    assert groups == [[0, 1]]
    assert [u[0] for u in unreadable] == ["gone", "remote", "empty"]
    assert "FileNotFoundError" in unreadable[0][1] and "not a local file" in unreadable[1][1]
    report = find_duplicates(ids, None, read_bytes=source_reader(ids, sources))
    assert report.keep == ["one", "three", "gone", "remote", "empty"]
    paths = write_duplicates(report, tmp_path / "out")
    assert pq.read_table(paths["unreadable"]).column("id").to_pylist() == ["gone", "remote", "empty"]


def _chain(steps: int, angle_deg: float) -> np.ndarray:
    """Unit vectors on a circle, each ``angle_deg`` from the previous: a chain."""
    t = np.radians(angle_deg) * np.arange(steps)
    return np.stack([np.cos(t), np.sin(t), np.zeros(steps)], axis=1).astype(np.float32)


def test_chain_of_three_is_one_star_around_the_middle():
    # A~B (cos 20° = 0.94), B~C, A≁C (cos 40° = 0.77): B is within the threshold of both, so the group
    # is {A, B, C} with B the representative, every member within 0.9 of it
    report = find_duplicates(["A", "B", "C"], _chain(3, 20), threshold=0.9)
    assert _groups(report) == [{"A", "B", "C"}]
    assert {r[2] for r in report.groups} == {"B"}
    assert report.keep == ["B"]


def test_long_chain_is_not_merged_into_one_group():
    ids = list("ABCDEFG")
    vectors = _chain(7, 20)
    i, j, _ = near_duplicate_pairs(vectors, 0.9)
    assert list(zip(i.tolist(), j.tolist())) == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
        (4, 5),
        (5, 6),
    ]  # one component
    report = find_duplicates(ids, vectors, threshold=0.9)
    groups = _groups(report)
    assert {"A", "G"} not in [g & {"A", "G"} for g in groups]
    assert all(len(g) <= 3 for g in groups)
    for _gid, item, rep, sim, _kind in report.groups:
        assert sim >= 0.9 - 1e-6 and float(vectors[ids.index(item)] @ vectors[ids.index(rep)]) >= 0.9 - 1e-6
    # the middle D represents C..E; A..B and F..G are left: each pair forms its own group
    assert groups == [{"A", "B"}, {"C", "D", "E"}, {"F", "G"}]


def test_threshold_is_inclusive_and_exact():
    c = 0.9
    v = np.array([[1.0, 0.0], [c, math.sqrt(1 - c * c)]], dtype=np.float32)
    assert _groups(find_duplicates(["a", "b"], v, threshold=0.9)) == [{"a", "b"}]
    assert _groups(find_duplicates(["a", "b"], v, threshold=0.9001)) == []
    same = np.array([[0.3, 0.4, 0.5]] * 2, dtype=np.float32)
    assert _groups(find_duplicates(["a", "b"], same, threshold=1.0)) == [{"a", "b"}]
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert _groups(find_duplicates(["a", "b", "c"], opposite, threshold=-1.0)) == [{"a", "b", "c"}]
    # at 0.0, a·c = b·c = 0 reach it (a·b = -1 does not): a star around c
    at_zero = find_duplicates(["a", "b", "c"], opposite, threshold=0.0)
    assert _groups(at_zero) == [{"a", "b", "c"}] and at_zero.keep == ["c"]
    assert _groups(find_duplicates(["a", "b", "c"], opposite, threshold=0.01)) == []
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        find_duplicates(["a", "b"], v, threshold=1.5)


def test_empty_and_single_item():
    empty = find_duplicates([], np.zeros((0, 8), dtype=np.float32))
    assert empty.groups == [] and empty.keep == []
    one = find_duplicates(["only"], np.ones((1, 8)), read_bytes=lambda _i: b"x")
    assert one.groups == [] and one.keep == ["only"]
    i, j, s = near_duplicate_pairs(np.zeros((0, 4)), 0.9)
    assert len(i) == len(j) == len(s) == 0
    assert group_pairs(np.zeros((0, 4)), i, j) == []


def test_blocks_and_the_neighbour_cap_do_not_change_groups(monkeypatch):
    ids, vectors = _planted(n=150)
    # 30 copies of one vector (every pair a duplicate): each keeps only 2 partners, still one group
    vectors = np.vstack([vectors, np.repeat(vectors[10:11], 30, axis=0)])
    ids = ids + [f"same{i}" for i in range(30)]
    full = find_duplicates(ids, vectors, threshold=0.95)
    monkeypatch.setattr(dedup, "_PAIR_BUDGET", 50)  # one query per range_search block
    capped = find_duplicates(ids, vectors, threshold=0.95, max_neighbors=2)
    assert _groups(full) == _groups(capped)
    assert {f"same{i}" for i in range(30)} | {"img010"} in _groups(full)


def test_above_the_exact_limit_the_inverted_lists_find_the_planted_copies():
    ids, vectors = _planted(n=300)
    exact = find_duplicates(ids, vectors, threshold=0.95)
    approx = find_duplicates(ids, vectors, threshold=0.95, exact_limit=100)
    assert approx.method.startswith("inverted lists")
    assert _groups(approx) == _groups(exact)
    assert approx.keep == exact.keep


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors around 20 centres, plus near copies at cosines spread over 0.90..0.999."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d))
    base = l2_normalize(centres[rng.integers(0, 20, n)] + 0.6 * rng.normal(size=(n, d)))
    src = rng.choice(n, n // 5, replace=False)
    noise = rng.uniform(0.03, 0.5, size=(len(src), 1)) * l2_normalize(rng.normal(size=(len(src), d)))
    copies = l2_normalize(base[src] + noise)
    return np.vstack([base, copies, np.repeat(base[:1], 5, axis=0)]).astype(np.float32)


@pytest.mark.parametrize("threshold", [0.9, 0.95, 0.99])
def test_the_large_n_path_finds_the_same_pairs_and_groups_as_the_exact_path(threshold):
    vectors = _clustered(3000, 48, seed=3)
    ids = [f"v{i}" for i in range(len(vectors))]
    ei, ej, es = near_duplicate_pairs(vectors, threshold)
    ai, aj, as_ = near_duplicate_pairs(vectors, threshold, exact_limit=100)
    assert len(ei) > 100
    assert list(zip(ai.tolist(), aj.tolist())) == list(zip(ei.tolist(), ej.tolist()))
    np.testing.assert_allclose(as_, es, atol=1e-5)
    assert as_.min() >= threshold - dedup.SIM_TOLERANCE  # never a pair below the threshold
    exact = find_duplicates(ids, vectors, threshold=threshold)
    forced = find_duplicates(ids, vectors, threshold=threshold, exact_limit=100)
    assert forced.method.startswith("inverted lists") and exact.method.startswith("exact")
    assert _groups(forced) == _groups(exact) and forced.keep == exact.keep


def test_the_large_n_path_with_one_probe_and_a_cap_keeps_only_true_pairs():
    vectors = _clustered(2000, 32, seed=4)
    i, j, s = near_duplicate_pairs(vectors, 0.9, exact_limit=10, nprobe=1, max_neighbors=3)
    np.testing.assert_allclose(s, np.einsum("nd,nd->n", vectors[i], vectors[j]), atol=1e-5)
    assert (s >= 0.9 - dedup.SIM_TOLERANCE).all() and (i < j).all()
    ei, ej, _ = near_duplicate_pairs(vectors, 0.9, max_neighbors=10_000)
    assert set(zip(i.tolist(), j.tolist())) <= set(zip(ei.tolist(), ej.tolist()))


def test_outputs_are_parquet_and_nothing_is_deleted(tmp_path):
    ids, vectors = _planted(n=40)
    report = find_duplicates(ids[:40] + ids[-4:-2], np.vstack([vectors[:40], vectors[-4:-2]]), threshold=0.95)
    paths = write_duplicates(report, tmp_path / "dups")
    groups = pq.read_table(paths["groups"])
    assert groups.column_names == ["group_id", "id", "representative_id", "similarity", "kind"]
    assert set(groups.column("id").to_pylist()) == {"img003", "copy3a", "copy3b"}
    assert pq.read_table(paths["keep"]).column("id").to_pylist() == report.keep
    assert "unreadable" not in paths
    assert sorted(p.name for p in (tmp_path / "dups").iterdir()) == ["duplicates.parquet", "keep.parquet"]


# --- memory-mapped vectors (dedup --memmap-dir): the same groups as in memory ------------------------------


@pytest.mark.parametrize("exact_limit", [100, dedup.EXACT_LIMIT])
def test_memory_mapped_vectors_give_the_same_groups(tmp_path, exact_limit):
    """Exact copies squeezed out of a memory map in place, the inverted lists (exact_limit 100) and the
    exact search on it: the report equals the one from the same vectors in memory."""
    from phiclip.collection.vectors import read_vectors_into_memmap

    vectors = _clustered(1200, 24, seed=5)
    ids = [f"v{i}" for i in range(len(vectors))]
    content = {i: i.encode() for i in ids}
    for a, b in ((10, 11), (12, 13), (500, 501), (1200, 1201)):  # byte copies (the last: equal vectors too)
        content[ids[b]] = content[ids[a]]
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"id": ids, "vec": pa.array(list(vectors), pa.list_(pa.float32()))}), path)
    mapped = read_vectors_into_memmap(path, tmp_path, chunk_rows=256)
    in_memory = l2_normalize(vectors)
    kw = dict(threshold=0.93, read_bytes=content.__getitem__, exact_limit=exact_limit, normalized=True)
    want = find_duplicates(ids, in_memory, **kw)
    got = find_duplicates(mapped.ids, mapped.vectors, overwrite=True, **kw)
    assert isinstance(mapped.vectors, np.memmap)
    assert got.groups == want.groups and got.keep == want.keep and got.method == want.method
    assert len(_groups(want, "exact")) == 4 and len(_groups(want, "near")) > 50


def test_dedup_command_with_a_memory_map_writes_the_same_files(tmp_path):
    from phiclip.collection.commands import dedup_collection

    vectors = _clustered(400, 16, seed=6)
    ids = [f"v{i}" for i in range(len(vectors))]
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"id": ids, "vec": pa.array(list(vectors * 5), pa.list_(pa.float32()))}), path)
    a = dedup_collection(path, tmp_path / "a", threshold=0.95)
    b = dedup_collection(path, tmp_path / "b", threshold=0.95, memmap_dir=tmp_path / "maps")
    assert a.summary["vectors"] == "in memory" and b.summary["vectors"] == "memory-mapped"
    assert a.summary["groups"] > 10
    for name in ("duplicates.parquet", "keep.parquet"):
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name)), name
    assert list((tmp_path / "maps").iterdir()) == []
