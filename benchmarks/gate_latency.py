"""The gate's cost on ONE torch thread, as the proxy runs it: new short prompts, and 2,000-word prompts.

Every prompt is new (the classifier's cache is off), so each one pays for the first stage, and for
the encoder on whatever pieces the first stage passes. The long prompts are 2,000-word stretches
of the benign long documents in the gate's training data.

    .venv/bin/python benchmarks/gate_latency.py --artifact demo/harry_potter/classifier [--count 100]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import FLAGGED_PROMPTS, REPO_ROOT, UNFLAGGED_PROMPTS, FreshPrompts, format_table, summarize_ms

from classifier import load_classifier
from classifier.gate_data import load_records

LONG_WORDS = 2000


def long_prompts(gate_train: Path, count: int) -> list[str]:
    """`count` different 2,000-word stretches of the benign long documents."""
    words = " ".join(r.text for r in load_records(gate_train) if r.group == "long_documents").split()
    step = max(1, (len(words) - LONG_WORDS) // count)
    return [" ".join(words[start:start + LONG_WORDS]) for start in range(0, step * count, step)]


def timed(score, prompts: list[str]) -> list[float]:
    seconds = []
    for prompt in prompts:
        started = time.perf_counter()
        score([prompt])
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--gate-train", type=Path, default=REPO_ROOT / "demo" / "harry_potter" / "gate" / "train")
    parser.add_argument("--count", type=int, default=100, help="prompts of each kind")
    args = parser.parse_args()
    torch.set_num_threads(1)
    classifier = load_classifier(args.artifact, cache_size=0)
    classifier.score_segments(["warm-up: the first pass allocates"])
    benign, target = FreshPrompts(UNFLAGGED_PROMPTS), FreshPrompts(FLAGGED_PROMPTS)
    kinds = {
        "short, benign": [benign() for _ in range(args.count)],
        "short, target": [target() for _ in range(args.count)],
        f"{LONG_WORDS} words, benign": long_prompts(args.gate_train, max(1, args.count // 5)),
    }
    rows = []
    for kind, prompts in kinds.items():
        summary = summarize_ms(timed(classifier.score_segments, prompts))
        rows.append({"prompts": kind, **summary})
    print(f"{args.artifact} ({classifier.kind}), 1 torch thread, cache off")
    print(format_table(rows, ["prompts", "n", "mean_ms", "p50_ms", "p95_ms", "p99_ms"]))


if __name__ == "__main__":
    main()
