"""``phiclip export SPEC --to hf|open_clip OUT``: a checkpoint in the other format
(:func:`phiclip.open_clip.export.export_to_hf`, :func:`phiclip.open_clip.export.export_to_open_clip`)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from phiclip.cli.common import JsonOpt, api_errors, echo_json, fail_cli, print_rows
from phiclip.console import safe_text


class ExportFormat(str, enum.Enum):
    hf = "hf"
    open_clip = "open_clip"


#: The kind of checkpoint each target format is written from.
SOURCE_KIND = {ExportFormat.hf: "open_clip", ExportFormat.open_clip: "clip"}


def _source_location(spec: str, to: ExportFormat) -> str:
    """The checkpoint location of ``spec`` (its kind found from its config when left out).

    Raises:
        ValueError: a kind the target format is not written from, encoder options, a malformed spec,
            a kindless spec whose checkpoint names no kind (:class:`~phiclip.hub.CheckpointError`).
    """
    # lazy: the registry loads phiclip.hub and the checkpoint code (not for --help)
    from phiclip.encoders.registry import resolve_spec

    parsed = resolve_spec(spec)
    want = SOURCE_KIND[to]
    if parsed.kind != want:
        other = [f.value for f, k in SOURCE_KIND.items() if k == parsed.kind]
        hint = f"; for a {parsed.kind}: checkpoint use --to {other[0]}" if other else ""
        raise ValueError(f"--to {to.value} exports {want}: checkpoints, not {parsed.kind}:{parsed.location}{hint}")
    if parsed.options:
        raise ValueError(f"{spec}: export takes a checkpoint, not encoder options ({', '.join(parsed.options)})")
    return parsed.location


def export(
    spec: Annotated[str, typer.Argument(help=(
        "The checkpoint: open_clip:DIR_OR_HUB_ID for --to hf, clip:DIR_OR_HUB_ID for --to open_clip "
        "(without KIND:, found from the folder's config file)."), show_default=False)],
    output: Annotated[Path, typer.Argument(help="A new (or empty) folder for the exported checkpoint.",
                                           show_default=False)],
    to: Annotated[ExportFormat, typer.Option("--to", help=(
        "hf: a transformers CLIPModel folder (config, safetensors, tokenizer, processor) from an open_clip "
        "checkpoint; open_clip: an open_clip folder (open_clip_config.json, open_clip_model.safetensors) from "
        "a transformers CLIP."), show_default=False)],
    revision: Annotated[str | None, typer.Option("--revision", help="A hub id's branch, tag or commit.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the checkpoint SPEC in the other format into OUTPUT (refused if OUTPUT holds anything): an open_clip
    checkpoint as a transformers CLIPModel (--to hf), or a transformers CLIP as an open_clip folder
    (--to open_clip). The weights are the same; the notes say where preprocessing or tokenizing differ."""
    # lazy: loads torch and transformers (not for --help)
    from phiclip.open_clip.export import export_to_hf, export_to_open_clip

    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        fail_cli(f"{output} is not an empty folder; export writes a new folder and overwrites nothing")
    with api_errors():
        location = _source_location(spec, to)
        fn = export_to_hf if to is ExportFormat.hf else export_to_open_clip
        result = fn(location, output, revision=revision)
    if as_json:
        echo_json(result.to_dict())
        return
    print_rows(f"phiclip export --to {to.value}", [
        ("source", spec),
        ("written to", result.out_dir),
        ("files", ", ".join(result.files)),
        ("weights fingerprint (source)", result.weights_fingerprint),
    ])
    out = Console()
    for note in result.notes:
        out.print(Text.assemble(("note: ", "yellow"), safe_text(note)), highlight=False, soft_wrap=True)
    load = (f"CLIPModel.from_pretrained({str(result.out_dir)!r}) or -m clip:{result.out_dir}" if to is ExportFormat.hf
            else f"open_clip.create_model_from_pretrained('local-dir:{result.out_dir}') or -m open_clip:{result.out_dir}")
    out.print(safe_text(f"Load it with {load}"), highlight=False, soft_wrap=True)
