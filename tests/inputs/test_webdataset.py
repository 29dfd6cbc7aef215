"""WebDataset shards as inputs: listing (keys, annotations, braces, globs, URLs), reading members, damage."""

from __future__ import annotations

import gc
import os
import pickle
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from phiclip.cache import cache_dir
from phiclip.inputs import InputError, list_inputs, webdataset
from phiclip.inputs.records import Unreadable, record_id
from phiclip.inputs.webdataset import expand_braces
from phiclip.schema import path_to_source

from ._http import FaultServer, jpeg
from ._shards import truncate, write_shard


def test_brace_ranges() -> None:
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("s/{a,b}-{1..2}.tar") == ["s/a-1.tar", "s/a-2.tar", "s/b-1.tar", "s/b-2.tar"]
    with pytest.raises(InputError, match="not a range"):
        expand_braces("s/{a..b}.tar")


def test_samples_become_records_with_their_annotations(tmp_path) -> None:
    write_shard(tmp_path / "s" / "000.tar", ["k0", "k1"])
    write_shard(tmp_path / "s" / "001.tar", ["k2"], ext="png")
    listing = list_inputs(str(tmp_path / "s" / "{000..001}.tar"))
    shard0 = path_to_source(tmp_path / "s" / "000.tar")
    assert [r.source for r in listing.records][:2] == [f"{shard0}#k0", f"{shard0}#k1"]
    assert listing.records[0].id == record_id(f"{shard0}#k0")
    r = listing.records[1]
    assert (r.kind, r.captions, r.label, r.metadata) == ("wds", ("a photo of k1",), 1, {"key": "k1", "n": 1})
    payloads = listing.reader.read(listing.records)
    assert payloads[0] == jpeg("k0") and payloads[1] == jpeg("k1") and payloads[2] == jpeg("k2")
    assert len(list_inputs(str(tmp_path / "s" / "*.tar")).records) == 3  # a glob
    assert len(list_inputs(str(tmp_path / "s" / "000.tar")).records) == 2  # one shard


def test_a_damaged_member_fails_alone_and_a_truncated_shard_says_so(tmp_path) -> None:
    write_shard(tmp_path / "d.tar", ["a", "b", "c"], damaged={"b"})
    listing = list_inputs(str(tmp_path / "d.tar"))
    got = listing.reader.read(listing.records)
    assert got[0] == jpeg("a") and got[1] == b"not an image at all" and got[2] == jpeg("c")  # b fails at decode
    keys = [f"k{i}" for i in range(20)]
    write_shard(tmp_path / "t.tar", keys)
    truncate(tmp_path / "t.tar", 0.5)
    listing = list_inputs(str(tmp_path / "t.tar"))
    got = listing.reader.read(listing.records)
    ok = [r for r, g in zip(listing.records, got) if isinstance(g, bytes)]
    bad = [(r, g) for r, g in zip(listing.records, got) if isinstance(g, Unreadable)]
    assert 5 <= len(ok) < 20 and bad
    assert bad[-1][0].source.endswith("#<truncated>") and "truncated" in bad[-1][1].reason


def _serve_shards(tmp_path, server: FaultServer, n: int = 2) -> list[int]:
    """``n`` shards of two samples at ``/shard/000.tar``...; returns their sizes."""
    sizes = []
    for i in range(n):
        write_shard(tmp_path / f"{i:03d}.tar", [f"u{i}a", f"u{i}b"])
        server.files[f"/shard/{i:03d}.tar"] = tmp_path / f"{i:03d}.tar"
        sizes.append((tmp_path / f"{i:03d}.tar").stat().st_size)
    return sizes


