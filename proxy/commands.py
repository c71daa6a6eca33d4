"""The proxy's subcommands: `serve`, `model prepare`, `demo build` and `eval` (the last two call `evaluation`)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from pydantic import ValidationError

from proxy.protocol import field_errors
from proxy.serve import ENV_PREFIX, ServeSettings

_HELP = {
    "policy": "policy YAML (default: the shipped demo target)",
    "backend_url": "use this running vLLM instead of starting one",
    "model_dir": "Hugging Face model directory (default: prepare gemma-3-270m)",
    "served_model_name": "model name clients ask for",
    "host": "address to listen on",
    "port": "port to listen on",
    "secret_key": "key for the deterministic corruption noise",
    "admin_key": "bearer key for POST /admin/reload (unset: disabled)",
    "api_key": "a client key for /v1/* (repeatable; env: comma-separated; unset: no key needed)",
    "api_key_file": "a file of client keys, one per line",
    "upstream_api_key": "the key of a vLLM started with --api-key",
    "metrics_key": "bearer key for /metrics (unset: /metrics is off)",
    "max_body_bytes": "largest request body accepted (default: sized for the backend's context length)",
    "classify_timeout": "seconds a verdict may take before the targets' fail modes decide (default 10)",
    "audit_log": "JSONL audit log: a path, or - for stdout",
    "embedding_scale": "input-embedding scale for an architecture the proxy does not know",
    "skip_embedding_check": "start without checking that the backend reads the proxy's embeddings as text "
                            "(unsafe; logged loudly)",
    "classifier_cache_size": "prompt texts whose encoding the classifier keeps (0: none)",
    "torch_threads": "CPU threads for the classifier and the corruption (default 1)",
    "cpus": "CPUs to run on, as taskset -c names them (e.g. 1 or 2-3); on a CPU host, those vLLM's engine "
            "leaves free",
    "max_model_len": "context length of the vLLM the proxy starts",
    "vllm_args": "extra arguments for the vLLM the proxy starts, as one string",
}


def register(groups: argparse._SubParsersAction) -> None:
    serve = groups.add_parser("serve", help="run the guardrail proxy in front of vLLM",
                              description="Each option can also be set as ECO_<OPTION> in the environment.")
    for name, text in _HELP.items():
        annotation = ServeSettings.model_fields[name].annotation
        action = {"action": "store_const", "const": "true"} if annotation is bool else \
            {"action": "append"} if annotation == list[str] else {}  # a switch: present means true
        serve.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                           help=f"{text} [env {ENV_PREFIX}{name.upper()}]", **action)
    serve.set_defaults(run=_serve)

    model = groups.add_parser("model", help="prepare the default model")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    prepare = model_commands.add_parser("prepare", help="build gemma-3-270m from its PyPI GGUF (idempotent)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prepare.set_defaults(run=_prepare)

    demo = groups.add_parser("demo", help="the shipped demo target")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_commands.add_parser(
        "build", help="rebuild the demo classifiers, kept probes and corruptions from demo/*.jsonl",
        description="Starts vLLM on the default model unless --backend-url is given.")
    build.add_argument("--backend-url", help="a running vLLM with prompt embeddings enabled")
    build.add_argument("--model-dir", help="the served model's directory (default: prepare gemma-3-270m)")
    build.set_defaults(run=_demo_build)

    evaluate = groups.add_parser(
        "eval", help="measure unlearning and utility: raw backend vs guarded endpoint",
        description="Runs knowledge (completions and chats), naturalness, utility, gate, sustainability and "
                    "baseline measurements against two OpenAI-compatible endpoints; writes report.json, report.md "
                    "and PNG plots.")
    evaluate.add_argument("--raw", required=True, help="the unguarded endpoint (vLLM), e.g. http://127.0.0.1:8100")
    evaluate.add_argument("--guarded", required=True, help="the guarded endpoint, e.g. http://127.0.0.1:8000")
    evaluate.add_argument("--data", default="demo/harry_potter", help="the target's data directory")
    evaluate.add_argument("--target", default="harry_potter", help="the target's name")
    evaluate.add_argument("--description", default="the Harry Potter books and films",
                          help="the target in words, for the system-prompt baseline")
    evaluate.add_argument("--retain-set", action="append", default=None,
                          help="retain prompt files in --data whose test split the gate is measured on "
                               "(default: retain_fiction.jsonl and retain_general.jsonl)")
    evaluate.add_argument("--second-data", help="a second target's data directory (sustainability)")
    evaluate.add_argument("--second-target", default="star_wars")
    evaluate.add_argument("--two-targets", help="an endpoint guarding both targets (sustainability)")
    evaluate.add_argument("--concurrency", type=int, default=8)
    evaluate.add_argument("--model-dir", help="the served model's directory, for the embedding check of --raw "
                                              "(default: prepare gemma-3-270m)")
    evaluate.add_argument("--embedding-scale", type=float, help="input-embedding scale for an unknown architecture")
    evaluate.add_argument("--skip-embedding-check", action="store_true",
                          help="do not check that --raw reads prompt embeddings as it reads text (unsafe)")
    evaluate.add_argument("--out", default="eval-report", help="directory for report.json, report.md, *.png")
    evaluate.set_defaults(run=_eval)


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """Command line first, then ECO_* environment variables, then the schema's defaults."""
    values = {}
    for name in _HELP:
        value = getattr(args, name)
        if value is None:
            value = os.environ.get(ENV_PREFIX + name.upper())
            if value is not None and ServeSettings.model_fields[name].annotation == list[str]:
                value = [item.strip() for item in value.split(",") if item.strip()]
        if value is not None:
            values[name] = value
    return ServeSettings.model_validate(values)


