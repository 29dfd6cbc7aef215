"""Checkpoint files, read as data: JSON files, the safetensors index and headers, the tensors asked
for, fingerprints, and the strict load that names missing and unexpected tensors.

Nothing here knows a model: the Phi-3-vision image path chooses its tensors in
:mod:`phiclip.phi3v.weights`; every kind opens its checkpoint through
:func:`phiclip.checkpoints.open_checkpoint`, which uses the checks here (config sizes, image
processor values, index). Never pickle, never code from a checkpoint.

Checkpoints are untrusted data. Every file name taken from an index is a plain ``*.safetensors``
name resolved inside the checkpoint folder (or hub snapshot); anything else is a
:class:`~phiclip.hub.CheckpointError` naming the entry, before a file is opened. The weights that
are read are fingerprinted (:class:`WeightsHasher`): a SHA-256 over each tensor's name, dtype,
shape and bytes, so a resume or a search can tell when the weights behind a path changed.

Importing this module does not import torch (the functions that take tensors get them from callers).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiclip.atomic import atomic_write_json
from phiclip.cache import cache_dir
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
# Sizes in config.json, pixel values in the image processor's config
# ==============================================================================================
#: Size fields of a model config, wherever they appear (the top level, ``vision_config``,
#: ``text_config``, ``img_processor.vision_config``...), and the largest value accepted: far above any
#: released model, far below what overflows a tensor's storage size.
SIZE_FIELDS: dict[str, int] = {
    "hidden_size": 1 << 17, "n_embd": 1 << 17, "intermediate_size": 1 << 19, "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "patch_size": 1 << 12, "image_size": 1 << 14,
    "max_position_embeddings": 1 << 24, "vocab_size": 1 << 22, "num_channels": 64, "projection_dim": 1 << 17,
}
#: The most parameters one section of a config may imply (about 69 billion): a damaged or hostile size
#: is refused before any tensor is built (torch would end in "Storage size calculation overflowed").
MAX_PARAMETERS = 1 << 36
#: The largest image side an image processor config may ask for (``size``, ``crop_size``).
MAX_IMAGE_SIDE = 1 << 14
_MAX_DEPTH = 4


def _estimated_parameters(part: dict[str, Any]) -> int:
    """About how many parameters a transformer section with these sizes holds (an upper estimate)."""
    h = part.get("hidden_size") or part.get("n_embd") or 0
    layers = part.get("num_hidden_layers") or 1
    inter = part.get("intermediate_size") or 4 * h
    grid = (part.get("image_size") or 0) // (part.get("patch_size") or 1)
    per_token = (part.get("vocab_size") or 0) + (part.get("max_position_embeddings") or 0) + grid * grid
    patch = (part.get("patch_size") or 0) ** 2 * (part.get("num_channels") or 3)
    return h * (per_token + patch) + layers * (4 * h * h + 2 * h * inter)


def check_config_sizes(config: Any, source: str | Path, prefix: str = "") -> None:
    """Check every size field of a model config (:data:`SIZE_FIELDS`, in any nested section): an
    integer from 1 to its bound, heads dividing the width, ``*_config`` sections objects, and the
    parameters each section implies at most :data:`MAX_PARAMETERS`.

    Raises:
        CheckpointError: naming ``source`` (the file) and the field, e.g. ``config.json:
            vision_config.hidden_size 1000000000000 must be an integer from 1 to 131072``.
    """
    check_field(config, prefix.rstrip(".") or "(the whole file)", source, kind="dict")
    for key, value in config.items():
        if value is None:
            continue
        if key in SIZE_FIELDS:
            check_field(value, prefix + key, source, minimum=1, maximum=SIZE_FIELDS[key])
        elif isinstance(value, dict) and prefix.count(".") < _MAX_DEPTH:
            check_config_sizes(value, source, prefix + key + ".")
        elif key.endswith("_config"):
            check_field(value, prefix + key, source, kind="dict")
    width, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise CheckpointError(f"{source}: {prefix}hidden_size {width} is not divisible by "
                              f"{prefix}num_attention_heads {heads}")
    n = _estimated_parameters(config)
    if n > MAX_PARAMETERS:
        sizes = ", ".join(f"{prefix}{k} {config[k]}" for k in SIZE_FIELDS if config.get(k) is not None)
        raise CheckpointError(f"{source}: {sizes} make a model of about {n:.3g} parameters, over the "
                              f"{MAX_PARAMETERS:.3g} phiclip loads; the config is damaged")


def check_mean_std(config: dict[str, Any], source: str | Path, *, prefix: str = "",
                   default: tuple[Any, Any] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``image_mean`` and ``image_std`` of an image processor config as 3 numbers each (a single
    number stands for all 3 when ``default`` is None, as transformers reads it), ``image_std``
    without 0. ``default``: the (mean, std) for keys left out; without one, both absent -> None.

    Raises:
        CheckpointError: naming ``source`` and the field.
    """
    if default is None and config.get("image_mean") is None and config.get("image_std") is None:
        return None
    stats = []
    for i, key in enumerate(("image_mean", "image_std")):
        value = config.get(key, default[i] if default is not None else None)
        if default is None and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise CheckpointError(f"{source}: {prefix}{key} {value!r} must be a list of 3 numbers (one per RGB channel)")
        stats.append(tuple(float(check_field(v, f"{prefix}{key}[{j}]", source, kind="number"))
                           for j, v in enumerate(value)))
    if any(s == 0 for s in stats[1]):
        raise CheckpointError(f"{source}: {prefix}image_std {list(stats[1])} must not contain 0")
    return stats[0], stats[1]


