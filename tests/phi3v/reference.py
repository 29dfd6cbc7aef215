"""Straightforward reference implementations of the Phi-3-vision image path, written from
``docs/phi3v-image-path.md`` only (no phiclip code), for the parity tests.

They favour obviousness over speed: PIL for every image operation, per-image Python loops for
the 2x2 merge, the separators and the order, and transformers' own ``CLIPVisionModel`` for the
tower (run on every crop, padded ones included, exactly as the released model does).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

CROP = 336
MERGED = 12  # tokens per crop side after the 2x2 merge of the 24x24 patch grid
TOKENS_PER_CROP = MERGED * MERGED  # 144
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_PREFIX = "model.vision_embed_tokens."

# Rows of the docs' token table ("Tokens per image"): (width, height, num_crops, [H, W], tokens).
SPEC_TABLE = [
    (336, 336, 16, (1344, 1344), 2509),
    (100, 100, 16, (1344, 1344), 2509),
    (640, 480, 16, (1008, 1344), 1921),
    (1920, 1080, 16, (1008, 1680), 2353),
    (1080, 1920, 16, (1680, 1008), 2377),
    (1344, 1008, 16, (1008, 1344), 1921),
    (1008, 1344, 16, (1344, 1008), 1933),
    (50, 8000, 16, (5376, 336), 2653),
    (8000, 50, 16, (336, 5376), 2473),
    (336, 336, 4, (672, 672), 757),
]
# The table's last row, "any size | 1 | [336, 336] | 313", checked on these sizes.
SPEC_ANY_SIZE_N1 = [(336, 336), (1, 1), (100, 100), (640, 480), (480, 640), (1920, 1080), (50, 8000), (8000, 50), (3, 2)]
SPEC_N1_SIZES, SPEC_N1_TOKENS = (336, 336), 313


# ---------------------------------------------------------------------------------------------
# Size arithmetic (docs: "The HD transform" steps 1-4, "Tokens per image")
# ---------------------------------------------------------------------------------------------
def ref_scale(ratio: float, num_crops: int) -> int:
    """The largest integer ``scale`` with ``scale * ceil(scale / ratio) <= N``."""
    scale = 0
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    return scale


def ref_hd_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """``(H, W)`` of the HD canvas, by the spec's steps (transpose, scale, resize, pad, transpose back)."""
    transposed = width < height
    w, h = (height, width) if transposed else (width, height)
    ratio = w / h
    new_w = ref_scale(ratio, num_crops) * CROP
    new_h = max(1, int(new_w / ratio))  # phiclip keeps very thin images 1 px tall (docs: "Very thin images")
    tar = math.ceil(new_h / CROP) * CROP
    return (new_w, tar) if transposed else (tar, new_w)


def ref_num_tokens(hd_h: int, hd_w: int) -> int:
    h, w = hd_h // CROP, hd_w // CROP
    return (h * w + 1) * 144 + 1 + (h + 1) * 12


