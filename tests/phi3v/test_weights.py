"""Vision-only loading from checkpoints in the released sharded layout: which files and tensors
are read, the hub path through a local Hugging Face cache, layouts, dtypes and bad checkpoints."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
import torch

from phiclip.hub import CheckpointError
from phiclip.models.checkpoint import load_tensors, read_weight_map
from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor
from phiclip.phi3v.weights import drop_unused_tower_keys, select_image_path_tensors

from .helpers import copy_ckpt, last_shard
from .reference import noise_image

VISION = "model.vision_embed_tokens."
TEXT = "model.embed_tokens.weight"


class _SafeOpenRecorder:
    """Stands in for ``safetensors.safe_open``: records the files opened and the tensors read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        self.read: list[str] = []
        real = safetensors.safe_open
        recorder = self

        class Handle:
            def __init__(self, path: str, framework: str, device: str = "cpu") -> None:
                recorder.opened.append(Path(path).name)
                self._f = real(path, framework=framework, device=device)

            def __enter__(self) -> Handle:
                self._f.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                self._f.__exit__(*exc)

            def keys(self) -> list[str]:
                return self._f.keys()

            def get_tensor(self, name: str) -> torch.Tensor:
                recorder.read.append(name)
                return self._f.get_tensor(name)

        monkeypatch.setattr(safetensors, "safe_open", Handle)

        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("whole-file safetensors loading must not be used")

        import safetensors.torch as st

        monkeypatch.setattr(st, "load_file", refuse)


def _tokens(model: Phi3VImageEmbedding) -> list[torch.Tensor]:
    inputs = Phi3VImageProcessor(num_crops=4)([noise_image(500, 300, seed=1), noise_image(100, 330, seed=2)])
    with torch.no_grad():
        return model.image_tokens(inputs.pixel_values, inputs.image_sizes)


def _same_state(a: Phi3VImageEmbedding, b: Phi3VImageEmbedding) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def base_model(ckpt4: Path) -> Phi3VImageEmbedding:
    return Phi3VImageEmbedding.from_pretrained(ckpt4, load_text_embeddings=True)


