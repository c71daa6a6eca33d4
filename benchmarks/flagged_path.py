"""Figure 3 — what a flagged prompt costs, by prompt length and by the model's hidden size.

For prompts of 16 ... 8192 tokens and hidden sizes 640 ... 8192, times each step the proxy
takes for a flagged prompt: tokenisation (the gemma tokenizer, offsets included, as the
proxy asks), embedding lookup (`EmbeddingTable.embed` on a memory-mapped bf16 table),
corruption (`corruption.functions.corrupt`, Gaussian noise, with its keyed generator) and
serialisation: the tensor to base64 (`corruption.payload.encode_prompt_embeds`) plus the
JSON request body around it (`request_body_with_embeds`); and the payload size.

The embedding tables are synthetic (random bf16, `LlamaForCausalLM` config, vocabulary
32k) in a temporary directory; one extra table with a 262k vocabulary at hidden 4096 shows
that lookup does not grow with the table (i.e. the model's parameter count).

"before" columns time the serialisation the proxy used until the goal was missed (zip-format
`torch.save`, standard library base64, then `json.dumps` of the whole body), kept here for the
before/after record;
both encodings are checked to decode to the same tensor the way vLLM decodes. With a backend
reachable, one flagged-path body is also sent to it and its answer compared with the text
prompt's.

Goal: serialisation (tensor to request bytes) <= 10 ms per 1k tokens at hidden 4096.

    .venv/bin/python benchmarks/flagged_path.py [--quick] [--torch-threads N]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pybase64
import torch
from _common import (
    DEFAULT_BACKEND_URL,
    FLAGGED_PROMPTS,
    UNFLAGGED_PROMPTS,
    format_table,
    pyplot,
    resolve_model_dir,
    result_header,
    save_figure,
    save_json,
)

from corruption.embeddings import EmbeddingTable
from corruption.functions import corrupt
from corruption.keys import keyed_generator
from vllm_client import BackendError, VllmClient
from vllm_client.embeds import prompt_embeds_base64, request_body_with_embeds
from corruption.spec import CorruptionSpec

LENGTHS = (16, 64, 256, 1024, 4096, 8192)
HIDDEN_SIZES = (640, 1024, 2048, 4096, 8192)
VOCAB = 32_000
LARGE_VOCAB = 262_144  # Gemma 3's vocabulary: a 2 GiB table at hidden 4096
GOAL_HIDDEN, GOAL_MS_PER_1K = 4096, 10.0
SECRET = b"benchmark-secret-key"
# Per measurement: at least MIN_REPS repetitions, at most `reps`, within a time budget.
MIN_REPS = 3
SETTINGS = {"quick": {"reps": 7, "budget_s": 0.4}, "full": {"reps": 30, "budget_s": 2.0}}


def timed(function: Callable[[], Any], reps: int, budget_s: float) -> float:
    """Median seconds of `function` after one warm-up call."""
    function()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < MIN_REPS or (len(times) < reps and time.perf_counter() < deadline):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def write_table(directory: Path, vocab: int, hidden: int, seed: int = 0) -> Path:
    """A model directory with only what EmbeddingTable reads: config.json and a bf16 embedding in safetensors.

    Written in row chunks so a multi-gigabyte table never has to sit in memory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "vocab_size": vocab, "torch_dtype": "bfloat16"}))
    header = json.dumps({"model.embed_tokens.weight": {
        "dtype": "BF16", "shape": [vocab, hidden], "data_offsets": [0, vocab * hidden * 2]}}).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    generator = torch.Generator().manual_seed(seed)
    with (directory / "model.safetensors").open("wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        rows_per_chunk = max(1, (32 << 20) // (hidden * 2))
        for start in range(0, vocab, rows_per_chunk):
            rows = min(rows_per_chunk, vocab - start)
            chunk = torch.randn(rows, hidden, generator=generator).to(torch.bfloat16)
            handle.write(chunk.view(torch.int16).numpy().tobytes())
    return directory


def text_of_length(tokenizer: Any, tokens: int) -> str:
    """English text that the tokenizer splits into about `tokens` tokens (its <bos> included)."""
    sentences = [f"{p} (note {i})" for i in range(1 + tokens // 8) for p in (*UNFLAGGED_PROMPTS, *FLAGGED_PROMPTS)]
    ids: list[int] = []
    paragraph = 0
    while len(ids) < tokens:
        paragraph += 1
        ids = tokenizer(" ".join(sentences[: 16 * paragraph]), add_special_tokens=False).input_ids
    return tokenizer.decode(ids[: tokens - 1])


def corrupt_all(embeds: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """What the proxy does to a flagged prompt: Gaussian noise on every dimension, keyed by the prompt."""
    spec = CorruptionSpec(method="gaussian_first_n", dims=embeds.shape[1], sigma=1.0)
    mask = torch.ones(embeds.shape[0], dtype=torch.bool)
    return corrupt(embeds, spec, mask, keyed_generator(SECRET, token_ids, "bench"))


def serialise(embeds: torch.Tensor, body: dict[str, Any]) -> list[bytes]:
    """The proxy's serialisation: tensor to base64, and the JSON request body as parts around it."""
    return request_body_with_embeds(body, prompt_embeds_base64(embeds))


def serialise_before(embeds: torch.Tensor, body: dict[str, Any]) -> bytes:
    """The earlier serialisation, for the before/after record: zip format, stdlib base64, json.dumps over it all."""
    buffer = io.BytesIO()
    torch.save(embeds.contiguous(), buffer)
    return json.dumps({**body, "prompt_embeds": base64.b64encode(buffer.getvalue()).decode("ascii")}).encode()


def decode_as_vllm(body: bytes | list[bytes]) -> torch.Tensor:
    """What vLLM does with the `prompt_embeds` of a request body (vllm/renderers/embed_utils.py), minus its checks."""
    raw = pybase64.b64decode(json.loads(b"".join(body) if isinstance(body, list) else body)["prompt_embeds"],
                             validate=True)
    return torch.load(io.BytesIO(raw), weights_only=True, map_location=torch.device("cpu"))


def measure_point(table: EmbeddingTable, tokens: int, reps: int, budget: float,
                  rng: np.random.Generator) -> dict[str, Any]:
    ids = rng.integers(0, table.vocab_size, size=tokens).tolist()
    embeds = table.embed(ids)
    body = {"model": "bench", "max_tokens": 8, "temperature": 0, "stream": True}
    for encoded in (serialise(embeds, body), serialise_before(embeds, body)):
        if not torch.equal(decode_as_vllm(encoded), embeds):
            raise AssertionError("a serialisation does not decode to the tensor it was given")
    row: dict[str, Any] = {"tokens": tokens, "hidden": table.hidden_size, "vocab": table.vocab_size,
                           "payload_MiB": sum(len(part) for part in serialise(embeds, body)) / 2**20}
    row["lookup_ms"] = 1000 * timed(lambda: table.embed(ids), reps, budget)
    row["corrupt_ms"] = 1000 * timed(lambda: corrupt_all(embeds, ids), reps, budget)
    row["serialise_ms"] = 1000 * timed(lambda: serialise(embeds, body), reps, budget)
    row["serialise_before_ms"] = 1000 * timed(lambda: serialise_before(embeds, body), reps, budget)
    return row


def profile_serialisation(table: EmbeddingTable, tokens: int) -> dict[str, Any]:
    """Where the serialisation spends its time, step by step, now and before."""
    embeds = table.embed(list(range(tokens)))
    buffer = io.BytesIO()
    torch.save(embeds, buffer)
    zipped = buffer.getvalue()
    encoded = prompt_embeds_base64(embeds)
    body = {"model": "bench", "max_tokens": 8}
    steps = {
        "torch.save (legacy format)": lambda: torch.save(embeds, io.BytesIO(), _use_new_zipfile_serialization=False),
        "pybase64.b64encode": lambda: pybase64.b64encode(zipped),
        "request_body_with_embeds": lambda: request_body_with_embeds(body, encoded),
        "before: torch.save (zip format)": lambda: torch.save(embeds, io.BytesIO()),
        "before: base64.b64encode + decode": lambda: base64.b64encode(zipped).decode("ascii"),
        "before: json.dumps(body)": lambda: json.dumps({**body, "prompt_embeds": encoded.decode("ascii")}).encode(),
    }
    return {"tokens": tokens, "hidden": table.hidden_size,
            "steps_ms": {name: 1000 * timed(step, 10, 1.0) for name, step in steps.items()}}


def backend_check(backend_url: str, model_dir: Path, tokenizer: Any) -> dict[str, Any]:
    """One prompt through a live vLLM as the proxy sends it, against the same prompt as text (greedy)."""
    with VllmClient(backend_url, timeout=120) as client:
        try:
            model = client.served_model()
        except BackendError:
            return {"checked": False, "reason": f"no backend at {backend_url}"}
        prompt = "The headmaster of Hogwarts is Albus"
        embeds = EmbeddingTable.from_model_dir(model_dir).embed(tokenizer(prompt).input_ids)
        body = {"model": model, "max_tokens": 4, "temperature": 0}
        answers = {}
        for name, request in (("text", {**body, "prompt": prompt}), ("prompt_embeds", serialise(embeds, body))):
            reply = client.request_json("POST", "/v1/completions", request)
            answers[name] = reply.body["choices"][0]["text"] if reply.status == 200 else (
                f"HTTP {reply.status}: {reply.text[:200]}")
    return {"checked": True, "backend": backend_url, "answers": answers,
            "all_equal": len(set(answers.values())) == 1}


def plot(rows: list[dict[str, Any]], tokenise: dict[int, float]) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    steps = (("lookup_ms", "lookup", "-o", "tab:orange"), ("corrupt_ms", "corrupt", "-o", "tab:green"),
             ("serialise_ms", "serialise", "-o", "tab:red"), ("serialise_before_ms", "serialise, before", ":x", "tab:red"))
    goal_rows = [r for r in rows if r["hidden"] == GOAL_HIDDEN and r["vocab"] == VOCAB]
    ax = axes[0]
    xs = [r["tokens"] for r in goal_rows]
    ax.plot(list(tokenise), list(tokenise.values()), "-o", color="tab:blue", label="tokenise (gemma)")
    for key, label, style, colour in steps:
        ax.plot(xs, [r[key] for r in goal_rows], style, color=colour, label=label)
    ax.plot(xs, [GOAL_MS_PER_1K * t / 1024 for t in xs], "k--", label="goal: 10 ms per 1k tokens")
    ax.set_title(f"steps vs prompt length (hidden {GOAL_HIDDEN})")
    ax.set_xlabel("prompt tokens")
    ax = axes[1]
    at_1k = [r for r in rows if r["tokens"] == 1024 and r["vocab"] == VOCAB]
    for key, label, style, colour in steps:
        ax.plot([r["hidden"] for r in at_1k], [r[key] for r in at_1k], style, color=colour, label=label)
    ax.axhline(GOAL_MS_PER_1K, color="k", linestyle="--", label="goal at hidden 4096")
    ax.set_title("steps vs hidden size (1024 tokens)")
    ax.set_xlabel("hidden size")
    ax = axes[2]
    for vocab, style in ((VOCAB, "-o"), (LARGE_VOCAB, "--s")):
        selected = [r for r in rows if r["hidden"] == GOAL_HIDDEN and r["vocab"] == vocab]
        ax.plot([r["tokens"] for r in selected], [r["lookup_ms"] for r in selected], style,
                label=f"lookup, vocab {vocab:,} ({vocab * GOAL_HIDDEN * 2 / 2**30:.2f} GiB table)")
    ax.set_title(f"lookup vs table size (hidden {GOAL_HIDDEN})")
    ax.set_xlabel("prompt tokens")
    for ax in axes:
        ax.set_ylabel("ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    figure.suptitle("Flagged-path cost (2 shared CPU cores; indicative)")
    return save_figure(figure, "flagged_path")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions per measurement")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="CPU threads for torch, as `eco-proxy serve --torch-threads` (default 1, as there)")
    parser.add_argument("--model-dir", help="the gemma directory for the tokenizer (default: the prepared model)")
    parser.add_argument("--backend-url", default=DEFAULT_BACKEND_URL,
                        help="a vLLM to check the alternative encodings against (skipped if unreachable)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    mode = "quick" if args.quick else "full"
    reps, budget = SETTINGS[mode]["reps"], SETTINGS[mode]["budget_s"]
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # long prompts exceed the tokenizer's nominal max length; that is the point
    model_dir = resolve_model_dir(args.model_dir, args.backend_url)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"torch threads {torch.get_num_threads()}", flush=True)

    tokenise: dict[int, float] = {}
    token_counts: dict[int, int] = {}
    for tokens in LENGTHS:
        text = text_of_length(tokenizer, tokens)
        token_counts[tokens] = len(tokenizer(text).input_ids)
        tokenise[tokens] = 1000 * timed(lambda: tokenizer(text, return_offsets_mapping=True), reps, budget)

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="eco-bench-flagged-") as tmp:
        tables = [(VOCAB, hidden) for hidden in HIDDEN_SIZES] + [(LARGE_VOCAB, GOAL_HIDDEN)]
        profile = None
        for vocab, hidden in tables:
            print(f"table vocab {vocab:,} x hidden {hidden} ({vocab * hidden * 2 / 2**20:,.0f} MiB) ...", flush=True)
            table = EmbeddingTable.from_model_dir(write_table(Path(tmp) / f"v{vocab}-h{hidden}", vocab, hidden))
            for tokens in LENGTHS:
                if vocab == LARGE_VOCAB:  # only lookup depends on the table; the other steps were timed above
                    ids = rng.integers(0, vocab, size=tokens).tolist()
                    table.embed(ids)
                    rows.append({"tokens": tokens, "hidden": hidden, "vocab": vocab,
                                 "lookup_ms": 1000 * timed(lambda: table.embed(ids), reps, budget)})
                    continue
                row = measure_point(table, tokens, reps, budget, rng)
                row["tokenise_ms"] = tokenise[tokens]
                rows.append(row)
            if hidden == GOAL_HIDDEN and vocab == VOCAB:
                profile = profile_serialisation(table, 1024)

    columns = ["tokens", "hidden", "vocab", "tokenise_ms", "lookup_ms", "corrupt_ms", "serialise_ms",
               "serialise_before_ms", "payload_MiB"]
    print("\nFlagged-path steps (median ms per prompt):")
    print(format_table(rows, columns))

    goal_row = next(r for r in rows if r["hidden"] == GOAL_HIDDEN and r["tokens"] == 1024 and r["vocab"] == VOCAB)
    per_1k = {r["tokens"]: r["serialise_ms"] * 1024 / r["tokens"] for r in rows
              if r["hidden"] == GOAL_HIDDEN and r["vocab"] == VOCAB and r["tokens"] >= 1024}
    before_1k = {r["tokens"]: r["serialise_before_ms"] * 1024 / r["tokens"] for r in rows
                 if r["hidden"] == GOAL_HIDDEN and r["vocab"] == VOCAB and r["tokens"] >= 1024}
    goal = {"hidden": GOAL_HIDDEN, "goal_ms_per_1k_tokens": GOAL_MS_PER_1K, "serialise_ms_per_1k_tokens": per_1k,
            "before_ms_per_1k_tokens": before_1k, "met": max(per_1k.values()) <= GOAL_MS_PER_1K,
            "before_over_after_at_1k": goal_row["serialise_before_ms"] / goal_row["serialise_ms"]}
    lookup_small = {r["tokens"]: r["lookup_ms"] for r in rows if r["hidden"] == GOAL_HIDDEN and r["vocab"] == VOCAB}
    lookup_large = {r["tokens"]: r["lookup_ms"] for r in rows if r["vocab"] == LARGE_VOCAB}
    print(f"\nGoal (serialisation <= {GOAL_MS_PER_1K} ms per 1k tokens at hidden {GOAL_HIDDEN}): "
          f"{'MET' if goal['met'] else 'MISSED'} — {goal_row['serialise_ms']:.2f} ms at 1024 tokens; per 1k at longer "
          f"prompts: " + ", ".join(f"{t}: {v:.2f}" for t, v in per_1k.items()))
    print("before (stdlib base64 + json.dumps), per 1k tokens: " + ", ".join(
        f"{t}: {v:.2f}" for t, v in before_1k.items()) + f"; before/after at 1024 tokens "
          f"{goal['before_over_after_at_1k']:.1f}x")
    print("lookup, vocab 32k vs 262k at hidden 4096 (ms): " + ", ".join(
        f"{t}: {lookup_small[t]:.3f} vs {lookup_large[t]:.3f}" for t in LENGTHS))
    print("\nserialisation step by step at 1024 x 4096 (ms): " + ", ".join(
        f"{k} {v:.2f}" for k, v in profile["steps_ms"].items()))
    check = backend_check(args.backend_url, model_dir, tokenizer)
    print(f"backend check (text prompt vs the proxy's prompt_embeds body): {check}")

    payload = {**result_header(), "mode": mode, "torch_threads": torch.get_num_threads(),
               "corruption_spec": "gaussian_first_n over all dims, sigma 1.0, scope all",
               "tokeniser": str(model_dir.name), "token_counts": token_counts, "tokenise_ms": tokenise,
               "goal": goal, "lookup_vs_vocab": {"vocab_32k": lookup_small, "vocab_262k": lookup_large},
               "serialisation_profile": profile, "backend_check": check, "rows": rows}
    print(f"\nsaved {save_json('flagged_path', payload)} and {plot(rows, tokenise)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
