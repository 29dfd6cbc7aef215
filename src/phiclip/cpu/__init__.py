"""CPU speed for the image side: which precision, which kernels, which runtime, decided and applied by one call.

Encoders call :func:`accelerate` once with their model, and run the :class:`AcceleratedPath` it returns.
The modules behind it:

* :mod:`phiclip.cpu.precision`: the measured precision decision (``precision=auto``: bfloat16 where it
  measured faster than float32 here), the error bound of each precision, and the measurement cache;
* :mod:`phiclip.cpu.int8`: ``precision=int8`` in torch (int8 weights per output channel, activations
  quantised per call) and the int8 kernel measured fastest here;
* :mod:`phiclip.cpu.fused`: the CLIP vision tower in bfloat16 on oneDNN's prepacked, fused products;
* :mod:`phiclip.cpu.runtimes`: OpenVINO and ONNX Runtime for the image side (``runtime=``), compiled
  once and cached;
* :mod:`phiclip.cpu.calibration`: the images static int8 is calibrated on (``calibration=``);
* :mod:`phiclip.cpu.threads`: torch threads sized from the cores other processes leave free;
* :mod:`phiclip.cpu.sigstack`: the thread's signal alternate stack kept across OpenVINO's compiles
  (its CPU plugin could leave it unmapped, and the next signal killed the process).

Nothing here imports phiclip's encoders or pipeline: callers pass what the decisions need. Importing
this package does not import torch.
"""

from __future__ import annotations

from phiclip.cpu.acceleration import AcceleratedPath, accelerate

__all__ = ["AcceleratedPath", "accelerate"]
