"""The one cache root of phiclip: ``$PHICLIP_CACHE``, else ``$XDG_CACHE_HOME/phiclip``, else ``~/.cache/phiclip``.

Everything phiclip caches lives in a named folder under it (:func:`cache_dir`):

==================  ===========================================================
``embeddings/``     embeddings of fine-tuning / probe images (``finetune probe``)
``teacher-tokens/`` Phi-3-vision teacher tokens (``finetune phi3v-adapter``)
``runtimes/``       models compiled by OpenVINO / ONNX Runtime
``spool/``          WebDataset shard URLs of a running listing (removed with it)
(files)             CPU precision and int8 measurements, tensor digests
==================  ===========================================================

``PHICLIP_CACHE_DIR``, the variable an earlier version read for the CPU caches only, is still honoured
(with a warning) when ``PHICLIP_CACHE`` is not set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["CACHE_ENV", "LEGACY_CACHE_ENV", "cache_dir", "cache_root"]

#: The environment variable naming the cache root.
CACHE_ENV = "PHICLIP_CACHE"
#: Read only when ``PHICLIP_CACHE`` is unset; deprecated.
LEGACY_CACHE_ENV = "PHICLIP_CACHE_DIR"

_log = logging.getLogger(__name__)
_warned = False


def cache_root() -> Path:
    """The cache root (read from the environment on every call, so tests and users can change it)."""
    global _warned
    value = os.environ.get(CACHE_ENV)
    if not value and os.environ.get(LEGACY_CACHE_ENV):
        value = os.environ[LEGACY_CACHE_ENV]
        if not _warned:
            _warned = True
            _log.warning("%s is deprecated: set %s instead (it holds every phiclip cache)",
                         LEGACY_CACHE_ENV, CACHE_ENV)
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "phiclip"


def cache_dir(name: str) -> Path:
    """``cache_root() / name`` (not created: writers create it and treat an unwritable folder as no cache)."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"cache_dir: {name!r} is not a plain folder name")
    return cache_root() / name
