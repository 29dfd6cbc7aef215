"""Suite-wide settings: a wide terminal for CLI output (rich wraps at the terminal width, and the
tests read messages that contain long temporary paths)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _cpu_precision(tmp_path_factory: pytest.TempPathFactory):
    """Exact float32 for ``precision=auto`` on the CPU, whatever this CPU's bfloat16 measures (the
    suite compares against float32 references), torch for a spec's default runtime (``auto`` would
    measure and compile OpenVINO / ONNX Runtime models for every tiny encoder a test loads; the tests
    of ``auto`` itself, marked ``compiled_runtime``, unset it), and measurements cached in a temporary
    folder, never in the user's cache. Session-wide, so that module-scoped encoders see it too;
    tests/cpu/test_precision.py unsets the precision where it tests the measured choice."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHICLIP_CPU_PRECISION", "float32")
        mp.setenv("PHICLIP_RUNTIME", "torch")
        mp.setenv("PHICLIP_CACHE_DIR", str(tmp_path_factory.mktemp("phiclip-cache")))
        yield


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


@pytest.fixture
def unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Online mode (HF_HUB_OFFLINE unset) with a hub endpoint nothing listens on; returns the cache."""
    from huggingface_hub import constants

    from phiclip import hub

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in hub._PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setattr(hub, "_probes", {})
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


class OffMachine(AssertionError):
    """A test tried to resolve or connect beyond this machine (see :func:`loopback_only`)."""


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A tripwire for the tests of the address guard: while it is on, resolving any name but ``localhost``
    (or a loopback literal) and connecting a socket to any address that is not loopback raise
    :class:`OffMachine` instead of sending a packet, and are listed in the returned list (which the
    test checks is empty). So a test whose guard had a bug fails here, and no traffic leaves the machine."""
    import ipaddress
    import socket

    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def loopback(host: object) -> bool:
        if host in ("localhost", "localhost.localdomain"):
            return True
        try:
            ip = ipaddress.ip_address(str(host).split("%", 1)[0].strip("[]"))
            return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback
        except ValueError:
            pass
        try:  # the numeric forms the C library reads without asking DNS (2130706433, 0x7f.1)
            return ipaddress.ip_address(socket.inet_aton(str(host))).is_loopback
        except OSError:
            return False

    def getaddrinfo(host: object, *args: object, **kw: object) -> object:
        if host is not None and not loopback(host.decode() if isinstance(host, bytes) else host):
            attempts.append(f"resolve {host!r}")
            raise OffMachine(f"a test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kw)

    def checked(address: object) -> None:
        if isinstance(address, tuple) and not loopback(address[0]):
            attempts.append(f"connect {address!r}")
            raise OffMachine(f"a test tried to connect to {address!r}")

    def connect(self: socket.socket, address: object) -> None:
        checked(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        checked(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return attempts


# --- shared by tests/cpu/test_precision.py and tests/cpu/test_int8.py ------------------------------------------
@pytest.fixture(scope="module")
def precision_images(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Eight labelled sample images (PIL, RGB)."""
    from PIL import Image

    from phiclip.testing import make_sample_images

    recs = make_sample_images(tmp_path_factory.mktemp("imgs"), per_class=1)
    return [Image.open(r["path"]).convert("RGB") for r in recs[:8]]


@pytest.fixture(scope="module")
def precision_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny CLIP, SigLIP and Phi-3-vision checkpoints, by kind."""
    from phiclip.testing import build_tiny_clip, build_tiny_phi3v, build_tiny_siglip

    root = tmp_path_factory.mktemp("ckpts")
    return {"clip": build_tiny_clip(root / "clip"), "siglip": build_tiny_siglip(root / "siglip"),
            "phi3v": build_tiny_phi3v(root / "phi3v")}


class _FixedBusy:
    """Stands for phiclip.cpu.threads.OthersBusy with a fixed reading of the cores others kept busy."""

    def __init__(self, cores: float | None) -> None:
        self._cores = cores

    def __call__(self) -> _FixedBusy:
        return self

    def __enter__(self) -> _FixedBusy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cores = self._cores


@pytest.fixture
def fixed_busy() -> type:
    """``fixed_busy(cores)``: an ``OthersBusy`` stand-in to monkeypatch into phiclip.cpu.precision / phiclip.cpu.int8."""
    return _FixedBusy


@pytest.fixture
def colour_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `clip:...` specs load the test-only ColourEncoder (tests/_embdir.py) through the real
    load_encoder (tests/test_cli_search.py, tests/security/test_outputs.py)."""
    from _embdir import ColourEncoder

    from phiclip import encoders

    monkeypatch.setitem(encoders.KINDS, "clip", encoders.KINDS["clip"].with_builder(lambda spec, *_: ColourEncoder(str(spec))))
