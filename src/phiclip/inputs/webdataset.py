"""WebDataset tar shards as an input (record kind ``wds``): one shard (``data/000.tar``), a glob
(``'data/*.tar'``), a brace range (``'data/{000..099}.tar'``, also lists: ``{a,b}``) or shard URLs
(``https://host/data/{000..009}.tar``).

A sample is the run of consecutive members that share a key (the member's path up to the first ``.`` of
its file name, as WebDataset groups them). Its image is the first ``jpg``/``jpeg``/``png``/``webp``
member; ``txt`` gives its caption, ``cls`` its label (an integer when it is one), ``json`` its metadata.
The record id is the hash of ``SHARD#KEY`` (``source`` is that text), so ids are stable across runs,
resume and ``--update`` work per record.

Shards are never extracted: listing reads the tar headers (and the small ``txt``/``cls``/``json``
members) once; each image is later read by :class:`WebDatasetSource` from its offset in the shard. A
shard URL is downloaded once: listing streams it into a spool file (one file per shard, in a folder of
``cache_dir("spool")`` that lives as long as the listing's source) and reads it there, and the images
are read from that file, so no byte is fetched twice. A shard is not spooled when that would leave less
than :data:`SPOOL_MIN_FREE` bytes free on the spool's disk (or the folder cannot be written): it is then
listed by streaming it and its images are read by ``Range`` requests (a second download of those bytes).
A damaged member fails its record only (at decode); a truncated shard fails the records whose members it
cuts, and one more record (``SHARD#<truncated>``) says the samples after the cut could not be listed.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from typing import IO, Any

from phiclip.cache import cache_dir
from phiclip.fetch import FetchOptions, fetch_ranges, is_url
from phiclip.inputs.records import InputError, InputListing, Record, Source, Unreadable, record_id
from phiclip.schema import path_to_source

#: Image members, in order of preference.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
#: The largest txt / cls / json member read while listing (bytes).
MAX_ANNOTATION_BYTES = 1 << 20
TRUNCATED_KEY = "<truncated>"
#: Bytes a spool leaves free on its disk: a shard URL whose download would go below is not spooled.
SPOOL_MIN_FREE = 1 << 30
#: Bytes written between two checks of the free space while a shard is spooled.
_SPOOL_CHECK = 64 << 20
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


class _ChunkStream:
    """A read-only file over an iterator of byte chunks (for tarfile's stream mode over HTTP); each byte is
    copied a bounded number of times, whatever the chunk size."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buf = b""
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) - self.pos < n:
            nxt = next(self.chunks, None)
            if nxt is None:
                break
            self.buf = self.buf[self.pos:] + nxt
            self.pos = 0
        end = len(self.buf) if n < 0 else min(len(self.buf), self.pos + n)
        out = self.buf[self.pos:end]
        self.pos = end
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


@contextlib.contextmanager
def _shard_response(name: str, fetch: FetchOptions) -> Iterator[Any]:
    """The streamed ``httpx`` response of a shard URL (closed on exit).

    Raises:
        InputError: the URL does not answer 200, or cannot be reached.
    """
    import httpx

    client = httpx.Client(timeout=httpx.Timeout(fetch.read_timeout, connect=fetch.connect_timeout),
                          follow_redirects=True, max_redirects=fetch.max_redirects, trust_env=fetch.trust_env,
                          headers={"User-Agent": fetch.user_agent})
    try:
        try:
            resp = client.send(client.build_request("GET", name), stream=True)
        except httpx.HTTPError as e:
            raise InputError(f"{name}: cannot download the shard ({type(e).__name__}: {e}); check the shard URL") from None
        try:
            if resp.status_code != 200:
                raise InputError(f"{name}: HTTP {resp.status_code} {resp.reason_phrase}; check the shard URL")
            yield resp
        finally:
            resp.close()
    finally:
        client.close()


def _remove_spool(path: str, pid: int) -> None:
    if os.getpid() == pid:  # never from a forked child that inherited the finalizer
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_spools(root: str) -> None:
    """Remove the spool folders of this host whose process is gone (a run that was killed)."""
    host = socket.gethostname()
    for entry in os.scandir(root):
        pid, at, rest = entry.name.partition("@")
        if not (at and pid.isdigit() and rest.partition("@")[0] == host) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:  # alive, someone else's
            pass