def check_image_processor_values(config: Any, source: str | Path, prefix: str = "") -> None:
    """Check the values of an image processor config that decide the pixels, for every kind:
    ``image_mean`` / ``image_std`` (:func:`check_mean_std`), ``size`` and ``crop_size`` (an integer,
    or an object of ``height``, ``width``, ``shortest_edge``, ``longest_edge``, each from 1 to
    :data:`MAX_IMAGE_SIDE`), ``rescale_factor`` (a finite number > 0) and ``resample`` (PIL's 0-5).

    Raises:
        CheckpointError: naming ``source`` (e.g. ``preprocessor_config.json``) and the field.
    """
    check_field(config, prefix.rstrip(".") or "(the whole file)", source, kind="dict")
    check_mean_std(config, source, prefix=prefix)
    for key in ("size", "crop_size"):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, dict):
            for side in ("height", "width", "shortest_edge", "longest_edge"):
                if value.get(side) is not None:
                    check_field(value[side], f"{prefix}{key}.{side}", source, minimum=1, maximum=MAX_IMAGE_SIDE)
        else:
            check_field(value, prefix + key, source, minimum=1, maximum=MAX_IMAGE_SIDE,
                        hint='an integer or an object such as {"height": 224, "width": 224}')
    if config.get("rescale_factor") is not None:
        rescale = check_field(config["rescale_factor"], prefix + "rescale_factor", source, kind="number", minimum=0)
        if rescale == 0:
            raise CheckpointError(f"{source}: {prefix}rescale_factor 0 must be above 0 (usually 1/255)")
    if config.get("resample") is not None:
        check_field(config["resample"], prefix + "resample", source, minimum=0, maximum=5,
                    hint="a PIL resampling filter number (3: bicubic)")


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


