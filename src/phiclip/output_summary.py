"""What an embedding output holds, at a glance (``phiclip info OUT``): the model that made it and whether its
checkpoint is still reachable, the precision, the width, the counts, and why inputs failed, grouped.

Everything is read through :mod:`phiclip.store` (the manifest, the shard list and the ``errors/`` rows);
no vector is loaded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phiclip.retrieval import recorded_checkpoint
from phiclip.store import iter_errors, read_manifest, shard_files, weights_fingerprint_of

#: How many (stage, reason) groups of failed inputs a summary lists by default.
DEFAULT_TOP_REASONS = 10


@dataclass
class FailureGroup:
    """Inputs that failed at one stage for one reason: how many, and the first one's source."""

    stage: str
    reason: str
    count: int
    example: str


@dataclass
class OutputSummary:
    """See :func:`summarize_output`. ``checkpoint`` is the absolute folder of a local checkpoint (``None`` for a
    hub id); ``checkpoint_status`` says whether it can be loaded from here."""

    path: str
    kind: str | None
    complete: bool
    spec: str | None
    checkpoint: str | None
    checkpoint_status: str
    weights_fingerprint: str | None
    precision: str | None
    precision_requested: str | None
    vector_dtype: str | None
    dim: int
    inputs: int | None
    embedded: int | None
    failed: int | None
    ignored: int | None
    duplicates: int | None
    shards: int
    failure_groups: list[FailureGroup] = field(default_factory=list)
    failure_groups_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _checkpoint_status(spec: str | None, local: Path | None) -> str:
    if not spec:
        return "unknown (the manifest records no encoder spec)"
    if local is None:
        return ("hub id (downloaded or read from the Hugging Face cache when loaded); no such folder here, so a "
                "folder recorded relative to another working folder would need --model")
    if local.is_dir():
        return "local folder, found"
    return "local folder, MISSING here (moved? give its new place with --model to search, index or serve)"


def _count(counts: dict[str, Any], key: str) -> int | None:
    value = counts.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def summarize_output(path: str | Path, *, top: int = DEFAULT_TOP_REASONS) -> OutputSummary:
    """Describe the embedding output folder ``path`` (see :class:`OutputSummary`); ``top``: how many groups of
    failed inputs (by stage and reason, most frequent first) to list.

    Raises:
        EmbeddingStoreError: ``path`` is not an embedding output folder (no or a damaged manifest).
    """
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    spec, local = recorded_checkpoint(manifest)
    encoder = manifest.get("encoder") or {}
    precision = encoder.get("precision")
    counts = manifest.get("counts") or {}
    groups: Counter[tuple[str, str]] = Counter()
    examples: dict[tuple[str, str], str] = {}
    for source, stage, reason in iter_errors(root):
        key = (str(stage or "?"), str(reason or "?"))
        groups[key] += 1
        examples.setdefault(key, "" if source is None else str(source))
    return OutputSummary(
        path=str(root.resolve()),
        kind=manifest.get("kind"),
        complete=manifest.get("complete") is not False,
        spec=spec,
        checkpoint=None if local is None else str(local),
        checkpoint_status=_checkpoint_status(spec, local),
        weights_fingerprint=weights_fingerprint_of(manifest),
        precision=encoder.get("dtype"),
        precision_requested=precision.get("requested") if isinstance(precision, dict) else None,
        vector_dtype=manifest.get("dtype"),
        dim=int(manifest["dim"]),
        inputs=_count(counts, "inputs"),
        embedded=_count(counts, "embedded"),
        failed=_count(counts, "failed"),
        ignored=_count(counts, "ignored"),
        duplicates=_count(counts, "duplicates"),
        shards=len(shard_files(root)),
        failure_groups=[FailureGroup(stage, reason, n, examples[(stage, reason)])
                        for (stage, reason), n in groups.most_common(max(0, top))],
        failure_groups_total=len(groups),
    )


__all__ = ["DEFAULT_TOP_REASONS", "FailureGroup", "OutputSummary", "summarize_output"]
