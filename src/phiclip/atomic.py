"""Atomic writes: the one way phiclip puts a file or a folder in place.

A reader (another process, a rerun after a crash) sees either the old content or the new one, never a
half-written file: the content goes to a hidden temporary name in the same folder (``.NAME.<pid>.tmp``,
which no ``*.parquet`` / ``*.json`` glob matches), is flushed and fsync'ed, then renamed over the final
name with :func:`os.replace`, and the folder is fsync'ed so that the rename survives a power cut.

Every writer of outputs, indexes, caches and checkpoints in phiclip goes through this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_directory",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "temporary_name",
]


def temporary_name(final: Path) -> Path:
    """The hidden temporary name beside ``final`` that this process writes before renaming."""
    return final.parent / f".{final.name}.{os.getpid()}.tmp"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that a rename inside it is durable (a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (e.g. a few network mounts) refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, durable: bool = True) -> Path:
    """Write a file through ``write(fileobj)`` (a binary file object) and rename it into place.

    Args:
        path: the final file name; its folder must exist.
        write: called once with the open temporary file.
        durable: fsync the file and its folder (``False`` for caches, which can be computed again).

    Returns:
        The final path. On any error the temporary file is removed and the old file, if any, is untouched.
    """
    final = Path(path)
    tmp = temporary_name(final)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(final.parent)
    return final


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data), durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """:func:`atomic_write` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | os.PathLike, data: Any, *, durable: bool = True, **dump_kwargs: Any) -> Path:
    """:func:`atomic_write` of ``data`` as JSON (``json.dumps(data, **dump_kwargs)``, newline-terminated)."""
    return atomic_write_text(path, json.dumps(data, **dump_kwargs) + "\n", durable=durable)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """A temporary file name to write with a library that wants a path (``pq.write_table``,
    ``safetensors.save_file``, ``faiss.write_index``); renamed to ``path`` when the block ends without error.

    Example::

        with atomic_path(out / "index.faiss") as tmp:
            faiss.write_index(index, str(tmp))
    """
    final = Path(path)
    tmp = temporary_name(final)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if durable and tmp.exists():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; it replaces ``path`` (and whatever was there) when the
    block ends without error, and is removed on error. Used for checkpoints and compiled-model caches.

    The swap of a folder over an existing folder is two renames (old aside, new in, old removed), so a
    crash between them leaves the old folder under a hidden name, never a half-written ``path``.
    """
    final = Path(path)
    tmp = temporary_name(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.{os.getpid()}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
