"""Compiled CPU runtimes for an encoder's towers: OpenVINO and ONNX Runtime, optional.

Where OpenVINO or ONNX Runtime is installed (``pip install phiclip[cpu-runtimes]``) a tower of an
encoder can run through one of them instead of torch: the image side (pixel values in, image
features out) of CLIP, SigLIP, open_clip and the fixed-shape families, their text side (token ids,
and the attention mask where the tokenizer gives one, in; text features out; batch and length
dynamic), and the Phi-3-vision tower (crops in, the hidden state its HD transform reads out).
What a compiled path takes is a :class:`PathInputs`; :func:`compile_path` converts and caches it:

* ``openvino``: float32 or bfloat16 (OpenVINO's ``INFERENCE_PRECISION_HINT``), converted from
  the torch module with ``openvino.convert_model``;
* ``openvino`` at int8: static quantisation (NNCF's post-training quantisation, transformer preset:
  int8 weights per output channel, int8 activations with scales fixed from calibration images,
  :mod:`phiclip.cpu.calibration`, named by the spec's ``calibration=``); every product then runs on
  int8 without measuring scales per call (1.8x ONNX Runtime's dynamic int8 on ViT-B/32 measured);
* ``onnxruntime``: float32, or int8 (``onnxruntime.quantization.quantize_dynamic``: int8 weights
  per output channel, activations quantised per call, the same scheme as :mod:`phiclip.cpu.int8`;
  no calibration), exported with ``torch.onnx.export``.

:func:`choose_runtime` names one runtime for ``runtime=torch|openvino|onnxruntime``; for ``auto`` (the
default where the runtimes are installed) :func:`auto_candidates` lists every installed runtime that
runs the precision (OpenVINO's int8 only with calibration images), and :mod:`phiclip.cpu.autotune`
measures them against torch on this CPU and keeps the fastest within the precision's bound.
OpenVINO's float32 is float32 arithmetic (within ``ERROR_BOUNDS["float32"]`` of torch's, like any
other summation order).

Converting takes seconds (about 5 s for ViT-B/32); the result is cached on disk under
``runtimes/`` in phiclip's cache (:func:`phiclip.cache.cache_dir`), keyed by the weights' fingerprint, the
part (image, text, tower), the precision, the inputs (names, dtypes, fixed sizes), the calibration images (named by
their bytes), the runtime's and torch's versions and the CPU (model and instruction sets: a model
compiled on one CPU is converted again on another), so a later load reads it back in well under a second. The cached files are OpenVINO IR / ONNX protobuf written by phiclip (no
pickle, no code). A runtime session uses a fixed number of threads (torch's at load time).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from phiclip.atomic import atomic_directory
from phiclip.cache import cache_dir
from phiclip.cpu.calibration import DEFAULT_CALIBRATION_IMAGES
from phiclip.cpu.precision import cpu_isa_flags, cpu_name
from phiclip.cpu.sigstack import keeping_signal_stack

if TYPE_CHECKING:
    from phiclip.cpu.calibration import CalibrationSet

#: What ``runtime=`` accepts.
RUNTIMES = ("torch", "auto", "openvino", "onnxruntime")

#: The precisions each compiled runtime runs.
RUNTIME_PRECISIONS: dict[str, tuple[str, ...]] = {"openvino": ("float32", "bfloat16", "int8"),
                                                   "onnxruntime": ("float32", "int8")}

#: What ``auto`` takes for each precision, in order of preference, when installed (OpenVINO's int8
#: only with calibration images: :func:`choose_runtime`).
AUTO_CHOICES: dict[str, tuple[str, ...]] = {"float32": ("openvino",), "bfloat16": ("openvino",),
                                            "int8": ("openvino", "onnxruntime")}

#: Python packages each runtime needs.
RUNTIME_PACKAGES: dict[str, tuple[str, ...]] = {"openvino": ("openvino",), "onnxruntime": ("onnxruntime", "onnx")}

#: Packages one precision of a runtime needs on top (OpenVINO's static int8 is NNCF's quantisation).
PRECISION_PACKAGES: dict[tuple[str, str], tuple[str, ...]] = {("openvino", "int8"): ("nncf",)}

#: Runtime precisions that are static quantisation: they need calibration images.
NEEDS_CALIBRATION = frozenset({("openvino", "int8")})

#: Bumped when the export changes, so that old cached conversions are made again.
CACHE_VERSION = 2

#: Images per calibration batch fed to NNCF.
CALIBRATION_BATCH = 8

#: Most calibration samples (NNCF's own default subset size) where the preprocessing gives several
#: per image (Phi-3-vision's crops: 128 images at num_crops=16 cut about 1,700), spread evenly over
#: them; never fewer than the images (one sample each, as for CLIP).
CALIBRATION_SAMPLES = 300

INSTALL_HINT = "pip install 'phiclip[cpu-runtimes]'"


def missing_packages(runtime: str, precision: str | None = None) -> list[str]:
    """The packages ``runtime`` (at ``precision``, when given) needs that are not installed (empty
    for ``torch``)."""
    wanted = RUNTIME_PACKAGES.get(runtime, ()) + PRECISION_PACKAGES.get((runtime, precision or ""), ())
    return [p for p in wanted if importlib.util.find_spec(p) is None]


@dataclass(frozen=True)
class RuntimeChoice:
    """Which runtime runs the image side, and why."""

    requested: str
    runtime: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"requested": self.requested, "runtime": self.runtime, "reason": self.reason}


def choose_runtime(requested: str, precision: str, device_type: str = "cpu", *, calibrated: bool = False) -> RuntimeChoice:
    """The runtime for ``requested`` (one of :data:`RUNTIMES`) at compute ``precision`` on
    ``device_type``; ``calibrated``: calibration images were given (static int8 possible).

    Raises:
        ValueError: an unknown runtime, a compiled runtime off the CPU, a precision the runtime
            does not run, static int8 without calibration images, or a runtime whose packages are
            not installed (naming the fix).
    """
    if requested not in RUNTIMES:
        raise ValueError(f"runtime {requested!r} is not one of {', '.join(RUNTIMES)}")
    if requested == "torch":
        return RuntimeChoice(requested, "torch", "runtime torch (the default)")
    if device_type != "cpu":
        if requested == "auto":
            return RuntimeChoice(requested, "torch", f"auto on {device_type}: torch (compiled runtimes are for the CPU)")
        raise ValueError(f"runtime {requested} runs on the CPU only (device {device_type}); use runtime=torch")
    if requested == "auto":  # without measuring: the first installed runtime in the order of AUTO_CHOICES
        installed, skipped = auto_candidates(precision, calibrated=calibrated)
        for name in AUTO_CHOICES.get(precision, ()):
            if name in installed:
                how = " (static, calibrated)" if (name, precision) in NEEDS_CALIBRATION else ""
                return RuntimeChoice(requested, name, f"auto: {name} for {precision}{how} (installed)")
        if precision in AUTO_CHOICES:
            return RuntimeChoice(requested, "torch", f"auto: torch ({'; '.join(skipped)})")
        return RuntimeChoice(requested, "torch", f"auto: torch for {precision}")
    if precision not in RUNTIME_PRECISIONS[requested]:
        raise ValueError(f"runtime {requested} runs precision {', '.join(RUNTIME_PRECISIONS[requested])}, not {precision}; "
                         "choose one of those, or runtime=torch")
    if (requested, precision) in NEEDS_CALIBRATION and not calibrated:
        raise ValueError(f"runtime {requested} runs {precision} as static quantisation, calibrated on images like the ones "
                         f"you embed: add calibration=FOLDER (about {DEFAULT_CALIBRATION_IMAGES} images) to the spec, or use runtime=onnxruntime "
                         "(dynamic int8, no calibration)")
    missing = missing_packages(requested, precision)
    if missing:
        raise ValueError(f"runtime {requested} needs {', '.join(missing)}, which is not installed: {INSTALL_HINT} "
                         "(or use runtime=torch)")
    return RuntimeChoice(requested, requested, f"runtime {requested} asked for")


def auto_candidates(precision: str, *, calibrated: bool = False) -> tuple[list[str], list[str]]:
    """The compiled runtimes ``auto`` measures against torch at ``precision`` on the CPU (installed,
    running that precision; OpenVINO's static int8 only when ``calibrated``), and why each other one
    was passed over."""
    take, skipped = [], []
    for name, precisions in RUNTIME_PRECISIONS.items():
        if precision not in precisions:
            continue
        if (name, precision) in NEEDS_CALIBRATION and not calibrated:
            skipped.append(f"{name} runs {precision} calibrated only (calibration=IMAGES)")
            continue
        missing = missing_packages(name, precision)
        if missing:
            skipped.append(f"{name} needs {', '.join(missing)} ({INSTALL_HINT})")
            continue
        take.append(name)
    return take, skipped


class ImageSide(nn.Module):
    """``pixel_values (n, 3, S, S) -> image features (n, d)`` of a transformers CLIP or SigLIP
    model (``get_image_features``), as one module to convert."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixel_values)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


class TextSide(nn.Module):
    """``input_ids (n, L)[, attention_mask (n, L)] -> text features (n, d)`` of a transformers dual
    encoder (``get_text_features``), as one module to convert."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        out = self.model.get_text_features(input_ids=input_ids, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass(frozen=True)
class PathInputs:
    """What a compiled path takes: its inputs' names, an example of each (traced by the exporters)
    and, per input, the axes whose size varies from call to call (the batch; a text's length)."""

    names: tuple[str, ...]
    examples: tuple[torch.Tensor, ...]
    dynamic: tuple[tuple[int, ...], ...]

    def shapes(self) -> list[list[int]]:
        """Each input's shape with -1 on its dynamic axes."""
        return [[-1 if axis in dyn else int(n) for axis, n in enumerate(ex.shape)]
                for ex, dyn in zip(self.examples, self.dynamic, strict=True)]

    def key(self) -> list[Any]:
        """What names these inputs in a cache key: names, dtypes and shapes."""
        return [[n, str(ex.dtype), shape] for n, ex, shape in zip(self.names, self.examples, self.shapes(), strict=True)]


def image_inputs(image_size: int) -> PathInputs:
    """``pixel_values (n, 3, S, S)`` float32, the batch dynamic."""
    return PathInputs(("pixel_values",), (torch.zeros(2, 3, int(image_size), int(image_size)),), ((0,),))


def text_inputs(names: tuple[str, ...] = ("input_ids", "attention_mask"), length: int = 8) -> PathInputs:
    """Token ids (and the attention mask, where ``names`` has it) ``(n, L)`` int64, batch and length
    dynamic. The example is ``length`` tokens of id 1 ending in a padded position (traced only)."""
    ids = torch.ones(2, int(length), dtype=torch.int64)
    examples = tuple(ids if n == "input_ids" else torch.ones_like(ids) for n in names)
    return PathInputs(tuple(names), examples, tuple((0, 1) for _ in names))


def _versions(runtime: str, precision: str | None = None) -> str:
    import importlib.metadata as md

    names = RUNTIME_PACKAGES[runtime] + PRECISION_PACKAGES.get((runtime, precision or ""), ())
    return ",".join(f"{n}={md.version(n)}" for n in names) + f",torch={torch.__version__}"


def cache_key(runtime: str, precision: str, fingerprint: str, inputs: PathInputs, calibration_key: str | None = None,
              *, part: str = "image") -> str:
    """The cache folder name of one conversion: the weights, the part, the precision, the inputs,
    the calibration images, the runtime's and torch's versions, and this CPU (model and instruction sets)."""
    text = json.dumps([CACHE_VERSION, runtime, precision, fingerprint, part, inputs.key(), _versions(runtime, precision),
                       calibration_key, cpu_name(), cpu_isa_flags()])
    return f"{runtime}-{part}-{precision}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


@contextlib.contextmanager
def _export_quietly() -> Any:
    """Exporters warn about traced Python conditions that are fixed for a model's own input size."""
    root = logging.getLogger()  # onnxruntime.quantization advises pre-processing through the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        # Traced outside any autocast or inference mode of the caller (a text tower is compiled on its
        # first use, inside the encoder's autocast): the exporters convert plain float32 graphs.
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), \
                torch.autocast(device_type="cpu", enabled=False):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _convert_openvino(module: nn.Module, inputs: PathInputs, folder: Path, calibration: torch.Tensor | None = None) -> Path:
    """OpenVINO IR of ``module``; with ``calibration`` pixels ``(n, 3, S, S)``, quantised statically
    to int8 by NNCF (transformer preset: the products, not the softmax/LayerNorm/GELU in between)."""
    import openvino as ov

    with _export_quietly():
        model = ov.convert_model(module, example_input=inputs.examples,
                                 input=[ov.PartialShape(shape) for shape in inputs.shapes()])
    if calibration is not None:
        import nncf

        batches = [calibration[i : i + CALIBRATION_BATCH].numpy() for i in range(0, len(calibration), CALIBRATION_BATCH)]
        # NNCF shows its own progress bars while it calibrates (once, about 30 s for ViT-B/32).
        with _export_quietly():
            model = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches), model_type=nncf.ModelType.TRANSFORMER)
    path = folder / "model.xml"
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def _export_onnx(module: nn.Module, inputs: PathInputs, path: Path) -> None:
    names = list(inputs.names)
    # One symbol per varying axis, shared by the inputs (the batch ``n``; a text's length ``d1``).
    axes: dict[str, dict[int, str]] = {n: {a: "n" if a == 0 else f"d{a}" for a in dyn}
                                       for n, dyn in zip(names, inputs.dynamic, strict=True)}
    with _export_quietly():
        try:
            torch.onnx.export(module, inputs.examples, str(path), input_names=names, output_names=["features"],
                              dynamic_axes={**axes, "features": {0: "n"}}, opset_version=17, do_constant_folding=True,
                              dynamo=False)
        except (TypeError, RuntimeError):  # a torch without the TorchScript exporter: the dynamo one
            symbols = {sym: torch.export.Dim(sym, min=1, max=4096) for dyn in axes.values() for sym in dyn.values()}
            torch.onnx.export(module, inputs.examples, str(path), input_names=names, output_names=["features"],
                              dynamic_shapes={n: {a: symbols[sym] for a, sym in dyn.items()} for n, dyn in axes.items()},
                              dynamo=True, external_data=False)


