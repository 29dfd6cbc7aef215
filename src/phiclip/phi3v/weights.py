"""Vision-only loading of Phi-3-vision checkpoints from (sharded) safetensors.

The chain (:func:`load_image_path`, on a checkpoint opened by
:func:`phiclip.checkpoints.open_checkpoint`): its weight map (``model.safetensors.index.json``, or
the single file's header) -> choose the tensors of ``model.vision_embed_tokens.*`` the image path uses
(:func:`select_image_path_tensors`: not the tower's layers after ``layer_idx``, not its
``post_layernorm``; ``model.embed_tokens.weight`` only when asked) -> read only those, from only the
shards that hold them -> rename them to the module's names (:func:`checkpoint_to_module_name`) ->
strict load that names missing and unexpected tensors. Never pickle, never remote code.

The file-level steps (index, headers, fingerprints, the strict load) are
:mod:`phiclip.models.checkpoint`; where files come from, at which commit, is the checkpoint's
(:class:`phiclip.checkpoints.Checkpoint`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiclip.hub import CheckpointError
from phiclip.models.checkpoint import LoadReport, strict_load

if TYPE_CHECKING:
    import torch
    from torch import nn

    from phiclip.checkpoints import Checkpoint

VISION_PREFIX = "model.vision_embed_tokens."
TEXT_EMBED_KEY = "model.embed_tokens.weight"
#: Where some fine-tuned checkpoints store the text embedding instead (vLLM maps this name).
VISION_WTE_KEY = VISION_PREFIX + "wte.weight"
#: The module name the text embedding is loaded under.
WTE_MODULE_KEY = "wte.weight"

_LAYER_RE = re.compile(r"^img_processor\.vision_model\.encoder\.layers\.(\d+)\.")


# ==============================================================================================
# Names: checkpoint -> module, and which tensors the image path never uses
# ==============================================================================================
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


def drop_unused_tower_keys(state_dict: dict[str, Any], num_layers_run: int, prefix: str = "") -> None:
    """Remove, in place, the tensors :func:`is_unused_tower_key` names from a state dict in module
    names (a full tower's state dict then loads into the truncated one, as the released code's does)."""
    for key in list(state_dict):
        if key.startswith(prefix) and is_unused_tower_key(checkpoint_to_module_name(key[len(prefix) :]), num_layers_run):
            del state_dict[key]


def select_image_path_tensors(
    weight_map: dict[str, str],
    expected: set[str],
    num_layers_run: int,
    *,
    load_text_embeddings: bool = False,
    source: str | Path = "",
) -> dict[str, str]:
    """Checkpoint name -> module name for every tensor to read: the image path's tensors the model
    uses (``expected``, module names without ``wte.``) and, when asked, the text embedding
    (``model.embed_tokens.weight`` as released, else ``model.vision_embed_tokens.wte.weight``).

    Raises:
        CheckpointError: tensors missing or unexpected (both named), before any tensor is read.
    """
    wanted: dict[str, str] = {}
    for name in weight_map:
        if not name.startswith(VISION_PREFIX) or name == VISION_WTE_KEY:
            continue  # the language model; or the text embedding that some checkpoints store under the image module
        key = checkpoint_to_module_name(name)
        if not is_unused_tower_key(key, num_layers_run):
            wanted[name] = key
    LoadReport.compare(expected, wanted.values()).raise_if_any(source, "the image-path tensors do not match config.json")
    if load_text_embeddings:
        text_key = next((k for k in (TEXT_EMBED_KEY, VISION_WTE_KEY) if k in weight_map), None)
        if text_key is None:
            raise CheckpointError(
                f"{source} has no {TEXT_EMBED_KEY} (nor {VISION_WTE_KEY}), needed to merge image tokens into text"
            )
        wanted[text_key] = WTE_MODULE_KEY
    return wanted


# ==============================================================================================
# The chain
# ==============================================================================================
def load_image_path(
    model: nn.Module,
    checkpoint: Checkpoint,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    load_text_embeddings: bool = False,
) -> str:
    """Load a Phi-3-vision checkpoint's image path into ``model`` (a ``Phi3VImageEmbedding`` built on
    the meta device; its tensors become the loaded ones). With ``load_text_embeddings``, ``model.wte``
    is set to the text embedding. Returns the checkpoint's fingerprint (the tensors read so far).

    Raises:
        CheckpointError: a missing or damaged file, or tensors that do not match the model.
    """
    from torch import nn  # the model is a torch module: torch is already imported

    source = checkpoint.location
    expected = {k for k in model.state_dict() if not k.startswith("wte.")}
    wanted = select_image_path_tensors(checkpoint.weight_map, expected, model.num_layers_run,
                                       load_text_embeddings=load_text_embeddings, source=source)
    tensors = checkpoint.read_tensors(wanted, dtype=dtype, device=device)
    state = {wanted[k]: v for k, v in tensors.items()}
    if WTE_MODULE_KEY in state:
        vocab, width = state[WTE_MODULE_KEY].shape
        model.wte = nn.Embedding(vocab, width, device="meta")
    strict_load(model, state, source=source, what="the image-path tensors do not match config.json",
                keep=() if load_text_embeddings else ("wte.",))
    return checkpoint.fingerprint


__all__ = [
    "TEXT_EMBED_KEY",
    "VISION_PREFIX",
    "VISION_WTE_KEY",
    "checkpoint_to_module_name",
    "drop_unused_tower_keys",
    "is_unused_tower_key",
    "load_image_path",
    "select_image_path_tensors",
]
