"""The ``graphopt`` command: ``graphopt passes`` lists passes, ``graphopt demo`` runs the demo."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from graphopt.errors import GraphoptError


def _cmd_passes(_args: argparse.Namespace) -> int:
    from graphopt.registry import pass_options, registered_passes

    for name, cls in registered_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:18s} {doc}")
        for opt, default in pass_options(cls).items():
            shown = "(required)" if default is dataclasses.MISSING else f"= {default!r}"
            print(f"{'':18s}   {opt} {shown}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from graphopt.demo import run_demo

    return run_demo(repeats=args.repeats)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``graphopt`` command."""
    parser = argparse.ArgumentParser(prog="graphopt", description="Graph-level optimization of PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list registered passes and their options").set_defaults(func=_cmd_passes)
    demo = sub.add_parser("demo", help="optimize a built-in example model and print the report")
    demo.add_argument("--repeats", type=int, default=30, help="latency rounds (default 30)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors graphopt raises on purpose print as one line with exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GraphoptError as e:
        print(f"graphopt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
