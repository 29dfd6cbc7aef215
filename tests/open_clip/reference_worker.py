"""Computes open_clip's own outputs for tests/open_clip (run in a subprocess by conftest.py, never
imported by the tests: open_clip and torchvision live in tests/.reference only).

``python reference_worker.py JOB.json``; the job names:
  ``archs``: {name: model_cfg}: build open_clip's ``CLIP`` of each config with random weights (seeded;
      the names in ``own_init``: open_clip's own initialisation, norms and biases moved off 1 and 0),
      save it as open_clip's push_to_hf_hub layout under ``out/NAME/``, and store open_clip's
      transform of ``images``, its tokens of ``texts``, ``encode_image`` and ``encode_text``;
  ``load``: {name: folder}: ``open_clip.create_model_from_pretrained("local-dir:FOLDER")`` (a folder
      phiclip exported) and the same outputs;
  ``preprocess``: {name: preprocess_cfg}: open_clip's transform of ``images`` for each config;
  ``texts``, ``images``, ``out``.
Results: ``out/NAME.npz`` (pixels, tokens, image, text) and ``out/preprocess_NAME.npz``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _import_torchvision() -> None:
    """torchvision's Python transforms, also where its compiled operators cannot load beside this
    torch (PyPI's wheels are built for another torch/CUDA: 'operator torchvision::nms does not
    exist'): the two operator schemas its meta registrations need are declared first, then the
    pure-Python parts (transforms on PIL images) import and run unchanged."""
    import torch

    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_keep_lib"] = lib
    import torchvision  # noqa: F401


def _randomize(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.05
            is_norm = any(s in name for s in ("ln_", "ln_pre", "ln_post", "ln_final")) and name.endswith("weight")
            p.copy_(noise + 1.0 if is_norm else noise)
        model.logit_scale.fill_(4.6052)


def _perturb_own_init(model, seed: int) -> None:
    """Keep open_clip's own initialisation (real-size activations stay as in training) but move what it
    leaves at 1 or 0 (LayerNorm weights and biases, every bias), so that a wrong mapping of those shows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or (("ln_" in name) and name.endswith("weight")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _outputs(model, preprocess, tokenizer, images, texts):
    import numpy as np
    import torch
    from PIL import Image

    pixels = torch.stack([preprocess(Image.open(p)) for p in images])
    tokens = tokenizer(texts)
    with torch.no_grad():
        image = model.encode_image(pixels)
        text = model.encode_text(tokens)
    return {"pixels": pixels.numpy(), "tokens": tokens.numpy().astype(np.int64), "image": image.numpy(),
            "text": text.numpy()}


def main(job_path: str) -> None:
    import numpy as np
    import torch

    _import_torchvision()
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from safetensors.torch import save_file

    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    images, texts = job["images"], job["texts"]
    torch.set_num_threads(1)
    for i, (name, cfg) in enumerate(sorted(job.get("archs", {}).items())):
        cfg = dict(cfg)
        model = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                                     text_cfg=cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False)).eval()
        if name in job.get("own_init", ()):
            _perturb_own_init(model, 1000 + i)
        else:
            _randomize(model, 1000 + i)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
        size = cfg["vision_cfg"]["image_size"]
        pp = {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}, indent=2))
        transform = image_transform_v2(PreprocessCfg(**pp), is_train=False)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        np.savez(out / f"{name}.npz", **_outputs(model, transform, tokenizer, images, texts))
    for name, folder in sorted(job.get("load", {}).items()):
        model, transform = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        np.savez(out / f"{name}.npz", **_outputs(model.eval(), transform, tokenizer, images, texts))
    for name, pp in sorted(job.get("preprocess", {}).items()):
        from PIL import Image

        transform = image_transform_v2(PreprocessCfg(**pp), is_train=False)
        np.savez(out / f"preprocess_{name}.npz",
                 **{f"image{i}": transform(Image.open(p)).numpy() for i, p in enumerate(images)})
    (out / "versions.json").write_text(json.dumps({"open_clip": open_clip.__version__,
                                                   "torchvision": sys.modules["torchvision"].__version__}))


if __name__ == "__main__":
    main(sys.argv[1])