class ShardSpool:
    """The folder (under ``cache_dir("spool")``) the shard URLs of one listing are downloaded into, named
    ``PID@HOST@...``; removed when this object is collected or at exit, and by a later listing on this host
    once its process is gone (a killed run)."""

    def __init__(self) -> None:
        root = cache_dir("spool")
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_spools(str(root))
        self.path = tempfile.mkdtemp(prefix=f"{os.getpid()}@{socket.gethostname()}@", dir=root)
        self._finalizer = weakref.finalize(self, _remove_spool, self.path, os.getpid())

    def close(self) -> None:
        """Remove the folder now."""
        self._finalizer()

    @classmethod
    def create(cls) -> ShardSpool | None:
        """A new spool, or None when its folder cannot be made (shard URLs are then read by ``Range``)."""
        try:
            return cls()
        except OSError:
            return None


def _file_then(path: str, rest: Iterator[bytes]) -> Iterator[bytes]:
    """The bytes of a partial spool file (removed once read), then ``rest``."""
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            yield block
    with contextlib.suppress(OSError):
        os.unlink(path)
    yield from rest


def _spool_shard(resp: Any, spool: ShardSpool, index: int) -> tuple[str, str | None] | Iterator[bytes]:
    """Download a shard URL's response into the spool: ``(path, None)``, or ``(path, why the download
    stopped)`` for a shard that arrived in part. When the spool's disk would keep less than
    :data:`SPOOL_MIN_FREE` bytes free (or refuses a write), the shard is not spooled: what arrived, then
    the rest of the response, as a stream of bytes to list it from (nothing is downloaded twice)."""
    import httpx

    dest = os.path.join(spool.path, f"{index:06d}.tar")
    length = resp.headers.get("content-length", "")
    chunks = resp.iter_bytes()
    try:
        if shutil.disk_usage(spool.path).free - (int(length) if length.isdigit() else 0) < SPOOL_MIN_FREE:
            return chunks
        written, checked = 0, 0
        with open(dest, "wb") as f:
            try:
                for chunk in chunks:
                    f.write(chunk)
                    written += len(chunk)
                    if written - checked >= _SPOOL_CHECK:
                        checked = written
                        if shutil.disk_usage(spool.path).free < SPOOL_MIN_FREE:
                            raise OSError("the spool's disk is nearly full")
            except httpx.HTTPError as e:
                return dest, f"the download stopped after {written} bytes ({type(e).__name__}: {e})"
    except OSError:
        return _file_then(dest, chunks) if os.path.exists(dest) else chunks
    return dest, None


def _shard_records(name: str, samples: Iterator[Any], size: int | None, stopped: str | None) -> list[Record]:
    """The records of one shard from its :func:`_samples` (``size``: its length when known, to find
    images the end cuts; ``stopped``: why its download ended early)."""
    shard = name if is_url(name) else path_to_source(name)
    records: list[Record] = []
    truncated = False
    for key, got in samples:
        source = f"{shard}#{key}"
        if key == TRUNCATED_KEY:
            truncated = True
            records.append(Record(id=record_id(source), source=source, kind="wds",
                                  error=f"{got}; {stopped}" if stopped else str(got)))
            continue
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
    if stopped and not truncated:
        source = f"{shard}#{TRUNCATED_KEY}"
        records.append(Record(id=record_id(source), source=source, kind="wds",
                              error=f"the samples after the cut could not be listed: {stopped}"))
    return records


