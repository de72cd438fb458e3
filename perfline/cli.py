"""The ``perfline`` command line: one sub-command per module in ``perfline.commands``.

Sub-commands are listed here explicitly (never discovered from user input). Each command
module provides ``add_parser(subparsers)`` returning its parser, with ``func`` set to a
callable ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name of the module in perfline.commands, in the order shown by --help
COMMAND_MODULES: tuple[str, ...] = (
    "serve",
    "send",
    "chains",
    "simulate",
    "map",
    "segment",
    "train",
    "evaluate",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perfline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"perfline.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"perfline.commands.{name}":
                continue  # command not built yet
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
