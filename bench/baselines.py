"""Straightforward baselines, written the way the released code and typical user code run.

These are what the fast paths are measured against (and checked equal to) in ``bench/cpu.py``
and ``bench/gpu.py``. They are faithful on purpose: per-image Python loops, padded crops run
through the tower, ``output_hidden_states=True``, whole state dicts loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CROP = 336


# --- preprocessing, as the released Phi3VImageProcessor does it (torchvision replaced by the same PIL/torch calls)
def released_hd_transform(img: Image.Image, hd_num: int = 16) -> Image.Image:
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    new_h = max(1, int(new_w / ratio))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)  # torchvision resize on a PIL image
    # padding_336: white, centred vertically (torchvision pad on a PIL image)
    tar = int(np.ceil(new_h / CROP) * CROP)
    top = int((tar - new_h) / 2)
    canvas = Image.new("RGB", (new_w, tar), (255, 255, 255))
    canvas.paste(img, (0, top))
    if trans:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return canvas


def released_preprocess(images: Sequence[Image.Image], num_crops: int = 16,
                        mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
                        std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)) -> dict[str, Any]:
    """The released processor's steps, per image: HD transform, ToTensor, Normalize, bicubic global
    view, reshape into crops, cat, pad to num_crops + 1."""
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    images = [im.convert("RGB") for im in images]
    elems = [released_hd_transform(im, hd_num=num_crops) for im in images]
    hd_images = []
    for im in elems:
        t = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
        hd_images.append((t - mean_t) / std_t)  # Normalize
    global_image = [F.interpolate(im.unsqueeze(0).float(), size=(CROP, CROP), mode="bicubic").to(im.dtype) for im in hd_images]
    shapes = [[im.size(1), im.size(2)] for im in hd_images]
    num_img_tokens = [int((h // CROP * w // CROP + 1) * 144 + 1 + (h // CROP + 1) * 12) for h, w in shapes]
    reshaped = [
        im.reshape(1, 3, h // CROP, CROP, w // CROP, CROP).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, CROP, CROP).contiguous()
        for im, (h, w) in zip(hd_images, shapes)
    ]
    reshaped = [torch.cat([g] + [r], dim=0) for g, r in zip(global_image, reshaped)]
    max_crops = num_crops + 1
    padded = [F.pad(r, (0, 0, 0, 0, 0, 0, 0, max_crops - r.shape[0])) for r in reshaped]
    return {"pixel_values": torch.stack(padded, dim=0), "image_sizes": torch.tensor(shapes, dtype=torch.long),
            "num_img_tokens": num_img_tokens}


# --- the image embedding, as the released model runs it ---------------------------------------
class ReleasedImageEmbedding(torch.nn.Module):
    """HF ``CLIPVisionModel`` with ``output_hidden_states=True`` on all crops (padded ones too),
    ``hidden_states[layer_idx]``, per-image loops for the HD layout, then the projection."""

    def __init__(self, tower: torch.nn.Module, glb_GN: torch.Tensor, sub_GN: torch.Tensor, projection: torch.nn.Module,
                 layer_idx: int = -2, order: str = "sub_glb") -> None:
        super().__init__()
        self.img_processor = tower
        self.glb_GN = torch.nn.Parameter(glb_GN.detach().clone())
        self.sub_GN = torch.nn.Parameter(sub_GN.detach().clone())
        self.img_projection = projection
        self.layer_idx = layer_idx
        self.order = order

    @classmethod
    def from_phiclip(cls, model: Any) -> ReleasedImageEmbedding:
        """The same weights as a phiclip ``Phi3VImageEmbedding``, in an HF ``CLIPVisionModel``."""
        import copy

        from transformers import CLIPVisionConfig, CLIPVisionModel

        vcfg = model.config.vision_config
        keys = CLIPVisionConfig().to_dict()
        cfg = CLIPVisionConfig(**{k: v for k, v in vcfg.to_dict().items() if k in keys})
        cfg._attn_implementation = "sdpa"
        tower = CLIPVisionModel(cfg).to(next(model.parameters()).dtype)
        ours = {k[len("img_processor.vision_model."):]: v for k, v in model.state_dict().items() if k.startswith("img_processor.")}
        target = tower.state_dict()
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in target) else ""
        missing = tower.load_state_dict({prefix + k: v for k, v in ours.items()}, strict=False)
        # Layers after layer_idx and post_layernorm are not in phiclip's truncated tower: they keep
        # random values, which do not change hidden_states[-2].
        assert not missing.unexpected_keys, missing.unexpected_keys
        return cls(tower.to(next(model.parameters()).device), model.glb_GN, model.sub_GN, copy.deepcopy(model.img_projection),
                   model.layer_idx, model.hd_transform_order)

    def get_img_features(self, img_embeds: torch.Tensor) -> torch.Tensor:
        out = self.img_processor(img_embeds, output_hidden_states=True)
        return out.hidden_states[self.layer_idx][:, 1:]

    def image_tokens(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        num_images, num_crops, c, h, w = pixel_values.shape
        feats = self.get_img_features(pixel_values.flatten(0, 1))
        dim = feats.shape[-1]
        grid = int(math.sqrt(feats.shape[1]))
        feats = feats.view(num_images, num_crops, grid * grid, dim)
        m = grid // 2
        out = []
        for i, (hh, ww) in enumerate(image_sizes.tolist()):
            hc, wc = hh // CROP, ww // CROP
            glb = feats[i, 0].reshape(1, m, 2, m, 2, dim).permute(0, 1, 3, 2, 4, 5).reshape(1, m, m, 4 * dim)
            glb = torch.cat([glb, self.sub_GN.repeat(1, m, 1, 1)], dim=2).reshape(1, -1, 4 * dim)
            sub = feats[i, 1 : 1 + hc * wc]
            sub = sub.reshape(hc * wc, m, 2, m, 2, dim).permute(0, 1, 3, 2, 4, 5).reshape(hc * wc, m * m, 4 * dim)
            sub = sub.reshape(1, hc, wc, m, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(1, hc * m, wc * m, 4 * dim)
            sub = torch.cat([sub, self.sub_GN.repeat(1, hc * m, 1, 1)], dim=2).reshape(1, -1, 4 * dim)
            seq = torch.cat([sub, self.glb_GN, glb], dim=1) if self.order == "sub_glb" else torch.cat([glb, self.glb_GN, sub], dim=1)
            out.append(self.img_projection(seq)[0])
        return out


# --- CLIP, as users run it -------------------------------------------------------------------
def load_clip_users(model_dir: str | Path) -> tuple[Any, Any]:
    """``CLIPModel.from_pretrained`` + ``CLIPProcessor.from_pretrained``, as users load them."""
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(model_dir).eval(), CLIPProcessor.from_pretrained(model_dir)


def clip_users_embed(model: Any, processor: Any, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
    """``CLIPProcessor`` + ``CLIPModel.get_image_features``, batch 32, L2-normalised (model loaded)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            inputs = processor(images=list(images[i : i + batch_size]), return_tensors="pt")
            feats = model.get_image_features(**inputs)
            feats = getattr(feats, "pooler_output", feats)
            out.append(F.normalize(feats, dim=-1).numpy())
    return np.concatenate(out)


def clip_users_loop(model_dir: str | Path, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
    """Load, then :func:`clip_users_embed`."""
    model, processor = load_clip_users(model_dir)
    return clip_users_embed(model, processor, images, batch_size)


# --- loading, the whole state dict -----------------------------------------------------------
def load_whole_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` on every shard, as a generic loader does."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state
