"""The `dptrain` command. Each module in `dptrain/commands/` adds one subcommand.

A command module defines `register(subparsers)`, which adds its parser and sets `func`. Modules
are found by listing the package, so a new subcommand needs no edit here.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import pkgutil
import sys

import dptrain
from dptrain import __version__, commands
from dptrain.errors import Stopped, UserError


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless its text already says it (or it is None, or
    an on/off flag, where "default: None" or "default: False" would say nothing)."""

    def _format_action(self, action):
        if action.help is None and self._shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _expand_help(self, action):
        if isinstance(action.default, float):  # 1e12, not 1000000000000.0
            action = copy.copy(action)
            action.default = f"{action.default:g}"
        return super()._expand_help(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if self._shows_default(action) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text

    @staticmethod
    def _shows_default(action) -> bool:
        flags = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)
        return (bool(action.option_strings) and action.default not in (None, argparse.SUPPRESS)
                and not isinstance(action, flags) and "default" not in (action.help or "").lower())


class Parser(argparse.ArgumentParser):
    """ArgumentParser with DefaultsFormatter; subcommands' parsers are of this class too (argparse
    makes subparsers of the parent's class)."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("formatter_class") in (None, argparse.ArgumentDefaultsHelpFormatter):
            kwargs["formatter_class"] = DefaultsFormatter
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dptrain", description=dptrain.__doc__.strip())
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
