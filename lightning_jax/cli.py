"""Command-line plumbing shared by the repository's scripts (absl flags).

Every script runs its `main` through `run(main)`, which gives it one behaviour:

- `--help` (or `-h`) prints the script's docstring and its flags and exits 0;
- every flag mistake (an unknown flag, a malformed value, a failed validator, a
  stray positional argument, or a `UsageError` raised by `main` or by a
  validator) prints ONE line, `script.py: error: <message naming the flag>`, on
  stderr and exits with status 2, as argparse does; no traceback.

Validators are registered next to the flags they check (`positive_int`,
`int_list`, `choice_list`, or absl's own `flags.register_validator`), so the
checks run while the flags are parsed: before `main`, and so before any
workdir, device or file is touched.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from absl import app, flags

FLAGS = flags.FLAGS
_HELP = ("--help", "-help", "-h", "--helpshort", "-?", "--helpfull")


class UsageError(app.UsageError):
    """A flag mistake found after parsing; its message is the one line to print (name the flag).

    A subclass of absl's `app.UsageError`, so code that catches absl's catches this too.
    """


def usage_error(message: str) -> NoReturn:
    """Prints `script.py: error: message` (one line) on stderr and exits with status 2."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{os.path.basename(sys.argv[0])}: error: {line}", file=sys.stderr)
    sys.exit(2)


def _flag_name(err: flags.Error) -> str:
    """absl's message, prefixed with the flag's name where absl left it out."""
    message = str(err)
    name = getattr(err, "flag_name", None) or getattr(getattr(err, "flag", None), "name", None)
    if name and f"--{name}" not in message and f"'{name}'" not in message:
        message = f"--{name}: {message}"
    return message


def parse_flags(
    argv: list[str], positional: bool = False, flag_values: flags.FlagValues = FLAGS
) -> list[str]:
    """absl's parsing for `app.run(flags_parser=...)`: --help exits 0, mistakes one line, 2.

    positional: the script takes positional arguments (else one is a mistake).
    flag_values: the flags to parse into (absl's global FLAGS).
    """
    if any(arg in _HELP for arg in argv[1:]):
        app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
        sys.exit(0)
    try:
        rest = flag_values(argv)
    except flags.Error as err:
        usage_error(_flag_name(err))
    if len(rest) > 1 and not positional:
        usage_error(f"unexpected arguments {rest[1:]} (flags take the form --name=value)")
    return rest


def run(main: Callable[[list[str]], Any], positional: bool = False) -> None:
    """`absl.app.run(main)` with `parse_flags`: a flag mistake, or a `UsageError` (this
    module's or absl's `app.UsageError`) raised by main, is one line and exit status 2.

    positional: main takes positional arguments (argv[1:]); else one is a mistake.
    """

    def checked_main(argv: list[str]) -> Any:
        try:
            return main(argv)
        except app.UsageError as err:  # this module's UsageError included
            usage_error(str(err))

    app.run(checked_main, flags_parser=functools.partial(parse_flags, positional=positional))


def positive_int(name: str, minimum: int = 1, flag_values: flags.FlagValues = FLAGS) -> None:
    """Registers a validator: the integer flag `name` must be >= minimum (None passes)."""
    flags.register_validator(
        name,
        lambda value: value is None or value >= minimum,
        message=f"--{name} must be an integer >= {minimum}",
        flag_values=flag_values,
    )


def _ints(values: Iterable[str]) -> list[int] | None:
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        return None


def int_list(
    name: str, minimum: int = 1, nonempty: bool = True, flag_values: flags.FlagValues = FLAGS
) -> None:
    """Registers a validator: the list flag `name` must hold integers >= minimum."""

    def check(values) -> bool:
        ints = _ints(values or [])
        if ints is None or any(i < minimum for i in ints):
            return False
        return bool(ints) or not nonempty

    flags.register_validator(
        name,
        check,
        message=f"--{name} must be a comma-separated list of integers >= {minimum}",
        flag_values=flag_values,
    )


def choice_list(
    name: str,
    choices: Iterable[str],
    nonempty: bool = True,
    flag_values: flags.FlagValues = FLAGS,
) -> None:
    """Registers a validator: every item of the list flag `name` must be one of choices."""
    allowed = tuple(choices)

    def check(values) -> bool:
        return all(v in allowed for v in values or []) and (bool(values) or not nonempty)

    flags.register_validator(
        name,
        check,
        message=f"--{name} takes a comma-separated list of {', '.join(allowed)}",
        flag_values=flag_values,
    )
