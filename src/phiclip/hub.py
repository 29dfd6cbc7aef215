"""Where a checkpoint's files come from: one rule for "a local folder or a hub id", for every loader.

The rule (:func:`resolve_location`): an existing directory is local. An existing file, or text that
can only be a path (it starts with ``/``, ``./``, ``../`` or ``~``, holds a ``\\``, is ``.`` or
``..``, has a drive letter ``C:``, or holds more than one ``/``) but names no directory, is an error. Anything
else is a Hugging Face hub id (``name`` or ``org/name``).

Hub files are fetched one at a time (:func:`resolve_file`), only those asked for. Before the first
download, phiclip decides once whether the hub can be reached (:func:`hub_unreachable_reason`):
``HF_HUB_OFFLINE`` set, or one connection attempt to the hub's host with a short timeout. When it
cannot be reached, files come from the local cache only, and a file that is not cached is a clear
:class:`CheckpointError` at once (instead of half a minute of retries first).

Everything here is torch-free.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged, unsafe, or not the kind of model asked for."""


# ==============================================================================================
# Local folder or hub id
# ==============================================================================================
def looks_like_path(text: str) -> bool:
    """Whether ``text`` can only be a path, never a hub id (which is ``name`` or ``org/name``)."""
    return (
        text.startswith(("/", "./", "../", "~"))
        or "\\" in text
        or text in (".", "..")
        or (len(text) > 1 and text[1] == ":")  # C:\...
        or text.count("/") > 1
    )


@dataclass(frozen=True)
class Location:
    """A resolved model location: a local directory (``path``) or a hub id (``hub_id``)."""

    text: str
    path: Path | None = None
    hub_id: str | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else str(self.hub_id)


def resolve_location(location: str | Path) -> Location:
    """Apply the one local-or-hub rule (see the module docstring).

    Raises:
        CheckpointError: a path that names no directory (missing, or a file), with the fix.
    """
    text = str(location).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        return Location(text, path=path)
    if path.exists():
        raise CheckpointError(
            f"{text!r} is a file, not a directory; give the checkpoint's directory (config.json and the "
            "safetensors weights beside it) or a hub id such as org/name"
        )
    if isinstance(location, Path) or looks_like_path(text):
        raise CheckpointError(
            f"{text!r} is not a directory (no such directory); give a local checkpoint directory or a hub id "
            "such as org/name"
        )
    return Location(text, hub_id=text)


# ==============================================================================================
# Is the hub reachable?
# ==============================================================================================
#: Seconds one connection attempt to the hub may take before the hub counts as unreachable.
CONNECT_TIMEOUT_S = 3.0
#: Seconds a reachability answer is reused (one attempt per command, not one per file).
_PROBE_TTL_S = 60.0
_probe_lock = threading.Lock()
_probes: dict[str, tuple[float, str | None]] = {}

_TRUE = ("1", "true", "yes", "on")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def _offline_setting() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _connect_error(endpoint: str, timeout: float) -> str | None:
    """``None`` when one TCP connection to the endpoint's host opens within ``timeout`` seconds,
    else why not. With a proxy configured, the proxy decides: no direct attempt is made."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname
    if not host:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e.strerror or e})"


def hub_unreachable_reason(*, refresh: bool = False) -> str | None:
    """``None`` when the hub can be used, else why not (``HF_HUB_OFFLINE`` is set, or one
    connection attempt of :data:`CONNECT_TIMEOUT_S` seconds failed). The attempt's answer is
    reused for a minute."""
    if _offline_setting():
        return "HF_HUB_OFFLINE is set"
    endpoint = _endpoint()
    now = time.monotonic()
    with _probe_lock:
        cached = _probes.get(endpoint)
        if cached is not None and not refresh and now - cached[0] < _PROBE_TTL_S:
            return cached[1]
        reason = _connect_error(endpoint, CONNECT_TIMEOUT_S)
        _probes[endpoint] = (now, reason)
        return reason


def _cached_repo(repo_id: str, cache_dir: str | Path | None) -> bool:
    from huggingface_hub import constants

    root = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
    return (root / ("models--" + repo_id.replace("/", "--"))).is_dir()


def hub_kwargs_for_transformers(location: Location, revision: str | None = None) -> dict[str, Any]:
    """Keyword arguments for a transformers ``from_pretrained`` of ``location`` that follow the same
    rule: a pinned ``revision`` where given, and ``local_files_only=True`` while the hub is
    unreachable (the files then come from the cache, without retries)."""
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if location.hub_id is not None and hub_unreachable_reason() is not None:
        kwargs["local_files_only"] = True
    return kwargs


def snapshot_commit(path: Path) -> str | None:
    """The commit of a file in a Hugging Face cache snapshot (``.../snapshots/<commit>/file``)."""
    return path.parent.name if path.parent.parent.name == "snapshots" else None


# ==============================================================================================
# One file of a checkpoint
# ==============================================================================================
def resolve_file(
    path_or_hub_id: str | Path | Location,
    filename: str,
    *,
    required: bool = True,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path | None:
    """Path of ``filename`` in a local directory, or downloaded from a hub repo (only that file; from
    the cache alone while the hub is unreachable).

    Returns ``None`` when ``required`` is false and the file does not exist.

    Raises:
        CheckpointError: a bad location, a required file that is missing, a hub that cannot be
            reached for a file the cache lacks, or a repo that does not exist.
    """
    if filename != Path(filename).name or filename in ("", ".", ".."):
        raise CheckpointError(f"{path_or_hub_id}: refusing to open {filename!r}, which is not a plain file name")
    loc = path_or_hub_id if isinstance(path_or_hub_id, Location) else resolve_location(path_or_hub_id)
    if loc.path is not None:
        p = loc.path / filename
        if p.is_file():
            return p
        if required:
            raise CheckpointError(f"{loc.path} has no {filename}; is it a complete checkpoint directory?")
        return None
    return _hub_file(str(loc.hub_id), filename, required=required, revision=revision, cache_dir=cache_dir, token=token)


def _hub_file(
    repo_id: str, filename: str, *, required: bool, revision: str | None, cache_dir: str | Path | None,
    token: str | bool | None,
) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    unreachable = hub_unreachable_reason()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
                                    local_files_only=unreachable is not None))
    except LocalEntryNotFoundError:  # offline or unreachable, and not cached (a subclass of EntryNotFoundError)
        if not required and _cached_repo(repo_id, cache_dir):
            return None
        why = f" ({unreachable})" if unreachable else ""
        raise CheckpointError(
            f"cannot fetch {filename} of {repo_id!r}: the hub is unreachable{why} and it is not in the local "
            f"cache; {repo_id!r} is not a local directory, so it was looked up as a hub id: give a local directory "
            "instead (download the checkpoint first), or check the hub id and the network"
        ) from None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"hub repo {repo_id} has no {filename}") from None
        return None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id!r} is neither a local directory nor a hub repo you can access; "
            "check the path or the hub id (and your token for gated repos)"
        ) from None


__all__ = [
    "CONNECT_TIMEOUT_S",
    "CheckpointError",
    "Location",
    "hub_kwargs_for_transformers",
    "hub_unreachable_reason",
    "looks_like_path",
    "resolve_file",
    "resolve_location",
    "snapshot_commit",
]
