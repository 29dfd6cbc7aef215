"""Files on disk as inputs: a folder (walked recursively), a glob, a text list of paths, one image.

Files are listed in sorted order (a list file: in its order), hidden entries are skipped, and a
file without an image extension is not an input: each such file is named in
:attr:`~phiclip.inputs.records.InputListing.skipped` with the reason.
"""

from __future__ import annotations

import codecs
import glob as globlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phiclip.inputs.records import (
    InputError,
    InputListing,
    Record,
    Source,
    Unreadable,
    is_image_name,
    merge_repeats,
    path_record,
    resolve_against,
    skip_reason,
)
from phiclip.inputs.urls import remote_record
from phiclip.schema import path_to_source


def path_unreadable(path: str) -> Unreadable | None:
    """Why a path cannot be read, checked before opening it (a FIFO would block forever), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = path_to_source(os.readlink(path))
            return Unreadable("read", f"a broken symbolic link (its target {target} does not exist); fix or remove the link")
        return Unreadable("read", "no such file; check the path")
    except PermissionError as e:
        return Unreadable("read", f"cannot read ({e.strerror}); check its permissions")
    except OSError as e:
        return Unreadable("read", f"cannot read ({e.strerror or e})")
    if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        return None  # load_image names the problems of these (a folder, an empty or unreadable file)
    return Unreadable("read", "not a regular file (a FIFO, socket or device); remove it from the input")


def checked_payload(value: Any) -> Any:
    """A payload, with a path (``str``) checked by :func:`path_unreadable` first."""
    if isinstance(value, str):
        return path_unreadable(value) or value
    return value


class FileSource(Source):
    """The source of kind ``file``: a path on this machine (folder, glob, list, a table's path column). The
    payload is the path itself, checked (missing, broken link, FIFO...); decoding opens it."""

    kind = "file"

    def read(self, records: Sequence[Record]) -> list[Any]:
        """The checked path of each record."""
        return [checked_payload(r.locator) for r in records]


def list_folder(root: str | os.PathLike[str]) -> InputListing:
    """Every file with an image extension under ``root`` (recursive, symlinks followed once, hidden
    files and folders skipped), sorted by path. A subfolder that cannot be listed becomes an error
    record, so nothing under it vanishes silently."""
    top = os.path.normpath(os.path.abspath(os.fspath(root)))
    records: list[Record] = []
    seen_dirs: set[str] = set()
    skipped: list[tuple[str, str]] = []

    def on_error(err: OSError) -> None:
        where = os.fsdecode(err.filename or top)
        reason = f"cannot list this folder ({err.strerror or err}); check its permissions"
        records.append(path_record(where, error=reason))

    for dirpath, dirnames, filenames in os.walk(top, onerror=on_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        kept = sorted(d for d in dirnames if not d.startswith("."))
        skipped += [(os.path.join(dirpath, d), "hidden folder (its name starts with '.'); nothing in it is read")
                    for d in sorted(dirnames) if d.startswith(".")]
        dirnames[:] = kept
        for name in filenames:
            if name.startswith(".") or not is_image_name(name):
                skipped.append((os.path.join(dirpath, name), skip_reason(name)))
                continue
            records.append(path_record(os.path.join(dirpath, name)))
    records.sort(key=lambda r: r.locator)  # the path, so names that are not UTF-8 sort among the others
    records, dup = merge_repeats(records)
    skipped.sort()
    return InputListing({"kind": "folder", "location": path_to_source(top)}, records, duplicates=dup,
                        ignored=len(skipped), skipped=skipped)


def list_glob(pattern: str) -> InputListing:
    """Files matched by a glob pattern (``**`` recurses) that have an image extension, sorted."""
    base = os.path.abspath(os.path.expanduser(pattern))
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    for match in globlib.glob(base, recursive=True):
        if os.path.isdir(match):
            continue
        if not is_image_name(match):
            skipped.append((os.path.normpath(match), skip_reason(match)))
            continue
        records.append(path_record(os.path.normpath(match)))
    records.sort(key=lambda r: r.locator)
    records, dup = merge_repeats(records)
    skipped.sort()
    return InputListing({"kind": "glob", "location": path_to_source(base)}, records, duplicates=dup,
                        ignored=len(skipped), skipped=skipped)


def list_path_file(path: str | os.PathLike[str]) -> InputListing:
    """A text file of image paths, one per line, in file order (blank and ``#`` lines skipped);
    relative paths are read from the list's folder. A line may be an ``http(s)://`` URL or a ``data:``
    URI instead (records of kind ``url`` / ``data``, :mod:`phiclip.inputs.urls`).

    Lines are file names as bytes (POSIX paths need not be UTF-8): a line that is not UTF-8 names the
    file with exactly those bytes. A file holding NUL bytes (binary, or UTF-16 text) is refused.
    """
    p = Path(path).expanduser().absolute()
    data = p.read_bytes()
    if b"\x00" in data:
        raise InputError(
            f"{path_to_source(p)}: not a text file of paths (it holds NUL bytes, which no path has: binary or "
            "UTF-16?); save it as UTF-8 text with one path per line, or give a folder, a glob, a Parquet/CSV "
            "table or hf:DATASET"
        )
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    records: list[Record] = []
    ignored = 0
    for line in (os.fsdecode(raw) for raw in data.splitlines()):
        s = line.strip()
        if not s or s.startswith("#"):
            ignored += 1
            continue
        remote = remote_record(s)  # a URL or data: URI where a path could be
        records.append(remote if remote is not None else path_record(resolve_against(p.parent, s)))
    records, dup = merge_repeats(records)
    return InputListing({"kind": "list", "location": path_to_source(p)}, records, duplicates=dup, ignored=ignored)


def list_image_file(path: str | os.PathLike[str]) -> InputListing:
    """One image file."""
    p = Path(path).expanduser().absolute()
    return InputListing({"kind": "file", "location": path_to_source(p)}, [path_record(str(p))])


def has_glob(s: str) -> bool:
    """Whether a string holds glob characters."""
    return any(c in s for c in "*?[")
