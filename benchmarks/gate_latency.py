"""The gate's cost on ONE torch thread, as the proxy runs it, for several artifacts side by side in one run:
new short prompts, 2,000-word prompts, and a short prompt's time while a long prompt full of the
target is being classified at the same moment (the batching runner's fair passes).

Every prompt is new (the classifier's cache is off), so each one pays for the first stage, and for
the encoder on whatever pieces the first stage passes. The long benign prompts are 2,000-word
stretches of the benign long documents in the gate's training data; the long target prompt is
2,000 words of the training split's forget prompts, so that most of its pieces reach the encoder.

    .venv/bin/python benchmarks/gate_latency.py --artifact demo/harry_potter/classifier \
        --artifact demo/harry_potter/classifier-logistic [--count 100]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from _common import (
    FLAGGED_PROMPTS,
    REPO_ROOT,
    UNFLAGGED_PROMPTS,
    FreshPrompts,
    format_table,
    result_header,
    save_json,
    summarize_ms,
)

from classifier import load_classifier
from classifier.batching import GIL_SWITCH_INTERVAL
from classifier.gate_data import load_records

LONG_WORDS = 2000


def long_prompts(gate_train: Path, count: int, label: str, group: str | None) -> list[str]:
    """`count` different 2,000-word stretches of the training data's texts of one label (and group)."""
    records = [r for r in load_records(gate_train) if r.label == label and (group is None or r.group == group)]
    words = " ".join(r.text for r in records).split()
    step = max(1, (len(words) - LONG_WORDS) // count)
    return [" ".join(words[start:start + LONG_WORDS]) for start in range(0, step * count, step)][:count]


def timed(score, prompts: list[str]) -> list[float]:
    seconds = []
    for prompt in prompts:
        started = time.perf_counter()
        score([prompt])
        seconds.append(time.perf_counter() - started)
    return seconds


def short_while_long(score, shorts: list[str], longs: list[str]) -> list[float]:
    """Short prompts' times while another caller keeps classifying long target-heavy prompts."""
    stop = threading.Event()

    def keep_busy() -> None:
        index = 0
        while not stop.is_set():
            score([longs[index % len(longs)] + f" ({index})"])
            index += 1

    worker = threading.Thread(target=keep_busy)
    worker.start()
    time.sleep(0.2)
    try:
        return timed(score, shorts)
    finally:
        stop.set()
        worker.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, action="append", required=True, help="repeat to compare")
    parser.add_argument("--gate-train", type=Path, default=REPO_ROOT / "demo" / "harry_potter" / "gate" / "train")
    parser.add_argument("--count", type=int, default=100, help="short prompts of each kind")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)  # as the proxy runs
    long_count = max(1, args.count // 5)
    benign_long = long_prompts(args.gate_train, long_count, "retain", "long_documents")
    target_long = long_prompts(args.gate_train, long_count, "forget", None)
    rows = []
    for artifact in args.artifact:
        # The proxy's arrangement: one torch thread that every caller's passes run on.
        classifier = load_classifier(artifact, executor=ThreadPoolExecutor(1, initializer=torch.set_num_threads,
                                                                           initargs=(1,)), cache_size=0)
        # As the guard calls it: with the threshold it decides by (the fine-tuned gate stops at a flagged piece).
        score = partial(classifier.score_segments, stop_above=classifier.threshold_)
        score(["warm-up: the first pass allocates"])
        benign, target = FreshPrompts(UNFLAGGED_PROMPTS), FreshPrompts(FLAGGED_PROMPTS)
        kinds = {
            "short, benign": lambda: timed(score, [benign() for _ in range(args.count)]),
            "short, target": lambda: timed(score, [target() for _ in range(args.count)]),
            f"{LONG_WORDS} words, benign": lambda: timed(score, benign_long),
            f"{LONG_WORDS} words, target": lambda: timed(score, target_long),
            f"short, benign, while {LONG_WORDS} words of target run": lambda: short_while_long(
                score, [benign() for _ in range(args.count)], target_long),
        }
        for kind, run in kinds.items():
            rows.append({"artifact": str(artifact), "kind": classifier.kind, "prompts": kind,
                         **summarize_ms(run())})
    print("1 torch thread, cache off, every prompt new")
    print(format_table(rows, ["artifact", "kind", "prompts", "n", "p50_ms", "p95_ms", "p99_ms"]))
    path = save_json("gate_latency", {**result_header(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
