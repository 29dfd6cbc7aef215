"""Small vector operations every encoder and every consumer of vectors shares.

Importing this module does not import torch: :func:`l2_normalize` takes numpy arrays or torch
tensors and answers in kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, "torch.Tensor")


def _is_tensor(x: object) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def l2_normalize(x: ArrayOrTensor) -> ArrayOrTensor:
    """Rows (the last axis) scaled to unit L2 norm; all-zero rows stay zero.

    A torch tensor gives a tensor of its dtype (``torch.nn.functional.normalize``, on its device);
    anything else gives a float32 numpy array. ``(..., d) -> (..., d)``.
    """
    if _is_tensor(x):
        import torch.nn.functional as F  # delayed on purpose: numpy callers never import torch

        return F.normalize(x, dim=-1)
    arr = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    return arr / np.where(norms > 0, norms, 1.0)


def mean_pool(sequences: Sequence[torch.Tensor]) -> torch.Tensor:
    """One vector per sequence, the mean of its rows: ``[(T_i, D)] -> (n, D)``."""
    import torch  # the sequences are tensors: torch is already imported

    return torch.stack([s.mean(dim=0) for s in sequences])


__all__ = ["l2_normalize", "mean_pool"]
