"""The one call an encoder makes for its image side's CPU speed: :func:`accelerate`.

Given the model, the precision that runs (decided by :func:`phiclip.cpu.precision.decide_cpu_precision`
through the encoder's placement) and the spec's ``runtime=`` / ``calibration=``, it decides, in this
order, and applies:

1. the runtime (:func:`phiclip.cpu.runtimes.choose_runtime`; ``auto``: measured against torch,
   :mod:`phiclip.cpu.autotune`): OpenVINO or ONNX Runtime compile the image side (or a part of it:
   Phi-3-vision's tower, ``part="tower"``, whose output the model's torch code goes on with) from the
   model's float32 weights (static int8 calibrated on ``calibration=`` images, or their crops,
   :mod:`phiclip.cpu.calibration`); otherwise torch runs it (a model loaded in float32 for a runtime
   first made 16-bit by the encoder's ``torch_weights`` at a 16-bit precision):
2. ``int8``: the image side quantised (:func:`phiclip.cpu.int8.quantize_image_side`: an int8 copy of
   phiclip's CLIP image module, or the model's own tower in place; for an encoder that passes
   ``tower``, the SigLIP 2 / MetaCLIP 2 / AIMv2 / DINO families, those modules' products in place,
   dynamic int8 from their float32 weights, the rest of them in the plan's float precision);
3. ``bfloat16`` / ``float16`` on the CPU: 16-bit weights once (autocast would convert every float32
   weight again on every call): for bfloat16 oneDNN's prepacked products with fused
   bias/activation/residual where this torch has them (:mod:`phiclip.cpu.fused`), else a plain
   16-bit copy; a Phi-3-vision tower (bfloat16 only) is fused in place; an encoder's ``tower``
   modules are turned 16-bit in place (its text side keeps float32 weights under autocast);
4. ``float32`` stays on the model's own weights (a fused float32 copy measured 1.03-1.15x for a second
   copy of the image tower, see BENCHMARKS.md).

:class:`AcceleratedPath` holds what runs and the record of what was chosen and why, which the
encoder puts under ``describe()["precision"]`` (and so in a run's manifest). Nothing here knows an
encoder: the encoder passes its model, a factory of its float image module, its preprocessing.
Torch is imported only when a model is accelerated.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phiclip.cpu.calibration import DEFAULT_CALIBRATION_IMAGES, calibration_set
from phiclip.models.checkpoint import LazyFingerprint, resolve_fingerprint

if TYPE_CHECKING:
    from torch import nn

    from phiclip.cpu.runtimes import CompiledImagePath


@dataclass
class AcceleratedPath:
    """What runs an encoder's image side, as :func:`accelerate` chose it.

    ``compiled``: a compiled runtime's image side (OpenVINO / ONNX Runtime), or None.
    ``image_features``: the torch module that turns pixels into image vectors (phiclip's CLIP image
    module, or its int8, fused or 16-bit copy), or None: the model's own forward runs (its tower
    quantised or fused in place where the precision asked for it).
    ``record``: ``describe()["precision"]``: requested, dtype, reason, measured speedups, cpu, and
    where they apply ``runtime`` (the runtime chosen, and the compiled model), ``int8`` (kernel,
    scheme, products quantised) and ``cpu_kernels`` (``onednn-fused`` or ``torch``).
    """

    compiled: CompiledImagePath | None
    image_features: nn.Module | None
    record: dict[str, Any]
    #: The float dtype the model's own torch code computes in at this precision (``bfloat16`` for
    #: bfloat16; int8: the plan's ``float_dtype``): what runs after a compiled part (Phi-3-vision's HD
    #: merge and projection after its compiled tower) runs in it, whichever way ran the part.
    torch_dtype: str = "float32"

    @property
    def image_path(self) -> Callable[[Any], Any] | None:
        """The callable ``pixel_values (n, 3, S, S) -> features (n, d)`` to run, or None (the model's own forward)."""
        return self.compiled if self.compiled is not None else self.image_features


def accelerate(
    model: nn.Module,
    *,
    precision: str,
    record: dict[str, Any],
    device_type: str = "cpu",
    image_features: Callable[[], nn.Module | None] | None = None,
    runtime: str | None = None,
    calibration: str | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    fingerprint: str | LazyFingerprint | None = None,
    image_size: int | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    preprocess_key: str = "",
    keep_alpha: bool = False,
    name: str = "",
    tower: Sequence[nn.Module] | None = None,
    compile_module: Callable[[], nn.Module] | None = None,
    part: str = "image",
    example_rows: int | None = None,
    torch_weights: Callable[[str], None] | None = None,
    torch_input: Callable[[Any], Any] | None = None,
) -> AcceleratedPath:
    """Decide and build what runs ``model``'s image side (see the module's docstring for the order).

    Args:
        model: the loaded model (float32 weights, or the placement's dtype for Phi-3-vision).
        precision: the compute precision that runs: ``float32``, ``bfloat16``, ``float16`` or ``int8``.
        record: the precision record so far (the placement's: requested, dtype, reason...); a copy is
            completed and returned in :attr:`AcceleratedPath.record`.
        device_type: where the model runs (``cpu``, ``cuda``...).
        image_features: builds phiclip's float image module on the model's own weights (CLIP's fast
            path), or None where there is none; called only when torch runs the image side.
        runtime: the spec's ``runtime=`` (``torch``, ``auto``, ``openvino``, ``onnxruntime``); None for
            an encoder without that option (torch runs, and no runtime is recorded).
        calibration: the spec's ``calibration=`` input (static int8 through OpenVINO), or None.
        calibration_images: how many images to take from it.
        fingerprint: the weights' fingerprint (names a compiled runtime's cache entry); a
            :class:`~phiclip.models.checkpoint.LazyFingerprint` is waited for only where something is
            compiled or measured.
        image_size: the side the image tower takes (a compiled runtime's example input).
        preprocess: the encoder's one-image preprocessing (decodes calibration images).
        preprocess_key: what else the calibration pixels depend on (the preprocessing's settings).
        keep_alpha: whether ``preprocess`` takes images with their alpha band.
        name: the encoder's name, for warnings.
        tower: the modules that are the image side and nothing else (never a text tower), for an
            encoder without phiclip's image module: int8 and 16-bit change them in place (recorded
            as ``image_weights``).
        compile_module: builds the float32 module a compiled runtime converts (``pixel_values (n, 3,
            S, S) -> (n, d)``, or any output: Phi-3-vision's tower gives its hidden state); None:
            transformers' ``get_image_features`` of ``model``. ``fingerprint`` must then also name
            whatever else changes its output (a pooling option). ``auto`` times the torch way on it too.
        part: what is compiled, in the cache keys and the record (``image``; ``tower``: a tower whose
            output the model's own torch code goes on with).
        example_rows: how many rows (images, or crops where ``preprocess`` gives several per image)
            ``auto`` times the ways on: the batch the part is called with (default
            :data:`AUTO_IMAGE_BATCH`).
        torch_weights: puts the model's float weights in the named dtype; called with ``bfloat16`` /
            ``float16`` before torch's way is built at that precision, for a model loaded in float32
            so that a compiled runtime could convert it (Phi-3-vision's tower is fused or made 16-bit
            from 16-bit weights). None: the model is left as it is.
        torch_input: casts the example input of torch's way when ``auto`` times it (a tower with
            16-bit weights takes 16-bit crops), called after that way is built; None: as it is.

    Raises:
        ValueError: an impossible runtime ask (:func:`~phiclip.cpu.runtimes.choose_runtime`), calibration
            images that cannot be read, a failed conversion, or no int8 kernel in this torch build.
    """
    record = dict(record)
    if runtime == "auto" and device_type == "cpu" and fingerprint is not None and image_size is not None:
        from phiclip.cpu import runtimes  # lazy: imports torch

        if runtimes.auto_candidates(precision, calibrated=calibration is not None)[0]:
            return _measured(model, precision=precision, record=record, image_features=image_features,
                             calibration=calibration, calibration_images=calibration_images,
                             fingerprint=resolve_fingerprint(fingerprint),
                             image_size=image_size, preprocess=preprocess, preprocess_key=preprocess_key,
                             keep_alpha=keep_alpha, tower=tower, compile_module=compile_module, part=part,
                             example_rows=example_rows or AUTO_IMAGE_BATCH, torch_weights=torch_weights,
                             torch_input=torch_input)
    choice = None
    if runtime is not None:
        from phiclip.cpu import runtimes  # lazy: imports torch

        if runtime == "auto" and device_type == "cpu" and (fingerprint is None or image_size is None):
            choice = runtimes.RuntimeChoice("auto", "torch", "auto: torch (this image side's input shape varies "
                                            "with each image, so it is not compiled)")
        else:
            choice = runtimes.choose_runtime(runtime, precision, device_type, calibrated=calibration is not None)
    compiled = None
    features = None
    if choice is not None and choice.runtime != "torch":
        compiled = _compile(model, choice.runtime, precision, calibration, calibration_images,
                            resolve_fingerprint(fingerprint), image_size,
                            preprocess, preprocess_key, keep_alpha, compile_module, part)
        if precision == "int8":
            record["reason"] = f"int8 asked for: {compiled.scheme()}"
    else:
        features = _torch_image_side(model, precision, record, device_type, image_features, tower, torch_weights)
    if calibration is not None and precision == "int8" and (compiled is None or compiled.calibration is None):
        warnings.warn(f"{name}: calibration= is used only by int8 through OpenVINO (runtime=openvino or auto, "
                      f"precision int8); here {choice.runtime if choice else 'torch'} runs {precision}, so it is ignored",
                      stacklevel=3)
    if choice is not None:
        record["runtime"] = {**choice.to_dict(), **(compiled.describe() if compiled is not None else {})}
    return AcceleratedPath(compiled=compiled, image_features=features, record=record,
                           torch_dtype=_torch_dtype(precision, record, compiled is not None))


#: Images ``auto`` times the ways of an image side on (random pixel values of the tower's size).
AUTO_IMAGE_BATCH = 8


def may_compile(runtime: str | None, precision: str, device_type: str = "cpu", *, calibrated: bool = False) -> bool:
    """Whether :func:`accelerate` may compile the image side for a spec's ``runtime=`` at ``precision``
    on ``device_type``: a runtime named (compiled, or an error saying why not), or ``auto`` with a
    runtime installed that runs the precision. A compiled runtime converts the model's float32
    weights, so an encoder that loads its weights in its precision's dtype loads them in float32 then
    (and passes ``torch_weights`` for torch's way)."""
    if device_type != "cpu" or runtime in (None, "torch"):
        return False
    if runtime != "auto":
        return True
    from phiclip.cpu import runtimes  # lazy: imports torch

    return bool(runtimes.auto_candidates(precision, calibrated=calibrated)[0])


def _example_pixels(preprocess: Callable[[Any], Any] | None, image_size: int, keep_alpha: bool,
                    rows: int = AUTO_IMAGE_BATCH) -> Any:
    """``rows`` pixel values ``(rows, 3, S, S)`` that ``auto`` times an image side on: smooth random
    pictures (low-frequency colour fields with some noise, like photos rather than white noise: static
    int8 scales were calibrated on photos) through the encoder's preprocessing, which may give one
    image (``(3, S, S)``) or several crops (``(k, 3, S, S)``: taken one after the other); random
    normal pixel values where there is none."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    if preprocess is not None:
        out: list[Any] = []
        i = 0
        while sum(len(t) for t in out) < rows and i < 4 * rows:  # a preprocessing that gives nothing ends too
            coarse = rng.integers(0, 256, (4 + i % 3, 5 + i % 4, 3), dtype=np.uint8)
            size = (320 - 16 * (i % AUTO_IMAGE_BATCH), 240 + 8 * (i % AUTO_IMAGE_BATCH))
            field = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.int16)
            noisy = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(noisy)
            one = preprocess(image.convert("RGBA") if keep_alpha else image)
            out.append(one if one.ndim == 4 else one[None])
            i += 1
        pixels = torch.cat(out)[:rows].float() if out else None
        if pixels is not None and tuple(pixels.shape) == (rows, 3, image_size, image_size):
            return pixels
    return torch.from_numpy(rng.standard_normal((rows, 3, image_size, image_size)).astype(np.float32))


def _torch_image_side(model: nn.Module, precision: str, record: dict[str, Any], device_type: str,
                      image_features: Callable[[], nn.Module | None] | None,
                      tower: Sequence[nn.Module] | None,
                      torch_weights: Callable[[str], None] | None = None) -> nn.Module | None:
    """Torch's image side at ``precision`` (records what it did in ``record``): phiclip's image module
    (int8, fused or 16-bit copy), or None with the ``tower`` changed in place / the model's own forward.
    ``torch_weights`` first puts a 16-bit precision's model in 16-bit weights."""
    if torch_weights is not None and precision in ("bfloat16", "float16"):
        torch_weights(precision)
    features = image_features() if image_features is not None else None
    if tower is not None and features is None and device_type == "cpu" and precision != "float32":
        _tower_in_place(tower, precision, record)
    elif precision == "int8":
        from phiclip.cpu import int8  # lazy: imports torch

        features, record["int8"] = int8.quantize_image_side(model, features)
    elif device_type == "cpu" and precision in ("bfloat16", "float16"):
        features = _sixteen_bit(model, features, precision, record)
    return features


def _measured(model: nn.Module, *, precision: str, record: dict[str, Any],
              image_features: Callable[[], nn.Module | None] | None, calibration: str | None, calibration_images: int,
              fingerprint: str, image_size: int, preprocess: Callable[[Any], Any] | None, preprocess_key: str,
              keep_alpha: bool, tower: Sequence[nn.Module] | None,
              compile_module: Callable[[], nn.Module] | None, part: str, example_rows: int,
              torch_weights: Callable[[str], None] | None,
              torch_input: Callable[[Any], Any] | None) -> AcceleratedPath:
    """``runtime=auto`` on the CPU: the installed runtimes and torch measured on this CPU, the fastest
    within the precision's bound kept (:func:`phiclip.cpu.autotune.fastest`; decided once per CPU, weights,
    precision and shape)."""
    import contextlib

    import torch

    from phiclip.cpu import autotune, runtimes  # lazy: imports torch

    def float_module() -> nn.Module:
        return compile_module() if compile_module is not None else runtimes.ImageSide(model)

    pixels = _example_pixels(preprocess, int(image_size), keep_alpha, example_rows)
    torch_record = dict(record)
    compiled: dict[str, runtimes.CompiledPath] = {}
    candidates, skipped = runtimes.auto_candidates(precision, calibrated=calibration is not None)
    if any((name, precision) in runtimes.NEEDS_CALIBRATION for name in candidates):
        # Images that cannot be read are the user's error to fix, not a way to pass over quietly.
        calibration_set(str(calibration), calibration_images, salt=preprocess_key)

    def build_compiled(name: str) -> Callable[..., Any]:
        compiled[name] = _compile(model, name, precision, calibration, calibration_images, fingerprint, image_size,
                                  preprocess, preprocess_key, keep_alpha, compile_module, part)
        return compiled[name]

    def build_torch() -> Callable[..., Any]:
        features = _torch_image_side(model, precision, torch_record, "cpu", image_features, tower, torch_weights)
        torch_record["_features"] = features
        module = features if features is not None else float_module()
        dtype = precision if precision in ("bfloat16", "float16") else None
        if precision == "int8" and tower is not None and features is None:
            dtype = torch_record.get("int8", {}).get("float_dtype")
        autocast = (lambda: torch.autocast("cpu", dtype=getattr(torch, dtype))) if dtype and dtype != "float32" \
            else contextlib.nullcontext

        def run(x: Any) -> Any:
            with autocast():
                return module(torch_input(x) if torch_input is not None else x)

        return run

    ways = [autotune.Way(name, lambda name=name: build_compiled(name)) for name in candidates]
    ways.append(autotune.Way("torch", build_torch))  # last: it may change the tower in place
    key_fields = {"part": part, "fingerprint": fingerprint, "preprocess": preprocess_key,
                  "calibration": calibration, "calibration_images": calibration_images if calibration else None}
    # The float32 reference is computed before any way changes the tower in place.
    tuned = autotune.fastest(ways, (pixels,), precision=precision, key_fields=key_fields,
                             reference=lambda: float_module()(pixels).float().numpy())
    reason = tuned.reason(precision)
    if skipped:
        reason += f"; not measured: {'; '.join(skipped)}"
    if tuned.name == "torch":
        features = torch_record.pop("_features", None)
        out = dict(torch_record)
        out["runtime"] = {"requested": "auto", "runtime": "torch", "reason": reason}
        out["auto"] = tuned.record
        return AcceleratedPath(compiled=None, image_features=features, record=out,
                               torch_dtype=_torch_dtype(precision, out, False))
    path = compiled[tuned.name]
    out = dict(record)
    if precision == "int8":
        out["reason"] = f"int8 asked for: {path.scheme()}"
    out["runtime"] = {"requested": "auto", "runtime": tuned.name, "reason": reason, **path.describe()}
    out["auto"] = tuned.record
    return AcceleratedPath(compiled=path, image_features=None, record=out, torch_dtype=_torch_dtype(precision, out, True))


def _torch_dtype(precision: str, record: dict[str, Any], compiled: bool) -> str:
    """:attr:`AcceleratedPath.torch_dtype`: the precision's float dtype; int8: the plan's float dtype
    (torch's way recorded it; after a compiled part, this CPU's int8 plan, float32 without int8 kernels)."""
    if precision != "int8":
        return precision
    if not compiled:
        return str(record.get("int8", {}).get("float_dtype", "float32"))
    from phiclip.cpu import int8  # lazy: imports torch

    try:
        return str(int8.int8_plan()["float_dtype"])
    except ValueError:  # no int8 kernel in this torch: the compiled runtime quantises, torch runs float32
        return "float32"


def _tower_in_place(tower: Sequence[nn.Module], precision: str, record: dict[str, Any]) -> None:
    """int8 or 16-bit weights for an encoder's image-side modules, in place (records
    ``image_weights``, ``cpu_kernels`` and for int8 ``int8``)."""
    import torch  # lazy: keeps the CLI start-up free of torch

    from phiclip.cpu import fused, int8  # lazy: imports torch

    if precision == "int8":
        plan = int8.int8_plan()
        # The patch embedding stays float (SigLIP 2 NaFlex's is a Linear whose weight dtype it reads).
        n = sum(int8.quantize_linears_(m, plan["kernel"], skip=_is_embedding) for m in tower)
        for m in tower:
            int8._convert_floats(m, getattr(torch, plan["float_dtype"]))
        record["int8"] = int8.int8_description(plan, n)
        record["image_weights"] = f"int8 products in place, other weights {plan['float_dtype']}"
    else:
        for m in tower:
            int8._convert_floats(m, getattr(torch, precision))
        record["image_weights"] = f"{precision} in place (converted once, not on every call)"
    record["cpu_kernels"] = fused.KERNELS_TORCH


def _is_embedding(name: str, module: nn.Module) -> bool:
    return "embeddings" in name.split(".")


def _sixteen_bit(model: nn.Module, features: nn.Module | None, precision: str, record: dict[str, Any]) -> nn.Module | None:
    """16-bit weights once for the CPU (records ``cpu_kernels``): a fused or plain copy of
    ``features``; without it, a Phi-3-vision tower fused in place (bfloat16). A transformers model
    without phiclip's image module is left to autocast."""
    import torch  # lazy: keeps the CLI start-up free of torch

    from phiclip.cpu import fused  # lazy: imports torch

    dtype = getattr(torch, precision)
    if features is not None:
        packed = fused.fused_cpu_copy(features, dtype)
        if packed is None:
            from phiclip.cpu.int8 import float_copy  # lazy: imports torch

            packed = float_copy(features, dtype)
            record["cpu_kernels"] = fused.KERNELS_TORCH
        else:
            record["cpu_kernels"] = fused.KERNELS_FUSED
        return packed
    if precision == "bfloat16" and getattr(model, "img_processor", None) is not None:
        record["cpu_kernels"] = fused.KERNELS_FUSED if fused.fuse_phi3v_tower_(model) else fused.KERNELS_TORCH
    return None


def _compile(model: nn.Module, runtime: str, precision: str, calibration: str | None, calibration_images: int,
             fingerprint: str | None, image_size: int | None, preprocess: Callable[[Any], Any] | None,
             preprocess_key: str, keep_alpha: bool,
             compile_module: Callable[[], nn.Module] | None = None, part: str = "image") -> CompiledImagePath:
    """The image side (``part``) compiled by ``runtime`` from the model's float32 weights (static
    int8: calibrated on ``calibration_images`` images of ``calibration``)."""
    from phiclip.cpu import runtimes  # lazy: imports torch

    if fingerprint is None or image_size is None:
        raise ValueError(f"runtime {runtime}: compiling the image side needs the weights' fingerprint and the image size")
    cal = None
    if (runtime, precision) in runtimes.NEEDS_CALIBRATION:
        cal = calibration_set(str(calibration), calibration_images, salt=preprocess_key)
    module = compile_module() if compile_module is not None else runtimes.ImageSide(model)
    return runtimes.compile_path(module, runtime=runtime, precision=precision, fingerprint=fingerprint,
                                 inputs=runtimes.image_inputs(int(image_size)), part=part, calibration=cal,
                                 preprocess=preprocess, keep_alpha=keep_alpha)


# --------------------------------------------------------------------------------------------------
# The text side
# --------------------------------------------------------------------------------------------------
@dataclass
class TextPath:
    """What runs an encoder's text side: ``compiled`` (a compiled runtime's text tower, called with
    the tokenizer's tensors in the order of its ``input_names``) or None (torch: the model's own
    ``get_text_features``), and the record of the choice (``describe()["precision"]["text"]``)."""

    compiled: CompiledImagePath | None
    record: dict[str, Any]


def accelerate_text(model: nn.Module, *, precision: str, runtime: str | None,
                    fingerprint: str | LazyFingerprint | None,
                    example: dict[str, Any], device_type: str = "cpu",
                    text_module: Callable[[], nn.Module] | None = None) -> TextPath:
    """Decide what runs ``model``'s text side at ``precision``: a compiled runtime (``runtime=`` names
    it; ``auto`` measures the installed ones against torch on ``example``, the tokenizer's tensors for a
    few sentences, and keeps the fastest within the bound, :mod:`phiclip.cpu.autotune`) or torch.

    The text side is never statically quantised (that needs calibration texts): at int8 a runtime
    runs ONNX Runtime's dynamic int8 where installed (``runtime=openvino`` included), else torch runs
    it in float32 as before. A precision no runtime runs (float16), a GPU, or a failed conversion
    under ``auto``: torch, with the reason recorded.

    Args:
        text_module: builds the float32 module ``(input_ids[, attention_mask]) -> (n, d)``; None:
            transformers' ``get_text_features`` of ``model``.
    """
    from phiclip.cpu import autotune, runtimes  # lazy: imports torch

    def torch_path(reason: str) -> TextPath:
        record = {"runtime": "torch", "reason": reason}
        weights = _text_weights_once(model, precision, device_type)
        if weights:
            record["text_weights"] = weights
        return TextPath(None, record)

    if runtime in (None, "torch"):
        return torch_path("runtime torch" + (" (the default)" if runtime is None else ""))
    if device_type != "cpu":
        return torch_path(f"compiled runtimes are for the CPU; this runs on {device_type}")
    if fingerprint is None:
        return torch_path("a model without a weights fingerprint is not compiled")
    fingerprint = resolve_fingerprint(fingerprint)
    names = tuple(n for n in ("input_ids", "attention_mask") if n in example)
    inputs = runtimes.text_inputs(names)
    tensors = tuple(example[n] for n in names)

    def module() -> nn.Module:
        return text_module() if text_module is not None else runtimes.TextSide(model)

    def build(name: str) -> runtimes.CompiledPath:
        return runtimes.compile_path(module(), runtime=name, precision=precision, fingerprint=fingerprint,
                                     inputs=inputs, part="text")

    if runtime != "auto":
        name = runtime
        if precision == "int8" and (runtime, precision) in runtimes.NEEDS_CALIBRATION:
            name = "onnxruntime"  # static int8 needs calibration texts: dynamic int8 instead
        if precision not in runtimes.RUNTIME_PRECISIONS.get(name, ()) or runtimes.missing_packages(name, precision):
            return torch_path(f"runtime {runtime} asked for, but {name} does not run the text side at {precision} here "
                              f"({', '.join(runtimes.missing_packages(name, precision)) or 'precision'}): torch")
        compiled = build(name)
        return TextPath(compiled, {"runtime": name, "reason": f"runtime {runtime} asked for", **compiled.describe()})
    candidates, skipped = runtimes.auto_candidates(precision, calibrated=False)
    if not candidates:
        return torch_path(f"auto: torch ({'; '.join(skipped) or f'no compiled runtime runs {precision}'})")
    import contextlib

    import torch

    float_module = module()
    sixteen = precision in ("bfloat16", "float16")

    def build_torch() -> Callable[..., Any]:
        _text_weights_once(model, precision, device_type)  # after the reference and the conversions (in place)

        def run(*xs: Any) -> Any:
            with torch.autocast("cpu", dtype=getattr(torch, precision)) if sixteen else contextlib.nullcontext():
                return float_module(*xs)
        return run

    built: dict[str, runtimes.CompiledPath] = {}

    def build_compiled(name: str) -> Callable[..., Any]:
        built[name] = build(name)
        return built[name]

    ways = [autotune.Way(n, lambda n=n: build_compiled(n)) for n in candidates] + [autotune.Way("torch", build_torch)]
    tuned = autotune.fastest(ways, tensors, precision=precision, key_fields={"part": "text", "fingerprint": fingerprint},
                             reference=lambda: float_module(*tensors).float().numpy())
    reason = tuned.reason(precision)
    if tuned.name == "torch":
        record = {"runtime": "torch", "reason": reason, "auto": tuned.record}
        weights = _text_weights_once(model, precision, device_type)
        if weights:
            record["text_weights"] = weights
        return TextPath(None, record)
    compiled = built[tuned.name]
    return TextPath(compiled, {"runtime": tuned.name, "reason": reason, **compiled.describe(), "auto": tuned.record})


#: The modules of a transformers dual encoder that make its text vector.
TEXT_MODULES = ("text_model", "text_projection")


def _text_weights_once(model: nn.Module, precision: str, device_type: str) -> str | None:
    """Torch's text tower at a 16-bit precision on the CPU: its weights converted once, in place (under
    autocast alone every float32 weight is converted again on every call: 3.5x slower measured for CLIP
    ViT-B/32's text tower on an AMD EPYC). Returns what was done (None: nothing; float32, int8 or a GPU)."""
    if device_type != "cpu" or precision not in ("bfloat16", "float16"):
        return None
    import torch

    from phiclip.cpu.int8 import _convert_floats  # lazy: imports torch

    dtype = getattr(torch, precision)
    for name in TEXT_MODULES:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            _convert_floats(module, dtype)
    return f"{precision} in place (converted once, not on every call)"


__all__ = ["AUTO_IMAGE_BATCH", "TEXT_MODULES", "AcceleratedPath", "TextPath", "accelerate", "accelerate_text", "may_compile"]
