"""Figure 4 — the prompt classifier's speed: one prompt at a time, concurrent callers, and batches.

Uses the demo classifier artifact (the first target of demo/policy.yaml); the packaged
all-MiniLM-L6-v2 encoder does the work, on the CPU. Reports

- single-prompt latency (p50/p95) of `score_segments`, cold (every text new: the encoder's
  cache is off) and warm (the same texts again: served by the cache), for a short question,
  a long (~250-word) prompt, and a system + user chat (what the proxy reads of it: the
  rendered conversation and each message; warm, the system prompt repeats, the user message
  is new);
- concurrent callers: N threads each classifying new short prompts, the way the proxy's
  request threads do. "batched" is the encoder as shipped (callers share forward passes);
  "per call" runs one forward pass per call, in parallel, as the encoder did before;
- throughput of `predict_proba` for batches of 1, 8, 32 and 64 prompts.

    .venv/bin/python benchmarks/classifier_speed.py [--quick] [--torch-threads N]
"""
from __future__ import annotations

import argparse
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import (
    DEMO_POLICY,
    FLAGGED_PROMPTS,
    UNFLAGGED_PROMPTS,
    FreshPrompts,
    format_table,
    pyplot,
    result_header,
    save_figure,
    save_json,
    summarize_ms,
)

from classifier.encoder import Encoder
from classifier.model import PromptClassifier

BATCH_SIZES = (1, 8, 32, 64)
THREADS = (1, 2, 4, 8, 16)
SETTINGS = {"quick": {"single": 40, "concurrent": 48, "batches_s": 3.0},
            "full": {"single": 200, "concurrent": 192, "batches_s": 10.0}}
SYSTEM_PROMPT = "You are a helpful assistant for a bookshop. Answer briefly and politely."


def load_classifier(encoder: Encoder) -> tuple[PromptClassifier, str]:
    """The classifier of the demo policy's first target, on the given encoder."""
    target = yaml.safe_load(DEMO_POLICY.read_text())["targets"][0]
    artifact = DEMO_POLICY.parent / target["classifier"]
    return PromptClassifier.load(artifact, encoder=encoder), str(artifact.relative_to(DEMO_POLICY.parent.parent))


