"""WebDataset shards as inputs: listing (keys, annotations, braces, globs, URLs), reading members, damage."""

from __future__ import annotations

import pytest

from phiclip.inputs import InputError, list_inputs
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


def test_shard_urls_are_read_by_range(tmp_path, http_server: FaultServer) -> None:
    for i in range(2):
        write_shard(tmp_path / f"{i:03d}.tar", [f"u{i}a", f"u{i}b"])
        http_server.files[f"/shard/{i:03d}.tar"] = tmp_path / f"{i:03d}.tar"
    listing = list_inputs(http_server.url("/shard/{000..001}.tar"))
    assert [r.source for r in listing.records][0] == http_server.url("/shard/000.tar") + "#u0a"
    got = listing.reader.read(listing.records)
    assert got == [jpeg("u0a"), jpeg("u0b"), jpeg("u1a"), jpeg("u1b")]