def _serve(args: argparse.Namespace) -> int:
    from proxy import serve

    try:
        settings = serve_settings(args)
    except ValidationError as exc:
        for field, message in field_errors(exc):
            print(f"eco-proxy serve: --{field.replace('_', '-')} / {ENV_PREFIX}{field.upper()}: {message}",
                  file=sys.stderr)
        return 2
    return serve.run(settings)


def _prepare(args: argparse.Namespace) -> int:
    from proxy.model_prep import ModelPrepError, prepare_default_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(prepare_default_model(force=args.force))
    except ModelPrepError as exc:
        print(f"eco-proxy model prepare: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from corruption.embeddings import EmbeddingError
    from evaluation.demo_build import build
    from vllm_client import BackendError
    from vllm_client.server import VllmServer
    from proxy.model_prep import DEFAULT_MODEL_NAME, cache_dir, prepare_default_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_dir = Path(args.model_dir) if args.model_dir else prepare_default_model()
    try:
        if args.backend_url:
            return build(args.backend_url, model_dir)
        with VllmServer(model_dir, DEFAULT_MODEL_NAME, log_path=cache_dir() / "logs" / "vllm-demo-build.log") as server:
            return build(server.url, model_dir)
    except (OSError, ValueError, EmbeddingError, BackendError) as exc:
        print(f"eco-proxy demo build: {exc}", file=sys.stderr)
        return 2


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from evaluation.client import Endpoint
    from evaluation.harness import evaluate, load_target
    from evaluation.report import markdown, plots
    from vllm_client import BackendError

    if bool(args.second_data) != bool(args.two_targets):
        print("eco-proxy eval: --second-data and --two-targets go together", file=sys.stderr)
        return 2
    try:
        retain_sets = args.retain_set or ["retain_fiction.jsonl", "retain_general.jsonl"]
        target = load_target(Path(args.data), args.target, retain_sets)
        second = load_target(Path(args.second_data), args.second_target, []) if args.second_data else None
        raw = Endpoint(args.raw, concurrency=args.concurrency)
        tokenizer = _checked_tokenizer(args, raw.base_url, raw.model)
        if tokenizer is None:
            return 2
        guarded = Endpoint(args.guarded, raw.model, concurrency=args.concurrency)
        both = Endpoint(args.two_targets, raw.model, concurrency=args.concurrency) if args.two_targets else None
        report = evaluate(raw, guarded, target, args.description, second, both, tokenizer=tokenizer)
    except (OSError, ValueError, KeyError, BackendError) as exc:
        print(f"eco-proxy eval: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "report.md").write_text(table)
    pictures = plots(report, out)
    print(table)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, " + ", ".join(str(p) for p in pictures))
    return 0


def _checked_tokenizer(args: argparse.Namespace, backend_url: str, model: str) -> Any | None:
    """Before the evaluation spends time on the backend: does it read prompt embeddings as it reads text?
    The guarded endpoint sends them for every flagged prompt; the proxy checks itself at start. The served
    model's tokenizer when it does (or the check is skipped), for spelling answers; None when it does not."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from corruption.embedding_check import EmbeddingCheck, run_or_skip
    from corruption.embeddings import EmbeddingTable
    from proxy.model_prep import ModelPrepError, prepare_default_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model_dir = Path(args.model_dir) if args.model_dir else prepare_default_model()
    except ModelPrepError as exc:
        print(f"eco-proxy eval: --model-dir not given and the default model cannot be prepared: {exc}",
              file=sys.stderr)
        return None
    embeddings = EmbeddingTable.from_model_dir(model_dir, scale=args.embedding_scale)
    check = EmbeddingCheck(AutoTokenizer.from_pretrained(model_dir), embeddings, model)
    result = run_or_skip(check, backend_url, args.skip_embedding_check)
    if result.status == "failed":
        print(f"eco-proxy eval: {result.message}", file=sys.stderr)
        return None
    if result.status == "passed":
        print(result.message, file=sys.stderr)
    return check.tokenizer
