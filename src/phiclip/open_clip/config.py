"""``open_clip_config.json`` as data: what phiclip loads, what it refuses, and the transformers
``CLIPConfig`` it becomes.

The file (written by open_clip's ``push_to_hf_hub``) is ``{"model_cfg": {...}, "preprocess_cfg":
{...}}``; ``model_cfg`` is open_clip's model config: ``embed_dim``, ``quick_gelu``, ``vision_cfg``
(``CLIPVisionCfg``) and ``text_cfg`` (``CLIPTextCfg``).

Supported: open_clip's own ``VisionTransformer`` + ``TextTransformer`` CLIP (ViT-B/32, B/16, L/14,
L/14-336, H/14, g/14, bigG/14 and their ``-quickgelu`` variants, and any sizes of that family):
learnable position embeddings, ``ln_pre``, class-token pooling, linear projections without bias,
a causal text tower pooled at the end token (argmax), GELU or QuickGELU, LayerNorm eps 1e-5,
``logit_scale`` and ``logit_bias``. Every other setting that changes the computation is refused by
name (:class:`UnsupportedOpenCLIP`): timm towers (``timm_model_name``: EVA, ViTamin, ConvNeXt...),
transformers text towers (``hf_model_name``: XLM-R, mT5...), CoCa (``multimodal_cfg``), ResNet
towers (``layers`` a list: RN50...), attentional pooling, layer scale, other pooling or
projections, custom attention blocks, other tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiclip.hub import CheckpointError

CONFIG_FILE = "open_clip_config.json"
SAFETENSORS_FILE = "open_clip_model.safetensors"
BIN_FILE = "open_clip_pytorch_model.bin"

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

SUPPORTED = ("open_clip's VisionTransformer + TextTransformer CLIP: ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, "
             "ViT-H-14, ViT-g-14, ViT-bigG-14 and their -quickgelu variants (any sizes of that family)")


class UnsupportedOpenCLIP(CheckpointError):
    """An open_clip architecture or setting phiclip does not load (the message names it)."""


# Settings that do not change inference (or are read elsewhere), per section.
_IGNORED_VISION = {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
                   "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "final_ln_after_pool"}
_IGNORED_TEXT = {"output_tokens", "pad_id", "eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type",
                 "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs"}
_IGNORED_TOP = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias",
                "cast_dtype", "custom_text", "output_dict"}
# Settings whose only supported value is the default (None, False, "", "learnable"...): name -> allowed values.
_DEFAULT_ONLY_VISION: dict[str, tuple[Any, ...]] = {
    "ls_init_value": (None,), "attentional_pool": (False,), "no_ln_pre": (False,), "pos_embed_type": ("learnable",),
    "pool_type": ("tok",), "proj_type": ("linear",), "proj_bias": (False,), "act_kwargs": (None, {}),
    "norm_kwargs": (None, {}), "block_type": (None, "default"), "qk_norm": (False,), "scaled_cosine_attn": (False,),
    "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,),
    "input_patchnorm": (False,), "global_average_pool": (False,), "attn_pooler_type": (None,),
}
_DEFAULT_ONLY_TEXT: dict[str, tuple[Any, ...]] = {
    "ls_init_value": (None,), "embed_cls": (False,), "no_causal_mask": (False,), "final_ln_after_pool": (False,),
    "pool_type": ("argmax",), "proj_bias": (False,), "proj_type": ("linear",), "act_kwargs": (None, {}),
    "norm_kwargs": (None, {}), "block_type": (None, "default"), "qk_norm": (False,), "scaled_cosine_attn": (False,),
    "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,),
}
_SIZES_VISION = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_SIZES_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224}
_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0}


@dataclass(frozen=True)
class PreprocessConfig:
    """open_clip's ``PreprocessCfg`` at inference: size, mean/std, interpolation, resize mode, fill."""

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"  # bicubic | bilinear ("random" is bicubic at inference)
    resize_mode: str = "shortest"  # shortest | longest | squash
    fill_color: int = 0


