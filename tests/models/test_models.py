"""phiclip.models: the shared CLIP vision tower and its config, the strict load, vector helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from phiclip.hub import CheckpointError
from phiclip.models.checkpoint import LoadReport, strict_load
from phiclip.models.clip_config import CLIPVisionConfig
from phiclip.models.clip_vision import CLIPVisionTransformer
from phiclip.models.ops import l2_normalize, mean_pool


def test_config_is_a_dataclass_with_the_released_defaults() -> None:
    cfg = CLIPVisionConfig()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size, cfg.patch_size, cfg.grid) == (1024, 24, 336, 14, 24)
    tiny = CLIPVisionConfig.from_dict({"hidden_size": 32, "num_attention_heads": 4, "image_size": 336, "patch_size": 42,
                                       "num_hidden_layers": 2, "projection_dim": 7})  # unknown keys are ignored
    assert tiny.hidden_size == 32 and tiny.grid == 8 and tiny.intermediate_size == 4096


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"patch_size": 0}, "vision_config.patch_size 0 must be an integer >= 1"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "vision_config.hidden_size 30 is not divisible by"),
        ({"image_size": 100, "patch_size": 14}, "vision_config.image_size 100 is not a multiple of"),
        ({"hidden_act": 3}, "vision_config.hidden_act 3 must be a string"),
        ({"layer_norm_eps": "small"}, "vision_config.layer_norm_eps 'small' must be a number"),
    ],
)
def test_config_fields_are_checked_and_named(fields: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as err:
        CLIPVisionConfig.from_dict(fields, "ckpt/config.json")
    assert "ckpt/config.json" in str(err.value)


def test_the_tower_reads_its_config_by_attribute_and_cls_path_matches_full_pass() -> None:
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=56, patch_size=14)
    tower = CLIPVisionTransformer(cfg).eval()
    for p in tower.parameters():
        nn.init.normal_(p, std=0.2)
    assert len(tower.encoder.layers) == 3 and len(CLIPVisionTransformer(cfg, 1).encoder.layers) == 1
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        full = tower(pixels)  # (2, 1 + 16, 32)
        cls = tower.forward_cls(pixels)  # the last layer for the CLS query only
    assert full.shape == (2, 17, 32)
    torch.testing.assert_close(cls, full[:, 0], atol=1e-5, rtol=1e-5)


def test_strict_load_names_missing_unexpected_and_shapes() -> None:
    module = nn.Linear(3, 2)
    with pytest.raises(CheckpointError) as err:
        strict_load(module, {"weight": torch.zeros(2, 3), "bias_typo": torch.zeros(2)}, source="ckpt")
    assert "missing: ['bias']" in str(err.value) and "unexpected: ['bias_typo']" in str(err.value)
    with pytest.raises(CheckpointError, match="size mismatch for bias"):
        strict_load(module, {"weight": torch.zeros(2, 3), "bias": torch.zeros(5)}, source="ckpt")
    w, b = torch.ones(2, 3), torch.full((2,), 2.0)
    strict_load(module, {"weight": w, "bias": b}, source="ckpt")
    assert module.weight.data_ptr() == w.data_ptr() and module.bias.data_ptr() == b.data_ptr()  # assigned, not copied
    assert LoadReport.compare(["a", "b"], ["b", "c"]) == LoadReport(missing=["a"], unexpected=["c"])


def test_l2_normalize_one_helper_for_arrays_and_tensors() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], dtype=np.float64)
    out = l2_normalize(x)
    assert out.dtype == np.float32 and np.allclose(out, [[0.6, 0.8], [0, 0], [1, 0]])
    t = l2_normalize(torch.tensor(x, dtype=torch.float32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t[:2].numpy(), out[:2])  # zero rows stay zero in both
    assert mean_pool([torch.ones(3, 2), torch.zeros(1, 2)]).tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_plain_clip_does_not_import_the_phi3v_image_path(tmp_path: Path) -> None:
    from phiclip.testing import build_tiny_clip

    ckpt = build_tiny_clip(tmp_path / "clip")
    code = (
        "import sys\nfrom phiclip.encoders import load_encoder\nfrom phiclip.pipeline.step import encode_images\n"
        "from PIL import Image\n"
        f"enc = load_encoder('clip:{ckpt}', device='cpu', dtype='float32')\n"
        "encode_images(enc, [Image.new('RGB', (40, 30))])\n"
        "print(sorted(m for m in sys.modules if m.startswith('phiclip.phi3v')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PHICLIP_CPU_PRECISION": "float32", "PATH": "",
                              **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}).stdout
    # Only torch-free constants that spec options are checked against (config: num_crops bounds; prompts:
    # the phi3v-lm presets); no layers, weights, processing or language model.
    assert out.strip().splitlines()[-1] == "['phiclip.phi3v', 'phiclip.phi3v.config', 'phiclip.phi3v.prompts']"
