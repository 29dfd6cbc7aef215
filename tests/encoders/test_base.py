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
    ("timm:vit_base_patch16_224", "unknown kind 'timm'"),
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
    import phiclip.cpu.precision as P

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


# --- the registry, the option dataclasses and the typed description ----------------------------------
OPTION_ERRORS = [
    ("clip:/m?colour=red", "unknown option(s) colour; known options: normalize=true|false"),
    ("clip:/m?normalize=maybe", "option normalize='maybe' must be true or false"),
    ("clip:/m?max_batch=0", "option max_batch='0' must be an integer >= 1"),
    ("clip:/m?max_batch=4.5", "option max_batch='4.5' must be an integer >= 1"),
    ("siglip:/m?fast=2", "option fast='2' must be true or false"),
    ("phi3v:/m?pooling=max", "option pooling='max' must be one of mean, global"),
    ("phi3v:/m?num_crops=65", "option num_crops='65' must be an integer from 1 to 64 (the released checkpoints"),
    ("phi3v:/m?num_crops=zero", "must be an integer from 1 to 64"),
    ("phi3v:/m?max_crops=-1", "option max_crops='-1' must be an integer >= 1"),
    ("phi3v:/m?colour=red", "unknown option(s) colour; known options: num_crops="),
]


@pytest.mark.parametrize("text,message", OPTION_ERRORS, ids=[s for s, _ in OPTION_ERRORS])
def test_options_are_checked_by_the_kinds_dataclass(text: str, message: str) -> None:
    from phiclip.encoders import check_spec

    with pytest.raises(ValueError) as info:
        check_spec(text)  # nothing is loaded: /m does not exist
    assert message in str(info.value) and repr(str(parse_spec(text))) in str(info.value)


def test_option_dataclasses_fill_defaults_and_read_values() -> None:
    from phiclip.encoders.options import ContrastiveOptions, Phi3VOptions

    assert ContrastiveOptions.from_spec(parse_spec("clip:/m")) == ContrastiveOptions(normalize=True, max_batch=256, fast=True)
    assert ContrastiveOptions.from_spec(parse_spec("clip:/m?normalize=off&max_batch=8&fast=no")) == ContrastiveOptions(
        normalize=False, max_batch=8, fast=False)
    opts = Phi3VOptions.from_spec(parse_spec("phi3v:/m?num_crops=4&pooling=global&max_crops=2&runtime=openvino"))
    assert opts.to_dict() == {"num_crops": 4, "pooling": "global", "normalize": True, "max_crops": 2,
                              "runtime": "openvino", "calibration": None, "calibration_images": 128}
    assert set(Phi3VOptions.known()) == {"num_crops", "pooling", "normalize", "max_crops", "runtime", "calibration",
                                         "calibration_images"}
    assert Phi3VOptions.from_spec(parse_spec("phi3v:/m")).runtime == "torch"  # $PHICLIP_RUNTIME (tests/conftest.py)


def test_every_kind_is_registered_once_with_its_module() -> None:
    import importlib

    from phiclip.encoders import INT8_KINDS

    assert tuple(KINDS) == SPEC_KINDS and INT8_KINDS == ("clip", "siglip", "phi3v", "open_clip", "siglip2", "metaclip2", "aimv2", "dinov2", "dinov3")
    for name, kind in KINDS.items():
        assert kind.name == name and callable(kind.builder) and kind.summary
        assert importlib.import_module(kind.module)


def test_importing_the_encoders_package_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, phiclip.encoders, phiclip.phi3v.config; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from phiclip import testing as t

    root = tmp_path_factory.mktemp("kinds")
    return {
        "clip": str(t.build_tiny_clip(root / "clip")),
        "siglip": str(t.build_tiny_siglip(root / "siglip")),
        "phi3v": str(t.build_tiny_phi3v(root / "phi3v", num_crops=4)),
        "phi3v-lm": str(t.build_tiny_phi3v_lm(root / "phi3v-lm", num_crops=1)),
        "open_clip": str(t.build_tiny_open_clip(root / "open_clip")),
        "siglip2": str(t.build_tiny_siglip2(root / "siglip2")),
        "metaclip2": str(t.build_tiny_metaclip2(root / "metaclip2")),
        "aimv2": str(t.build_tiny_aimv2(root / "aimv2")),
        "dinov2": str(t.build_tiny_dinov2(root / "dinov2")),
        "dinov3": str(t.build_tiny_dinov3(root / "dinov3")),
    }


def test_every_encoder_describes_itself_with_the_same_fields(tiny_checkpoints: dict[str, str]) -> None:
    import dataclasses
    import json

    import torch

    from phiclip.encoders import EncoderDescription

    fields = [f.name for f in dataclasses.fields(EncoderDescription)]
    for kind in SPEC_KINDS:
        enc = load_encoder(f"{kind}:{tiny_checkpoints[kind]}", device="cpu", dtype="float32")
        d = enc.describe()
        assert list(d) == fields, kind
        json.dumps(d)  # the manifest's encoder entry
        assert d["spec"] == enc.name and d["kind"] == kind and d["dim"] == enc.dim and d["normalized"] is True
        assert d["dtype"] == "float32" and d["device"] == "cpu" and d["modalities"] == sorted(enc.modalities)
        assert isinstance(d["parameters"], int) and d["parameters"] > 0 and d["weights_fingerprint"].startswith("sha256:")
        assert d["precision"]["dtype"] == "float32" and d["options"]["normalize"] is True
        # Device and compute precision are attributes of every encoder, decided by resolve_placement.
        assert enc.device == torch.device("cpu") and enc.dtype == torch.float32


@pytest.mark.parametrize("wrong,right,expected", [("clip", "phi3v", "use 'phi3v:"), ("siglip", "phi3v", "use 'phi3v:"),
                                                  ("phi3v", "clip", "load it with 'clip:'"),
                                                  ("phi3v-lm", "clip", "load it with 'clip:'")])
def test_a_checkpoint_of_another_kind_names_the_right_spec(tiny_checkpoints: dict[str, str], wrong: str, right: str,
                                                            expected: str) -> None:
    spec = f"{wrong}:{tiny_checkpoints[right]}"
    with pytest.raises(ValueError) as info:
        load_encoder(spec, device="cpu", dtype="float32")
    assert expected in str(info.value) and spec in str(info.value)


def test_a_checkpoint_error_names_the_spec(tmp_path) -> None:
    from phiclip.hub import CheckpointError

    (tmp_path / "config.json").write_text("{not json")
    for kind in ("clip", "phi3v"):
        with pytest.raises(CheckpointError) as info:
            load_encoder(f"{kind}:{tmp_path}", device="cpu", dtype="float32")
        assert str(info.value).startswith(f"encoder spec '{kind}:{tmp_path}': ") and "not valid JSON" in str(info.value)
