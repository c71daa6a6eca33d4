"""Figure 1 — the latency the guard adds: straight to vLLM, and through the proxy in both dispatch modes.

Starts two `eco-proxy serve` in front of the given vLLM (default http://127.0.0.1:8100), both with
the demo policy: route `sequential` (`dispatch: sequential`: vLLM is asked after the verdict) and
route `speculative` (the default: vLLM starts beside the gate, its answer held until the verdict).
Streaming chat requests (greedy, `ignore_eos`, a fixed number of new tokens) go
to every route, interleaved: each worker sends one request body to every route in turn,
rotating the order, so all routes see the same backend load. Every body is new (a numbered
prompt), so the classifier's cache never answers; the figures are the cold cost.
Reported at concurrency 1, 8 and 32, for unflagged and flagged prompts: time to first token
(TTFT) and total time, p50/p95/p99, and the ratio proxy/direct.

The proxy's own work before it sends the backend request is read per request from its
`Server-Timing: eco-guard;dur=...` header (the goal is checked on that), and from its
`eco_added_latency_seconds` histogram, which proxies without that header also keep.
End-to-end differences include vLLM's queueing noise.

The speculative proxy's own figures come from its metrics: the share of requests whose verdict came
before vLLM's first output, and how long output was held.

Then the throughput cost of the wasted prefills: the same closed-loop load (concurrency 8, new
prompts, a flagged share of 1% and 10%) through each proxy in turn, not interleaved: requests per
second, and the tokens vLLM processed per request (its own counters), speculative against sequential.

`--proxy-cpus CPUS` starts the proxies with `eco-proxy serve --cpus CPUS` (taskset syntax): on a
CPU host, the cores vLLM's engine leaves free, so the proxy is not moved onto the engine's core.
It is saved as "proxy_cpus" in the JSON.

`--compare-ref REF` also starts the proxy as it was at git commit REF (from a temporary
worktree, with that commit's own demo policy and artifacts) as a third route, for a
before/after comparison measured side by side; its results go to `latency_vs_REF.*`.

    .venv/bin/python benchmarks/latency.py [--quick] [--backend-url URL] [--compare-ref REF] [--no-throughput]
        [--proxy-cpus CPUS] [--name NAME]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from _common import (
    DEFAULT_BACKEND_URL,
    DEMO_POLICY,
    FLAGGED_PROMPTS,
    REPO_ROOT,
    UNFLAGGED_PROMPTS,
    FreshPrompts,
    chat_body,
    format_table,
    parse_histogram,
    pyplot,
    ratio,
    resolve_model_dir,
    result_header,
    save_figure,
    save_json,
    scrape_metrics,
    served_model_name,
    start_proxy,
    summarize_ms,
)

CONCURRENCIES = (1, 8, 32)
# Rounds (one request to every route) per phase.
ROUNDS = {"quick": {1: 6, 8: 16, 32: 32}, "full": {1: 60, 8: 64, 32: 128}}  # c=1: enough for a ratio of 1.05 to show
PHASE_SECONDS = {"quick": 60.0, "full": 180.0}
GOAL_CONCURRENCY, GOAL_P50_MS, GOAL_P99_MS = 8, 5.0, 15.0
# Issue 14: unflagged streaming TTFT p50, speculative over direct, at concurrency 1 and 8.
TTFT_GOALS = {1: 1.05, 8: 1.10}
CLASSES = {"unflagged": UNFLAGGED_PROMPTS, "flagged": FLAGGED_PROMPTS}
COLOURS = {"speculative": "tab:red", "sequential": "tab:orange", "direct": "tab:blue", "before": "tab:grey"}
DISPATCH = {"sequential": "sequential", "speculative": "speculative"}  # proxy routes of this checkout
# The throughput cost of wasted prefills: closed loop at this concurrency, these flagged shares.
THROUGHPUT_CONCURRENCY, FLAGGED_SHARES = 8, (0.01, 0.10)
THROUGHPUT_REQUESTS = {"quick": 200, "full": 500}


@dataclass(frozen=True)
class Sample:
    route: str
    status: int
    ttft: float | None  # seconds to the first generated text
    total: float | None  # seconds to the end of the stream
    flagged: bool
    guard: float | None  # seconds, from the proxy's Server-Timing header


def _guard_seconds(headers: httpx.Headers) -> float | None:
    timing = headers.get("server-timing", "")
    return float(timing.removeprefix("eco-guard;dur=")) / 1000 if timing.startswith("eco-guard;dur=") else None


async def streamed_chat(client: httpx.AsyncClient, url: str, route: str, body: dict[str, Any]) -> Sample:
    began = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            flagged, guard = response.headers.get("x-eco-flagged") == "true", _guard_seconds(response.headers)
            if response.status_code != 200:
                await response.aread()
                return Sample(route, response.status_code, None, None, flagged, guard)
            async for line in response.aiter_lines():
                if first is None and line.startswith("data:") and "[DONE]" not in line:
                    event = json.loads(line[5:])
                    if any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                        first = time.perf_counter() - began
    except httpx.HTTPError:
        return Sample(route, 0, None, None, False, None)
    total = time.perf_counter() - began
    return Sample(route, 200, first if first is not None else total, total, flagged, guard)


async def run_phase(urls: dict[str, str], model: str, prompts: FreshPrompts, concurrency: int, rounds: int,
                    max_tokens: int, seconds: float) -> list[Sample]:
    """`concurrency` workers each send one new body to every route, in rotating order, until `rounds` are done."""
    samples: list[Sample] = []
    next_round = 0
    routes = list(urls)
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=4 * concurrency, max_keepalive_connections=4 * concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker(index: int) -> None:
            nonlocal next_round
            while next_round < rounds and time.monotonic() < deadline:
                number, next_round = next_round, next_round + 1
                body = chat_body(model, prompts(), max_tokens, stream=True)
                shift = (index + number) % len(routes)
                for route in routes[shift:] + routes[:shift]:
                    samples.append(await streamed_chat(client, urls[route], route, body))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return samples


def phase_row(kind: str, concurrency: int, samples: list[Sample], routes: list[str],
              metrics: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Per route: end-to-end figures; per proxy route also its own time, from the Server-Timing header
    (exact; only proxies that send it) and from its histogram (bucketed; any version of the proxy)."""
    row: dict[str, Any] = {"class": kind, "concurrency": concurrency}
    for route in routes:
        good = [s for s in samples if s.route == route and s.status == 200]
        row[route] = {"n": len(good), "errors": sum(1 for s in samples if s.route == route and s.status != 200),
                      "ttft": summarize_ms([s.ttft for s in good]), "total": summarize_ms([s.total for s in good])}
    for route, (before, after) in metrics.items():
        good = [s for s in samples if s.route == route and s.status == 200]
        row[route]["flagged_fraction"] = sum(s.flagged for s in good) / len(good) if good else math.nan
        row[route]["guard"] = summarize_ms([s.guard for s in good if s.guard is not None])
        row[route]["guard_histogram"] = parse_histogram(after, "eco_added_latency_seconds", {"path": kind}).minus(
            parse_histogram(before, "eco_added_latency_seconds", {"path": kind})).summary_ms()
        row[route]["ratio_over_direct"] = {
            metric: {q: ratio(row[route][metric][q], row["direct"][metric][q]) for q in ("p50_ms", "p99_ms")}
            for metric in ("ttft", "total")}
        row[route]["ttft_difference_ms"] = {
            q: row[route]["ttft"][q] - row["direct"]["ttft"][q] for q in ("p50_ms", "p99_ms")}
        if route == "speculative":
            row[route]["speculative"] = speculative_figures(before, after)
    return row


