"""``perfline chains``: list the chains and gadgets; ``perfline chains validate FILE``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perfline.core.chain import ChainError, available_chains, load_chain_file
from perfline.core.registry import import_errors, load_gadgets


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chains", help="list chains and gadgets, or validate a chain file",
                                   description="Without arguments: list shipped chains and registered gadgets.")
    actions = parser.add_subparsers(dest="chains_action", metavar="ACTION")
    validate = actions.add_parser("validate", help="validate a chain file completely")
    validate.add_argument("file", type=Path, help="chain TOML file")
    parser.set_defaults(func=run)
    return parser


def _list() -> int:
    status = 0
    print("chains:")
    for name, path in available_chains().items():
        try:
            spec = load_chain_file(path)
        except ChainError as error:
            print(f"  {name}: INVALID: {error}")
            status = 1
            continue
        steps = " -> ".join(g.gadget.name for g in spec.gadgets)
        print(f"  {name}  [{', '.join(spec.input)}]  {steps}")
        if spec.description:
            print(f"      {spec.description}")
    print("gadgets:")
    for name, gadget in sorted(load_gadgets().items()):
        accepts = ", ".join(t.__name__ for t in gadget.accepts)
        produces = ", ".join(t.__name__ for t in gadget.produces) or "-"
        print(f"  {name}  ({accepts} -> {produces})  settings: {', '.join(gadget.Settings.model_fields) or '-'}")
    for module, error in import_errors.items():
        print(f"  module {module} failed to import: {error}")
        status = 1
    return status


def run(args: argparse.Namespace) -> int:
    if args.chains_action == "validate":
        try:
            spec = load_chain_file(args.file)
        except ChainError as error:
            print(f"invalid: {error}", file=sys.stderr)
            return 1
        for warning in spec.warnings:
            print(f"warning: {warning}")
        print(f"valid: chain {spec.name!r}: {' -> '.join(g.gadget.name for g in spec.gadgets)}; "
              f"input {list(spec.input)}; output types {[t.__name__ for t in spec.output_types]}")
        return 0
    return _list()
