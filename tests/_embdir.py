"""Test helpers: embedding output directories written with pyarrow exactly as ``phiclip.schema`` says,
and a tiny test-only encoder whose vectors are known (mean colour of an image / a colour word)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from phiclip import schema
from phiclip.encoders.base import EncodedBatch, Encoder

COLOUR_VECTORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def write_embedding_dir(
    root: Path,
    vectors: np.ndarray,
    *,
    sources: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    spec: str = "clip:/models/tiny",
    shard_rows: int = 1000,
    dtype: str = "float32",
    normalized: bool = True,
    complete: bool = True,
    kind: str = "image",
    embedded_count: int | None = None,
) -> Path:
    """Write manifest.json and embeddings/part-*.parquet for (n, dim) ``vectors``."""
    n, dim = vectors.shape
    ids = list(ids) if ids is not None else [f"id{i:05d}" for i in range(n)]
    sources = list(sources) if sources is not None else [f"/data/img{i:05d}.jpg" for i in range(n)]
    edir = root / schema.EMBEDDINGS_DIR
    edir.mkdir(parents=True, exist_ok=True)
    vtype = pa.float16() if dtype == "float16" else pa.float32()
    for shard, start in enumerate(range(0, n, shard_rows)):
        stop = min(n, start + shard_rows)
        flat = np.ascontiguousarray(vectors[start:stop], dtype=np.dtype(dtype)).reshape(-1)
        cols: dict[str, Any] = {
            schema.COL_ID: pa.array(ids[start:stop], pa.string()),
            schema.COL_SOURCE: pa.array(sources[start:stop], pa.string()),
        }
        if kind == "text":
            cols[schema.COL_TEXT] = pa.array([f"text {i}" for i in range(start, stop)], pa.string())
        else:
            cols[schema.COL_WIDTH] = pa.array([64] * (stop - start), pa.int32())
            cols[schema.COL_HEIGHT] = pa.array([48] * (stop - start), pa.int32())
        cols[schema.COL_EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(flat, vtype), dim)
        pq.write_table(pa.table(cols), edir / schema.SHARD_PATTERN.format(shard))
    manifest = {
        "phiclip_version": "0.1.0",
        "kind": kind,
        "encoder": {"spec": spec, "name": spec, "dim": dim},
        "dim": dim,
        "dtype": dtype,
        "normalized": normalized,
        "input": {"spec": "test"},
        "counts": {"inputs": n, "embedded": n if embedded_count is None else embedded_count, "failed": 0},
        "complete": complete,
    }
    (root / schema.MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    return root


class ColourEncoder(Encoder):
    """3-d vectors: an image's mean RGB; a text's colour words ("red" -> (1, 0, 0)); for tests only."""

    def __init__(self, spec: str = "clip:/models/tiny", *, text: bool = True, dim: int = 3) -> None:
        self.name = spec
        self.dim = dim
        self.modalities = frozenset({"image", "text"} if text else {"image"})
        self.text_calls: list[list[str]] = []

    def _pad(self, v: np.ndarray) -> np.ndarray:
        return np.pad(v, (0, self.dim - 3)) if self.dim > 3 else v

    def preprocess(self, image: Any) -> np.ndarray:
        return self._pad(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0) / 255.0)

    def collate(self, items: Sequence[Any]) -> np.ndarray:
        return np.stack(items)

    def encode_batch(self, batch: Any, *, with_tokens: bool = False) -> EncodedBatch:
        return EncodedBatch(embeddings=np.asarray(batch, dtype=np.float32))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        if "text" not in self.modalities:
            return super().encode_texts(texts, batch_size)
        self.text_calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for word, vec in COLOUR_VECTORS.items():
                if word in t:
                    out[i, :3] += vec
        return out

    def describe(self) -> dict[str, Any]:
        return {"spec": self.name, "name": self.name, "dim": self.dim}
