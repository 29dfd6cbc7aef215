"""phiclip.hub: the one local-or-hub rule, and a hub that cannot be reached failing fast (not after
half a minute of retries) or serving the cache."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from phiclip import hub
from phiclip.hub import CheckpointError, resolve_file, resolve_location
from phiclip.testing import build_tiny_clip, build_tiny_phi3v

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory with a folder ``models/clip`` and a file ``weights.bin``."""
    (tmp_path / "models" / "clip").mkdir(parents=True)
    (tmp_path / "weights.bin").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "text, hub_id",
    [
        ("org/name", "org/name"),
        ("name", "name"),
        ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
        (" org/name ", "org/name"),
    ],
)
def test_hub_ids(workdir: Path, text: str, hub_id: str) -> None:
    loc = resolve_location(text)
    assert loc.hub_id == hub_id and loc.path is None and not loc.is_local


@pytest.mark.parametrize("text", ["models/clip", "./models/clip", "<absolute>", "."])
def test_existing_directories_are_local(workdir: Path, text: str) -> None:
    text = str(workdir / "models" / "clip") if text == "<absolute>" else text
    loc = resolve_location(text)
    assert loc.is_local and loc.path is not None and loc.path.resolve() == (workdir / text).resolve()


@pytest.mark.parametrize("text", ["./missing", "../missing", "/no/such/dir", "~/no-such-phiclip-dir", "a/b/c",
                                  "C:\\models\\clip", "..\\x"])
def test_texts_that_can_only_be_paths(workdir: Path, text: str) -> None:
    with pytest.raises(CheckpointError, match="is not a directory") as err:
        resolve_location(text)
    assert "no such directory" in str(err.value) and "hub id" in str(err.value) and repr(text) in str(err.value)


def test_a_file_is_not_a_checkpoint(workdir: Path) -> None:
    with pytest.raises(CheckpointError, match="is a file") as err:
        resolve_location("weights.bin")
    assert "hub id" in str(err.value)
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_location(workdir / "org")  # a Path is a path, never a hub id


def test_a_local_directory_is_used_even_when_it_looks_like_a_hub_id(workdir: Path) -> None:
    (workdir / "models" / "clip" / "config.json").write_text("{}")
    assert resolve_file("models/clip", "config.json") == Path("models/clip/config.json")
    with pytest.raises(CheckpointError, match="has no preprocessor_config.json"):
        resolve_file("models/clip", "preprocessor_config.json")
    assert resolve_file("models/clip", "preprocessor_config.json", required=False) is None


# --- a hub that cannot be reached ----------------------------------------------------------------



def _cache(ckpt: Path, cache: Path, repo: str) -> None:
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(ckpt, root / "snapshots" / COMMIT)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


def test_unreachable_hub_is_said_at_once(unreachable: Path) -> None:
    import huggingface_hub.file_download  # noqa: F401 - imported before the clock starts
    import torch  # noqa: F401

    from phiclip.encoders import load_encoder

    for spec in ("clip:org/absent", "phi3v:org/absent"):
        t = time.perf_counter()
        with pytest.raises(CheckpointError) as err:
            load_encoder(spec, device="cpu", dtype="float32")
        assert time.perf_counter() - t < 5  # huggingface_hub alone retries for ~25 s first
        msg = str(err.value)
        assert spec in msg and "unreachable" in msg and "127.0.0.1:9" in msg and "not in the local cache" in msg
        assert "give a local directory" in msg and "hub id" in msg


def test_unreachable_hub_serves_the_cache(unreachable: Path, tmp_path: Path) -> None:
    from phiclip.encoders import load_encoder

    _cache(build_tiny_clip(tmp_path / "clip"), unreachable, "org/tinyclip")
    _cache(build_tiny_phi3v(tmp_path / "phi3v", num_crops=4), unreachable, "org/tinyphi3v")
    t = time.perf_counter()
    clip = load_encoder("clip:org/tinyclip", device="cpu", dtype="float32")
    phi3v = load_encoder("phi3v:org/tinyphi3v", device="cpu", dtype="float32")
    assert time.perf_counter() - t < 20
    assert clip.dim == 16 and phi3v.processor.num_crops == 4
    assert hub.hub_unreachable_reason() == "cannot connect to 127.0.0.1:9 (Connection refused)"


def test_one_connection_attempt_per_minute(unreachable: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = socket.create_connection

    def counting(*args: object, **kwargs: object) -> socket.socket:
        calls.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "create_connection", counting)
    for _ in range(3):
        assert hub.hub_unreachable_reason() is not None
    assert calls == [(("127.0.0.1", 9),)]
    assert hub.hub_unreachable_reason(refresh=True) is not None and len(calls) == 2


def test_offline_setting_and_proxies_make_no_connection(unreachable: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("no connection attempt expected")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub read its environment
    assert hub.hub_unreachable_reason() == "HF_HUB_OFFLINE is set"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the proxy decides: huggingface_hub asks it
    assert hub.hub_unreachable_reason() is None
