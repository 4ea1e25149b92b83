"""A command's surface as data: the flags a step's settings take on the command line and the
command that runs it. Step modules declare these next to their settings, so adding a step kind
adds its command without touching the parser (``cli.parser`` builds every parser from here).

A flag names the settings field it sets; its default is never restated: the help shows the
settings class's own (``(default: X)``), and a flag the user did not give leaves the
recipe's or the declared value.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flag:
    """One command-line flag for one settings field."""

    field: str
    names: tuple[str, ...]
    help: str | Callable[[], str]
    """The help text, or a function that writes it when the parser is built (a registry's
    current members)."""
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    action: str | None = None
    """``store_true``, ``store_false``, ``append`` (argparse's)."""
    choices: Callable[[], tuple[str, ...]] | tuple[str, ...] | None = None
    """Allowed values, or a function that lists them when the parser is built (a registry)."""
    show_default: bool = True
    convert: Callable[[Any], Any] | None = None
    """Applied to the parsed value when the job is built (e.g. a comma list to a tuple)."""
    group: str = ""
    """The help section it appears in (the command's first group when empty)."""
    path: bool = False
    """Its value may name a local file or directory: stored absolute in the job (a recipe
    replayed from another directory still finds it)."""

    def choice_list(self) -> tuple[str, ...] | None:
        return self.choices() if callable(self.choices) else self.choices

    def help_text(self) -> str:
        return self.help() if callable(self.help) else self.help


@dataclass(frozen=True)
class Command:
    """A subcommand that runs one step kind (``snapprune prune``, ``snapprune quantize``)."""

    name: str
    help: str
    description: str
    epilog: str
    groups: tuple[str, ...]
    """The shared flag groups it takes, in help order: ``calibration``, ``layer_errors``,
    ``fused`` (the flags of the steps it runs in the same pass), ``evaluation``, ``output``,
    ``stream``, ``resume`` (``--resume``/``--restart`` for a stopped run)."""
    what: str
    """What the step does to the model, for help texts ("before pruning")."""
    first_group: str = "settings"
    resume_group: str = "a long run"
    resume_help: str = "continue a run that was stopped, from its last checkpoint"
    restart_help: str = "discard a stopped run's saved progress and start over"


def default_of(cls, name: str):
    """The declared default of a dataclass field."""
    for item in dataclasses.fields(cls):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            return item.default_factory()
    raise KeyError(name)


def shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def default_text(cls, name: str) -> str:
    """`` (default: X)`` from the declaration, for help texts."""
    return f" (default: {shown(default_of(cls, name))})"


def fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def windows(text: str) -> int | None:
    if text.lower() == "all":
        return None
    return positive_int(text)


DETERMINISTIC_HELP = (
    "bit-identical results for any thread, batch or process count on the same hardware: "
    "statistics summed window by window in float64, whole-matrix factorisations on one CPU "
    "thread (slower on wide layers with many cores); torch.use_deterministic_algorithms")
