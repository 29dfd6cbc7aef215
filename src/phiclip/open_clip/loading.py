"""Load an open_clip checkpoint (a folder or hub id with ``open_clip_config.json``) as a
transformers ``CLIPModel``, without open_clip.

Opened the one way (:func:`phiclip.checkpoints.open_checkpoint` with ``kind="open_clip"``: located
once, a hub id pinned to the commit of its ``open_clip_config.json``), the config read and checked
as data (:func:`phiclip.open_clip.config.parse_config`, then the sizes of the transformers config
it becomes by :func:`~phiclip.models.checkpoint.check_config_sizes`), the weights read from
``open_clip_model.safetensors`` (preferred) or ``open_clip_pytorch_model.bin`` with
``torch.load(weights_only=True)`` only (never pickle code), every tensor fingerprinted as read
(from safetensors: in the background while the model is built; ``checkpoint.fingerprint`` waits
for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiclip.checkpoints import Checkpoint, open_checkpoint
from phiclip.hub import CheckpointError
from phiclip.models.checkpoint import check_config_sizes
from phiclip.open_clip.config import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE, OpenCLIPConfig, parse_config
from phiclip.open_clip.convert import build_clip_model, to_hf_state_dict

if TYPE_CHECKING:
    import torch

SPEC_PREFIX = "open_clip:"


@dataclass
class LoadedOpenCLIP:
    """What :func:`load_open_clip` gives: the model, its config, checkpoint and weights file."""

    model: Any  # transformers CLIPModel, float32, eval
    config: OpenCLIPConfig
    checkpoint: Checkpoint
    weights_file: str
    logit_bias: torch.Tensor | None


def open_open_clip(location: str | Path | Checkpoint, revision: str | None = None) -> tuple[Checkpoint, OpenCLIPConfig]:
    """Open and vet an open_clip checkpoint (``location`` may carry the ``open_clip:`` prefix)."""
    if isinstance(location, str) and location.startswith(SPEC_PREFIX):
        location = location[len(SPEC_PREFIX):]
    checkpoint = open_checkpoint(location, revision, kind="open_clip")
    config = parse_config({k: v for k, v in checkpoint.config.items() if k != "model_type"}, checkpoint.config_path)
    check_config_sizes(config.hf_config_dict(), checkpoint.config_path)
    return checkpoint, config


def read_state_dict(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], str]:
    """The open_clip state dict (safetensors preferred; a ``.bin`` through weights-only loading),
    fingerprinted as read (safetensors: hashed in the background, see
    :meth:`~phiclip.checkpoints.Checkpoint.hash_loaded_file`); and the file name it came from."""
    import torch

    if checkpoint.file(SAFETENSORS_FILE, required=False) is not None:
        from safetensors.torch import load_file

        checkpoint.use_weight_file(SAFETENSORS_FILE)
        path = checkpoint.file(SAFETENSORS_FILE)
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for damaged files
            raise CheckpointError(f"{path}: damaged safetensors file ({e}); download it again") from None
        # Every tensor of the file, as hash_weight_files would (digests cached per file identity, like
        # every other kind's), but hashed from the tensors' own (memory-mapped) bytes, on other threads
        # while the model is built: checkpoint.fingerprint waits for it.
        checkpoint.hash_loaded_file(SAFETENSORS_FILE, state)
        return state, SAFETENSORS_FILE
    path = checkpoint.file(BIN_FILE, required=False)
    if path is None:
        raise CheckpointError(f"{checkpoint.location} has {CONFIG_FILE} but neither {SAFETENSORS_FILE} nor {BIN_FILE}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler refuses code with its own error types
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: not loadable with weights_only=True ({reason}); phiclip never runs pickled "
                              f"code: convert it to {SAFETENSORS_FILE}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: not a state dict of named tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    checkpoint.add_to_fingerprint(state)
    return state, BIN_FILE


def load_open_clip(location: str | Path | Checkpoint, revision: str | None = None) -> LoadedOpenCLIP:
    """Load an open_clip checkpoint as a float32 transformers ``CLIPModel`` (see the module docstring).

    Raises:
        UnsupportedOpenCLIP: an architecture phiclip does not load (named, with what is supported).
        CheckpointError: a damaged or hostile checkpoint, weights that do not fit the config.
    """
    checkpoint, config = open_open_clip(location, revision)
    state, weights_file = read_state_dict(checkpoint)
    hf_state, logit_bias = to_hf_state_dict(state)
    try:
        model = build_clip_model(config.hf_config_dict(), hf_state)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint.location}/{weights_file}: {e} ({config.architecture})") from None
    return LoadedOpenCLIP(model, config, checkpoint, weights_file, logit_bias)


__all__ = ["SPEC_PREFIX", "LoadedOpenCLIP", "load_open_clip", "open_open_clip", "read_state_dict"]
