"""The manifest of an embedding output (``OUT/manifest.json``): the one place that reads, checks,
writes and compares it.

- **read and check** (:func:`read_manifest`, :func:`check_manifest`): a manifest must be a JSON object
  whose known fields (:data:`FIELD_TYPES`) have the right types; a damaged one is refused with an error
  naming the file, the field, what it holds and what it must hold.
- **write** (:func:`write_manifest`): atomically, through :mod:`phiclip.atomic`.
- **compare** (:func:`differences`, :func:`stable_description`): what differs between two runs.
- **the encoder** (:func:`check_encoder`): whether a loaded encoder is the one an output records (spec,
  width, ``weights_fingerprint``), for ``embed`` (adding vectors), ``search`` and ``serve`` (queries).
- **checkpoint paths** (:func:`recorded_spec`): a model spec naming a local folder is recorded with the
  folder's absolute path (``encoder.spec``) and the text as typed (``encoder.spec_as_typed``), so an
  output can be searched and served from any directory; a manifest written before that, whose spec may
  name a relative folder, is resolved against the output folder's parent, then the working directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from phiclip import schema
from phiclip.atomic import atomic_write_json
from phiclip.encoders.spec import EncoderSpec, absolute_spec, split_spec

log = logging.getLogger(__name__)

#: Keys of ``Encoder.describe()`` that may change between runs without changing the vectors.
#: ``device`` may change between runs; ``precision`` records why the compute dtype was chosen (a CPU
#: measurement that may be redone), while the dtype itself, which decides the vectors, is ``dtype``;
#: ``spec_as_typed`` is how the model was named on the command line (``spec`` is compared instead).
VOLATILE_ENCODER_KEYS = frozenset({"device", "precision", "spec_as_typed"})
#: Options (``describe()["options"]``) that may change between runs like the precision's reason: what
#: runs a tower (``runtime``: torch or a compiled runtime, within the same precision's bound; its
#: default became ``auto`` after outputs were made with ``torch``).
VOLATILE_OPTION_KEYS = frozenset({"runtime"})
#: Key of ``Encoder.describe()`` (and so of ``manifest["encoder"]``) that identifies the weights.
WEIGHTS_KEY = "weights_fingerprint"
#: Key of ``manifest["encoder"]`` with the model spec as it was typed (``spec`` holds absolute paths).
SPEC_AS_TYPED_KEY = "spec_as_typed"
#: What to do about a damaged manifest.
_FIX = "the manifest was edited or damaged: restore it, or embed again into a new --output folder"


class ManifestError(ValueError):
    """A manifest is missing or damaged, or records another encoder than the one given. The message
    names the file (or output folder) and the fix."""


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_dim(v: Any) -> bool:
    """A positive integer, also written ``3.0`` or ``"3"`` (read back as an int)."""
    try:
        return (not isinstance(v, bool) and isinstance(v, (int, float, str)) and int(v) == float(v)
                and int(v) >= 1)
    except (TypeError, ValueError, OverflowError):
        return False


#: The type of every manifest field phiclip reads back: ``{key: (test, what it must be)}``.
FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "phiclip_version": (lambda v: isinstance(v, str), "a string"),
    "kind": (lambda v: v in ("image", "text"), '"image" or "text"'),
    "encoder": (lambda v: isinstance(v, dict), "a JSON object"),
    "dim": (_is_dim, "a positive integer"),
    "dtype": (lambda v: v in schema.VECTOR_DTYPES, " or ".join(f'"{d}"' for d in schema.VECTOR_DTYPES)),
    "normalized": (lambda v: isinstance(v, bool), "true or false"),
    "input": (lambda v: isinstance(v, dict), "a JSON object"),
    "counts": (lambda v: isinstance(v, dict), "a JSON object"),
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "settings": (lambda v: isinstance(v, dict), "a JSON object"),
    "timings": (lambda v: isinstance(v, dict), "a JSON object"),
    "generations": (lambda v: isinstance(v, list), "a list"),
}


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters (for messages about damaged files)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def manifest_path(root: str | os.PathLike[str]) -> Path:
    """``ROOT/manifest.json``."""
    return Path(root).expanduser() / schema.MANIFEST_FILE


def check_manifest(manifest: dict[str, Any], path: str | os.PathLike[str], *, strict: bool = False,
                   error: type[ValueError] = ManifestError) -> dict[str, Any]:
    """Check the type of every known field present (:data:`FIELD_TYPES`, and each count of ``counts``; a
    breakdown there may be an object); ``dim`` is made an ``int``. Returns the manifest.

    Args:
        strict: ``dim`` must be a JSON integer (a run that resumes an output rewrites its manifest);
            readers also take ``3.0`` or ``"3"``.

    Raises:
        error: naming the file, the field, what it holds and what it must hold.
    """
    def refuse(key: str, value: Any, what: str) -> None:
        field = key.split(".")[0]
        raise error(f"{path}: manifest {key!r} is {_short(value)}, not {what}; the manifest was edited or damaged "
                    f"(field {field!r} must be repaired): restore it, or embed again into a new --output folder")

    for key, (ok, what) in FIELD_TYPES.items():
        if key in manifest and not ok(manifest[key]):
            refuse(key, manifest[key], what)
    if strict and "dim" in manifest and not isinstance(manifest["dim"], int):
        refuse("dim", manifest["dim"], "a positive integer")
    for key, value in (manifest.get("counts") or {}).items():
        if not isinstance(value, dict) and not _is_count(value):  # (a breakdown, e.g. by stage, is an object)
            refuse(f"counts.{key}", value, "a count (a non-negative integer)")
    if "dim" in manifest:
        manifest["dim"] = int(manifest["dim"])
    return manifest


def read_manifest(root: str | os.PathLike[str], *, missing_ok: bool = False, require: Sequence[str] = ("dim", "encoder"),
                  strict: bool = False, error: type[ValueError] = ManifestError) -> dict[str, Any] | None:
    """Read and check (:func:`check_manifest`) the manifest of an output folder.

    Args:
        root: the output folder.
        missing_ok: return ``None`` when there is no manifest (a new output) instead of refusing.
        require: fields the manifest must have.
        strict: see :func:`check_manifest`.
        error: the exception class raised (a subclass of ``ValueError``).

    Raises:
        error: no folder or no manifest (unless ``missing_ok``), not JSON, not an object, a required
            field missing, or a field of the wrong type.
    """
    folder = Path(root).expanduser()
    path = manifest_path(folder)
    if not path.is_file():
        if missing_ok:
            return None
        if not folder.exists():
            raise error(f"{folder}: no such directory; give the --output directory of `phiclip embed`")
        if not folder.is_dir():
            raise error(f"{folder}: not a directory; give the --output directory of `phiclip embed`")
        raise error(f"{folder}: not an embedding output directory (no {schema.MANIFEST_FILE}); "
                    "create one with `phiclip embed ... --output DIR`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSON errors and text that is not UTF-8
        raise error(f"{path}: unreadable manifest ({e}); {_FIX}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the manifest is not a JSON object; {_FIX}")
    for key in require:
        if key not in data:
            raise error(f"{path}: field {key!r} is missing (the manifest has no {key!r}); {_FIX}")
    return check_manifest(data, path, strict=strict, error=error)


def write_manifest(root: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (indented, keys in insertion order; non-ASCII escaped, so any
    path, even one that is not UTF-8, can be written). An ``OSError`` (a full disk) is left to the caller."""
    return atomic_write_json(manifest_path(root), manifest, indent=2, default=str)


