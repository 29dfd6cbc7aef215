"""One bulk run in a claimed output folder: check it holds this run, plan, load the encoder, run an
engine over the pending shards, commit the manifest (the steps are listed in :mod:`.runner`), and
what it did (:class:`EmbedResult`)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiclip import schema
from phiclip.encoders.registry import needs_text_message
from phiclip.manifest import differences, recorded_description, resolve_older_spec, same_spec
from phiclip.pipeline.engine import Engine, EngineJob
from phiclip.pipeline.output import OutputDir
from phiclip.pipeline.plan import RunPlan, first_plan, resume_plan, update_plan
from phiclip.pipeline.retry import RetrySink, failed_ids, roll_forward
from phiclip.pipeline.sources import InputError, InputListing, record_id
from phiclip.pipeline.writer import OutputError, ShardSink
from phiclip.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from phiclip.encoders.base import Encoder
    from phiclip.pipeline.runner import EmbedOptions

_WHAT = "model, settings or inputs"
_UPDATE_HINT = (" If files were added to (or removed from) the input since, rerun with --update (update=True) to "
                "embed only the new ones into new shards; --prune also removes the rows of inputs that are gone.")


@dataclass(kw_only=True)
class EmbedResult:
    """What a run did. ``skipped``: inputs already done by an earlier run; ``duplicates``: repeated
    inputs listed once; ``ignored``: entries that are not inputs (the files among them are named in
    ``errors/skipped.parquet`` with the stage ``skip``); ``disappeared``: inputs in the output that are
    no longer listed (kept; ``disappeared_sources`` names them); ``pruned``: such rows removed by this
    run (``prune``)."""

    output: Path
    status: str  # "completed" | "already_complete" | "retried"
    inputs: int
    embedded: int
    failed: int
    skipped: int
    duplicates: int = 0
    ignored: int = 0
    processed: int = 0  # inputs embedded or failed by this run
    seconds: float = 0.0  # wall time of the whole call
    timings: dict[str, float] = field(default_factory=dict)  # per stage, seconds
    disappeared: int = 0
    pruned: int = 0
    disappeared_sources: list[str] = field(default_factory=list)
    #: ``(stage, reason, count)`` of the failed inputs in the output, most frequent first (the top 10).
    failure_reasons: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def items_per_second(self) -> float:
        """Inputs processed by this run per second of its embedding loop."""
        loop = self.timings.get("loop", 0.0)
        return self.processed / loop if loop > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        d["items_per_second"] = self.items_per_second
        return d


def _progress(total: int, initial: int, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc="embedding", disable=not enabled,
                dynamic_ncols=True, smoothing=0.05, file=sys.stderr)


def _without(identity: dict[str, Any], *, inputs: bool) -> dict[str, Any]:
    """The identity without the derived ``settings.num_shards`` (and without the listing, ``inputs``)."""
    out = {**identity, "settings": {k: v for k, v in (identity.get("settings") or {}).items() if k != "num_shards"}}
    if inputs:
        out["input"] = {k: v for k, v in (identity.get("input") or {}).items() if k not in ("num_inputs", "fingerprint")}
    return out


def _plan(out: OutputDir, existing: dict[str, Any] | None, listing: InputListing, identity: dict[str, Any],
          opts: EmbedOptions) -> RunPlan:
    """Refuse an output that holds another run; plan this one (new, resume, or update)."""
    if existing is None:
        return first_plan(listing, opts.shard_size)
    old = {k: existing.get(k) for k in identity}
    old["settings"] = _same_model_spelling(dict(old.get("settings") or {}), identity["settings"], out)
    if differences(_without(old, inputs=True), _without(identity, inputs=True)):
        out.refuse_if_different(_WHAT, _without(old, inputs=False), _without(identity, inputs=False))
    if not differences(old.get("input"), identity["input"]):
        return resume_plan(listing, opts.shard_size, existing, out)
    if not opts.update:
        out.refuse_if_different(_WHAT, _without(old, inputs=False), _without(identity, inputs=False), hint=_UPDATE_HINT)
    return update_plan(listing, opts.shard_size, existing, out)


def _same_model_spelling(old: dict[str, Any], new: dict[str, Any], out: OutputDir) -> dict[str, Any]:
    """``old`` settings with ``model`` spelled as ``new`` has it when both name the same local folder (an
    output of an older phiclip recorded a relative path)."""
    before, now = old.get("model"), new.get("model")
    if isinstance(before, str) and isinstance(now, str) and before != now:
        if same_spec(resolve_older_spec(before, out.root), now):
            old["model"] = now
    return old


def run_locked(model: Any, listing: InputListing, out: OutputDir, opts: EmbedOptions, identity: dict[str, Any],
               engine: Engine, timings: dict[str, float]) -> EmbedResult:
    """One run in an output folder this process holds the lock of (see :mod:`.runner` for the steps);
    ``engine.load`` gives the encoder, ``engine.run(job, sink)`` embeds the pending shards. Returns an
    :class:`EmbedResult` (``seconds`` left for the caller to set)."""

    t0 = time.perf_counter()
    kind = identity["kind"]
    existing = out.existing()
    roll_forward(out.root)  # a retry (--retry-failed) killed after its journal was ready
    if opts.retry_failed:
        return _retry_locked(model, listing, out, opts, identity, engine, timings, existing)
    plan = _plan(out, existing, listing, identity, opts)
    done = out.done_shards()
    pending = [(s, list(pos)) for s, pos in plan.units if s not in done]
    skipped = plan.listed_before + sum(len(pos) for s, pos in plan.units if s in done)
    prune = opts.prune and bool(plan.disappeared)
    was_complete = existing is not None and bool(existing.get("complete"))

    def result(status: str, counts: dict[str, int], processed: int, pruned: int) -> EmbedResult:
        kept = {} if prune else plan.disappeared
        return EmbedResult(output=out.root, status=status, inputs=len(listing.records), embedded=counts["embedded"],
                           failed=counts["failed"], skipped=skipped, duplicates=listing.duplicates,
                           ignored=listing.ignored, processed=processed, timings=timings, disappeared=len(kept),
                           pruned=pruned, disappeared_sources=sorted(src for _, src in kept.values()))

    if was_complete and not pending and not plan.new_generation and not prune:
        return result("already_complete", out.counts(plan.shards), 0, 0)
    encoder = None
    if pending:
        import pyarrow.parquet  # noqa: F401 - imported before the loop so that its timings are the work's
        import torch.utils.data  # noqa: F401

        encoder = engine.load(model, opts.max_pixels)
        if kind == "text" and "text" not in encoder.modalities:
            raise InputError(needs_text_message(encoder.name))
        if kind == "text" and callable(getattr(encoder, "prepare_texts", None)):
            encoder.prepare_texts()  # what runs the text tower, decided now, is in the manifest
    timings["setup"] = timings.get("setup", 0.0) + time.perf_counter() - t0
    manifest = _manifest(__version__, identity, listing, plan, existing, encoder, out)  # checks the encoder
    if was_complete:  # unfinished until this run commits (a repair, an update, a prune)
        out.write_manifest({**existing, "complete": False})  # type: ignore[dict-item]
    pruned = _prune(out, plan) if prune else 0
    if existing is None or plan.new_generation:
        out.write_manifest(manifest)  # first, so that a rerun can always compare (and find the generation)

    writer = out.writer(int(manifest["dim"]), annotations=bool(manifest.get("annotations")))
    writer.prepare([s for s, _ in pending], abandoned=plan.abandoned)
    writer.write_skipped(_skipped_rows(listing))
    sink = ShardSink(writer, plan.records, pending, with_tokens=opts.tokens, flush_seconds=opts.flush_seconds,
                     timings=timings, classnames=listing.classnames)
    skipped += sink.flushed
    processed = 0
    if pending:

        bar = _progress(len(listing.records), skipped, "img" if kind == "image" else "text", opts.progress)
        t_loop = time.perf_counter()
        try:
            units = sink.remaining()
            job = EngineJob(kind=kind, records=plan.records, reader=listing.reader, units=units,
                            encoder=encoder, batch_size=opts.batch_size, max_pixels=opts.max_pixels, tokens=opts.tokens,
                            precision=identity["settings"]["precision"], timings=timings, bar=bar,
                            max_failures=opts.failure_limit(sum(len(p) for _, p in units)))
            processed = engine.run(job, sink)
        finally:
            bar.close()
        timings["loop"] = timings.get("loop", 0.0) + time.perf_counter() - t_loop

    counts = out.counts(plan.shards)
    kept = 0 if prune else len(plan.disappeared)
    if counts["embedded"] + counts["failed"] != len(listing.records) + kept:
        raise OutputError(
            f"{out.root}: the shards hold {counts['embedded']} embedded + {counts['failed']} failed rows for "
            f"{len(listing.records) + kept} inputs; the folder was changed during the run: embed again into a new "
            "--output folder"
        )
    manifest["counts"] = {**manifest["counts"], **counts, **({"not_listed": kept} if kept else {})}
    manifest["complete"] = True
    manifest["timings"] = {k: round(v, 4) for k, v in timings.items()}
    out.write_manifest(manifest)
    status = "completed" if processed or pruned or not was_complete else "already_complete"
    res = result(status, counts, processed, pruned)
    res.failure_reasons = writer.failure_reasons(plan.shards) if counts["failed"] else []
    return res


def _retry_locked(model: Any, listing: InputListing, out: OutputDir, opts: EmbedOptions, identity: dict[str, Any],
                  engine: Engine, timings: dict[str, float], existing: dict[str, Any] | None) -> EmbedResult:
    """``retry_failed``: embed again the failed inputs of this output's own run (see :mod:`.retry`)."""
    if existing is None:
        raise OutputError(f"{out.root}: no output to retry the failed inputs of; run phiclip embed without "
                          "--retry-failed first")
    old = {k: existing.get(k) for k in identity}
    old["settings"] = _same_model_spelling(dict(old.get("settings") or {}), identity["settings"], out)
    out.refuse_if_different(_WHAT, _without(old, inputs=False), _without(identity, inputs=False),
                            hint=" --retry-failed reruns the failed inputs of the same run: give the same model, "
                                 "settings and input.")
    if not existing.get("complete"):
        raise OutputError(f"{out.root}: the run is not finished; rerun the same command without --retry-failed to "
                          "finish it first, then retry its failed inputs")
    if opts.tokens:
        raise OutputError("--retry-failed does not rewrite token sequences (--tokens); embed into a new --output")
    t0 = time.perf_counter()
    done = sorted(out.done_shards())
    writer = out.writer(int(existing["dim"]), annotations=bool(existing.get("annotations")))
    by_id = {r.id: r for r in listing.records}
    failed = failed_ids(writer, done)
    records: list[Any] = []
    units: list[tuple[int, list[int]]] = []
    for shard, ids in failed.items():
        mine = [by_id[i] for i in ids if i in by_id]  # a failed input no longer listed stays as it is
        if mine:
            units.append((shard, list(range(len(records), len(records) + len(mine)))))
            records += mine
    processed = 0
    if units:
        encoder = engine.load(model, opts.max_pixels)
        out.check_encoder(existing, recorded_description({**encoder.describe(), "spec": encoder.describe().get(
            "spec", encoder.name)}))
        timings["setup"] = timings.get("setup", 0.0) + time.perf_counter() - t0
        order = {r.id: i for i, r in enumerate(listing.records)}
        sink = RetrySink(writer, records, units, with_tokens=False, flush_seconds=None, timings=timings,
                         classnames=listing.classnames, order=order)
        bar = _progress(len(records), 0, "img", opts.progress)
        t_loop = time.perf_counter()
        try:
            job = EngineJob(kind=identity["kind"], records=records, reader=listing.reader, units=sink.remaining(),
                            encoder=encoder, batch_size=opts.batch_size, max_pixels=opts.max_pixels, tokens=False,
                            precision=identity["settings"]["precision"], timings=timings, bar=bar,
                            max_failures=opts.failure_limit(len(records)))
            processed = engine.run(job, sink)
        finally:
            bar.close()
        timings["loop"] = timings.get("loop", 0.0) + time.perf_counter() - t_loop
    counts = out.counts(done)
    manifest = {**existing, "counts": {**(existing.get("counts") or {}), **counts},
                "timings": {k: round(v, 4) for k, v in timings.items()}}
    out.write_manifest(manifest)
    return EmbedResult(output=out.root, status="retried" if processed else "already_complete",
                       inputs=len(listing.records), embedded=counts["embedded"], failed=counts["failed"],
                       skipped=len(listing.records) - processed, duplicates=listing.duplicates, ignored=listing.ignored,
                       processed=processed, timings=timings,
                       failure_reasons=writer.failure_reasons(done) if counts["failed"] else [])


