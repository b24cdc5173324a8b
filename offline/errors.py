"""How the command-line tools fail: one line `PROG: what is wrong` on stderr, no traceback.

Exit codes: 2 when a different command line fixes it (a bad option, a missing input, an `--out` that
must not be written), 1 for a failure while running (a corrupt checkpoint, an unreachable hub, a missing
package). `--debug` lets the exception through with its traceback. Anything not listed here is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any, NoReturn


class CliError(Exception):
    """An expected failure while running: shown as one line, exit code 1."""

    exit_code = 1


class UsageError(CliError):
    """The command line asks for something that cannot or must not be done: exit code 2."""

    exit_code = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none to show (None, or False of a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block first)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=HelpFormatter, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --x: ..."; the option name alone reads better on one line
        self.exit(2, f"{self.prog}: {message.removeprefix('argument ')}\n")


@contextlib.contextmanager
def cli_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn the expected failures raised inside the block into one line and an exit code."""
    if debug:
        yield
        return
    try:
        yield
    except CliError as e:
        _fail(prog, str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail(prog, "interrupted", 130)
    except SystemExit as e:
        if isinstance(e.code, str):  # e.g. models.py: a model package is missing; keep its message
            _fail(prog, e.code, 1)
        raise
    except ValueError as e:
        # twla_vllm.format imports torch, so it is not imported here: a FormatError can only have been
        # raised if something already imported that module
        fmt = sys.modules.get("twla_vllm.format")
        if fmt is not None and isinstance(e, fmt.FormatError):
            _fail(prog, str(e), 1)
        raise


def _fail(prog: str, message: str, code: int) -> NoReturn:
    print(f"{prog}: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message holds
    sys.exit(code)