@dataclass(frozen=True)
class OpenCLIPConfig:
    """A supported ``open_clip_config.json``, read and checked."""

    model_cfg: dict[str, Any]
    preprocess: PreprocessConfig
    #: What the file describes, for messages ("ViT 2x32 patch 32 / text 2x32").
    architecture: str
    tokenizer_clean: str = "lower"

    @property
    def vision(self) -> dict[str, Any]:
        return {**_VISION_DEFAULTS, **self.model_cfg.get("vision_cfg", {})}

    @property
    def text(self) -> dict[str, Any]:
        return {**_TEXT_DEFAULTS, **self.model_cfg.get("text_cfg", {})}

    @property
    def hidden_act(self) -> str:
        return "quick_gelu" if self.model_cfg.get("quick_gelu", False) else "gelu"

    @property
    def context_length(self) -> int:
        return int(self.text["context_length"])

    @property
    def custom_text(self) -> bool:
        """Text tower under ``text.`` in the state dict (open_clip's ``CustomTextCLIP``)."""
        return bool(self.model_cfg.get("custom_text", False))

    def hf_config_dict(self) -> dict[str, Any]:
        """The transformers ``CLIPConfig`` arguments of the same model (see :mod:`phiclip.open_clip.convert`).
        ``eos_token_id`` 2 makes transformers pool the text at the argmax token id, as open_clip does."""
        v, t = self.vision, self.text
        vw, tw = int(v["width"]), int(t["width"])
        vision = dict(hidden_size=vw, intermediate_size=int(vw * v["mlp_ratio"]), num_hidden_layers=int(v["layers"]),
                      num_attention_heads=vw // int(v["head_width"]), patch_size=int(v["patch_size"]),
                      image_size=int(v["image_size"]), hidden_act=self.hidden_act, layer_norm_eps=1e-5,
                      num_channels=3)
        text = dict(hidden_size=tw, intermediate_size=int(tw * t["mlp_ratio"]), num_hidden_layers=int(t["layers"]),
                    num_attention_heads=int(t["heads"]), max_position_embeddings=int(t["context_length"]),
                    vocab_size=int(t["vocab_size"]), hidden_act=self.hidden_act, layer_norm_eps=1e-5,
                    bos_token_id=0, eos_token_id=2, pad_token_id=1)
        return {"vision_config": vision, "text_config": text, "projection_dim": int(self.model_cfg["embed_dim"]),
                "logit_scale_init_value": math.log(1 / 0.07)}


def _where(source: str | Path) -> str:
    return f"{source}: " if source else ""


def _refuse(source: str | Path, what: str) -> UnsupportedOpenCLIP:
    return UnsupportedOpenCLIP(f"{_where(source)}{what} is not supported; phiclip loads {SUPPORTED}. "
                               "Load it with open_clip itself, or convert it to a supported architecture")


def _positive_int(value: Any, name: str, source: str | Path, maximum: int = 1 << 17) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise CheckpointError(f"{_where(source)}model_cfg.{name} {value!r:.80} must be an integer from 1 to {maximum}")
    return value


def _check_section(section: dict[str, Any], name: str, sizes: set[str], default_only: dict[str, tuple[Any, ...]],
                   ignored: set[str], source: str | Path) -> None:
    for key, value in section.items():
        if key in sizes or key in ignored:
            continue
        if key in default_only:
            if value not in default_only[key]:
                raise _refuse(source, f"{name}.{key}={value!r:.80}")
            continue
        if key.startswith("timm_") and section.get("timm_model_name") is None:
            continue
        if key.startswith("hf_") and section.get("hf_model_name") is None:
            continue
        raise _refuse(source, f"the open_clip setting {name}.{key}={value!r:.80} (unknown to phiclip)")


