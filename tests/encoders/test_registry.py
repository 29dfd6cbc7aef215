"""The one kind table: spec parsing, checkpoint vetting and loading all read it, so a new kind is one row
(and its module)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from phiclip.checkpoints import open_checkpoint
from phiclip.encoders import KINDS, load_encoder, parse_spec
from phiclip.encoders.registry import EncoderKind, kinds_for_model_type, known_model_types
from phiclip.hub import CheckpointError

_MODULE = '''
from phiclip.checkpoints import open_checkpoint


class TinyEncoder:
    """A stand-in encoder: what the registry hands to a kind's module."""

    def __init__(self, checkpoint, options, placement):
        self.checkpoint, self.options, self.placement = checkpoint, options, placement

    @classmethod
    def build(cls, spec, options, placement):
        return cls(open_checkpoint(spec.location, kind=spec.kind), options, placement)
'''


def test_every_model_type_has_its_kinds() -> None:
    assert known_model_types() == ("clip", "siglip", "phi3_v", "open_clip", "siglip2", "metaclip_2", "aimv2",
                                   "aimv2_vision_model", "dinov2", "dinov2_with_registers", "dinov3_vit")
    assert [k.name for k in kinds_for_model_type("phi3_v")] == ["phi3v", "phi3v-lm"]
    # The fixed-resolution SigLIP 2 checkpoints ship in SigLIP's layout: both kinds load them (siglip first).
    assert [k.name for k in kinds_for_model_type("siglip")] == ["siglip", "siglip2"]
    assert [k.name for k in kinds_for_model_type("dinov2_with_registers")] == ["dinov2"]
    assert kinds_for_model_type("llama") == ()
    assert all(k.transformers_config == (k.name not in ("phi3v", "phi3v-lm", "open_clip")) for k in KINDS.values())


def test_a_new_kind_is_one_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny_kind_module.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "tiny_vit", "hidden_size": 8}))
    with pytest.raises(ValueError, match="unknown kind 'tiny'"):
        parse_spec(f"tiny:{ckpt}")
    with pytest.raises(CheckpointError, match="model_type 'tiny_vit' is not one phiclip loads"):
        open_checkpoint(ckpt)

    monkeypatch.setitem(KINDS, "tiny", EncoderKind("tiny", "tiny_vit", "tiny_kind_module", "TinyEncoder", None,
                                                   int8=False, summary="a test kind"))
    assert parse_spec(f"tiny:{ckpt}").kind == "tiny"
    enc = load_encoder(f"tiny:{ckpt}", device="cpu", dtype="float32")
    assert type(enc).__name__ == "TinyEncoder" and enc.checkpoint.model_type == "tiny_vit"
    assert "tiny_kind_module" in sys.modules  # imported when the kind was first built
    # The vetting names the new kind for its model type, and the new model type for other kinds.
    with pytest.raises(CheckpointError, match="use 'tiny:"):
        open_checkpoint(ckpt, kind="clip")
    monkeypatch.delitem(sys.modules, "tiny_kind_module")


def test_a_spec_without_kind_finds_it_from_the_checkpoint(tmp_path: Path) -> None:
    from phiclip.encoders.registry import kind_for_location, resolve_spec
    from phiclip.testing import build_tiny_clip, build_tiny_open_clip

    clip = build_tiny_clip(tmp_path / "clip")
    assert kind_for_location(clip) == "clip" and resolve_spec(f"{clip}?max_batch=8").kind == "clip"
    assert kind_for_location(build_tiny_open_clip(tmp_path / "oc")) == "open_clip"  # its own config file
    assert load_encoder(str(clip), device="cpu", dtype="float32").name == f"clip:{clip}"
    with pytest.raises(ValueError, match="unknown kind 'vit'"):
        parse_spec(f"vit:{clip}")  # parse_spec itself still wants a kind: nothing is read
