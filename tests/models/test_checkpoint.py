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


def _no_cached_digests() -> None:
    """Empty the digest cache: the next fingerprint hashes every byte."""
    for entry in (C._digest_file("x").parent).glob("*.json"):
        entry.unlink()


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


# --- hashing on several threads, and from the tensors just read (each byte read once) ---------------


def _mixed(path: Path) -> Path:
    gen = torch.Generator().manual_seed(5)
    save_file({"big": torch.randn(300, 1000, generator=gen), "half": torch.randn(17, 3, generator=gen).to(torch.bfloat16),
               "ids": torch.arange(11, dtype=torch.int64), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "mask": torch.tensor([True, False, True])}, str(path))
    return path


def test_threads_hash_what_one_thread_hashes(tmp_path) -> None:
    path = _mixed(tmp_path / "w.safetensors")
    header, start = C.read_safetensors_header(path)
    one = C._hash_tensors(path, header, start, set(header), workers=1)
    assert C._hash_tensors(path, header, start, set(header), workers=3) == one
    # ...and what hashlib makes of each tensor's bytes, sliced out of the file by hand.
    data = path.read_bytes()
    import hashlib

    for name, (dtype, shape, digest) in one.items():
        begin, end = header[name]["data_offsets"]
        assert (dtype, shape) == (header[name]["dtype"], header[name]["shape"])
        assert digest == hashlib.sha256(data[start + begin:start + end]).hexdigest()


