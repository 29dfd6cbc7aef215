"""``--model`` on search, index and serve: a checkpoint that moved is given again, checked by its weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _embdir import ColourEncoder, write_embedding_dir

from phiclip import encoders, retrieval, schema
from phiclip.cli import app
from phiclip.hub import resolve_location


class _Encoder(ColourEncoder):
    """The colour encoder with the weights fingerprint of its checkpoint folder (``fp.txt`` there)."""

    def __init__(self, spec: str, fp: str) -> None:
        super().__init__(spec)
        self.fp = fp

    def describe(self):
        return {**super().describe(), "weights_fingerprint": self.fp}


def _build(spec, *_):
    loc = resolve_location(spec.location)  # a missing folder fails as for a real checkpoint
    if not loc.is_local:
        raise ValueError(f"{spec.location!r} is not a local directory and the hub is offline")
    return _Encoder(str(spec), (loc.path / "fp.txt").read_text())


@pytest.fixture
def ckpts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path/ckpts/{same,other}: checkpoints with the recorded weights and with other ones; clip: loads them."""
    monkeypatch.setitem(encoders.KINDS, "clip", encoders.KINDS["clip"].with_builder(_build))
    for name, fp in (("same", "sha256:aaaa"), ("other", "sha256:bbbb")):
        (tmp_path / "ckpts" / name).mkdir(parents=True)
        (tmp_path / "ckpts" / name / "fp.txt").write_text(fp)
    return tmp_path / "ckpts"


def _out(tmp_path: Path, spec: str) -> Path:
    vecs = np.asarray([(1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)], np.float32)
    out = write_embedding_dir(tmp_path / "out", vecs, ids=["red", "green", "blue"], spec=spec)
    mpath = out / schema.MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    manifest["encoder"]["weights_fingerprint"] = "sha256:aaaa"
    mpath.write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("recorded", ["./gone/clip", "gone/clip"])
def test_a_recorded_checkpoint_that_does_not_resolve_names_it_and_suggests_model(tmp_path, ckpts, cli, recorded):
    out = _out(tmp_path, f"clip:{recorded}")
    res = cli.invoke(app, ["search", str(out), "--text", "red"])
    assert res.exit_code == 1, res.output
    assert f"clip:{recorded}" in res.output and "--model clip:NEW_PATH" in res.output
    assert "Traceback" not in res.output
    if recorded.startswith("./"):
        assert str(Path.cwd() / "gone" / "clip") in res.output  # where it was looked for


def test_search_with_model_override_of_the_same_weights(tmp_path, ckpts, cli):
    out = _out(tmp_path, "clip:./gone/clip")
    res = cli.invoke(app, ["search", str(out), "--text", "red", "-k", "1", "--model", f"clip:{ckpts / 'same'}", "--json"])
    assert res.exit_code == 0, res.output
    assert [h["id"] for h in json.loads(res.stdout)] == ["red"]
    hits = retrieval.search(out, text="blue", k=1, model=f"clip:{ckpts / 'same'}")
    assert hits[0].id == "blue"


def test_model_override_with_other_weights_is_refused_unless_allowed(tmp_path, ckpts, cli):
    out = _out(tmp_path, "clip:./gone/clip")
    args = ["search", str(out), "--text", "red", "-k", "1", "--model", f"clip:{ckpts / 'other'}"]
    res = cli.invoke(app, args)
    assert res.exit_code == 1
    assert "sha256:bbbb" in res.output and "sha256:aaaa" in res.output and "--allow-other-weights" in res.output
    res = cli.invoke(app, [*args, "--allow-other-weights"])
    assert res.exit_code == 0, res.output
    assert "red" in res.output


def test_index_with_model_override_records_it(tmp_path, ckpts, cli):
    out = _out(tmp_path, "clip:./gone/clip")
    res = cli.invoke(app, ["index", str(out), "--json", "--model", f"clip:{ckpts / 'same'}"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["encoder_spec"] == f"clip:{ckpts / 'same'}"
    res = cli.invoke(app, ["index", str(out), "--model", f"clip:{ckpts / 'other'}"])
    assert res.exit_code == 1 and "--allow-other-weights" in res.output
    plain = json.loads(cli.invoke(app, ["index", str(out), "--json"]).stdout)
    assert plain["encoder_spec"] == "clip:./gone/clip" and plain["built_now"] is True


def test_serve_collections_take_the_model_override(tmp_path, ckpts):
    from phiclip.serve.collections import load_collections

    out = _out(tmp_path, "clip:./gone/clip")
    with pytest.raises(retrieval.SearchError, match="--model"):
        load_collections([out])
    collections, loaded = load_collections([out], model=f"clip:{ckpts / 'same'}")
    assert collections[0].spec == f"clip:{ckpts / 'same'}" and list(loaded) == [collections[0].spec]
    with pytest.raises(retrieval.SearchError, match="allow-other-weights"):
        load_collections([out], model=f"clip:{ckpts / 'other'}")
    assert load_collections([out], model=f"clip:{ckpts / 'other'}", allow_other_weights=True)[0]
