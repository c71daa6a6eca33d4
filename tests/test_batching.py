"""The batching runner shares passes fairly: a short caller is not stuck behind a long document."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from classifier.batching import BatchingRunner

pytestmark = pytest.mark.unit


class SlowLength(BatchingRunner):
    """A model whose pass costs 1 ms per 100 characters; its output is each text's length."""

    def __init__(self, **options):
        super().__init__(cache_size=0, **options)
        self.passes: list[list[str]] = []

    @property
    def row_shape(self) -> tuple[int, ...]:
        return ()

    def forward(self, texts: list[str], progress: bool = False) -> np.ndarray:
        self.passes.append(list(texts))
        time.sleep(sum(len(t) for t in texts) / 100_000)
        return np.array([len(t) for t in texts], dtype=np.float32)


def test_a_short_caller_is_served_while_a_long_document_is_still_queued():
    runner = SlowLength(pass_chars=2000)
    windows = [f"window {i} " + "x" * 290 for i in range(100)]  # a long document: 100 windows, ~30 KB
    finished: dict[str, float] = {}

    def score(name: str, texts: list[str]) -> None:
        rows = runner.compute(texts)
        assert rows.tolist() == [len(t) for t in texts]
        finished[name] = time.perf_counter()

    long_caller = threading.Thread(target=score, args=("long", windows))
    long_caller.start()
    time.sleep(0.01)
    started = time.perf_counter()
    score("short", ["What is the capital of Japan?"])
    long_caller.join()
    assert finished["short"] < finished["long"]
    assert finished["short"] - started < 0.1  # a pass or two of ~20 ms, not the whole document's ~300 ms
    assert all(sum(len(t) for t in p) <= 2000 + 300 for p in runner.passes)


def test_duplicate_texts_and_concurrent_callers_get_their_own_rows():
    runner = SlowLength(pass_chars=50)
    texts = ["a" * n for n in (5, 7, 5, 30, 7, 1)]
    results: list[list[float]] = []
    threads = [threading.Thread(target=lambda t=texts[i:]: results.append(runner.compute(t).tolist()))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results, key=len) == sorted([[len(t) for t in texts[i:]] for i in range(4)], key=len)


def test_an_offline_caller_with_a_progress_bar_runs_in_one_pass():
    runner = SlowLength(pass_chars=10)
    runner.compute(["abcdef"] * 3 + ["xyz" * 10], progress=True)
    assert len(runner.passes) == 1
