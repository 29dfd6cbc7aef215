"""Phi-3-vision's image embedding, vision-only: CLIP tower (truncated), 2x2 merge, separators,
projection, and the merge into a text sequence.

The CLIP tower is :mod:`phiclip.models.clip_vision` (shared with the CLIP encoder's fast path),
held under the checkpoint's names (``img_processor.vision_model.*``); which tensors are read and the
strict load are :mod:`phiclip.phi3v.weights`. Attribute names are the checkpoint's. Shapes use ``C``
for crops, ``L`` for tokens, ``D`` for the tower width (1024) and ``H`` for the LM width (3072).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phiclip.checkpoints import Checkpoint, open_checkpoint
from phiclip.cpu.threads import threads_for_free_cores
from phiclip.hub import CheckpointError, Location
from phiclip.models.clip_config import CLIPVisionConfig
from phiclip.models.clip_vision import CLIPVisionTransformer
from phiclip.models.ops import l2_normalize, mean_pool
from phiclip.phi3v.config import (
    CROP_SIZE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Phi3VVisionConfig,
    num_tokens_for_crop_grid,
)
from phiclip.phi3v.processing import StudentImageProcessor
from phiclip.phi3v.student import STUDENT_TOWER_NAME, StudentVisionTower
from phiclip.phi3v.weights import drop_unused_tower_keys, load_image_path

MAX_INPUT_ID = int(1e9)  # ids in (-1e9, 0) mark image tokens, as in the released model


# ==============================================================================================
# The CLIP vision tower (phiclip.models.clip_vision), under the checkpoint's names
# ==============================================================================================
class Phi3VCLIPVisionTower(nn.Module):
    """Holds ``vision_model`` so that state-dict names read ``img_processor.vision_model.*``; only the
    layers up to ``layer_idx`` are built (``post_layernorm`` and later layers are never read)."""

    def __init__(self, config: CLIPVisionConfig, num_layers: int) -> None:
        super().__init__()
        self.vision_model = CLIPVisionTransformer(config, num_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)

    @property
    def input_device(self) -> torch.device:
        """Where the tower takes its crops (its weights' device)."""
        return self.vision_model.pre_layrnorm.weight.device  # also in the fused CPU tower, float in the int8 one

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the tower takes its crops in (its float weights' dtype)."""
        return self.vision_model.pre_layrnorm.weight.dtype


# ==============================================================================================
# The image embedding
# ==============================================================================================
def _coerce_config(config: Any) -> Phi3VVisionConfig:
    """Accept phiclip's config, a dict, or any object with the attributes of a Phi-3-vision config
    (e.g. a transformers ``PretrainedConfig``, as the released sample passes)."""
    if isinstance(config, Phi3VVisionConfig):
        return config
    if isinstance(config, dict):
        return Phi3VVisionConfig.from_dict(config)
    d = {
        "hidden_size": getattr(config, "n_embd", None) or getattr(config, "hidden_size", 3072),
        "vocab_size": getattr(config, "vocab_size", 32064),
        "embd_pdrop": getattr(config, "embd_pdrop", getattr(config, "embed_pdrop", 0.0)),
        "img_processor": getattr(config, "img_processor", None),
        "embd_layer": getattr(config, "embd_layer", None) or {},
    }
    if not isinstance(d["img_processor"], dict):
        raise ValueError("config.img_processor must be a dict like {'name': 'clip_vision_model', ...}")
    return Phi3VVisionConfig.from_dict(d)


def real_crops_per_image(pixel_values: torch.Tensor | Sequence[torch.Tensor], grids: list[tuple[int, int]],
                         crop_size: int, *, grid_unit: int | None = None, note: str = "") -> list[torch.Tensor]:
    """Each image's real crops, ``(1 + h*w, 3, crop_size, crop_size)`` (global view first), from a padded
    ``(n, num_crops+1, 3, S, S)`` tensor or a list of per-image tensors, checked against the crop
    ``grids`` ``(h, w)``. ``grid_unit``: the pixels per grid cell in ``image_sizes`` (default
    ``crop_size``); ``note`` is added to the shape messages."""
    s, unit = crop_size, grid_unit or crop_size
    if isinstance(pixel_values, torch.Tensor):
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[2:]) != (3, s, s) or pixel_values.shape[0] != len(grids):
            raise ValueError(
                f"pixel_values must have shape ({len(grids)}, num_crops+1, 3, {s}, {s}){note} or be a list of "
                f"(crops, 3, {s}, {s}) tensors; got {tuple(pixel_values.shape)}"
            )
        per_image = []
        for i, (h, w) in enumerate(grids):
            if 1 + h * w > pixel_values.shape[1]:
                raise ValueError(f"image {i} needs {1 + h * w} crops for image_sizes {h * unit}x{w * unit} but "
                                 f"pixel_values has {pixel_values.shape[1]}")
            per_image.append(pixel_values[i, : 1 + h * w])
        return per_image
    per_image = list(pixel_values)
    if len(per_image) != len(grids):
        raise ValueError(f"{len(per_image)} pixel_values tensors for {len(grids)} image_sizes")
    for i, (t, (h, w)) in enumerate(zip(per_image, grids)):
        if t.ndim != 4 or tuple(t.shape[1:]) != (3, s, s) or t.shape[0] != 1 + h * w:
            raise ValueError(f"pixel_values[{i}] must have shape ({1 + h * w}, 3, {s}, {s}){note} for image_sizes "
                             f"{h * unit}x{w * unit}, got {tuple(t.shape)}")
    return per_image


class Phi3VImageEmbedding(nn.Module):
    """Phi-3-vision's image embedding (``model.vision_embed_tokens``), without the language model.

    ``img_processor`` is the tower: any module mapping crops ``(C, 3, S, S)`` to the hidden state
    the HD transform reads, and saying where it takes them (``input_device``, ``input_dtype``): the
    CLIP tower (:class:`Phi3VCLIPVisionTower`, possibly fused or quantised in place on the CPU), a
    student tower, or a compiled runtime's (:class:`phiclip.cpu.runtimes.CompiledModule`).

    Args:
        config: a :class:`Phi3VVisionConfig`, a ``config.json`` dict, or a config object with
            ``img_processor``, ``embd_layer``, ``hidden_size`` and ``vocab_size``.
        wte: the text embedding (``model.embed_tokens``), needed only by :meth:`forward`.
        max_crops_per_batch: crops per tower call (all crops of all images are batched together
            and cut into chunks of this size). ``None``: 4 on the CPU, where small chunks keep the
            activations in cache (measured ~1.4x faster than 32), and 64 on GPUs.
        **embd_layer: overrides of ``config.embd_layer`` (``hd_transform_order``,
            ``projection_cls``, ``use_hd_transform``, ``with_learnable_separator``), as the
            released sample passes them.
    """

    def __init__(self, config: Any, wte: nn.Embedding | None = None, *, max_crops_per_batch: int | None = None, **embd_layer: Any) -> None:
        super().__init__()
        self.config = cfg = _coerce_config(config)
        layer_cfg = {**cfg.embd_layer, **embd_layer}
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.use_hd_transform = bool(layer_cfg.get("use_hd_transform", False))
        self.with_learnable_separator = bool(layer_cfg.get("with_learnable_separator", False))
        self.hd_transform_order = layer_cfg.get("hd_transform_order", "glb_sub")  # absent -> glb_sub (released code)
        projection_cls = layer_cfg.get("projection_cls", "linear")  # absent -> linear (released code)
        self.type_feature = cfg.type_feature
        if max_crops_per_batch is not None and int(max_crops_per_batch) < 1:
            raise ValueError(f"max_crops_per_batch must be >= 1, got {max_crops_per_batch}")
        self.max_crops_per_batch = None if max_crops_per_batch is None else int(max_crops_per_batch)
        if self.use_hd_transform != self.with_learnable_separator:
            raise ValueError(
                "use_hd_transform and with_learnable_separator must be equal (the HD layout needs the separators); "
                f"got {self.use_hd_transform} and {self.with_learnable_separator}"
            )
        if self.hd_transform_order not in ("sub_glb", "glb_sub"):
            raise ValueError(f"hd_transform_order must be 'sub_glb' or 'glb_sub', got {self.hd_transform_order!r}")
        if self.type_feature not in ("patch", "cls_patch"):
            raise ValueError(f"img_processor.type_feature must be 'patch' or 'cls_patch', got {self.type_feature!r}")
        if self.type_feature == "cls_patch" and self.use_hd_transform:
            raise ValueError("type_feature 'cls_patch' cannot be used with the HD transform (the 2x2 merge needs the patch grid only)")

        vcfg = cfg.vision_config
        self.image_size, self.patch_size = vcfg.image_size, vcfg.patch_size
        self.crop_size = self.image_size  # the side of the crops the tower takes (a student's may differ)
        self.grid = vcfg.grid  # 24
        if self.use_hd_transform and (self.image_size != CROP_SIZE or self.grid % 2):
            raise ValueError(f"the HD transform needs 336-px crops and an even patch grid; got {self.image_size} px / patch {self.patch_size}")
        n_layers = vcfg.num_hidden_layers
        layer_idx = cfg.layer_idx
        # hidden_states has n_layers + 1 entries (index 0: embeddings after pre_layrnorm).
        self.num_layers_run = layer_idx if layer_idx >= 0 else n_layers + 1 + layer_idx
        if not 0 <= self.num_layers_run <= n_layers:
            raise ValueError(f"img_processor.layer_idx {layer_idx} is out of range for a {n_layers}-layer tower")
        self.layer_idx = layer_idx
        self.image_dim_out = cfg.image_dim_out
        if self.image_dim_out != vcfg.hidden_size:
            raise ValueError(f"image_dim_out {self.image_dim_out} differs from the tower's hidden_size {vcfg.hidden_size}")

        self.img_processor = Phi3VCLIPVisionTower(vcfg, self.num_layers_run)
        dim = self.image_dim_out * 4 if self.use_hd_transform else self.image_dim_out  # 4096: 2x2 merged
        if self.with_learnable_separator:
            self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))  # between sub-images and global view
            self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))  # end of every row
        if projection_cls == "linear":
            self.img_projection: nn.Module = nn.Linear(dim, self.hidden_size)
        elif projection_cls == "mlp":
            self.img_projection = nn.Sequential(nn.Linear(dim, self.hidden_size), nn.GELU(), nn.Linear(self.hidden_size, self.hidden_size))
        else:
            raise ValueError(f"projection_cls must be 'linear' or 'mlp', got {projection_cls!r}")
        self.projection_cls = projection_cls
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.wte = wte
        # A full checkpoint (all layers, post_layernorm) loads into the truncated tower.
        self._register_load_state_dict_pre_hook(self._drop_unused_tower_keys)

    # --- loading -----------------------------------------------------------------------------
    def _drop_unused_tower_keys(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        drop_unused_tower_keys(state_dict, self.num_layers_run, prefix)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path | Location | Checkpoint,
        *,
        torch_dtype: torch.dtype | str | None = torch.float32,
        device: torch.device | str = "cpu",
        load_text_embeddings: bool = False,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> Phi3VImageEmbedding:
        """Load the image path of a Phi-3-vision checkpoint (local directory, hub id, or a checkpoint
        already opened by :func:`phiclip.checkpoints.open_checkpoint`, vetted and pinned there).

        Only ``config.json``, the index and the shards holding ``model.vision_embed_tokens.*`` are
        read (downloaded, for a hub id); ``model.embed_tokens.weight`` too when
        ``load_text_embeddings`` (needed by :meth:`forward`; checkpoints that store it as
        ``model.vision_embed_tokens.wte.weight`` only are read from there). ``torch_dtype="auto"``
        keeps the stored dtype. Extra keyword arguments go to the constructor. The model's
        ``weights_fingerprint`` is the :class:`~phiclip.models.checkpoint.WeightsHasher` fingerprint
        of the tensors read (:func:`phiclip.phi3v.weights.load_image_path`); ``revision`` the commit
        they came from (None for a local folder).
        """
        checkpoint = open_checkpoint(path_or_hub_id, revision, cache_dir=cache_dir, token=token)
        config = Phi3VVisionConfig.from_dict(checkpoint.config, source=checkpoint.config_path)
        # A config naming a student tower builds that class (phiclip.phi3v.student).
        if config.img_processor.get("name") == STUDENT_TOWER_NAME:
            cls = StudentImageEmbedding
        dtype = _resolve_dtype(torch_dtype)
        try:
            with torch.device("meta"):
                model = cls(config, **kwargs)
        except CheckpointError:
            raise
        except ValueError as e:  # a config value the image path cannot use
            raise CheckpointError(f"{checkpoint.config_path}: {e}") from None
        model.weights_fingerprint = load_image_path(model, checkpoint, dtype=dtype, device=device,
                                                    load_text_embeddings=load_text_embeddings)
        model.source = str(checkpoint.location)
        model.revision = checkpoint.revision
        return model.to(device).eval()

    # --- shapes and validation ---------------------------------------------------------------
    def image_path_parameters(self) -> int:
        """Parameters of the image path (the text embedding ``wte`` left out; a fused CPU tower's
        prepacked weights, :mod:`phiclip.cpu.fused`, counted in)."""
        packed = sum(getattr(m, "packed_parameters", 0) for m in self.img_processor.modules())
        return packed + sum(p.numel() for n, p in self.named_parameters() if not n.startswith("wte."))

    @property
    def merged_grid(self) -> int:
        """Tokens per crop side after the 2x2 merge (12)."""
        return self.grid // 2

    def num_tokens(self, hd_height: int, hd_width: int) -> int:
        """Tokens for an HD canvas ``[H, W]`` with this tower's merged grid
        (:func:`~phiclip.phi3v.config.num_tokens_for_crop_grid`)."""
        return num_tokens_for_crop_grid(hd_height // self.image_size, hd_width // self.image_size, self.merged_grid)

    def separator_mask(self, hd_height: int, hd_width: int) -> torch.Tensor:
        """``(T,)`` bool: which of an image's tokens are learnt separators (``sub_GN`` row ends, ``glb_GN``)."""
        h, w = hd_height // self.image_size, hd_width // self.image_size
        m = self.merged_grid
        sub = torch.zeros(h * m, w * m + 1, dtype=torch.bool)
        sub[:, -1] = True  # sub_GN after every row
        glb = torch.zeros(m, m + 1, dtype=torch.bool)
        glb[:, -1] = True
        sep = torch.ones(1, dtype=torch.bool)  # glb_GN
        parts = [sub.flatten(), sep, glb.flatten()]
        return torch.cat(parts if self.hd_transform_order == "sub_glb" else parts[::-1])

    def _num_images(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> int:
        s = self.image_size
        if isinstance(pixel_values, torch.Tensor):
            if pixel_values.ndim != 5:
                raise ValueError(
                    f"pixel_values must have shape (n, num_crops+1, 3, {s}, {s}) or be a list of (crops, 3, {s}, {s}) "
                    f"tensors, got a {pixel_values.ndim}-D tensor of shape {tuple(pixel_values.shape)} "
                    "(for one image's crops, pass [crops] or crops[None])"
                )
            return int(pixel_values.shape[0])
        return len(pixel_values)

    def _crop_grid(self, image_sizes: torch.Tensor | Sequence[Sequence[int]], n: int) -> list[tuple[int, int]]:
        sizes = torch.as_tensor(image_sizes)
        if sizes.ndim != 2 or sizes.shape != (n, 2):
            raise ValueError(f"image_sizes must have shape ({n}, 2) as [H, W] per image, got {tuple(sizes.shape)}")
        out = []
        for i, (h, w) in enumerate(sizes.tolist()):
            if h <= 0 or w <= 0 or h % self.image_size or w % self.image_size:
                raise ValueError(f"image_sizes[{i}] = [{h}, {w}] is not a positive multiple of {self.image_size} (use the processor's image_sizes)")
            out.append((int(h) // self.image_size, int(w) // self.image_size))
        return out

    def _real_crops(self, pixel_values: torch.Tensor | Sequence[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor:
        """Gather the real crops of every image (global view first): ``(sum_i 1 + h_i*w_i, 3, S, S)``."""
        per_image = real_crops_per_image(pixel_values, grids, self.image_size)
        if self.img_processor.input_device.type == "cuda" and all(t.device.type == "cpu" for t in per_image):
            # Gather straight into page-locked memory: the tower's per-chunk host-to-device copies
            # (non_blocking) then overlap with the previous chunk's compute. Same single copy as cat.
            total = sum(t.shape[0] for t in per_image)
            out = torch.empty((total, *per_image[0].shape[1:]), dtype=per_image[0].dtype, pin_memory=True)
            return torch.cat(per_image, dim=0, out=out)
        return torch.cat(per_image, dim=0)

    # --- the tower --------------------------------------------------------------------------
    def crops_per_call(self, device: torch.device) -> int:
        """Crops per tower call on ``device``: ``max_crops_per_batch``, else 4 on the CPU, 64 elsewhere."""
        return self.max_crops_per_batch or (4 if device.type == "cpu" else 64)

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """``(C, 3, 336, 336)`` -> the hidden state at ``layer_idx``: ``(C, 576, D)`` for ``patch``
        (CLS dropped) or ``(C, 577, D)`` for ``cls_patch``. Runs in chunks of ``max_crops_per_batch``.
        On the CPU each chunk runs on as many threads as cores are free (:mod:`phiclip.cpu.threads`)."""
        device, dtype = self.img_processor.input_device, self.img_processor.input_dtype
        step = self.crops_per_call(device)
        outs = []
        with threads_for_free_cores() as adapt:
            for start in range(0, crops.shape[0], step):
                if device.type == "cpu":
                    adapt()  # fewer threads while other processes hold cores: no thread waits on a time slice
                chunk = crops[start : start + step].to(device=device, dtype=dtype, non_blocking=True)
                hidden = self.img_processor(chunk)  # (c, 1 + g*g, D)
                outs.append(hidden[:, 1:] if self.type_feature == "patch" else hidden)
        return torch.cat(outs, dim=0)

    def get_img_features(self, img_embeds: torch.Tensor) -> torch.Tensor:
        """The released sample's name for :meth:`crop_features`."""
        return self.crop_features(img_embeds)

    def _merge_2x2(self, feats: torch.Tensor) -> torch.Tensor:
        """``(C, g*g, D)`` -> ``(C, g/2, g/2, 4D)`` with channels ``[p(2r,2c), p(2r,2c+1), p(2r+1,2c), p(2r+1,2c+1)]``."""
        c, _, d = feats.shape
        g, m = self.grid, self.merged_grid
        return (
            feats.reshape(c, m, 2, m, 2, d)  # (C, 12, 2, 12, 2, D)
            .permute(0, 1, 3, 2, 4, 5)  # (C, 12, 12, 2, 2, D)
            .reshape(c, m, m, 4 * d)  # (C, 12, 12, 4D)
        ) if g == 2 * m else feats

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """``(rows, cols, 4D)`` -> ``(rows * (cols + 1), 4D)`` with ``sub_GN`` after every row."""
        rows, _, dim = grid.shape
        newline = self.sub_GN.reshape(1, 1, dim).to(grid.dtype).expand(rows, 1, dim)
        return torch.cat([grid, newline], dim=1).reshape(-1, dim)

    def _hd_sequences(self, merged: torch.Tensor, grids: list[tuple[int, int]], separators: bool = True) -> list[torch.Tensor]:
        """Per image, the un-projected token sequence ``(T_i, 4D)`` in the configured order.
        Without ``separators``, only the patch tokens (sub-images then global, no GN tokens)."""
        m = self.merged_grid
        seqs, offset = [], 0
        for h, w in grids:
            glb = merged[offset]  # (12, 12, 4D)
            sub = merged[offset + 1 : offset + 1 + h * w]  # (h*w, 12, 12, 4D)
            offset += 1 + h * w
            # (h*w, 12, 12, 4D) -> (h, w, 12, 12, 4D) -> (h, 12, w, 12, 4D) -> (12h, 12w, 4D)
            sub = sub.reshape(h, w, m, m, -1).permute(0, 2, 1, 3, 4).reshape(h * m, w * m, -1)
            if not separators:
                seqs.append(torch.cat([sub.reshape(-1, sub.shape[-1]), glb.reshape(-1, glb.shape[-1])], dim=0))
                continue
            sub_seq = self._with_newlines(sub)  # (12h * (12w + 1), 4D)
            glb_seq = self._with_newlines(glb)  # (12 * 13, 4D)
            sep = self.glb_GN.reshape(1, -1).to(merged.dtype)  # (1, 4D)
            parts = [sub_seq, sep, glb_seq] if self.hd_transform_order == "sub_glb" else [glb_seq, sep, sub_seq]
            seqs.append(torch.cat(parts, dim=0))
        return seqs

    def _project(self, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Project all images' tokens in one call, then split back per image: ``(T_i, H)``."""
        lengths = [s.shape[0] for s in seqs]
        projected = self.img_projection(torch.cat(seqs, dim=0))  # (sum T_i, H)
        return list(projected.split(lengths, dim=0))

    # --- public API -------------------------------------------------------------------------
    def image_tokens(self, pixel_values: torch.Tensor | Sequence[torch.Tensor], image_sizes: torch.Tensor | Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per image, its projected image tokens ``(T_i, hidden_size)``, ``T_i = num_image_tokens``.

        Args:
            pixel_values: ``(n, num_crops+1, 3, 336, 336)`` (padded crops are never run) or a list
                of ``(1 + h_i*w_i, 3, 336, 336)`` tensors (the processor's ``padding=False``).
            image_sizes: ``(n, 2)`` HD canvas sizes ``[H, W]``.
        """
        if not self.use_hd_transform:
            return self._non_hd_tokens(pixel_values)
        n = self._num_images(pixel_values)
        grids = self._crop_grid(image_sizes, n)
        merged = self._merge_2x2(self.crop_features(self._real_crops(pixel_values, grids)))  # (C, 12, 12, 4D)
        return self._project(self._hd_sequences(merged, grids))

    def _non_hd_tokens(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Without the HD transform: every crop's features (576 or 577 per crop), projected."""
        per_image = list(pixel_values) if not isinstance(pixel_values, torch.Tensor) else list(pixel_values.unbind(0))
        per_image = [t if t.ndim == 4 else t[None] for t in per_image]
        counts = [t.shape[0] for t in per_image]
        feats = self.crop_features(torch.cat(per_image, dim=0))  # (C, L, D)
        seqs = [f.reshape(-1, f.shape[-1]) for f in feats.split(counts, dim=0)]
        return self._project(seqs)

    def pooled(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor],
        image_sizes: torch.Tensor | Sequence[Sequence[int]],
        pooling: str = "mean",
        normalize: bool = False,
    ) -> torch.Tensor:
        """One vector per image for retrieval.

        Args:
            pooling: ``"mean"``: the mean of the image's projected tokens (sub-image and global-view
                patches; the learnt separator tokens are left out, they carry no image content),
                ``(n, hidden_size)``. ``"global"``: the mean over the global view's patch features
                from the tower at ``layer_idx``, ``(n, D)``; runs the tower on the global view only
                (1 crop per image instead of up to num_crops + 1).
            normalize: L2-normalise the vectors.
        """
        n = self._num_images(pixel_values)
        if pooling == "global":
            globals_ = pixel_values[:, 0] if isinstance(pixel_values, torch.Tensor) else torch.stack([t[0] for t in pixel_values])
            feats = self.crop_features(globals_)  # (n, 576, D)
            out = feats.mean(dim=1)
        elif pooling == "mean":
            if not self.use_hd_transform:
                out = mean_pool(self._non_hd_tokens(pixel_values))
            else:
                grids = self._crop_grid(image_sizes, n)
                merged = self._merge_2x2(self.crop_features(self._real_crops(pixel_values, grids)))
                out = mean_pool(self._project(self._hd_sequences(merged, grids, separators=False)))
        else:
            raise ValueError(f"pooling must be 'mean' or 'global', got {pooling!r}")
        return l2_normalize(out) if normalize else out

    def pooled_from_tokens(self, tokens: Sequence[torch.Tensor], image_sizes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """:meth:`pooled` ``"mean"`` from :meth:`image_tokens`' output (one tower pass for both):
        the mean of each image's tokens, separators left out. ``[(T_i, H)] -> (n, H)``."""
        sizes = torch.as_tensor(image_sizes).tolist()
        if not self.use_hd_transform:
            return mean_pool(tokens)
        return mean_pool([t[~self.separator_mask(int(h), int(w)).to(t.device)] for t, (h, w) in zip(tokens, sizes)])

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """Text embeddings with image tokens merged in: ``input_ids (B, L)`` -> ``(B, L, hidden_size)``.

        Positions with ``-1e9 < id < 0`` (``-k`` marks image ``k``'s tokens) are filled, in order,
        with the images' tokens; every other id is embedded with ``wte``. Out of place: the
        caller's ``input_ids`` is never changed and gradients flow.
        """
        if self.wte is None:
            raise ValueError("forward needs the text embedding: load with load_text_embeddings=True or pass wte=")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError("input_ids must be an integer tensor (batch, seq_len)")
        shape = input_ids.shape
        ids = input_ids.reshape(-1, shape[-1])  # (B, L)
        marked = (ids < 0) & (ids > -MAX_INPUT_ID)
        n_marked = int(marked.sum())
        too_big = ids >= self.wte.num_embeddings
        if bool(too_big.any()):
            raise ValueError(f"input_ids contain {int(ids.max())}, outside the vocabulary of {self.wte.num_embeddings}")
        embeds = self.wte(ids.clamp_min(0))  # (B, L, H); a new tensor, input_ids untouched
        if pixel_values is None:
            if n_marked:
                raise ValueError(f"input_ids mark {n_marked} image-token positions but no pixel_values were given")
        else:
            if image_sizes is None:
                raise ValueError("pixel_values given without image_sizes")
            tokens = self.image_tokens(pixel_values, image_sizes)
            counts = [t.shape[0] for t in tokens]
            if n_marked != sum(counts):
                raise ValueError(
                    f"input_ids mark {n_marked} image-token positions but the {len(tokens)} images give "
                    f"{sum(counts)} tokens ({counts} per image); build the prompt with each image's num_img_tokens"
                )
            positions = marked.nonzero(as_tuple=True)
            embeds = embeds.index_put(positions, torch.cat(tokens, dim=0).to(embeds.dtype))
        return self.drop(embeds).reshape(*shape, -1)


class Phi3ImageEmbedding(Phi3VImageEmbedding):
    """The released sample's class name and signature: ``Phi3ImageEmbedding(config, wte=..., **config.embd_layer)``."""


def _resolve_dtype(torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float32`` / ``"float32"`` / ``"bfloat16"`` / ``"auto"`` (keep the stored dtype) / ``None``."""
    if torch_dtype is None or torch_dtype == "auto":
        return None
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    value = getattr(torch, str(torch_dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"torch_dtype {torch_dtype!r} is not a floating dtype; use float32, bfloat16, float16 or 'auto'")
    return value


# ==============================================================================================
# A student tower in the image path (phiclip.phi3v.student)
# ==============================================================================================
def _stand_in(config: Phi3VVisionConfig) -> Phi3VVisionConfig:
    """The config the parent class is built from: the released 336-px / patch-14 layout with a
    0-layer tower of the student's width (replaced by the student right after)."""
    d = copy.deepcopy(config.to_dict())
    width = int(config.image_dim_out)
    d["img_processor"]["vision_config"] = {
        "hidden_size": width, "intermediate_size": width, "num_hidden_layers": 1, "num_attention_heads": 1,
        "image_size": CROP_SIZE, "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    }
    d["img_processor"]["layer_idx"] = 0
    d["img_processor"]["type_feature"] = "patch"
    return Phi3VVisionConfig.from_dict(d)


def _as_config(config: Any) -> Phi3VVisionConfig:
    if isinstance(config, Phi3VVisionConfig):
        return config
    if isinstance(config, dict):
        return Phi3VVisionConfig.from_dict(config)
    raise ValueError(f"a student image embedding takes a Phi3VVisionConfig or a config.json dict, got {type(config).__name__}")


class StudentImageEmbedding(Phi3VImageEmbedding):
    """Phi-3-vision's image embedding with a student tower (see the module docstring).

    ``config.img_processor`` must name ``phiclip_student_vision`` and hold ``student``:
    ``{"model_type", "hf_config", "num_layers_run", ...}``; ``image_dim_out`` is the student's width.
    Inputs: crops of ``crop_size`` pixels from :class:`StudentImageProcessor`, ``image_sizes`` in
    336-px units.
    """

    def __init__(self, config: Any, wte: nn.Embedding | None = None, *, max_crops_per_batch: int | None = None,
                 **embd_layer: Any) -> None:
        cfg = _as_config(config)
        student = cfg.img_processor.get("student")
        if cfg.img_processor.get("name") != STUDENT_TOWER_NAME or not isinstance(student, dict):
            raise ValueError(f"img_processor.name must be {STUDENT_TOWER_NAME!r} with an img_processor.student description")
        super().__init__(_stand_in(cfg), wte, max_crops_per_batch=max_crops_per_batch, **embd_layer)
        if not self.use_hd_transform:
            raise ValueError("a student tower needs the HD transform (embd_layer.use_hd_transform true)")
        self.config = cfg
        self.img_processor = StudentVisionTower(student)
        if int(student["hf_config"]["hidden_size"]) != self.image_dim_out:
            raise ValueError(f"img_processor.image_dim_out {self.image_dim_out} differs from the student's hidden_size "
                             f"{student['hf_config']['hidden_size']}")
        self.num_layers_run = self.img_processor.num_layers_run
        self.layer_idx = int(cfg.img_processor.get("layer_idx", -1))
        self.crop_size = self.img_processor.image_size
        self.student = dict(student)

    def crops_per_call(self, device: torch.device) -> int:
        """Crops per tower call on ``device``: ``max_crops_per_batch``, else 16 on the CPU, 64 elsewhere."""
        return self.max_crops_per_batch or (16 if device.type == "cpu" else 64)

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """``(C, 3, S, S)`` -> ``(C, 576, D)``, in chunks of :meth:`crops_per_call`."""
        device, dtype = self.img_processor.input_device, self.img_processor.input_dtype
        step = self.crops_per_call(device)
        outs = []
        for start in range(0, crops.shape[0], step):
            chunk = crops[start : start + step].to(device=device, dtype=dtype, non_blocking=True)
            outs.append(self.img_processor(chunk))
        return torch.cat(outs, dim=0)

    def _real_crops(self, pixel_values: torch.Tensor | Sequence[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor:
        """The real crops of every image (global view first): ``(sum_i 1 + h_i*w_i, 3, S, S)``."""
        per_image = real_crops_per_image(pixel_values, grids, self.crop_size, grid_unit=CROP_SIZE,
                                         note=" (the student's crop size)")
        return torch.cat(per_image, dim=0)

    def processor(self, num_crops: int = 16, image_mean: Sequence[float] | None = None,
                  image_std: Sequence[float] | None = None) -> StudentImageProcessor:
        """A processor for this tower (mean/std default to the student's, from its description)."""
        return StudentImageProcessor(self.crop_size, num_crops, image_mean or self.student.get("image_mean", OPENAI_CLIP_MEAN),
                                     image_std or self.student.get("image_std", OPENAI_CLIP_STD))


__all__ = ["Phi3ImageEmbedding", "Phi3VImageEmbedding", "StudentImageEmbedding"]