def _convert_onnxruntime(module: nn.Module, inputs: PathInputs, folder: Path, precision: str) -> Path:
    path = folder / "model.onnx"
    if precision == "float32":
        _export_onnx(module, inputs, path)
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_path = folder / "float32.onnx"
    _export_onnx(module, inputs, float_path)
    with _export_quietly():
        quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8, per_channel=True)
    float_path.unlink()
    return path


class CompiledPath:
    """A tower compiled by OpenVINO or ONNX Runtime: called with torch tensors in the order of its
    inputs (``pixel_values (n, 3, S, S)``; ``input_ids (n, L)[, attention_mask (n, L)]``), it gives
    float32 features as a torch tensor (the same contract as the torch module it replaces)."""

    def __init__(self, runtime: str, precision: str, path: Path, threads: int, converted: bool,
                 calibration: dict[str, Any] | None = None, *, part: str = "image",
                 input_names: tuple[str, ...] = ("pixel_values",)) -> None:
        self.runtime, self.precision, self.path, self.threads = runtime, precision, Path(path), int(threads)
        self.part, self.input_names = part, tuple(input_names)
        self.converted = converted  # True: converted by this load; False: read from the cache
        self.calibration = calibration  # CalibrationSet.describe() of a static int8 model
        self._lock = threading.Lock()  # an OpenVINO infer request runs one call at a time
        if runtime == "openvino":
            import openvino as ov

            core = ov.Core()
            # int8: the quantised products run int8 whatever the hint; f32 keeps the rest exact
            # (bf16 there measured no faster).
            hint = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}[precision]
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": self.threads}
            if os.access(self.path.parent, os.W_OK):
                # OpenVINO's own cache of compiled models (ViT-B/32 int8: 0.9 -> 0.26 s at load); given the
                # file's path, a cache hit skips reading the IR.
                config["CACHE_DIR"] = str(self.path.parent / "compiled")
            with keeping_signal_stack():  # OpenVINO's CPU plugin replaces it (phiclip.cpu.sigstack)
                compiled = core.compile_model(str(self.path), "CPU", config)
            self._request = compiled.create_infer_request()
            self._run = lambda xs: self._request.infer(dict(enumerate(xs)), share_inputs=True)[0]
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            self._run = lambda xs: session.run(None, dict(zip(names, xs, strict=True)))[0]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"this compiled {self.part} path takes {', '.join(self.input_names)}; got {len(inputs)} inputs")
        arrays = [np.ascontiguousarray(t.detach().to("cpu", torch.float32 if t.is_floating_point() else torch.int64).numpy())
                  for t in inputs]
        with self._lock:
            out = np.array(self._run(arrays), dtype=np.float32, copy=True)
        return torch.from_numpy(out)

    def scheme(self) -> str:
        """How this runtime computes at its precision, in words (for the precision's reason)."""
        if self.precision != "int8":
            return f"{self.runtime} at {self.precision}"
        if self.calibration is not None:
            return (f"static int8 through {self.runtime} (NNCF): int8 weights per output channel, activation scales "
                    f"calibrated on {self.calibration['images']} images of {self.calibration['source']}")
        return f"dynamic int8 through {self.runtime}: int8 weights per output channel, activations quantised per call"

    def describe(self) -> dict[str, Any]:
        """What encoders record under ``describe()["precision"]["runtime"]``."""
        out = {"runtime": self.runtime, "part": self.part, "precision": self.precision, "threads": self.threads,
               "cached_at": str(self.path.parent), "converted_now": self.converted}
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out


