"""The `eco-proxy` command: one entry point; the proxy, the classifier and the corruption each register their subcommands."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from classifier import cli as classifier_cli
    from corruption import cli as corruption_cli
    from proxy import commands

    parser = argparse.ArgumentParser(prog="eco-proxy", description=__doc__)
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(groups)
    classifier_cli.register(groups)
    corruption_cli.register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
