"""Shared fixtures of the ``phiclip serve`` tests.

- ``clip_collection``: 24 generated images (4 colours x 3 shapes x 2) embedded by ``phiclip.embed`` with a
  tiny random-weight CLIP, with ``label``/``caption`` columns added to the shards (as an input table's
  metadata columns are carried into them);
- ``colour_collection``: 8 one-colour images whose vectors are their mean colour (the test-only
  ColourEncoder), so that which results come first is known;
- ``live_server``: uvicorn on a free loopback port in a thread, for concurrency and browser tests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _embdir import ColourEncoder, write_embedding_dir
from PIL import Image

import phiclip
from phiclip.pipeline.step import encode_images
from phiclip.serve import ServeOptions, build_service, create_app
from phiclip.store import shard_files
from phiclip.testing import build_tiny_clip, make_sample_images

#: Small and fast: 64-pixel inputs, 16-pixel patches, hidden 32, 2 layers.
TINY_CLIP = dict(image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, projection_dim=16)
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 230), "yellow": (240, 220, 30)}


@dataclass
class Built:
    """An embedding output directory and what is known about its rows."""

    path: Path
    spec: str
    records: list[dict[str, Any]]  # path, label, caption, ... per image


def add_columns(out_dir: Path, by_source: dict[str, dict[str, Any]]) -> None:
    """Add string columns (e.g. label, caption) to every shard, looked up by each row's source."""
    for shard in shard_files(out_dir):
        table = pq.read_table(shard)
        sources = table.column("source").to_pylist()
        names = sorted({k for v in by_source.values() for k in v})
        for name in names:
            column = pa.array([by_source.get(s, {}).get(name) for s in sources], pa.string())
            if name in table.column_names:  # embed writes an (empty) label column itself
                table = table.set_column(table.column_names.index(name), name, column)
            else:
                table = table.append_column(name, column)
        pq.write_table(table, shard)


@pytest.fixture(scope="session")
def clip_collection(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("serve-clip")
    model = build_tiny_clip(root / "clip", **TINY_CLIP)
    records = make_sample_images(root / "images", per_class=2)
    out = root / "shapes"
    phiclip.embed(f"clip:{model}", root / "images", out, progress=False, batch_size=8)
    add_columns(out, {r["path"]: {"label": r["label"], "caption": r["caption"]} for r in records})
    return Built(out, f"clip:{model}", records)


@pytest.fixture(scope="session")
def colour_collection(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("serve-colour")
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for j in range(2):
            p = root / "images" / f"{name}{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            shade = tuple(max(0, c - 40 * j) for c in rgb)
            Image.new("RGB", (40 + 8 * i, 30 + 6 * j), shade).save(p)
            records.append({"path": str(p), "label": name, "caption": f"a {name} patch", "id": f"{name}-{j}"})
    enc = ColourEncoder("clip:/models/colour")
    vectors = encode_images(enc, [r["path"] for r in records])
    out = write_embedding_dir(root / "colours", vectors, sources=[r["path"] for r in records],
                              ids=[r["id"] for r in records], spec="clip:/models/colour")
    add_columns(out, {r["path"]: {"label": r["label"], "caption": r["caption"]} for r in records})
    return Built(out, "clip:/models/colour", records)


def colour_loader(text: bool = True) -> Any:
    """An encoder loader that builds the ColourEncoder for any spec."""
    return lambda spec, **kw: ColourEncoder(str(spec), text=text)


def serve_options(**kw: Any) -> ServeOptions:
    """Options for TestClient (its requests carry ``Host: testserver``)."""
    return ServeOptions(allowed_hosts=("testserver",), **kw)


@contextlib.contextmanager
def live_server(app: Any, **config: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn (``config``: more ``uvicorn.Config`` settings) on a free loopback port in
    a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


class RecordingEncoder:
    """Wraps a loaded encoder's model calls: records the calling threads and fails if two overlap."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.threads: set[int] = set()
        self.calls: list[tuple[str, int]] = []
        self.overlaps = 0
        self._active = 0
        self._lock = threading.Lock()
        for name in ("encode_texts", "encode_batch"):
            setattr(encoder, name, self._wrap(name, getattr(encoder, name)))

    def _wrap(self, name: str, fn: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            with self._lock:
                self._active += 1
                self.overlaps += self._active > 1
                self.threads.add(threading.get_ident())
                first = args[0]
                self.calls.append((name, len(first) if hasattr(first, "__len__") else -1))
            try:
                time.sleep(0.002)  # widen the window in which an overlap would be seen
                return fn(*args, **kw)
            finally:
                with self._lock:
                    self._active -= 1

        return call


def make_app(paths: list[Path], options: ServeOptions, load: Any = None) -> tuple[Any, Any]:
    """(app, service) over ``paths``."""
    service = build_service(paths, options, load=load)
    return create_app(service), service


def vectors_close(a: Any, b: Any, tol: float = 1e-5) -> bool:
    return bool(np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=0))