def read_weight_map(path_or_hub_id: str | Path | Location, *,
                    find_file: Callable[..., Path | None] | None = None, **hub_kwargs: Any) -> tuple[dict[str, str], bool]:
    """``(tensor name -> shard file, sharded?)`` from the index, or from the single file's header.
    ``find_file(name, required=...)`` (if given) finds a file of the checkpoint (default:
    :func:`~phiclip.hub.resolve_file` with ``hub_kwargs``)."""
    def find(name: str) -> Path | None:
        if find_file is not None:
            return find_file(name, required=False)
        return resolve_file(path_or_hub_id, name, required=False, **hub_kwargs)

    index = find(INDEX_FILE)
    if index is not None:
        return read_index(index), True
    single = find(SINGLE_FILE)
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
    shard_path: Callable[[str], Path] | None = None,
    **hub_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Read only ``names`` from only the shards that hold them.

    safetensors memory-maps each shard, so only the bytes of the tensors asked for are ever read
    from disk; the rest of a shard (language-model layers beside the image path) is never touched.
    ``opened`` (if given) collects the shard files that were opened, for tests and logs;
    ``hasher`` (if given) fingerprints each tensor as read, before any dtype conversion;
    ``shard_path`` (if given) finds a shard file by name (default: :func:`~phiclip.hub.resolve_file`).
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for shard, keys in select_shards(weight_map, names).items():
        path = str(shard_path(shard) if shard_path is not None else resolve_file(path_or_hub_id, shard, **hub_kwargs))
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

    Tensors are hashed on :func:`hash_workers` threads at once (hashlib lets go of the GIL while it
    hashes a large buffer). :meth:`add_loaded_file` and :meth:`add_files_in_background` hash in the
    background, on one thread fewer (the caller's core is left to it while it goes on); a caller
    that then waits for the fingerprint (:meth:`fingerprint`, :meth:`wait`) hashes what is left beside
    them, so a fingerprint wanted at once still takes every core.
    """

    def __init__(self) -> None:
        self._entries: dict[str, str] = {}
        self._pending: list[_PendingDigests] = []
        self._waiting = threading.Lock()  # one thread at a time collects the background digests

    def __getstate__(self) -> dict[str, Any]:
        """Pickled with every digest (waiting for the background hashing first), without its lock."""
        self.wait()
        return {"_entries": dict(self._entries)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._entries, self._pending, self._waiting = dict(state["_entries"]), [], threading.Lock()

    def _add(self, name: str, dtype: str, shape: Iterable[int], digest: str) -> None:
        self._entries[name] = json.dumps([name, dtype, [int(d) for d in shape], digest])

    def _add_digests(self, digests: Mapping[str, tuple[str, list[int], str]]) -> None:
        for name, (dtype, shape, digest) in digests.items():
            self._add(name, dtype, shape, digest)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Add a tensor as read from a safetensors file (its bytes hashed in place, no copy)."""
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        flat = t.contiguous().reshape(-1)
        name_of = str(t.dtype).replace("torch.", "")
        dtype = _SAFETENSORS_CODES.get(name_of, name_of)
        self._add(name, dtype, t.shape, _sha256_hex(_tensor_bytes(flat)))

    def add_file(self, path: str | Path, names: Iterable[str] | None = None) -> None:
        """Add tensors of a safetensors file (all of them, or ``names``), streaming their bytes.

        The digests of a file are kept in :func:`phiclip.cache.cache_dir` ``("fingerprints")``
        under the file's identity (real path, device, inode, size, modification and change times):
        a later load of the same, untouched file reads them back instead of hashing every byte again
        (about 1 s per GB and core). Any write to the file changes its change time (which no user
        call can set back), so a changed file is hashed again."""
        self._add_digests(_file_digests(path, names))

    def add_files_in_background(self, paths: Iterable[str | Path]) -> None:
        """:meth:`add_file` of every tensor of each file, hashed **in the background** (the caller goes
        on, e.g. while another library reads the same files); :meth:`fingerprint` (and :meth:`wait`)
        waits for it and raises what it raised. Headers, truncation and the digest cache are checked
        now. The files are read again by position, so whatever the caller does with its own copies
        of the tensors does not change what is hashed."""
        files: list[_FileDigests] = []
        jobs: dict[tuple[int, str], Callable[[], str]] = {}
        for path in paths:
            header, data_start = read_safetensors_header(path)
            wanted = set(header)
            key, cached = _cached_digests(path, header, wanted)
            if cached is None:
                jobs.update({(len(files), name): job for name, job in _span_jobs(path, header, data_start, wanted).items()})
            files.append(_FileDigests(key, _meta(header, wanted), cached))  # in order: a later file's tensor wins
        pending = _PendingDigests(files, _HashJobs(jobs, background_hash_workers()))
        if jobs:
            self._pending.append(pending)
        else:
            self._add_digests(pending.result())

    def add_loaded_file(self, path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add the tensors just read from the safetensors file ``path`` (``tensors``: name -> tensor as
        stored, e.g. from safetensors' ``load_file``, all of the file's or some), with the same
        entries as :meth:`add_file` of those names, reading each byte once: the tensors' own memory
        is hashed (for ``load_file``'s memory-mapped tensors, the file's bytes themselves; the pages
        the model will use are brought in on the way), **in the background** (on
        :func:`background_hash_workers` threads), so the caller can build its model meanwhile.
        :meth:`fingerprint` waits for it; the tensors must not be changed in place before.

        The digest cache is used as :meth:`add_file` uses it (its key taken now, before any byte is
        hashed; the digests written once hashed).

        Raises:
            CheckpointError: a tensor the file's header does not hold, or holds with another dtype,
                shape or size.
        """
        header, _ = read_safetensors_header(path)
        for name, tensor in tensors.items():
            entry = header.get(name)
            begin, end = entry["data_offsets"] if entry else (0, 0)
            name_of = str(tensor.dtype).replace("torch.", "")
            if (entry is None or _SAFETENSORS_CODES.get(name_of) != entry["dtype"]
                    or list(tensor.shape) != list(entry["shape"])
                    or tensor.numel() * tensor.element_size() != end - begin):
                raise CheckpointError(f"{path}: tensor {name!r} ({name_of}, {tuple(tensor.shape)}) is not the one "
                                      f"its header describes ({entry!r:.200})")
        wanted = set(tensors)
        key, cached = _cached_digests(path, header, wanted)
        if cached is not None:
            self._add_digests(cached)
            return
        buffers = {n: _tensor_bytes(t.detach().reshape(-1)) for n, t in tensors.items()}
        jobs = {(0, n): functools.partial(_sha256_hex, buffers[n])
                for n in sorted(buffers, key=lambda n: -len(buffers[n]))}  # the largest first: threads finish together
        self._pending.append(_PendingDigests([_FileDigests(key, _meta(header, wanted))],
                                             _HashJobs(jobs, background_hash_workers())))

    def wait(self) -> None:
        """Wait for the background hashing (:meth:`add_loaded_file`, :meth:`add_files_in_background`),
        hashing what is left on this thread too, and add its digests. What the hashing raised is raised
        again by every later call (the work stays pending: a fingerprint is never made without it)."""
        with self._waiting:
            while self._pending:
                digests = self._pending[0].result()
                self._add_digests(digests)
                self._pending.pop(0)

    def __len__(self) -> int:
        self.wait()
        return len(self._entries)

    def fingerprint(self) -> str:
        """``"sha256:<hex>"`` over everything added (waiting for any background hashing)."""
        self.wait()
        outer = hashlib.sha256()
        for name in sorted(self._entries):
            outer.update(self._entries[name].encode("utf-8") + b"\n")
        return "sha256:" + outer.hexdigest()


class LazyFingerprint:
    """A weights fingerprint still being computed (hashing in the background): :meth:`value` waits
    for it the first time and then keeps it. An encoder holds one from its load until something
    reads its fingerprint (a manifest, a compiled runtime's cache key, ``describe()``), so a load
    whose fingerprint is never read does not wait for the hashing. It pickles as the fingerprint
    string itself (waiting for it)."""

    def __init__(self, compute: Callable[[], str]) -> None:
        self._compute: Callable[[], str] | None = compute
        self._value: str | None = None
        self._lock = threading.Lock()

    def value(self) -> str:
        """The fingerprint (``"sha256:<hex>"``), waiting for the hashing the first time."""
        with self._lock:
            if self._compute is not None:
                self._value, self._compute = self._compute(), None
            assert self._value is not None
            return self._value

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (self.value(),))

    def __repr__(self) -> str:
        return f"LazyFingerprint({self._value or 'pending'})"


def resolve_fingerprint(fingerprint: str | LazyFingerprint | None) -> str | None:
    """The fingerprint string of ``fingerprint`` (waiting for a :class:`LazyFingerprint`); None stays None."""
    return fingerprint.value() if isinstance(fingerprint, LazyFingerprint) else fingerprint


def fingerprint_with(fingerprint: str | LazyFingerprint | None, suffix: str) -> str | LazyFingerprint | None:
    """``f"{fingerprint}{suffix}"`` (a key naming the weights and what else changes an output),
    lazy while ``fingerprint`` is; None stays None."""
    if fingerprint is None:
        return None
    if isinstance(fingerprint, LazyFingerprint):
        return LazyFingerprint(lambda: f"{fingerprint.value()}{suffix}")
    return f"{fingerprint}{suffix}"


#: The most threads that hash tensors at once.
MAX_HASH_WORKERS = 4


def hash_workers() -> int:
    """Threads that hash tensors at once: the cores this process may run on, at most
    :data:`MAX_HASH_WORKERS` (SHA-256 runs about 1.6 GB/s a core with the CPU's SHA instructions)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_HASH_WORKERS))


def background_hash_workers() -> int:
    """Threads that hash in the background while the caller goes on: one fewer than
    :func:`hash_workers` (the caller's core stays its own), at least one."""
    return max(1, hash_workers() - 1)


def _tensor_bytes(flat: torch.Tensor) -> memoryview:
    """The bytes of a flat CPU tensor, without a copy (a contiguous copy first when it is not)."""
    import torch  # delayed on purpose: reading checkpoint files needs no torch

    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if not flat.numel():
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _sha256_hex(data: Any) -> str:
    digest = hashlib.sha256()
    if len(data):
        digest.update(data)
    return digest.hexdigest()


class _HashJobs:
    """SHA-256 digests of named jobs (``key -> compute``), taken from one queue in the order given by
    ``threads`` background threads; a caller of :meth:`result` takes jobs too until none is
    left, then waits for the ones in flight. The first error stops the rest and is raised by
    :meth:`result`. The threads end when the queue is empty (not daemons: a process exiting waits for
    them rather than unmapping memory they read)."""

    def __init__(self, jobs: Mapping[Any, Callable[[], str]], threads: int) -> None:
        self._queue = collections.deque(jobs.items())
        self._left = len(self._queue)
        self._digests: dict[Any, str] = {}
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        for _ in range(min(max(0, threads), len(self._queue))):
            threading.Thread(target=self._work, name="phiclip-hash").start()

    def _work(self) -> None:
        while True:
            with self._changed:
                if not self._queue:
                    return
                key, compute = self._queue.popleft()
            try:
                digest, error = compute(), None
            except Exception as e:  # noqa: BLE001 - handed to the caller of result()
                digest, error = "", e
            except BaseException:  # Ctrl-C in a caller hashing too: the job goes back, for a later wait
                with self._changed:
                    self._queue.appendleft((key, compute))
                raise
            with self._changed:
                self._left -= 1
                if error is not None:
                    self._error = self._error or error
                    self._left -= len(self._queue)  # nothing more is started
                    self._queue.clear()
                else:
                    self._digests[key] = digest
                self._changed.notify_all()

    def result(self) -> dict[Any, str]:
        """Every job's digest (hashing on this thread too while jobs are left)."""
        self._work()
        with self._changed:
            self._changed.wait_for(lambda: self._left == 0)
            if self._error is not None:
                raise self._error
            return dict(self._digests)


@dataclass
class _FileDigests:
    """What a file's digests are filed under: its digest cache key, and ``name -> (dtype, shape)``; or
    its digests already read back from the cache (``ready``)."""

    key: str | None
    meta: dict[str, tuple[str, list[int]]]
    ready: dict[str, tuple[str, list[int], str]] | None = None


@dataclass
class _PendingDigests:
    """Digests being computed in the background: :class:`_HashJobs` keyed ``(file index, tensor name)``."""

    files: list[_FileDigests]
    jobs: _HashJobs

    def result(self) -> dict[str, tuple[str, list[int], str]]:
        """``name -> (dtype, shape, digest)`` of every file (each kept in the digest cache)."""
        digests = self.jobs.result()
        out: dict[str, tuple[str, list[int], str]] = {}
        for i, file in enumerate(self.files):
            if file.ready is not None:
                out.update(file.ready)
                continue
            these = {name: (dtype, shape, digests[(i, name)]) for name, (dtype, shape) in file.meta.items()}
            if file.key:
                _write_digests(file.key, these)
                file.ready = these  # written once, even when result() is asked again
            out.update(these)
        return out


def _meta(header: dict[str, dict[str, Any]], names: Iterable[str]) -> dict[str, tuple[str, list[int]]]:
    """``name -> (dtype, shape)`` of ``names`` in a safetensors header."""
    return {n: (header[n]["dtype"], [int(d) for d in header[n]["shape"]]) for n in names}


#: A hashing thread's read buffer (one per thread, made on its first read).
_READ_BUFFERS = threading.local()


def _span_jobs(path: str | Path, header: dict[str, dict[str, Any]], data_start: int, wanted: Iterable[str], *,
               largest_first: bool = True) -> dict[str, Callable[[], str]]:
    """A :class:`_HashJobs` job per ``wanted`` tensor of a safetensors file: its bytes read from the file
    (its own handle, seek and read) and hashed; the largest first (threads finish together) or in file
    order. Raises :class:`CheckpointError` now for a file too short for its header."""
    size = Path(path).stat().st_size
    order = sorted(wanted, key=lambda n: header[n]["data_offsets"][0])  # file order
    for name in order:
        if data_start + header[name]["data_offsets"][1] > size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends past the end of the file")
    if largest_first:
        order.sort(key=lambda n: header[n]["data_offsets"][0] - header[n]["data_offsets"][1])

    def job(name: str) -> str:
        buffer = getattr(_READ_BUFFERS, "buffer", None)
        if buffer is None:
            buffer = _READ_BUFFERS.buffer = bytearray(_HASH_CHUNK)
        try:
            with open(path, "rb", buffering=0) as f:
                def read_at(offset: int, view: memoryview) -> int:
                    f.seek(offset)
                    return f.readinto(view) or 0

                return _hash_span(read_at, path, name, header[name], data_start, buffer)
        except OSError as e:  # removed or unreadable since the load began
            raise CheckpointError(f"cannot read {path} to fingerprint it ({e.strerror or e})") from None

    return {name: functools.partial(job, name) for name in order}


def _cached_digests(path: str | Path, header: dict[str, dict[str, Any]], wanted: set[str]
                    ) -> tuple[str | None, dict[str, tuple[str, list[int], str]] | None]:
    """The digest cache's key of ``wanted`` tensors of a file (None: it cannot be stat'ed) and their digests
    kept under it (None: not kept, or damaged)."""
    key = _file_identity(path, header, wanted)
    return key, (_read_digests(key) if key else None)


def _file_digests(path: str | Path, names: Iterable[str] | None = None) -> dict[str, tuple[str, list[int], str]]:
    """``name -> (dtype, shape, sha256)`` of a safetensors file's tensors (all, or ``names``): read back
    from the digest cache under the file's identity, else hashed and kept there."""
    header, data_start = read_safetensors_header(path)
    wanted = set(header) if names is None else set(names)
    unknown = wanted - set(header)
    if unknown:
        raise CheckpointError(f"{path} does not hold {sorted(unknown)[:4]}")
    key, cached = _cached_digests(path, header, wanted)
    if cached is None:
        cached = _hash_tensors(path, header, data_start, wanted)
        if key:
            _write_digests(key, cached)
    return cached


def _hash_tensors(path: str | Path, header: dict[str, dict[str, Any]], data_start: int,
                  wanted: set[str], *, workers: int | None = None) -> dict[str, tuple[str, list[int], str]]:
    """``name -> (dtype, shape, sha256 of its bytes)`` for the ``wanted`` tensors of a safetensors file,
    the tensors hashed on ``workers`` threads at once, this one included (default :func:`hash_workers`;
    1: one after the other, in file order, on this thread)."""
    workers = hash_workers() if workers is None else max(1, int(workers))
    jobs = _span_jobs(path, header, data_start, wanted, largest_first=workers > 1)
    digests = _HashJobs(jobs, workers - 1).result()
    meta = _meta(header, sorted(wanted, key=lambda n: header[n]["data_offsets"][0]))  # file order
    return {name: (dtype, shape, digests[name]) for name, (dtype, shape) in meta.items()}


def _hash_span(read_at: Callable[[int, memoryview], int], path: str | Path, name: str, entry: dict[str, Any],
               data_start: int, buffer: bytearray) -> str:
    """SHA-256 of one tensor's bytes, read by ``read_at(offset, view) -> bytes read`` into ``buffer``."""
    begin, end = entry["data_offsets"]
    view = memoryview(buffer)
    digest = hashlib.sha256()
    offset, left = data_start + begin, end - begin
    while left:
        n = read_at(offset, view[: min(left, len(buffer))])
        if not n:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends past the end of the file")
        digest.update(view[:n])
        offset += n
        left -= n
    return digest.hexdigest()


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
    return cache_dir("fingerprints") / f"{key}.json"


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
    "LazyFingerprint",
    "LoadReport",
    "MAX_HASH_WORKERS",
    "WeightsHasher",
    "background_hash_workers",
    "MAX_IMAGE_SIDE",
    "MAX_PARAMETERS",
    "SIZE_FIELDS",
    "check_config_sizes",
    "check_field",
    "check_image_processor_values",
    "check_mean_std",
    "check_shard_name",
    "fingerprint_files",
    "fingerprint_module",
    "fingerprint_with",
    "hash_workers",
    "load_json_file",
    "load_tensors",
    "read_index",
    "read_safetensors_header",
    "read_weight_map",
    "resolve_fingerprint",
    "select_shards",
    "strict_load",
]
