"""phiclip.testing's tiny checkpoints are real checkpoints: every kind loads and embeds like a released one."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import phiclip
from phiclip.pipeline.step import encode_images
from phiclip.testing import TINY_MODEL_KINDS, build_tiny_model


@pytest.mark.parametrize("kind", sorted(TINY_MODEL_KINDS))
def test_every_tiny_kind_loads_and_embeds(tmp_path, kind):
    ckpt = build_tiny_model(kind, tmp_path / kind)
    enc = phiclip.load_encoder(f"{kind}:{ckpt}", device="cpu")
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(img)
    vec = np.asarray(encode_images(enc, [str(img)]))
    assert vec.shape[0] == 1 and np.isfinite(vec).all()


def test_refuses_unknown_kind_and_a_used_folder(tmp_path):
    with pytest.raises(ValueError, match="choose one of"):
        build_tiny_model("bert", tmp_path / "x")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "f").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        build_tiny_model("clip", tmp_path / "used")
