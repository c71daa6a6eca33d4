"""Figure 2 — the proxy's own ceiling: requests/second against an ECHO upstream (not a model).

The upstream is `benchmarks/echo_upstream.py`, a few-line server that answers in vLLM's
shape with a fixed text saying it is an echo, so the proxy (not a model) is what limits the
rate. The load comes from `benchmarks/loadgen.py` in a separate process (httpx, closed loop,
bounded by a request count and a time limit). Scenarios, each at a few concurrencies:

- direct: the load generator straight to the echo (the ceiling of the harness itself);
- pass-through: the proxy with `targets: []` (no classifier): parse, chat template, forward;
- classifier: the proxy with the classifier policy, unflagged and flagged prompts (flagged:
  embed, corrupt, serialise `prompt_embeds`, translate the answer back to chat).

Every request of a run carries a prompt never sent before (numbered), so the classifier's
cache never answers, except in "unflagged, repeated", where eight prompts go round and the
cache serves all but the first of each.

    .venv/bin/python benchmarks/proxy_ceiling.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _common import (
    scrape_metrics,
    DEMO_POLICY,
    FLAGGED_PROMPTS,
    UNFLAGGED_PROMPTS,
    FreshPrompts,
    chat_body,
    format_table,
    parse_histogram,
    passthrough_policy,
    pyplot,
    resolve_model_dir,
    result_header,
    save_figure,
    save_json,
    start_proxy,
)
from echo_upstream import ECHO_TEXT

from vllm_client.server import free_port

HERE = Path(__file__).resolve().parent
CONCURRENCIES = {"quick": (1, 8, 32), "full": (1, 8, 32, 64)}
RUN_LIMITS = {"quick": (400, 8.0), "full": (3000, 30.0)}  # (requests, seconds) per run
MAX_TOKENS = 8
MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class Requests:
    """What one run sends: `count` new prompts drawn from `prompts`, or the base prompts themselves, repeated."""

    name: str
    prompts: FreshPrompts | tuple[str, ...]
    stream: bool

    def file(self, workdir: Path, count: int) -> Path:
        prompts = [self.prompts() for _ in range(count)] if isinstance(self.prompts, FreshPrompts) else self.prompts
        path = workdir / f"{self.name.replace(' ', '_')}.json"
        path.write_text(json.dumps([{"path": "/v1/chat/completions",
                                     "body": chat_body(MODEL, p, MAX_TOKENS, self.stream)} for p in prompts]))
        return path


def start_echo(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (workdir / "echo.log").open("w")
    process = subprocess.Popen([sys.executable, str(HERE / "echo_upstream.py"), "--port", str(port),
                                "--model", MODEL], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError("the echo upstream did not start; see its log in the temporary directory")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def load(url: str, requests: Path, concurrency: int, limits: tuple[int, float]) -> dict[str, Any]:
    total, seconds = limits
    completed = subprocess.run(
        [sys.executable, str(HERE / "loadgen.py"), "--url", url, "--requests-file", str(requests),
         "--concurrency", str(concurrency), "--requests", str(total), "--duration", str(seconds)],
        capture_output=True, text=True, timeout=seconds + 120, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{completed.stderr}")
    return json.loads(completed.stdout)


def assert_echo_answer(url: str) -> str:
    """One request, to show (and check) that the answer came from the echo, not a model."""
    body = chat_body(MODEL, UNFLAGGED_PROMPTS[0], MAX_TOKENS, stream=False)
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
    text = answer["choices"][0]["message"]["content"]
    if ECHO_TEXT not in text:
        raise RuntimeError(f"expected the echo upstream's text, got {text!r}")
    return text


def run_scenario(name: str, url: str, requests: Requests, workdir: Path, concurrencies: tuple[int, ...],
                 limits: tuple[int, float], metrics_url: str | None, path_label: str | None) -> list[dict[str, Any]]:
    rows = []
    for concurrency in concurrencies:
        before = scrape_metrics(metrics_url) if metrics_url else ""
        result = load(url, requests.file(workdir, limits[0]), concurrency, limits)
        row = {"scenario": name, **result}
        if metrics_url and path_label:
            after = scrape_metrics(metrics_url)
            row["proxy_added_latency_metric"] = parse_histogram(
                after, "eco_added_latency_seconds", {"path": path_label}).minus(
                parse_histogram(before, "eco_added_latency_seconds", {"path": path_label})).summary_ms()
        print(f"  {name:<28} concurrency {concurrency:>2}: {row['rps']:7.1f} req/s  "
              f"p50 {row['latency']['p50_ms']:6.1f} ms  p99 {row['latency']['p99_ms']:6.1f} ms  "
              f"ok {row['ok']}/{row['sent']}", flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]]) -> Path:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["scenario"] for r in rows):
        selected = [r for r in rows if r["scenario"] == name]
        xs = [r["concurrency"] for r in selected]
        left.plot(xs, [r["rps"] for r in selected], "-o", label=name)
        right.plot(xs, [r["latency"]["p50_ms"] for r in selected], "-o", label=name)
    for ax, label in ((left, "requests / second"), (right, "p50 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    figure.suptitle("eco-proxy ceiling against an ECHO upstream (not a model); 2 shared cores, indicative")
    return save_figure(figure, "proxy_ceiling")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer concurrencies")
    parser.add_argument("--model-dir", help="tokenizer and embeddings for the proxy (default: the prepared model)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    concurrencies, limits = CONCURRENCIES[mode], RUN_LIMITS[mode]
    model_dir = resolve_model_dir(args.model_dir)
    print("UPSTREAM IS AN ECHO SERVER, NOT A MODEL: these numbers are the proxy's own ceiling.", flush=True)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="eco-bench-ceiling-") as tmp:
        workdir = Path(tmp)
        unflagged = Requests("unflagged", FreshPrompts(UNFLAGGED_PROMPTS), stream=False)
        unflagged_stream = Requests("unflagged stream", FreshPrompts(UNFLAGGED_PROMPTS), stream=True)
        repeated = Requests("unflagged, repeated", UNFLAGGED_PROMPTS, stream=False)
        flagged = Requests("flagged", FreshPrompts(FLAGGED_PROMPTS), stream=False)
        flagged_stream = Requests("flagged stream", FreshPrompts(FLAGGED_PROMPTS), stream=True)
        echo, echo_url = start_echo(workdir)
        try:
            print(f"echo upstream at {echo_url}; direct answer: {assert_echo_answer(echo_url)!r}")
            rows += run_scenario("direct to echo", echo_url, unflagged, workdir, concurrencies, limits, None, None)

            policy, policy_label = DEMO_POLICY, "demo/policy.yaml"
            for label, policy_path, scenarios in (
                ("pass-through (targets: [])", passthrough_policy(workdir),
                 ((unflagged, "unflagged"), (unflagged_stream, "unflagged"))),
                (f"classifier ({policy_label})", policy,
                 ((unflagged, "unflagged"), (repeated, "unflagged"), (flagged, "flagged"),
                  (flagged_stream, "flagged"))),
            ):
                proxy = start_proxy(policy_path, echo_url, model_dir, MODEL, workdir, echo_upstream=True)
                try:
                    print(f"proxy with {label}; answer through it: {assert_echo_answer(proxy.url)!r}")
                    short = "pass-through" if label.startswith("pass") else "classifier"
                    for requests, path_label in scenarios:
                        rows += run_scenario(f"{short}: {requests.name}", proxy.url, requests, workdir,
                                             concurrencies, limits, proxy.url, path_label)
                finally:
                    proxy.stop()
        finally:
            stop(echo)

    table = [{"scenario": r["scenario"], "conc": r["concurrency"], "ok": r["ok"], "non-200": r["sent"] - r["ok"],
              "req/s": r["rps"], "p50 ms": r["latency"]["p50_ms"], "p99 ms": r["latency"]["p99_ms"],
              "flagged": r["flagged_fraction"],
              "added p50": r.get("proxy_added_latency_metric", {}).get("p50_ms"),
              "added p99": r.get("proxy_added_latency_metric", {}).get("p99_ms")} for r in rows]
    print("\nProxy ceiling against an ECHO upstream (not a model):")
    print(format_table(table, ["scenario", "conc", "ok", "non-200", "req/s", "p50 ms", "p99 ms", "flagged",
                               "added p50", "added p99"]))
    payload = {**result_header(), "mode": mode, "upstream": "ECHO SERVER (benchmarks/echo_upstream.py), NOT A MODEL",
               "policy": policy_label, "max_tokens": MAX_TOKENS, "requests_per_run_limit": limits[0],
               "seconds_per_run_limit": limits[1], "runs": rows}
    print(f"\nsaved {save_json('proxy_ceiling', payload)} and {plot(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
