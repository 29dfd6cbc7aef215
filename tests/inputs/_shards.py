"""WebDataset shards written by the tests (tar files of jpg + txt + cls + json members)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from ._http import jpeg


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, keys: list[str], *, damaged: set[str] = frozenset(), ext: str = "jpg",
                annotations: bool = True) -> list[str]:
    """A shard with one sample per key (image, caption, label, metadata); ``damaged`` keys get bytes that
    are not an image. Returns the keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for i, key in enumerate(keys):
            _add(tf, f"{key}.{ext}", b"not an image at all" if key in damaged else jpeg(key))
            if annotations:
                _add(tf, f"{key}.txt", f"a photo of {key}".encode())
                _add(tf, f"{key}.cls", str(i % 3).encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "n": i}).encode())
    return keys


def truncate(path: Path, keep: float) -> None:
    """Cut a shard to ``keep`` of its length."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