def _index(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def _rewrite_checkpoint(path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Apply ``edit`` to every shard's tensors and rewrite the shards and the index."""
    from safetensors.torch import load_file, save_file

    weight_map = {}
    for shard in sorted(set(_index(path).values())):
        tensors = edit(load_file(str(path / shard)))
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---------------------------------------------------------------------------------------------
# Only the image path is read
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("load_text", [False, True])
def test_only_image_path_tensors_are_read(ckpt4: Path, monkeypatch: pytest.MonkeyPatch, load_text: bool) -> None:
    rec = _SafeOpenRecorder(monkeypatch)
    model = Phi3VImageEmbedding.from_pretrained(ckpt4, load_text_embeddings=load_text)
    weight_map = _index(ckpt4)
    lm_shard = last_shard(ckpt4)
    assert lm_shard not in rec.opened
    assert set(rec.opened) == {"model-00001-of-00002.safetensors"}
    assert len(rec.read) == len(set(rec.read))
    assert all(k.startswith(VISION) or k == TEXT for k in rec.read)
    assert (TEXT in rec.read) is load_text
    assert (model.wte is not None) is load_text
    # The tower runs 2 of its 3 layers (layer_idx -2): layer 2 and post_layernorm are never read.
    assert not any(".encoder.layers.2." in k or "post_layernorm" in k for k in rec.read)
    assert any(".encoder.layers.1." in k for k in rec.read)
    expected = {
        k for k in weight_map
        if k.startswith(VISION) and ".encoder.layers.2." not in k and "post_layernorm" not in k
    } | ({TEXT} if load_text else set())
    assert set(rec.read) == expected


def test_load_tensors_reports_opened_shards(ckpt4: Path) -> None:
    weight_map, sharded = read_weight_map(ckpt4)
    assert sharded
    names = [k for k in weight_map if k.startswith(VISION)]
    opened: list[str] = []
    tensors = load_tensors(ckpt4, weight_map, names, dtype=torch.float32, opened=opened)
    assert opened == ["model-00001-of-00002.safetensors"]
    assert set(tensors) == set(names)
    assert last_shard(ckpt4) not in opened


def test_garbage_lm_shard_does_not_matter(ckpt4: Path, tmp_path: Path, base_model) -> None:
    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    lm = path / last_shard(path)
    lm.write_bytes(os.urandom(lm.stat().st_size))
    with pytest.raises(Exception):  # noqa: B017 - the shard really is unreadable now
        with safetensors.safe_open(str(lm), framework="pt") as f:
            f.keys()
    model = Phi3VImageEmbedding.from_pretrained(path, load_text_embeddings=True)
    assert _same_state(model, base_model)
    lm.unlink()  # and absent altogether
    assert _same_state(Phi3VImageEmbedding.from_pretrained(path, load_text_embeddings=True), base_model)


def test_text_embeddings_only_when_asked(ckpt4: Path, base_model) -> None:
    from safetensors import safe_open

    with safe_open(str(ckpt4 / "model-00001-of-00002.safetensors"), framework="pt") as f:
        stored = f.get_tensor(TEXT)
    assert torch.equal(base_model.wte.weight.detach(), stored)
    plain = Phi3VImageEmbedding.from_pretrained(ckpt4)
    assert plain.wte is None
    assert not any(k.startswith("wte.") for k in plain.state_dict())


def test_text_embeddings_absent_from_checkpoint(ckpt4: Path, tmp_path: Path, base_model) -> None:
    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    _rewrite_checkpoint(path, lambda t: {k: v for k, v in t.items() if k != TEXT})
    # Not asked for: not needed.
    assert _same_state(Phi3VImageEmbedding.from_pretrained(path), Phi3VImageEmbedding.from_pretrained(ckpt4))
    with pytest.raises(CheckpointError, match=re.escape(TEXT)):
        Phi3VImageEmbedding.from_pretrained(path, load_text_embeddings=True)


# ---------------------------------------------------------------------------------------------
# The hub path: a hub id resolved from a local Hugging Face cache, offline
# ---------------------------------------------------------------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_cache(ckpt: Path, root: Path, repo: str = "org/name") -> Path:
    """``root/models--org--name/{refs/main, snapshots/<commit>/...}`` holding every file of ``ckpt``
    except the language-model-only shard."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    skip = last_shard(ckpt)
    for f in ckpt.iterdir():
        if f.name != skip:
            (snap / f.name).write_bytes(f.read_bytes())
    assert not (snap / skip).exists()
    return root


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Offline mode, an empty working directory (so ``org/name`` is no local path); returns a cache root."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both when it is imported; its functions look them up on `constants`.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def test_hub_id_loads_from_cache_without_lm_shard(ckpt4: Path, offline: Path, base_model, monkeypatch) -> None:
    _fake_hub_cache(ckpt4, offline)
    rec = _SafeOpenRecorder(monkeypatch)
    model = Phi3VImageEmbedding.from_pretrained("org/name", load_text_embeddings=True)
    assert _same_state(model, base_model)
    assert set(rec.opened) == {"model-00001-of-00002.safetensors"}
    assert model.source == "org/name"
    # The processor settings come from the same repo (num_crops 4, not the default 16).
    assert Phi3VImageProcessor.from_pretrained("org/name").num_crops == 4
    # Nothing was added to the cache (nothing fetched, in particular not the LM shard).
    assert not list(offline.rglob(last_shard(ckpt4)))


def test_hub_id_with_cache_dir_argument(ckpt4: Path, tmp_path: Path, monkeypatch, base_model) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    cache = _fake_hub_cache(ckpt4, tmp_path / "elsewhere")
    model = Phi3VImageEmbedding.from_pretrained("org/name", cache_dir=cache)
    assert [torch.equal(a, b) for a, b in zip(_tokens(model), _tokens(base_model))] == [True, True]


def test_hub_id_missing_from_cache_is_a_clear_error(offline: Path) -> None:
    # Offline and not cached: the message must say so (not claim the repo lacks the file).
    with pytest.raises(CheckpointError, match="org/absent") as err:
        Phi3VImageEmbedding.from_pretrained("org/absent")
    assert "cache" in str(err.value) and "local directory" in str(err.value)


def test_hub_cache_missing_vision_shard_is_a_clear_error(ckpt4: Path, offline: Path) -> None:
    cache = _fake_hub_cache(ckpt4, offline)
    (cache / "models--org--name" / "snapshots" / COMMIT / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors") as err:
        Phi3VImageEmbedding.from_pretrained("org/name")
    assert "cache" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Layouts and dtypes
# ---------------------------------------------------------------------------------------------
def test_vision_tensors_split_over_two_shards(build_ckpt, monkeypatch, base_model) -> None:
    path = build_ckpt(num_crops=4, vision_shards=2)
    weight_map = _index(path)
    vision_shards = {v for k, v in weight_map.items() if k.startswith(VISION)}
    assert len(vision_shards) == 2
    rec = _SafeOpenRecorder(monkeypatch)
    model = Phi3VImageEmbedding.from_pretrained(path, load_text_embeddings=True)
    assert set(rec.opened) == vision_shards
    assert last_shard(path) not in rec.opened
    assert _same_state(model, base_model)


def test_tower_keys_without_vision_model_level(ckpt4: Path, tmp_path: Path, base_model) -> None:
    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    old, new = VISION + "img_processor.vision_model.", VISION + "img_processor."

    def drop_level(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in tensors.items()}

    _rewrite_checkpoint(path, drop_level)
    assert not any(k.startswith(old) for k in _index(path))
    assert any(k.startswith(new + "encoder.layers.0.") for k in _index(path))
    model = Phi3VImageEmbedding.from_pretrained(path, load_text_embeddings=True)
    assert _same_state(model, base_model)
    assert all(torch.equal(a, b) for a, b in zip(_tokens(model), _tokens(base_model)))


def test_single_file_checkpoint(ckpt4: Path, tmp_path: Path, base_model) -> None:
    from safetensors.torch import load_file, save_file

    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(set(_index(path).values())):
        merged.update(load_file(str(path / shard)))
        (path / shard).unlink()
    (path / "model.safetensors.index.json").unlink()
    save_file(merged, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert _same_state(Phi3VImageEmbedding.from_pretrained(path, load_text_embeddings=True), base_model)


def test_dtype_bfloat16_and_auto(build_ckpt, ckpt4: Path, base_model) -> None:
    bf16 = Phi3VImageEmbedding.from_pretrained(ckpt4, torch_dtype=torch.bfloat16, load_text_embeddings=True)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    # Tokens in bfloat16 stay close to float32 (the processor's float32 pixels are cast).
    for a, b in zip(_tokens(bf16), _tokens(base_model)):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).abs().max().item() < 0.1 * b.abs().max().item()
    assert {p.dtype for p in Phi3VImageEmbedding.from_pretrained(ckpt4, torch_dtype="bfloat16").parameters()} == {torch.bfloat16}
    # "auto" keeps what is stored.
    stored_bf16 = build_ckpt(num_crops=4, dtype="bfloat16")
    auto = Phi3VImageEmbedding.from_pretrained(stored_bf16, torch_dtype="auto", load_text_embeddings=True)
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in Phi3VImageEmbedding.from_pretrained(ckpt4, torch_dtype="auto").parameters()} == {torch.float32}
    # The default upcasts a bfloat16 checkpoint to float32, values unchanged.
    up = Phi3VImageEmbedding.from_pretrained(stored_bf16, load_text_embeddings=True)
    assert {p.dtype for p in up.parameters()} == {torch.float32}
    assert all(torch.equal(p.to(torch.float32), q) for p, q in zip(auto.state_dict().values(), up.state_dict().values()))


def test_full_checkpoint_load_keeps_every_layer_when_asked(build_ckpt) -> None:
    # layer_idx -1: every layer runs (and is read); post_layernorm still is not needed.
    path = build_ckpt(num_crops=4, layer_idx=-1)
    model = Phi3VImageEmbedding.from_pretrained(path)
    assert len(model.img_processor.vision_model.encoder.layers) == 3
    assert not any("post_layernorm" in k for k in model.state_dict())


# ---------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,shown",
    [("sub_GN", "sub_GN"), ("img_processor.vision_model.encoder.layers.1.mlp.fc2.bias", "encoder.layers.1.mlp.fc2.bias")],
)
def test_missing_tensor_is_named(ckpt4: Path, tmp_path: Path, name: str, shown: str) -> None:
    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    _rewrite_checkpoint(path, lambda t: {k: v for k, v in t.items() if k != VISION + name})
    assert VISION + name not in _index(path)
    with pytest.raises(CheckpointError, match="missing") as err:
        Phi3VImageEmbedding.from_pretrained(path)
    assert shown in str(err.value)


def test_missing_and_unexpected_tensors_are_both_named_before_any_is_read(ckpt4: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    extra = VISION + "img_processor.vision_model.encoder.layers.0.mlp.fc3.weight"

    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if VISION + "glb_GN" not in t:
            return t
        t = {k: v for k, v in t.items() if k != VISION + "glb_GN"}
        return {**t, extra: torch.zeros(2, 2)}

    _rewrite_checkpoint(path, edit)
    rec = _SafeOpenRecorder(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        Phi3VImageEmbedding.from_pretrained(path)
    msg = str(err.value)
    assert "missing: ['glb_GN']" in msg and "unexpected: ['img_processor.vision_model.encoder.layers.0.mlp.fc3.weight']" in msg
    assert rec.read == []  # decided from the index alone


def test_tensor_selection_is_a_pure_function_of_the_index() -> None:
    weight_map = {
        VISION + "glb_GN": "a", VISION + "img_processor.encoder.layers.0.fc.weight": "a",  # no vision_model. level
        VISION + "img_processor.vision_model.encoder.layers.1.fc.weight": "a",  # after layer_idx: never read
        VISION + "img_processor.vision_model.post_layernorm.weight": "a", VISION + "wte.weight": "a",
        TEXT: "b", "model.layers.0.mlp.weight": "b",
    }
    expected = {"glb_GN", "img_processor.vision_model.encoder.layers.0.fc.weight"}
    wanted = select_image_path_tensors(weight_map, expected, num_layers_run=1)
    assert wanted == {VISION + "glb_GN": "glb_GN",
                      VISION + "img_processor.encoder.layers.0.fc.weight": "img_processor.vision_model.encoder.layers.0.fc.weight"}
    with_text = select_image_path_tensors(weight_map, expected, num_layers_run=1, load_text_embeddings=True)
    assert with_text[TEXT] == "wte.weight"  # the released name wins over model.vision_embed_tokens.wte.weight
    state = {"img_processor.vision_model.post_layernorm.bias": 0, "img_processor.vision_model.encoder.layers.3.x": 0,
             "glb_GN": 0}
    drop_unused_tower_keys(state, num_layers_run=2)
    assert state == {"glb_GN": 0}


def test_index_listing_a_tensor_the_shard_lacks_is_named(ckpt4: Path, tmp_path: Path) -> None:
    """The index says the first shard holds sub_GN but the shard does not (a stale index)."""
    from safetensors.torch import load_file, save_file

    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    shard = path / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    del tensors[VISION + "sub_GN"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        Phi3VImageEmbedding.from_pretrained(path)
    assert "sub_GN" in str(err.value) and shard.name in str(err.value)


def test_corrupt_vision_shard_is_named(ckpt4: Path, tmp_path: Path) -> None:
    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    shard = path / "model-00001-of-00002.safetensors"
    shard.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as err:
        Phi3VImageEmbedding.from_pretrained(path)
    assert shard.name in str(err.value)


def test_wrong_tensor_shape_is_named(ckpt4: Path, tmp_path: Path) -> None:
    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    _rewrite_checkpoint(path, lambda t: {k: (v[..., :64].contiguous() if k == VISION + "sub_GN" else v) for k, v in t.items()})
    with pytest.raises((CheckpointError, RuntimeError), match="sub_GN"):
        Phi3VImageEmbedding.from_pretrained(path)


def test_missing_vision_shard_is_named(ckpt4: Path, tmp_path: Path) -> None:
    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    (path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        Phi3VImageEmbedding.from_pretrained(path)


@pytest.mark.parametrize("with_index", [False, True])
def test_pytorch_bin_only_is_refused(ckpt4: Path, tmp_path: Path, monkeypatch, with_index: bool) -> None:
    path = tmp_path / "bin_ckpt"
    path.mkdir()
    (path / "config.json").write_text((ckpt4 / "config.json").read_text())
    torch.save({"model.vision_embed_tokens.glb_GN": torch.zeros(1, 1, 128)}, path / "pytorch_model.bin")
    if with_index:
        (path / "pytorch_model.bin.index.json").write_text(
            json.dumps({"weight_map": {"model.vision_embed_tokens.glb_GN": "pytorch_model.bin"}})
        )

    def no_pickle(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_pickle)
    with pytest.raises(CheckpointError, match="safetensors") as err:
        Phi3VImageEmbedding.from_pretrained(path)
    assert str(path) in str(err.value)


def test_not_a_phi3v_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "hidden_size": 64}))
    with pytest.raises(ValueError, match="img_processor"):
        Phi3VImageEmbedding.from_pretrained(tmp_path)


def test_missing_config_and_bad_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        Phi3VImageEmbedding.from_pretrained(tmp_path)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        Phi3VImageEmbedding.from_pretrained(f)
    with pytest.raises(CheckpointError, match="no_such_dir"):
        Phi3VImageEmbedding.from_pretrained(tmp_path / "no_such_dir")


def test_saved_position_ids_buffer_is_ignored(ckpt4: Path, tmp_path: Path, base_model) -> None:
    """Checkpoints saved by older transformers carry the tower's ``position_ids`` buffer; it is an
    ``arange`` that phiclip does not store, so loading must skip it (and never read it)."""
    path = copy_ckpt(ckpt4, tmp_path / "ckpt")
    key = VISION + "img_processor.vision_model.embeddings.position_ids"

    def add_buffer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(k.startswith(VISION) for k in tensors):
            tensors = {**tensors, key: torch.arange(577)[None]}
        return tensors

    _rewrite_checkpoint(path, add_buffer)
    assert key in _index(path)
    model = Phi3VImageEmbedding.from_pretrained(path, load_text_embeddings=True)
    assert _same_state(model, base_model)
