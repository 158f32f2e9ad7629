"""The ``tempnet`` command line.

Subcommands: ``demo`` (a tiny Llama with and without TempNet on Python's bundled docs),
``generate`` (text from the demo's model with its per-token temperatures), ``train-clip``
(the CLIP demo of :mod:`tempnet.clip_demo`) and ``bench`` (:mod:`tempnet.bench`). Each
subcommand imports its implementation only when it runs, so ``tempnet --help`` stays fast and
a missing optional part fails only its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand: (module, function adding its options, function running it, help)
_COMMANDS = {
    "demo": ("tempnet.demo.run", "add_arguments", "run_demo",
             "train a tiny Llama with plain CE and with TempNet + DRO; report perplexities and temperatures"),
    "generate": ("tempnet.demo.generate", "add_arguments", "run_generate",
                 "generate from a model saved by `tempnet demo`, with and without TempNet temperatures"),
    "train-clip": ("tempnet.clip_demo", "add_arguments", "run_clip_demo",
                   "train a small CLIP model with per-sample TempNet temperatures"),
    "bench": ("tempnet.bench", "add_arguments", "main_from_args",
              "time and peak memory of the fused ops against eager PyTorch, torch.compile and installed baselines"),
}


def _load(module_name: str, function: str):
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            return None
        raise
    return getattr(module, function)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. Only the subcommand named in ``argv`` (if any) imports its module to
    declare its options."""
    parser = argparse.ArgumentParser(prog="tempnet", description="Softmax losses with per-sample temperatures "
                                     "(TempNet, Qiu et al., ICML 2024): demos and tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((arg for arg in (argv or []) if not arg.startswith("-")), None)
    for name, (module_name, add_arguments, _, help_text) in _COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            add = _load(module_name, add_arguments)
            if add is None:
                subparser.set_defaults(missing=module_name)
            else:
                add(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tempnet`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "missing", None):
        parser.exit(2, f"tempnet {args.command}: {args.missing} is not installed in this version of tempnet\n")
    module_name, _, run, _ = _COMMANDS[args.command]
    try:
        _load(module_name, run)(args)
    except ValueError as error:
        parser.exit(2, f"tempnet {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
