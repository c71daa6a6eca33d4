"""Learn the corruption strength through the live backend, without loading the LLM here.

Each evaluation embeds the probes exactly as the model does, corrupts them at the candidate
strength, and asks the served model (vLLM, `/v1/completions` with `prompt_embeds`) for the
answers. Two unlearning scores, both driven towards what a model that never knew the target
would do:

- probes: the share of knowledge probes whose completion contains the answer, driven to what the
  uncorrupted model does on their counterfactual twins, per probe kind (`answers_by_kind` of the
  twins, corruption/counterfactual.py), or to one rate (the control probes' about invented things
  the model cannot know);
- mc: multiple-choice accuracy, driven to chance. The pick is the option letter with the highest
  next-token probability among the letters alone: the request constrains the next token to the
  letters (vLLM's `structured_outputs` choice, " A" and "A" both, as the prompt ends with
  "Answer:"), so every letter's logprob comes back however the corruption moved the rest; a
  corrupted model that stops answering in letters still picks one, and breaking the format does
  not count as forgetting.

The objective is |score(strength) - goal|, or with a goal per kind the mean over probes of
|rate of the probe's kind - goal of that kind|; the zeroth-order optimiser minimises it.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from corruption.embedding_check import EmbeddingCheck, EmbeddingCheckResult, run_or_skip
from corruption.counterfactual import by_kind
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
                 progress: str | None = None, extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """One choice per prompt, in order; greedy. `extra`: more request fields (e.g. structured_outputs)."""
        batches = [list(embeds[i:i + self.batch_size]) for i in range(0, len(embeds), self.batch_size)]
        with ThreadPoolExecutor(self.concurrency) as pool, \
                tqdm(total=len(embeds), desc=progress, leave=False, disable=progress is None) as bar:
            def run(batch: list[torch.Tensor]) -> list[dict[str, Any]]:
                choices = self._request(batch, max_tokens, logprobs, extra)
                bar.update(len(batch))
                return choices
            return [c for choices in pool.map(run, batches) for c in choices]

    def _request(self, batch: list[torch.Tensor], max_tokens: int, logprobs: int | None,
                 extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0, **(extra or {})}
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
        return float(np.mean(self.probe_hits(probes, strength)))

    def probe_hits(self, probes: Sequence[Probe], strength: float | Sequence[float] | None) -> list[float]:
        """Per probe, the share of its noise draws whose completion contains an answer."""
        outputs = self.generate([p.prompt for p in probes], strength, self.max_tokens)
        return [float(np.mean([probe.answered_by(text) for text in draws])) for probe, draws in zip(probes, outputs)]

    def answers_by_kind(self, probes: Sequence[Probe], strength: float | Sequence[float] | None = None
                        ) -> dict[str, list[bool]]:
        """Per probe kind, whether each probe and noise draw was answered. Uncorrupted (the default) on
        counterfactual twins, this is the reference for "never learned" (evaluation.metrics.answer_rate_by_kind
        gives its rates with Wilson intervals; corruption/ does not import that room)."""
        outputs = self.generate([p.prompt for p in probes], strength, self.max_tokens)
        return by_kind([p for p, draws in zip(probes, outputs) for _ in draws],
                       [p.answered_by(text) for p, draws in zip(probes, outputs) for text in draws])

    def mc_accuracy(self, questions: Sequence[MultipleChoice], strength: float | Sequence[float] | None) -> float:
        return float(np.mean([pick == q.answer for q, picks in zip(questions, self.mc_picks(questions, strength))
                              for pick in picks]))

    def mc_picks(self, questions: Sequence[MultipleChoice], strength: float | Sequence[float] | None
                 ) -> list[list[int]]:
        """Per question and noise draw, the index of the option letter the model picks."""
        embeds = self._embeds([q.prompt() for q in questions], strength)
        picks: list[list[int]] = [[] for _ in questions]
        for n_options in sorted({len(q.choices) for q in questions}):  # one allowed set of letters per request
            asked = [i for i, q in enumerate(questions) if len(q.choices) == n_options]
            choices = iter(self.backend.complete([e for i in asked for e in embeds[i]], 1, logprobs=MC_LOGPROBS,
                                                 progress="mc", extra=_letters_only(n_options)))
            for i in asked:
                picks[i] = [_mc_pick(next(choices), n_options) for _ in embeds[i]]
        return picks

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
              goal: float | Mapping[str, float], optimizer: ZerothOrderOptimizer, initial: float | Sequence[float],
              log: Callable[[str], None] = print) -> dict[str, Any]:
        """Learns the strength whose score is nearest `goal`: one rate, or (probes) a rate per probe kind."""
        measure = self._measure(score, data, goal)
        self.verify_backend()
        started = time.monotonic()
        baseline = measure(None)
        log(f"uncorrupted {score} score {_shown(baseline)}, goal {_shown(goal)}")
        scores: dict[tuple[float, ...], _Score] = {}

        def objective(strength: np.ndarray) -> float:
            key = tuple(np.round(strength, 6))
            if key not in scores:
                scores[key] = measure(strength.tolist())
            return scores[key].distance(goal)

        trace: list[dict[str, Any]] = []

        def on_step(step: ZOStep) -> None:
            measured = scores[tuple(np.round(step.strength, 6))]
            row = {"step": step.step, "strength": _scalar_or_list(step.strength), "score": measured.overall,
                   **({"score_by_kind": measured.by_kind} if measured.by_kind else {}), "objective": step.objective,
                   "gradient": _scalar_or_list(step.gradient), "evaluations": step.evaluations}
            trace.append(row)
            shown = f"{row['strength']:.3f}" if isinstance(row["strength"], float) else f"|{np.linalg.norm(step.strength):.3f}|"
            log(f"step {step.step:>3}  strength {shown}  score {_shown(measured)}  "
                f"objective {step.objective:.3f}  evaluations {step.evaluations}")

        outcome = optimizer.minimize(objective, list(np.atleast_1d(initial)), on_step)
        learned = _scalar_or_list(outcome.strength)
        final_spec = self.spec.with_strength(learned)
        final = scores[tuple(np.round(outcome.strength, 6))]
        log(f"stopped: {outcome.stopped}; strength {learned if isinstance(learned, float) else '[vector]'}, "
            f"score {_shown(final)} (goal {_shown(goal)}, uncorrupted {_shown(baseline)})")
        by_kind = {"uncorrupted_score_by_kind": baseline.by_kind, "final_score_by_kind": final.by_kind} \
            if isinstance(goal, Mapping) else {}
        return {
            "format": RESULT_FORMAT,
            "spec": final_spec.model_dump(),
            "score": score,
            "goal": dict(goal) if isinstance(goal, Mapping) else goal,
            "uncorrupted_score": baseline.overall,
            "initial_strength": _scalar_or_list(list(np.atleast_1d(initial))),
            "final_score": final.overall,
            **by_kind,
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

    def _measure(self, score: Literal["probes", "mc"], data: Sequence[Probe] | Sequence[MultipleChoice],
                 goal: float | Mapping[str, float]) -> Callable[[float | Sequence[float] | None], _Score]:
        """The score at a strength, per probe kind when the goal is; ValueError when the goal does not fit the data."""
        if not isinstance(goal, Mapping):
            if score == "mc":
                return lambda strength: _Score(self.mc_accuracy(data, strength))
            return lambda strength: _Score(self.probe_hit_rate(data, strength))
        if score != "probes":
            raise ValueError("a goal per probe kind needs score 'probes'")
        kinds = [p.kind for p in data]
        if None in kinds:
            raise ValueError("a goal per probe kind needs probes with a kind (eco-proxy corruption counterfactual)")
        if missing := sorted(set(kinds) - set(goal)):
            raise ValueError(f"no goal for the probe kinds {missing}")

        def measure(strength: float | Sequence[float] | None) -> _Score:
            hits = self.probe_hits(data, strength)
            grouped = by_kind(data, hits)
            return _Score(float(np.mean(hits)), {k: float(np.mean(h)) for k, h in grouped.items()},
                          {k: len(h) / len(hits) for k, h in grouped.items()})
        return measure

    def fluency(self, prompts: Sequence[str], strength: float | Sequence[float], max_tokens: int = 32) -> dict[str, Any]:
        """Fluency of corrupted and uncorrupted continuations, side by side."""
        corrupted = [t for draws in self.generate(prompts, strength, max_tokens) for t in draws]
        clean = [t for draws in self.generate(prompts, None, max_tokens) for t in draws]
        return {"corrupted": fluency_report(corrupted), "uncorrupted": fluency_report(clean),
                "examples": [{"prompt": p, "corrupted": c} for p, c in zip(prompts[:5], corrupted[::self.samples])]}


@dataclass(frozen=True)
class _Score:
    """A score at one strength: over all the data, and per probe kind (with each kind's share of the probes)."""

    overall: float
    by_kind: dict[str, float] | None = None
    weights: dict[str, float] | None = None

    def distance(self, goal: float | Mapping[str, float]) -> float:
        if isinstance(goal, Mapping):
            return sum(w * abs(self.by_kind[k] - goal[k]) for k, w in self.weights.items())
        return abs(self.overall - goal)


def _shown(value: float | Mapping[str, float] | _Score) -> str:
    if isinstance(value, _Score):
        return _shown(value.by_kind) if value.by_kind else _shown(value.overall)
    if isinstance(value, Mapping):
        return ", ".join(f"{kind} {rate:.3f}" for kind, rate in value.items())
    return f"{value:.3f}"


# Logprobs asked per answer: every allowed token (each letter with and without its space, and the bare
# space the grammar allows before a letter) fits in vLLM's default maximum of 20.
MC_LOGPROBS = 20


def _letters_only(n_options: int) -> dict[str, Any]:
    """Request fields that allow only the first `n_options` letters as the next token, " A" and "A" alike."""
    letters = MultipleChoice.LETTERS[:n_options]
    return {"structured_outputs": {"choice": [form for letter in letters for form in (f" {letter}", letter)]}}


def _mc_pick(choice: dict[str, Any], n_options: int) -> int:
    """The option letter with the highest probability, " A" and "A" taken together, from a choice asked with
    `_letters_only`; BackendError when the logprobs hold no letter (the backend ignored the constraint)."""
    top = (choice.get("logprobs") or {}).get("top_logprobs") or [{}]
    letters = MultipleChoice.LETTERS[:n_options]
    logprobs = dict.fromkeys(range(n_options), -np.inf)
    for token, logprob in top[0].items():
        letter = token.removeprefix(" ")
        if len(letter) == 1 and letter in letters:
            logprobs[letters.index(letter)] = float(np.logaddexp(logprobs[letters.index(letter)], logprob))
    if max(logprobs.values()) == -np.inf:
        raise BackendError(f"no option letter among the next-token logprobs {sorted(top[0])[:8]}")
    return max(logprobs, key=logprobs.get)


def _as_strength(strength: float | Sequence[float]) -> float | list[float]:
    values = list(np.atleast_1d(strength).astype(float))
    return values[0] if len(values) == 1 else values


def _scalar_or_list(values: Sequence[float]) -> float | list[float]:
    values = [float(v) for v in values]
    return values[0] if len(values) == 1 else values


def _data_hash(data: Sequence[Probe] | Sequence[MultipleChoice]) -> str:
    return hashlib.sha256(json.dumps([repr(d) for d in data]).encode()).hexdigest()
