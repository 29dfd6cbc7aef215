"""Calibration images for static int8 quantisation (``runtime=openvino`` at ``precision=int8``).

Static quantisation fixes each activation's int8 scale ahead of time from the activations that a
few representative images produce (OpenVINO's NNCF post-training quantisation); the quantised model
then runs every product on int8 (AMX / VNNI) without measuring scales on every call. What it needs
from phiclip is a set of images like the ones it will embed, which a spec names with
``calibration=`` (any input ``phiclip embed`` reads: a folder, a glob, a list of paths, a table,
``hf:NAME``).

:func:`calibration_set` lists the input and picks up to ``count`` images spread evenly over it
(not the first ones, which in a folder are often one class); :attr:`CalibrationSet.key` names that
choice cheaply (the images' ids, and each file's path, size and modification time, or a hash of the
encoded bytes a table or dataset holds), so that a cached
quantised model is reused for the same images and made again when they change, without decoding
anything. :meth:`CalibrationSet.pixels` decodes and preprocesses them only when a model is
quantised. Torch is imported only there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from phiclip.images import try_load_image
from phiclip.inputs.listing import list_inputs
from phiclip.inputs.records import InputError, PayloadReader, Record, Unreadable

#: Calibration images for static int8, by default (NNCF's own default is 300; 128 measured as accurate,
#: see BENCHMARKS.md "CPU precision"), and the fewest accepted: scales from a handful of images clip
#: real inputs. The spec options ``calibration_images=`` (:mod:`phiclip.encoders.options`) default to these.
DEFAULT_CALIBRATION_IMAGES = 128
MIN_CALIBRATION_IMAGES = 8


def _evenly(n: int, count: int) -> list[int]:
    """``count`` positions spread evenly over ``range(n)`` (all of them when ``n <= count``)."""
    if n <= count:
        return list(range(n))
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]


@dataclass(frozen=True)
class CalibrationSet:
    """The images chosen from ``source`` to calibrate a static int8 model, and how to read them."""

    source: str  # as given; a local path made absolute
    records: list[Record]
    reader: PayloadReader = field(repr=False)
    key: str
    listed: int  # how many images the source lists

    def describe(self) -> dict[str, Any]:
        """What encoders record about the calibration (in ``describe()`` and the manifest)."""
        return {"source": self.source, "images": len(self.records), "listed": self.listed, "key": self.key}

    def pixels(self, preprocess: Callable[[Any], Any], *, keep_alpha: bool = False, most: int | None = None) -> Any:
        """Decode and preprocess the chosen images: a float32 tensor ``(n, 3, S, S)``. Images that
        fail to decode are left out. A ``preprocess`` that gives each image several crops ``(k, 3,
        S, S)`` (Phi-3-vision's HD crops) gives all of them, one after the other; ``most``: at most
        that many rows, spread evenly over them.

        Raises:
            ValueError: fewer than :data:`MIN_CALIBRATION_IMAGES` images could be used (naming the
                source and the first failures).
        """
        import torch

        payloads = self.reader.read(self.records)
        items: list[Any] = []
        failed: list[str] = []
        for rec, payload in zip(self.records, payloads):
            if isinstance(payload, Unreadable):  # the record's source could not read it
                failed.append(f"{rec.source}: {payload.reason}")
                continue
            if rec.error is not None or payload is None:
                failed.append(f"{rec.source}: {rec.error or 'no image'}")
                continue
            img, err = try_load_image(payload, keep_alpha=keep_alpha)
            if err is not None or img is None:
                failed.append(f"{rec.source}: {err.reason if err else 'no image'}")
                continue
            items.append(preprocess(img))
        if len(items) < MIN_CALIBRATION_IMAGES:
            raise ValueError(
                f"calibration={self.source}: only {len(items)} of {len(self.records)} images could be decoded "
                f"(at least {MIN_CALIBRATION_IMAGES} are needed: add decodable images to it, or raise calibration_images=)"
                + (f"; first failures: {'; '.join(failed[:3])}" if failed else "")
            )
        rows = torch.cat([t if t.ndim == 4 else t[None] for t in items])
        if most is not None and len(rows) > most:
            rows = rows[_evenly(len(rows), most)]
        return rows.to(torch.float32)


def _payload_identity(payload: Any) -> str:
    """What names one image's content without decoding it: a file's path, size and modification
    time; a hash of encoded bytes (a table's bytes column, a dataset's image dict); a hash of a
    decoded image's pixels."""
    if isinstance(payload, (str, os.PathLike)):
        try:
            st = os.stat(payload)
        except OSError:
            return f"{os.fspath(payload)}:missing"
        return f"{os.fspath(payload)}:{st.st_size}:{st.st_mtime_ns}"
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return hashlib.blake2b(bytes(payload), digest_size=16).hexdigest()
    if isinstance(payload, dict):
        data = payload.get("bytes")
        return _payload_identity(data if data is not None else payload.get("path") or "")
    if isinstance(payload, Unreadable):
        return f"unreadable:{payload.stage}:{payload.reason}"
    if isinstance(payload, Image.Image):
        return f"{payload.mode}:{payload.size}:{hashlib.blake2b(payload.tobytes(), digest_size=16).hexdigest()}"
    return type(payload).__name__


def calibration_set(source: str, count: int = DEFAULT_CALIBRATION_IMAGES, *, salt: str = "") -> CalibrationSet:
    """List ``source`` and choose up to ``count`` of its images, spread evenly over it. The key
    names their content without decoding them (:func:`_payload_identity`) and ``salt`` (what else
    the calibration pixels depend on: the encoder's preprocessing).

    Raises:
        ValueError: the source cannot be read, or lists fewer than :data:`MIN_CALIBRATION_IMAGES`
            images (naming it and the fix).
    """
    if count < MIN_CALIBRATION_IMAGES:
        raise ValueError(f"calibration_images={count}: at least {MIN_CALIBRATION_IMAGES} are needed")
    try:
        listing = list_inputs(source)
    except InputError as e:
        raise ValueError(f"calibration={source}: {e}") from None
    usable = [r for r in listing.records if r.error is None]
    if len(usable) < MIN_CALIBRATION_IMAGES:
        raise ValueError(
            f"calibration={source}: lists {len(usable)} image(s); static int8 needs at least {MIN_CALIBRATION_IMAGES} "
            f"(about {DEFAULT_CALIBRATION_IMAGES} like the ones you embed), or use runtime=onnxruntime "
            "(dynamic int8, no calibration)"
        )
    chosen = [usable[i] for i in _evenly(len(usable), count)]
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{len(chosen)}\n{salt}\n".encode())
    try:
        payloads = listing.reader.read(chosen)
    except Exception as e:  # noqa: BLE001 - a reader's own error, named with the source
        raise ValueError(f"calibration={source}: cannot read its images ({type(e).__name__}: {e})") from None
    for r, payload in zip(chosen, payloads):
        h.update(f"{r.id}:{_payload_identity(payload)}\n".encode())
    shown = source if source.startswith("hf:") or not Path(source).expanduser().exists() else str(Path(source).expanduser().resolve())
    return CalibrationSet(source=shown, records=chosen, reader=listing.reader, key=h.hexdigest(), listed=len(usable))


__all__ = ["DEFAULT_CALIBRATION_IMAGES", "MIN_CALIBRATION_IMAGES", "CalibrationSet", "calibration_set"]
