"""The spec options of the SigLIP 2, MetaCLIP 2, AIMv2 and DINO kinds
(``dinov2:DIR?pool=cls+mean&normalize=false``), declared once. Torch-free.

:class:`FamilyOptions` is what every one of these kinds reads; SigLIP 2 adds ``max_num_patches``
(NaFlex checkpoints) and DINOv2 / DINOv3 add ``pool``.
"""

from __future__ import annotations

from dataclasses import dataclass

from phiclip.cpu.autotune import RUNTIME_NAMES
from phiclip.encoders.options import calibration_images_option, calibration_option
from phiclip.encoders.spec import SpecOptions, bool_option, choice_option, int_option, runtime_option

#: What may run a family's image side (the fixed-shape ones; SigLIP 2 NaFlex: torch only).
FAMILY_RUNTIMES = RUNTIME_NAMES

#: Most images (or texts) per model call, by default.
DEFAULT_FAMILY_MAX_BATCH = 64
#: The largest ``max_num_patches`` accepted (SigLIP 2 NaFlex was trained with up to 1024 patches).
MAX_NUM_PATCHES = 4096
#: DINO image vectors: the CLS token, the mean of the patch tokens, or both concatenated (DINOv2's
#: linear-probe protocol). The default is the first.
DINO_POOLS = ("cls", "mean", "cls+mean")


@dataclass(frozen=True)
class FamilyOptions(SpecOptions):
    """``metaclip2:`` and ``aimv2:`` options (and the base of ``siglip2:`` / ``dinov2:`` / ``dinov3:``)."""

    normalize: bool = bool_option(True, "true|false: L2-normalise the vectors (default true)")
    max_batch: int = int_option(DEFAULT_FAMILY_MAX_BATCH,
                                f"integer >= 1: most inputs per model call (default {DEFAULT_FAMILY_MAX_BATCH})")
    runtime: str = runtime_option(
        "auto|torch|openvino|onnxruntime: what runs the image side on the CPU (default auto, or $PHICLIP_RUNTIME: "
        "torch and each installed runtime measured once on this CPU, the fastest within the precision's bound "
        "kept; fixed-shape image paths only: SigLIP 2 NaFlex runs torch; phiclip[cpu-runtimes])")
    calibration: str | None = calibration_option()
    calibration_images: int = calibration_images_option()


@dataclass(frozen=True)
class Siglip2Options(FamilyOptions):
    """``siglip2:`` options."""

    max_num_patches: int | None = int_option(
        None, f"integer from 1 to {MAX_NUM_PATCHES}: most patches per image for NaFlex checkpoints (default: the "
        "checkpoint's image processor, 256 for the released ones; the fixed-resolution ones refuse it)",
        maximum=MAX_NUM_PATCHES)


@dataclass(frozen=True)
class DinoOptions(FamilyOptions):
    """``dinov2:`` and ``dinov3:`` options."""

    pool: str = choice_option(
        "cls", DINO_POOLS,
        "cls|mean|cls+mean: the image vector: the CLS token (default; transformers' pooler_output), the mean of "
        "the patch tokens (registers left out), or both concatenated (DINOv2's linear-probe protocol: twice the "
        "width)")


__all__ = ["DEFAULT_FAMILY_MAX_BATCH", "DINO_POOLS", "FAMILY_RUNTIMES", "MAX_NUM_PATCHES", "DinoOptions", "FamilyOptions",
           "Siglip2Options"]
