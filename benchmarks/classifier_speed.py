"""Figure 4 — the prompt classifier's speed: one prompt at a time, and in batches.

Uses the demo classifier artifact (the first target of demo/policy.yaml) when it exists,
else a tiny classifier trained here on the test examples; either way the packaged
all-MiniLM-L6-v2 encoder does the work, on the CPU. Reports

- single-prompt latency (p50/p95) of `score_segments` with one segment, and with the two
  segments the proxy passes for a one-message chat (the rendered prompt and the message),
  for short questions and for long (~250-word) prompts;
- throughput of `predict_proba` for batches of 1, 8, 32 and 64 prompts.

    .venv/bin/python benchmarks/classifier_speed.py [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from _common import (
    DEMO_POLICY,
    FLAGGED_PROMPTS,
    UNFLAGGED_PROMPTS,
    format_table,
    pyplot,
    result_header,
    save_figure,
    save_json,
    summarize_ms,
)

BATCH_SIZES = (1, 8, 32, 64)
SETTINGS = {"quick": {"single": 40, "batches_s": 3.0}, "full": {"single": 300, "batches_s": 10.0}}


def load_classifier(workdir: Path) -> tuple[Any, str]:
    from classifier.model import PromptClassifier

    if DEMO_POLICY.is_file():
        targets = yaml.safe_load(DEMO_POLICY.read_text()).get("targets") or []
        if targets:
            artifact = DEMO_POLICY.parent / targets[0]["classifier"]
            return PromptClassifier.load(artifact), f"demo artifact {artifact.relative_to(DEMO_POLICY.parent.parent)}"
    from tests.proxy_harness import train_tiny_policy

    train_tiny_policy(workdir, version="bench-tiny")
    return PromptClassifier.load(workdir / "classifier"), "tiny classifier trained on tests/proxy_harness.py examples"


def long_prompt(seed: str, words: int = 250) -> str:
    filler = " ".join((*UNFLAGGED_PROMPTS, *FLAGGED_PROMPTS)).split()
    return " ".join([*seed.split(), *(filler * (1 + words // len(filler)))][:words])


def single_latency(classifier: Any, prompts: list[str], segments_of: Any, count: int) -> dict[str, float]:
    times = []
    for i in range(count):
        segments = segments_of(prompts[i % len(prompts)])
        began = time.perf_counter()
        classifier.score_segments(segments)
        times.append(time.perf_counter() - began)
    return summarize_ms(times)


def batch_throughput(classifier: Any, prompts: list[str], batch: int, seconds: float) -> dict[str, float]:
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


def chat_segments(prompt: str) -> list[str]:
    """What the proxy classifies for a one-message chat: the rendered conversation and the message."""
    rendered = f"<bos><start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
    return [rendered, prompt]


def plot(single: list[dict[str, Any]], batches: list[dict[str, Any]]) -> Path:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['prompts']}\n{r['segments']}" for r in single]
    xs = range(len(single))
    left.bar([x - 0.2 for x in xs], [r["p50_ms"] for r in single], width=0.4, label="p50")
    left.bar([x + 0.2 for x in xs], [r["p95_ms"] for r in single], width=0.4, label="p95")
    left.set_xticks(list(xs), labels, fontsize=8)
    left.set_ylabel("ms per prompt")
    left.set_title("single-prompt latency (score_segments)")
    left.legend()
    right.plot([b["batch"] for b in batches], [b["prompts_per_s"] for b in batches], "-o")
    right.set_xscale("log", base=2)
    right.set_xticks(list(BATCH_SIZES), [str(b) for b in BATCH_SIZES])
    right.set_xlabel("batch size")
    right.set_ylabel("prompts / second")
    right.set_title("batched throughput (predict_proba, short prompts)")
    right.grid(alpha=0.3)
    figure.suptitle(f"Prompt classifier (all-MiniLM-L6-v2 + head), CPU, {torch.get_num_threads()} torch threads; "
                    "2 shared cores, indicative")
    return save_figure(figure, "classifier_speed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls, shorter batch runs")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    settings = SETTINGS[mode]
    with tempfile.TemporaryDirectory(prefix="eco-bench-classifier-") as tmp:
        classifier, label = load_classifier(Path(tmp))
    print(f"classifier: {label}; torch threads {torch.get_num_threads()}", flush=True)
    short = [*UNFLAGGED_PROMPTS, *FLAGGED_PROMPTS]
    long = [long_prompt(p) for p in short]
    classifier.score_segments(short[:1])  # warm-up: first call builds the encoder's lazy state

    single = []
    for prompts_label, prompts in (("short (~10 words)", short), ("long (~250 words)", long)):
        for segments_label, segments_of in (("1 segment", lambda p: [p]), ("chat: 2 segments", chat_segments)):
            summary = single_latency(classifier, prompts, segments_of, settings["single"])
            single.append({"prompts": prompts_label, "segments": segments_label, **summary})
    print("\nSingle-prompt latency (ms):")
    print(format_table(single, ["prompts", "segments", "n", "mean_ms", "p50_ms", "p95_ms", "p99_ms"]))

    batches = [batch_throughput(classifier, short, b, settings["batches_s"]) for b in BATCH_SIZES]
    print("\nBatched throughput (predict_proba, short prompts):")
    print(format_table(batches, ["batch", "batches", "batch_p50_ms", "batch_p95_ms", "prompts_per_s"]))

    payload = {**result_header(), "mode": mode, "classifier": label, "torch_threads": torch.get_num_threads(),
               "single_prompt": single, "batched": batches}
    print(f"\nsaved {save_json('classifier_speed', payload)} and {plot(single, batches)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
