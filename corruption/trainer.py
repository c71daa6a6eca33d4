"""Learn the corruption strength through the live backend, without loading the LLM here.

Each evaluation embeds the probes exactly as the model does, corrupts them at the candidate
strength, and asks the served model (vLLM, `/v1/completions` with `prompt_embeds`) for the
answers. Two unlearning scores, both driven towards what a model that never knew the target
would do:

- probes: the share of knowledge probes whose completion contains the answer. With counterfactual
  twins (corruption/counterfactual.py) the two-sided search (`search`) learns the smallest
  corruption whose rate per probe kind lies inside the Wilson interval of the twins' uncorrupted
  rate (`answers_by_kind`; and, if asked, whose probability of continuing with the answer is at most
  the twins' bound), while the share of degenerate continuations (corruption/fluency.py)
  stays within a bound of the uncorrupted model's; without them the line search (`train`) drives
  the rate to one goal (the control probes', about invented things the model cannot know);
- mc: multiple-choice accuracy, driven to chance. The pick is the option letter with the highest
  next-token probability among the letters alone: the request constrains the next token to the
  letters (vLLM's `structured_outputs` choice, " A" and "A" both, as the prompt ends with
  "Answer:"), so every letter's logprob comes back however the corruption moved the rest; a
  corrupted model that stops answering in letters still picks one, and breaking the format does
  not count as forgetting.

The line search minimises |score(strength) - goal|; the two-sided search, the weighted excess of
each kind's rate outside its interval plus the degenerate rate's excess over its bound (zero: met).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from corruption.embedding_check import EmbeddingCheck, EmbeddingCheckResult, run_or_skip
from corruption.counterfactual import by_kind
from corruption.embeddings import EmbeddingTable
from corruption.fluency import fluency_report
from corruption.probes import TOP_LOGPROBS, MultipleChoice, Probe, answer_probability, answer_spellings
from corruption.fluency import degenerate_rate
from corruption.prompt import TokenMasks, corrupted_embeddings, special_token_ids, token_masks
from corruption.spec import GAUSSIAN, NEEDS_VALUE, CorruptionSpec
from corruption.zo import Reading, SearchEvaluation, SPSASearch, ZerothOrderOptimizer, ZOStep
from stats.intervals import wilson_interval
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
    masks: TokenMasks


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
        self.special_ids = special_token_ids(tokenizer)

    def with_spec(self, spec: CorruptionSpec) -> "CorruptionTrainer":
        """The same trainer for another corruption (a candidate the search compares): the embedding check already
        run holds for it, as it concerns the backend and the embeddings, not the corruption."""
        trainer = CorruptionTrainer(self.backend, self.tokenizer, self.embeddings, spec, entities=self.entities,
                                    secret_key=self.secret_key, samples=self.samples, max_tokens=self.max_tokens,
                                    check_embeddings=self.check_embeddings)
        trainer.embedding_check = self.embedding_check
        return trainer

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
        return _hit_shares(probes, self.generate([p.prompt for p in probes], strength, self.max_tokens))

    def answers_by_kind(self, probes: Sequence[Probe], strength: float | Sequence[float] | None = None
                        ) -> dict[str, list[bool]]:
        """Per probe kind, whether each probe and noise draw was answered. Uncorrupted (the default) on
        counterfactual twins, this is the reference for "never learned" (evaluation.metrics.answer_rate_by_kind
        gives its rates with Wilson intervals; corruption/ does not import that room)."""
        outputs = self.generate([p.prompt for p in probes], strength, self.max_tokens)
        return by_kind([p for p, draws in zip(probes, outputs) for _ in draws],
                       [p.answered_by(text) for p, draws in zip(probes, outputs) for text in draws])

    def answer_probabilities_by_kind(self, probes: Sequence[Probe]) -> dict[str, list[float]]:
        """Per probe kind, the probability that the uncorrupted model continues each probe with its answer
        (`answer_probability`). On counterfactual twins, the other side of the reference for "never learned":
        a client sampling at temperature 1 gets the answer about that often."""
        choices = self._complete_with([p.prompt for p in probes], None, self.max_tokens, self.secret_key,
                                      "answer probabilities", logprobs=TOP_LOGPROBS)
        return by_kind(probes, [answer_probability(answer_spellings(self.tokenizer, p.answers), draws[0])
                                for p, draws in zip(probes, choices)])

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
            choices = iter(self.backend.complete([e for i in asked for e in embeds[i]], 1, logprobs=TOP_LOGPROBS,
                                                 progress="mc", extra=_letters_only(n_options)))
            for i in asked:
                picks[i] = [_mc_pick(next(choices), n_options) for _ in embeds[i]]
        return picks

    def generate(self, prompts: Sequence[str], strength: float | Sequence[float] | None,
                 max_tokens: int) -> list[list[str]]:
        """Greedy completions per prompt and noise draw (one draw when uncorrupted)."""
        return self._generate_with(prompts, self._spec_at(strength), max_tokens, self.secret_key, "probes")

    def degenerate_share(self, prompts: Sequence[str], spec: CorruptionSpec | None, max_tokens: int,
                         keys: Sequence[bytes]) -> float:
        """The share of degenerate continuations of `prompts` under `spec` (None: uncorrupted), over the `samples`
        draws of every noise key in `keys`."""
        texts = [text for key in keys for draws in self._generate_with(prompts, spec, max_tokens, key, "fluency check")
                 for text in draws]
        return degenerate_rate(texts)

    def _embeds(self, prompts: Sequence[str], strength: float | Sequence[float] | None) -> list[list[torch.Tensor]]:
        return self._corrupted(prompts, self._spec_at(strength), self.secret_key)

    def _spec_at(self, strength: float | Sequence[float] | None) -> CorruptionSpec | None:
        return None if strength is None else self.spec.with_strength(_as_strength(strength))

    def _corrupted(self, prompts: Sequence[str], spec: CorruptionSpec | None, secret_key: bytes
                   ) -> list[list[torch.Tensor]]:
        """Per prompt, its embeddings under each of the `samples` noise draws of `secret_key` (None: uncorrupted,
        one draw). The draws are keyed by the prompt, so every spec sees the same noise (common random numbers)."""
        if spec is None:
            return [[self.embeddings.embed(self._encode(p, self.spec).token_ids)] for p in prompts]
        encoded = [self._encode(p, spec) for p in prompts]
        return [[corrupted_embeddings(self.embeddings, e.token_ids, spec, e.masks, secret_key, f"draw-{draw}")
                 for draw in range(self.samples)] for e in encoded]

    def _generate_with(self, prompts: Sequence[str], spec: CorruptionSpec | None, max_tokens: int,
                       secret_key: bytes, progress: str) -> list[list[str]]:
        return [[choice["text"] for choice in draws]
                for draws in self._complete_with(prompts, spec, max_tokens, secret_key, progress)]

    def _complete_with(self, prompts: Sequence[str], spec: CorruptionSpec | None, max_tokens: int,
                       secret_key: bytes, progress: str, logprobs: int | None = None) -> list[list[dict[str, Any]]]:
        """The backend's choice per prompt and noise draw."""
        embeds = self._corrupted(prompts, spec, secret_key)
        choices = iter(self.backend.complete([e for draws in embeds for e in draws], max_tokens, logprobs=logprobs,
                                             progress=progress))
        return [[next(choices) for _ in draws] for draws in embeds]

    def _encode(self, prompt: str, spec: CorruptionSpec) -> _Encoded:
        """The prompt's token ids (with <bos>, as the backend tokenizes a completion) and the tokens `spec` touches."""
        encoding = self.tokenizer(prompt, return_offsets_mapping=True)
        token_ids = list(encoding["input_ids"])
        return _Encoded(token_ids, token_masks(spec, token_ids, encoding["offset_mapping"], prompt, self.entities,
                                               self.special_ids))

    # -- training -----------------------------------------------------------------------
    def train(self, score: Literal["probes", "mc"], data: Sequence[Probe] | Sequence[MultipleChoice],
              goal: float, optimizer: ZerothOrderOptimizer, initial: float | Sequence[float],
              log: Callable[[str], None] = print) -> dict[str, Any]:
        """Learns the strength whose score is nearest `goal` (one rate: the control probes', or chance)."""
        def measure(strength: float | Sequence[float] | None) -> float:
            return self.mc_accuracy(data, strength) if score == "mc" else self.probe_hit_rate(data, strength)

        self.verify_backend()
        started = time.monotonic()
        baseline = measure(None)
        log(f"uncorrupted {score} score {baseline:.3f}, goal {goal:.3f}")
        scores: dict[tuple[float, ...], float] = {}

        def objective(strength: np.ndarray) -> float:
            key = tuple(np.round(strength, 6))
            if key not in scores:
                scores[key] = measure(strength.tolist())
            return abs(scores[key] - goal)

        trace: list[dict[str, Any]] = []

        def on_step(step: ZOStep) -> None:
            measured = scores[tuple(np.round(step.strength, 6))]
            row = {"step": step.step, "strength": _scalar_or_list(step.strength), "score": measured,
                   "objective": step.objective, "gradient": _scalar_or_list(step.gradient),
                   "evaluations": step.evaluations}
            trace.append(row)
            shown = f"{row['strength']:.3f}" if isinstance(row["strength"], float) else f"|{np.linalg.norm(step.strength):.3f}|"
            log(f"step {step.step:>3}  strength {shown}  score {measured:.3f}  "
                f"objective {step.objective:.3f}  evaluations {step.evaluations}")

        outcome = optimizer.minimize(objective, list(np.atleast_1d(initial)), on_step)
        learned = _scalar_or_list(outcome.strength)
        final_spec = self.spec.with_strength(learned)
        final = scores[tuple(np.round(outcome.strength, 6))]
        log(f"stopped: {outcome.stopped}; strength {learned if isinstance(learned, float) else '[vector]'}, "
            f"score {final:.3f} (goal {goal:.3f}, uncorrupted {baseline:.3f})")
        return {
            "format": RESULT_FORMAT,
            "spec": final_spec.model_dump(),
            "score": score,
            "goal": goal,
            "uncorrupted_score": baseline,
            "initial_strength": _scalar_or_list(list(np.atleast_1d(initial))),
            "final_score": final,
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

    # -- the two-sided search ---------------------------------------------------------------
    def search(self, data: Sequence[Probe], reference: Mapping[str, tuple[int, int]], strengths: Sequence[str],
               search: SPSASearch, fluency_bound: float = 0.1, fluency_prompts: int = 16, fluency_tokens: int = 32,
               spread_keys: int = 3, probability_reference: Mapping[str, Sequence[float]] | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
        """The smallest corruption (the spec's `strengths`, e.g. sigma and other_sigma, learned from their
        current values) whose probe answer rate is, for every kind, inside the Wilson interval of the
        counterfactual reference (`reference`: kind -> (successes, n)): at most its upper bound (forgotten), at
        least its lower one (what a model that never learned guesses, kept), while the share of degenerate
        continuations (empty or repetitive, `fluency_tokens` long, on the first `fluency_prompts` probes)
        stays within `fluency_bound` of the uncorrupted model's. With `probability_reference` (kind -> the
        twins' `answer_probability` values), the mean probability of continuing with the answer must also
        stay, per kind, within the upper bound of the twins' mean (`mean_upper_bound`). Then the learned
        spec's rates under `spread_keys` other noise keys. ValueError when the data, reference or strengths
        do not fit."""
        kinds = [p.kind for p in data]
        if None in kinds:
            raise ValueError("the search needs probes with a kind (eco-proxy corruption counterfactual)")
        if missing := sorted(set(kinds) - set(reference)):
            raise ValueError(f"no counterfactual reference for the probe kinds {missing}")
        if probability_reference is not None and (missing := sorted(set(kinds) - set(probability_reference))):
            raise ValueError(f"no answer-probability reference for the probe kinds {missing}")
        initial = [self._strength_field(name) for name in strengths]
        lower, upper = ({kind: wilson_interval(successes, n)[side] for kind, (successes, n) in reference.items()}
                        for side in (0, 1))
        probability_upper = {kind: mean_upper_bound(values) for kind, values in (probability_reference or {}).items()}
        fluency_texts = [p.prompt for p in data[:fluency_prompts]]
        spellings = [answer_spellings(self.tokenizer, p.answers) for p in data] if probability_upper else []
        self.verify_backend()
        started = time.monotonic()

        def measure(spec: CorruptionSpec | None, secret_key: bytes = self.secret_key) -> _TwoSided:
            choices = self._complete_with([p.prompt for p in data], spec, self.max_tokens, secret_key, "probes",
                                          logprobs=TOP_LOGPROBS if probability_upper else None)
            hits = _hit_shares(data, [[choice["text"] for choice in draws] for draws in choices])
            grouped = by_kind(data, hits)
            probabilities = by_kind(data, [float(np.mean([answer_probability(spelt, c) for c in draws]))
                                           for spelt, draws in zip(spellings, choices)]) if probability_upper else {}
            continuations = self._generate_with(fluency_texts, spec, fluency_tokens, secret_key, "fluency")
            return _TwoSided({k: float(np.mean(h)) for k, h in grouped.items()},
                             {k: len(h) / len(hits) for k, h in grouped.items()},
                             degenerate_rate([t for draws in continuations for t in draws]),
                             {k: float(np.mean(v)) for k, v in probabilities.items()})

        raw = measure(None)
        ceiling = raw.degenerate + fluency_bound
        log(f"uncorrupted: {_shown(raw.rates)}; degenerate {raw.degenerate:.3f}. Goal: at most "
            f"{_shown(upper)} and at least {_shown(lower)} (the reference's Wilson bounds), degenerate at most "
            f"{ceiling:.3f}")
        if probability_upper:
            log(f"answer probability uncorrupted: {_shown(raw.probabilities)}; goal at most "
                f"{_shown(probability_upper)}")
        measured: dict[tuple[float, ...], _TwoSided] = {}

        def spec_at(point: Sequence[float]) -> CorruptionSpec:
            return self.spec.with_fields(**{name: float(v) for name, v in zip(strengths, point)})

        def evaluate(point: np.ndarray) -> Reading:
            key = tuple(np.round(point, 6))
            if key not in measured:
                measured[key] = measure(spec_at(point))
            return measured[key].reading(upper, ceiling, probability_upper, lower)

        trace: list[dict[str, Any]] = []
        budget = 1 + 3 * search.max_steps + search.bisections
        with tqdm(total=budget, desc="corruption search", unit="evaluation") as bar:
            def on_evaluation(entry: SearchEvaluation) -> None:
                at = measured[tuple(np.round(entry.strengths, 6))]
                row = {"evaluation": entry.index, "phase": entry.phase, "step": entry.step,
                       "strengths": dict(zip(strengths, entry.strengths)), "rates_by_kind": at.rates,
                       "answer_probability_by_kind": at.probabilities or None,
                       "degenerate_rate": at.degenerate, "forget_excess": entry.reading.forget_excess,
                       "fluency_excess": entry.reading.fluency_excess,
                       "overforget_excess": entry.reading.overforget_excess, "objective": entry.reading.objective,
                       "meets": entry.reading.meets}
                trace.append(row)
                bar.update()
                log(f"{entry.index:>3} {entry.phase:<9} " + " ".join(f"{n} {v:.3f}" for n, v in zip(
                    strengths, entry.strengths)) + f" | {_shown(at.rates)}"
                    + (f" | probability {_shown(at.probabilities)}" if at.probabilities else "")
                    + f" | degenerate {at.degenerate:.3f}"
                    f" | objective {entry.reading.objective:.3f}{' meets' if entry.reading.meets else ''}")

            outcome = search.search(evaluate, initial, on_evaluation)
        learned = spec_at(outcome.strengths)
        final = measured[tuple(np.round(outcome.strengths, 6))]
        log(f"{outcome.stopped}: " + ", ".join(f"{n} {v:.4f}" for n, v in zip(strengths, outcome.strengths)))
        spread = [measure(learned, f"spread-{i}".encode()) for i in range(spread_keys)]
        return {
            "format": RESULT_FORMAT,
            "spec": learned.model_dump(),
            "score": "probes",
            "learned": dict(zip(strengths, outcome.strengths)),
            "initial": dict(zip(strengths, initial)),
            "met": outcome.met,
            "stopped": outcome.stopped,
            "goal": {"forget_upper_by_kind": upper, "keep_lower_by_kind": lower,
                     "reference": {k: {"successes": s, "n": n, "rate": s / n} for k, (s, n) in reference.items()},
                     "answer_probability_upper_by_kind": probability_upper or None,
                     "answer_probability_reference": {k: float(np.mean(v)) for k, v in
                                                      probability_reference.items()} if probability_upper else None,
                     "degenerate_at_most": ceiling, "fluency_bound": fluency_bound},
            "uncorrupted": raw.summary(),
            "final": final.summary(),
            "spread": {"keys": spread_keys, "rates_by_kind": {k: [m.rates[k] for m in spread] for k in final.rates},
                       "answer_probability_by_kind": {k: [m.probabilities[k] for m in spread]
                                                      for k in final.probabilities} or None,
                       "degenerate_rate": [m.degenerate for m in spread]},
            "trace": trace,
            "search": search.settings(),
            "fluency_probes": len(fluency_texts),
            "fluency_tokens": fluency_tokens,
            "samples": self.samples,
            "model": self.backend.model,
            "data": {"n": len(data), "sha256": _data_hash(data)},
            "seconds": round(time.monotonic() - started, 1),
            "embedding_check": self.embedding_check.status,
        }

    def _strength_field(self, name: str) -> float:
        """The spec's current value of a strength the search may learn; ValueError for any other field."""
        allowed = ("sigma", "other_sigma") if self.spec.method in GAUSSIAN else \
            ("value",) if self.spec.method in NEEDS_VALUE else ()
        if name not in allowed:
            raise ValueError(f"method {self.spec.method} has no strength {name!r} to learn (it has: "
                             f"{', '.join(allowed) or 'none'})")
        value = getattr(self.spec, name)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must start at one positive number to be learned, not {value!r}")
        return float(value)


@dataclass(frozen=True)
class _TwoSided:
    """What one corruption does: the answer rate per probe kind (with each kind's share), the share of
    degenerate continuations, and (when asked) the mean probability of the answer per kind."""

    rates: dict[str, float]
    weights: dict[str, float]
    degenerate: float
    probabilities: dict[str, float] = field(default_factory=dict)

    def reading(self, upper: Mapping[str, float], ceiling: float,
                probability_upper: Mapping[str, float] | None = None,
                lower: Mapping[str, float] | None = None) -> Reading:
        """A rate or probability above its kind's upper bound is a failure to forget; a rate below its kind's
        `lower` bound, one to keep what a model that never learned still guesses (more noise than needed)."""
        forget = sum(w * max(0.0, self.rates[k] - upper[k]) for k, w in self.weights.items())
        forget += sum(w * max(0.0, self.probabilities[k] - probability_upper[k])
                      for k, w in self.weights.items() if probability_upper)
        overforget = sum(w * max(0.0, lower[k] - self.rates[k]) for k, w in self.weights.items() if lower)
        return Reading(forget, max(0.0, self.degenerate - ceiling), overforget)

    def summary(self) -> dict[str, Any]:
        return {"rates_by_kind": self.rates, "answer_probability_by_kind": self.probabilities or None,
                "degenerate_rate": self.degenerate}


def mean_upper_bound(values: Sequence[float]) -> float:
    """The upper end of the 95% Wilson interval of the mean of values in [0, 1], taken as a rate: a value
    in [0, 1] varies at most as much as a yes-or-no one of the same mean, so the bound is conservative, and
    twins whose answers all lie outside the top logprobs (read as 0) still allow a guess, as 0 of n does."""
    if len(values) == 0:
        raise ValueError("a mean's bound needs values")
    return wilson_interval(float(np.sum(values)), len(values))[1]


def _hit_shares(probes: Sequence[Probe], outputs: Sequence[Sequence[str]]) -> list[float]:
    """Per probe, the share of its completions (one per noise draw) that contain an answer."""
    return [float(np.mean([probe.answered_by(text) for text in draws])) for probe, draws in zip(probes, outputs)]


def _shown(rates: Mapping[str, float]) -> str:
    return ", ".join(f"{kind} {rate:.3f}" for kind, rate in rates.items())


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