def parse_config(data: Any, source: str | Path = "") -> OpenCLIPConfig:
    """Read and check an ``open_clip_config.json`` (as data).

    Raises:
        UnsupportedOpenCLIP: an architecture or setting phiclip does not load, named.
        CheckpointError: a damaged file (not an object, sizes of the wrong type or range).
    """
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise CheckpointError(f"{_where(source)}an open_clip config must be a JSON object with a 'model_cfg' object")
    cfg = data["model_cfg"]
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise CheckpointError(f"{_where(source)}model_cfg.vision_cfg and model_cfg.text_cfg must be objects")
    if cfg.get("multimodal_cfg") is not None:
        raise _refuse(source, "CoCa (model_cfg.multimodal_cfg: a captioning decoder)")
    if vision.get("timm_model_name"):
        raise _refuse(source, f"a timm image tower (vision_cfg.timm_model_name={vision['timm_model_name']!r:.80}: "
                              "EVA, ViTamin, ConvNeXt and the like need timm)")
    if text.get("hf_model_name"):
        raise _refuse(source, f"a transformers text tower (text_cfg.hf_model_name={text['hf_model_name']!r:.80})")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise _refuse(source, "a ResNet image tower (vision_cfg.layers is a list: RN50, RN101...)")
    if text.get("hf_tokenizer_name") or text.get("tokenizer_mode"):
        raise _refuse(source, f"the tokenizer {text.get('hf_tokenizer_name') or text.get('tokenizer_mode')!r:.80} "
                              "(phiclip has open_clip's CLIP BPE tokenizer only)")
    kwargs = text.get("tokenizer_kwargs") or {}
    clean = kwargs.get("clean", "lower") if isinstance(kwargs, dict) else None
    if not isinstance(kwargs, dict) or set(kwargs) - {"clean"} or clean not in ("lower", "whitespace"):
        raise _refuse(source, f"text_cfg.tokenizer_kwargs={kwargs!r:.80} (clean=lower or whitespace only)")
    for key in cfg:
        if key in _IGNORED_TOP or key == "multimodal_cfg":
            continue
        if key == "nonscalar_logit_scale" and not cfg[key]:
            continue
        raise _refuse(source, f"the open_clip setting model_cfg.{key}={cfg[key]!r:.80}")
    _check_section(vision, "vision_cfg", _SIZES_VISION, _DEFAULT_ONLY_VISION, _IGNORED_VISION, source)
    _check_section(text, "text_cfg", _SIZES_TEXT, _DEFAULT_ONLY_TEXT, _IGNORED_TEXT, source)
    if not isinstance(cfg.get("quick_gelu", False), bool):
        raise CheckpointError(f"{_where(source)}model_cfg.quick_gelu must be true or false")
    _positive_int(cfg.get("embed_dim"), "embed_dim", source)
    v, t = {**_VISION_DEFAULTS, **vision}, {**_TEXT_DEFAULTS, **text}
    for key in ("layers", "width", "head_width", "patch_size"):
        _positive_int(v[key], f"vision_cfg.{key}", source)
    if isinstance(v["image_size"], (list, tuple)):
        if len(v["image_size"]) != 2 or v["image_size"][0] != v["image_size"][1]:
            raise _refuse(source, f"a non-square image size (vision_cfg.image_size={v['image_size']!r:.40})")
        vision = {**vision, "image_size": v["image_size"][0]}
        v["image_size"] = v["image_size"][0]
    _positive_int(v["image_size"], "vision_cfg.image_size", source, 1 << 14)
    for key in ("layers", "width", "heads", "context_length", "vocab_size"):
        _positive_int(t[key], f"text_cfg.{key}", source, 1 << 22)
    for section, name in ((v, "vision_cfg"), (t, "text_cfg")):
        ratio = section["mlp_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 64:
            raise CheckpointError(f"{_where(source)}model_cfg.{name}.mlp_ratio {ratio!r:.40} must be a number in (0, 64]")
    if v["width"] % v["head_width"]:
        raise CheckpointError(f"{_where(source)}vision_cfg.width {v['width']} is not a multiple of head_width {v['head_width']}")
    if t["width"] % t["heads"]:
        raise CheckpointError(f"{_where(source)}text_cfg.width {t['width']} is not divisible by heads {t['heads']}")
    if t["vocab_size"] != 49408:
        raise _refuse(source, f"a text vocabulary of {t['vocab_size']} tokens (open_clip's CLIP tokenizer has 49408)")
    if v["image_size"] % v["patch_size"]:
        raise CheckpointError(f"{_where(source)}vision_cfg.image_size {v['image_size']} is not a multiple of "
                              f"patch_size {v['patch_size']}")
    model_cfg = {**cfg, "vision_cfg": vision}
    preprocess = parse_preprocess(data.get("preprocess_cfg") or {}, int(v["image_size"]), source)
    arch = (f"ViT {v['layers']}x{v['width']} patch {v['patch_size']} at {v['image_size']}px, text {t['layers']}x"
            f"{t['width']}, {'QuickGELU' if cfg.get('quick_gelu') else 'GELU'}, embed {cfg['embed_dim']}")
    return OpenCLIPConfig(model_cfg, preprocess, arch, tokenizer_clean=clean)


def parse_preprocess(data: Any, image_size: int, source: str | Path = "") -> PreprocessConfig:
    """``preprocess_cfg`` (every key optional; open_clip's defaults)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{_where(source)}preprocess_cfg must be an object")
    unknown = set(data) - {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}
    if unknown:
        raise CheckpointError(f"{_where(source)}preprocess_cfg has unknown keys {sorted(unknown)}")
    size = data.get("size", image_size)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse(source, f"non-square preprocessing (preprocess_cfg.size={size!r:.40})")
        size = size[0]
    size = _positive_int(size, "preprocess_cfg.size", source, 1 << 14)
    if size != image_size:
        raise CheckpointError(f"{_where(source)}preprocess_cfg.size {size} is not the model's image size {image_size}")
    if data.get("mode", "RGB") != "RGB":
        raise _refuse(source, f"preprocess_cfg.mode={data['mode']!r:.20}")
    triples = []
    for key, default in (("mean", OPENAI_MEAN), ("std", OPENAI_STD)):
        value = data.get(key, default)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = (value,) * 3
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)):
            raise CheckpointError(f"{_where(source)}preprocess_cfg.{key} {value!r:.80} must be 3 finite numbers")
        triples.append(tuple(float(x) for x in value))
    if any(s == 0 for s in triples[1]):
        raise CheckpointError(f"{_where(source)}preprocess_cfg.std {triples[1]} has a 0")
    interpolation = data.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "random"):
        raise _refuse(source, f"preprocess_cfg.interpolation={interpolation!r:.20} (bicubic, bilinear)")
    resize_mode = data.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "longest", "squash"):
        raise _refuse(source, f"preprocess_cfg.resize_mode={resize_mode!r:.20} (shortest, longest, squash)")
    fill = data.get("fill_color", 0)
    if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
        raise CheckpointError(f"{_where(source)}preprocess_cfg.fill_color {fill!r:.20} must be an integer 0-255")
    return PreprocessConfig(size=size, mean=triples[0], std=triples[1],  # type: ignore[arg-type]
                            interpolation="bilinear" if interpolation == "bilinear" else "bicubic",
                            resize_mode=resize_mode, fill_color=fill)


def mlp_ratio_for(width: int, intermediate: int) -> float:
    """An ``mlp_ratio`` for which open_clip's ``int(width * mlp_ratio)`` is ``intermediate``."""
    ratio = intermediate / width
    while int(width * ratio) < intermediate:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def config_from_hf(hf_config: Any, preprocess: PreprocessConfig) -> dict[str, Any]:
    """The ``open_clip_config.json`` of a transformers ``CLIPConfig`` (the reverse of
    :meth:`OpenCLIPConfig.hf_config_dict`).

    Raises:
        UnsupportedOpenCLIP: settings open_clip's CLIP cannot express (other activations, eps,
            different activations in the two towers, non-square images).
    """
    v, t = hf_config.vision_config, hf_config.text_config
    acts = {v.hidden_act, t.hidden_act}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise UnsupportedOpenCLIP(f"hidden_act {sorted(acts)}: open_clip's CLIP has one activation for both towers, "
                                  "gelu or quick_gelu")
    for name, c in (("vision", v), ("text", t)):
        if abs(float(c.layer_norm_eps) - 1e-5) > 1e-12:
            raise UnsupportedOpenCLIP(f"{name} layer_norm_eps {c.layer_norm_eps}: open_clip's CLIP uses 1e-5")
    if int(v.hidden_size) % int(v.num_attention_heads):
        raise UnsupportedOpenCLIP("vision hidden_size is not divisible by num_attention_heads")
    model_cfg = {
        "embed_dim": int(hf_config.projection_dim),
        "vision_cfg": {"image_size": int(v.image_size), "layers": int(v.num_hidden_layers), "width": int(v.hidden_size),
                       "head_width": int(v.hidden_size) // int(v.num_attention_heads),
                       "mlp_ratio": mlp_ratio_for(int(v.hidden_size), int(v.intermediate_size)),
                       "patch_size": int(v.patch_size)},
        "text_cfg": {"context_length": int(t.max_position_embeddings), "vocab_size": int(t.vocab_size),
                     "width": int(t.hidden_size), "heads": int(t.num_attention_heads), "layers": int(t.num_hidden_layers),
                     "mlp_ratio": mlp_ratio_for(int(t.hidden_size), int(t.intermediate_size))},
    }
    if acts == {"quick_gelu"}:
        model_cfg["quick_gelu"] = True
    pp = {"size": preprocess.size, "mean": list(preprocess.mean), "std": list(preprocess.std),
          "interpolation": preprocess.interpolation, "resize_mode": preprocess.resize_mode}
    if preprocess.fill_color:
        pp["fill_color"] = preprocess.fill_color
    return {"model_cfg": model_cfg, "preprocess_cfg": pp}


__all__ = [
    "BIN_FILE",
    "CONFIG_FILE",
    "SAFETENSORS_FILE",
    "SUPPORTED",
    "OpenCLIPConfig",
    "PreprocessConfig",
    "UnsupportedOpenCLIP",
    "config_from_hf",
    "mlp_ratio_for",
    "parse_config",
    "parse_preprocess",
]
