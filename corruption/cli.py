"""`eco-proxy corruption train`: learn a corruption strength against a running vLLM."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from corruption.spec import GAUSSIAN, NEEDS_VALUE
from corruption.training import ROUTES


def register(groups: argparse._SubParsersAction) -> None:
    group = groups.add_parser("corruption", help="train the embedding corruption")
    commands = group.add_subparsers(dest="corruption_command", required=True)
    train = commands.add_parser(
        "train", help="learn the corruption strength by zeroth-order optimisation through the backend",
        description="Measures the unlearning score through a running vLLM (started with "
                    "--enable-prompt-embeds) and writes a result JSON a policy can use as corruption_file.")
    train.add_argument("--backend-url", required=True, help="the vLLM server, e.g. http://127.0.0.1:8100")
    train.add_argument("--model-dir", required=True, type=Path, help="the served model's Hugging Face directory")
    train.add_argument("--out", required=True, type=Path, help="result JSON to write")
    train.add_argument("--score", choices=["probes", "mc"], default="probes")
    train.add_argument("--probes", type=Path, help="forget knowledge probes (JSONL: prompt, answers)")
    train.add_argument("--counterfactual", type=Path,
                       help="counterfactual twins of the probes (`corruption counterfactual`): their uncorrupted "
                            "answer rate per probe kind is the goal; wins over --control")
    train.add_argument("--control", type=Path,
                       help="control probes the model cannot know; their uncorrupted answer rate is the goal "
                            "when no --counterfactual is given")
    train.add_argument("--mc", type=Path, help="multiple-choice questions (JSONL: question, choices, answer)")
    train.add_argument("--goal", type=float,
                       help="the score to reach; wins over --counterfactual and --control (default: the "
                            "counterfactual reference, else the control rate; chance for mc)")
    train.add_argument("--method", default="gaussian_first_n", choices=GAUSSIAN + NEEDS_VALUE)
    train.add_argument("--dims", type=int, help="n or k (default: the hidden size)")
    train.add_argument("--vector", action="store_true", help="learn one strength per dimension (gaussian_first_n)")
    train.add_argument("--scope", choices=["all", "entities"], default="all")
    train.add_argument("--entities", type=Path,
                       help="entity terms (scope entities): a text file, one per line, or a counterfactual names "
                            "JSON, whose names are the terms; the learned spec carries them")
    train.add_argument("--other-sigma", type=float,
                       help="noise std on the tokens outside the entity terms (scope entities; default: untouched, "
                            "or --initial when --learn other_sigma)")
    train.add_argument("--corrupt-special-tokens", action="store_true",
                       help="corrupt the tokenizer's special and added tokens too (BOS, the chat template's turn "
                            "markers); by default they stay as they are")
    train.add_argument("--initial", type=float, default=0.25, help="starting strength")
    train.add_argument("--steps", type=int, default=12,
                       help="step budget (with --counterfactual: SPSA steps, 3 evaluations each)")
    train.add_argument("--lr", type=float, default=0.5,
                       help="step size on log(strength) (with --counterfactual: SPSA's step length at step k=1, "
                            "decaying as lr/k^0.602)")
    train.add_argument("--mu", type=float, default=0.3,
                       help="finite-difference perturbation on log(strength) (with --counterfactual: SPSA's, "
                            "decaying as mu/k^0.101)")
    train.add_argument("--tolerance", type=float, default=0.0, help="stop when |score - goal| <= this")
    search = train.add_argument_group(
        "two-sided search (with --counterfactual)",
        "Learns the smallest strengths whose probe answer rate, per probe kind, lies inside the 95% Wilson "
        "interval of the twins' uncorrupted rate (above it: not forgotten; below it: a guess a model that never "
        "learned makes, erased), while the share of degenerate continuations (empty, or one word "
        "3-gram three times) stays within --fluency-bound of the uncorrupted model's; then re-measures the learned "
        "corruption under --spread-keys other noise keys.")
    search.add_argument("--learn", nargs="+", choices=["sigma", "other_sigma", "value"], default=["sigma"],
                        help="the strengths to learn (other_sigma needs --scope entities; value: add/subtract_value)")
    search.add_argument("--fluency-bound", type=float, default=0.1,
                        help="largest rise of the degenerate-output rate over the uncorrupted model's")
    search.add_argument("--fluency-probes", type=int, default=16, help="probes whose continuations are judged")
    search.add_argument("--fluency-tokens", type=int, default=32, help="length of the judged continuations")
    search.add_argument("--bisections", type=int, default=4,
                        help="rounds of halving the overall scale once the goal is met")
    search.add_argument("--spread-keys", type=int, default=3,
                        help="noise keys the learned corruption is re-measured with (its spread, in the result)")
    search.add_argument("--candidates", nargs="+", type=_candidate, metavar="METHOD[:DIMS]", default=[],
                        help="gaussian methods to try instead of --method/--dims (e.g. gaussian_first_n "
                             "gaussian_top_k:64 gaussian_first_n:1; no DIMS: every dimension), one search each, "
                             "from the same noise energy per token; keeps the one that meets the goal with the "
                             "fewest degenerate continuations, and lists them all in the result")
    search.add_argument("--fluency-check-prompts", type=Path, metavar="FILE",
                        help="prompts (JSONL, field prompt) the candidates' fluency check continues instead of "
                             "the probes: longer passages dense with the target's names show what noise costs")
    search.add_argument("--routes", nargs="+", choices=ROUTES, default=["completion"],
                        help="how the probes and twins are asked: as completion prompts, as chats rendered with "
                             "the model's template (the model's turn begins with the probe), or both; every "
                             "route and kind must meet its own twins' reference")
    search.add_argument("--probability-goal", action="store_true",
                        help="also hold, per kind, the mean probability of continuing with the answer (from "
                             "the top-20 logprobs) within the upper 95%% Wilson bound of the twins' mean: what a "
                             "client sampling at temperature 1 would get, which greedy answers hide")
    train.add_argument("--samples", type=int, default=2, help="noise draws per probe")
    train.add_argument("--max-tokens", type=int, default=8, help="tokens generated per probe")
    train.add_argument("--embedding-scale", type=float, help="input-embedding scale for an unknown architecture")
    train.add_argument("--skip-embedding-check", action="store_true",
                       help="do not check that the backend reads prompt embeddings as it reads text (unsafe)")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the random directions (vector mode) and of SPSA's perturbation signs")
    train.set_defaults(run=_train)

    twins = commands.add_parser(
        "counterfactual", help="write the counterfactual twins of knowledge probes, and each probe's kind",
        description="Swaps the target's names in every probe for invented ones (--names, a hand-written JSON "
                    "mapping) and writes the twins to --out; their uncorrupted answer rate, per kind, is the "
                    "goal of `corruption train --counterfactual`. Adds each probe's kind to --probes itself.")
    twins.add_argument("--probes", required=True, type=Path, help="forget knowledge probes (JSONL: prompt, answers)")
    twins.add_argument("--names", required=True, type=Path, help="the target's names and their replacements (JSON)")
    twins.add_argument("--out", required=True, type=Path, help="counterfactual probes to write (JSONL)")
    twins.set_defaults(run=_counterfactual)


def _candidate(text: str) -> tuple[str, int | None]:
    method, _, dims = text.partition(":")
    if method not in GAUSSIAN:
        raise argparse.ArgumentTypeError(f"{method!r} is not one of {', '.join(GAUSSIAN)}")
    if dims and not (dims.isdigit() and int(dims) > 0):
        raise argparse.ArgumentTypeError(f"dimensions in {text!r} must be a positive whole number")
    return method, int(dims) if dims else None


def _train(args: argparse.Namespace) -> int:
    from corruption.embeddings import EmbeddingError
    from corruption.training import CorruptionTraining, train_corruption
    from vllm_client import BackendError

    job = CorruptionTraining(
        backend_url=args.backend_url, model_dir=args.model_dir, out=args.out, score=args.score, probes=args.probes,
        counterfactual=args.counterfactual, control=args.control, mc=args.mc, goal=args.goal, method=args.method,
        dims=args.dims, vector=args.vector, scope=args.scope, entities=args.entities, other_sigma=args.other_sigma,
        corrupt_special_tokens=args.corrupt_special_tokens, initial=args.initial, steps=args.steps, lr=args.lr,
        mu=args.mu, tolerance=args.tolerance, learn=tuple(args.learn), fluency_bound=args.fluency_bound,
        fluency_probes=args.fluency_probes, fluency_tokens=args.fluency_tokens, bisections=args.bisections,
        spread_keys=args.spread_keys, candidates=tuple(args.candidates),
        fluency_check_prompts=args.fluency_check_prompts, routes=tuple(args.routes),
        probability_goal=args.probability_goal, samples=args.samples,
        max_tokens=args.max_tokens, embedding_scale=args.embedding_scale,
        skip_embedding_check=args.skip_embedding_check, seed=args.seed)
    try:
        train_corruption(job)
    except (OSError, ValueError, EmbeddingError, BackendError) as exc:
        print(f"eco-proxy corruption train: {exc}", file=sys.stderr)
        return 2
    return 0


def _counterfactual(args: argparse.Namespace) -> int:
    from collections import Counter

    from corruption.counterfactual import CounterfactualNames, write_counterfactual

    try:
        twins = write_counterfactual(args.probes, CounterfactualNames.read(args.names), args.out)
    except (OSError, ValueError) as exc:
        print(f"eco-proxy corruption counterfactual: {exc}", file=sys.stderr)
        return 2
    kinds = Counter(t["kind"] for t in twins)
    print(f"wrote {len(twins)} twins to {args.out} ({', '.join(f'{k}: {n}' for k, n in sorted(kinds.items()))})")
    return 0