def long_prompt(seed: str, words: int = 250) -> str:
    filler = " ".join((*UNFLAGGED_PROMPTS, *FLAGGED_PROMPTS)).split()
    return " ".join([*seed.split(), *(filler * (1 + words // len(filler)))][:words])


def chat_segments(user: str) -> list[str]:
    """What the proxy classifies of a system + user chat: the rendered conversation and each message."""
    rendered = f"<bos><start_of_turn>user\n{SYSTEM_PROMPT}\n\n{user}<end_of_turn>\n<start_of_turn>model\n"
    return [rendered, SYSTEM_PROMPT, user]


def single_latency(classifier: PromptClassifier, segments_of: Any, count: int) -> dict[str, float]:
    times = []
    for _ in range(count):
        segments = segments_of()
        began = time.perf_counter()
        classifier.score_segments(segments)
        times.append(time.perf_counter() - began)
    return summarize_ms(times)


def score_per_call(classifier: PromptClassifier, texts: list[str]) -> float:
    """The score as the encoder computed it before batching: a forward pass of its own per call."""
    return float(classifier.window_scores(texts, classifier.encoder.forward(texts)).max())


def concurrent(classifier: PromptClassifier, threads: int, calls: int, batched: bool) -> dict[str, Any]:
    fresh = FreshPrompts([*UNFLAGGED_PROMPTS, *FLAGGED_PROMPTS])
    prompts = [fresh() for _ in range(calls)]

    def one(prompt: str) -> float:
        began = time.perf_counter()
        if batched:
            classifier.score_segments([prompt])
        else:
            score_per_call(classifier, [prompt])
        return time.perf_counter() - began

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        latencies = list(pool.map(one, prompts))
    elapsed = time.perf_counter() - began
    return {"threads": threads, "mode": "batched" if batched else "per call", **summarize_ms(latencies),
            "prompts_per_s": calls / elapsed}


def batch_throughput(classifier: PromptClassifier, prompts: list[str], batch: int, seconds: float) -> dict[str, float]:
    texts = [prompts[i % len(prompts)] for i in range(batch)]
    classifier.predict_proba(texts)  # warm-up
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        began = time.perf_counter()
        classifier.predict_proba(texts)
        times.append(time.perf_counter() - began)
    summary = summarize_ms(times)
    return {"batch": batch, "batches": len(times), "batch_p50_ms": summary["p50_ms"],
            "batch_p95_ms": summary["p95_ms"], "prompts_per_s": batch * len(times) / sum(times)}


def plot(single: list[dict[str, Any]], threads: list[dict[str, Any]], batches: list[dict[str, Any]]) -> Path:
    plt = pyplot()
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.8))
    labels = [f"{r['prompt']}\n{r['cache']}" for r in single]
    xs = range(len(single))
    left.bar([x - 0.2 for x in xs], [r["p50_ms"] for r in single], width=0.4, label="p50")
    left.bar([x + 0.2 for x in xs], [r["p95_ms"] for r in single], width=0.4, label="p95")
    left.set_xticks(list(xs), labels, fontsize=7, rotation=25, ha="right")
    left.set_ylabel("ms per prompt")
    left.set_title("one call at a time (score_segments)")
    left.legend()
    for mode, style in (("batched", "-o"), ("per call", ":x")):
        rows = [r for r in threads if r["mode"] == mode]
        middle.plot([r["threads"] for r in rows], [r["p50_ms"] for r in rows], style, label=f"{mode}: p50 latency")
        middle.plot([r["threads"] for r in rows], [r["p99_ms"] for r in rows], style, alpha=0.5,
                    label=f"{mode}: p99 latency")
    middle.legend(fontsize=7)
    right.plot([b["batch"] for b in batches], [b["prompts_per_s"] for b in batches], "-o")
    for ax, ticks, xlabel, ylabel, title in (
            (middle, THREADS, "concurrent callers", "ms per call", "concurrent callers, new short prompts"),
            (right, BATCH_SIZES, "batch size", "prompts / second", "batched throughput (predict_proba, short prompts)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ticks), [str(t) for t in ticks])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    figure.suptitle(f"Prompt classifier (all-MiniLM-L6-v2 + head), CPU, {torch.get_num_threads()} torch threads; "
                    "2 shared cores, indicative")
    return save_figure(figure, "classifier_speed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls, shorter batch runs")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="CPU threads for torch, as `eco-proxy serve --torch-threads` (default 1, as there)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    mode = "quick" if args.quick else "full"
    settings = SETTINGS[mode]
    cold_encoder, warm_encoder = Encoder(cache_size=0), Encoder()
    cold, label = load_classifier(cold_encoder)
    warm, _ = load_classifier(warm_encoder)
    print(f"classifier: {label}; torch threads {torch.get_num_threads()}", flush=True)
    short = [*UNFLAGGED_PROMPTS, *FLAGGED_PROMPTS]
    long = [long_prompt(p) for p in short]
    cold.score_segments(short[:1])  # warm-up: the first call builds lazy state
    warm.score_segments([*short, *long, SYSTEM_PROMPT])  # the warm cache: every base text seen once

    fresh_short, fresh_long = FreshPrompts(short), FreshPrompts(long)
    repeat = itertools.cycle(range(len(short)))
    cases = [
        ("short question", "cold", cold, lambda: [fresh_short()]),
        ("short question", "warm (repeated)", warm, lambda: [short[next(repeat)]]),
        ("long prompt (~250 words)", "cold", cold, lambda: [fresh_long()]),
        ("long prompt (~250 words)", "warm (repeated)", warm, lambda: [long[next(repeat)]]),
        ("system + user chat", "cold", cold, lambda: chat_segments(fresh_short())),
        ("system + user chat", "system prompt cached", warm, lambda: chat_segments(fresh_short())),
    ]
    single = [{"prompt": prompt, "cache": cache, **single_latency(classifier, segments_of, settings["single"])}
              for prompt, cache, classifier, segments_of in cases]
    print("\nOne call at a time (ms):")
    print(format_table(single, ["prompt", "cache", "n", "mean_ms", "p50_ms", "p95_ms", "p99_ms"]))

    threads = [concurrent(cold, n, settings["concurrent"], batched) for n in THREADS for batched in (True, False)]
    print("\nConcurrent callers, new short prompts (ms per call; batched = shipped, per call = before):")
    print(format_table(threads, ["threads", "mode", "n", "p50_ms", "p95_ms", "p99_ms", "prompts_per_s"]))

    batches = [batch_throughput(cold, short, b, settings["batches_s"]) for b in BATCH_SIZES]
    print("\nBatched throughput (predict_proba, short prompts):")
    print(format_table(batches, ["batch", "batches", "batch_p50_ms", "batch_p95_ms", "prompts_per_s"]))

    payload = {**result_header(), "mode": mode, "classifier": label, "torch_threads": torch.get_num_threads(),
               "single_prompt": single, "concurrent": threads, "batched": batches}
    print(f"\nsaved {save_json('classifier_speed', payload)} and {plot(single, threads, batches)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
