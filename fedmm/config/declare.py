"""How a run-config key is declared: once, as a field of its concern's settings group.

``key(default, help, check)`` is a dataclass field whose metadata carries the
help text and the range check; ``Settings`` (``fedmm.config``) is the union of
the groups, and everything else (the table of keys, the validation, the
pyproject check) is read off these fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], "str | None"]  # returns the problem when the value is invalid


class ConfigError(ValueError):
    """A run-config value is unknown, ill-typed or out of range."""


def key(default: Any, help: str, check: Check | None = None) -> Any:
    """A run-config key: its default, what it means, and the check its value must pass."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


class Accepts:
    """A check that also names the values it lets through, for the generated reference
    (docs/reference/run-config.md)."""

    def __init__(self, valid: str, check: Check) -> None:
        self.valid, self._check = valid, check

    def __call__(self, value: Any) -> str | None:
        return self._check(value)


def accepts(valid: str) -> Callable[[Check], Accepts]:
    """Decorator form of ``Accepts``: ``@accepts("> 0")`` over a check."""
    return lambda check: Accepts(valid, check)


def valid_values(check: Check | None) -> str:
    """What a key accepts, as the reference prints it ('' for a key with no check beyond its type)."""
    if check is None:
        return ""
    if not isinstance(check, Accepts):
        raise TypeError(f"check {check!r} does not say what it accepts: wrap it in accepts(...)")
    return check.valid


def run_config_name(attr: str) -> str:
    """The run-config key of a settings attribute (snake_case -> kebab-case)."""
    return attr.replace("_", "-")


@accepts("> 0")
def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


@accepts(">= 0")
def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


@accepts("(0, 1]")
def fraction(v: Any) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


@accepts("(0, 1)")
def open_fraction(v: Any) -> str | None:
    return None if 0.0 < v < 1.0 else "must be in (0, 1)"


@accepts("[0, 1)")
def unit_interval(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def one_of(*choices: str) -> Check:
    @accepts(" | ".join(choices))
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def parses(parse: Callable[[Any], Any], valid: str) -> Check:
    """A check that passes when ``parse(value)`` does; its ValueError's message is the problem. ``valid``
    names the form it parses, for the reference."""

    @accepts(valid)
    def check(v: Any) -> str | None:
        try:
            parse(v)
        except ValueError as exc:
            return str(exc)
        return None

    return check