@pytest.mark.parametrize("workers", [1, 3])
def test_a_truncated_file_is_named_by_either_path(tmp_path, workers: int) -> None:
    path = _mixed(tmp_path / "w.safetensors")
    header, start = C.read_safetensors_header(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(C.CheckpointError, match="truncated"):
        C._hash_tensors(path, header, start, set(header), workers=workers)


def test_loaded_tensors_give_the_fingerprint_of_the_file(tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file

    path = _mixed(tmp_path / "w.safetensors")
    from_file = C.fingerprint_files([path])
    _no_cached_digests()  # hash from the tensors, not from the cache
    hasher = C.WeightsHasher()
    hasher.add_loaded_file(path, load_file(str(path)))
    assert hasher.fingerprint() == from_file
    # The digests it made are the cache's: the file is not hashed again.
    monkeypatch.setattr(C, "_hash_tensors", _no_hashing)
    assert C.fingerprint_files([path]) == from_file
    again = C.WeightsHasher()
    again.add_loaded_file(path, load_file(str(path)))
    assert again.fingerprint() == from_file
    # Some of the tensors: the fingerprint add_file gives those names.
    monkeypatch.undo()
    part, by_name = C.WeightsHasher(), C.WeightsHasher()
    part.add_loaded_file(path, {k: v for k, v in load_file(str(path)).items() if k in ("big", "ids")})
    by_name.add_file(path, ["big", "ids"])
    assert part.fingerprint() == by_name.fingerprint() != from_file


def test_loaded_tensors_of_a_rewritten_file_are_hashed_again(tmp_path) -> None:
    from safetensors.torch import load_file

    path = _write(tmp_path / "model.safetensors", 0)
    first = C.WeightsHasher()
    first.add_loaded_file(path, load_file(str(path)))
    st = os.stat(path)
    other = _write(tmp_path / "other.safetensors", 1)
    with open(path, "r+b") as f:  # the same inode and size, new bytes, the modification time put back
        f.write(other.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = C.WeightsHasher()
    second.add_loaded_file(path, load_file(str(path)))
    assert second.fingerprint() == C.fingerprint_files([other]) != first.fingerprint()


def test_tensors_that_are_not_the_files_are_refused(tmp_path) -> None:
    from safetensors.torch import load_file

    path = _write(tmp_path / "model.safetensors", 0)
    tensors = load_file(str(path))
    for bad in ({**tensors, "a.weight": tensors["a.weight"].double()}, {**tensors, "a.weight": tensors["a.weight"].t()},
                {**tensors, "extra": torch.zeros(2)}):
        with pytest.raises(C.CheckpointError, match="header"):
            C.WeightsHasher().add_loaded_file(path, bad)


def test_files_hashed_in_the_background_give_the_fingerprint_of_add_file(tmp_path) -> None:
    paths = [_write(tmp_path / "a.safetensors", 0), _mixed(tmp_path / "b.safetensors")]
    _no_cached_digests()  # hashed, not read back
    hasher = C.WeightsHasher()
    hasher.add_files_in_background(paths)
    assert hasher.fingerprint() == C.fingerprint_files(paths)
    # A file shorter than its header says is named at once; what a hashing thread raises (here: the
    # file cut short after the check) is raised where the fingerprint is read.
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(paths[0].read_bytes()[:-8])
    with pytest.raises(C.CheckpointError, match="truncated"):
        C.WeightsHasher().add_files_in_background([broken])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(paths[1].read_bytes())
    header, start = C.read_safetensors_header(cut)
    jobs = C._span_jobs(cut, header, start, set(header))
    with open(cut, "r+b") as f:
        f.truncate(start + 16)
    with pytest.raises(C.CheckpointError, match="truncated"):
        C._HashJobs(jobs, threads=2).result()


def test_a_caller_waiting_for_background_hashing_hashes_too(tmp_path, monkeypatch) -> None:
    """Background hashing leaves the caller's core free (one thread fewer); once the caller waits for
    the fingerprint it takes jobs itself."""
    import threading

    monkeypatch.setattr(C, "hash_workers", lambda: 2)
    assert C.background_hash_workers() == 1
    path = _mixed(tmp_path / "w.safetensors")
    expected = C.fingerprint_files([path])
    _no_cached_digests()
    threads: set[str] = set()
    gate = threading.Event()
    real = C._hash_span

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        if threading.current_thread().name == "phiclip-hash":
            gate.wait(10)  # the background thread holds its first job until the caller has taken some
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "_hash_span", recording)
    hasher = C.WeightsHasher()
    hasher.add_files_in_background([path])
    assert threads <= {"phiclip-hash"}  # nothing on the caller's thread until it waits
    waiter = threading.Timer(1.0, gate.set)
    waiter.start()
    hasher.wait()
    waiter.cancel()
    gate.set()
    assert threading.current_thread().name in threads and "phiclip-hash" in threads
    assert hasher.fingerprint() == expected


def test_a_lazy_fingerprint_is_computed_once_and_pickles_as_its_string() -> None:
    import pickle

    calls: list[int] = []

    def compute() -> str:
        calls.append(1)
        return "sha256:abc"

    lazy = C.LazyFingerprint(compute)
    assert calls == [] and "pending" in repr(lazy)
    suffixed = C.fingerprint_with(lazy, "|dinov2|cls")
    assert isinstance(suffixed, C.LazyFingerprint) and calls == []
    assert suffixed.value() == "sha256:abc|dinov2|cls" and lazy.value() == "sha256:abc" and calls == [1]
    assert pickle.loads(pickle.dumps(lazy)) == "sha256:abc"
    assert C.resolve_fingerprint(lazy) == "sha256:abc" and C.resolve_fingerprint(None) is None
    assert C.fingerprint_with("sha256:x", "|k") == "sha256:x|k" and C.fingerprint_with(None, "|k") is None


def test_a_failed_background_hash_is_raised_at_every_read_never_forgotten(tmp_path, monkeypatch) -> None:
    """A file removed while it is hashed: each read of the fingerprint raises the CheckpointError naming
    it (before: the second read returned the fingerprint of nothing)."""
    path = _mixed(tmp_path / "w.safetensors")
    _no_cached_digests()
    monkeypatch.setattr(C, "background_hash_workers", lambda: 0)  # nothing hashed until the fingerprint is read
    hasher = C.WeightsHasher()
    hasher.add_files_in_background([path])
    path.unlink()
    lazy = C.LazyFingerprint(hasher.fingerprint)
    for _ in range(2):
        with pytest.raises(C.CheckpointError, match="cannot read .*w.safetensors"):
            lazy.value()


def test_two_threads_waiting_for_one_hasher_both_get_the_whole_fingerprint(tmp_path) -> None:
    import threading

    paths = [_mixed(tmp_path / "a.safetensors"), _write(tmp_path / "b.safetensors", 3)]
    expected = C.fingerprint_files(paths)
    _no_cached_digests()
    hasher = C.WeightsHasher()
    hasher.add_files_in_background(paths)
    got: dict[str, str] = {}
    other = threading.Thread(target=lambda: got.setdefault("other", hasher.fingerprint()))
    other.start()
    got["this"] = hasher.fingerprint()
    other.join()
    assert got == {"other": expected, "this": expected}


def test_a_later_file_wins_a_name_in_both_whether_its_digests_were_cached_or_not(tmp_path) -> None:
    first = tmp_path / "first.safetensors"
    save_file({"x": torch.zeros(4), "only.first": torch.ones(2)}, str(first))
    second = tmp_path / "second.safetensors"
    save_file({"x": torch.ones(4)}, str(second))
    expected = C.fingerprint_files([first, second])  # both files' digests cached now
    _no_cached_digests()
    C.fingerprint_files([second])  # the second cached, the first to be hashed in the background
    hasher = C.WeightsHasher()
    hasher.add_files_in_background([first, second])
    assert hasher.fingerprint() == expected


def test_a_hasher_still_hashing_pickles_with_every_digest(tmp_path) -> None:
    import pickle

    path = _mixed(tmp_path / "w.safetensors")
    expected = C.fingerprint_files([path])
    _no_cached_digests()
    hasher = C.WeightsHasher()
    hasher.add_files_in_background([path])
    copy = pickle.loads(pickle.dumps(hasher))
    assert copy.fingerprint() == hasher.fingerprint() == expected


def test_ctrl_c_in_a_caller_hashing_too_leaves_the_job_for_a_later_wait(tmp_path, monkeypatch) -> None:
    path = _mixed(tmp_path / "w.safetensors")
    expected = C.fingerprint_files([path])
    _no_cached_digests()
    header, start = C.read_safetensors_header(path)
    jobs = C._span_jobs(path, header, start, set(header))
    interrupted = []

    def interrupt_once(job):
        def run():
            if not interrupted:
                interrupted.append(1)
                raise KeyboardInterrupt
            return job()
        return run

    first = next(iter(jobs))
    jobs[first] = interrupt_once(jobs[first])
    work = C._HashJobs(jobs, threads=0)  # every job on the caller's thread
    with pytest.raises(KeyboardInterrupt):
        work.result()
    digests = work.result()
    by_file = C.WeightsHasher()
    by_file._add_digests({n: (d, s, digests[n]) for n, (d, s) in C._meta(header, header).items()})
    assert by_file.fingerprint() == expected