def test_a_shard_url_is_downloaded_once_for_listing_and_reading(tmp_path, http_server: FaultServer) -> None:
    sizes = _serve_shards(tmp_path, http_server)
    stale = cache_dir("spool") / f"999999999@{socket.gethostname()}@x"  # a killed run's spool (no such pid)
    stale.mkdir(parents=True)
    listing = list_inputs(http_server.url("/shard/{000..001}.tar"))
    assert not stale.exists()
    assert [r.source for r in listing.records][0] == http_server.url("/shard/000.tar") + "#u0a"
    assert listing.records[1].captions == ("a photo of u0b",)
    got = listing.reader.read(listing.records)
    assert got == [jpeg("u0a"), jpeg("u0b"), jpeg("u1a"), jpeg("u1b")]
    assert [http_server.served[f"/shard/{i:03d}.tar"] for i in range(2)] == sizes  # every byte served once
    assert [http_server.hits[f"/shard/{i:03d}.tar"] for i in range(2)] == [1, 1]
    source = listing.reader.source("wds")
    copy = pickle.loads(pickle.dumps(source))  # a worker process: reads the spool, does not own it
    assert copy._spool is None and copy.read(listing.records) == got
    assert [http_server.served[f"/shard/{i:03d}.tar"] for i in range(2)] == sizes
    spool = Path(source._spool.path)
    assert spool.is_dir()
    del listing, source, copy
    gc.collect()
    assert not spool.exists()  # the spool lives as long as the listing


def test_shard_urls_that_cannot_be_spooled_are_read_by_range(tmp_path, http_server: FaultServer,
                                                              monkeypatch) -> None:
    sizes = _serve_shards(tmp_path, http_server)
    monkeypatch.setattr(webdataset, "SPOOL_MIN_FREE", 1 << 62)  # no disk has that much free
    listing = list_inputs(http_server.url("/shard/{000..001}.tar"))
    got = listing.reader.read(listing.records)
    assert got == [jpeg("u0a"), jpeg("u0b"), jpeg("u1a"), jpeg("u1b")]
    assert [http_server.hits[f"/shard/{i:03d}.tar"] for i in range(2)] == [3, 3]  # listed, then two Range reads
    assert all(http_server.served[f"/shard/{i:03d}.tar"] > sizes[i] for i in range(2))
    assert not list(cache_dir("spool").glob(f"{os.getpid()}@*"))  # an unused spool is removed at once


def test_a_shard_whose_spool_fills_the_disk_is_listed_from_the_stream(tmp_path, http_server: FaultServer,
                                                                      monkeypatch) -> None:
    sizes = _serve_shards(tmp_path, http_server, 1)
    calls = []

    def disk_usage(path: str) -> Any:  # room at the start, none after the first check while writing
        calls.append(path)
        return shutil.disk_usage(path)._replace(free=(1 << 40) if len(calls) == 1 else 0)

    monkeypatch.setattr(webdataset, "shutil", SimpleNamespace(disk_usage=disk_usage, rmtree=shutil.rmtree))
    monkeypatch.setattr(webdataset, "_SPOOL_CHECK", 1)
    listing = list_inputs(http_server.url("/shard/000.tar"))
    assert len(calls) == 2 and listing.reader.source("wds").spooled == {}
    assert http_server.served["/shard/000.tar"] == sizes[0]  # listed from what was spooled, then the stream
    assert listing.reader.read(listing.records) == [jpeg("u0a"), jpeg("u0b")]  # by Range
    assert not list(cache_dir("spool").glob(f"{os.getpid()}@*/*.tar"))  # the partial spool file removed


def test_a_shard_download_cut_short_fails_the_rest_with_a_reason(tmp_path, http_server: FaultServer) -> None:
    write_shard(tmp_path / "000.tar", [f"k{i}" for i in range(20)])
    http_server.files["/shard/000.tar"] = tmp_path / "000.tar"
    listing = list_inputs(http_server.url("/cut/000.tar"))
    got = listing.reader.read(listing.records)
    ok = [g for g in got if isinstance(g, bytes)]
    bad = [(r, g) for r, g in zip(listing.records, got) if isinstance(g, Unreadable)]
    assert 5 <= len(ok) < 20 and ok == [jpeg(f"k{i}") for i in range(len(ok))]
    assert bad[-1][0].source.endswith("#<truncated>") and "download stopped" in bad[-1][1].reason
    with pytest.raises(InputError, match="HTTP 404"):
        list_inputs(http_server.url("/shard/404.tar"))


def test_the_stream_of_a_shard_url_reads_across_any_chunking() -> None:
    data = bytes(range(256)) * 100
    for size in (1, 7, 512, 70_000):
        stream = webdataset._ChunkStream(iter([data[i : i + size] for i in range(0, len(data), size)]))
        got = [stream.read(n) for n in (1, 511, 10_240, 3)] + [stream.read()]
        assert b"".join(got) == data and [len(g) for g in got[:4]] == [1, 511, 10_240, 3]
        assert stream.read(5) == b"" and stream.read() == b""
