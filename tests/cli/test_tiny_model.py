"""``phiclip tiny-model``: a checkpoint to try every command offline, usable at once as ``-m KIND:DIR``."""

from __future__ import annotations

from pathlib import Path

from phiclip.cli import app
from phiclip.testing import make_sample_images


def test_tiny_model_then_embed_and_search(cli, tmp_path: Path) -> None:
    res = cli.invoke(app, ["tiny-model", "clip", str(tmp_path / "tiny")])
    assert res.exit_code == 0, res.output
    assert f"-m clip:{tmp_path / 'tiny'}" in res.output
    make_sample_images(tmp_path / "imgs", per_class=1)
    out = tmp_path / "out"
    res = cli.invoke(app, ["embed", "-m", f"clip:{tmp_path / 'tiny'}", "-i", str(tmp_path / "imgs"), "-o", str(out),
                           "--no-progress"])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["search", str(out), "--text", "a red circle", "-k", "2", "--json"])
    assert res.exit_code == 0, res.output


def test_tiny_model_refuses_a_used_folder_and_unknown_kind(cli, tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    res = cli.invoke(app, ["tiny-model", "clip", str(tmp_path / "used")])
    assert res.exit_code == 1 and "not an empty folder" in res.output
    res = cli.invoke(app, ["tiny-model", "bert", str(tmp_path / "b")])
    assert res.exit_code == 1 and "choose one of" in res.output
