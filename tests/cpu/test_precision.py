"""phiclip.cpu.precision: the measured CPU precision choice, its cache, and every precision's output
within its stated bound of float32 on tiny models (CLIP, SigLIP, Phi-3-vision)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import phiclip.cpu.precision as P
from phiclip import load_encoder
from phiclip.cache import CACHE_ENV, LEGACY_CACHE_ENV
from phiclip.pipeline.step import encode_images
from phiclip.schema import MANIFEST_FILE
from phiclip.testing import make_sample_images


@pytest.fixture()
def measured_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """auto decides by measurement (the suite fixes it to float32) into an empty cache folder."""
    monkeypatch.delenv(P.AUTO_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    P.clear_memo()
    yield tmp_path / "cache"
    P.clear_memo()


def _fake_rates(monkeypatch: pytest.MonkeyPatch, bf16: float, fp16: float = 1.0) -> None:
    info = {"speedups": {"float32": 1.0, "bfloat16": bf16, "float16": fp16}, "cpu": "Test CPU", "rates": {}}
    monkeypatch.setattr(P, "cpu_matmul_rates", lambda refresh=False: info)


# --- where the cache lives -----------------------------------------------------------------------------
def test_the_measurements_are_kept_in_the_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """cpu-precision.json in phiclip's one cache root: $PHICLIP_CACHE, the deprecated $PHICLIP_CACHE_DIR,
    $XDG_CACHE_HOME/phiclip, ~/.cache/phiclip."""
    cases = [(CACHE_ENV, "mine", "mine"), (LEGACY_CACHE_ENV, "old", "old"), ("XDG_CACHE_HOME", "xdg", "xdg/phiclip"),
             ("HOME", "home", "home/.cache/phiclip")]
    for env, value, root in cases:
        for other in (CACHE_ENV, LEGACY_CACHE_ENV, "XDG_CACHE_HOME"):
            monkeypatch.delenv(other, raising=False)
        monkeypatch.setenv(env, str(tmp_path / value))
        P.write_cache_entry(env, {"rates": {}})
        assert json.loads((tmp_path / root / P.CACHE_FILE).read_text()) == {env: {"rates": {}}}
        assert P.read_cache() == {env: {"rates": {}}}
        assert [f.name for f in (tmp_path / root).iterdir()] == [P.CACHE_FILE]  # written whole: no temporary file left


def test_cpu_identity_names_model_flags_and_torch() -> None:
    import torch

    key = P.cpu_key()
    assert P.cpu_name() in key and f"torch {torch.__version__}" in key
    assert all(f in P.ISA_FLAGS for f in P.cpu_isa_flags())


# --- the measurement and its cache ---------------------------------------------------------------------
def test_measure_matmul_rates_small_shapes() -> None:
    rates = P.measure_matmul_rates(shapes=((64, 32, 48),), rounds=1)
    assert set(rates) == {"float32", "bfloat16", "float16"}
    assert rates["float32"] > 0 and all(v >= 0 for v in rates.values())


def test_measured_once_then_read_from_the_cache(measured_here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_measure(*a, **k):
        calls.append(1)
        return {"float32": 100.0, "bfloat16": 250.0, "float16": 90.0}

    monkeypatch.setattr(P, "measure_matmul_rates", fake_measure)
    first = P.cpu_matmul_rates()
    assert first["source"] == "measured" and first["speedups"]["bfloat16"] == 2.5 and calls == [1]
    stored = json.loads((measured_here / P.CACHE_FILE).read_text())
    assert P.cpu_key() in stored and stored[P.cpu_key()]["rates"]["bfloat16"] == 250.0
    P.clear_memo()  # a new process: read from the file, not measured again
    again = P.cpu_matmul_rates()
    assert again["source"] == "cache" and again["speedups"] == first["speedups"] and calls == [1]
    P.cpu_matmul_rates(refresh=True)
    assert calls == [1, 1]


def test_unwritable_cache_still_decides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "sub"))
    monkeypatch.delenv(P.AUTO_ENV, raising=False)
    monkeypatch.setattr(P, "measure_matmul_rates", lambda *a, **k: {"float32": 1.0, "bfloat16": 0.5, "float16": 1.0})
    P.clear_memo()
    try:
        assert P.decide_cpu_precision("auto").dtype == "float32"
    finally:
        P.clear_memo()


# --- the decision -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bf16, chosen", [(4.6, "bfloat16"), (2.2, "bfloat16"), (1.1, "float32"), (0.51, "float32")])
def test_auto_takes_bfloat16_only_when_measured_faster(monkeypatch, measured_here, bf16, chosen) -> None:
    _fake_rates(monkeypatch, bf16)
    d = P.decide_cpu_precision("auto")
    assert d.dtype == chosen and f"{bf16:.2f}x" in d.reason
    assert P.ERROR_BOUNDS["bfloat16"].min_cosine >= P.AUTO_MIN_COSINE  # auto's bound holds for what it may pick
    assert P.decide_cpu_precision("float32").dtype == "float32"  # float32 stays exact, never measured away


def test_auto_never_picks_float16_or_int8(monkeypatch, measured_here) -> None:
    _fake_rates(monkeypatch, bf16=0.5, fp16=3.0)
    assert P.decide_cpu_precision("auto").dtype == "float32"


def test_explicit_requests_are_kept_and_env_fixes_auto(monkeypatch, measured_here) -> None:
    _fake_rates(monkeypatch, bf16=0.5)
    assert P.decide_cpu_precision("bfloat16").dtype == "bfloat16"
    assert P.decide_cpu_precision("int8").dtype == "int8"
    monkeypatch.setenv(P.AUTO_ENV, "bfloat16")
    assert P.decide_cpu_precision("auto").dtype == "bfloat16"
    monkeypatch.setenv(P.AUTO_ENV, "int4")
    with pytest.raises(ValueError, match="PHICLIP_CPU_PRECISION"):
        P.decide_cpu_precision("auto")
    with pytest.raises(ValueError, match="not one of"):
        P.decide_cpu_precision("float8")


def test_resolve_device_dtype_follows_the_measurement(monkeypatch, measured_here) -> None:
    import torch

    from phiclip.encoders.device import resolve_device_dtype

    _fake_rates(monkeypatch, bf16=3.0)
    assert resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.bfloat16)
    _fake_rates(monkeypatch, bf16=0.5)
    assert resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "int8")[1] == torch.int8
    with pytest.raises(ValueError, match="CPU only"):
        resolve_device_dtype("cuda", "int8")


def test_error_bound_check_fails_outside() -> None:
    ref = np.eye(3, 8)
    assert P.ERROR_BOUNDS["float32"].check(ref, ref)["min_cosine"] == pytest.approx(1.0)
    off = ref.copy()
    off[0, 1] = 0.5  # cosine 0.894
    with pytest.raises(AssertionError, match="outside the bound"):
        P.ERROR_BOUNDS["bfloat16"].check(ref, off)


# --- every precision within its bound of float32, on tiny models ----------------------------------------
@pytest.mark.filterwarnings("ignore:.*measured at")
@pytest.mark.parametrize("kind", ["clip", "siglip", "phi3v"])
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_16_bit_within_its_bound(kind, precision, precision_checkpoints, precision_images) -> None:
    spec = f"{kind}:{precision_checkpoints[kind]}" + ("?num_crops=1" if kind == "phi3v" else "")
    ref = encode_images(load_encoder(spec, device="cpu", dtype="float32"), precision_images)
    enc = load_encoder(spec, device="cpu", dtype=precision)
    P.ERROR_BOUNDS[precision].check(ref, encode_images(enc, precision_images))
    assert enc.describe()["precision"]["dtype"] == precision
    assert enc.describe()["dtype"] == precision


def test_auto_records_its_decision_in_describe_and_manifest(monkeypatch, measured_here, precision_checkpoints, tmp_path) -> None:
    from phiclip import embed

    _fake_rates(monkeypatch, bf16=3.0)
    enc = load_encoder(f"clip:{precision_checkpoints['clip']}", device="cpu")
    rec = enc.describe()["precision"]
    assert rec["requested"] == "auto" and rec["dtype"] == "bfloat16" and "3.00x" in rec["reason"]
    assert enc.describe()["dtype"] == "bfloat16"
    folder = tmp_path / "in"
    make_sample_images(folder, per_class=1)
    embed(f"clip:{precision_checkpoints['clip']}", folder, tmp_path / "out", device="cpu", progress=False)
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["encoder"]["precision"]["dtype"] == "bfloat16"
    assert manifest["settings"]["precision"] == "bfloat16"


def test_a_measurement_taken_under_load_is_measured_again(measured_here: Path, monkeypatch: pytest.MonkeyPatch,
                                                             fixed_busy) -> None:
    calls = []

    def fake_measure(*a, **k):
        calls.append(1)
        return {"float32": 100.0, "bfloat16": 90.0 if len(calls) == 1 else 250.0, "float16": 90.0}

    monkeypatch.setattr(P, "measure_matmul_rates", fake_measure)
    monkeypatch.setattr(P, "OthersBusy", fixed_busy(1.4))  # another process kept 1.4 cores busy meanwhile
    busy = P.cpu_matmul_rates()
    assert busy["others_busy_cores"] == 1.4 and not P.measured_under_load(busy)  # just checked: kept for a while
    P.clear_memo()
    assert P.cpu_matmul_rates()["source"] == "cache" and len(calls) == 1
    P.clear_memo()
    monkeypatch.setattr(P, "BUSY_REMEASURE_AFTER_S", 0)  # ... and measured again once that while is over
    assert P.measured_under_load(busy)
    monkeypatch.setattr(P, "OthersBusy", fixed_busy(0.1))
    quiet = P.cpu_matmul_rates()  # the next process measures again, now quietly
    assert quiet["source"] == "measured" and quiet["speedups"]["bfloat16"] == 2.5 and len(calls) == 2
    P.clear_memo()
    assert P.cpu_matmul_rates()["source"] == "cache" and len(calls) == 2  # a quiet measurement is kept


def test_others_busy_reads_proc_stat_over_a_long_enough_block() -> None:
    import time

    from phiclip.cpu.threads import MIN_WINDOW, OthersBusy

    with OthersBusy() as short:
        pass
    assert short.cores is None  # too short to tell
    with OthersBusy() as busy:
        time.sleep(MIN_WINDOW + 0.05)
    assert busy.cores is None or busy.cores >= 0.0


def test_an_entry_that_does_not_say_how_busy_the_machine_was_is_measured_again() -> None:
    assert P.measured_under_load({"rates": {}})  # written before the load was recorded
    assert not P.measured_under_load({"rates": {}, "others_busy_cores": None})  # the load could not be read
    assert not P.measured_under_load({"rates": {}, "others_busy_cores": 0.2})
    assert P.measured_under_load({"rates": {}, "others_busy_cores": P.BUSY_REMEASURE_CORES})
    import time

    assert not P.measured_under_load({"rates": {}, "others_busy_cores": 1.0, "checked_at": time.time()})


def test_a_busier_measurement_does_not_replace_a_quieter_one() -> None:
    old = {"rates": {"float32": 100.0}, "others_busy_cores": 0.6}
    busier = {"rates": {"float32": 20.0}, "others_busy_cores": 1.5}
    quieter = {"rates": {"float32": 110.0}, "others_busy_cores": 0.1}
    assert P.keep_quieter(old, busier)["rates"] == old["rates"]
    assert P.keep_quieter(old, quieter)["rates"] == quieter["rates"]
    assert P.keep_quieter({"rates": {}}, busier)["rates"] == busier["rates"]  # the old one did not say
    assert P.keep_quieter(None, busier)["checked_at"] > 0
