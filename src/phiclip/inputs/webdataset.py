"""WebDataset tar shards as an input (record kind ``wds``): one shard (``data/000.tar``), a glob
(``'data/*.tar'``), a brace range (``'data/{000..099}.tar'``, also lists: ``{a,b}``) or shard URLs
(``https://host/data/{000..009}.tar``).

A sample is the run of consecutive members that share a key (the member's path up to the first ``.`` of
its file name, as WebDataset groups them). Its image is the first ``jpg``/``jpeg``/``png``/``webp``
member; ``txt`` gives its caption, ``cls`` its label (an integer when it is one), ``json`` its metadata.
The record id is the hash of ``SHARD#KEY`` (``source`` is that text), so ids are stable across runs,
resume and ``--update`` work per record.

Shards are never extracted: listing reads the tar headers (and the small ``txt``/``cls``/``json``
members) once, streaming; each image is later read by :class:`WebDatasetSource` from its offset in the
shard (a ``Range`` request for a shard URL). A damaged member fails its record only (at decode); a
truncated shard fails the records whose members it cuts, and one more record (``SHARD#<truncated>``)
says the samples after the cut could not be listed.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

from phiclip.fetch import FetchOptions, fetch_ranges, is_url
from phiclip.inputs.records import InputError, InputListing, Record, Source, Unreadable, record_id
from phiclip.schema import path_to_source

#: Image members, in order of preference.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
#: The largest txt / cls / json member read while listing (bytes).
MAX_ANNOTATION_BYTES = 1 << 20
TRUNCATED_KEY = "<truncated>"
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(text: str) -> list[str]:
    """``a/{000..002}.tar`` -> ``a/000.tar, a/001.tar, a/002.tar`` (zero padding kept); ``{x,y}`` -> both.

    Raises:
        InputError: a range that is not two integers, or more than a million names.
    """
    m = _BRACE.search(text)
    if m is None:
        return [text]
    body = m.group(1)
    if ".." in body:
        a, _, b = body.partition("..")
        if not (a.strip().isdigit() and b.strip().isdigit()):
            raise InputError(f"{text}: {{{body}}} is not a range of integers ({{000..099}})")
        lo, hi = int(a), int(b)
        width = len(a.strip()) if a.strip().startswith("0") else 0
        step = 1 if hi >= lo else -1
        if abs(hi - lo) > 1_000_000:
            raise InputError(f"{text}: the range {{{body}}} names more than a million shards")
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    out: list[str] = []
    for item in items:
        out += expand_braces(text[: m.start()] + item + text[m.end():])
    return out


def is_shard_name(text: str) -> bool:
    """Whether a name (path, glob, brace pattern or URL) names tar shards."""
    return text.split("?")[0].lower().endswith(".tar")


def is_webdataset(text: str) -> bool:
    """Whether an input string is a WebDataset input (see the module docstring)."""
    if not is_shard_name(text):
        return False
    return bool(_BRACE.search(text)) or is_url(text) or os.path.isfile(os.path.expanduser(text)) or \
        any(c in text for c in "*?[")


def shard_names(text: str) -> list[str]:
    """The shards an input names, in order: URLs as they are, local paths absolute (globs sorted)."""
    out: list[str] = []
    for name in expand_braces(text):
        if is_url(name):
            out.append(name)
        elif any(c in name for c in "*?["):
            out += sorted(os.path.abspath(p) for p in globlib.glob(os.path.expanduser(name)) if os.path.isfile(p))
        else:
            out.append(os.path.abspath(os.path.expanduser(name)))
    return out


def _split_name(name: str) -> tuple[str, str]:
    """A member name -> (sample key, extension lower-cased)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


