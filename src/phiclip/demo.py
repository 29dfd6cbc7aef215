"""``phiclip demo``: the main job end to end on sample images, with real or tiny checkpoints.

1. writes labelled sample images (coloured shapes with captions) to ``OUT/images``;
2. picks the checkpoints: the ones you name (``--clip-model`` / ``--phi3v-model`` or the
   ``PHICLIP_CLIP_MODEL`` / ``PHICLIP_PHI3V_MODEL`` environment variables: hub ids or local
   directories), else the public hub ids when the hub is reachable, else tiny random-weight
   checkpoints built in the released layouts (and it says so);
3. embeds the images with CLIP and with Phi-3-vision (``phiclip embed``), builds a search index
   and runs a text and an image query, and compares the two encoders into ``OUT/report``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiclip.comparison.runner import compare
from phiclip.pipeline.runner import embed
from phiclip.retrieval import build_index, search
from phiclip.testing import build_tiny_clip, build_tiny_phi3v, make_sample_images

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_PHI3V = "microsoft/Phi-3-vision-128k-instruct"


@dataclass
class ModelChoice:
    """Which checkpoint the demo uses for one family, and why."""

    family: str
    spec: str
    real: bool
    why: str


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick check (one DNS lookup and TCP connect) before any download is tried."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _is_cached(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def choose_model(family: str, given: str | None, default_hub_id: str, build_tiny: Callable[[], Path], *, tiny: bool) -> ModelChoice:
    """The checkpoint for one family: given > reachable/cached hub id > tiny random weights."""
    kind = "clip" if family == "CLIP" else "phi3v"
    if given:
        return ModelChoice(family, f"{kind}:{given}", True, "given by you")
    if not tiny:
        if Path(default_hub_id).is_dir():
            return ModelChoice(family, f"{kind}:{default_hub_id}", True, "local directory")
        if _is_cached(default_hub_id):
            return ModelChoice(family, f"{kind}:{default_hub_id}", True, "found in the Hugging Face cache")
        if hub_reachable():
            return ModelChoice(family, f"{kind}:{default_hub_id}", True, "downloaded from the Hugging Face hub")
        why = "the hub is unreachable and it is not cached"
    else:
        why = "--tiny was asked for"
    path = build_tiny()
    return ModelChoice(family, f"{kind}:{path}", False, f"TINY RANDOM-WEIGHT checkpoint in the released layout ({why}); "
                       "its vectors carry no meaning, the machinery is the same")


def run_demo(
    output: str | Path = "demo-output",
    *,
    clip_model: str | None = None,
    phi3v_model: str | None = None,
    tiny: bool = False,
    device: str = "auto",
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo; returns what it did (paths, models, counts, search results)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    images_dir = out / "images"
    if not (images_dir / "labels.csv").exists():
        make_sample_images(images_dir, per_class=3)
    say(f"[1/5] sample images: {images_dir} (coloured shapes, labels.csv with captions)")

    ckpts = out / "checkpoints"
    clip = choose_model("CLIP", clip_model or os.environ.get("PHICLIP_CLIP_MODEL"), DEFAULT_CLIP,
                        lambda: build_tiny_clip(ckpts / "tiny-clip") if not (ckpts / "tiny-clip" / "config.json").exists()
                        else ckpts / "tiny-clip", tiny=tiny)
    phi3v = choose_model("Phi-3-vision", phi3v_model or os.environ.get("PHICLIP_PHI3V_MODEL"), DEFAULT_PHI3V,
                         lambda: build_tiny_phi3v(ckpts / "tiny-phi3v") if not (ckpts / "tiny-phi3v" / "config.json").exists()
                         else ckpts / "tiny-phi3v", tiny=tiny)
    for choice in (clip, phi3v):
        say(f"[2/5] {choice.family}: {choice.spec}\n      {'REAL checkpoint' if choice.real else ''} {choice.why}".rstrip())

    results: dict[str, Any] = {"models": {"clip": clip.__dict__, "phi3v": phi3v.__dict__}}
    for key, choice in (("clip", clip), ("phi3v", phi3v)):
        res = embed(choice.spec, images_dir, out / "embeddings" / key, device=device, progress=False)
        results[key] = res.to_dict()
        say(f"[3/5] embedded with {choice.family}: {res.embedded} images, {res.failed} failed -> {res.output}")

    info = build_index(out / "embeddings" / "clip")
    recall = "exact" if info.recall_at_10 is None else f"recall@10 {info.recall_at_10:.3f}"
    say(f"[4/5] search index: {info.type} over {info.n} vectors ({recall}) in {info.path or out / 'embeddings' / 'clip' / 'index'}")
    text_hits = search(out / "embeddings" / "clip", text="a red circle", k=5, device=device)
    query_image = sorted((images_dir / "red").glob("*.png"))[0]
    image_hits = search(out / "embeddings" / "phi3v", image=query_image, k=5, device=device)
    say("      text query 'a red circle' (CLIP):")
    for h in text_hits:
        say(f"        {h.score:.3f}  {h.source}")
    say(f"      image query {query_image.name} (Phi-3-vision):")
    for h in image_hits:
        say(f"        {h.score:.3f}  {h.source}")
    results["search"] = {"text": [h.to_dict() for h in text_hits], "image": [h.to_dict() for h in image_hits]}

    report = compare([clip.spec, phi3v.spec], images_dir / "labels.csv", out / "report", device=device)
    results["report"] = str(out / "report" / "report.html")
    say(f"[5/5] comparison report: {out / 'report' / 'report.html'} (and report.json)")
    del report
    if not (clip.real and phi3v.real):
        say("NOTE: tiny random-weight checkpoints were used for: "
            + ", ".join(c.family for c in (clip, phi3v) if not c.real)
            + ". Give real ones with --clip-model/--phi3v-model (hub ids or local directories).")
    return results
