"""The lifecycle of an output folder: claim it, check that it holds this run, commit, count.

:class:`OutputDir` is the one place that decides whether a folder may be written:

- **claim** (:meth:`OutputDir.claimed`): a folder that is neither empty nor a phiclip output is refused
  before anything is written in it; the folder is created if needed and locked (``.phiclip.lock``, a
  POSIX record lock held for the whole run and unlinked when it ends, so two runs never write to one
  folder); a folder this run created is removed again if the run fails before its manifest.
- **identity** (:meth:`OutputDir.existing`, :meth:`OutputDir.refuse_if_different`,
  :meth:`OutputDir.check_encoder`; the manifest itself is :mod:`phiclip.manifest`'s): an existing output must hold the same run (kind, vector dtype,
  model and its ``weights_fingerprint``, settings, inputs), otherwise the run is refused with a
  message naming what differs.
- **progress**: :meth:`OutputDir.done_shards` (a shard is done exactly when its embeddings file
  exists, see :mod:`.writer`), :meth:`OutputDir.committed` (the ids already in the shards, for
  ``--update``), :meth:`OutputDir.write_manifest` and :meth:`OutputDir.counts`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from phiclip import manifest as manifests
from phiclip import schema
from phiclip.manifest import differences
from phiclip.pipeline.writer import OutputError, ShardWriter, write_failed

LOCK_FILE = ".phiclip.lock"


# --- the lock --------------------------------------------------------------------------------------
def _busy(root: Path) -> OutputError:
    return OutputError(
        f"{root}: another phiclip run is writing to this folder; wait for it to finish or choose another --output"
    )


def _acquire_lock(root: Path) -> int:
    """Open and lock ``ROOT/.phiclip.lock``; returns its descriptor. The file must still be the one at
    that path once locked: a run that finishes unlinks the file it holds, so one that locked the
    unlinked file tries again on a new one."""
    import fcntl

    path = root / LOCK_FILE
    for _attempt in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise OutputError(f"{root}: the folder disappeared while this run started; run the command again") from None
        except OSError as e:
            raise OutputError(
                f"{root}: cannot create the lock file {LOCK_FILE} in it ({e.strerror or e}); choose a folder you can "
                "write to for --output"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _busy(root) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            return fd
        os.close(fd)  # locked a file that the run before us unlinked as it finished: take the new one
    raise _busy(root)


def _release_lock(root: Path, fd: int) -> None:
    """Unlink the lock file (while still holding it, and only if it is ours), then unlock."""
    path = root / LOCK_FILE
    try:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                path.unlink()
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(root: Path) -> Iterator[None]:
    """An exclusive POSIX record lock on ``ROOT/.phiclip.lock`` (released by the kernel when the
    process dies, and not inherited by forked workers). The file exists only while a run holds it:
    it is unlinked, still locked, when the run ends, successful or not."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    fd = _acquire_lock(root)
    try:
        yield
    finally:
        _release_lock(root, fd)


