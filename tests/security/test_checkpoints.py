"""Hostile and damaged checkpoints (issue 9, items 1, 2, 4, 7 and the weights fingerprint; issue 11's
``wte`` key): every test builds a real tiny checkpoint, attacks it, and checks the message and
that nothing ran, nothing outside the checkpoint was opened, and nothing crashed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from phiclip.encoders import load_encoder
from phiclip.hub import CheckpointError
from phiclip.models.checkpoint import WeightsHasher
from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor
from phiclip.phi3v.config import MAX_NUM_CROPS
from phiclip.phi3v.processing import CanvasTooLargeError
from phiclip.testing import build_tiny_clip, build_tiny_phi3v

INDEX = "model.safetensors.index.json"
VISION = "model.vision_embed_tokens."
TEXT = "model.embed_tokens.weight"
FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")


# --- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


@pytest.fixture(scope="module")
def phi3v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Released layout: vision tensors, embed_tokens and LM layer 0 in shard 1; the rest of the LM in shard 2."""
    return build_tiny_phi3v(tmp_path_factory.mktemp("phi3v") / "tiny", num_crops=4)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _index(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX).read_text())["weight_map"]


def _write_index(path: Path, weight_map: Any) -> None:
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _rewrite_phi3v(path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Apply ``edit`` to every shard's tensors; rewrite the shards and the index."""
    weight_map = {}
    for shard in sorted(set(_index(path).values())):
        tensors = edit(load_file(str(path / shard)))
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
    _write_index(path, weight_map)


def _reshard_clip(path: Path) -> list[str]:
    """Split a CLIP checkpoint's model.safetensors into two shards with an index (as save_pretrained
    does for big models); returns the shard names."""
    tensors = load_file(str(path / "model.safetensors"))
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for name, part in zip(names, halves):
        save_file({k: tensors[k] for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors").unlink()
    _write_index(path, weight_map)
    return names


_OPENED: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _OPENED is not None and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # idle (one comparison) unless a test is tracking


@contextlib.contextmanager
def _tracked_opens(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every file opened from Python (audit hook) or through ``safetensors.safe_open`` meanwhile."""
    global _OPENED
    opened: list[str] = []
    real = safetensors.safe_open

    def recording_safe_open(path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.path.realpath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", recording_safe_open)
    _OPENED = opened
    try:
        yield opened
    finally:
        _OPENED = None


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


# --- 1. code from checkpoints never runs ------------------------------------------------------------

_EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("checkpoint code ran")
from transformers import PretrainedConfig, PreTrainedModel


class EvilConfig(PretrainedConfig):
    model_type = "evil"


class EvilModel(PreTrainedModel):
    config_class = EvilConfig
"""


def _evil_clip(clip_dir: Path, tmp_path: Path, model_type: str | None = "evil") -> tuple[Path, Path]:
    """A clip checkpoint whose config.json asks transformers to import code that writes a marker."""
    ckpt = _copy(clip_dir, tmp_path / "evil")
    marker = tmp_path / "marker.txt"
    config = json.loads((ckpt / "config.json").read_text())
    if model_type is None:
        config.pop("model_type", None)
    else:
        config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (ckpt / name).write_text(_EVIL.format(marker=str(marker)))
    return ckpt, marker


@pytest.mark.parametrize("model_type", ["evil", None, "clip"])
def test_checkpoint_code_never_runs(clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    model_type: str | None) -> None:
    ckpt, marker = _evil_clip(clip_dir, tmp_path, model_type)
    monkeypatch.setattr("builtins.input", lambda *args: "y")  # a user who answers yes to transformers' prompt
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"clip:{ckpt}", device="cpu")
    msg = str(err.value)
    assert str(ckpt / "config.json") in msg and "never runs code" in msg
    assert ("auto_map" if model_type == "clip" else "model_type") in msg
    assert not marker.exists()


def test_checkpoint_code_never_runs_with_yes_on_stdin(clip_dir: Path, tmp_path: Path) -> None:
    ckpt, marker = _evil_clip(clip_dir, tmp_path)
    script = (
        "import sys\nfrom phiclip.encoders import load_encoder\n"
        "try:\n    load_encoder(sys.argv[1], device='cpu')\n"
        "except ValueError as e:\n    print('REFUSED', type(e).__name__, e)\n    sys.exit(3)\n"
        "print('LOADED')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script, f"clip:{ckpt}"], input="y\ny\ny\n", capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "REFUSED CheckpointError" in run.stdout and "never runs code" in run.stdout
    assert "Traceback" not in run.stderr
    assert not marker.exists()


@pytest.mark.parametrize("part", ["image_processor", "tokenizer"])
def test_processor_and_tokenizer_code_never_runs(clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 part: str) -> None:
    """An unknown processor or tokenizer class with an auto_map: transformers is told not to run
    code, so the encoder fails to load (processor) or loads without that class (tokenizer)."""
    ckpt = _copy(clip_dir, tmp_path / "c")
    marker = tmp_path / "marker.txt"
    (ckpt / "evil_code.py").write_text(_EVIL.format(marker=str(marker)))
    if part == "image_processor":
        for name in ("processor_config.json", "preprocessor_config.json"):
            if (ckpt / name).exists():
                cfg = json.loads((ckpt / name).read_text())
                target = cfg.get("image_processor", cfg)
                target["image_processor_type"] = "EvilImageProcessor"
                target["auto_map"] = {"AutoImageProcessor": "evil_code.EvilImageProcessor"}
                (ckpt / name).write_text(json.dumps(cfg))
    else:
        cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
        cfg["tokenizer_class"] = "EvilTokenizer"
        cfg["auto_map"] = {"AutoTokenizer": ["evil_code.EvilTokenizer", None]}
        (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    try:
        enc = load_encoder(f"clip:{ckpt}", device="cpu")
    except ValueError as e:
        assert part == "image_processor" and "could not load the image processor" in str(e)
    else:
        # No tokenizer, or transformers' own class read from tokenizer.json: never the checkpoint's.
        assert part == "tokenizer"
        assert enc.tokenizer is None or type(enc.tokenizer).__module__.startswith("transformers.")
    assert not marker.exists()


def test_phi3v_auto_map_is_data_only(phi3v_dir: Path, tmp_path: Path) -> None:
    """The released Phi-3-vision config names its remote code in auto_map: phiclip loads the image
    path from the weights alone and never imports that code."""
    ckpt = _copy(phi3v_dir, tmp_path / "p")
    marker = tmp_path / "marker.txt"
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_phi3_v.Phi3VConfig"}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "configuration_phi3_v.py").write_text(_EVIL.format(marker=str(marker)))
    load_encoder(f"phi3v:{ckpt}", device="cpu")
    assert not marker.exists()


def test_transformers_is_always_told_not_to_run_code(clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: dict[str, Any] = {}
    for name in ("AutoConfig", "AutoImageProcessor", "AutoTokenizer", "CLIPModel"):
        cls = getattr(transformers, name)

        def recording(*args: Any, _real: Any = cls.from_pretrained, _name: str = name, **kwargs: Any) -> Any:
            seen[_name] = kwargs.get("trust_remote_code", "not passed")
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    load_encoder(f"clip:{clip_dir}", device="cpu")
    assert seen == {"AutoConfig": False, "AutoImageProcessor": False, "AutoTokenizer": False, "CLIPModel": False}


# --- 2. shard names stay inside the checkpoint ------------------------------------------------------

SHARD = "model-00001-of-00002.safetensors"  # the vision shard of the tiny Phi-3-vision checkpoint


@pytest.mark.parametrize("case", ["parent", "absolute", "subfolder", "not_safetensors", "etc_passwd", "backslash"])
def test_phi3v_shard_names_cannot_leave_the_checkpoint(phi3v_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    ckpt = _copy(phi3v_dir, tmp_path / "ckpt")
    outside = tmp_path / "elsewhere" / SHARD
    outside.parent.mkdir()
    # A real, loadable copy of the vision shard where the hostile entry points (so a loader that
    # follows it succeeds), and the original removed.
    target = {
        "parent": (f"../elsewhere/{SHARD}", outside),
        "absolute": (str(outside), outside),
        "subfolder": (f"sub/{SHARD}", ckpt / "sub" / SHARD),
        "not_safetensors": ("model-00001.bin", ckpt / "model-00001.bin"),
        "etc_passwd": ("/etc/passwd", Path("/etc/passwd")),
        "backslash": (f"..\\elsewhere\\{SHARD}", outside),
    }[case]
    entry, path = target
    if path != Path("/etc/passwd"):
        path.parent.mkdir(exist_ok=True)
        shutil.copy(ckpt / SHARD, path)
    (ckpt / SHARD).unlink()
    _write_index(ckpt, {k: (entry if v == SHARD else v) for k, v in _index(ckpt).items()})
    with _tracked_opens(monkeypatch) as opened, pytest.raises(CheckpointError) as err:
        Phi3VImageEmbedding.from_pretrained(ckpt)
    assert repr(entry) in str(err.value) and INDEX in str(err.value)
    assert os.path.realpath(path) not in opened
    assert not any(p.endswith(".safetensors") or p.endswith(".bin") for p in opened)  # no shard opened at all


def test_clip_shard_names_cannot_leave_the_checkpoint(clip_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    ckpt = _copy(clip_dir, tmp_path / "ckpt")
    names = _reshard_clip(ckpt)
    outside = tmp_path / "elsewhere" / names[1]
    outside.parent.mkdir()
    shutil.move(ckpt / names[1], outside)
    entry = f"../elsewhere/{names[1]}"
    _write_index(ckpt, {k: (entry if v == names[1] else v) for k, v in _index(ckpt).items()})
    loads: list[Any] = []
    real = transformers.CLIPModel.from_pretrained
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", lambda *a, **k: (loads.append(a), real(*a, **k))[1])
    with _tracked_opens(monkeypatch) as opened, pytest.raises(CheckpointError) as err:
        load_encoder(f"clip:{ckpt}", device="cpu")
    assert repr(entry) in str(err.value) and INDEX in str(err.value)
    assert not loads and str(outside.resolve()) not in opened


# --- 3. weights fingerprint -------------------------------------------------------------------------


def _fingerprint(spec: str) -> str:
    value = load_encoder(spec, device="cpu").describe()["weights_fingerprint"]
    assert FINGERPRINT.match(value), value
    return value


def test_phi3v_fingerprint_follows_the_image_path_weights(phi3v_dir: Path, tmp_path: Path) -> None:
    base = _fingerprint(f"phi3v:{phi3v_dir}")
    assert _fingerprint(f"phi3v:{phi3v_dir}") == base  # same files, same fingerprint
    # Tensors the image path never reads: the LM (in both shards), the text embedding, the tower's
    # last layer (layer_idx -2) and post_layernorm. Changing them changes nothing.
    unread = _copy(phi3v_dir, tmp_path / "unread")

    def change_unread(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for k in t:
            if not k.startswith(VISION) or ".encoder.layers.2." in k or "post_layernorm" in k:
                t[k] = t[k] + 1
        return t

    _rewrite_phi3v(unread, change_unread)
    assert _fingerprint(f"phi3v:{unread}") == base
    # One value of one tensor that is read: another fingerprint.
    changed = _copy(phi3v_dir, tmp_path / "changed")

    def change_one(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if VISION + "sub_GN" in t:
            t[VISION + "sub_GN"] = t[VISION + "sub_GN"].clone()
            t[VISION + "sub_GN"].view(-1)[0] += 1e-3
        return t

    _rewrite_phi3v(changed, change_one)
    assert _fingerprint(f"phi3v:{changed}") != base


def test_clip_fingerprint_follows_every_weight(clip_dir: Path, tmp_path: Path) -> None:
    base = _fingerprint(f"clip:{clip_dir}")
    assert _fingerprint(f"clip:{clip_dir}") == base
    # The same tensors in two shards: the same weights, the same fingerprint.
    sharded = _copy(clip_dir, tmp_path / "sharded")
    _reshard_clip(sharded)
    assert _fingerprint(f"clip:{sharded}") == base
    changed = _copy(clip_dir, tmp_path / "changed")
    tensors = load_file(str(changed / "model.safetensors"))
    tensors["text_projection.weight"] = tensors["text_projection.weight"].clone()
    tensors["text_projection.weight"][0, 0] += 1e-3
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    assert _fingerprint(f"clip:{changed}") != base


def test_fingerprint_of_files_equals_fingerprint_of_tensors_read(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.tensor(2.5), "d": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    from_file, from_tensors = WeightsHasher(), WeightsHasher()
    from_file.add_file(tmp_path / "w.safetensors")
    for name, t in load_file(str(tmp_path / "w.safetensors")).items():
        from_tensors.add_tensor(name, t)
    assert from_file.fingerprint() == from_tensors.fingerprint()
    assert FINGERPRINT.match(from_file.fingerprint())


# --- 4. num_crops and the HD canvas budget ----------------------------------------------------------


@pytest.mark.parametrize("raw", ["4.7", "0", "-1", "1e9", "abc", str(MAX_NUM_CROPS + 1), "100000"])
def test_num_crops_option_is_checked(phi3v_dir: Path, raw: str) -> None:
    spec = f"phi3v:{phi3v_dir}?num_crops={raw}"
    with pytest.raises(ValueError) as err:
        load_encoder(spec, device="cpu")
    msg = str(err.value)
    assert f"num_crops={raw!r}" in msg and spec in msg and f"from 1 to {MAX_NUM_CROPS}" in msg


@pytest.mark.parametrize("value", [4.7, 0, -1, 1e9, "abc", "16", True, None, 100000])
def test_num_crops_in_preprocessor_config_is_checked(phi3v_dir: Path, tmp_path: Path, value: Any) -> None:
    ckpt = _copy(phi3v_dir, tmp_path / "p")
    cfg_path = ckpt / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_crops"] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        Phi3VImageProcessor.from_pretrained(ckpt)
    msg = str(err.value)
    assert str(cfg_path) in msg and f"num_crops {value!r}" in msg and f"from 1 to {MAX_NUM_CROPS}" in msg
    with pytest.raises(CheckpointError, match="num_crops"):
        load_encoder(f"phi3v:{ckpt}", device="cpu")


def test_hd_canvas_over_the_pixel_budget_is_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    # 64x48 at num_crops 16: a 1344x1008 canvas (1,354,752 pixels) for a 3,072-pixel image.
    proc = Phi3VImageProcessor(num_crops=16, max_pixels=1_000_000)

    def no_resize(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the image was resized before its canvas was checked")

    monkeypatch.setattr(Image.Image, "resize", no_resize)
    for call in (lambda im: proc.preprocess_image(im), lambda im: proc([im], padding=False)):
        with pytest.raises(CanvasTooLargeError) as err:
            call(_image(64, 48))
        msg = str(err.value)
        assert "64x48" in msg and "num_crops 16" in msg and "1000000" in msg and "1344x1008" in msg


def test_canvas_budget_is_a_per_image_failure_in_a_run(phi3v_dir: Path, tmp_path: Path) -> None:
    from phiclip.pipeline.runner import embed

    enc = load_encoder(f"phi3v:{phi3v_dir}?num_crops=16", device="cpu")
    enc.set_max_pixels(1_400_000)  # a 16-crop square canvas (1344x1344) is over, a 64x48 one (1344x1008) is not
    assert enc.processor.max_pixels == 1_400_000
    with pytest.raises(CanvasTooLargeError, match="100x100"):
        enc.preprocess(_image(100, 100))
    images = tmp_path / "images"
    images.mkdir()
    _image(64, 48).save(images / "small.png")
    _image(100, 100, seed=1).save(images / "square.png")
    result = embed(enc, images, tmp_path / "out", num_workers=0, progress=False, max_pixels=1_400_000)
    assert (result.embedded, result.failed) == (1, 1)


def test_canvas_budget_cannot_be_bypassed_by_num_crops() -> None:
    # At the largest num_crops a canvas stays within 64 * 336 * 336 pixels, whatever the image.
    from phiclip.phi3v.processing import hd_size

    for w, h in [(1, 10000), (10000, 1), (4000, 3000), (337, 336)]:
        hh, ww = hd_size(w, h, MAX_NUM_CROPS)
        assert hh * ww <= MAX_NUM_CROPS * 336 * 336


# --- 5. config fields: type and range, with the file and field named --------------------------------


def _edit_config(ckpt: Path, change: Callable[[dict[str, Any]], None]) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    change(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _tower(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda c: c["img_processor"]["vision_config"].__setitem__(key, value)


PHI3V_BAD_CONFIGS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # case: (damage the checkpoint, file named, field named)
    "weight_map_list": (lambda p: _write_index(p, list(_index(p).items())), INDEX, "weight_map"),
    "weight_map_int_values": (lambda p: _write_index(p, {k: 3 for k in _index(p)}), INDEX, "weight_map value 3"),
    "index_not_json": (lambda p: (p / INDEX).write_text("{'weight_map': oops"), INDEX, "not valid JSON"),
    "config_not_json": (lambda p: (p / "config.json").write_text("model_type = phi3_v"), "config.json", "not valid JSON"),
    "config_a_list": (lambda p: (p / "config.json").write_text("[]"), "config.json", "object"),
    "heads_zero": (lambda p: _edit_config(p, _tower("num_attention_heads", 0)), "config.json", "num_attention_heads 0"),
    "heads_not_dividing": (lambda p: _edit_config(p, _tower("num_attention_heads", 3)), "config.json", "num_attention_heads 3"),
    "patch_zero": (lambda p: _edit_config(p, _tower("patch_size", 0)), "config.json", "patch_size 0"),
    "image_not_whole_patches": (lambda p: _edit_config(p, _tower("image_size", 340)), "config.json", "image_size 340"),
    "tower_hidden_zero": (lambda p: _edit_config(p, _tower("hidden_size", 0)), "config.json", "vision_config.hidden_size 0"),
    "hidden_negative": (lambda p: _edit_config(p, lambda c: c.__setitem__("hidden_size", -1)), "config.json", "hidden_size -1"),
    "layers_zero": (lambda p: _edit_config(p, _tower("num_hidden_layers", 0)), "config.json", "num_hidden_layers 0"),
    "embd_layer_null": (lambda p: _edit_config(p, lambda c: c.__setitem__("embd_layer", None)), "config.json", "embd_layer None"),
    "embd_layer_list": (lambda p: _edit_config(p, lambda c: c.__setitem__("embd_layer", [])), "config.json", "embd_layer []"),
    "img_processor_str": (lambda p: _edit_config(p, lambda c: c.__setitem__("img_processor", "clip")), "config.json", "img_processor"),
    "layer_idx_out_of_range": (lambda p: _edit_config(p, lambda c: c["img_processor"].__setitem__("layer_idx", 9)),
                               "config.json", "layer_idx 9"),
    "layer_idx_a_string": (lambda p: _edit_config(p, lambda c: c["img_processor"].__setitem__("layer_idx", "-2")),
                           "config.json", "layer_idx '-2'"),
    "model_type_missing": (lambda p: _edit_config(p, lambda c: c.pop("model_type")), "config.json", "model_type None"),
    # absurd sizes: refused by name before any tensor is built, not "Storage size calculation overflowed" (item 12)
    "hidden_absurd": (lambda p: _edit_config(p, lambda c: c.__setitem__("hidden_size", 10**12)), "config.json",
                      "hidden_size 1000000000000"),
    "tower_hidden_absurd": (lambda p: _edit_config(p, _tower("hidden_size", 10**12)), "config.json",
                            "img_processor.vision_config.hidden_size 1000000000000"),
    "parameters_absurd": (lambda p: _edit_config(p, lambda c: c.update(hidden_size=1 << 16, vocab_size=1 << 21,
                                                                        num_hidden_layers=512)),
                          "config.json", "parameters"),  # every size in range, together far too many
}


@pytest.mark.parametrize("case", sorted(PHI3V_BAD_CONFIGS))
def test_phi3v_bad_config_fields_are_named(phi3v_dir: Path, tmp_path: Path, case: str) -> None:
    damage, file, field = PHI3V_BAD_CONFIGS[case]
    ckpt = _copy(phi3v_dir, tmp_path / "p")
    damage(ckpt)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"phi3v:{ckpt}", device="cpu")
    msg = str(err.value)
    assert str(ckpt / file) in msg and field in msg, msg
    assert "Traceback" not in msg and len(msg) < 700


CLIP_BAD_CONFIGS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "vision_heads_zero": (lambda c: c["vision_config"].__setitem__("num_attention_heads", 0), "vision_config.num_attention_heads 0"),
    "vision_patch_zero": (lambda c: c["vision_config"].__setitem__("patch_size", 0), "vision_config.patch_size 0"),
    "text_hidden_negative": (lambda c: c["text_config"].__setitem__("hidden_size", -1), "text_config.hidden_size -1"),
    "vision_heads_not_dividing": (lambda c: c["vision_config"].__setitem__("num_attention_heads", 3), "num_attention_heads 3"),
    "vision_config_list": (lambda c: c.__setitem__("vision_config", [1, 2]), "vision_config [1, 2]"),
    "layers_a_string": (lambda c: c["vision_config"].__setitem__("num_hidden_layers", "2"), "vision_config.num_hidden_layers '2'"),
    "vision_hidden_absurd": (lambda c: c["vision_config"].__setitem__("hidden_size", 10**12),
                             "vision_config.hidden_size 1000000000000"),
    "text_vocab_absurd": (lambda c: c["text_config"].__setitem__("vocab_size", 10**12), "text_config.vocab_size 1000000000000"),
    "image_size_absurd": (lambda c: c["vision_config"].__setitem__("image_size", 1 << 20), "vision_config.image_size 1048576"),
    "parameters_absurd": (lambda c: c["text_config"].update(hidden_size=1 << 16, intermediate_size=1 << 19,
                                                            num_hidden_layers=1000), "parameters"),
}


@pytest.mark.parametrize("case", sorted(CLIP_BAD_CONFIGS))
def test_clip_bad_config_fields_are_named(clip_dir: Path, tmp_path: Path, case: str) -> None:
    change, field = CLIP_BAD_CONFIGS[case]
    ckpt = _copy(clip_dir, tmp_path / "c")
    _edit_config(ckpt, change)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"clip:{ckpt}", device="cpu")
    msg = str(err.value)
    assert str(ckpt / "config.json") in msg and field in msg, msg


@pytest.mark.parametrize("case", ["weight_map_list", "weight_map_int_values", "index_not_json"])
def test_clip_bad_index_is_named(clip_dir: Path, tmp_path: Path, case: str) -> None:
    damage, file, field = PHI3V_BAD_CONFIGS[case]
    ckpt = _copy(clip_dir, tmp_path / "c")
    _reshard_clip(ckpt)
    damage(ckpt)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"clip:{ckpt}", device="cpu")
    assert str(ckpt / file) in str(err.value) and field in str(err.value)


# --- 6. the text embedding stored as model.vision_embed_tokens.wte.weight (issue 11) -----------------


def test_text_embedding_under_the_image_module(phi3v_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(phi3v_dir, tmp_path / "p")
    wte_key = VISION + "wte.weight"
    stored: dict[str, torch.Tensor] = {}

    def rename(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if TEXT in t:
            stored["wte"] = t[wte_key] = t.pop(TEXT)
        return t

    _rewrite_phi3v(ckpt, rename)
    assert wte_key in _index(ckpt) and TEXT not in _index(ckpt)
    base = Phi3VImageEmbedding.from_pretrained(phi3v_dir)
    vision_only = Phi3VImageEmbedding.from_pretrained(ckpt)
    assert vision_only.wte is None
    assert vision_only.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(vision_only.state_dict()[k], v) for k, v in base.state_dict().items())
    with_text = Phi3VImageEmbedding.from_pretrained(ckpt, load_text_embeddings=True)
    assert torch.equal(with_text.wte.weight.detach(), stored["wte"])
    # Both names present: model.embed_tokens.weight (the released one) wins.
    both = _copy(phi3v_dir, tmp_path / "both")
    _rewrite_phi3v(both, lambda t: {**t, wte_key: torch.zeros_like(t[TEXT])} if TEXT in t else t)
    loaded = Phi3VImageEmbedding.from_pretrained(both, load_text_embeddings=True)
    assert torch.equal(loaded.wte.weight.detach(), stored["wte"])


# --- a hub id: the same checks, and every file from the commit whose config.json was checked ---------

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def clip_hub(clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], str]:
    """``put(checkpoint_dir) -> hub id``: the checkpoint as a cached hub repo, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # so that the hub id is no local path

    def put(ckpt: Path) -> str:
        repo = cache / "models--org--tinyclip"
        shutil.copytree(ckpt, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        return "org/tinyclip"

    return put


def test_hub_checkpoint_is_pinned_to_the_checked_commit(clip_dir: Path, clip_hub: Callable[[Path], str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    hub_id = clip_hub(clip_dir)
    seen: dict[str, Any] = {}
    real = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: (seen.update(k), real(*a, **k))[1])
    enc = load_encoder(f"clip:{hub_id}", device="cpu")
    assert seen["revision"] == COMMIT and seen["trust_remote_code"] is False
    assert enc.describe()["weights_fingerprint"] == _fingerprint(f"clip:{clip_dir}")


@pytest.mark.parametrize("attack", ["code", "shard"])
def test_hub_checkpoint_gets_the_same_checks(clip_dir: Path, tmp_path: Path, clip_hub: Callable[[Path], str],
                                             attack: str) -> None:
    if attack == "code":
        ckpt, marker = _evil_clip(clip_dir, tmp_path)
        expected = "model_type 'evil'"
    else:
        ckpt, marker = _copy(clip_dir, tmp_path / "c"), tmp_path / "marker.txt"
        names = _reshard_clip(ckpt)
        _write_index(ckpt, {k: ("../" + v if v == names[1] else v) for k, v in _index(ckpt).items()})
        expected = re.escape(repr("../" + names[1]))
    hub_id = clip_hub(ckpt)
    with pytest.raises(CheckpointError, match=expected):
        load_encoder(f"clip:{hub_id}", device="cpu")
    assert not marker.exists()


# --- 8. image processor values: refused at load by name, not image by image (item 10) ------------------


def _edit_processor(ckpt: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Apply ``change`` to the image processor settings, wherever the checkpoint keeps them."""
    path = ckpt / "preprocessor_config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        change(data)
    else:
        path = ckpt / "processor_config.json"
        data = json.loads(path.read_text())
        change(data["image_processor"])
    path.write_text(json.dumps(data))
    return path


PROCESSOR_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "crop_size_zero": (lambda d: d.__setitem__("crop_size", {"height": 0, "width": 0}), "crop_size.height 0"),
    "crop_size_int_zero": (lambda d: d.__setitem__("crop_size", 0), "crop_size 0"),
    "image_std_zero": (lambda d: d.__setitem__("image_std", [0.5, 0, 0.5]), "image_std"),
    "image_std_scalar_zero": (lambda d: d.__setitem__("image_std", 0), "image_std"),
    "size_negative": (lambda d: d.__setitem__("size", {"shortest_edge": -224}), "size.shortest_edge -224"),
    "size_absurd": (lambda d: d.__setitem__("size", {"shortest_edge": 10**9}), "size.shortest_edge 1000000000"),
    "mean_two_values": (lambda d: d.__setitem__("image_mean", [0.5, 0.5]), "image_mean"),
    "mean_a_string": (lambda d: d.__setitem__("image_mean", ["a", 0.5, 0.5]), "image_mean[0] 'a'"),
    "rescale_zero": (lambda d: d.__setitem__("rescale_factor", 0), "rescale_factor 0"),
    "resample_unknown": (lambda d: d.__setitem__("resample", 42), "resample 42"),
}


@pytest.mark.parametrize("kind,case", [("clip", c) for c in sorted(PROCESSOR_CASES)] + [
    ("phi3v", c) for c in ("image_std_zero", "mean_two_values", "crop_size_int_zero", "size_absurd")])
def test_bad_processor_values_are_named_at_load(clip_dir: Path, phi3v_dir: Path, tmp_path: Path, kind: str,
                                                case: str) -> None:
    """One check for every kind: the model loads only with sane pixel values (not image by image failing)."""
    change, field = PROCESSOR_CASES[case]
    ckpt = _copy(clip_dir if kind == "clip" else phi3v_dir, tmp_path / "c")
    path = _edit_processor(ckpt, change)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"{kind}:{ckpt}", device="cpu")
    msg = str(err.value)
    assert str(path) in msg and field in msg, msg


@pytest.mark.parametrize("kind", ["clip", "phi3v"])
def test_every_file_comes_from_the_pinned_commit(clip_dir: Path, phi3v_dir: Path, clip_hub: Callable[[Path], str],
                                                 monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A hub id's branch is resolved to a commit once (fetching config.json); every other file,
    also those transformers reads, is fetched at that commit, each once; describe() records it."""
    import huggingface_hub
    import transformers

    hub_id = clip_hub(clip_dir if kind == "clip" else phi3v_dir)
    fetched: list[tuple[str, str | None]] = []
    real_download = huggingface_hub.hf_hub_download

    def recording_download(repo_id: str, filename: str, **kwargs: Any) -> str:
        fetched.append((filename, kwargs.get("revision")))
        return real_download(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording_download)
    asked: list[dict[str, Any]] = []
    for auto in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoImageProcessor):
        monkeypatch.setattr(auto, "from_pretrained",
                            lambda *a, _real=auto.from_pretrained, **k: (asked.append(k), _real(*a, **k))[1])
    enc = load_encoder(f"{kind}:{hub_id}", device="cpu", dtype="float32")
    assert fetched[0] == ("config.json", None)
    assert [f for f in fetched[1:] if f[1] != COMMIT] == []
    assert len({f for f, _ in fetched}) == len(fetched)
    assert all(k.get("revision") == COMMIT and k.get("trust_remote_code") is False for k in asked)
    assert enc.describe()["details"]["revision"] == COMMIT
