"""URL and WebDataset records through the Ray engine (reading and fetching inside Ray tasks): the same
output as the local engine. Ray's workers get this checkout's ``src`` on their path (new modules)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from inputs._http import FaultServer
from inputs._shards import write_shard

import phiclip
from phiclip.fetch import FetchOptions
from phiclip.pipeline import embed

from ._helpers import MeanColourEncoder

ray = pytest.importorskip("ray", reason="Ray is not installed (phiclip[ray]; .ci/run installs it)")
TESTS = Path(__file__).resolve().parents[1]
SRC = Path(phiclip.__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": f"{SRC}:{TESTS}", "HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


def _frame(out: Path, folder: str) -> pd.DataFrame:
    files = sorted((out / folder).glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame(columns=["id"])


def test_urls_and_shards_through_ray(tmp_path: Path) -> None:
    server = FaultServer()
    try:
        write_shard(tmp_path / "s" / "000.tar", ["a", "b", "c"], damaged={"b"})
        lst = tmp_path / "urls.txt"
        lst.write_text("\n".join(server.url(p) for p in ["/img/x.jpg", "/missing.jpg", "/img/y.jpg", "/page.jpg"]))
        server.files["/shard/000.tar"] = tmp_path / "s" / "000.tar"  # the same shard by URL
        fetch = FetchOptions(retries=0, trust_env=False, read_timeout=2)
        for name, src in (("urls", lst), ("shards", str(tmp_path / "s" / "000.tar")),
                          ("shard-urls", server.url("/shard/000.tar"))):
            settings = dict(shard_size=2, batch_size=2, num_workers=0, progress=False, fetch=fetch, dtype="float32")
            embed(MeanColourEncoder(), src, tmp_path / f"{name}-local", **settings)
            res = embed(MeanColourEncoder(), src, tmp_path / f"{name}-ray", engine="ray", **settings)
            assert res.status == "completed"
            for folder in ("embeddings", "errors"):
                got, ref = _frame(tmp_path / f"{name}-ray", folder), _frame(tmp_path / f"{name}-local", folder)
                pd.testing.assert_frame_equal(got.drop(columns=["embedding"], errors="ignore"),
                                              ref.drop(columns=["embedding"], errors="ignore"))
        assert server.hits["/img/x.jpg"] == 2  # once per engine
        assert server.hits["/shard/000.tar"] == 2  # downloaded once per run, read by the Ray tasks from there
    finally:
        server.close()
