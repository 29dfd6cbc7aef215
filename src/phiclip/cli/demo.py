"""``phiclip demo``: the main job end to end on sample images (:func:`phiclip.demo.run_demo`); ``phiclip tiny-model``:
a tiny random-weight checkpoint to try any command offline (:func:`phiclip.testing.build_tiny_model`)."""

from __future__ import annotations

from pathlib import Path

import typer

from phiclip.cli.common import api_errors, say
from phiclip.demo import DEFAULT_CLIP, DEFAULT_PHI3V, run_demo
from phiclip.testing import TINY_MODEL_KINDS, build_tiny_model


def demo(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Where everything is written."),
    clip_model: str = typer.Option(None, "--clip-model", envvar="PHICLIP_CLIP_MODEL",
                                   help=f"A CLIP hub id or local directory (default: {DEFAULT_CLIP} when reachable)."),
    phi3v_model: str = typer.Option(None, "--phi3v-model", envvar="PHICLIP_PHI3V_MODEL", help=(
        f"A Phi-3-vision hub id or local directory (default: {DEFAULT_PHI3V} when reachable).")),
    tiny: bool = typer.Option(False, "--tiny", help="Use tiny random-weight checkpoints even when real ones are reachable."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
) -> None:
    """Run the main job end to end on sample images: embed with CLIP and Phi-3-vision, index, search, compare."""
    with api_errors():
        run_demo(output, clip_model=clip_model, phi3v_model=phi3v_model, tiny=tiny, device=device, say=say)


def tiny_model(
    kind: str = typer.Argument(..., help="One of: " + "; ".join(f"{k}: {v}" for k, v in TINY_MODEL_KINDS.items())),
    output: Path = typer.Argument(..., help="A new (or empty) folder for the checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Build a tiny random-weight checkpoint in the released layout, to try every command offline.

    Its vectors carry no meaning; loading, preprocessing, output and search are the real ones.
    """
    with api_errors():
        path = build_tiny_model(kind, output, seed=seed)
    say(f"tiny {kind} checkpoint (random weights) written to {path}; use it as -m {kind}:{path}")
