"""The dynamic batcher alone, with fake encoders: own rows per job, one model thread, a bounded queue."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from phiclip.serve.batching import IMAGE, TEXT, DynamicBatcher, Overloaded


class FakeEncoder:
    """Vectors that identify their input: text -> (len, first char code, 1); image item -> (item, 0, 0).
    Records each call's thread and size and whether two calls ever overlapped."""

    def __init__(self, gate: threading.Event | None = None, fail_on: str | None = None, cost: int = 1) -> None:
        self.gate = gate
        self.fail_on = fail_on
        self.cost = cost
        self.calls: list[tuple[str, int, int]] = []
        self.entered = threading.Event()
        self._active = 0
        self.overlaps = 0
        self._lock = threading.Lock()

    def _enter(self, kind: str, n: int) -> None:
        with self._lock:
            self._active += 1
            self.overlaps += self._active > 1
            self.calls.append((kind, n, threading.get_ident()))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1

    def item_cost(self, item: Any) -> int:
        return self.cost

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        self._enter(TEXT, len(texts))
        try:
            if self.fail_on is not None and self.fail_on in texts:
                raise ValueError(f"cannot encode {self.fail_on!r}")
            time.sleep(0.001)
            return np.array([[len(t), ord(t[0]), 1.0] for t in texts], np.float32)
        finally:
            self._leave()

    def collate(self, items: list[Any]) -> np.ndarray:
        return np.asarray(items, np.float32)

    def encode_batch(self, batch: np.ndarray, *, with_tokens: bool = False) -> Any:
        self._enter(IMAGE, len(batch))
        try:
            return type("B", (), {"embeddings": np.stack([batch, np.zeros_like(batch), np.zeros_like(batch)], axis=1)})()
        finally:
            self._leave()


def _expected(text: str) -> list[float]:
    return [len(text), ord(text[0]), 1.0]


def test_each_job_gets_its_own_rows_from_shared_batches() -> None:
    enc = FakeEncoder()
    batcher = DynamicBatcher(enc, max_batch=16, max_wait_s=0.02, max_queue=1000).start()
    texts = [f"{chr(97 + i % 26)}{'x' * i}" for i in range(60)]

    def one(i: int) -> tuple[int, np.ndarray]:
        job = texts[i : i + 1 + i % 3]  # jobs of 1-3 texts
        return i, batcher.submit(TEXT, job).result(10)

    try:
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(one, range(len(texts))))
        for i, out in answers:
            job = texts[i : i + 1 + i % 3]
            np.testing.assert_array_equal(out, np.array([_expected(t) for t in job], np.float32))
        s = batcher.stats()
        assert s["max_batch"] > 1, "concurrent jobs were never batched"
        assert s["max_batch"] <= 16 and all(n <= 16 for _, n, _ in enc.calls)
        assert s["jobs"] == len(texts) and s["batches"] == len(enc.calls) < len(texts)
        assert enc.overlaps == 0 and len({t for _, _, t in enc.calls}) == 1  # one model thread
        assert {t for _, _, t in enc.calls} != {threading.get_ident()}
    finally:
        batcher.close()


def test_texts_and_images_are_encoded_separately_in_one_round() -> None:
    enc = FakeEncoder()
    batcher = DynamicBatcher(enc, max_batch=8, max_wait_s=0.05).start()
    try:
        f_img = batcher.submit(IMAGE, [3.0, 4.0])
        f_txt = batcher.submit(TEXT, ["hello"])
        np.testing.assert_array_equal(f_img.result(5), [[3, 0, 0], [4, 0, 0]])
        np.testing.assert_array_equal(f_txt.result(5), [_expected("hello")])
        assert sorted(k for k, _, _ in enc.calls) == [IMAGE, TEXT]
    finally:
        batcher.close()


def test_a_job_larger_than_max_batch_is_split() -> None:
    enc = FakeEncoder(cost=2)  # e.g. crops: each image costs 2
    batcher = DynamicBatcher(enc, max_batch=5, max_wait_s=0).start()
    try:
        out = batcher.submit(IMAGE, [float(i) for i in range(7)]).result(5)
        np.testing.assert_array_equal(out[:, 0], np.arange(7))
        assert [n for _, n, _ in enc.calls] == [2, 2, 2, 1]  # at most 5 cost units per call
    finally:
        batcher.close()


