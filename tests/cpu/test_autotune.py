"""phiclip.cpu.autotune: runtime=auto's measured choice (the fastest way within the precision's bound,
cached per CPU) and the default runtime of a spec. Torch-only ways here; the compiled runtimes through
``auto`` are in tests/cpu/test_runtimes.py."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import phiclip.cpu.autotune as A
from phiclip.cache import CACHE_ENV
from phiclip.encoders.options import ContrastiveOptions
from phiclip.encoders.spec import EncoderSpec


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _way(name: str, seconds: float, scale: float = 1.0, built: list[str] | None = None) -> A.Way:
    """A way that takes ``seconds`` per call and returns its input times ``scale``."""
    def build():
        if built is not None:
            built.append(name)

        def run(x):
            time.sleep(seconds)
            return x * scale
        return run
    return A.Way(name, build)


X = (torch.randn(4, 8, generator=torch.Generator().manual_seed(0)),)


def test_the_fastest_way_within_the_bound_is_chosen_and_the_choice_is_cached(cache) -> None:
    built: list[str] = []
    ways = [_way("openvino", 0.0, built=built), _way("onnxruntime", 0.03, built=built), _way("torch", 0.02, built=built)]
    tuned = A.fastest(ways, X, precision="float32", reference=lambda: X[0].numpy(), key_fields={"fingerprint": "w1"})
    assert tuned.name == "openvino" and tuned.record["from_cache"] is False
    assert set(tuned.record["seconds"]) == {"openvino", "onnxruntime", "torch"}
    assert tuned.record["seconds"]["onnxruntime"] > tuned.record["seconds"]["openvino"]
    assert built == ["openvino", "onnxruntime", "torch"]
    # A later load on this CPU builds only the way chosen, and measures nothing.
    built.clear()
    again = A.fastest(ways, X, precision="float32", reference=lambda: pytest.fail("measured again"),
                      key_fields={"fingerprint": "w1"})
    assert again.name == "openvino" and again.record["from_cache"] is True and built == ["openvino"]
    # Other weights are measured again.
    other = A.fastest(ways, X, precision="float32", reference=lambda: X[0].numpy(), key_fields={"fingerprint": "w2"})
    assert other.record["from_cache"] is False


def test_a_new_cpu_measures_again(cache, monkeypatch) -> None:
    ways = [_way("openvino", 0.0), _way("torch", 0.01)]
    A.fastest(ways, X, precision="float32", reference=None, key_fields={"fingerprint": "w"})
    monkeypatch.setattr(A, "cpu_key", lambda: "another CPU | avx512f | torch x")
    assert A.fastest(ways, X, precision="float32", reference=None, key_fields={"fingerprint": "w"}).record["from_cache"] is False


def test_a_way_outside_the_bound_is_passed_over_however_fast(cache) -> None:
    ways = [_way("openvino", 0.0, scale=-1.0), _way("torch", 0.01)]
    tuned = A.fastest(ways, X, precision="bfloat16", reference=lambda: X[0].numpy(), key_fields={"fingerprint": "w"})
    assert tuned.name == "torch"
    assert "outside the bfloat16 bound" in tuned.record["passed_over"]["openvino"]
    assert "torch" in tuned.record["closeness"] and "openvino" not in tuned.record["seconds"]


def test_a_conversion_that_fails_is_passed_over_and_torch_kept(cache) -> None:
    def broken():
        raise ValueError("runtime openvino: converting the image side failed")
    tuned = A.fastest([A.Way("openvino", broken), _way("torch", 0.0)], X, precision="float32", reference=None,
                      key_fields={"fingerprint": "w"})
    assert tuned.name == "torch" and "converting" in tuned.record["passed_over"]["openvino"]


def test_a_compiled_way_must_beat_torch_by_the_margin(cache, monkeypatch) -> None:
    monkeypatch.setattr(A, "COMPILED_MARGIN", 100.0)  # nothing sleeps 100x less than torch's 0.01 s here
    tuned = A.fastest([_way("openvino", 0.005), _way("torch", 0.01)], X, precision="float32", reference=None,
                      key_fields={"fingerprint": "w"})
    assert tuned.name == "torch"


def test_the_default_runtime_is_auto_and_the_environment_sets_it(monkeypatch) -> None:
    monkeypatch.delenv(A.RUNTIME_ENV, raising=False)
    assert A.default_runtime() == "auto"
    assert ContrastiveOptions().runtime == "auto"
    assert ContrastiveOptions.from_spec(EncoderSpec("clip", "/x")).runtime == "auto"
    monkeypatch.setenv(A.RUNTIME_ENV, "torch")
    assert ContrastiveOptions.from_spec(EncoderSpec("clip", "/x")).runtime == "torch"
    assert ContrastiveOptions.from_spec(EncoderSpec("clip", "/x", {"runtime": "openvino"})).runtime == "openvino"  # the spec wins
    monkeypatch.setenv(A.RUNTIME_ENV, "tensorrt")
    with pytest.raises(ValueError, match=r"PHICLIP_RUNTIME='tensorrt' must be one of torch, auto, openvino, onnxruntime"):
        A.default_runtime()


def test_resuming_an_output_made_with_runtime_torch_is_the_same_encoder() -> None:
    from phiclip.manifest import differences, stable_description

    old = {"kind": "clip", "options": {"runtime": "torch", "normalize": True}, "precision": {"runtime": {"runtime": "torch"}}}
    new = {"kind": "clip", "options": {"runtime": "auto", "normalize": True}, "precision": {"runtime": {"runtime": "openvino"}}}
    assert differences(stable_description(old), stable_description(new)) == []
    assert differences(stable_description(old), stable_description({**new, "options": {"runtime": "auto", "normalize": False}}))


def test_the_choice_file_is_json_per_key(cache) -> None:
    A.fastest([_way("torch", 0.0)], X, precision="float32", reference=None, key_fields={"fingerprint": "w"})
    import json

    data = json.loads((cache / A.CHOICES_FILE).read_text())
    (entry,) = data.values()
    assert entry["chosen"] == "torch" and entry["cpu"] and "from_cache" not in entry
    assert np.isfinite(entry["seconds"]["torch"])
