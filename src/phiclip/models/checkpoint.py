"""Checkpoint files, read as data: JSON files, the safetensors index and headers, the tensors asked
for, fingerprints, and the strict load that names missing and unexpected tensors.

Nothing here knows a model: the Phi-3-vision image path chooses its tensors in
:mod:`phiclip.phi3v.weights`; CLIP and SigLIP checkpoints are checked here before transformers
reads them (:func:`weight_files` lists what it loads). Never pickle, never code from a checkpoint.

Checkpoints are untrusted data. Every file name taken from an index is a plain ``*.safetensors``
name resolved inside the checkpoint folder (or hub snapshot); anything else is a
:class:`~phiclip.hub.CheckpointError` naming the entry, before a file is opened. The weights that
are read are fingerprinted (:class:`WeightsHasher`): a SHA-256 over each tensor's name, dtype,
shape and bytes, so a resume or a search can tell when the weights behind a path changed.

Importing this module does not import torch (the functions that take tensors get them from callers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiclip.atomic import atomic_write_json
from phiclip.cache import cache_root
from phiclip.hub import CheckpointError, Location, resolve_file

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ==============================================================================================
# JSON files and their fields
# ==============================================================================================
def load_json_file(path: str | Path, what: str = "") -> Any:
    """Parse a checkpoint's JSON file; a :class:`CheckpointError` naming the file when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}){'; ' + what if what else ''}") from None


_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "dict": ("an object (a dict)", lambda v: isinstance(v, dict)),
}


def check_field(
    value: Any,
    field: str,
    source: str | Path,
    *,
    kind: str = "int",
    minimum: float | None = None,
    maximum: float | None = None,
    hint: str = "",
    error: type[ValueError] = CheckpointError,
) -> Any:
    """``value`` if it is of ``kind`` (``int``, ``number``, ``str``, ``bool``, ``dict``) and within
    ``[minimum, maximum]``; otherwise ``error`` with a message naming ``source`` (the file) and
    ``field``, e.g. ``config.json: img_processor.vision_config.patch_size 0 must be an integer >= 1``."""
    what, is_kind = _KINDS[kind]
    ok = is_kind(value) or (kind == "int" and type(value).__module__ == "numpy" and hasattr(value, "__index__"))
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if ok:
        return value
    if minimum is not None and maximum is not None:
        what += f" from {minimum:g} to {maximum:g}"
    elif minimum is not None:
        what += f" >= {minimum:g}"
    elif maximum is not None:
        what += f" <= {maximum:g}"
    raise error(f"{source}: {field} {value!r} must be {what}{'; ' + hint if hint else ''}")


# ==============================================================================================
# Which file holds which tensor
# ==============================================================================================
def check_shard_name(name: object, *, index_file: str | Path) -> str:
    """A shard name from an index must be a plain ``*.safetensors`` file name (no folder part, not
    absolute, no ``..``): shards are looked up inside the checkpoint folder and nowhere else."""
    if not isinstance(name, str):
        raise CheckpointError(f"{index_file}: weight_map value {name!r} is not a file name (a string)")
    plain = (
        name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not re.match(r"^[A-Za-z]:", name)
        and name.endswith(".safetensors")
    )
    if not plain:
        raise CheckpointError(
            f"{index_file}: weight_map names the shard {name!r}; a shard must be a plain *.safetensors file "
            "name inside the checkpoint folder (no folders, no absolute paths, no '..'): refused"
        )
    return name


def read_index(path: str | Path) -> dict[str, str]:
    """The ``weight_map`` of ``model.safetensors.index.json``, checked: a JSON object whose
    ``weight_map`` maps tensor names to plain shard file names (:func:`check_shard_name`)."""
    data = load_json_file(path, "the index file is damaged; download the checkpoint again")
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(f"{path} has no weight_map; the index file is damaged")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{path}: weight_map is a {type(weight_map).__name__}, not an object of tensor name -> shard file; "
            "the index file is damaged"
        )
    return {str(k): check_shard_name(v, index_file=path) for k, v in weight_map.items()}


