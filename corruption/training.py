"""Learn a corruption strength against a running vLLM: the Python API behind `eco-proxy corruption
train` and the demo build."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from corruption.spec import GAUSSIAN, CorruptionSpec


ROUTES = ("completion", "chat")  # how the search may ask its probes (CorruptionTraining.routes)


@dataclass(frozen=True)
class CorruptionTraining:
    backend_url: str
    model_dir: Path
    out: Path
    score: Literal["probes", "mc"] = "probes"
    probes: Path | None = None  # forget knowledge probes (JSONL: prompt, answers)
    # counterfactual twins of the probes (eco-proxy corruption counterfactual): the twins' uncorrupted answer
    # rate per probe kind is the goal
    counterfactual: Path | None = None
    control: Path | None = None  # probes the model cannot know; their uncorrupted answer rate is the goal
    mc: Path | None = None  # multiple-choice questions (JSONL: question, choices, answer)
    goal: float | None = None  # wins over both; default: the counterfactual reference, else the control rate; mc: chance
    method: str = "gaussian_first_n"
    dims: int | None = None  # n or k (default: the hidden size)
    vector: bool = False  # one strength per dimension (gaussian_first_n)
    scope: Literal["all", "entities"] = "all"
    # entity terms (scope entities): a text file, one per line ("#" starts a comment line), or a counterfactual
    # names JSON (`corruption counterfactual --names`), whose names are the terms; written into the learned spec
    entities: Path | None = None
    other_sigma: float | None = None  # noise on the tokens outside the entity terms (scope entities)
    corrupt_special_tokens: bool = False
    initial: float = 0.25
    # the two-sided search (with --counterfactual): the strengths it learns, from `initial` (other_sigma from
    # `other_sigma` if given), the fluency bound, and the noise keys the learned corruption is re-measured with
    learn: tuple[str, ...] = ("sigma",)
    fluency_bound: float = 0.1
    fluency_probes: int = 16
    fluency_tokens: int = 32
    bisections: int = 4
    spread_keys: int = 3
    # (method, dims) pairs the two-sided search tries instead of `method`/`dims`, one search each (dims None:
    # the hidden size), each starting from the same noise energy per token; `choose_candidate` keeps one
    candidates: tuple[tuple[str, int | None], ...] = ()
    # prompts (JSONL, field `prompt`) the candidates' fluency check continues instead of the probes: longer
    # passages dense with the target's names show a cost of noise that short probes hide
    fluency_check_prompts: Path | None = None
    # how the search asks its probes and twins: "completion" (the prompt as it is), "chat" (rendered with the
    # template, as `eco-proxy eval` asks its chat probes); each route is held to its own reference per kind
    routes: tuple[str, ...] = ("completion",)
    # also hold the mean probability of continuing with the answer, per kind, to the twins' (its upper bound)
    probability_goal: bool = False
    steps: int = 12
    lr: float = 0.5
    mu: float = 0.3
    tolerance: float = 0.0
    samples: int = 2
    max_tokens: int = 8
    embedding_scale: float | None = None
    skip_embedding_check: bool = False
    seed: int = 0


def train_corruption(job: CorruptionTraining, log: Any = print) -> dict[str, Any]:
    """Check the backend, measure the goal, learn the strength, measure fluency; writes the result JSON
    to `job.out` (a policy's corruption_file) and returns it. With counterfactual twins (and no explicit
    goal) the two-sided search learns the smallest strengths `job.learn` that forget down to the twins'
    reference and keep fluency (CorruptionTrainer.search); otherwise the line search drives one score to
    its goal. ValueError, OSError, EmbeddingError or vllm_client.BackendError on failure."""
    from transformers import AutoTokenizer

    from corruption.counterfactual import twins_of
    from corruption.embeddings import EmbeddingTable
    from corruption.probes import read_multiple_choice, read_probes
    from corruption.trainer import CorruptionTrainer, EmbedsBackend
    from corruption.zo import SPSASearch, ZerothOrderOptimizer

    if job.score == "probes" and not job.probes:
        raise ValueError("--score probes needs --probes")
    if job.score == "mc" and not job.mc:
        raise ValueError("--score mc needs --mc")
    if job.vector and job.method != "gaussian_first_n":
        raise ValueError("--vector needs --method gaussian_first_n")
    if job.counterfactual and job.score != "probes":
        raise ValueError("--counterfactual needs --score probes")
    data = read_probes(job.probes) if job.score == "probes" else read_multiple_choice(job.mc)
    twins = twins_of(job.counterfactual, data) if job.counterfactual and job.goal is None else None
    if twins == []:
        raise ValueError(f"{job.counterfactual} holds no twin of the probes in {job.probes}")
    if twins and job.vector:
        raise ValueError("--vector does not combine with --counterfactual: the search learns a few strengths")
    if job.candidates and not twins:
        raise ValueError("--candidates needs --counterfactual (the two-sided search compares them)")
    if strengthless := [method for method, _ in job.candidates if method not in GAUSSIAN]:
        raise ValueError(f"--candidates: {strengthless[0]} has no noise strength to learn; "
                         f"use one of {', '.join(GAUSSIAN)}")
    if not job.routes or set(job.routes) - set(ROUTES):
        raise ValueError(f"--routes takes one or both of {', '.join(ROUTES)}, not {' '.join(job.routes) or 'none'}")
    if "chat" in job.routes and not twins:
        raise ValueError("--routes chat needs --counterfactual (the two-sided search holds each route to its twins)")
    if job.probability_goal and not twins:
        raise ValueError("--probability-goal needs --counterfactual (the twins' answer probability is its reference)")
    if job.fluency_check_prompts and len(job.candidates) < 2:
        raise ValueError("--fluency-check-prompts needs two --candidates or more (the check chooses between them)")
    check_prompts = read_prompts(job.fluency_check_prompts) if job.fluency_check_prompts \
        else [p.prompt for p in data]
    control = read_probes(job.control) if job.control else None
    entities = read_entity_terms(job.entities) if job.entities else []
    embeddings = EmbeddingTable.from_model_dir(job.model_dir, scale=job.embedding_scale)
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    dims = job.dims or embeddings.hidden_size
    initial = [job.initial] * dims if job.vector else job.initial
    fields = {"sigma": initial, "dims": dims} if job.method in GAUSSIAN else {"value": initial}
    if "other_sigma" in job.learn or job.other_sigma is not None:
        fields["other_sigma"] = job.other_sigma if job.other_sigma is not None else job.initial
    if job.scope == "entities" and entities:
        fields["entities"] = entities
    spec = CorruptionSpec(method=job.method, scope=job.scope, corrupt_special_tokens=job.corrupt_special_tokens,
                          **fields)
    backend = EmbedsBackend(job.backend_url)
    try:
        trainer = CorruptionTrainer(backend, tokenizer, embeddings, spec, entities=entities, samples=job.samples,
                                    max_tokens=job.max_tokens, check_embeddings=not job.skip_embedding_check)
        check = trainer.verify_backend()  # before any probe is sent
        if check.status == "passed":
            log(check.message)
        goal: float | None = job.goal
        if goal is None and job.score == "mc":
            goal = sum(q.chance for q in data) / len(data)
        if goal is None and twins:
            data, twins = _on_routes(data, job.routes, tokenizer), _on_routes(twins, job.routes, tokenizer)
            reference = {kind: (sum(hits), len(hits)) for kind, hits in trainer.answers_by_kind(twins).items()}
            log("counterfactual twins answered uncorrupted (the reference): " + ", ".join(
                f"{kind} {s}/{n} = {s / n:.3f}" for kind, (s, n) in reference.items()))
            probability_reference = trainer.answer_probabilities_by_kind(twins) if job.probability_goal else None
            searchers = [trainer] if not job.candidates else [
                trainer.with_spec(_candidate_spec(spec, method, candidate_dims or embeddings.hidden_size, job.initial,
                                                  embeddings.hidden_size)) for method, candidate_dims in job.candidates]
            results = []
            for searcher in searchers:
                if job.candidates:
                    log(f"candidate {searcher.spec.method} on {searcher.spec.dims} dimensions, "
                        f"sigma from {searcher.spec.sigma:.3f}")
                search = SPSASearch(lr=job.lr, mu=job.mu, max_steps=job.steps, bisections=job.bisections,
                                    seed=job.seed)
                results.append(searcher.search(data, reference, job.learn, search, fluency_bound=job.fluency_bound,
                                               fluency_prompts=job.fluency_probes, fluency_tokens=job.fluency_tokens,
                                               spread_keys=job.spread_keys,
                                               probability_reference=probability_reference, log=log))
            result = results[0]
            if len(results) > 1:
                _check_fluency(trainer, check_prompts, results, job.fluency_tokens, log)
                result = results[choose_candidate(results)]
                result["candidates"] = [_candidate_summary(r) for r in results]
                log(f"chosen: {result['spec']['method']} on {result['spec']['dims']} dimensions")
            result["counterfactual"] = {"n": len(twins)}
            result["routes"] = list(job.routes)
            return _written(job.out, result, log)
        if goal is None:
            if control is None:
                raise ValueError("give --counterfactual or --control probes, or an explicit --goal")
            goal = trainer.probe_hit_rate(control, None)
            log(f"control probes answered uncorrupted: {goal:.3f} (the goal)")
        optimizer = ZerothOrderOptimizer(lr=job.lr, mu=job.mu, max_steps=job.steps, target=job.tolerance,
                                         random_state=job.seed)
        result = trainer.train(job.score, data, goal, optimizer, initial, log=log)
        if job.score == "probes":
            result["fluency"] = trainer.fluency([p.prompt for p in data[:40]], result["spec"]["sigma"]
                                                if job.method in GAUSSIAN else result["spec"]["value"])
            report = result["fluency"]
            log(f"fluency, corrupted vs uncorrupted: unique-word ratio "
                f"{report['corrupted']['mean_unique_word_ratio']:.2f} vs "
                f"{report['uncorrupted']['mean_unique_word_ratio']:.2f}, "
                f"repetitive {report['corrupted']['repetitive_rate']:.2f} vs "
                f"{report['uncorrupted']['repetitive_rate']:.2f}, empty {report['corrupted']['empty_rate']:.2f}")
        if control is not None:
            result["control"] = {"n": len(control), "uncorrupted_rate": goal if job.goal is None else None}
    finally:
        backend.close()
    return _written(job.out, result, log)


FLUENCY_CHECK_KEYS = 2


def _on_routes(probes: Sequence[Any], routes: Sequence[str], tokenizer: Any) -> list[Any]:
    """The probes as each route asks them: as they are, then as chats (kind "chat:<kind>")."""
    from corruption.probes import as_chats

    return (list(probes) if "completion" in routes else []) + (as_chats(probes, tokenizer) if "chat" in routes else [])


def read_prompts(path: Path) -> list[str]:
    """The `prompt` of every line of a JSONL file; ValueError naming the file and line otherwise."""
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line).get("prompt")
        except (ValueError, AttributeError):
            prompt = None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{number}: each line must be a JSON object with a non-empty \"prompt\"")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _check_fluency(trainer: Any, prompts: Sequence[str], results: Sequence[dict[str, Any]], tokens: int,
                   log: Any) -> None:
    """Adds to each searched candidate its degenerate rate on `prompts` (every probe, or the passages given) under keys
    of their own (and the uncorrupted model's on the same prompts): the search judges fluency on a few probes a
    key, and one key's 32 continuations put one corruption anywhere from 0.06 to 0.31 degenerate, too noisy to
    choose by."""
    keys = [f"fluency-check-{i}".encode() for i in range(FLUENCY_CHECK_KEYS)]
    uncorrupted = trainer.degenerate_share(prompts, None, tokens, keys[:1])
    for result in results:
        spec = CorruptionSpec.model_validate(result["spec"])
        rate = trainer.degenerate_share(prompts, spec, tokens, keys)
        result["fluency_check"] = {"prompts": len(prompts), "keys": len(keys), "samples": trainer.samples,
                                   "degenerate_rate": rate, "uncorrupted_degenerate_rate": uncorrupted}
        log(f"fluency check, {spec.method} on {spec.dims} dimensions: degenerate {rate:.3f} "
            f"(uncorrupted {uncorrupted:.3f})")


def choose_candidate(results: Sequence[Mapping[str, Any]]) -> int:
    """Which of several searched corruptions to keep: one that met the goal before one that did not; then the
    fewest degenerate continuations in the fluency check (the keep side, which is what fails out of sample:
    output like a model that does not know, not noise); a tie goes to the smallest worst distance, under the
    spread's keys, by which a kind's rate leaves its reference's interval on either side (or its answer
    probability exceeds its bound, when that was a goal)."""
    def rank(index: int) -> tuple[bool, float, float]:
        result = results[index]
        goal, spread = result["goal"], result["spread"]
        upper, lower = goal["forget_upper_by_kind"], goal.get("keep_lower_by_kind", {})
        outside = [max(max(rates) - upper[kind], lower.get(kind, 0.0) - min(rates))
                   for kind, rates in spread["rates_by_kind"].items()]
        bound = goal.get("answer_probability_upper_by_kind") or {}
        probabilities = spread.get("answer_probability_by_kind") or {}  # None when not asked
        outside += [max(values) - bound[kind] for kind, values in probabilities.items() if kind in bound]
        return not result["met"], result["fluency_check"]["degenerate_rate"], max(outside)
    return min(range(len(results)), key=rank)


def _candidate_spec(spec: CorruptionSpec, method: str, dims: int, initial: float, hidden: int) -> CorruptionSpec:
    """`spec` with another gaussian method on `dims` dimensions, whose starting noise has the energy per token of
    `initial` on all `hidden` dimensions: fewer dimensions start stronger (initial * sqrt(hidden / dims))."""
    return spec.with_fields(method=method, dims=dims, sigma=initial * math.sqrt(hidden / dims))


def _candidate_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    return {"method": result["spec"]["method"], "dims": result["spec"]["dims"], "learned": result["learned"],
            "met": result["met"], "stopped": result["stopped"], "final": result["final"],
            "spread": result["spread"], "fluency_check": result["fluency_check"], "seconds": result["seconds"]}


def read_entity_terms(path: Path) -> list[str]:
    """The terms of a text file (one per line, "#" lines are comments) or of a counterfactual names JSON."""
    if path.suffix == ".json":
        from corruption.counterfactual import CounterfactualNames

        return list(CounterfactualNames.read(path).names)
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _written(out: Path, result: dict[str, Any], log: Any) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    return result
