"""Numeric ranges and string choices of config fields, checked by each config dataclass
when it is built.

A bad value is refused where the dataclass is constructed, from YAML, ``--set`` or Python,
so it fails before a run folder exists rather than mid-run or silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Bound",
    "POSITIVE",
    "NON_NEGATIVE",
    "AT_LEAST_ONE",
    "PROBABILITY",
    "check_fields",
    "check_choices",
]


@dataclass(frozen=True)
class Bound:
    """The interval a numeric value (or each number of a list value) must lie in."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):  # YAML's .inf / .nan: no setting means "infinite"
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"


POSITIVE = Bound(0, lo_open=True)
NON_NEGATIVE = Bound(0)
AT_LEAST_ONE = Bound(1)
PROBABILITY = Bound(0, 1)


def check_fields(
    cfg: Any, section: str, bounds: Mapping[str, Bound], pairs: Iterable[str] = ()
) -> None:
    """Raise ``ValueError`` naming ``section.field`` for the first field out of its bound;
    the fields named in ``pairs`` are (low, high) and must also be in order."""
    prefix = f"{section}." if section else ""
    for name, bound in bounds.items():
        value = getattr(cfg, name)
        if isinstance(value, tuple):
            if not all(bound.holds(v) for v in value):
                raise ValueError(
                    f"each number of {prefix}{name} must be {bound}, got {list(value)}"
                )
        elif not bound.holds(value):
            raise ValueError(f"{prefix}{name} must be {bound}, got {value}")
    for name in pairs:
        low, high = getattr(cfg, name)
        if low > high:
            raise ValueError(
                f"{prefix}{name} must be [low, high] with low <= high, got {[low, high]}"
            )


def check_choices(cfg: Any, section: str, choices: Mapping[str, Iterable[str]]) -> None:
    """Raise ``ValueError`` naming ``section.field`` and its choices for the first string
    field that is not one of them."""
    prefix = f"{section}." if section else ""
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if value not in tuple(allowed):
            raise ValueError(f"{prefix}{name}={value!r}: expected one of {list(allowed)}")