_converting = threading.Lock()


def compile_path(module: nn.Module, *, runtime: str, precision: str, fingerprint: str, inputs: PathInputs,
                 part: str = "image", threads: int | None = None, cache: bool = True,
                 calibration: CalibrationSet | None = None, preprocess: Callable[[Any], torch.Tensor] | None = None,
                 keep_alpha: bool = False) -> CompiledPath:
    """Convert ``module`` (float32, taking ``inputs``) for ``runtime`` at ``precision``, or read the
    conversion cached for the same weights (``fingerprint``), part, inputs, ``calibration`` images,
    versions and CPU, and load it. Static int8 (:data:`NEEDS_CALIBRATION`, pixel inputs only) decodes the
    calibration images with ``preprocess`` (the encoder's; ``keep_alpha`` as it takes them) only when
    it quantises.

    Raises:
        ValueError: the conversion failed (naming the runtime and what it said, and the way back:
            runtime=torch), or static int8 without calibration images.
    """
    if runtime not in RUNTIME_PRECISIONS or precision not in RUNTIME_PRECISIONS[runtime]:
        raise ValueError(f"runtime {runtime} cannot run precision {precision}")
    static = (runtime, precision) in NEEDS_CALIBRATION
    if static and (calibration is None or preprocess is None or inputs.names != ("pixel_values",)):
        raise ValueError(f"runtime {runtime} at {precision} needs calibration images (calibration=FOLDER) and pixel inputs")
    calibration = calibration if static else None
    described = calibration.describe() if calibration is not None else None
    threads = int(threads or torch.get_num_threads())
    root = cache_dir("runtimes")
    final = root / cache_key(runtime, precision, fingerprint, inputs, calibration.key if calibration else None, part=part)
    name = "model.xml" if runtime == "openvino" else "model.onnx"

    def load(folder: Path, converted: bool) -> CompiledPath:
        return CompiledPath(runtime, precision, folder / name, threads, converted=converted, calibration=described,
                            part=part, input_names=inputs.names)

    with _converting:  # one conversion at a time in this process: a second load of the same one reads it back
        if cache and (final / name).is_file() and (final / "done").is_file():
            return load(final, False)
        with contextlib.suppress(OSError):
            root.mkdir(parents=True, exist_ok=True)
        if not (root.is_dir() and os.access(root, os.W_OK)):
            # an unwritable cache folder: convert into a temporary folder, used by this load only
            final = Path(tempfile.mkdtemp(prefix="phiclip-runtime-")) / final.name
        module = module.eval()
        pixels = None
        if calibration is not None:  # static: preprocess given
            most = max(len(calibration.records), CALIBRATION_SAMPLES)
            pixels = calibration.pixels(preprocess, keep_alpha=keep_alpha, most=most)
        # Filled beside its final name and renamed into place (another process loading the same
        # conversion finds one whole folder or the other); a failed conversion leaves nothing behind.
        with atomic_directory(final) as work:
            try:
                if runtime == "openvino":
                    with keeping_signal_stack():  # NNCF compiles on OpenVINO's CPU plugin (phiclip.cpu.sigstack)
                        _convert_openvino(module, inputs, work, pixels)
                else:
                    _convert_onnxruntime(module, inputs, work, precision)
            except Exception as e:  # noqa: BLE001 - any exporter failure becomes one message with the way back
                raise ValueError(f"runtime {runtime}: converting the {part} side for {precision} failed "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use runtime=torch") from e
            (work / "done").write_text(json.dumps({"fingerprint": fingerprint, "part": part, "inputs": inputs.key(),
                                                   "versions": _versions(runtime, precision), "calibration": described}))
    return load(final, True)


def compile_image_path(module: nn.Module, *, runtime: str, precision: str, fingerprint: str, image_size: int,
                       threads: int | None = None, cache: bool = True, calibration: CalibrationSet | None = None,
                       preprocess: Callable[[Any], torch.Tensor] | None = None, keep_alpha: bool = False) -> CompiledPath:
    """:func:`compile_path` for an image side: ``pixel_values (n, 3, S, S) -> (n, d)``."""
    return compile_path(module, runtime=runtime, precision=precision, fingerprint=fingerprint,
                        inputs=image_inputs(image_size), threads=threads, cache=cache, calibration=calibration,
                        preprocess=preprocess, keep_alpha=keep_alpha)


#: The name this class had while only image sides were compiled.
CompiledImagePath = CompiledPath


class CompiledModule(nn.Module):
    """A compiled path in place of the torch module it was compiled from (a Phi-3-vision tower:
    ``model.img_processor``): it takes float32 inputs on the CPU (``input_device``, ``input_dtype``,
    which the caller reads to place its inputs) and gives the compiled output in ``output_dtype``
    (the dtype of the torch code after it). ``packed_parameters`` counts the parameters of the module
    it replaces (held by the runtime, not by torch), so that a model's parameter count stays the same."""

    input_device = torch.device("cpu")
    input_dtype = torch.float32

    def __init__(self, path: CompiledPath, *, output_dtype: torch.dtype, parameters: int) -> None:
        super().__init__()
        self.path, self.output_dtype, self.packed_parameters = path, output_dtype, int(parameters)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.path(*inputs).to(self.output_dtype)

    def extra_repr(self) -> str:
        return f"{self.path.runtime} {self.path.precision}, output {self.output_dtype}"

__all__ = ["AUTO_CHOICES", "CACHE_VERSION", "NEEDS_CALIBRATION", "PRECISION_PACKAGES", "RUNTIMES", "RUNTIME_PACKAGES",
           "RUNTIME_PRECISIONS", "CompiledImagePath", "CompiledModule", "CompiledPath", "ImageSide", "PathInputs", "RuntimeChoice",
           "TextSide", "auto_candidates", "cache_key", "choose_runtime", "compile_image_path", "compile_path",
           "image_inputs", "missing_packages", "text_inputs"]