def _counter(exposition: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of a counter's samples whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in exposition.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric = head.split("{", 1)[0]
        if metric != name:
            continue
        if labels and any(f'{k}="{v}"' not in head for k, v in labels.items()):
            continue
        total += float(value)
    return total


def speculative_figures(before: str, after: str) -> dict[str, Any]:
    """From the speculative proxy's metrics over a phase: what came first, the hold, the waste."""
    def delta(name: str, labels: dict[str, str] | None = None) -> float:
        return _counter(after, name, labels) - _counter(before, name, labels)

    verdict_first = delta("eco_speculative_requests_total", {"first": "verdict"})
    output_first = delta("eco_speculative_requests_total", {"first": "output"})
    hold = parse_histogram(after, "eco_hold_seconds", {"path": "unflagged"}).minus(
        parse_histogram(before, "eco_hold_seconds", {"path": "unflagged"}))
    return {"verdict_first_rate": ratio(verdict_first, verdict_first + output_first),
            "hold_unflagged": hold.summary_ms(),
            "wasted": delta("eco_speculative_wasted_total"),
            "wasted_prompt_tokens": delta("eco_speculative_wasted_prompt_tokens_total"),
            "wasted_generated_tokens": delta("eco_speculative_wasted_generated_tokens_total")}


def print_tables(rows: list[dict[str, Any]], routes: list[str]) -> None:
    flat = []
    for row in rows:
        for route in routes:
            r = row[route]
            flat.append({"class": row["class"], "conc": row["concurrency"], "route": route, "n": r["n"],
                         "err": r["errors"], "ttft p50": r["ttft"]["p50_ms"], "ttft p99": r["ttft"]["p99_ms"],
                         "total p50": r["total"]["p50_ms"], "total p99": r["total"]["p99_ms"],
                         "ttft/direct p50": r.get("ratio_over_direct", {}).get("ttft", {}).get("p50_ms"),
                         "guard p50": r.get("guard", {}).get("p50_ms"), "guard p99": r.get("guard", {}).get("p99_ms"),
                         "hist p50": r.get("guard_histogram", {}).get("p50_ms"),
                         "hist p99": r.get("guard_histogram", {}).get("p99_ms"), "flagged": r.get("flagged_fraction"),
                         "verdict 1st": r.get("speculative", {}).get("verdict_first_rate"),
                         "hold p50": r.get("speculative", {}).get("hold_unflagged", {}).get("p50_ms"),
                         "wasted": r.get("speculative", {}).get("wasted")})
    print("\nEnd to end (ms; streaming chat, routes interleaved) and the guard's time "
          "(guard: Server-Timing header; hist: its Prometheus histogram, interpolated in buckets):")
    print(format_table(flat, ["class", "conc", "route", "n", "err", "ttft p50", "ttft p99", "total p50", "total p99",
                              "ttft/direct p50", "guard p50", "guard p99", "hist p50", "hist p99", "flagged",
                              "verdict 1st", "hold p50", "wasted"]))
    print("(guard: the proxy's time from the request's arrival to its verdict (and corruption); speculative: "
          "beside vLLM. verdict 1st: share of speculative requests whose verdict came before vLLM's first "
          "output; hold p50: how long unflagged output was held, ms, from the histogram; wasted: speculative "
          "requests aborted as flagged.)")


def ttft_goal_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 14's goal: unflagged streaming TTFT p50 through the speculative proxy over direct."""
    checks = {}
    for concurrency, goal in TTFT_GOALS.items():
        row = next(r for r in rows if r["class"] == "unflagged" and r["concurrency"] == concurrency)
        measured = row["speculative"]["ratio_over_direct"]["ttft"]["p50_ms"]
        checks[str(concurrency)] = {"goal": goal, "speculative": measured,
                                    "sequential": row["sequential"]["ratio_over_direct"]["ttft"]["p50_ms"],
                                    "met": measured <= goal}
    return {"checks": checks, "met": all(c["met"] for c in checks.values())}


def goal_check(rows: list[dict[str, Any]], route: str = "speculative") -> dict[str, Any]:
    row = next(r for r in rows if r["class"] == "unflagged" and r["concurrency"] == GOAL_CONCURRENCY)
    guard = row[route]["guard"]
    check = {"concurrency": GOAL_CONCURRENCY, "goal_p50_ms": GOAL_P50_MS, "goal_p99_ms": GOAL_P99_MS,
             "guard_p50_ms": guard["p50_ms"], "guard_p99_ms": guard["p99_ms"],
             "end_to_end_ttft_difference_ms": row[route]["ttft_difference_ms"]}
    if "before" in row:  # the earlier proxy sent no Server-Timing: compare the histograms
        check["histogram_p50_ms"] = row[route]["guard_histogram"]["p50_ms"]
        check["histogram_p99_ms"] = row[route]["guard_histogram"]["p99_ms"]
        check["before_histogram_p50_ms"] = row["before"]["guard_histogram"]["p50_ms"]
        check["before_histogram_p99_ms"] = row["before"]["guard_histogram"]["p99_ms"]
    check["met"] = guard["p50_ms"] <= GOAL_P50_MS and guard["p99_ms"] <= GOAL_P99_MS
    return check


def plot(rows: list[dict[str, Any]], routes: list[str], name: str) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(2, 3, figsize=(16, 8), sharex=True)
    for i, kind in enumerate(CLASSES):
        selected = [r for r in rows if r["class"] == kind]
        xs = [r["concurrency"] for r in selected]
        for j, metric in enumerate(("ttft", "total", "guard_histogram")):
            ax = axes[i][j]
            for route in routes:
                if metric == "guard_histogram" and route == "direct":
                    continue
                for q, style in (("p50_ms", "-o"), ("p99_ms", "--^")):
                    ax.plot(xs, [r[route][metric][q] for r in selected], style, color=COLOURS[route],
                            label=f"{route} {q[:3]}")
            if metric == "guard_histogram" and kind == "unflagged":
                ax.axhline(GOAL_P50_MS, color="k", linestyle=":", label="goal p50 (at 8)")
                ax.axhline(GOAL_P99_MS, color="k", linestyle="-.", label="goal p99 (at 8)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(list(CONCURRENCIES), [str(c) for c in CONCURRENCIES])
            ax.set_title(f"{kind}: " + {"ttft": "time to first token", "total": "total latency",
                                         "guard_histogram": "proxy's own time (its histogram)"}[metric])
            ax.set_ylabel("ms")
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("concurrency")
            ax.legend(fontsize=7)
    figure.suptitle("eco-proxy vs direct vLLM (gemma-3-270m, 2 shared CPU cores; indicative)")
    return save_figure(figure, name)


def dispatch_policy(workdir: Path, dispatch: str) -> Path:
    """The demo policy with `dispatch` set, written to `workdir` (its artifact paths made absolute)."""
    config = yaml.safe_load(DEMO_POLICY.read_text())
    for target in config["targets"]:
        for key in ("classifier", "corruption_file"):
            if target.get(key):
                target[key] = str((DEMO_POLICY.parent / target[key]).resolve())
    config["dispatch"] = dispatch
    path = workdir / f"policy-{dispatch}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _vllm_tokens(backend_url: str) -> dict[str, float]:
    text = httpx.get(f"{backend_url}/metrics", timeout=10).text
    return {key: _counter(text, f"vllm:{key}_total") for key in ("prompt_tokens", "generation_tokens")}


async def closed_loop(url: str, route: str, model: str, prompts: dict[str, FreshPrompts], count: int,
                      concurrency: int, share: float, max_tokens: int, seconds: float) -> tuple[list[Sample], float]:
    """`count` requests (or as many as `seconds` allow), `concurrency` at a time, every one new; request i is
    flagged when i*share crosses an integer (so exactly round(count*share) are). The samples and the wall time."""
    samples: list[Sample] = []
    next_index = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=2 * concurrency, max_keepalive_connections=2 * concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal next_index
            while next_index < count and time.monotonic() < deadline:
                index, next_index = next_index, next_index + 1
                kind = "flagged" if math.floor((index + 1) * share) > math.floor(index * share) else "unflagged"
                body = chat_body(model, prompts[kind](), max_tokens, stream=True)
                samples.append(await streamed_chat(client, url, route, body))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def throughput_cost(urls: dict[str, str], backend_url: str, model: str, count: int, max_tokens: int,
                    seconds: float) -> list[dict[str, Any]]:
    """The same closed-loop load through the sequential and the speculative proxy in turn, at each flagged
    share: requests per second, and the tokens vLLM processed per request."""
    prompts = {kind: FreshPrompts([f"{p} [load]" for p in base]) for kind, base in CLASSES.items()}
    rows = []
    for number, share in enumerate(FLAGGED_SHARES):
        order = ["sequential", "speculative"] if number % 2 == 0 else ["speculative", "sequential"]
        for route in order:
            print(f"throughput: {share:.0%} flagged, {route} ...", flush=True)
            tokens_before, proxy_before = _vllm_tokens(backend_url), scrape_metrics(urls[route])
            samples, wall = asyncio.run(closed_loop(urls[route], route, model, prompts, count,
                                                    THROUGHPUT_CONCURRENCY, share, max_tokens, seconds))
            tokens_after, proxy_after = _vllm_tokens(backend_url), scrape_metrics(urls[route])
            good = [s for s in samples if s.status == 200]
            print(f"    {len(good)} requests in {wall:.1f} s: {len(good) / wall:.2f} req/s", flush=True)
            row: dict[str, Any] = {
                "share": share, "route": route, "n": len(good), "errors": len(samples) - len(good),
                "seconds": wall, "requests_per_second": len(good) / wall,
                "flagged_fraction": sum(s.flagged for s in good) / len(good) if good else math.nan,
                "ttft": summarize_ms([s.ttft for s in good]), "total": summarize_ms([s.total for s in good]),
                "vllm_prompt_tokens_per_request": (tokens_after["prompt_tokens"] - tokens_before["prompt_tokens"])
                / max(len(samples), 1),
                "vllm_generation_tokens_per_request": (tokens_after["generation_tokens"]
                                                       - tokens_before["generation_tokens"]) / max(len(samples), 1)}
            if route == "speculative":
                row["speculative"] = speculative_figures(proxy_before, proxy_after)
            rows.append(row)
    for share in FLAGGED_SHARES:
        pair = {r["route"]: r for r in rows if r["share"] == share}
        spec, seq = pair["speculative"], pair["sequential"]
        spec["cost_vs_sequential"] = {
            "requests_per_second": ratio(spec["requests_per_second"], seq["requests_per_second"]) - 1,
            "vllm_prompt_tokens": ratio(spec["vllm_prompt_tokens_per_request"],
                                        seq["vllm_prompt_tokens_per_request"]) - 1,
            "vllm_generation_tokens": ratio(spec["vllm_generation_tokens_per_request"],
                                            seq["vllm_generation_tokens_per_request"]) - 1}
    return rows


def print_throughput(rows: list[dict[str, Any]]) -> None:
    flat = [{"flagged share": f"{r['share']:.0%}", "route": r["route"], "n": r["n"], "err": r["errors"],
             "flagged seen": r["flagged_fraction"], "req/s": r["requests_per_second"],
             "ttft p50": r["ttft"]["p50_ms"], "total p50": r["total"]["p50_ms"],
             "vLLM prompt tok/req": r["vllm_prompt_tokens_per_request"],
             "vLLM gen tok/req": r["vllm_generation_tokens_per_request"],
             "wasted": r.get("speculative", {}).get("wasted"),
             "wasted prompt tok": r.get("speculative", {}).get("wasted_prompt_tokens"),
             "wasted gen tok": r.get("speculative", {}).get("wasted_generated_tokens"),
             "req/s vs seq": r.get("cost_vs_sequential", {}).get("requests_per_second"),
             "prompt tok vs seq": r.get("cost_vs_sequential", {}).get("vllm_prompt_tokens")} for r in rows]
    print(f"\nThroughput cost of wasted prefills (closed loop, concurrency {THROUGHPUT_CONCURRENCY}, streaming chat, "
          "each proxy on its own; 'vs seq' is speculative/sequential - 1; 'flagged seen' also counts unflagged-class "
          "prompts the demo gate flags):")
    print(format_table(flat, list(flat[0])))


def worktree(stack: ExitStack, ref: str) -> Path:
    """A temporary checkout of `ref`, removed again on exit."""
    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eco-bench-ref-"))) / "checkout"
    subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-q", str(path), ref], check=True)
    stack.callback(subprocess.run, ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(path)],
                   check=False)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per phase (a few minutes)")
    parser.add_argument("--backend-url", default=DEFAULT_BACKEND_URL, help="a running vLLM with prompt embeds")
    parser.add_argument("--model-dir", help="the model vLLM serves (default: asked of the backend)")
    parser.add_argument("--max-tokens", type=int, default=8, help="new tokens per request (ignore_eos)")
    parser.add_argument("--compare-ref", help="also run the proxy as of this git commit, as route 'before'")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput cost of wasted prefills")
    parser.add_argument("--proxy-cpus", help="every proxy's --cpus (e.g. 1: the core vLLM's CPU engine leaves free)")
    parser.add_argument("--name", help="result file name (default: latency, or latency_vs_REF with --compare-ref)")
    parser.add_argument("--phase-seconds", type=float, help="cap on each phase's time (default: 60 quick, 180 full)")
    parser.add_argument("--throughput-requests", type=int, help="requests per throughput run (default: 200 quick, "
                                                                     "500 full)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    model_dir = resolve_model_dir(args.model_dir, args.backend_url)
    model = served_model_name(args.backend_url, model_dir.name)

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eco-bench-latency-")))
        policy = DEMO_POLICY
        print(f"policy: {policy.relative_to(REPO_ROOT)}; backend {args.backend_url} ({model}); starting the proxies ...",
              flush=True)
        urls = {"direct": args.backend_url}
        checkouts: dict[str, Path | None] = {route: None for route in DISPATCH}
        if args.compare_ref:
            checkouts["before"] = worktree(stack, args.compare_ref)
        for route, code_dir in checkouts.items():
            # an earlier commit runs with its own demo policy and artifacts (their format may have changed since)
            own_policy = code_dir / policy.relative_to(REPO_ROOT) if code_dir else dispatch_policy(workdir, DISPATCH[route])
            proxy = start_proxy(own_policy, args.backend_url, model_dir, model, workdir, code_dir=code_dir,
                                cpus=args.proxy_cpus)
            stack.callback(proxy.stop)
            urls[route] = proxy.url
        routes = list(urls)
        for prompts in CLASSES.values():  # warm-up: first requests load lazily-built state on every route
            asyncio.run(run_phase(urls, model, FreshPrompts([f"{p} [warm-up]" for p in prompts]), 2, 2,
                                  args.max_tokens, 120))
        rows = []
        for kind, prompts in CLASSES.items():
            fresh = FreshPrompts(prompts)
            for concurrency in CONCURRENCIES:
                rounds = ROUNDS[mode][concurrency]
                print(f"{kind:>9} concurrency {concurrency:>2}: {rounds} rounds ...", flush=True)
                started = time.monotonic()
                proxies = [route for route in routes if route != "direct"]
                before = {route: scrape_metrics(urls[route]) for route in proxies}
                samples = asyncio.run(run_phase(urls, model, fresh, concurrency, rounds, args.max_tokens,
                                                args.phase_seconds or PHASE_SECONDS[mode]))
                metrics = {route: (before[route], scrape_metrics(urls[route])) for route in proxies}
                row = phase_row(kind, concurrency, samples, routes, metrics)
                row["seconds"] = time.monotonic() - started
                rows.append(row)
                print("    ttft p50 / total p50 ms: " + ", ".join(
                    f"{route} {row[route]['ttft']['p50_ms']:.1f} / {row[route]['total']['p50_ms']:.1f}"
                    + (f" (guard p50 {row[route]['guard']['p50_ms']:.1f})" if route in proxies else "")
                    for route in routes) + f"  [{row['seconds']:.0f} s]", flush=True)
        throughput = [] if args.no_throughput else throughput_cost(
            urls, args.backend_url, model, args.throughput_requests or THROUGHPUT_REQUESTS[mode], args.max_tokens,
            args.phase_seconds or PHASE_SECONDS[mode])

    print_tables(rows, routes)
    if throughput:
        print_throughput(throughput)
    ttft = ttft_goal_check(rows)
    for concurrency, c in ttft["checks"].items():
        print(f"\nGoal (issue 14; unflagged streaming TTFT p50, speculative / direct, concurrency {concurrency}: "
              f"<= {c['goal']:.2f}): {'MET' if c['met'] else 'MISSED'} — {c['speculative']:.3f} "
              f"(sequential {c['sequential']:.3f})")
    check = goal_check(rows)
    verdict = "MET" if check["met"] else "MISSED"
    before = (f"; histograms, now vs {args.compare_ref}: p50 {check['histogram_p50_ms']:.2f} vs "
              f"{check['before_histogram_p50_ms']:.2f} ms, p99 {check['histogram_p99_ms']:.2f} vs "
              f"{check['before_histogram_p99_ms']:.2f} ms" if "before_histogram_p50_ms" in check else "")
    print(f"\nGoal (unflagged, concurrency {GOAL_CONCURRENCY}: the proxy's own time p50 <= {GOAL_P50_MS} ms, "
          f"p99 <= {GOAL_P99_MS} ms): {verdict} — p50 {check['guard_p50_ms']:.2f} ms, "
          f"p99 {check['guard_p99_ms']:.2f} ms{before}")
    payload = {**result_header(), "mode": mode, "backend_url": args.backend_url, "model": model,
               "policy": str(DEMO_POLICY.relative_to(REPO_ROOT)), "max_tokens": args.max_tokens, "endpoint": "/v1/chat/completions (stream)",
               "compare_ref": args.compare_ref, "goal": check, "ttft_goal": ttft, "phases": rows,
               "throughput": throughput, "cpus": sorted(os.sched_getaffinity(0)), "proxy_cpus": args.proxy_cpus}
    # the plain run stays the headline unless named otherwise
    name = args.name or (f"latency_vs_{args.compare_ref}" if args.compare_ref else "latency")
    print(f"\nsaved {save_json(name, payload)}", flush=True)  # the figures first: a plot may fail on odd data
    print(f"saved {plot(rows, routes, name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
