"""Compare encoders on the same images: cost, quality and the structure of their spaces.

``phiclip.compare(models, data, output)`` (the same as ``phiclip.compare.compare``, and
``phiclip compare`` on the command line) returns a :class:`CompareReport` and writes
``report.json`` and a self-contained ``report.html``. The pieces:

- :mod:`~phiclip.compare.structure`: k-NN overlap, linear CKA, similarity histograms, 2-D PCA (pure numpy);
- :mod:`~phiclip.compare.measure`: load one encoder and measure its cost (optionally in a subprocess);
- :mod:`~phiclip.compare.runner`: the whole comparison;
- :mod:`~phiclip.compare.results`: the report as dataclasses;
- :mod:`~phiclip.compare.report`: the JSON, HTML and terminal renderers.

Importing this package is light (numpy only); torch and transformers load when an encoder does.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from phiclip.compare.measure import CompareError
from phiclip.compare.results import CompareReport, load_report
from phiclip.compare.runner import compare

__all__ = ["CompareError", "CompareReport", "compare", "load_report"]


class _CallablePackage(types.ModuleType):
    """Once this package is imported, ``phiclip.compare`` names the package rather than the
    function (the import system sets the attribute), so the package itself forwards calls to
    :func:`compare`: ``phiclip.compare([...], data, out)`` works either way."""

    def __call__(self, *args: Any, **kwargs: Any) -> CompareReport:
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
