"""Learn the corruption strength through the live backend, without loading the LLM here.

Each evaluation embeds the probes exactly as the model does, corrupts them at the candidate
strength, and asks the served model (vLLM, `/v1/completions` with `prompt_embeds`) for the
answers. Two unlearning scores, both driven towards what a model that never knew the target
would do:

- probes: the share of knowledge probes whose completion contains the answer, driven to the
  rate on control probes about invented things the model cannot know;
- mc: multiple-choice accuracy from the next-token logprobs of the option letters, driven to
  chance.

The objective is |score(strength) - goal|; the zeroth-order optimiser minimises it.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from corruption.embedding_check import EmbeddingCheck, EmbeddingCheckResult, run_or_skip
from corruption.embeddings import EmbeddingTable
from corruption.fluency import fluency_report
from corruption.probes import MultipleChoice, Probe
from corruption.prompt import corrupted_embeddings, scope_mask
from corruption.spec import CorruptionSpec
from corruption.zo import ZerothOrderOptimizer, ZOStep
from vllm_client import BackendError, VllmClient, prompt_embeds_base64, request_body_with_embeds

RESULT_FORMAT = "eco-corruption-result/1"


class EmbedsBackend:
    """The served model, asked through `/v1/completions` with prompt embeddings."""

    def __init__(self, base_url: str, model: str | None = None, batch_size: int = 32,
                 concurrency: int = 4, timeout: float = 600.0):
        self.client = VllmClient(base_url, timeout=timeout, max_connections=concurrency)
        self.base_url = self.client.base_url
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.model = model or self.client.served_model()

    def complete(self, embeds: Sequence[torch.Tensor], max_tokens: int, logprobs: int | None = None,
                 progress: str | None = None) -> list[dict[str, Any]]:
        """One choice per prompt, in order; greedy."""
        batches = [list(embeds[i:i + self.batch_size]) for i in range(0, len(embeds), self.batch_size)]
        with ThreadPoolExecutor(self.concurrency) as pool, \
                tqdm(total=len(embeds), desc=progress, leave=False, disable=progress is None) as bar:
            def run(batch: list[torch.Tensor]) -> list[dict[str, Any]]:
                choices = self._request(batch, max_tokens, logprobs)
                bar.update(len(batch))
                return choices
            return [c for choices in pool.map(run, batches) for c in choices]

    def _request(self, batch: list[torch.Tensor], max_tokens: int, logprobs: int | None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0}
        if logprobs is not None:
            body["logprobs"] = logprobs
        answer = self.client.completions(request_body_with_embeds(body, [prompt_embeds_base64(e) for e in batch]))
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        if len(choices) != len(batch):
            raise BackendError(f"asked for {len(batch)} completions, got {len(choices)}")
        return choices

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class _Encoded:
    token_ids: list[int]
    mask: torch.Tensor


class CorruptionTrainer:
    """Measures unlearning scores at a strength and learns the strength that meets the goal.

    `samples` noise draws per prompt are averaged, so the learned strength holds for other
    keys (the serving key differs from the training key). Training first runs the embedding
    check (`verify_backend`): a strength learned on wrongly scaled embeddings means nothing.
    """

    def __init__(self, backend: EmbedsBackend, tokenizer: Any, embeddings: EmbeddingTable, spec: CorruptionSpec,
                 entities: Sequence[str] = (), secret_key: bytes = b"eco-corruption-training",
                 samples: int = 1, max_tokens: int = 8, check_embeddings: bool = True):
        spec.check_hidden_size(embeddings.hidden_size)
        if spec.strength is None:
            raise ValueError(f"method {spec.method} has no strength to learn")
        if spec.scope == "entities" and not entities:
            raise ValueError("scope 'entities' needs entity terms")
        self.backend = backend
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.spec = spec
        self.entities = list(entities)
        self.secret_key = secret_key
        self.samples = samples
        self.max_tokens = max_tokens
        self.check_embeddings = check_embeddings
        self.embedding_check: EmbeddingCheckResult | None = None

    def verify_backend(self) -> EmbeddingCheckResult:
        """The embedding check against the backend, once; BackendError when it reads our embeddings otherwise."""
        if self.embedding_check is None:
            check = EmbeddingCheck(self.tokenizer, self.embeddings, self.backend.model)
            result = run_or_skip(check, self.backend.base_url, skip=not self.check_embeddings)  # or BackendUnavailable
            if result.status == "failed":
                raise BackendError(result.message)
            self.embedding_check = result
        return self.embedding_check

    # -- scores -------------------------------------------------------------------------
    def probe_hit_rate(self, probes: Sequence[Probe], strength: float | Sequence[float] | None) -> float:
        outputs = self.generate([p.prompt for p in probes], strength, self.max_tokens)
        hits = [probe.answered_by(text) for probe, draws in zip(probes, outputs) for text in draws]
        return float(np.mean(hits))

    def mc_accuracy(self, questions: Sequence[MultipleChoice], strength: float | Sequence[float] | None) -> float:
        embeds = self._embeds([q.prompt() for q in questions], strength)
        choices = self.backend.complete([e for draws in embeds for e in draws], 1, logprobs=20, progress="mc")
        correct, i = [], 0
        for question, draws in zip(questions, embeds):
            for _ in draws:
                correct.append(_mc_pick(choices[i], len(question.choices)) == question.answer)
                i += 1
        return float(np.mean(correct))

    def generate(self, prompts: Sequence[str], strength: float | Sequence[float] | None,
                 max_tokens: int) -> list[list[str]]:
        """Greedy completions per prompt and noise draw (one draw when uncorrupted)."""
        embeds = self._embeds(prompts, strength)
        choices = iter(self.backend.complete([e for draws in embeds for e in draws], max_tokens, progress="probes"))
        return [[next(choices)["text"] for _ in draws] for draws in embeds]

    def _embeds(self, prompts: Sequence[str], strength: float | Sequence[float] | None) -> list[list[torch.Tensor]]:
        encoded = [self._encode(p) for p in prompts]
        if strength is None:
            return [[self.embeddings.embed(e.token_ids)] for e in encoded]
        spec = self.spec.with_strength(_as_strength(strength))
        return [[corrupted_embeddings(self.embeddings, e.token_ids, spec, e.mask, self.secret_key, f"draw-{draw}")
                 for draw in range(self.samples)] for e in encoded]

    def _encode(self, prompt: str) -> _Encoded:
        encoding = self.tokenizer(prompt, return_offsets_mapping=True)
        return _Encoded(list(encoding["input_ids"]),
                        scope_mask(self.spec, encoding["offset_mapping"], prompt, self.entities))

    # -- training -----------------------------------------------------------------------
    def train(self, score: Literal["probes", "mc"], data: Sequence[Probe] | Sequence[MultipleChoice],
              goal: float, optimizer: ZerothOrderOptimizer, initial: float | Sequence[float],
              log: Callable[[str], None] = print) -> dict[str, Any]:
        self.verify_backend()
        measure = self.probe_hit_rate if score == "probes" else self.mc_accuracy
        started = time.monotonic()
        baseline = measure(data, None)
        log(f"uncorrupted {score} score {baseline:.3f}, goal {goal:.3f}")
        scores: dict[tuple[float, ...], float] = {}

        def objective(strength: np.ndarray) -> float:
            key = tuple(np.round(strength, 6))
            if key not in scores:
                scores[key] = measure(data, strength.tolist())
            return abs(scores[key] - goal)

        trace: list[dict[str, Any]] = []

        def on_step(step: ZOStep) -> None:
            row = {"step": step.step, "strength": _scalar_or_list(step.strength),
                   "score": scores[tuple(np.round(step.strength, 6))], "objective": step.objective,
                   "gradient": _scalar_or_list(step.gradient), "evaluations": step.evaluations}
            trace.append(row)
            shown = f"{row['strength']:.3f}" if isinstance(row["strength"], float) else f"|{np.linalg.norm(step.strength):.3f}|"
            log(f"step {step.step:>3}  strength {shown}  score {row['score']:.3f}  "
                f"objective {step.objective:.3f}  evaluations {step.evaluations}")

        outcome = optimizer.minimize(objective, list(np.atleast_1d(initial)), on_step)
        learned = _scalar_or_list(outcome.strength)
        final_spec = self.spec.with_strength(learned)
        final_score = scores[tuple(np.round(outcome.strength, 6))]
        log(f"stopped: {outcome.stopped}; strength {learned if isinstance(learned, float) else '[vector]'}, "
            f"score {final_score:.3f} (goal {goal:.3f}, uncorrupted {baseline:.3f})")
        return {
            "format": RESULT_FORMAT,
            "spec": final_spec.model_dump(),
            "score": score,
            "goal": goal,
            "uncorrupted_score": baseline,
            "initial_strength": _scalar_or_list(list(np.atleast_1d(initial))),
            "final_score": final_score,
            "stopped": outcome.stopped,
            "trace": trace,
            "optimizer": {k: getattr(optimizer, k) for k in
                          ("lr", "mu", "max_steps", "n_directions", "target", "patience", "max_strength")},
            "samples": self.samples,
            "model": self.backend.model,
            "data": {"n": len(data), "sha256": _data_hash(data)},
            "seconds": round(time.monotonic() - started, 1),
            "embedding_check": self.embedding_check.status,
        }

    def fluency(self, prompts: Sequence[str], strength: float | Sequence[float], max_tokens: int = 32) -> dict[str, Any]:
        """Fluency of corrupted and uncorrupted continuations, side by side."""
        corrupted = [t for draws in self.generate(prompts, strength, max_tokens) for t in draws]
        clean = [t for draws in self.generate(prompts, None, max_tokens) for t in draws]
        return {"corrupted": fluency_report(corrupted), "uncorrupted": fluency_report(clean),
                "examples": [{"prompt": p, "corrupted": c} for p, c in zip(prompts[:5], corrupted[::self.samples])]}


def _mc_pick(choice: dict[str, Any], n_options: int) -> int | None:
    """The option letter with the highest next-token logprob among the top candidates."""
    top = (choice.get("logprobs") or {}).get("top_logprobs") or [{}]
    best: dict[int, float] = {}
    for token, logprob in top[0].items():
        letter = token.strip()
        if len(letter) == 1 and letter in MultipleChoice.LETTERS[:n_options]:
            index = MultipleChoice.LETTERS.index(letter)
            best[index] = max(best.get(index, -np.inf), logprob)
    return max(best, key=best.get) if best else None


def _as_strength(strength: float | Sequence[float]) -> float | list[float]:
    values = list(np.atleast_1d(strength).astype(float))
    return values[0] if len(values) == 1 else values


def _scalar_or_list(values: Sequence[float]) -> float | list[float]:
    values = [float(v) for v in values]
    return values[0] if len(values) == 1 else values


def _data_hash(data: Sequence[Probe] | Sequence[MultipleChoice]) -> str:
    return hashlib.sha256(json.dumps([repr(d) for d in data]).encode()).hexdigest()
