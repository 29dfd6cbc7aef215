"""phiclip.models.checkpoint's digest cache: an untouched file's tensor digests are read back instead
of hashed again; any change to the file (even with its size and modification time put back) is hashed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import phiclip.models.checkpoint as C


def _write(path: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    save_file({"a.weight": torch.randn(64, 32, generator=gen), "b.bias": torch.randn(32, generator=gen)}, str(path))
    return path


def _no_hashing(*args, **kwargs):
    raise AssertionError("the file was hashed again")


def test_an_untouched_file_is_not_hashed_again(tmp_path, monkeypatch) -> None:
    path = _write(tmp_path / "model.safetensors", 0)
    first = C.fingerprint_files([path])
    monkeypatch.setattr(C, "_hash_tensors", _no_hashing)
    assert C.fingerprint_files([path]) == first
    # A subset of the tensors is its own entry (and its own fingerprint).
    monkeypatch.undo()
    part = C.WeightsHasher()
    part.add_file(path, ["b.bias"])
    assert part.fingerprint() != first


def test_a_rewritten_file_is_hashed_again_even_with_its_times_put_back(tmp_path) -> None:
    path = _write(tmp_path / "model.safetensors", 0)
    first = C.fingerprint_files([path])
    st = os.stat(path)
    other = _write(tmp_path / "other.safetensors", 1)
    data = other.read_bytes()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:  # the same inode, the same size, new bytes
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # modification time put back; the change time moves on
    assert C.fingerprint_files([path]) == C.fingerprint_files([other]) != first


def test_a_damaged_cache_entry_is_hashed_again(tmp_path, monkeypatch) -> None:
    path = _write(tmp_path / "model.safetensors", 0)
    first = C.fingerprint_files([path])
    entries = list((C._digest_file("x").parent).glob("*.json"))
    assert entries
    for e in entries:
        e.write_text("{not json")
    assert C.fingerprint_files([path]) == first


def test_an_unwritable_cache_folder_only_costs_time(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("PHICLIP_CACHE_DIR", str(blocker))
    path = _write(tmp_path / "model.safetensors", 0)
    assert C.fingerprint_files([path]) == C.fingerprint_files([path])


def test_a_truncated_file_is_still_named(tmp_path) -> None:
    path = _write(tmp_path / "model.safetensors", 0)
    data = path.read_bytes()
    path.write_bytes(data[:-16])
    with pytest.raises(C.CheckpointError, match="truncated"):
        C.fingerprint_files([path])
