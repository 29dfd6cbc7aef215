"""``phiclip serve``: a search page and an embeddings API over embedding outputs.

- :mod:`phiclip.serve.options`: :class:`ServeOptions`, every setting with its default;
- :mod:`phiclip.serve.collections`: the served outputs (index, row fields, item images) and their encoders;
- :mod:`phiclip.serve.batching`: the dynamic batcher, one worker thread per encoder, a bounded queue;
- :mod:`phiclip.serve.thumbnails`: thumbnails of collection items, cached with a bounded size;
- :mod:`phiclip.serve.app`: the Starlette application (routes, limits, token) and :func:`run_server`.

Importing this package loads neither the web stack nor any model.
"""

from __future__ import annotations

from typing import Any

from phiclip.serve.options import ServeOptions

__all__ = ["ServeOptions", "Service", "build_service", "create_app", "run_server"]


def __getattr__(name: str) -> Any:
    if name in ("Service", "build_service", "create_app", "run_server"):
        # lazy: serve.app imports starlette
        from phiclip.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'phiclip.serve' has no attribute {name!r}")
