"""Spec parsing (from a table) and the errors of ``load_encoder`` that come before any model loads."""

from __future__ import annotations

import pytest

from phiclip.encoders import KINDS, EncoderSpec, load_encoder, parse_spec
from phiclip.encoders.base import SPEC_KINDS

GOOD_SPECS = [
    ("clip:openai/clip-vit-base-patch32", EncoderSpec("clip", "openai/clip-vit-base-patch32", {})),
    ("CLIP:openai/clip-vit-base-patch32", EncoderSpec("clip", "openai/clip-vit-base-patch32", {})),
    ("clip:/models/clip", EncoderSpec("clip", "/models/clip", {})),
    ("clip: ./relative/dir ", EncoderSpec("clip", "./relative/dir", {})),
    ("siglip:google/siglip-base-patch16-224", EncoderSpec("siglip", "google/siglip-base-patch16-224", {})),
    ("clip:/m?normalize=false", EncoderSpec("clip", "/m", {"normalize": "false"})),
    ("clip:/m?normalize=false&max_batch=8", EncoderSpec("clip", "/m", {"normalize": "false", "max_batch": "8"})),
    ("clip:/m?normalize=false,max_batch=8", EncoderSpec("clip", "/m", {"normalize": "false", "max_batch": "8"})),
    ("clip:/m?max_batch= 8 &", EncoderSpec("clip", "/m", {"max_batch": "8"})),
    ("clip:/m?", EncoderSpec("clip", "/m", {})),
    ("phi3v:microsoft/Phi-3-vision-128k-instruct?num_crops=4&pooling=global",
     EncoderSpec("phi3v", "microsoft/Phi-3-vision-128k-instruct", {"num_crops": "4", "pooling": "global"})),
    # A Windows path keeps its drive colon: only the first colon separates the kind.
    ("clip:C:\\models\\clip", EncoderSpec("clip", "C:\\models\\clip", {})),
    ("clip:/m?a=b=c", EncoderSpec("clip", "/m", {"a": "b=c"})),
]


@pytest.mark.parametrize("text,expected", GOOD_SPECS, ids=[s for s, _ in GOOD_SPECS])
def test_parse_good_specs(text: str, expected: EncoderSpec) -> None:
    assert parse_spec(text) == expected


@pytest.mark.parametrize("text,expected", GOOD_SPECS, ids=[s for s, _ in GOOD_SPECS])
def test_str_round_trips(text: str, expected: EncoderSpec) -> None:
    assert parse_spec(str(parse_spec(text))) == expected


BAD_SPECS = [
    ("openai/clip-vit-base-patch32", "has no kind"),
    ("", "has no kind"),
    ("vit:openai/clip", "unknown kind 'vit'"),
    ("open_clip:ViT-B-32", "unknown kind 'open_clip'"),
    ("clip:", "names no model"),
    ("clip:   ", "names no model"),
    ("clip:?normalize=false", "names no model"),
    ("clip:/m?normalize", "option 'normalize' is not key=value"),
    ("clip:/m?=true", "option '=true' is not key=value"),
    ("clip:/m?a=1&b", "option 'b' is not key=value"),
]


@pytest.mark.parametrize("text,message", BAD_SPECS, ids=[s or "<empty>" for s, _ in BAD_SPECS])
def test_parse_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="encoder spec") as info:
        parse_spec(text)
    assert message in str(info.value)
    assert repr(text) in str(info.value)  # the error names the input


def test_unknown_kind_lists_known_kinds() -> None:
    with pytest.raises(ValueError) as info:
        parse_spec("vit:x")
    for kind in SPEC_KINDS:
        assert kind in str(info.value)


def test_non_string_spec() -> None:
    with pytest.raises(ValueError, match="has no kind"):
        parse_spec(None)  # type: ignore[arg-type]


def test_every_kind_has_a_builder() -> None:
    assert set(KINDS) == set(SPEC_KINDS)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_load_encoder_missing_directory(kind: str, tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError) as info:
        load_encoder(f"{kind}:{missing}", device="cpu")
    msg = str(info.value)
    assert f"{kind}:{missing}" in msg and "no such directory" in msg and "hub id" in msg


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_load_encoder_directory_without_config(kind: str, tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="has no config.json") as info:
        load_encoder(f"{kind}:{tmp_path}", device="cpu")
    assert str(tmp_path) in str(info.value)


def test_load_encoder_file_instead_of_directory(tmp_path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_encoder(f"clip:{f}", device="cpu")


def test_load_encoder_bad_option_before_loading(tmp_path) -> None:
    # Options are checked first: the missing directory is not what the error is about.
    with pytest.raises(ValueError, match="unknown option") as info:
        load_encoder(f"clip:{tmp_path / 'nope'}?colour=red", device="cpu")
    assert "normalize" in str(info.value) and "max_batch" in str(info.value)


def test_load_encoder_bad_dtype(tmp_path) -> None:
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_encoder(f"clip:{tmp_path}", device="cpu", dtype="float8")


def test_load_encoder_unreachable_hub_id(monkeypatch) -> None:
    import huggingface_hub.constants

    # Offline mode makes the hub unreachable at once (instead of retrying the network).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = "clip:phiclip-test-nonexistent-org/nonexistent-model"
    with pytest.raises(ValueError) as info:
        load_encoder(spec, device="cpu")
    msg = str(info.value)
    assert spec in msg and "give a local directory" in msg and "hub id" in msg and "network" in msg
    assert "is not a local directory" in msg


# --- 16-bit compute slower than float32 on this CPU (measured, not guessed from flags): say so ----------------
def _measured(monkeypatch: pytest.MonkeyPatch, bf16: float, fp16: float) -> None:
    import phiclip.precision as P

    info = {"speedups": {"float32": 1.0, "bfloat16": bf16, "float16": fp16}, "cpu": "Test CPU", "rates": {}}
    monkeypatch.setattr(P, "cpu_matmul_rates", lambda refresh=False: info)


def test_16_bit_measured_slower_than_float32_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from phiclip.encoders import slow_cpu_dtype_reason, warn_if_slow_cpu_dtype

    cpu = torch.device("cpu")
    _measured(monkeypatch, bf16=0.51, fp16=0.8)  # an AVX512-BF16 CPU without AMX
    assert "measured at 0.51x the float32 rate" in (slow_cpu_dtype_reason(cpu, torch.bfloat16) or "")
    assert "float16" in (slow_cpu_dtype_reason(cpu, torch.float16) or "")
    assert slow_cpu_dtype_reason(cpu, torch.float32) is None
    assert slow_cpu_dtype_reason(torch.device("cuda"), torch.bfloat16) is None
    with pytest.warns(UserWarning, match="measured at 0.51x"):
        warn_if_slow_cpu_dtype(cpu, torch.bfloat16)
    _measured(monkeypatch, bf16=2.2, fp16=1.0)  # AVX512-BF16 without AMX, but fast (Zen 4): no "slow" message
    assert slow_cpu_dtype_reason(cpu, torch.bfloat16) is None


def test_load_encoder_warns_before_loading(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _measured(monkeypatch, bf16=0.5, fp16=1.0)
    with pytest.warns(UserWarning, match="measured at 0.50x"), pytest.raises(ValueError):
        load_encoder(f"clip:{tmp_path / 'missing'}", device="cpu", dtype="bfloat16")
