"""The atomic writers: final content or old content, never a half-written file or a stray temporary."""

from __future__ import annotations

import json

import pytest

from phiclip.atomic import atomic_directory, atomic_path, atomic_write, atomic_write_json, atomic_write_text


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "old")
    atomic_write_json(p, {"x": 1}, indent=2)
    assert json.loads(p.read_text()) == {"x": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.bin"
    atomic_write_text(p, "old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.bin"]


def test_atomic_path_for_libraries_that_want_a_name(tmp_path):
    p = tmp_path / "t.txt"
    with atomic_path(p) as tmp:
        assert tmp != p and tmp.name.startswith(".")
        tmp.write_text("new")
        assert not p.exists()
    assert p.read_text() == "new"
    with pytest.raises(ValueError), atomic_path(p) as tmp:
        tmp.write_text("never")
        raise ValueError
    assert p.read_text() == "new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.txt"]


def test_atomic_directory_replaces_a_folder_whole(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_directory(d) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyError), atomic_directory(d) as tmp:
        (tmp / "b").write_text("2")
        raise KeyError
    assert sorted(x.name for x in d.iterdir()) == ["a"]
    with atomic_directory(d) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(x.name for x in d.iterdir()) == ["c"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]
