"""Help texts state the defaults the code uses."""

from __future__ import annotations

import re

from phiclip.cache import CACHE_ENV, cache_dir
from phiclip.cli import app
from phiclip.finetune.adapter import TEACHER_TOKENS_CACHE


def _help(cli, *args: str) -> str:
    res = cli.invoke(app, [*args, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return re.sub(r"\s+", " ", res.output)


def test_cache_dir_helps_name_the_cache_folders(cli, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    adapter = _help(cli, "finetune", "phi3v-adapter")
    assert f"(default: ${CACHE_ENV}/{TEACHER_TOKENS_CACHE}," in adapter and "default: --output" not in adapter
    assert cache_dir(TEACHER_TOKENS_CACHE) == tmp_path / TEACHER_TOKENS_CACHE  # what the help says, spelled by the code
    assert f"(default: ${CACHE_ENV}/embeddings," in _help(cli, "finetune", "probe")


def test_model_override_is_offered_where_an_output_is_read(cli) -> None:
    for command in ("search", "index", "serve"):
        text = _help(cli, command)
        assert "--model" in text and "--allow-other-weights" in text, command