# --- comparing runs -------------------------------------------------------------------------------
def differences(old: Any, new: Any, prefix: str = "", form: str = "{key}: {old!r} before, {new!r} now") -> list[str]:
    """``form`` (default ``"key.sub: OLD before, NEW now"``) for every leaf that differs between two
    nested dicts; ``form`` gets ``key`` (dotted), ``old`` and ``new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}{k}.", form)
        return out
    if old != new:
        return [form.format(key=prefix.rstrip("."), old=old, new=new)]
    return []


def stable_description(describe: dict[str, Any]) -> dict[str, Any]:
    """An encoder description without the keys that may change between runs (device, precision reason,
    the spec as typed)."""
    out = {k: v for k, v in describe.items() if k not in VOLATILE_ENCODER_KEYS}
    if isinstance(out.get("options"), dict):
        out["options"] = {k: v for k, v in out["options"].items() if k not in VOLATILE_OPTION_KEYS}
    return out


# --- what the manifest records of its encoder -------------------------------------------------------
def encoder_spec_of(manifest: dict[str, Any]) -> str | None:
    """The encoder spec recorded in a manifest (``manifest["encoder"]["spec"]``), or ``None``."""
    enc = manifest.get("encoder")
    if isinstance(enc, dict):
        spec = enc.get("spec")
        return str(spec) if spec else None
    return None


def weights_fingerprint_of(manifest: dict[str, Any]) -> str | None:
    """The fingerprint of the encoder's weights recorded in a manifest
    (``manifest["encoder"]["weights_fingerprint"]``), or ``None`` when it records none."""
    enc = manifest.get("encoder")
    if isinstance(enc, dict):
        fp = enc.get(WEIGHTS_KEY)
        return str(fp) if fp else None
    return None


def _parse(spec: str) -> EncoderSpec | None:
    """Any ``kind:location?options`` (the kind is not checked here), or None."""
    try:
        return split_spec(spec, [spec.split(":", 1)[0].strip().lower()])
    except (ValueError, AttributeError):
        return None


def recorded_description(describe: dict[str, Any], spec_as_typed: str | None = None) -> dict[str, Any]:
    """An encoder description as a manifest records it: ``spec`` with a local folder's absolute path,
    and ``spec_as_typed`` the text as given (when the two differ)."""
    out = dict(describe)
    typed = str(spec_as_typed or out.get("spec") or "")
    if typed:
        out["spec"] = absolute_spec(typed)
        if out["spec"] != typed:
            out[SPEC_AS_TYPED_KEY] = typed
    return out


def recorded_spec(manifest: dict[str, Any], root: str | os.PathLike[str]) -> str | None:
    """The spec to load the encoder a manifest records from. A manifest written by this phiclip holds a
    local folder's absolute path; an older one may name a relative folder, which is looked for under
    the output folder's parent, then the working directory (logged, saying which)."""
    spec = encoder_spec_of(manifest)
    if spec is None or SPEC_AS_TYPED_KEY in (manifest.get("encoder") or {}):
        return spec
    return resolve_older_spec(spec, root)


