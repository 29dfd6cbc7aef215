"""The one way a checkpoint is opened, for every encoder kind: located once, pinned, vetted as data,
fingerprinted.

:func:`open_checkpoint` ``(location, revision=None, kind=...) -> Checkpoint``:

1. **Located once.** ``location`` goes through the one local-or-hub rule
   (:func:`phiclip.hub.resolve_location`) exactly once; every later file of the load is looked up
   on that :class:`~phiclip.hub.Location`.
2. **Pinned.** For a hub id, ``config.json`` is fetched first (at ``revision``, default ``main``);
   the commit it came from is :attr:`Checkpoint.revision`, and every other file (processor config,
   tokenizer, weights, also those transformers reads) is fetched at that commit. Encoders record it
   in ``describe()["details"]["revision"]``.
3. **Vetted as data.** ``config.json`` must be a JSON object whose ``model_type`` is one the kind
   table knows (:data:`phiclip.encoders.registry.KINDS`), the one the asked kind loads, with no
   ``auto_map`` where transformers builds the model; its sizes are checked for type, range and the
   parameters they imply (:func:`~phiclip.models.checkpoint.check_config_sizes`); an index names
   plain shard files inside the checkpoint. Weights are read from safetensors only.
4. **Fingerprinted.** The tensors read (:meth:`Checkpoint.read_tensors`), the weight files
   hashed (:meth:`Checkpoint.hash_weight_files`) or the tensors a kind read itself, hashed in the
   background while it builds its model (:meth:`Checkpoint.hash_loaded_file`) make
   :attr:`Checkpoint.fingerprint`. An encoder takes it as :meth:`Checkpoint.fingerprint_later`: the
   hashing goes on in the background after the load returns, until something reads the fingerprint
   (a manifest, a compiled runtime's cache key): a first load waits for no hashing it does not use.

Nothing here imports torch; file-level reading is :mod:`phiclip.models.checkpoint`, where files
come from is :mod:`phiclip.hub`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiclip import hub
from phiclip.encoders.registry import KINDS, kinds_for_model_type, known_model_types
from phiclip.hub import CheckpointError, Location
from phiclip.models.checkpoint import (
    INDEX_FILE,
    LazyFingerprint,
    WeightsHasher,
    check_config_sizes,
    check_field,
    check_image_processor_values,
    load_json_file,
    load_tensors,
    read_index,
    read_safetensors_header,
    read_weight_map,
)

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
#: Image processor settings: ``preprocessor_config.json`` (its top level), or transformers 5's
#: ``processor_config.json`` (under ``image_processor``).
PROCESSOR_FILES = (("preprocessor_config.json", ""), ("processor_config.json", "image_processor"))


@dataclass
class Checkpoint:
    """An opened, vetted checkpoint: where it is, at which commit, its ``config.json`` and what was
    read from it. Made by :func:`open_checkpoint`."""

    location: Location
    #: The commit every file is fetched at (a hub id), or None (a local folder).
    revision: str | None
    config_path: Path
    #: ``config.json`` as data (checked).
    config: dict[str, Any]
    #: ``cache_dir`` / ``token`` for hub downloads.
    hub_options: dict[str, Any] = field(default_factory=dict)
    _files: dict[str, Path | None] = field(default_factory=dict, repr=False)
    _weight_map: dict[str, str] | None = field(default=None, repr=False)
    _hasher: WeightsHasher = field(default_factory=WeightsHasher, repr=False)

    def __str__(self) -> str:
        return str(self.location)

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def files(self) -> dict[str, Path]:
        """File name -> local path of every file found so far."""
        return {name: path for name, path in self._files.items() if path is not None}

    def file(self, name: str, *, required: bool = True) -> Path | None:
        """The local path of ``name`` (downloaded at :attr:`revision` for a hub id; from the cache
        alone while the hub is unreachable). None when not ``required`` and absent."""
        if name in self._files and (self._files[name] is not None or not required):
            return self._files[name]
        path = hub.resolve_file(self.location, name, required=required, revision=self.revision, **self.hub_options)
        self._files[name] = path  # absent ones too: each file is looked up once
        return path

    def json_file(self, name: str, *, required: bool = True) -> Any:
        """A JSON file of the checkpoint as data (None when not ``required`` and absent)."""
        path = self.file(name, required=required)
        return None if path is None else load_json_file(path)

    # --- weights ------------------------------------------------------------------------------
    @property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file: from ``model.safetensors.index.json`` (shard names checked),
        else the single ``model.safetensors``'s header. Read once."""
        if self._weight_map is None:
            self._weight_map = read_weight_map(self.location, find_file=self.file)[0]
        return self._weight_map

    def weight_files(self) -> list[Path]:
        """Every safetensors file of the weights (``model.safetensors``, or each shard the index names)."""
        return [self.file(shard) for shard in sorted(set(self.weight_map.values()))]  # type: ignore[misc]

    def read_tensors(self, names: Iterable[str], *, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu", opened: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Read only ``names`` (checkpoint names) from only the shards that hold them, each added to
        :attr:`fingerprint` as stored (before the ``dtype`` conversion)."""
        return load_tensors(self.location, self.weight_map, names, dtype=dtype, device=device, opened=opened,
                            hasher=self._hasher, shard_path=self.file)  # type: ignore[arg-type]

    def names_with_prefix(self, *prefixes: str) -> list[str]:
        """The checkpoint's tensor names that start with one of ``prefixes``."""
        return [n for n in self.weight_map if n.startswith(prefixes)]

    def hash_weight_files(self) -> str:
        """Add every tensor of every weight file to :attr:`fingerprint` (for weights that another
        library reads, e.g. transformers); returns the fingerprint."""
        for path in self.weight_files():
            self._hasher.add_file(path)
        return self.fingerprint

    def hash_weight_files_in_background(self) -> LazyFingerprint:
        """Start hashing every weight file on a background thread, as :meth:`hash_weight_files` would
        (for weights another library is about to read itself: both read the page-cached files at
        once), and return :meth:`fingerprint_later`."""
        self._hasher.add_files_in_background(self.weight_files())
        return self.fingerprint_later()

    def fingerprint_later(self) -> LazyFingerprint:
        """:attr:`fingerprint` when first read, not now (the hashing in the background goes on meanwhile)."""
        return LazyFingerprint(self._hasher.fingerprint)

    def hash_loaded_file(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add ``tensors``, just read from the checkpoint's safetensors file ``name`` (e.g. by
        safetensors' ``load_file``), to :attr:`fingerprint` with the entries :meth:`hash_weight_files`
        would give them, hashing their own memory in the background while the caller builds its model
        (:meth:`~phiclip.models.checkpoint.WeightsHasher.add_loaded_file`): :attr:`fingerprint` waits
        for it, and the tensors must not be changed in place before it is read."""
        path = self.file(name)
        assert path is not None
        self._hasher.add_loaded_file(path, tensors)

    @property
    def fingerprint(self) -> str:
        """``"sha256:<hex>"`` over the tensors read or hashed so far
        (:class:`~phiclip.models.checkpoint.WeightsHasher`; waits for any hashing in the background)."""
        return self._hasher.fingerprint()

    # --- for the libraries that read the folder themselves ------------------------------------
    def transformers_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a transformers ``from_pretrained`` of :attr:`location`: no code from
        the checkpoint, the pinned commit, the cache alone while the hub is unreachable."""
        extra = {k: v for k, v in self.hub_options.items() if v is not None}
        return {"trust_remote_code": False, **extra, **hub.hub_kwargs_for_transformers(self.location, self.revision)}

    def image_processor_config(self) -> tuple[dict[str, Any], Path] | None:
        """The image processor settings (:data:`PROCESSOR_FILES`, each present one checked by
        :func:`~phiclip.models.checkpoint.check_image_processor_values`) and their file: the first
        present, or None when there are none."""
        found = None
        for name, section in PROCESSOR_FILES:
            path = self.file(name, required=False)
            if path is None:
                continue
            data = check_field(load_json_file(path), "(the whole file)", path, kind="dict")
            if section:
                if data.get(section) is None:
                    continue
                data = check_field(data[section], section, path, kind="dict")
            check_image_processor_values(data, path, prefix=f"{section}." if section else "")
            found = found or (data, path)
        return found

    def use_weight_file(self, name: str) -> None:
        """Read the weights from the single safetensors file ``name`` (a kind whose weights have
        another file name than ``model.safetensors``, e.g. ``open_clip_model.safetensors``)."""
        path = self.file(name)
        assert path is not None
        self._weight_map = {k: name for k in read_safetensors_header(path)[0]}

    def add_to_fingerprint(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add tensors read by other means (a weights-only ``torch.load``) to :attr:`fingerprint`."""
        for name, tensor in tensors.items():
            self._hasher.add_tensor(name, tensor)

    def describe(self) -> dict[str, Any]:
        """``{"location", "revision", "model_type"}``, for records."""
        return {"location": str(self.location), "revision": self.revision, "model_type": self.model_type}


def _vet_config(config_path: Path, kind: str | None, location: Location) -> dict[str, Any]:
    data = check_field(load_json_file(config_path, "the checkpoint's config is damaged"), "(the whole file)",
                       config_path, kind="dict")
    implied = [k for k in KINDS.values() if k.config_file == config_path.name and k.config_file != CONFIG_FILE]
    if implied:  # a file of its own kind (open_clip_config.json): its kind's own module vets its contents
        return {**data, "model_type": implied[0].model_type}
    model_type = data.get("model_type")
    loaders = kinds_for_model_type(model_type) if isinstance(model_type, str) else ()
    if not loaders:
        raise CheckpointError(
            f"{config_path}: model_type {model_type!r} is not one phiclip loads ({', '.join(known_model_types())}); "
            "phiclip never runs code from a checkpoint, so custom model types are refused"
        )
    if kind is not None and model_type not in KINDS[kind].model_types:
        raise CheckpointError(
            f"{config_path}: the checkpoint is a {model_type!r} model, not {KINDS[kind].model_type!r} (what the "
            f"'{kind}:' kind loads); load it with '{loaders[0].name}:': use '{loaders[0].name}:{location}'"
        )
    if "auto_map" in data and any(k.transformers_config for k in loaders):
        raise CheckpointError(
            f"{config_path}: auto_map {data['auto_map']!r:.200} names code in the checkpoint for transformers to import; "
            "phiclip never runs code from a checkpoint, so this checkpoint is refused "
            "(remove auto_map if the model is a standard one)"
        )
    check_config_sizes(data, config_path)
    return data


def open_checkpoint(
    location: str | Path | Location | Checkpoint,
    revision: str | None = None,
    *,
    kind: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Checkpoint:
    """Open a checkpoint (a local folder or a hub id) the one way (see the module docstring).

    Args:
        location: a local checkpoint folder or a hub id (an opened :class:`Checkpoint` is returned as is).
        revision: for a hub id, the branch, tag or commit to start from (default ``main``); every
            file is then fetched at the commit it names.
        kind: the encoder kind that will load it (its ``model_type`` is required); None: any kind's.
        cache_dir, token: for hub downloads.

    Raises:
        CheckpointError: a bad location, a missing or damaged ``config.json``, an unknown or other
            model type, an ``auto_map``, sizes out of range, or an unreachable hub id not cached.
    """
    if isinstance(location, Checkpoint):
        return location
    loc = location if isinstance(location, Location) else hub.resolve_location(location)
    options = {k: v for k, v in (("cache_dir", cache_dir), ("token", token)) if v is not None}
    config_name = KINDS[kind].config_file if kind is not None else CONFIG_FILE
    if loc.path is not None and not (loc.path / config_name).is_file():
        others = [k.name for k in KINDS.values() if k.config_file != config_name and (loc.path / k.config_file).is_file()]
        if kind is None and others and KINDS[others[0]].config_file != CONFIG_FILE:
            kind, config_name = others[0], KINDS[others[0]].config_file
        else:
            hint = f"; it has {KINDS[others[0]].config_file}: load it with '{others[0]}:{loc}'" if others else ""
            raise CheckpointError(
                f"directory {str(loc.path)!r} has no {config_name}; give a checkpoint directory saved with "
                f"save_pretrained (config.json, the safetensors weights, processor files) or a hub id{hint}"
            )
    config_path = hub.resolve_file(loc, config_name, revision=revision, **options)
    assert config_path is not None
    pinned = None if loc.is_local else (hub.snapshot_commit(config_path) or revision)
    config = _vet_config(config_path, kind, loc)
    ckpt = Checkpoint(loc, pinned, config_path, config, options, {CONFIG_FILE: config_path})
    index = ckpt.file(INDEX_FILE, required=False)
    if index is not None:
        ckpt._weight_map = read_index(index)  # shard names: plain files inside the checkpoint, or a named error
    return ckpt


__all__ = ["CONFIG_FILE", "PROCESSOR_FILES", "Checkpoint", "open_checkpoint"]
