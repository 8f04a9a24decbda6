"""The ``graphopt`` command: ``optimize``, ``inspect``, ``passes`` and ``demo``.

MODEL is ``package.module:factory`` (the user's own code, imported and called by design) or a file written by
``graphopt.save`` (read as data: no pickled code runs). Errors graphopt raises on purpose print as one line and
a hint, with exit code 2; ``GRAPHOPT_DEBUG=1`` shows the whole message and the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback

from graphopt.errors import GraphoptError, InputError, MissingDataError, PipelineError, TraceError

_HINTS = {  # error type -> what to try, when the message carries no hint of its own
    "PipelineError": "run `graphopt passes` to list the registered passes and their options",
    "TraceError": "run `graphopt inspect MODEL --input-shape ...` or see GRAPHOPT_DEBUG=1 for each capture attempt",
    "LoadError": "write the file again with `graphopt optimize ... --out DIR` or graphopt.save",
    "InputError": "run `graphopt COMMAND --help` for the expected arguments",
}

# graphopt.optimize keyword -> how the command line gives the same data: passes name the Python keyword in their
# MissingDataError; under the CLI the hint names the flag instead
_FLAGS = {
    "calib_data": "add --calib FILE.pt (a torch.save file of an (N, ...) tensor of real inputs), or --calib "
                  "random:N to try the command out on random inputs",
}


def _cmd_passes(_args: argparse.Namespace) -> int:
    from graphopt.pipeline.registry import pass_options, registered_passes

    for name, cls in registered_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:18s} {doc}")
        for opt, default in pass_options(cls).items():
            shown = "(required)" if default is dataclasses.MISSING else f"= {default!r}"
            print(f"{'':18s}   {opt} {shown}")
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    from graphopt.cli.commands import check_out_dir, cmd_optimize
    from graphopt.cli.distributed import process_group
    from graphopt.pipeline.registry import parse_pipeline

    check_out_dir(args.out)
    if args.passes:
        parse_pipeline(args.passes)  # unknown passes and bad options fail before the model is built
    if args.epochs < 1 or args.lr <= 0:
        raise InputError(f"--epochs must be >= 1 and --lr > 0, got {args.epochs} and {args.lr}")
    with process_group():  # under torchrun: one rank of a distributed calibration and fine-tuning
        return cmd_optimize(args)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from graphopt.cli.commands import cmd_inspect

    return cmd_inspect(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from graphopt.examples.demo import run_demo

    return run_demo(quick=args.quick, out=args.out, repeats=args.repeats)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="package.module:factory, or a file written by graphopt.save")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="shape of one input, e.g. 1,3,224,224 (repeat for several inputs); "
                        "optional for a saved file")
    p.add_argument("--input-dtype", default="float32", help="dtype of the inputs (default float32; int64 for ids)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``graphopt`` command."""
    parser = argparse.ArgumentParser(prog="graphopt", description="Graph-level optimization of PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list registered passes and their options").set_defaults(func=_cmd_passes)

    opt = sub.add_parser("optimize", help="run passes on a model; write the saved model, ONNX and a report")
    _add_model_args(opt)
    opt.add_argument("--passes", default="", help='e.g. "fuse,prune-channels:ratio=0.5,fake-quant"')
    opt.add_argument("--calib", metavar="DATA", help="calibration inputs: random:N, or a torch.save file of a tensor "
                     "(under torchrun: split between ranks, or one file per rank named with {rank})")
    opt.add_argument("--out", required=True, metavar="DIR", help="directory for model.graphopt, model.onnx, reports")
    opt.add_argument("--finetune", metavar="DATA",
                     help="fine-tune after the passes on a torch.save file of {'inputs': x, 'targets': y} "
                     "(under torchrun: DDP, rows split between ranks, or one file per rank named with {rank})")
    opt.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    opt.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default 1e-3)")
    opt.add_argument("--distill", action="store_true", help="fine-tune with distillation from the original model")
    opt.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    opt.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    opt.set_defaults(func=_cmd_optimize)

    ins = sub.add_parser("inspect", help="show channel groups, removable blocks and layer sizes of a model")
    _add_model_args(ins)
    ins.set_defaults(func=_cmd_inspect)

    demo = sub.add_parser("demo", help="train, compress, export and verify a small CNN on the digits data")
    demo.add_argument("--quick", action="store_true", help="a fast variant with fewer epochs (for tests)")
    demo.add_argument("--out", default="demo_out", help="directory for plots and files (default demo_out/)")
    demo.add_argument("--repeats", type=int, default=50, help="latency rounds (default 50)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def format_error(e: BaseException) -> str:
    """One line saying what went wrong, and one line with a hint."""
    if isinstance(e, MissingDataError) and e.keyword in _FLAGS:
        return f"graphopt: error: {e.problem}\nhint: {_FLAGS[e.keyword]}"
    text = str(e).strip() or type(e).__name__
    first = text.splitlines()[0]
    message, sep, hint = first.partition("; hint: ")
    if not sep:
        hint = _HINTS.get(type(e).__name__, "rerun with GRAPHOPT_DEBUG=1 for the full message")
    return f"graphopt: error: {message}\nhint: {hint}"


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 for errors graphopt raises on purpose (and bad usage), 1 for others."""
    args = build_parser().parse_args(argv)
    debug = os.environ.get("GRAPHOPT_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except (GraphoptError, PipelineError, TraceError) as e:
        if debug:
            traceback.print_exc()
        print(format_error(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or the user's factory failing: still one line, the traceback on request
        if debug:
            traceback.print_exc()
        print(f"graphopt: error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}\n"
              "hint: rerun with GRAPHOPT_DEBUG=1 for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
