"""Figure 1 — the latency the guard adds: through the proxy vs straight to vLLM.

Starts its own `eco-proxy serve` in front of the given vLLM (default http://127.0.0.1:8100)
with the demo policy (or, before the demo exists, a tiny classifier trained on the test
examples). The same streaming chat requests (greedy, `ignore_eos`, a fixed number of new
tokens) go to both routes, interleaved — every worker alternates proxy, direct, proxy, ...
on the same prompt, half of the workers starting with each route — so both routes see the
same backend load. Reported at concurrency 1, 8 and 32, for unflagged and flagged prompts:
time to first token (TTFT) and total time, p50/p95/p99, and the ratio proxy/direct.

End-to-end differences include vLLM's queueing noise; the proxy's own histogram
`eco_added_latency_seconds` (scraped from /metrics before and after each phase) isolates
the work the proxy does before the backend request is sent.

    .venv/bin/python benchmarks/latency.py [--quick] [--backend-url URL]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from _common import (
    DEFAULT_BACKEND_URL,
    FLAGGED_PROMPTS,
    UNFLAGGED_PROMPTS,
    HistogramSnapshot,
    chat_body,
    classifier_policy,
    format_table,
    parse_histogram,
    pyplot,
    ratio,
    resolve_model_dir,
    result_header,
    save_figure,
    save_json,
    served_model_name,
    start_proxy,
    summarize_ms,
)

CONCURRENCIES = (1, 8, 32)
# Request pairs (one proxy + one direct request) per phase.
PAIRS = {"quick": {1: 6, 8: 16, 32: 32}, "full": {1: 25, 8: 64, 32: 128}}
PHASE_SECONDS = {"quick": 60.0, "full": 150.0}
GOAL_CONCURRENCY, GOAL_P50_MS, GOAL_P99_MS = 8, 5.0, 15.0
ROUTES = ("proxy", "direct")
CLASSES = {"unflagged": UNFLAGGED_PROMPTS, "flagged": FLAGGED_PROMPTS}


@dataclass(frozen=True)
class Sample:
    route: str
    status: int
    ttft: float | None  # seconds to the first generated text
    total: float | None  # seconds to the end of the stream
    flagged: bool


async def streamed_chat(client: httpx.AsyncClient, url: str, route: str, body: dict[str, Any]) -> Sample:
    began = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            flagged = response.headers.get("x-eco-flagged") == "true"
            if response.status_code != 200:
                await response.aread()
                return Sample(route, response.status_code, None, None, flagged)
            async for line in response.aiter_lines():
                if first is None and line.startswith("data:") and "[DONE]" not in line:
                    event = json.loads(line[5:])
                    if any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                        first = time.perf_counter() - began
    except httpx.HTTPError:
        return Sample(route, 0, None, None, False)
    total = time.perf_counter() - began
    return Sample(route, 200, first if first is not None else total, total, flagged)


async def run_phase(urls: dict[str, str], model: str, prompts: tuple[str, ...], concurrency: int, pairs: int,
                    max_tokens: int, seconds: float) -> list[Sample]:
    """`concurrency` workers each send proxy/direct pairs on the same prompt until `pairs` are done."""
    samples: list[Sample] = []
    next_pair = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=4 * concurrency, max_keepalive_connections=4 * concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker(index: int) -> None:
            nonlocal next_pair
            while next_pair < pairs and time.monotonic() < deadline:
                pair, next_pair = next_pair, next_pair + 1
                body = chat_body(model, prompts[pair % len(prompts)], max_tokens, stream=True)
                order = ROUTES if (index + pair) % 2 == 0 else ROUTES[::-1]
                for route in order:
                    samples.append(await streamed_chat(client, urls[route], route, body))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return samples


def scrape(proxy_url: str) -> str:
    return httpx.get(f"{proxy_url}/metrics", timeout=10).text


def phase_row(kind: str, concurrency: int, samples: list[Sample], before: str, after: str) -> dict[str, Any]:
    row: dict[str, Any] = {"class": kind, "concurrency": concurrency}
    for route in ROUTES:
        good = [s for s in samples if s.route == route and s.status == 200]
        row[route] = {"n": len(good), "errors": sum(1 for s in samples if s.route == route and s.status != 200),
                      "ttft": summarize_ms([s.ttft for s in good]), "total": summarize_ms([s.total for s in good])}
    proxied = [s for s in samples if s.route == "proxy" and s.status == 200]
    row["proxy_flagged_fraction"] = sum(s.flagged for s in proxied) / len(proxied) if proxied else math.nan
    row["ratio_proxy_over_direct"] = {
        metric: {q: ratio(row["proxy"][metric][q], row["direct"][metric][q]) for q in ("p50_ms", "p95_ms", "p99_ms")}
        for metric in ("ttft", "total")}
    row["difference_ms"] = {
        metric: {q: row["proxy"][metric][q] - row["direct"][metric][q] for q in ("p50_ms", "p95_ms", "p99_ms")}
        for metric in ("ttft", "total")}
    added: HistogramSnapshot = parse_histogram(after, "eco_added_latency_seconds", {"path": kind}).minus(
        parse_histogram(before, "eco_added_latency_seconds", {"path": kind}))
    row["proxy_added_latency_metric"] = added.summary_ms()
    classifier = parse_histogram(after, "eco_classifier_seconds", {}).minus(
        parse_histogram(before, "eco_classifier_seconds", {}))
    row["classifier_metric"] = classifier.summary_ms()
    return row


def print_tables(rows: list[dict[str, Any]]) -> None:
    flat = []
    for row in rows:
        for route in ROUTES:
            r = row[route]
            flat.append({"class": row["class"], "conc": row["concurrency"], "route": route, "n": r["n"],
                         "err": r["errors"], "ttft p50": r["ttft"]["p50_ms"], "ttft p95": r["ttft"]["p95_ms"],
                         "ttft p99": r["ttft"]["p99_ms"], "total p50": r["total"]["p50_ms"],
                         "total p95": r["total"]["p95_ms"], "total p99": r["total"]["p99_ms"]})
        ratios = row["ratio_proxy_over_direct"]
        flat.append({"class": row["class"], "conc": row["concurrency"], "route": "ratio p/d", "n": "", "err": "",
                     **{f"{m} {q[:3]}": ratios[m][q] for m in ("ttft", "total") for q in ("p50_ms", "p95_ms", "p99_ms")}})
    columns = ["class", "conc", "route", "n", "err", "ttft p50", "ttft p95", "ttft p99", "total p50", "total p95",
               "total p99"]
    print("\nEnd to end (ms; streaming chat, proxy and direct interleaved):")
    print(format_table(flat, columns))
    metric_rows = [{"class": r["class"], "conc": r["concurrency"], "flagged frac": r["proxy_flagged_fraction"],
                    **{f"added {k[:-3]}": r["proxy_added_latency_metric"][k] for k in ("mean_ms", "p50_ms", "p95_ms",
                                                                                       "p99_ms")},
                    "classifier p50": r["classifier_metric"]["p50_ms"]} for r in rows]
    print("\nProxy's own work before the backend request (eco_added_latency_seconds; ms, quantiles "
          "interpolated inside Prometheus buckets):")
    print(format_table(metric_rows, ["class", "conc", "flagged frac", "added mean", "added p50", "added p95",
                                     "added p99", "classifier p50"]))


def goal_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    row = next(r for r in rows if r["class"] == "unflagged" and r["concurrency"] == GOAL_CONCURRENCY)
    metric = row["proxy_added_latency_metric"]
    check = {"concurrency": GOAL_CONCURRENCY, "goal_p50_ms": GOAL_P50_MS, "goal_p99_ms": GOAL_P99_MS,
             "metric_p50_ms": metric["p50_ms"], "metric_p99_ms": metric["p99_ms"],
             "end_to_end_ttft_difference_p50_ms": row["difference_ms"]["ttft"]["p50_ms"],
             "end_to_end_ttft_difference_p99_ms": row["difference_ms"]["ttft"]["p99_ms"]}
    check["met"] = metric["p50_ms"] <= GOAL_P50_MS and metric["p99_ms"] <= GOAL_P99_MS
    return check


def plot(rows: list[dict[str, Any]]) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for i, kind in enumerate(CLASSES):
        for j, metric in enumerate(("ttft", "total")):
            ax = axes[i][j]
            selected = [r for r in rows if r["class"] == kind]
            xs = [r["concurrency"] for r in selected]
            for route, colour in zip(ROUTES, ("tab:red", "tab:blue")):
                for q, style in (("p50_ms", "-o"), ("p99_ms", "--^")):
                    ax.plot(xs, [r[route][metric][q] for r in selected], style, color=colour,
                            label=f"{route} {q[:3]}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(CONCURRENCIES), [str(c) for c in CONCURRENCIES])
            ax.set_title(f"{kind}: {'time to first token' if metric == 'ttft' else 'total latency'}")
            ax.set_ylabel("ms")
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("concurrency")
            ax.legend(fontsize=8)
    figure.suptitle("eco-proxy vs direct vLLM (gemma-3-270m, 2 shared CPU cores; indicative)")
    return save_figure(figure, "latency")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per phase (a few minutes)")
    parser.add_argument("--backend-url", default=DEFAULT_BACKEND_URL, help="a running vLLM with prompt embeds")
    parser.add_argument("--model-dir", help="the model vLLM serves (default: asked of the backend)")
    parser.add_argument("--max-tokens", type=int, default=8, help="new tokens per request (ignore_eos)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    model_dir = resolve_model_dir(args.model_dir, args.backend_url)
    model = served_model_name(args.backend_url, model_dir.name)

    with tempfile.TemporaryDirectory(prefix="eco-bench-latency-") as tmp:
        workdir = Path(tmp)
        policy, policy_label = classifier_policy(workdir)
        print(f"policy: {policy_label}; backend {args.backend_url} ({model}); starting the proxy ...", flush=True)
        proxy = start_proxy(policy, args.backend_url, model_dir, model, workdir)
        urls = {"proxy": proxy.url, "direct": args.backend_url}
        try:
            for prompts in CLASSES.values():  # warm-up: first requests load lazily-built state on both sides
                asyncio.run(run_phase(urls, model, prompts[:2], 2, 2, args.max_tokens, 120))
            rows = []
            for kind, prompts in CLASSES.items():
                for concurrency in CONCURRENCIES:
                    pairs = PAIRS[mode][concurrency]
                    print(f"{kind:>9} concurrency {concurrency:>2}: {pairs} pairs ...", flush=True)
                    before = scrape(proxy.url)
                    started = time.monotonic()
                    samples = asyncio.run(run_phase(urls, model, prompts, concurrency, pairs, args.max_tokens,
                                                    PHASE_SECONDS[mode]))
                    row = phase_row(kind, concurrency, samples, before, scrape(proxy.url))
                    row["seconds"] = time.monotonic() - started
                    rows.append(row)
        finally:
            proxy.stop()

    print_tables(rows)
    check = goal_check(rows)
    verdict = "MET" if check["met"] else "MISSED"
    print(f"\nGoal (unflagged, concurrency {GOAL_CONCURRENCY}: added p50 <= {GOAL_P50_MS} ms, p99 <= {GOAL_P99_MS} ms, "
          f"from the proxy's histogram): {verdict} — p50 {check['metric_p50_ms']:.2f} ms, "
          f"p99 {check['metric_p99_ms']:.2f} ms (end-to-end TTFT difference p50 "
          f"{check['end_to_end_ttft_difference_p50_ms']:.1f} ms, p99 {check['end_to_end_ttft_difference_p99_ms']:.1f} ms)")
    payload = {**result_header(), "mode": mode, "backend_url": args.backend_url, "model": model,
               "policy": policy_label, "max_tokens": args.max_tokens, "endpoint": "/v1/chat/completions (stream)",
               "goal": check, "phases": rows}
    print(f"\nsaved {save_json('latency', payload)} and {plot(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
