"""``phiclip serve``: a search page and an embeddings API over outputs (:func:`phiclip.serve.app.run_server`).
Defaults come from :class:`phiclip.serve.options.ServeOptions` (importing it loads no web stack)."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Annotated

import typer

from phiclip.cli.common import (
    AllowOtherWeightsOpt,
    FetchRetriesOpt,
    FetchTimeoutOpt,
    ModelOverrideOpt,
    QueryDeviceOpt,
    QueryPrecision,
    QueryPrecisionOpt,
    fail_cli,
    say,
)
from phiclip.serve.listener import PortInUseError
from phiclip.serve.options import ServeOptions

_DEFAULTS = ServeOptions()
#: Exit code of ``phiclip serve`` when the port is taken (as for a bad command-line option).
EXIT_PORT_IN_USE = 2


class Engine(str, enum.Enum):
    local = "local"
    ray = "ray"


def serve(
    emb_dirs: Annotated[list[Path], typer.Argument(help="Output folders of `phiclip embed` (each becomes a collection).")],
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default; others need --token).")]
    = _DEFAULTS.host,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to bind.")] = _DEFAULTS.port,
    token: Annotated[str | None, typer.Option("--token", envvar="PHICLIP_TOKEN", help=(
        "Require 'Authorization: Bearer TOKEN' on every route but /healthz (the page: open /?token=TOKEN once)."))]
    = _DEFAULTS.token,
    device: QueryDeviceOpt = _DEFAULTS.device,
    precision: QueryPrecisionOpt = QueryPrecision(_DEFAULTS.precision),
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most inputs per encoder call.")]
    = _DEFAULTS.max_batch,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0, help=(
        "How long a request may wait for others to join its batch."))] = _DEFAULTS.batch_wait_ms,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Most inputs waiting; beyond: 503.")]
    = _DEFAULTS.max_queue,
    timeout: Annotated[float, typer.Option("--timeout", min=0.001, help=(
        "Seconds from a request's arrival to its answer: decoding, fetching and the encoder (503 after)."))]
    = _DEFAULTS.timeout_s,
    max_in_flight: Annotated[int, typer.Option("--max-in-flight", min=1, help=(
        "Most /api and /v1 requests answered at once; beyond: 503 + Retry-After at once."))] = _DEFAULTS.max_in_flight,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest uploaded image (413 beyond).")]
    = _DEFAULTS.max_upload_bytes / 2**20,
    max_inputs: Annotated[int, typer.Option("--max-inputs", min=1, help=(
        "Most inputs in one /v1/embeddings request (413 beyond)."))] = _DEFAULTS.max_inputs,
    allowed_host: Annotated[list[str] | None, typer.Option("--allowed-host", help=(
        "A Host name to accept besides loopback ones (e.g. a reverse proxy's); repeatable."))] = None,
    root_path: Annotated[str, typer.Option("--root-path", help="Path prefix behind a reverse proxy, e.g. /phiclip.")]
    = _DEFAULTS.root_path,
    allow_incomplete: Annotated[bool, typer.Option("--allow-incomplete", help=(
        "Serve outputs of unfinished `phiclip embed` runs instead of refusing them."))] = _DEFAULTS.allow_incomplete,
    model: ModelOverrideOpt = _DEFAULTS.model,
    allow_other_weights: AllowOtherWeightsOpt = _DEFAULTS.allow_other_weights,
    metrics_open: Annotated[bool, typer.Option("--metrics-open/--metrics-auth", help=(
        "GET /metrics open like /healthz, or behind --token like every other route (the default)."))]
    = _DEFAULTS.metrics_open,
    drain_seconds: Annotated[float, typer.Option("--drain-seconds", min=0, help=(
        "On SIGTERM: seconds requests in flight get to finish before the server exits (0)."))] = _DEFAULTS.drain_s,
    engine: Annotated[Engine, typer.Option("--engine", help=(
        "local: the encoders run in this process; ray: on Ray Serve replicas (pip install 'phiclip[ray]')."))]
    = Engine(_DEFAULTS.engine),
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="--engine ray: model copies (replicas) per encoder.")]
    = _DEFAULTS.replicas,
    min_replicas: Annotated[int | None, typer.Option("--min-replicas", min=1, help=(
        "--engine ray: autoscale between --min-replicas and --max-replicas (by requests in flight)."))] = None,
    max_replicas: Annotated[int | None, typer.Option("--max-replicas", min=1, help="--engine ray: see --min-replicas.")]
    = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help=(
        "--engine ray: the cluster to join (default: a running local Ray, else a new local one)."))] = None,
    gpus_per_replica: Annotated[float | None, typer.Option("--gpus-per-replica", min=0, help=(
        "--engine ray: GPUs per replica (default: 1 where the cluster has GPUs and --device is not cpu)."))] = None,
    cpus_per_replica: Annotated[float, typer.Option("--cpus-per-replica", min=0.01, help=(
        "--engine ray: CPUs Ray reserves per replica."))] = _DEFAULTS.cpus_per_replica,
    allow_private_urls: Annotated[bool, typer.Option("--allow-private-urls", help=(
        "Fetch images by URL from private, loopback and link-local addresses too (default: public addresses "
        "only, checked after DNS and on every redirect: server-side request forgery)."))] = _DEFAULTS.allow_private_urls,
    fetch_timeout: FetchTimeoutOpt = _DEFAULTS.fetch_timeout_s,
    fetch_retries: FetchRetriesOpt = _DEFAULTS.fetch_retries,
) -> None:
    """Serve a search page and an embeddings API (OpenAI-style /v1/embeddings) over EMB_DIRS."""
    options = dataclasses.replace(
        _DEFAULTS, host=host, port=port, token=token, device=device, precision=precision.value, max_batch=max_batch,
        batch_wait_ms=batch_wait_ms, max_queue=max_queue, timeout_s=timeout, max_in_flight=max_in_flight,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_inputs=max_inputs, allowed_hosts=tuple(allowed_host or ()), root_path=root_path,
        allow_incomplete=allow_incomplete, model=model, allow_other_weights=allow_other_weights,
        metrics_open=metrics_open, drain_s=drain_seconds, engine=engine.value, replicas=replicas,
        min_replicas=min_replicas, max_replicas=max_replicas, ray_address=ray_address,
        gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, allow_private_urls=allow_private_urls,
        fetch_timeout_s=fetch_timeout, fetch_retries=fetch_retries,
    )
    try:
        # lazy: optional dependency (starlette, uvicorn: phiclip[serve])
        from phiclip.serve.app import run_server

        run_server(emb_dirs, options, say=say)
    except PortInUseError as e:
        fail_cli(e, code=EXIT_PORT_IN_USE)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        fail_cli(e)
