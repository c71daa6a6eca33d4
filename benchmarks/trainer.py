"""Figure 5 — what the zeroth-order corruption trainer costs until it converges.

Runs `corruption.trainer.CorruptionTrainer` (the code behind `eco-proxy corruption train`)
against a live vLLM on the demo target's data, from a few starting strengths, and counts:
objective evaluations, HTTP requests to the backend, corrupted prompts generated, and wall
time until the optimiser stops. Two scores: knowledge probes (train split of the kept Harry
Potter probes, goal = the control probes' rate) and multiple choice (goal = chance).

    .venv/bin/python benchmarks/trainer.py [--quick] [--backend-url URL] [--model-dir DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_BACKEND_URL,
    REPO_ROOT,
    format_table,
    pyplot,
    resolve_model_dir,
    result_header,
    save_figure,
    save_json,
)

from evaluation.demo_build import train_split_probes
from corruption.embeddings import EmbeddingTable
from corruption.probes import read_multiple_choice, read_probes
from corruption.spec import CorruptionSpec
from corruption.trainer import CorruptionTrainer, EmbedsBackend
from corruption.zo import ZerothOrderOptimizer

DEMO = REPO_ROOT / "demo" / "harry_potter"


class CountingBackend(EmbedsBackend):
    """The real backend client, counting the HTTP requests and prompts it sends."""

    requests = 0
    prompts = 0

    def _request(self, batch, max_tokens, logprobs, extra=None):
        self.requests += 1
        self.prompts += len(batch)
        return super()._request(batch, max_tokens, logprobs, extra)


def run(score: str, initial: float, backend: CountingBackend, tokenizer: Any, embeddings: EmbeddingTable,
        data: list, goal: float, steps: int, samples: int) -> dict[str, Any]:
    spec = CorruptionSpec(method="gaussian_first_n", dims=embeddings.hidden_size, sigma=initial)
    trainer = CorruptionTrainer(backend, tokenizer, embeddings, spec, samples=samples)
    optimizer = ZerothOrderOptimizer(max_steps=steps)
    backend.requests = backend.prompts = 0
    started = time.perf_counter()
    result = trainer.train(score, data, goal, optimizer, initial, log=lambda line: print(f"  {line}"))
    seconds = time.perf_counter() - started
    return {"score": score, "initial_sigma": initial, "goal": round(goal, 3),
            "uncorrupted": round(result["uncorrupted_score"], 3), "steps": len(result["trace"]),
            "evaluations": result["trace"][-1]["evaluations"] if result["trace"] else 1,
            "backend_requests": backend.requests, "prompts_generated": backend.prompts,
            "seconds": round(seconds, 1), "learned_sigma": round(result["spec"]["sigma"], 3),
            "final_score": round(result["final_score"], 3), "stopped": result["stopped"],
            "trace": result["trace"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-url", default=DEFAULT_BACKEND_URL)
    parser.add_argument("--model-dir", help="the served model's directory (default: asked from the backend)")
    parser.add_argument("--quick", action="store_true", help="one probe run of 4 steps")
    parser.add_argument("--samples", type=int, default=3, help="noise draws per prompt, as `make demo-artifacts`")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(args.model_dir, args.backend_url)
    embeddings = EmbeddingTable.from_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backend = CountingBackend(args.backend_url)
    steps = 4 if args.quick else 12
    with tempfile.TemporaryDirectory() as workdir:
        probes = read_probes(train_split_probes(DEMO / "probes.kept.jsonl", Path(workdir)))
    control = read_probes(DEMO / "control_probes.jsonl")
    questions = read_multiple_choice(DEMO / "mc.jsonl")
    probe_goal = CorruptionTrainer(backend, tokenizer, embeddings,
                                   CorruptionSpec(method="gaussian_first_n", dims=embeddings.hidden_size, sigma=1.0)
                                   ).probe_hit_rate(control, None)
    chance = sum(q.chance for q in questions) / len(questions)

    plan = [("probes", 0.1)] if args.quick else [("probes", 0.05), ("probes", 0.1), ("probes", 0.3), ("mc", 0.1)]
    rows = []
    for score, initial in plan:
        print(f"{score} from sigma {initial}:")
        data, goal = (probes, probe_goal) if score == "probes" else (questions, chance)
        rows.append(run(score, initial, backend, tokenizer, embeddings, data, goal, steps, args.samples))
    backend.close()

    columns = ["score", "initial_sigma", "goal", "uncorrupted", "steps", "evaluations", "backend_requests",
               "prompts_generated", "seconds", "learned_sigma", "final_score", "stopped"]
    print(format_table(rows, columns))
    payload = {**result_header(), "model": backend.model, "model_dir": str(model_dir),
               "n_probes": len(probes), "n_mc": len(questions), "samples": args.samples, "runs": rows}
    print(f"wrote {save_json('trainer', payload)}")

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for row in rows:
        axis.plot([t["evaluations"] for t in row["trace"]], [t["score"] for t in row["trace"]], marker="o",
                  label=f"{row['score']}, from σ={row['initial_sigma']} (goal {row['goal']})")
    axis.set_xlabel("objective evaluations (each: one corrupted pass over the data)")
    axis.set_ylabel("unlearning score")
    axis.set_title(f"zeroth-order trainer on {backend.model}")
    axis.legend()
    print(f"wrote {save_figure(figure, 'trainer')}")


if __name__ == "__main__":
    main()