def resolve_older_spec(spec: str, root: str | os.PathLike[str]) -> str:
    """A spec from a manifest of an older phiclip, which may name a folder by a relative path: that folder
    under the output folder's parent, else under the working directory (logged, saying which), as an
    absolute path; any other spec unchanged."""
    parsed = _parse(spec)
    if parsed is None or os.path.isabs(os.path.expanduser(parsed.location)):
        return spec
    parent = Path(root).expanduser().absolute().parent
    for base, where in ((parent, "the output folder's parent"), (Path.cwd(), "the working directory")):
        found = absolute_spec(spec, base)
        if found != spec:
            log.info("%s: the manifest names the model by a relative path (%s); using %s, found under %s",
                     root, spec, found, where)
            return found
    return spec


def same_spec(a: str, b: str, base: str | os.PathLike[str] | None = None) -> bool:
    """Spec strings naming the same encoder: equal up to option order, kind case and the spelling of a
    local folder's path (relative ones resolved against ``base``, default the working directory)."""
    pa, pb = _parse(a), _parse(b)
    if pa is None or pb is None:
        return a.strip() == b.strip()

    def canonical(p: EncoderSpec) -> str:
        local = Path(absolute_spec(str(p), base).split(":", 1)[1].partition("?")[0])
        return str(EncoderSpec(p.kind, str(local.resolve()) if local.is_dir() else p.location, p.options))

    return canonical(pa) == canonical(pb)


def _same_model_elsewhere(a: str, b: str) -> bool:
    """Specs of the same kind and options (the location may differ: the same weights, moved)."""
    pa, pb = _parse(a), _parse(b)
    return pa is not None and pb is not None and (pa.kind, pa.options) == (pb.kind, pb.options)


