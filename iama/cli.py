"""Command line: ``iama demo toy``, ``iama demo length`` and ``iama info``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each demo lives in iama/demos/<name>.py and provides add_arguments(parser) and run(args).
DEMOS = {
    "toy": "the paper's Prop. 3.1 toy problem solved by exact non-linear mirror descent",
    "length": "the length task: plain GRPO vs IAMA with BestOfN(4) on a tiny language model",
}
DEFAULT_DEMO = "length"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iama", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a demonstration")
    demos = demo.add_subparsers(dest="demo")
    for name, help_text in DEMOS.items():
        try:
            module = importlib.import_module(f"iama.demos.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"iama.demos.{name}":
                raise
            continue
        sub = demos.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    info = commands.add_parser("info", help="versions, devices and a check of every backend",
                               description="versions, devices, and every op run with every backend "
                                           "against the float64 reference")
    from iama import info as info_module

    info_module.add_arguments(info)
    info.set_defaults(run=info_module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `iama demo [--flags]` runs the default demo with those flags.
    flags_only = len(argv) == 1 or (argv[1].startswith("-") and argv[1] not in ("-h", "--help"))
    if argv[:1] == ["demo"] and flags_only:
        argv.insert(1, DEFAULT_DEMO)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and getattr(args, "run", None) is None:
        parser.error("choose a demo: " + ", ".join(DEMOS))
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