# ---------------------------------------------------------------------------------------------
# The pixel path (docs: "The HD transform")
# ---------------------------------------------------------------------------------------------
def ref_preprocess(
    image: Image.Image, num_crops: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One PIL image -> (``(N + 1, 3, 336, 336)`` zero-padded crops, ``(H, W)``)."""
    image = image.convert("RGB")
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    width, height = image.size
    ratio = width / height
    new_w = ref_scale(ratio, num_crops) * CROP
    new_h = max(1, int(new_w / ratio))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    tar = math.ceil(new_h / CROP) * CROP
    top = int((tar - new_h) / 2)
    bottom = tar - new_h - top
    # White padding, PIL's way: (left, top, right, bottom) borders.
    image = ImageOps.expand(image, border=(0, top, 0, bottom), fill=(255, 255, 255))
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    # ToTensor: (H, W, 3) uint8 -> (3, H, W) float32 / 255; then Normalize in float32.
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    x = (x - torch.tensor(mean, dtype=torch.float32)[:, None, None]) / torch.tensor(std, dtype=torch.float32)[:, None, None]
    H, W = x.shape[1], x.shape[2]
    global_view = F.interpolate(x[None], size=(CROP, CROP), mode="bicubic", align_corners=False)[0]
    crops = [global_view]
    for r in range(H // CROP):
        for c in range(W // CROP):
            crops.append(x[:, r * CROP : (r + 1) * CROP, c * CROP : (c + 1) * CROP])
    out = torch.zeros(num_crops + 1, 3, CROP, CROP)
    out[: len(crops)] = torch.stack(crops)
    return out, (H, W)


def ref_preprocess_batch(images: list[Image.Image], num_crops: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    outs = [ref_preprocess(im, num_crops, **kw) for im in images]
    return torch.stack([o[0] for o in outs]), torch.tensor([o[1] for o in outs])


# ---------------------------------------------------------------------------------------------
# Token layout (which positions are separators), for the pooling tests
# ---------------------------------------------------------------------------------------------
def ref_separator_mask(hd_h: int, hd_w: int, order: str) -> list[bool]:
    """Per token of one image: True for ``sub_GN`` / ``glb_GN`` positions."""
    h, w = hd_h // CROP, hd_w // CROP
    sub = ([False] * (MERGED * w) + [True]) * (MERGED * h)
    glb = ([False] * MERGED + [True]) * MERGED
    return sub + [True] + glb if order == "sub_glb" else glb + [True] + sub


# ---------------------------------------------------------------------------------------------
# The model side (docs: "Image tokens"), with transformers' CLIPVisionModel as the tower
# ---------------------------------------------------------------------------------------------
def read_vision_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every ``model.vision_embed_tokens.*`` tensor of a sharded checkpoint (prefix removed)."""
    from safetensors import safe_open

    index = json.loads((Path(ckpt) / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for name, shard in index["weight_map"].items():
        if name.startswith(VISION_PREFIX):
            with safe_open(str(Path(ckpt) / shard), framework="pt") as f:
                out[name[len(VISION_PREFIX) :]] = f.get_tensor(name).to(torch.float32)
    return out


class ReferenceImagePath:
    """The released image path, straightforwardly: HF ``CLIPVisionModel`` on all crops,
    ``hidden_states[layer_idx]``, drop CLS, Python-loop merge/separators/order, projection."""

    def __init__(self, ckpt: Path) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = json.loads((Path(ckpt) / "config.json").read_text())
        vcfg = cfg["img_processor"]["vision_config"]
        self.layer_idx = cfg["img_processor"].get("layer_idx", -2)
        self.order = cfg["embd_layer"].get("hd_transform_order", "glb_sub")
        self.projection_cls = cfg["embd_layer"].get("projection_cls", "linear")
        hf_keys = set(CLIPVisionConfig().to_dict())
        hf_cfg = CLIPVisionConfig(**{k: v for k, v in vcfg.items() if k in hf_keys})
        hf_cfg._attn_implementation = "eager"
        self.tower = CLIPVisionModel(hf_cfg).eval()
        t = read_vision_tensors(ckpt)
        tower_sd = {}
        prefix = "img_processor.vision_model."
        own_keys = set(self.tower.state_dict())
        for k, v in t.items():
            if k.startswith(prefix):
                key = k[len(prefix) :]
                tower_sd[key if key in own_keys else "vision_model." + key] = v
        self.tower.load_state_dict(tower_sd, strict=True)
        self.glb_GN = t["glb_GN"].reshape(-1)
        self.sub_GN = t["sub_GN"].reshape(-1)
        self.proj = {k[len("img_projection.") :]: v for k, v in t.items() if k.startswith("img_projection.")}

    @torch.no_grad()
    def hidden(self, crops: torch.Tensor) -> torch.Tensor:
        """``(C, 3, 336, 336)`` -> ``hidden_states[layer_idx]`` ``(C, 577, D)``."""
        out = self.tower(pixel_values=crops, output_hidden_states=True)
        return out.hidden_states[self.layer_idx]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection_cls == "mlp":
            x = F.linear(x, self.proj["0.weight"], self.proj["0.bias"])
            x = F.gelu(x)  # exact (erf)
            return F.linear(x, self.proj["2.weight"], self.proj["2.bias"])
        return F.linear(x, self.proj["weight"], self.proj["bias"])

    @staticmethod
    def merge_2x2(patches: torch.Tensor) -> list[list[torch.Tensor]]:
        """``(576, D)`` -> a 12x12 grid (lists) of ``4D`` vectors: ``[p(2r,2c), p(2r,2c+1), p(2r+1,2c), p(2r+1,2c+1)]``."""
        g = 2 * MERGED
        grid = []
        for r in range(MERGED):
            row = []
            for c in range(MERGED):
                p = [patches[(2 * r + dr) * g + 2 * c + dc] for dr in (0, 1) for dc in (0, 1)]
                row.append(torch.cat(p))
            grid.append(row)
        return grid

    @torch.no_grad()
    def image_tokens(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """``(n, N+1, 3, 336, 336)``, ``(n, 2)`` -> per image ``(T_i, hidden)``."""
        out = []
        for i in range(pixel_values.shape[0]):
            feats = self.hidden(pixel_values[i])[:, 1:]  # every crop, padded included; drop CLS
            H, W = (int(v) for v in image_sizes[i])
            h, w = H // CROP, W // CROP
            grids = [self.merge_2x2(feats[k]) for k in range(1 + h * w)]
            glb, subs = grids[0], grids[1:]
            sub_tokens = []
            for row in range(MERGED * h):
                for col in range(MERGED * w):
                    crop = (row // MERGED) * w + col // MERGED
                    sub_tokens.append(subs[crop][row % MERGED][col % MERGED])
                sub_tokens.append(self.sub_GN)
            glb_tokens = []
            for row in range(MERGED):
                for col in range(MERGED):
                    glb_tokens.append(glb[row][col])
                glb_tokens.append(self.sub_GN)
            if self.order == "sub_glb":
                seq = sub_tokens + [self.glb_GN] + glb_tokens
            else:
                seq = glb_tokens + [self.glb_GN] + sub_tokens
            out.append(self.project(torch.stack(seq)))
        return out

    @torch.no_grad()
    def global_pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Mean of the global view's patch features at ``layer_idx``: ``(n, D)``."""
        return torch.stack([self.hidden(pixel_values[i, :1])[0, 1:].mean(dim=0) for i in range(pixel_values.shape[0])])


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic image with structure (gradients) and noise, so resampling errors show."""
    rng = np.random.default_rng(seed)
    xx = (np.arange(width, dtype=np.int32) * 255 // max(width - 1, 1))[None, :]
    yy = (np.arange(height, dtype=np.int32) * 255 // max(height - 1, 1))[:, None]
    arr = np.empty((height, width, 3), dtype=np.int16)
    arr[..., 0], arr[..., 1], arr[..., 2] = xx, yy, (xx + yy) % 256
    arr += rng.integers(-60, 61, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").convert(mode)
