"""Export between the open_clip and transformers CLIP formats (the API of ``phiclip export``).

* :func:`export_to_hf` ``(spec, out_dir)``: an open_clip checkpoint -> a transformers ``CLIPModel``
  folder (``config.json``, ``model.safetensors``, tokenizer files, ``preprocessor_config.json`` /
  ``processor_config.json``) that ``CLIPModel.from_pretrained`` and ``CLIPProcessor.from_pretrained``
  load; the same weights, so the same embeddings for the same pixels and token ids.
* :func:`export_to_open_clip` ``(hf_spec, out_dir)``: a transformers CLIP -> an open_clip folder
  (``open_clip_config.json``, ``open_clip_model.safetensors``) that
  ``open_clip.create_model_from_pretrained("local-dir:OUT")`` and phiclip's ``open_clip:OUT`` load.

Both refuse a non-empty ``out_dir`` and write through a temporary folder renamed into place.

Preprocessing differs between the formats in details neither format can express for the other:
transformers' CLIP processor composites transparency onto white before resizing and floors the
centre-crop offset, open_clip converts to RGB after resizing and rounds it (half to even), and
transformers has no ``longest`` resize mode. The exported processor is the closest one
(shortest-edge resize, centre crop, the same filter, mean and std); ``notes`` in the result says
what differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiclip.checkpoints import open_checkpoint
from phiclip.hub import CheckpointError
from phiclip.open_clip.config import CONFIG_FILE, SAFETENSORS_FILE, PreprocessConfig, config_from_hf
from phiclip.open_clip.convert import from_hf_state_dict
from phiclip.open_clip.loading import load_open_clip
from phiclip.open_clip.tokenizer import save_hf_tokenizer

if TYPE_CHECKING:
    import torch

_RESAMPLE = {"bicubic": 3, "bilinear": 2}
_INTERPOLATION = {3: "bicubic", 2: "bilinear"}


@dataclass
class ExportResult:
    """What an export wrote."""

    out_dir: Path
    to: str  # "hf" | "open_clip"
    source: str
    files: list[str]
    weights_fingerprint: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "to": self.to, "source": self.source, "files": self.files,
                "weights_fingerprint": self.weights_fingerprint, "notes": self.notes}


def _claim(out_dir: str | Path) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not an empty folder; export writes a new folder and overwrites nothing")
    return out


def _publish(tmp: Path, out: Path) -> list[str]:
    files = sorted(p.name for p in tmp.iterdir())
    if out.exists():
        out.rmdir()  # empty (checked); a folder created meanwhile makes this fail, not overwrite
    tmp.rename(out)
    return files


def _strip(location: str, prefix: str) -> str:
    return location[len(prefix):] if location.startswith(prefix) else location


def write_open_clip(folder: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> list[str]:
    """Write an open_clip checkpoint into ``folder``: ``open_clip_model.safetensors`` (``state``, open_clip's
    names: :func:`~phiclip.open_clip.convert.from_hf_state_dict`) and ``open_clip_config.json`` (``config``,
    ``{"model_cfg", "preprocess_cfg"}``). A ``CustomTextCLIP`` config (``model_cfg.custom_text``) gets its
    text tower under ``text.``, as open_clip keeps it. Returns the file names."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if (config.get("model_cfg") or {}).get("custom_text"):
        top = ("visual.", "logit_scale", "logit_bias")
        state = {k if k.startswith(top) else f"text.{k}": v for k, v in state.items()}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / SAFETENSORS_FILE),
              metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [CONFIG_FILE, SAFETENSORS_FILE]


def save_finetuned_open_clip(model: Any, config: dict[str, Any], out_dir: str | Path,
                             logit_bias: torch.Tensor | None = None) -> list[str]:
    """Save a (fine-tuned) transformers ``CLIPModel`` that was loaded from an open_clip checkpoint as
    an open_clip checkpoint again, with the source's ``open_clip_config.json`` ``config`` unchanged
    (so the same architecture, ``preprocess_cfg`` and tokenizer settings: ``open_clip:OUT`` loads with
    the preprocessing and tokenizer of the source, and ``open_clip.create_model_from_pretrained
    ("local-dir:OUT")`` loads it too). Writes into ``out_dir`` (an existing folder; files replaced).

    Raises:
        CheckpointError: a tensor with no open_clip counterpart.
    """
    state = from_hf_state_dict(model.state_dict(), logit_bias)
    return write_open_clip(out_dir, state, {k: v for k, v in config.items() if k != "model_type"})


