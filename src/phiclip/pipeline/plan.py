"""What a run embeds: its records cut into shards (units), for a new output, a resume, or ``--update``.

An output is written in **generations**. The first run plans every listed input into shards
``0..n-1`` (:func:`phiclip.pipeline.sources.plan_shards`). A run with ``--update`` on a folder whose
input changed starts a new generation: the listed inputs that are not in any committed shard yet are
planned into new shards numbered after every earlier one, so the shards already written are never
touched. The manifest records each generation (``first_shard``, ``num_shards``, ``num_inputs`` and the
``fingerprint`` of the records it plans, and the ``abandoned`` shards of an unfinished generation that
an update replaced) and the input listing of the latest one.

A rerun whose listing is the latest one's resumes the latest generation: its records are the listed
inputs that are not in the committed shards of the earlier generations, which gives back the same
records (their fingerprint is checked) whatever was committed since. Inputs that are in committed
shards but no longer listed have *disappeared*; they are kept, or removed with ``--prune``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from phiclip.pipeline.output import OutputDir
from phiclip.pipeline.sources import InputListing, Record, plan_shards
from phiclip.pipeline.writer import OutputError


def fingerprint(records: Sequence[Record]) -> str:
    """A hash of every id in order (as :meth:`InputListing.fingerprint`)."""
    h = hashlib.blake2b(digest_size=16)
    for r in records:
        h.update(r.id.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass(kw_only=True)
class RunPlan:
    """The work of one run.

    ``records``: what the latest generation embeds (``units`` hold positions into it); ``units``:
    ``(shard, positions)`` of each of its shards; ``generations``: every generation, as the manifest
    records them; ``disappeared``: ``{id: (shard, source)}`` of committed inputs no longer listed;
    ``listed_before``: listed inputs committed by earlier generations.
    """

    records: list[Record]
    units: list[tuple[int, range]]
    generations: list[dict[str, Any]]
    disappeared: dict[str, tuple[int, str]] = field(default_factory=dict)
    listed_before: int = 0
    new_generation: bool = False

    @property
    def shards(self) -> list[int]:
        """Every shard of every generation that is still planned (not abandoned), in order."""
        out: list[int] = []
        for g in self.generations:
            gone = set(g.get("abandoned", []))
            out += [s for s in range(g["first_shard"], g["first_shard"] + g["num_shards"]) if s not in gone]
        return out

    @property
    def abandoned(self) -> list[int]:
        """Shards of unfinished generations that an update replaced."""
        return [s for g in self.generations for s in g.get("abandoned", [])]


def _units(records: Sequence[Record], shard_size: int, first: int) -> list[tuple[int, range]]:
    return [(first + k, r) for k, r in enumerate(plan_shards(len(records), shard_size))]


def _generation(first: int, units: Sequence[Any], records: Sequence[Record]) -> dict[str, Any]:
    return {"first_shard": first, "num_shards": len(units), "num_inputs": len(records), "fingerprint": fingerprint(records)}


def generations_of(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The generations a manifest records (one for a manifest written before generations existed)."""
    gens = manifest.get("generations")
    if isinstance(gens, list) and gens:
        return [dict(g) for g in gens]
    inp, settings = manifest.get("input") or {}, manifest.get("settings") or {}
    n = int(inp.get("num_inputs") or 0)
    size = int(settings.get("shard_size") or 1)
    shards = settings.get("num_shards", -(-n // size))
    return [{"first_shard": 0, "num_shards": int(shards), "num_inputs": n, "fingerprint": inp.get("fingerprint")}]


def first_plan(listing: InputListing, shard_size: int) -> RunPlan:
    """A new output: every listed input, shards from 0."""
    units = _units(listing.records, shard_size, 0)
    return RunPlan(records=listing.records, units=units, generations=[_generation(0, units, listing.records)])


def _live(gens: Sequence[dict[str, Any]]) -> list[int]:
    return RunPlan(records=[], units=[], generations=list(gens)).shards


def resume_plan(listing: InputListing, shard_size: int, manifest: dict[str, Any], out: OutputDir) -> RunPlan:
    """The same listing as the latest generation's: resume that generation."""
    gens = generations_of(manifest)
    latest = gens[-1]
    if len(gens) == 1:
        records, committed, before = listing.records, {}, 0
    else:
        committed = out.committed(_live(gens[:-1]))
        records = [r for r in listing.records if r.id not in committed]
        before = len(listing.records) - len(records)
    units = _units(records, shard_size, latest["first_shard"])
    if len(gens) > 1 and (fingerprint(records) != latest["fingerprint"] or len(units) != latest["num_shards"]):
        raise OutputError(
            f"{out.root}: the shards of the earlier runs changed since its last --update started (a shard was deleted, "
            "added or edited), so the inputs it planned cannot be found again; embed again into a new --output folder"
        )
    listed = {r.id for r in listing.records}
    disappeared = {i: v for i, v in committed.items() if i not in listed}
    return RunPlan(records=records, units=units, generations=gens, disappeared=disappeared, listed_before=before)


def update_plan(listing: InputListing, shard_size: int, manifest: dict[str, Any], out: OutputDir) -> RunPlan:
    """A listing that differs from the latest generation's: plan its inputs that are not committed yet
    into a new generation. Unfinished shards of earlier generations are abandoned (their inputs, if still
    listed, are planned again)."""
    gens = generations_of(manifest)
    done = out.done_shards()
    live = _live(gens)
    for g in gens:
        lost = [s for s in range(g["first_shard"], g["first_shard"] + g["num_shards"])
                if s in live and s not in done]
        if lost:
            g["abandoned"] = sorted(set(g.get("abandoned", [])) | set(lost))
    committed = out.committed([s for s in live if s in done])
    records = [r for r in listing.records if r.id not in committed]
    first = max((g["first_shard"] + g["num_shards"] for g in gens), default=0)
    units = _units(records, shard_size, first)
    listed = {r.id for r in listing.records}
    disappeared = {i: v for i, v in committed.items() if i not in listed}
    gens.append(_generation(first, units, records))
    return RunPlan(records=records, units=units, generations=gens, disappeared=disappeared,
                   listed_before=len(listing.records) - len(records), new_generation=True)


__all__ = ["RunPlan", "first_plan", "fingerprint", "generations_of", "resume_plan", "update_plan"]