class _Counting:
    """A read-only stream wrapper (for tarfile's stream mode over HTTP)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            nxt = next(self.chunks, None)
            if nxt is None:
                break
            self.buf += nxt
        if n < 0:
            out, self.buf = self.buf, b""
        else:
            out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _samples(fileobj: IO[bytes], mode: str) -> Iterator[tuple[str, dict[str, Any]] | tuple[str, str]]:
    """``(key, {ext: (offset, size) or bytes})`` per sample, then ``("<truncated>", reason)`` if cut short."""
    current: str | None = None
    members: dict[str, Any] = {}
    count = 0
    try:
        with tarfile.open(fileobj=fileobj, mode=mode) as tf:  # type: ignore[call-overload]
            while True:
                try:
                    info = tf.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    if current is not None:
                        yield current, members
                    yield TRUNCATED_KEY, f"the shard is damaged or truncated after {count} samples ({e})"
                    return
                if info is None:
                    break
                if not info.isfile():
                    continue
                key, ext = _split_name(info.name)
                if key != current:
                    if current is not None:
                        yield current, members
                        count += 1
                    current, members = key, {}
                if ext in IMAGE_MEMBERS:
                    members.setdefault("__image__", (info.offset_data, info.size, ext))
                elif ext in ("txt", "cls", "json") and info.size <= MAX_ANNOTATION_BYTES:
                    f = tf.extractfile(info)
                    data = f.read() if f is not None else b""
                    if len(data) == info.size:
                        members[ext] = data
    except (tarfile.ReadError, EOFError) as e:  # not a tar at all, or cut inside the first header
        yield TRUNCATED_KEY, f"not a readable tar shard ({e})"
        return
    if current is not None:
        yield current, members


def _annotations(members: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "txt" in members:
        text = members["txt"].decode("utf-8", "replace").strip()
        if text:
            out["captions"] = (text,)
    if "cls" in members:
        raw = members["cls"].decode("utf-8", "replace").strip()
        if raw:
            out["label"] = int(raw) if raw.lstrip("-").isdigit() else raw
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            meta = {"json": members["json"].decode("utf-8", "replace")}
        out["metadata"] = meta if isinstance(meta, dict) else {"json": meta}
    return out


def _open_shard(name: str, fetch: FetchOptions) -> tuple[IO[bytes] | _Counting, str, Any, int | None]:
    """(stream, tarfile mode, closer, size in bytes when known) of a shard."""
    if is_url(name):
        import httpx

        client = httpx.Client(timeout=httpx.Timeout(fetch.read_timeout, connect=fetch.connect_timeout),
                              follow_redirects=True, max_redirects=fetch.max_redirects, trust_env=fetch.trust_env)
        resp = client.send(client.build_request("GET", name), stream=True)
        if resp.status_code != 200:
            resp.close()
            client.close()
            raise InputError(f"{name}: HTTP {resp.status_code} {resp.reason_phrase}; check the shard URL")

        def close() -> None:
            resp.close()
            client.close()

        return _Counting(resp.iter_bytes()), "r|", close, None
    f = open(name, "rb")  # noqa: SIM115 - closed by the caller
    return f, "r:", f.close, os.fstat(f.fileno()).st_size


def list_webdataset(text: str, fetch: FetchOptions | None = None) -> InputListing:
    """The samples of WebDataset shards (see the module docstring).

    Raises:
        InputError: no shard found, a local shard missing, or a shard URL that does not answer 200.
    """
    fetch = fetch or FetchOptions()
    names = shard_names(text)
    if not names:
        raise InputError(f"{text}: no tar shards found; give data/000.tar, 'data/*.tar' or 'data/{{000..099}}.tar'")
    records: list[Record] = []
    missing = [n for n in names if not is_url(n) and not os.path.isfile(n)]
    if missing:
        raise InputError(f"{path_to_source(missing[0])}: no such shard" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + "; check the names")
    samples = 0
    for name in names:
        shard = name if is_url(name) else path_to_source(name)
        stream, mode, close, size = _open_shard(name, fetch)
        try:
            for key, got in _samples(stream, mode):  # type: ignore[arg-type]
                source = f"{shard}#{key}"
                if key == TRUNCATED_KEY:
                    records.append(Record(id=record_id(source), source=source, error=str(got), kind="wds"))
                    continue
                assert isinstance(got, dict)
                samples += 1
                ann = _annotations(got)
                image = got.get("__image__")
                if image is None:
                    records.append(Record(id=record_id(source), source=source, kind="wds", error=(
                        f"no image member ({', '.join(IMAGE_MEMBERS)}) in this sample"), **ann))
                    continue
                offset, length, _ext = image
                cut = size is not None and offset + length > size
                records.append(Record(id=record_id(source), source=source, locator=(name, offset, length), kind="wds",
                                      error="the shard is truncated inside this sample's image" if cut else None, **ann))
        finally:
            close()
    seen: set[str] = set()
    unique = []
    for r in records:
        if r.id not in seen:
            seen.add(r.id)
            unique.append(r)
    desc = {"kind": "webdataset", "location": text if is_url(text) else path_to_source(os.path.abspath(
        os.path.expanduser(text))), "shards": len(names)}
    return InputListing(desc, unique, reader=WebDatasetSource(fetch), duplicates=len(records) - len(unique))


class WebDatasetSource(Source):
    """Kind ``wds``: a sample's image member, read from its offset in the shard (``Range`` for a URL)."""

    kind = "wds"

    def __init__(self, options: FetchOptions | None = None) -> None:
        self.options = options or FetchOptions()

    @property
    def prefetch(self) -> int:  # type: ignore[override]
        return 0

    def read(self, records: Sequence[Record]) -> list[Any]:
        """The image bytes of each sample, or why they could not be read."""
        out: list[Any] = [None] * len(records)
        remote = [j for j, r in enumerate(records) if is_url(r.locator[0])]
        if remote:
            got = fetch_ranges([(records[j].locator[0], records[j].locator[1], records[j].locator[2]) for j in remote],
                               self.options)
            for j, g in zip(remote, got):
                out[j] = g
        by_shard: dict[str, list[int]] = {}
        for j, r in enumerate(records):
            if out[j] is None and j not in remote:
                by_shard.setdefault(r.locator[0], []).append(j)
        for name, at in by_shard.items():
            try:
                f = open(name, "rb")  # noqa: SIM115
            except OSError as e:
                for j in at:
                    out[j] = Unreadable("read", f"cannot open the shard ({e.strerror or e})")
                continue
            with f:
                for j in sorted(at, key=lambda j: records[j].locator[1]):
                    _, offset, length = records[j].locator
                    f.seek(offset)
                    data = f.read(length)
                    out[j] = data if len(data) == length else Unreadable(
                        "read", "the shard is truncated inside this sample's image")
        return out


def shard_path(source: str) -> str:
    """The shard part of a record source ``SHARD#KEY``."""
    return source.rsplit("#", 1)[0]


__all__ = ["IMAGE_MEMBERS", "WebDatasetSource", "expand_braces", "is_webdataset", "list_webdataset", "shard_names"]