def _manifest(version: str, identity: dict[str, Any], listing: InputListing, plan: RunPlan,
              existing: dict[str, Any] | None, encoder: Encoder | None, out: OutputDir) -> dict[str, Any]:
    """The manifest of this run (``complete`` false): from the loaded encoder, else from the existing one.
    The encoder's spec is recorded with a local folder's absolute path (and ``spec_as_typed``)."""
    if encoder is not None:
        describe = dict(encoder.describe())
        describe.setdefault("spec", encoder.name)
        describe = recorded_description(describe)
        if existing is not None:
            out.check_encoder(existing, describe)
        made = {"encoder": describe, "dim": int(encoder.dim), "normalized": bool(getattr(encoder, "normalize", False))}
    else:
        assert existing is not None
        made = {k: existing[k] for k in ("encoder", "dim", "normalized") if k in existing}
    num_shards = max(g["first_shard"] + g["num_shards"] for g in plan.generations)
    return {
        "phiclip_version": version,
        "kind": identity["kind"],
        **made,
        "dtype": identity["dtype"],
        "input": identity["input"],
        "settings": {**identity["settings"], "num_shards": num_shards},
        "generations": plan.generations,
        # An output made before the annotation columns keeps its layout (every shard has one schema).
        "annotations": identity["kind"] == "image" if existing is None else bool(existing.get("annotations")),
        "counts": {"inputs": len(listing.records), "duplicates": listing.duplicates, "ignored": listing.ignored,
                   "embedded": 0, "failed": 0},
        "complete": False,
    }


def _prune(out: OutputDir, plan: RunPlan) -> int:
    """Remove the rows of the inputs that disappeared from their shards; returns how many."""
    by_shard: dict[int, set[str]] = {}
    for i, (shard, _) in plan.disappeared.items():
        by_shard.setdefault(shard, set()).add(i)
    writer = out.writer(1)
    return sum(writer.rewrite_without(s, ids) for s, ids in sorted(by_shard.items()))


def _skipped_rows(listing: InputListing) -> list[tuple[str, str, str, str]]:
    """``(id, source, "skip", reason)`` of each file the listing did not take as an input."""
    return [(record_id(os.fsencode(path)), schema.path_to_source(path), schema.STAGE_SKIP, reason)
            for path, reason in listing.skipped]


__all__ = ["EmbedResult", "run_locked"]