def export_to_hf(spec: str | Path, out_dir: str | Path, *, revision: str | None = None) -> ExportResult:
    """Write the transformers ``CLIPModel`` folder of the open_clip checkpoint ``spec``
    (``open_clip:PATH_OR_HUB_ID``, or a folder with ``open_clip_config.json``) into ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` is not empty.
        UnsupportedOpenCLIP / CheckpointError: as :func:`phiclip.open_clip.loading.load_open_clip`.
    """
    import tempfile

    from transformers import CLIPImageProcessor

    out = _claim(out_dir)
    loaded = load_open_clip(_strip(str(spec), "open_clip:"), revision)
    pp = loaded.config.preprocess
    notes = ["transformers' CLIP processor composites alpha onto white before resizing and floors the centre-crop "
             "offset; open_clip drops alpha after resizing and rounds it: a few images differ by a pixel row",
             "transformers' CLIP tokenizer does not run ftfy / HTML unescaping as open_clip does; phiclip's "
             "open_clip: kind does"]
    if pp.resize_mode == "longest":
        notes.append("resize_mode 'longest' (resize and pad) has no transformers equivalent: exported as shortest-edge "
                     "resize and centre crop")
    if loaded.logit_bias is not None:
        notes.append("logit_bias has no place in CLIPModel: kept in config.json as open_clip_logit_bias")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp_name:
        tmp = Path(tmp_name) / "out"
        tmp.mkdir()
        model = loaded.model
        if loaded.logit_bias is not None:
            model.config.open_clip_logit_bias = loaded.logit_bias.flatten().tolist()
        model.save_pretrained(str(tmp), safe_serialization=True)
        size = pp.size
        if pp.resize_mode == "squash":
            processor = CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                           resample=_RESAMPLE[pp.interpolation], image_mean=list(pp.mean),
                                           image_std=list(pp.std))
        else:
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                           resample=_RESAMPLE[pp.interpolation], image_mean=list(pp.mean),
                                           image_std=list(pp.std))
        processor.save_pretrained(str(tmp))
        save_hf_tokenizer(tmp, loaded.config.context_length)
        from transformers import CLIPProcessor, CLIPTokenizer

        CLIPProcessor(image_processor=processor, tokenizer=CLIPTokenizer.from_pretrained(str(tmp))).save_pretrained(str(tmp))
        files = _publish(tmp, out)
    return ExportResult(out, "hf", str(spec), files, loaded.checkpoint.fingerprint, notes)


def export_to_open_clip(hf_spec: str | Path, out_dir: str | Path, *, revision: str | None = None) -> ExportResult:
    """Write the open_clip folder (``open_clip_config.json``, ``open_clip_model.safetensors``) of the
    transformers CLIP checkpoint ``hf_spec`` (``clip:PATH_OR_HUB_ID`` or a folder / hub id).

    Raises:
        FileExistsError: ``out_dir`` is not empty.
        UnsupportedOpenCLIP: a CLIP open_clip's CLIP cannot express (other activation, eps...).
        CheckpointError: a checkpoint that cannot be opened.
    """
    import tempfile

    import torch
    from transformers import CLIPModel

    out = _claim(out_dir)
    checkpoint = open_checkpoint(_strip(str(hf_spec), "clip:"), revision, kind="clip")
    processor_cfg = checkpoint.image_processor_config()
    model = CLIPModel.from_pretrained(str(checkpoint.location), use_safetensors=True, dtype=torch.float32,
                                      **checkpoint.transformers_kwargs()).eval()
    fingerprint = checkpoint.hash_weight_files()
    image_size = int(model.config.vision_config.image_size)
    notes = []
    pp = PreprocessConfig(size=image_size)
    if processor_cfg is not None:
        data = processor_cfg[0]
        resample = data.get("resample", 3)
        if resample not in _INTERPOLATION:
            notes.append(f"resample {resample} has no open_clip equivalent: bicubic written")
        size = data.get("size") or {}
        mode = "squash" if isinstance(size, dict) and "height" in size and not data.get("do_center_crop", True) else "shortest"
        pp = PreprocessConfig(size=image_size, mean=tuple(data.get("image_mean", pp.mean)),  # type: ignore[arg-type]
                              std=tuple(data.get("image_std", pp.std)),  # type: ignore[arg-type]
                              interpolation=_INTERPOLATION.get(resample, "bicubic"), resize_mode=mode)
    else:
        notes.append("no image processor config: open_clip's default preprocessing (OpenAI mean/std, bicubic) written")
    config = config_from_hf(model.config, pp)
    bias = getattr(model.config, "open_clip_logit_bias", None)
    state = from_hf_state_dict(model.state_dict(),
                               None if bias is None else torch.tensor(bias, dtype=torch.float32).reshape(()))
    if int(model.config.text_config.vocab_size) != 49408:
        notes.append("the text vocabulary is not CLIP's 49408 tokens: open_clip's tokenizer will not match it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp_name:
        tmp = Path(tmp_name) / "out"
        tmp.mkdir()
        write_open_clip(tmp, state, config)
        files = _publish(tmp, out)
    if model.config.vision_config.image_size != pp.size:
        raise CheckpointError("internal: image size mismatch")
    return ExportResult(out, "open_clip", str(hf_spec), files, fingerprint, notes)


__all__ = ["ExportResult", "export_to_hf", "export_to_open_clip", "save_finetuned_open_clip", "write_open_clip"]