def list_webdataset(text: str, fetch: FetchOptions | None = None) -> InputListing:
    """The samples of WebDataset shards (see the module docstring).

    Raises:
        InputError: no shard found, a local shard missing, or a shard URL that does not answer 200.
    """
    fetch = fetch or FetchOptions()
    names = shard_names(text)
    if not names:
        raise InputError(f"{text}: no tar shards found; give data/000.tar, 'data/*.tar' or 'data/{{000..099}}.tar'")
    missing = [n for n in names if not is_url(n) and not os.path.isfile(n)]
    if missing:
        raise InputError(f"{path_to_source(missing[0])}: no such shard" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + "; check the names")
    records: list[Record] = []
    spool: ShardSpool | None = None
    spooled: dict[str, tuple[str, int]] = {}
    for index, name in enumerate(names):
        if not is_url(name):
            with open(name, "rb") as f:
                records += _shard_records(name, _samples(f, "r:"), os.fstat(f.fileno()).st_size, None)
            continue
        spool = spool or ShardSpool.create()
        with _shard_response(name, fetch) as resp:
            got = _spool_shard(resp, spool, index) if spool is not None else resp.iter_bytes()
            if not isinstance(got, tuple):  # not spooled: listed from the stream, its images read by Range later
                records += _shard_records(name, _samples(_ChunkStream(got), "r|"), None, None)  # type: ignore[arg-type]
                continue
        local, stopped = got
        spooled[name] = (local, os.path.getsize(local))
        with open(local, "rb") as f:
            records += _shard_records(name, _samples(f, "r:"), spooled[name][1], stopped)
    seen: set[str] = set()
    unique = []
    for r in records:
        if r.id not in seen:
            seen.add(r.id)
            unique.append(r)
    desc = {"kind": "webdataset", "location": text if is_url(text) else path_to_source(os.path.abspath(
        os.path.expanduser(text))), "shards": len(names)}
    reader = WebDatasetSource(fetch, spooled=spooled, spool=spool if spooled else None)
    if spool is not None and not spooled:
        spool.close()
    return InputListing(desc, unique, reader=reader, duplicates=len(records) - len(unique))


def _read_members(path: str, items: Sequence[tuple[int, int, int]], out: list[Any]) -> None:
    """``(position, offset, length)`` of members of one local tar file -> their bytes (or why not) in ``out``."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as e:
        for j, _, _ in items:
            out[j] = Unreadable("read", f"cannot open the shard ({e.strerror or e})")
        return
    with f:
        for j, offset, length in sorted(items, key=lambda item: item[1]):
            f.seek(offset)
            data = f.read(length)
            out[j] = data if len(data) == length else Unreadable("read", "the shard is truncated inside this sample's image")


class WebDatasetSource(Source):
    """Kind ``wds``: a sample's image member, read from its offset in the shard: a local shard, the spool
    file of a shard URL downloaded while listing (``spooled``: URL -> (path, size)), else a ``Range``
    request. ``spool`` (the listing's :class:`ShardSpool`, not pickled) keeps the spool folder alive as
    long as this source; a copy in another process reads the files while they exist, else by ``Range``."""

    kind = "wds"

    def __init__(self, options: FetchOptions | None = None, *, spooled: dict[str, tuple[str, int]] | None = None,
                 spool: ShardSpool | None = None) -> None:
        self.options = options or FetchOptions()
        self.spooled = dict(spooled or {})
        self._spool = spool

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_spool"] = None  # the folder belongs to the process that listed
        return state

    @property
    def prefetch(self) -> int:  # type: ignore[override]
        return 0

    def _local(self, name: str, known: dict[str, str | None]) -> str | None:
        """The local file holding shard ``name``: itself, or its complete spool file; None: read it by Range."""
        if name not in known:
            got = self.spooled.get(name) if is_url(name) else (name, -1)
            if got is not None and got[1] >= 0:
                try:
                    got = got if os.path.getsize(got[0]) == got[1] else None
                except OSError:
                    got = None
            known[name] = got[0] if got is not None else None
        return known[name]

    def read(self, records: Sequence[Record]) -> list[Any]:
        """The image bytes of each sample, or why they could not be read."""
        out: list[Any] = [None] * len(records)
        known: dict[str, str | None] = {}
        remote: list[int] = []
        by_file: dict[str, list[tuple[int, int, int]]] = {}
        for j, r in enumerate(records):
            name, offset, length = r.locator
            path = self._local(name, known)
            if path is None:
                remote.append(j)
            else:
                by_file.setdefault(path, []).append((j, offset, length))
        if remote:
            got = fetch_ranges([records[j].locator for j in remote], self.options)
            for j, g in zip(remote, got):
                out[j] = g
        for path, items in by_file.items():
            _read_members(path, items, out)
        return out


def shard_path(source: str) -> str:
    """The shard part of a record source ``SHARD#KEY``."""
    return source.rsplit("#", 1)[0]


__all__ = ["IMAGE_MEMBERS", "SPOOL_MIN_FREE", "ShardSpool", "WebDatasetSource", "expand_braces", "is_webdataset", "list_webdataset", "shard_names"]
