"""Encoder specs (``kind:location[?key=value&...]``) and the per-kind option dataclasses parsed from them.

Pure and torch-free. Which kinds exist, and which options each takes, is the registry's
(:mod:`phiclip.encoders.registry`); this module only knows how to read a spec and its options.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from phiclip.cpu.autotune import RUNTIME_NAMES, default_runtime

Self = TypeVar("Self", bound="SpecOptions")


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder spec such as ``phi3v:microsoft/Phi-3-vision-128k-instruct?num_crops=4``.

    ``location`` is a Hugging Face hub id or a local directory; ``options`` are ``key=value`` pairs
    after ``?`` (separated by ``&`` or ``,``), kept as strings: the kind's option dataclass
    (:class:`SpecOptions`) reads them.
    """

    kind: str
    location: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{self.location}" + (f"?{opts}" if opts else "")


def split_spec(spec: str, kinds: Sequence[str]) -> EncoderSpec:
    """Parse ``kind:location[?key=value&key=value]`` for one of ``kinds`` (the registry's).

    Raises:
        ValueError: for an unknown kind, an empty location or a malformed option (naming the spec).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"encoder spec {spec!r} has no kind; write one of "
            + ", ".join(f"'{k}:<hub id or directory>'" for k in kinds)
        )
    kind, rest = spec.split(":", 1)
    kind = kind.strip().lower()
    if kind not in kinds:
        raise ValueError(f"encoder spec {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(kinds)}")
    location, _, query = rest.partition("?")
    location = location.strip()
    if not location:
        raise ValueError(f"encoder spec {spec!r} names no model; add a hub id or a local directory after '{kind}:'")
    options: dict[str, str] = {}
    if query:
        for part in query.replace(",", "&").split("&"):
            if not part:
                continue
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"encoder spec {spec!r}: option {part!r} is not key=value")
            options[key.strip()] = value.strip()
    return EncoderSpec(kind=kind, location=location, options=options)


def absolute_spec(spec: str, base: str | os.PathLike[str] | None = None) -> str:
    """``spec`` with a location that names an existing local folder (relative to ``base``, default the
    working directory; ``~`` expanded) written as its absolute path; any other spec (a hub id) unchanged.

    >>> absolute_spec("clip:openai/clip-vit-base-patch32")  # no such folder here: a hub id
    'clip:openai/clip-vit-base-patch32'
    """
    try:
        parsed = split_spec(spec, [spec.split(":", 1)[0].strip().lower()])
    except (ValueError, AttributeError):
        return spec
    location = os.path.expanduser(parsed.location)
    folder = location if os.path.isabs(location) else os.path.join(os.fspath(base or os.getcwd()), location)
    if not os.path.isdir(folder):
        return spec
    return str(EncoderSpec(parsed.kind, os.path.normpath(os.path.abspath(folder)), parsed.options))


# ==============================================================================================
# Option values
# ==============================================================================================
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def option_bool(spec: EncoderSpec, key: str, default: bool) -> bool:
    """A ``true``/``false`` spec option (also 1/0, yes/no, on/off); a clear error otherwise."""
    raw = spec.options.get(key)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ValueError(f"encoder spec {str(spec)!r}: option {key}={raw!r} must be true or false")


def option_int(
    spec: EncoderSpec, key: str, default: int | None, minimum: int = 1, maximum: int | None = None, hint: str = ""
) -> int | None:
    """An integer spec option from ``minimum`` to ``maximum`` (decimal digits only: ``4.7``,
    ``1e9`` and ``abc`` are refused); a clear error naming the spec and the option otherwise."""
    raw = spec.options.get(key)
    if raw is None:
        return default
    wanted = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    message = f"encoder spec {str(spec)!r}: option {key}={raw!r} must be {wanted}" + (f" ({hint})" if hint else "")
    text = raw.strip()
    if not text.lstrip("+-").isdigit() or not text.isascii():
        raise ValueError(message)
    value = int(text)
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(message)
    return value


def option_choice(spec: EncoderSpec, key: str, default: str, choices: Sequence[str]) -> str:
    """One of ``choices``; a clear error naming the spec, the option and the choices otherwise."""
    raw = spec.options.get(key)
    if raw is None:
        return default
    if raw not in choices:
        raise ValueError(f"encoder spec {str(spec)!r}: option {key}={raw!r} must be one of {', '.join(choices)}")
    return raw


def bool_option(default: bool, help: str) -> Any:
    """A :class:`SpecOptions` field: ``true``/``false``."""
    return field(default=default, metadata={"parse": lambda spec, key: option_bool(spec, key, default), "help": help})


def int_option(default: int | None, help: str, *, minimum: int = 1, maximum: int | None = None, hint: str = "") -> Any:
    """A :class:`SpecOptions` field: an integer from ``minimum`` to ``maximum`` (``None``: unset)."""
    def parse(spec: EncoderSpec, key: str) -> int | None:
        return option_int(spec, key, default, minimum=minimum, maximum=maximum, hint=hint)

    return field(default=default, metadata={"parse": parse, "help": help})


def choice_option(default: str, choices: Sequence[str], help: str) -> Any:
    """A :class:`SpecOptions` field: one of ``choices``."""
    return field(default=default, metadata={"parse": lambda spec, key: option_choice(spec, key, default, choices),
                                            "help": help})


def runtime_option(help: str) -> Any:
    """A :class:`SpecOptions` field: what runs a tower on the CPU (``torch``, ``auto``, ``openvino``,
    ``onnxruntime``); left out, :func:`phiclip.cpu.autotune.default_runtime` (``$PHICLIP_RUNTIME``, else ``auto``)."""
    def parse(spec: EncoderSpec, key: str) -> str:
        return option_choice(spec, key, default_runtime(), RUNTIME_NAMES)

    return field(default_factory=default_runtime, metadata={"parse": parse, "help": help})


@dataclass(frozen=True)
class SpecOptions:
    """Base of the per-kind option dataclasses: each field is declared with :func:`bool_option`,
    :func:`int_option` or :func:`choice_option`, which say how to read it and what it means."""

    @classmethod
    def known(cls) -> dict[str, str]:
        """Option name -> what it means (for messages and ``--help``)."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_spec(cls: type[Self], spec: EncoderSpec) -> Self:
        """Read the spec's options (defaults for those it leaves out).

        Raises:
            ValueError: an unknown option (listing the known ones) or a malformed value (naming it).
        """
        known = cls.known()
        unknown = sorted(set(spec.options) - set(known))
        if unknown:
            listed = "; ".join(f"{k}={v}" for k, v in known.items())
            raise ValueError(f"encoder spec {str(spec)!r}: unknown option(s) {', '.join(unknown)}; known options: {listed}")
        return cls(**{f.name: f.metadata["parse"](spec, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """The options as plain values (for :class:`~phiclip.encoders.base.EncoderDescription`)."""
        return dataclasses.asdict(self)


__all__ = [
    "EncoderSpec",
    "absolute_spec",
    "SpecOptions",
    "bool_option",
    "choice_option",
    "int_option",
    "option_bool",
    "option_choice",
    "option_int",
    "runtime_option",
    "split_spec",
]
