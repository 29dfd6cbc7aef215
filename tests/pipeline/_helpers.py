"""Helpers for the pipeline tests: a folder mixing good images with every kind of bad input, and a
tiny test-only encoder whose vectors are known (the mean colour of an image)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from phiclip.encoders.base import EncodedBatch, Encoder
from phiclip.testing import make_shape_image

#: Pixel limit the bad-input folder is meant to be embedded with (its bomb is over it, 1x20000 under).
BOMB_LIMIT = 4_000_000
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass(frozen=True)
class Expected:
    """What must happen to one input: ``embedded`` with this (width, height), or ``failed`` at ``stage``
    with ``reason_has`` in its reason."""

    outcome: str
    size: tuple[int, int] | None = None
    stage: str | None = None
    reason_has: str | None = None


def _jpeg_bytes(img: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_mixed_folder(root: Path, n_good: int = 6) -> dict[str, Expected]:
    """Write good images and every bad kind into ``root`` (some in a subfolder).

    Returns ``{absolute path: Expected}`` for every input that must be listed. Also writes entries
    that are not inputs (``notes.txt``, a hidden ``.hidden.jpg``) that must be ignored.

    Unreadable paths are made in ways that fail even for root (who can read a chmod 000 file): a
    dangling symlink and a FIFO. A chmod 000 file is added too; it fails when not running as root and
    embeds as root (root may read it), and its expectation says which.
    """
    root.mkdir(parents=True, exist_ok=True)
    sub = root / "sub" / "deeper"
    sub.mkdir(parents=True)
    exp: dict[str, Expected] = {}

    def put(rel: str, data: bytes, expected: Expected) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        exp[str(p)] = expected
        return p

    # --- good, ordinary
    for i in range(n_good):
        img = make_shape_image(["red", "green", "blue"][i % 3], "circle", size=(48 + i, 40), seed=i)
        rel = f"good_{i}.png" if i % 2 else f"sub/good_{i}.jpg"
        put(rel, _png_bytes(img) if i % 2 else _jpeg_bytes(img), Expected("embedded", (48 + i, 40)))
    # --- good, unusual
    put("tiny_1x1.png", _png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))), Expected("embedded", (1, 1)))
    put("tall_1x20000.png", _png_bytes(Image.new("RGB", (1, 20000), (10, 200, 10))), Expected("embedded", (1, 20000)))
    deep = Image.fromarray(np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100)  # mode I;16
    put("deep16.png", _png_bytes(deep), Expected("embedded", (30, 20)))
    put("cmyk.jpg", _jpeg_bytes(Image.new("CMYK", (33, 21), (0, 200, 200, 0))), Expected("embedded", (33, 21)))
    pal = Image.new("P", (25, 15))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    put("palette_alpha.png", buf.getvalue(), Expected("embedded", (25, 15)))
    put("rgba.png", _png_bytes(Image.new("RGBA", (19, 17), (0, 0, 255, 90))), Expected("embedded", (19, 17)))
    frames = [Image.new("RGB", (26, 14), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    put("sub/animated.gif", buf.getvalue(), Expected("embedded", (26, 14)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    put("rotated_exif.jpg", _jpeg_bytes(Image.new("RGB", (60, 40), (90, 90, 10)), exif=exif.tobytes()),
        Expected("embedded", (40, 60)))
    # --- bad
    put("empty.jpg", b"", Expected("failed", stage="read", reason_has="0 bytes"))
    good_jpeg = _jpeg_bytes(make_shape_image("red", "square", size=(64, 64), seed=9))
    big_jpeg = _jpeg_bytes(make_shape_image("red", "square", size=(256, 256), seed=9), quality=95)
    put("truncated.jpg", big_jpeg[: len(big_jpeg) // 2], Expected("failed", stage="decode", reason_has="truncated"))
    put("truncated_header.jpg", good_jpeg[:120], Expected("failed", stage="decode", reason_has="truncated"))
    good_png = _png_bytes(make_shape_image("blue", "square", size=(64, 64), seed=10))
    put("sub/truncated.png", good_png[: len(good_png) // 2], Expected("failed", stage="decode", reason_has="truncated"))
    put("not_an_image.jpg", b"this is a text file, not a JPEG\n" * 20, Expected("failed", stage="decode", reason_has="not a readable image"))
    put("sub/deeper/bomb.png", _png_bytes(Image.new("L", (2500, 2000), 0)), Expected("failed", stage="decode", reason_has="pixel limit"))
    dangling = root / "dangling_link.jpg"
    os.symlink(root / "does_not_exist.jpg", dangling)
    exp[str(dangling)] = Expected("failed", stage="read", reason_has="broken symbolic link")
    if hasattr(os, "mkfifo") and sys.platform != "win32":
        fifo = root / "sub" / "fifo.png"
        os.mkfifo(fifo)
        exp[str(fifo)] = Expected("failed", stage="read", reason_has="not a regular file")
    locked = put("no_permission.png", _png_bytes(Image.new("RGB", (12, 12), (1, 2, 3))), Expected("embedded", (12, 12)))
    os.chmod(locked, 0)
    if not IS_ROOT:
        exp[str(locked)] = Expected("failed", stage="read", reason_has="cannot read")
    # --- not inputs at all
    (root / "notes.txt").write_text("not an input\n")
    (root / ".hidden.jpg").write_bytes(good_jpeg)
    return exp


class MeanColourEncoder(Encoder):
    """Test-only encoder: the vector is (mean R, mean G, mean B, 0.5), L2-normalised.

    ``cost_of`` sets ``item_cost`` from the image width (to test cost-based batching); ``seen_batches``
    records each batch size (in-process runs only).
    """

    modalities = frozenset({"image", "text"})

    def __init__(self, name: str = "clip:test-mean-colour", *, wide_cost: int = 1, fail_on: int | None = None,
                 nan_on_red: bool = False) -> None:
        self.name = name
        self.dim = 4
        self.wide_cost = wide_cost
        self.fail_on = fail_on
        self.nan_on_red = nan_on_red
        self.seen_batches: list[int] = []
        self.calls = 0

    def preprocess(self, image: Any) -> dict[str, Any]:
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        mean = arr.reshape(-1, 3).mean(axis=0)
        return {"mean": mean, "cost": self.wide_cost if image.size[0] > 40 else 1}

    def item_cost(self, item: dict[str, Any]) -> int:
        return int(item["cost"])

    def collate(self, items: Sequence[dict[str, Any]]) -> np.ndarray:
        return np.stack([it["mean"] for it in items])

    def _vectors(self, means: np.ndarray) -> np.ndarray:
        v = np.concatenate([means, np.full((len(means), 1), 0.5, np.float32)], axis=1)
        if self.nan_on_red:
            v[(means[:, 0] > 0.7) & (means[:, 1] < 0.3), :] = np.nan
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def encode_batch(self, batch: np.ndarray, *, with_tokens: bool = False) -> EncodedBatch:
        self.calls += 1
        if self.fail_on is not None and self.calls >= self.fail_on:
            raise RuntimeError("simulated device failure")
        self.seen_batches.append(len(batch))
        vecs = self._vectors(batch)
        tokens = [np.stack([v, -v, v * 2]) for v in vecs] if with_tokens else None
        return EncodedBatch(embeddings=vecs.astype(np.float32), tokens=tokens)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        words = {"red": (1.0, 0, 0), "green": (0, 1.0, 0), "blue": (0, 0, 1.0)}
        means = np.array([words.get(t.split()[-1], (0.3, 0.3, 0.3)) for t in texts], dtype=np.float32)
        return self._vectors(means).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"spec": self.name, "kind": "test", "dim": self.dim, "dtype": "float32", "device": "cpu",
                "preprocessing": {"mean_colour": True}}


class DiesOnceEncoder(MeanColourEncoder):
    """Kills its own process (``os._exit``) on its ``die_on``-th batch, once: the first to get there
    creates ``marker``. Ray restarts a killed actor, whose new copy then carries on."""

    def __init__(self, marker: str, die_on: int = 3, delay: float = 0.0) -> None:
        super().__init__()
        self.marker = marker
        self.die_on = die_on
        self.delay = delay

    def encode_batch(self, batch: np.ndarray, *, with_tokens: bool = False) -> EncodedBatch:
        import time

        if self.delay:
            time.sleep(self.delay)
        if self.calls + 1 == self.die_on:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)
        return super().encode_batch(batch, with_tokens=with_tokens)
