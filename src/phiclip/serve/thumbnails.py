"""Thumbnails of collection items, made on request and kept in a cache of bounded size.

Only items of a collection get thumbnails, addressed by collection name and item id: the image is
read from the source recorded in the collection's shards (see
:meth:`phiclip.serve.collections.Collection.image_payload`), never from a path in the request. Images
are decoded by :func:`phiclip.images.load_image` with the server's pixel limit.
"""

from __future__ import annotations

import collections
import io
import threading
from typing import Any

from phiclip.images import load_image

#: Thumbnail edge lengths (pixels, the longer side) a client may ask for.
THUMBNAIL_SIZES = (128, 256, 512)
DEFAULT_THUMBNAIL_SIZE = 256


def render_thumbnail(payload: str | bytes, size: int, *, max_pixels: int | None, quality: int = 85) -> bytes:
    """An image file path or encoded bytes -> JPEG bytes whose longer side is at most ``size``.

    Transparent images are composited onto white. Raises :class:`phiclip.images.ImageDecodeError`.
    """
    from PIL import Image


    img = load_image(payload, max_pixels=max_pixels, keep_alpha=True)
    img.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if img.mode == "RGBA":
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(img, mask=img.getchannel("A"))
        img = flat
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()


class ThumbnailCache:
    """A least-recently-used map ``key -> JPEG bytes`` holding at most ``max_bytes`` (thread-safe)."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: collections.OrderedDict[Any, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> bytes | None:
        """The cached bytes of ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: Any, data: bytes) -> None:
        """Store ``data``, evicting the least recently used entries beyond ``max_bytes`` (an entry
        larger than the whole cache is not stored)."""
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    def stats(self) -> dict[str, int]:
        """Entries, bytes held, the limit, hits and misses."""
        with self._lock:
            return {"entries": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses}


__all__ = ["DEFAULT_THUMBNAIL_SIZE", "THUMBNAIL_SIZES", "ThumbnailCache", "render_thumbnail"]