def test_full_queue_refuses_instead_of_growing() -> None:
    gate = threading.Event()
    enc = FakeEncoder(gate=gate)
    batcher = DynamicBatcher(enc, max_batch=1, max_wait_s=0, max_queue=3).start()
    try:
        first = batcher.submit(TEXT, ["a"])
        assert enc.entered.wait(5)  # the worker holds "a" inside the model; the queue is empty
        waiting = [batcher.submit(TEXT, [t]) for t in ("b", "c", "d")]
        with pytest.raises(Overloaded, match="queue is full"):
            batcher.submit(TEXT, ["e"])
        with pytest.raises(Overloaded):
            batcher.submit(TEXT, ["f", "g"])
        assert batcher.queue_depth() == 3
        gate.set()
        assert [f.result(5)[0, 1] for f in (first, *waiting)] == [ord(c) for c in "abcd"]
        s = batcher.stats()
        assert s["rejected"] == 2 and s["max_queue_depth"] == 3 and s["queue_depth"] == 0
        assert batcher.submit(TEXT, ["h"]).result(5)[0, 1] == ord("h")  # room again
    finally:
        gate.set()
        batcher.close()


def test_cancelled_jobs_never_reach_the_model() -> None:
    gate = threading.Event()
    enc = FakeEncoder(gate=gate)
    batcher = DynamicBatcher(enc, max_batch=4, max_wait_s=0).start()
    try:
        first = batcher.submit(TEXT, ["a"])
        assert enc.entered.wait(5)
        gone = batcher.submit(TEXT, ["zzz"])
        kept = batcher.submit(TEXT, ["b"])
        assert gone.cancel()
        gate.set()
        assert first.result(5)[0, 1] == ord("a") and kept.result(5)[0, 1] == ord("b")
        assert all("zzz" not in str(c) for c in enc.calls)
        assert sum(n for _, n, _ in enc.calls) == 2 and batcher.stats()["cancelled"] == 1
    finally:
        gate.set()
        batcher.close()


def test_a_failing_job_fails_alone() -> None:
    gate = threading.Event()
    enc = FakeEncoder(gate=gate, fail_on="bad")
    batcher = DynamicBatcher(enc, max_batch=8, max_wait_s=0).start()
    try:
        first = batcher.submit(TEXT, ["a"])
        assert enc.entered.wait(5)
        good1, bad, good2 = (batcher.submit(TEXT, [t]) for t in ("good", "bad", "fine"))
        gate.set()
        assert first.result(5)[0, 1] == ord("a")
        assert good1.result(5)[0, 1] == ord("g") and good2.result(5)[0, 1] == ord("f")
        with pytest.raises(ValueError, match="cannot encode 'bad'"):
            bad.result(5)
        assert batcher.stats()["failed"] == 1
    finally:
        gate.set()
        batcher.close()


def test_close_fails_waiting_jobs_and_refuses_new_ones() -> None:
    gate = threading.Event()
    enc = FakeEncoder(gate=gate)
    batcher = DynamicBatcher(enc, max_batch=1, max_wait_s=0).start()
    first = batcher.submit(TEXT, ["a"])
    assert enc.entered.wait(5)
    waiting = batcher.submit(TEXT, ["b"])
    closer = threading.Thread(target=batcher.close)
    closer.start()
    with pytest.raises(Overloaded, match="shutting down"):
        waiting.result(5)
    gate.set()
    closer.join(5)
    assert first.result(5)[0, 1] == ord("a")
    with pytest.raises(Overloaded, match="shutting down"):
        batcher.submit(TEXT, ["c"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(FakeEncoder(), max_batch=0)
    batcher = DynamicBatcher(FakeEncoder())
    with pytest.raises(ValueError, match="kind"):
        batcher.submit("audio", [1])
    with pytest.raises(ValueError, match="at least one"):
        batcher.submit(TEXT, [])
