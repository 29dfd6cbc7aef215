"""The Ray engine (``--engine ray``) on a local Ray instance started here (``ray.init(num_cpus=2)``):
the same output as the local engine, bad files in the errors table, exactly once when an actor or the
driver is killed, and outputs that either engine resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from phiclip import schema
from phiclip.cli import app
from phiclip.manifest import read_manifest
from phiclip.pipeline import embed
from phiclip.pipeline.sources import record_id

from ._helpers import BOMB_LIMIT, DiesOnceEncoder, MeanColourEncoder

ray = pytest.importorskip("ray", reason="Ray is not installed (phiclip[ray]; .ci/run installs it)")
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance for the module; its workers can import the test encoders."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(TESTS), "HF_HUB_OFFLINE": "1"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _frames(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    def read(folder: str) -> pd.DataFrame:
        files = sorted((out / folder).glob("part-*.parquet"))
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame(columns=["id"])

    return read(schema.EMBEDDINGS_DIR), read(schema.ERRORS_DIR)


def _same_output(out: Path, ref: Path) -> None:
    """Same ids in the same shards and order, vectors to 1e-5, the same error rows."""
    emb, err = _frames(out)
    ref_emb, ref_err = _frames(ref)
    pd.testing.assert_frame_equal(emb.drop(columns=["embedding"]), ref_emb.drop(columns=["embedding"]))
    np.testing.assert_allclose(np.stack(emb.embedding).astype(np.float32), np.stack(ref_emb.embedding).astype(np.float32),
                               atol=1e-5)
    pd.testing.assert_frame_equal(err, ref_err)


def _images(root: Path, n: int) -> list[str]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (5 + i % 3, 6), ((i * 41) % 256, (i * 7) % 256, 200)).save(root / f"{i:03d}.png")
    (root / "zz_empty.jpg").write_bytes(b"")
    return [str(root / f"{i:03d}.png") for i in range(n)] + [str(root / "zz_empty.jpg")]


def _exactly_once(out: Path, paths: list[str]) -> None:
    emb, err = _frames(out)
    ids = list(emb.id) + list(err.id)
    assert len(ids) == len(set(ids)), "an input appears twice"
    assert set(ids) == {record_id(p) for p in paths}
    assert read_manifest(out)["complete"] is True


def test_ray_engine_writes_what_the_local_engine_writes(tmp_path: Path, mixed_folder, tiny_clip_dir: Path,
                                                        ray_instance: str) -> None:
    root, expected = mixed_folder
    common = ["-m", f"clip:{tiny_clip_dir}", "-i", str(root), "--max-pixels", str(BOMB_LIMIT), "--shard-size", "5",
              "-b", "4", "--dtype", "float32", "--no-progress", "--device", "cpu"]
    local = CliRunner().invoke(app, ["embed", *common, "-o", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    res = CliRunner().invoke(app, ["embed", *common, "-o", str(tmp_path / "ray"), "--engine", "ray",
                                   "--ray-address", ray_instance, "--num-actors", "1"])
    assert res.exit_code == 0, res.output
    _same_output(tmp_path / "ray", tmp_path / "local")
    _, err = _frames(tmp_path / "ray")
    bad = {p for p, e in expected.items() if e.outcome == "failed"}
    assert set(err.source) == bad and "stages" in res.output  # every bad file alone in the errors table
    m_local, m_ray = read_manifest(tmp_path / "local"), read_manifest(tmp_path / "ray")
    assert m_ray["encoder"]["weights_fingerprint"] == m_local["encoder"]["weights_fingerprint"]
    assert m_ray["settings"] == m_local["settings"] and m_ray["counts"] == m_local["counts"]


def test_local_then_ray_resume_and_an_actor_killed_mid_run(tmp_path: Path) -> None:
    paths = _images(tmp_path / "in", 30)
    settings = dict(shard_size=4, batch_size=2, num_workers=0, progress=False)
    embed(MeanColourEncoder(), tmp_path / "in", tmp_path / "ref", **settings)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated device failure"):
        embed(MeanColourEncoder(fail_on=6), tmp_path / "in", out, **settings)  # local, stops in shard 2
    marker = tmp_path / "died"
    res = embed(DiesOnceEncoder(str(marker), die_on=3), tmp_path / "in", out, engine="ray", **settings)
    assert marker.exists(), "the actor was not killed"
    assert res.status == "completed" and res.skipped >= 8 and res.skipped + res.processed == len(paths)
    _exactly_once(out, paths)
    _same_output(out, tmp_path / "ref")


_DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from pipeline._helpers import MeanColourEncoder
    from phiclip.pipeline import embed

    class Slow(MeanColourEncoder):
        def encode_batch(self, batch, *, with_tokens=False):
            import time
            time.sleep(0.2)
            return super().encode_batch(batch, with_tokens=with_tokens)

    embed(Slow(), sys.argv[1], sys.argv[2], engine="ray", ray_address=sys.argv[4], shard_size=3, batch_size=3,
          progress=False, flush_seconds=0.5)
""")


def test_a_killed_driver_then_a_rerun_is_exactly_once(tmp_path: Path, ray_instance: str) -> None:
    """The rerun uses the local engine: either engine finishes the other's output (local-then-ray above)."""
    paths = _images(tmp_path / "in", 60)
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path / "in"), str(out), str(TESTS), ray_instance],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(TESTS)})
    try:
        end = time.monotonic() + 120
        while not list((out / schema.EMBEDDINGS_DIR).glob("*.parquet")) and time.monotonic() < end:
            assert driver.poll() is None, driver.communicate()[0]
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done = len(list((out / schema.EMBEDDINGS_DIR).glob("*.parquet")))
    assert 1 <= done < 21 and read_manifest(out)["complete"] is False
    res = embed(MeanColourEncoder(), tmp_path / "in", out, shard_size=3, batch_size=3, progress=False)
    assert res.skipped >= 3 * done and res.skipped + res.processed == len(paths)
    _exactly_once(out, paths)


@pytest.mark.compiled_runtime
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_cpu_side_of_a_compiled_encoder_ships(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: str) -> None:
    """An encoder whose image side a runtime compiled (what runtime=auto, the default, often picks) reaches
    the driver as its CPU side: that copy must pickle and preprocess (it held the compiled model and
    its lock before, and the probe task failed with "cannot pickle '_thread.lock' object")."""
    pytest.importorskip(runtime, reason=f"{runtime} is not installed (phiclip[cpu-runtimes]; .ci/run installs it)")
    from PIL import Image

    from phiclip.cache import CACHE_ENV
    from phiclip.encoders import load_encoder
    from phiclip.pipeline.ray_engine import cpu_side
    from phiclip.testing import build_tiny_clip

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    enc = load_encoder(f"clip:{build_tiny_clip(tmp_path / 'clip', image_size=64)}?runtime={runtime}", device="cpu",
                       dtype="float32")
    assert enc.precision["runtime"]["runtime"] == runtime
    copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(cpu_side(enc)))
    pixels = copy.collate([copy.preprocess(Image.new("RGB", (48, 40), (90, 120, 30)))])
    assert tuple(pixels.shape) == (1, 3, 64, 64)
    assert enc.compiled is not None  # the encoder itself keeps its compiled path
