"""Checking an option table (`[strategy]`, `[privacy]`): one path for every table of named options.

Each option is declared once, with its default and the check its value must pass, so the
synchronous strategies, the asynchronous ones and the privacy settings all report a bad
key the same way (``strategy.trim: expected a number in [0, 0.5), got 0.7``) and none
can forget to reject a key it does not use (``momentum`` on fedadam would otherwise do
nothing, silently).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

Check = Callable[[str, Any], Any]  # (dotted key, value) -> the value to use, or ConfigError

#: default of an option that must be given
REQUIRED = object()


@dataclass(frozen=True)
class Option:
    """One key of a table: its default (None: absent; REQUIRED: must be given) and its check."""

    default: Any
    check: Check


def number(low: float, high: float = math.inf, *, open_low: bool = False,
           open_high: bool = True) -> Check:
    """A real number (not a bool) between `low` and `high`; ends closed unless open_*."""
    def check(key: str, value: Any) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and (value > low if open_low else value >= low) \
                and (value < high if open_high else value <= high):
            return float(value)
        bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ConfigError(f"{key}: expected a number in {bounds}, got {value!r}")
    return check


def integer(low: int) -> Check:
    """An int (not a bool) of at least `low`."""
    def check(key: str, value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= low:
            return value
        raise ConfigError(f"{key}: expected an integer >= {low}, got {value!r}")
    return check


def choice(*values: str, hint: str = "") -> Check:
    """One of `values`; `hint` says why others are not offered."""
    def check(key: str, value: Any) -> str:
        if value in values:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(values)}"
                          + (f" ({hint})" if hint else ""))
    return check


def parse_table(table: Mapping[str, Any], options: Mapping[str, Option], *, path: str,
                owner: str | None = None) -> dict[str, Any]:
    """Every option of `options` with its checked value (the default where not given).

    A key with value None counts as absent; a key not in `options` is an error that
    lists the valid ones; a REQUIRED option that is absent is an error. Defaults are
    used as declared (None stays None) and are not checked.
    """
    out: dict[str, Any] = {}
    for key, value in table.items():  # in the table's order: the first mistake is reported
        if value is None:
            continue
        if key not in options:
            of = f" of {owner!r}" if owner else ""
            raise ConfigError(f"{path}.{key}: not an option{of} (options: {', '.join(options)})")
        out[key] = options[key].check(f"{path}.{key}", value)
    for key, option in options.items():
        if key not in out:
            if option.default is REQUIRED:
                raise ConfigError(f"{path}.{key}: required")
            out[key] = option.default
    return out


def parse_strategy_table(table: Mapping[str, Any], known: Mapping[str, Mapping[str, Option]], *,
                      path: str, default_name: str | None = None) -> tuple[str, dict[str, Any]]:
    """The `name` key picks which option set applies; returns (name, checked options)."""
    name = table.get("name", default_name)
    if name not in known:
        raise ConfigError(f"{path}.name: unknown strategy {name!r} (known: {', '.join(known)})")
    rest = {k: v for k, v in table.items() if k != "name"}
    return name, parse_table(rest, known[name], path=path, owner=name)