class OutputDir:
    """One output folder of a bulk run (``kind`` ``image`` or ``text``; ``dtype`` of the stored vectors)."""

    def __init__(self, root: str | os.PathLike[str], *, kind: str, dtype: str) -> None:
        self.root = Path(root).expanduser()
        self.kind = kind
        self.dtype = dtype

    # --- claim --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def claimed(self, lock: Callable[[Path], contextlib.AbstractContextManager[Any]] = output_lock) -> Iterator[None]:
        """Create (if needed) and lock the folder for the body of the ``with``; a folder this call
        created is removed again, empty, if the body fails before the manifest is written."""
        root = self.root
        if root.is_dir() and self.read() is None:
            self._check_fresh()  # a foreign folder is refused before a lock file is made in it
        created = self._make_folder()
        locked = False
        try:
            with lock(root):
                locked = True
                try:
                    yield
                except BaseException:
                    if created:
                        self._remove_empty_parts()
                    raise
        except BaseException:
            # Only the run that made the folder and held its lock may remove it, and only once its lock
            # file is gone and the folder is empty (rmdir refuses otherwise, e.g. when a new run's lock
            # file is already in it).
            if created and locked and not (root / schema.MANIFEST_FILE).exists():
                with contextlib.suppress(OSError):
                    root.rmdir()
            raise

    def _make_folder(self) -> bool:
        """Create the folder (and its parents); True only if this call created it, so that of two runs
        started at once on a new folder exactly one counts as its creator."""
        root = self.root
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            root.mkdir()
            return True
        except FileExistsError:
            if root.is_dir():
                return False
            raise OutputError(f"{root}: exists and is not a folder; give a folder for --output") from None
        except NotADirectoryError:
            raise OutputError(f"{root}: a part of this path is a file, not a folder; choose another --output") from None
        except OSError as e:
            raise OutputError(f"{root}: cannot create the output folder ({e.strerror or e}); choose another --output") from None

    def _check_fresh(self) -> None:
        ours = {schema.EMBEDDINGS_DIR, schema.ERRORS_DIR, schema.TOKENS_DIR}
        for p in self.root.iterdir():
            if p.name.startswith("."):
                continue
            if p.is_dir() and p.name in ours and not any(p.iterdir()):
                continue
            raise OutputError(
                f"{self.root}: the folder is not empty and has no {schema.MANIFEST_FILE} (it is not a phiclip output); "
                "choose a new or empty --output folder"
            )

    def _remove_empty_parts(self) -> None:
        """Remove the empty subfolders of a folder this run created, when it failed before writing its
        manifest (called while holding the lock)."""
        if (self.root / schema.MANIFEST_FILE).exists():
            return
        for name in (schema.EMBEDDINGS_DIR, schema.ERRORS_DIR, schema.TOKENS_DIR):
            with contextlib.suppress(OSError):
                (self.root / name).rmdir()  # only if empty

    # --- identity -----------------------------------------------------------------------------
    def read(self, require: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """The folder's manifest (checked, :func:`phiclip.manifest.read_manifest`), or None when it has none."""
        return manifests.read_manifest(self.root, missing_ok=True, require=require, strict=True, error=OutputError)

    def existing(self) -> dict[str, Any] | None:
        """The manifest of the run this folder holds, or None for a new (empty) folder."""
        manifest = self.read(require=("dim",))
        if manifest is None:
            self._check_fresh()
        return manifest

    def refuse_if_different(self, what: str, old: Any, new: Any, hint: str = "") -> None:
        """Raise :class:`OutputError` listing the differences between ``old`` and ``new``, if any."""
        diffs = differences(old, new)
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise OutputError(
                f"{self.root} already holds a run with a different {what} ({shown}). Rerun with the same model and "
                f"settings to finish or reuse it, or choose another --output folder.{hint}"
            )

    def check_encoder(self, existing: dict[str, Any], describe: dict[str, Any]) -> None:
        """Refuse to add vectors from other weights, or from a model described differently, to an output
        (:func:`phiclip.manifest.check_encoder`)."""
        manifests.check_encoder(existing, describe, where=self.root, purpose="add", error=OutputError)

    # --- progress -----------------------------------------------------------------------------
    def writer(self, dim: int, annotations: bool = False) -> ShardWriter:
        """The shard writer of this folder for vectors of width ``dim`` (with the annotation columns)."""
        return ShardWriter(self.root, kind=self.kind, dim=dim, dtype=self.dtype, annotations=annotations)

    def done_shards(self) -> set[int]:
        """Shards whose embeddings file exists (committed)."""
        return self.writer(1).done_shards()

    def committed(self, shards: Sequence[int]) -> dict[str, tuple[int, str]]:
        """``{id: (shard, source)}`` of every input in the given committed shards (embedded or failed)."""
        return self.writer(1).committed_ids(shards)

    def counts(self, shards: Sequence[int]) -> dict[str, int]:
        """``{"embedded", "failed"}`` rows committed in the given shards."""
        return self.writer(1).counts(shards)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the manifest atomically (:func:`phiclip.manifest.write_manifest`).

        Raises:
            OutputError: the write failed (e.g. the disk is full), naming the folder.
        """
        try:
            manifests.write_manifest(self.root, manifest)
        except OSError as e:
            raise write_failed(self.root, manifests.manifest_path(self.root), e) from e


__all__ = ["LOCK_FILE", "OutputDir", "output_lock"]
