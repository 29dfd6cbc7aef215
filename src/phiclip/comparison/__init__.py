"""Compare encoders on the same images: cost, quality and the structure of their spaces.

``phiclip.compare(models, data, output)`` (the same as ``phiclip.comparison.compare``, and
``phiclip compare`` on the command line) returns a :class:`CompareReport` and writes
``report.json`` and a self-contained ``report.html``. The pieces:

- :mod:`~phiclip.comparison.structure`: k-NN overlap, linear CKA, similarity histograms, 2-D PCA (pure numpy);
- :mod:`~phiclip.comparison.measure`: load one encoder and measure its cost (optionally in a subprocess);
- :mod:`~phiclip.comparison.runner`: the whole comparison, in steps, with its :class:`CompareOptions`;
- :mod:`~phiclip.comparison.results`: the report as dataclasses;
- :mod:`~phiclip.comparison.charts`: the SVG charts of the page;
- :mod:`~phiclip.comparison.report`: the page sections, the JSON and the terminal output.

Importing this package is light (numpy only); torch and transformers load when an encoder does.
"""

from __future__ import annotations

from phiclip.comparison.measure import CompareError
from phiclip.comparison.results import CompareReport, load_report
from phiclip.comparison.runner import CompareOptions, compare

__all__ = ["CompareError", "CompareOptions", "CompareReport", "compare", "load_report"]
