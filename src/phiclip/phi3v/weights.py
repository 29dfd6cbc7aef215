"""Vision-only loading of Phi-3-vision checkpoints from (sharded) safetensors.

The chain: resolve files (local directory, or the hub with only the needed files downloaded) ->
read ``model.safetensors.index.json`` -> choose the shards that hold ``model.vision_embed_tokens.*``
(and ``model.embed_tokens.weight`` only when asked) -> read only those tensors -> rename them to the
module's names -> strict load that reports missing and unexpected keys. Never pickle, never remote code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

VISION_PREFIX = "model.vision_embed_tokens."
TEXT_EMBED_KEY = "model.embed_tokens.weight"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or not a Phi-3-vision checkpoint."""


def resolve_file(
    path_or_hub_id: str | Path,
    filename: str,
    *,
    required: bool = True,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path | None:
    """Path of ``filename`` in a local directory, or downloaded from a hub repo (only that file).

    Returns ``None`` when ``required`` is false and the file does not exist.
    """
    local = Path(str(path_or_hub_id)).expanduser()
    if local.is_dir():
        p = local / filename
        if p.is_file():
            return p
        if required:
            raise CheckpointError(f"{local} has no {filename}; is this a Phi-3-vision checkpoint directory?")
        return None
    if local.exists() or str(path_or_hub_id).startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_hub_id} is not a directory; give a checkpoint directory or a hub id")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            hf_hub_download(str(path_or_hub_id), filename, revision=revision, cache_dir=cache_dir, token=token)
        )
    except LocalEntryNotFoundError:  # offline or unreachable, and not cached (a subclass of EntryNotFoundError)
        if not required and _offline_cache_has_repo(str(path_or_hub_id), cache_dir):
            return None
        raise CheckpointError(
            f"cannot fetch {filename} of {path_or_hub_id!r}: the hub is unreachable and it is not in the local "
            "cache; download the checkpoint and pass its local directory instead"
        ) from None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"hub repo {path_or_hub_id} has no {filename}") from None
        return None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{path_or_hub_id!r} is neither a local directory nor a hub repo you can access; "
            "check the path or the hub id (and your token for gated repos)"
        ) from None


def _offline_cache_has_repo(repo_id: str, cache_dir: str | Path | None) -> bool:
    from huggingface_hub import constants

    root = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
    return (root / ("models--" + repo_id.replace("/", "--"))).is_dir()


@dataclass
class CheckpointFiles:
    """Where a checkpoint's files are and which shard holds which tensor."""

    source: str
    config_path: Path
    weight_map: dict[str, str]  # tensor name -> shard file name
    shard_paths: dict[str, Path] = field(default_factory=dict)  # shard file name -> local path (fetched ones)


def read_weight_map(path_or_hub_id: str | Path, **hub_kwargs: object) -> tuple[dict[str, str], bool]:
    """``(tensor name -> shard file, sharded?)`` from the index, or from the single file's header."""
    index = resolve_file(path_or_hub_id, INDEX_FILE, required=False, **hub_kwargs)  # type: ignore[arg-type]
    if index is not None:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
        if "weight_map" not in data:
            raise CheckpointError(f"{index} has no weight_map; the index file is damaged")
        return dict(data["weight_map"]), True
    single = resolve_file(path_or_hub_id, SINGLE_FILE, required=False, **hub_kwargs)  # type: ignore[arg-type]
    if single is None:
        raise CheckpointError(
            f"{path_or_hub_id} has neither {INDEX_FILE} nor {SINGLE_FILE}; phiclip loads safetensors only "
            "(convert .bin/.pt weights with the safetensors converter first)"
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: SINGLE_FILE for k in f.keys()}, False


def select_shards(weight_map: dict[str, str], wanted: Iterable[str]) -> dict[str, list[str]]:
    """Group the wanted tensor names by the shard that holds them (only those shards)."""
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(weight_map[name], []).append(name)
    return by_file


_LAYER_RE = re.compile(r"^img_processor\.vision_model\.encoder\.layers\.(\d+)\.")


def checkpoint_to_module_name(name: str) -> str:
    """``model.vision_embed_tokens.X`` -> ``X``; a tower saved without the ``vision_model.`` level
    (transformers 5's ``CLIPVisionModel`` layout) gets it back."""
    key = name[len(VISION_PREFIX) :] if name.startswith(VISION_PREFIX) else name
    if key.startswith("img_processor.") and not key.startswith("img_processor.vision_model."):
        key = "img_processor.vision_model." + key[len("img_processor.") :]
    return key


def is_unused_tower_key(module_key: str, num_layers_run: int) -> bool:
    """Tensors of the tower the image path never uses: layers after ``layer_idx``, ``post_layernorm``,
    and the ``position_ids`` buffer that older transformers versions saved (it is always ``arange``)."""
    if module_key.startswith("img_processor.vision_model.post_layernorm."):
        return True
    if module_key == "img_processor.vision_model.embeddings.position_ids":
        return True
    m = _LAYER_RE.match(module_key)
    return bool(m and int(m.group(1)) >= num_layers_run)


def load_tensors(
    path_or_hub_id: str | Path,
    weight_map: dict[str, str],
    names: Iterable[str],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    opened: list[str] | None = None,
    **hub_kwargs: object,
) -> dict[str, torch.Tensor]:
    """Read only ``names`` from only the shards that hold them.

    safetensors memory-maps each shard, so only the bytes of the tensors asked for are ever read
    from disk; the rest of a shard (language-model layers beside the image path) is never touched.
    ``opened`` (if given) collects the shard files that were opened, for tests and logs.
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for shard, keys in select_shards(weight_map, names).items():
        path = str(resolve_file(path_or_hub_id, shard, **hub_kwargs))  # type: ignore[arg-type]
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
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                out[name] = t if str(device) in ("cpu", "meta") else t.to(device)
    return out
