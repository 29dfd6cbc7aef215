"""One cache root and one variable."""

from __future__ import annotations

import logging

import pytest

from phiclip import cache


def test_cache_root_from_the_one_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("PHICLIP_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("PHICLIP_CACHE_DIR", str(tmp_path / "old"))
    assert cache.cache_root() == tmp_path / "c"
    assert cache.cache_dir("embeddings") == tmp_path / "c" / "embeddings"


def test_legacy_variable_still_read_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("PHICLIP_CACHE", raising=False)
    monkeypatch.setenv("PHICLIP_CACHE_DIR", str(tmp_path / "old"))
    monkeypatch.setattr(cache, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="phiclip.cache"):
        assert cache.cache_root() == tmp_path / "old"
    assert "PHICLIP_CACHE" in caplog.text


def test_default_under_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("PHICLIP_CACHE", raising=False)
    monkeypatch.delenv("PHICLIP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / "phiclip"


@pytest.mark.parametrize("bad", ["", "a/b", "..", "."])
def test_cache_dir_names_are_plain(bad):
    with pytest.raises(ValueError):
        cache.cache_dir(bad)
