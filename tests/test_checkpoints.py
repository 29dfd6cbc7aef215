"""phiclip.checkpoints: every encoder kind opens its checkpoint the one way: the location resolved once,
the config vetted against the one kind table (a hub id pinned to one commit: tests/security/test_checkpoints.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from phiclip import hub
from phiclip.checkpoints import open_checkpoint
from phiclip.encoders import load_encoder
from phiclip.hub import CheckpointError
from phiclip.testing import build_tiny_clip, build_tiny_phi3v, build_tiny_phi3v_lm, build_tiny_siglip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {
        "clip": build_tiny_clip(root / "clip"),
        "siglip": build_tiny_siglip(root / "siglip"),
        "phi3v": build_tiny_phi3v(root / "phi3v", num_crops=4),
        "phi3v-lm": build_tiny_phi3v_lm(root / "phi3v-lm", num_crops=1),
    }


@pytest.fixture
def count_resolutions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of the local-or-hub rule, wherever a module holds it (``from phiclip.hub import ...`` too)."""
    calls: list[str] = []
    real = hub.resolve_location

    def counting(location: Any) -> hub.Location:
        calls.append(str(location))
        return real(location)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("phiclip") and getattr(module, "resolve_location", None) is real:
            monkeypatch.setattr(module, "resolve_location", counting)
    return calls


@pytest.mark.parametrize("kind", ["clip", "siglip", "phi3v", "phi3v-lm"])
def test_a_load_resolves_the_location_once(checkpoints: dict[str, Path], count_resolutions: list[str],
                                           kind: str) -> None:
    enc = load_encoder(f"{kind}:{checkpoints[kind]}", device="cpu", dtype="float32")
    assert count_resolutions == [str(checkpoints[kind])]
    assert enc.describe()["details"]["revision"] is None  # a local folder has no commit


def test_open_checkpoint_reads_the_config_and_the_weights(checkpoints: dict[str, Path]) -> None:
    ckpt = open_checkpoint(checkpoints["phi3v"], kind="phi3v")
    assert ckpt.model_type == "phi3_v" and ckpt.revision is None and ckpt.config["model_type"] == "phi3_v"
    names = ckpt.names_with_prefix("model.vision_embed_tokens.img_projection.")
    tensors = ckpt.read_tensors(names)
    assert sorted(tensors) == sorted(names) and ckpt.fingerprint.startswith("sha256:")
    assert "config.json" in ckpt.files and all(p.is_file() for p in ckpt.files.values())
    assert open_checkpoint(ckpt) is ckpt


def test_the_kind_asked_for_must_load_the_model_type(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="use 'clip:"):
        open_checkpoint(checkpoints["clip"], kind="phi3v")
    # Both phi3v kinds load phi3_v checkpoints.
    assert open_checkpoint(checkpoints["phi3v-lm"], kind="phi3v").model_type == "phi3_v"


@pytest.mark.parametrize("kind", ["clip", "siglip2", "open_clip"])
def test_a_load_returns_while_its_weights_are_still_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           kind: str) -> None:
    """The weights are hashed in the background; the encoder waits for the fingerprint only where it is
    read (describe(), a manifest), and then it is the fingerprint of the files."""
    import threading

    import phiclip.models.checkpoint as C
    from phiclip.cache import CACHE_ENV
    from phiclip.testing import build_tiny_open_clip, build_tiny_siglip2

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # no digests kept: every byte is hashed
    folder = {"clip": build_tiny_clip, "siglip2": build_tiny_siglip2, "open_clip": build_tiny_open_clip}[kind](
        tmp_path / kind)
    weights = sorted(folder.glob("*.safetensors"))
    hashing, release = threading.Event(), threading.Event()

    def gated(real: Any) -> Any:
        def hash_after_release(*args: Any, **kwargs: Any) -> Any:
            hashing.set()
            assert release.wait(15), "the load waited for the hashing"
            return real(*args, **kwargs)
        return hash_after_release

    with monkeypatch.context() as patched:
        patched.setattr(C, "_hash_span", gated(C._hash_span))  # a file read and hashed (clip:, siglip2:)
        patched.setattr(C, "_sha256_hex", gated(C._sha256_hex))  # tensors already read (open_clip:)
        enc = load_encoder(f"{kind}:{folder}", device="cpu", dtype="float32")
        assert hashing.wait(5) and isinstance(enc._weights_fingerprint, C.LazyFingerprint)
        release.set()
        fingerprint = enc.describe()["weights_fingerprint"]
    assert fingerprint == enc.weights_fingerprint == C.fingerprint_files(weights)
