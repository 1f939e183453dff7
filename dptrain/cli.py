"""The `dptrain` command. Each module in `dptrain/commands/` adds one subcommand.

A command module defines `register(subparsers)`, which adds its parser and sets `func`. Modules
are found by listing the package, so a new subcommand needs no edit here.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import dptrain
from dptrain import __version__, commands
from dptrain.errors import Stopped, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dptrain", description=dptrain.__doc__.strip())
    parser.add_argument("--version", action="version", version=f"dptrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"dptrain {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"dptrain {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"dptrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
