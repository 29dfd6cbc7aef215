"""The command line's own behaviour: version, help layout, messages for common slips."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from phiclip import __version__
from phiclip.cli import app

runner = CliRunner()


def test_version_option_and_command() -> None:
    for args in (["--version"], ["version"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert __version__ in r.output


def test_unquoted_glob_suggests_quoting() -> None:
    # What a shell hands over for `-i imgs/*.jpg`: the first file, then the rest as extra arguments.
    r = runner.invoke(app, ["embed", "-m", "clip:x", "-i", "imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg", "-o", "out"])
    assert r.exit_code == 2
    assert "unexpected extra argument" in r.output
    assert "quote it" in r.output and "'imgs/**/*.jpg'" in r.output


def test_other_usage_errors_carry_no_glob_hint() -> None:
    r = runner.invoke(app, ["embed", "-m", "clip:x", "-o", "out"])  # --input missing
    assert r.exit_code == 2
    assert "quote it" not in r.output


def test_help_is_readable_at_80_columns() -> None:
    r = runner.invoke(app, ["embed", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    # Help texts get most of the width: no line of the --input help is squeezed into a narrow column.
    text = " ".join(line.strip() for line in lines)
    assert "a .txt list of paths" in re.sub(r"\s+", " ", text)


def test_embed_text_batch_size_help_speaks_of_texts() -> None:
    r = runner.invoke(app, ["embed-text", "--help"], terminal_width=100)
    assert r.exit_code == 0
    block = r.output[r.output.index("--batch-size"):].split("\n  -")[0]
    assert "Texts" in block and "image" not in block.lower()
