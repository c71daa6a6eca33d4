"""The benchmarks' pure helpers: statistics, Prometheus histogram parsing, the serialisations, the echo.

Kept beside the benchmarks (pytest collects benchmarks/ too), so that tests/ never imports them."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flagged_path  # noqa: E402
import latency  # noqa: E402
from _common import (  # noqa: E402
    HistogramSnapshot,
    format_table,
    parse_histogram,
    percentile,
    ratio,
    summarize_ms,
)
from echo_upstream import ECHO_TEXT, EchoUpstream  # noqa: E402

from proxy.observability import Metrics  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("q", [0, 1, 25, 50, 95, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = list(np.random.default_rng(1).exponential(size=37))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def test_summarize_reports_milliseconds() -> None:
    summary = summarize_ms([0.001, 0.002, 0.003])
    assert summary["n"] == 3
    assert summary["p50_ms"] == pytest.approx(2.0)
    assert summary["mean_ms"] == pytest.approx(2.0)


def test_ratio_guards_missing_denominators() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 1.0))


def test_histogram_from_the_proxy_metrics_exposition() -> None:
    metrics = Metrics()
    before = parse_histogram(metrics.exposition().decode(), "eco_added_latency_seconds", {"path": "unflagged"})
    for seconds in (0.0003, 0.0015, 0.0015, 0.004, 0.03):
        metrics.added_latency.labels("unflagged", "none").observe(seconds)
    metrics.added_latency.labels("flagged", "hp").observe(2.0)  # another label: must not leak in
    after = parse_histogram(metrics.exposition().decode(), "eco_added_latency_seconds", {"path": "unflagged"})
    window = after.minus(before)
    assert window.count == 5
    assert window.total == pytest.approx(0.0373)
    # rank 2.5 of 5 falls in the (0.001, 0.002] bucket, which holds observations 2 and 3
    assert window.quantile(0.5) == pytest.approx(0.001 + 0.001 * 0.75)
    assert 0.02 < window.quantile(0.99) <= 0.05


def test_histogram_quantile_beyond_last_bucket_and_empty() -> None:
    snapshot = HistogramSnapshot(((0.1, 1.0), (math.inf, 4.0)), total=10.0, count=4.0)
    assert snapshot.quantile(0.9) == 0.1  # only the last finite bound is known
    assert math.isnan(HistogramSnapshot((), 0.0, 0.0).quantile(0.5))


def test_format_table_aligns_columns() -> None:
    lines = format_table([{"a": 1.234, "b": "x"}, {"a": None, "b": "long"}], ["a", "b"]).splitlines()
    assert lines[2].split() == ["1.23", "x"]
    assert lines[3].split() == ["-", "long"]
    assert len({len(line) for line in lines}) == 1


def test_flagged_path_serialisations_decode_as_vllm_does() -> None:
    embeds = torch.randn(5, 16).to(torch.bfloat16)
    body = {"model": "m", "max_tokens": 8}
    for serialise in (flagged_path.serialise, flagged_path.serialise_before):
        decoded = flagged_path.decode_as_vllm(serialise(embeds, body))
        assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, embeds)
    now, before = b"".join(flagged_path.serialise(embeds, body)), flagged_path.serialise_before(embeds, body)
    assert json.loads(now).keys() == json.loads(before).keys()


def test_echo_stream_reads_as_the_echo_text() -> None:
    echo = EchoUpstream("m", 2048)
    events = [json.loads(e.removeprefix(b"data: ")) for e in echo.chat_stream[:-1]]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == ECHO_TEXT
    assert echo.chat_stream[-1] == b"data: [DONE]\n\n"
    assert json.loads(echo.chat)["choices"][0]["message"]["content"] == ECHO_TEXT
    assert "not-a-model" in json.loads(echo.models)["data"][0]["owned_by"]


def test_latency_counters_and_the_dispatch_policies(tmp_path: Path) -> None:
    from proxy.policy import read_policy_config

    exposition = ('# TYPE a counter\na_total{first="verdict"} 2.0\na_total{first="output"} 3.0\n'
                  'a_total_more 7\nab_total 5\n')
    assert latency._counter(exposition, "a_total") == 5.0
    assert latency._counter(exposition, "a_total", {"first": "output"}) == 3.0
    assert latency._counter(exposition, "missing_total") == 0.0
    for dispatch in ("sequential", "speculative"):
        config = read_policy_config(latency.dispatch_policy(tmp_path, dispatch))
        assert config.dispatch == dispatch and Path(config.targets[0].classifier).is_absolute()


def test_latency_speculative_figures_from_two_scrapes() -> None:
    metrics = Metrics()
    before = metrics.exposition().decode()
    metrics.speculative.labels("verdict").inc(3)
    metrics.speculative.labels("output").inc(1)
    metrics.hold_seconds.labels("unflagged").observe(0.004)
    metrics.wasted.labels("hp").inc()
    metrics.wasted_prompt_tokens.labels("hp").inc(12)
    figures = latency.speculative_figures(before, metrics.exposition().decode())
    assert figures["verdict_first_rate"] == 0.75 and figures["wasted"] == 1
    assert figures["wasted_prompt_tokens"] == 12 and figures["hold_unflagged"]["n"] == 1
