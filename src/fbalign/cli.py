"""The ``fbalign`` command: one sub-command per module, each registering its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module provides ``add_parser(subparsers)``; its parser sets ``func(args) -> int``.
COMMAND_MODULES = [
    "fbalign.train",
    "fbalign.compare",
    "fbalign.plot",
    "fbalign.demo",
    "fbalign.reproduce",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fbalign", description="Train networks with asymmetric feedback.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fbalign {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
