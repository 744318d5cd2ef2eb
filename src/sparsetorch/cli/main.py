"""The ``sparsetorch`` command. Each subcommand lives in its own module of this package and
exposes ``add_parser(subparsers)`` (returning the parser) and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import SparsityError

# subcommand modules, in the order --help lists them
COMMANDS = ["demo", "report", "bench", "prune_lm", "recover", "info", "export", "train"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsetorch",
        description="Sparse neural networks in PyTorch: find the sparsity, keep it, cash it in.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f".{name}", __package__)
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"sparsetorch {__version__}")
        return 0
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except SparsityError as exc:
        print(f"sparsetorch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ImportError, KeyboardInterrupt) as exc:
        print(f"sparsetorch {args.command}: error: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, KeyboardInterrupt) else 130


if __name__ == "__main__":
    sys.exit(main())
