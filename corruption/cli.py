"""`eco-proxy corruption train`: learn a corruption strength against a running vLLM."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from corruption.spec import GAUSSIAN, NEEDS_VALUE


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
    train.add_argument("--control", type=Path,
                       help="control probes the model cannot know; their uncorrupted answer rate is the goal")
    train.add_argument("--mc", type=Path, help="multiple-choice questions (JSONL: question, choices, answer)")
    train.add_argument("--goal", type=float, help="the score to reach (default: control rate, or chance for mc)")
    train.add_argument("--method", default="gaussian_first_n", choices=GAUSSIAN + NEEDS_VALUE)
    train.add_argument("--dims", type=int, help="n or k (default: the hidden size)")
    train.add_argument("--vector", action="store_true", help="learn one strength per dimension (gaussian_first_n)")
    train.add_argument("--scope", choices=["all", "entities"], default="all")
    train.add_argument("--entities", type=Path, help="entity terms, one per line (scope entities)")
    train.add_argument("--initial", type=float, default=0.25, help="starting strength")
    train.add_argument("--steps", type=int, default=12, help="step budget")
    train.add_argument("--lr", type=float, default=0.5, help="step size on log(strength)")
    train.add_argument("--mu", type=float, default=0.3, help="finite-difference perturbation on log(strength)")
    train.add_argument("--tolerance", type=float, default=0.0, help="stop when |score - goal| <= this")
    train.add_argument("--samples", type=int, default=2, help="noise draws per probe")
    train.add_argument("--max-tokens", type=int, default=8, help="tokens generated per probe")
    train.add_argument("--embedding-scale", type=float, help="input-embedding scale for an unknown architecture")
    train.add_argument("--skip-embedding-check", action="store_true",
                       help="do not check that the backend reads prompt embeddings as it reads text (unsafe)")
    train.add_argument("--seed", type=int, default=0, help="seed of the random directions (vector mode)")
    train.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from corruption.embeddings import EmbeddingError, EmbeddingTable
    from corruption.probes import read_multiple_choice, read_probes
    from corruption.spec import CorruptionSpec
    from corruption.trainer import CorruptionTrainer, EmbedsBackend
    from vllm_client import BackendError
    from corruption.zo import ZerothOrderOptimizer

    try:
        if args.score == "probes" and not args.probes:
            raise ValueError("--score probes needs --probes")
        if args.score == "mc" and not args.mc:
            raise ValueError("--score mc needs --mc")
        if args.vector and args.method != "gaussian_first_n":
            raise ValueError("--vector needs --method gaussian_first_n")
        data = read_probes(args.probes) if args.score == "probes" else read_multiple_choice(args.mc)
        control = read_probes(args.control) if args.control else None
        entities = [t.strip() for t in args.entities.read_text().splitlines() if t.strip()] if args.entities else []
        embeddings = EmbeddingTable.from_model_dir(args.model_dir, scale=args.embedding_scale)
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        dims = args.dims or embeddings.hidden_size
        initial = [args.initial] * dims if args.vector else args.initial
        fields = {"sigma": initial, "dims": dims} if args.method in GAUSSIAN else {"value": initial}
        spec = CorruptionSpec(method=args.method, scope=args.scope, **fields)
        backend = EmbedsBackend(args.backend_url)
        trainer = CorruptionTrainer(backend, tokenizer, embeddings, spec, entities=entities,
                                    samples=args.samples, max_tokens=args.max_tokens,
                                    check_embeddings=not args.skip_embedding_check)
        check = trainer.verify_backend()  # before any probe is sent
        if check.status == "passed":
            print(check.message)
        goal = args.goal
        if goal is None and args.score == "mc":
            goal = sum(q.chance for q in data) / len(data)
        if goal is None:
            if control is None:
                raise ValueError("give --control probes or an explicit --goal")
            goal = trainer.probe_hit_rate(control, None)
            print(f"control probes answered uncorrupted: {goal:.3f} (the goal)")
        optimizer = ZerothOrderOptimizer(lr=args.lr, mu=args.mu, max_steps=args.steps, target=args.tolerance,
                                         random_state=args.seed)
        result = trainer.train(args.score, data, goal, optimizer, initial)
        if args.score == "probes":
            result["fluency"] = trainer.fluency([p.prompt for p in data[:40]], result["spec"]["sigma"]
                                                if args.method in GAUSSIAN else result["spec"]["value"])
            report = result["fluency"]
            print(f"fluency, corrupted vs uncorrupted: unique-word ratio "
                  f"{report['corrupted']['mean_unique_word_ratio']:.2f} vs {report['uncorrupted']['mean_unique_word_ratio']:.2f}, "
                  f"repetitive {report['corrupted']['repetitive_rate']:.2f} vs {report['uncorrupted']['repetitive_rate']:.2f}, "
                  f"empty {report['corrupted']['empty_rate']:.2f}")
        if control is not None:
            result["control"] = {"n": len(control), "uncorrupted_rate": goal if args.goal is None else None}
    except (OSError, ValueError, EmbeddingError, BackendError) as exc:
        print(f"eco-proxy corruption train: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