def check_encoder(manifest: dict[str, Any], describe: dict[str, Any], *, where: str | os.PathLike[str],
                  purpose: Literal["add", "query"], error: type[ValueError] = ManifestError,
                  allow_other_weights: bool = False, relocated: bool = False) -> None:
    """Refuse an encoder (``describe``: its ``describe()``) other than the one an output records.

    - ``purpose="add"`` (``embed`` resuming or updating an output): the weights fingerprint must be
      recorded and equal, and every stable field of the description (:func:`stable_description`) equal.
    - ``purpose="query"`` (``search``, ``serve``): the spec and width must match; when both sides have a
      weights fingerprint they must be equal, unless ``allow_other_weights`` (then it is logged). With
      ``relocated`` (the user named where the checkpoint is now: ``--model``), the same weights
      fingerprint under another path is accepted (kind and options must still match).

    Raises:
        error: naming the output folder, both fingerprints (or specs, or the fields that differ) and the fix.
    """
    old = manifest.get("encoder") or {}
    old_fp, new_fp = old.get(WEIGHTS_KEY), describe.get(WEIGHTS_KEY)
    if purpose == "add":
        if old_fp != new_fp:
            if old_fp is None:
                # Nothing says the shards come from these weights (an older phiclip, or an encoder that did
                # not report its weights); mixing two models is silent and unrepairable.
                raise error(
                    f"{where}: its manifest records no weights fingerprint (written by an older phiclip, or by an "
                    "encoder that does not report its weights), so it cannot be checked that the shards already "
                    f"written come from these weights (new {new_fp}); embed into a new --output folder, or delete "
                    "this one to start over"
                )
            raise error(
                f"{where}: weights changed: old {old_fp} new {new_fp}; the shards already written come from the "
                "old weights and this run would mix two models. Put the old weights back (or pin the same hub "
                "revision) to finish it, or embed into a new --output folder"
            )
        old_stable, new_stable = stable_description(old), stable_description(describe)
        old_spec = recorded_spec(manifest, where)
        if old_spec and "spec" in new_stable and same_spec(old_spec, str(new_stable["spec"])):
            new_stable["spec"] = old_stable["spec"]  # the same folder, spelled another way (an older manifest)
        diffs = differences(old_stable, new_stable)
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise error(
                f"{where} already holds a run with a different model ({shown}). Rerun with the same model and "
                "settings to finish or reuse it, or choose another --output folder."
            )
        return
    expected = encoder_spec_of(manifest)
    got = str(describe.get("spec") or "")
    resolved = recorded_spec(manifest, where) or ""  # an older manifest's relative folder, found
    if relocated and expected and got and _same_model_elsewhere(got, expected) and not same_spec(got, resolved):
        # --model named another place for the checkpoint: its weights are what tell whether it is the same one.
        if not (old_fp and new_fp and str(old_fp) == str(new_fp)) and not allow_other_weights:
            why = (f"differ ({new_fp} now, {old_fp} in the manifest)" if old_fp and new_fp else
                   "cannot be compared (the " + ("manifest" if not old_fp else "encoder") + " records no fingerprint)")
            raise error(
                f"{where}: the weights of the --model encoder {got!r} and of {expected!r}, which made the vectors, "
                f"{why}; give the checkpoint that made them, or pass --allow-other-weights "
                "(allow_other_weights=True in Python) to use these weights anyway"
            )
    elif expected and got and not same_spec(got, resolved):
        raise error(
            f"{where}: the vectors were made by {expected!r} but the query encoder is {got!r}; "
            "queries must use the encoder that made the index (omit the encoder to load it from the manifest)"
        )
    dim = describe.get("dim")
    if dim is not None and "dim" in manifest and int(dim) != int(manifest["dim"]):
        raise error(f"{where}: the query encoder makes {dim}-d vectors but the index holds {manifest['dim']}-d ones")
    if old_fp and new_fp and str(old_fp) != str(new_fp):
        if not allow_other_weights:
            raise error(
                f"{where}: the vectors were made with weights {old_fp} but the query encoder {got!r} loads weights "
                f"{new_fp}: another checkpoint (of the same width), so scores would mean nothing; point --model at "
                "the checkpoint that made the vectors (or restore its weights, or embed again), or pass "
                "--allow-other-weights (allow_other_weights=True in Python) to query anyway"
            )
        log.warning("%s: the vectors were made with weights %s but the query encoder %r loads weights %s "
                    "(allowed: --allow-other-weights)", where, old_fp, got, new_fp)


__all__ = [
    "FIELD_TYPES",
    "SPEC_AS_TYPED_KEY",
    "VOLATILE_ENCODER_KEYS",
    "WEIGHTS_KEY",
    "ManifestError",
    "check_encoder",
    "check_manifest",
    "differences",
    "encoder_spec_of",
    "manifest_path",
    "read_manifest",
    "recorded_description",
    "recorded_spec",
    "resolve_older_spec",
    "same_spec",
    "stable_description",
    "weights_fingerprint_of",
    "write_manifest",
]