def read_weight_map(path_or_hub_id: str | Path | Location, **hub_kwargs: Any) -> tuple[dict[str, str], bool]:
    """``(tensor name -> shard file, sharded?)`` from the index, or from the single file's header."""
    index = resolve_file(path_or_hub_id, INDEX_FILE, required=False, **hub_kwargs)
    if index is not None:
        return read_index(index), True
    single = resolve_file(path_or_hub_id, SINGLE_FILE, required=False, **hub_kwargs)
    if single is None:
        raise CheckpointError(
            f"{path_or_hub_id} has neither {INDEX_FILE} nor {SINGLE_FILE}; phiclip loads safetensors only "
            "(convert .bin/.pt weights with the safetensors converter first)"
        )
    return {k: SINGLE_FILE for k in read_safetensors_header(single)[0]}, False


def select_shards(weight_map: dict[str, str], wanted: Iterable[str]) -> dict[str, list[str]]:
    """Group the wanted tensor names by the shard that holds them (only those shards)."""
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(weight_map[name], []).append(name)
    return by_file


def weight_files(location: str | Path | Location, revision: str | None = None) -> list[Path]:
    """The safetensors files transformers loads for a checkpoint: ``model.safetensors`` when
    present, else the shards ``model.safetensors.index.json`` names (checked names)."""
    hub = {"revision": revision} if revision else {}
    single = resolve_file(location, SINGLE_FILE, required=False, **hub)
    if single is not None:
        return [single]
    index = resolve_file(location, INDEX_FILE, required=False, **hub)
    if index is None:
        raise CheckpointError(f"{location} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    return [resolve_file(location, shard, **hub) for shard in sorted(set(read_index(index).values()))]  # type: ignore[misc]


# ==============================================================================================
# Reading tensors, and the strict load
# ==============================================================================================
def load_tensors(
    path_or_hub_id: str | Path | Location,
    weight_map: dict[str, str],
    names: Iterable[str],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    opened: list[str] | None = None,
    hasher: WeightsHasher | None = None,
    **hub_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Read only ``names`` from only the shards that hold them.

    safetensors memory-maps each shard, so only the bytes of the tensors asked for are ever read
    from disk; the rest of a shard (language-model layers beside the image path) is never touched.
    ``opened`` (if given) collects the shard files that were opened, for tests and logs;
    ``hasher`` (if given) fingerprints each tensor as read, before any dtype conversion.
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for shard, keys in select_shards(weight_map, names).items():
        path = str(resolve_file(path_or_hub_id, shard, **hub_kwargs))
        if opened is not None:
            opened.append(shard)
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for damaged headers
            raise CheckpointError(f"{path_or_hub_id}: shard {shard} is damaged ({e}); download it again") from None
        with handle as f:
            present = set(f.keys())
            for name in keys:
                if name not in present:
                    raise CheckpointError(
                        f"{path_or_hub_id}: the index puts {name} in {shard}, but that shard does not hold it "
                        "(index and shards disagree; download the checkpoint again)"
                    )
                t = f.get_tensor(name)
                if hasher is not None:
                    hasher.add_tensor(name, t)
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                out[name] = t if str(device) in ("cpu", "meta") else t.to(device)
    return out


def _shown(names: list[str], limit: int = 8) -> str:
    return f"{names[:limit]}{' ...' if len(names) > limit else ''}"


@dataclass(frozen=True)
class LoadReport:
    """What a checkpoint holds against what a module expects: tensor names on neither side."""

    missing: list[str]  # the module expects them, the checkpoint lacks them
    unexpected: list[str]  # the checkpoint has them, the module has no place for them

    @classmethod
    def compare(cls, expected: Iterable[str], found: Iterable[str]) -> LoadReport:
        expected, found = set(expected), set(found)
        return cls(missing=sorted(expected - found), unexpected=sorted(found - expected))

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def raise_if_any(self, source: str | Path, what: str) -> None:
        """A :class:`CheckpointError` naming both lists when either is not empty."""
        if not self.ok:
            raise CheckpointError(
                f"{source}: {what}; missing: {_shown(self.missing)}; unexpected: {_shown(self.unexpected)}"
            )


def strict_load(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str | Path,
                what: str = "the tensors do not match the model", keep: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` (``assign=True``: the tensors become the parameters, no copy):
    every name on both sides, every shape equal, or a :class:`CheckpointError` naming the missing and
    unexpected tensors (or the shapes that differ). Module tensors whose names start with one of
    ``keep`` are not part of this load and stay as they are."""
    expected = [k for k in module.state_dict() if not (keep and k.startswith(keep))]
    LoadReport.compare(expected, state.keys()).raise_if_any(source, what)
    try:
        module.load_state_dict(dict(state), strict=not keep, assign=True)
    except RuntimeError as e:  # shapes differ: torch lists each tensor
        details = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())
        raise CheckpointError(f"{source}: {what}: {details or e}") from None


# ==============================================================================================
# Weights fingerprints
# ==============================================================================================
#: The most bytes a safetensors header may take (safetensors itself refuses larger ones).
MAX_HEADER_BYTES = 100_000_000
_HASH_CHUNK = 1 << 22  # bytes hashed per read when streaming a file
#: Bumped when what a cached digest holds changes, so that old entries are hashed again.
DIGEST_CACHE_VERSION = 1

#: torch dtype name -> safetensors dtype code (what a fingerprint records for a tensor).
_SAFETENSORS_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64",
}


class WeightsHasher:
    """A fingerprint of the tensors a model was built from: ``"sha256:<hex>"``.

    Each tensor contributes its name, its stored dtype (safetensors' code, e.g. ``BF16``), its shape
    and a SHA-256 of its bytes as stored; the fingerprint is a SHA-256 over those lines sorted by
    name, so it depends on the weights only, not on how they are split into shards or in which
    order they were read. Tensors that are never read (for Phi-3-vision, the language model) do
    not count.
    """

    def __init__(self) -> None:
        self._entries: dict[str, str] = {}

    def _add(self, name: str, dtype: str, shape: Iterable[int], digest: str) -> None:
        self._entries[name] = json.dumps([name, dtype, [int(d) for d in shape], digest])

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Add a tensor as read from a safetensors file (its bytes hashed in place, no copy)."""
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        flat = t.contiguous().reshape(-1)
        digest = hashlib.sha256()
        if flat.numel():
            import torch  # delayed on purpose: reading checkpoint files needs no torch

            digest.update(memoryview(flat.view(torch.uint8).numpy()))
        name_of = str(t.dtype).replace("torch.", "")
        dtype = _SAFETENSORS_CODES.get(name_of, name_of)
        self._add(name, dtype, t.shape, digest.hexdigest())

    def add_file(self, path: str | Path, names: Iterable[str] | None = None) -> None:
        """Add tensors of a safetensors file (all of them, or ``names``), streaming their bytes.

        The digests of a file are kept in :func:`phiclip.cache.cache_root` ``/fingerprints``
        under the file's identity (real path, device, inode, size, modification and change times):
        a later load of the same, untouched file reads them back instead of hashing every byte again
        (about 1 s per GB). Any write to the file changes its change time (which no user call can
        set back), so a changed file is hashed again."""
        header, data_start = read_safetensors_header(path)
        wanted = set(header) if names is None else set(names)
        unknown = wanted - set(header)
        if unknown:
            raise CheckpointError(f"{path} does not hold {sorted(unknown)[:4]}")
        key = _file_identity(path, header, wanted)
        cached = _read_digests(key) if key else None
        if cached is None:
            cached = _hash_tensors(path, header, data_start, wanted)
            if key:
                _write_digests(key, cached)
        for name, (dtype, shape, digest) in cached.items():
            self._add(name, dtype, shape, digest)

    def __len__(self) -> int:
        return len(self._entries)

    def fingerprint(self) -> str:
        """``"sha256:<hex>"`` over everything added."""
        outer = hashlib.sha256()
        for name in sorted(self._entries):
            outer.update(self._entries[name].encode("utf-8") + b"\n")
        return "sha256:" + outer.hexdigest()


def _hash_tensors(path: str | Path, header: dict[str, dict[str, Any]], data_start: int,
                  wanted: set[str]) -> dict[str, tuple[str, list[int], str]]:
    """``name -> (dtype, shape, sha256 of its bytes)`` for the ``wanted`` tensors of a safetensors file."""
    size = Path(path).stat().st_size
    out: dict[str, tuple[str, list[int], str]] = {}
    with open(path, "rb") as f:
        for name in sorted(wanted, key=lambda n: header[n]["data_offsets"][0]):  # read in file order
            entry = header[name]
            begin, end = entry["data_offsets"]
            if data_start + end > size:
                raise CheckpointError(f"{path} is truncated: tensor {name} ends past the end of the file")
            f.seek(data_start + begin)
            digest = hashlib.sha256()
            left = end - begin
            while left:
                chunk = f.read(min(left, _HASH_CHUNK))
                if not chunk:
                    raise CheckpointError(f"{path} is truncated: tensor {name} ends past the end of the file")
                digest.update(chunk)
                left -= len(chunk)
            out[name] = (entry["dtype"], [int(d) for d in entry["shape"]], digest.hexdigest())
    return out


def _file_identity(path: str | Path, header: dict[str, dict[str, Any]], wanted: set[str]) -> str | None:
    """The digest cache's key of a file (None when it cannot be stat'ed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = [DIGEST_CACHE_VERSION, os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
             st.st_ctime_ns, sorted(wanted), sorted((n, e["data_offsets"]) for n, e in header.items() if n in wanted)]
    return hashlib.sha256(json.dumps(ident).encode("utf-8")).hexdigest()


def _digest_file(key: str) -> Path:
    return cache_root() / "fingerprints" / f"{key}.json"


def _read_digests(key: str) -> dict[str, tuple[str, list[int], str]] | None:
    try:
        data = json.loads(_digest_file(key).read_text())
        return {str(n): (str(d), [int(x) for x in shape], str(h)) for n, (d, shape, h) in data.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # absent or damaged: hash the file again


def _write_digests(key: str, digests: dict[str, tuple[str, list[int], str]]) -> None:
    """Keep the digests (atomic; an unwritable cache folder only means hashing again next time)."""
    path = _digest_file(key)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {n: list(v) for n, v in digests.items()}, durable=False)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], int]:
    """``(tensor name -> {"dtype", "shape", "data_offsets"}, offset of the data)`` of a safetensors
    file, checked for type and range (a :class:`CheckpointError` naming the file otherwise)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            size = Path(path).stat().st_size
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path} is not a safetensors file (header length {n} for a {size}-byte file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"])
            and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1]
        )
        if not ok:
            raise CheckpointError(f"{path}: the header entry of tensor {name!r} is damaged ({entry!r:.200})")
        out[name] = entry
    return out, 8 + n


def fingerprint_files(files: Mapping[str, str | Path] | Iterable[str | Path]) -> str:
    """The :class:`WeightsHasher` fingerprint of every tensor in the given safetensors files."""
    hasher = WeightsHasher()
    for path in files.values() if isinstance(files, Mapping) else files:
        hasher.add_file(path)
    return hasher.fingerprint()


def fingerprint_module(module: torch.nn.Module) -> str:
    """The :class:`WeightsHasher` fingerprint of a module's state dict as held in memory (for
    models built in code rather than loaded; names are the module's, not a checkpoint's)."""
    hasher = WeightsHasher()
    for name, tensor in module.state_dict().items():
        hasher.add_tensor(name, tensor)
    return hasher.fingerprint()


__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointError",
    "LoadReport",
    "WeightsHasher",
    "check_field",
    "check_shard_name",
    "fingerprint_files",
    "fingerprint_module",
    "load_json_file",
    "load_tensors",
    "read_index",
    "read_safetensors_header",
    "read_weight_map",
    "select_shards",
    "strict_load",
    "weight_files",
]
