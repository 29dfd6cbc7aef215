"""Bad images for the tests that check a command leaves them out and names them: a real
decompression bomb (a valid PNG far over the default pixel limit, a few kB on disk) and an empty file."""

from __future__ import annotations

import functools
import struct
import zlib
from pathlib import Path

#: Width and height of :func:`write_bomb`: 400 megapixels, over phiclip's default limit (89.5 M).
BOMB_SIDE = 20_000


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


@functools.cache
def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit greyscale PNG of ``side`` x ``side`` black pixels (compressed row by row, so
    making it takes little memory)."""
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def add_bomb_and_empty(folder: Path) -> tuple[Path, Path]:
    """Write ``bomb.png`` and ``empty.png`` (0 bytes) into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    bomb, empty = folder / "bomb.png", folder / "empty.png"
    bomb.write_bytes(bomb_png())
    empty.write_bytes(b"")
    return bomb, empty
