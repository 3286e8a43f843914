"""Parameter objects that validate themselves: dataclass fields carrying a check and a help text.

The library's parameter objects (:class:`~wsi_convnext.tiling.tiler.TileParams`,
:class:`~wsi_convnext.embed.EmbedOptions`) declare each field with :func:`param` and call
:func:`check_params` in ``__post_init__``, so an object that exists is valid. Front ends
name a bad value in their own words from the :class:`ParameterError` they get: the CLI as
``--tile-size``, a run config as ``'tile.tile_size'`` (:mod:`wsi_convnext.config` builds
its ``[tile]`` and ``[embed]`` sections from these fields, so they cannot drift apart).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from .errors import ConfigError

__all__ = [
    "Check",
    "ParameterError",
    "at_least",
    "between",
    "check_params",
    "fraction",
    "half_open",
    "non_empty",
    "non_negative",
    "one_of",
    "param",
    "positive",
    "positive_finite",
]

#: ``value -> problem`` ("must be ...") or None when the value is fine.
Check = Callable[[Any], "str | None"]


class ParameterError(ConfigError):
    """A parameter object got a bad value.

    Attributes:
        name: The field name (e.g. ``tile_size``).
        problem: What is wrong, starting with "must" (e.g. ``must be at least 8``).
        value: The value given.
    """

    def __init__(self, name: str, problem: str, value: Any) -> None:
        self.name, self.problem, self.value = name, problem, value
        super().__init__(self.render(name))

    def render(self, label: str) -> str:
        """The message with the parameter called ``label`` (a flag, a config key, ...)."""
        return f"{label} {self.problem}, got {self.value!r}"

    def as_flag(self) -> str:
        """The message naming the command-line flag (``--tile-size``)."""
        return self.render("--" + self.name.replace("_", "-"))


def param(default: Any = dataclasses.MISSING, *, check: Check | None = None, doc: str = "",
          default_factory: Any = dataclasses.MISSING, parse: Callable[[Any], Any] | None = None) -> Any:  # fmt: skip
    """A dataclass field with a value check and a one-line help text (``metadata``).

    ``parse`` turns a raw value (TOML, a flag) into the field's value where the annotated
    type alone does not say how (raising ValueError "must be ..."); see :mod:`.coercion`.
    """
    meta = {"check": check, "doc": doc, **({"parse": parse} if parse is not None else {})}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def check_params(obj: Any) -> None:
    """Run every field check of the dataclass ``obj`` (``None`` values are not checked).

    Raises:
        ParameterError: The first field whose value its check rejects.
    """
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        value = getattr(obj, f.name)
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ParameterError(f.name, problem, value)


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def positive(v: Any) -> str | None:
    """Check: a number > 0."""
    return None if _number(v) and v > 0 else "must be positive"


def positive_finite(v: Any) -> str | None:
    """Check: a finite number > 0."""
    return None if _number(v) and 0 < v < math.inf else "must be positive and finite"


def non_negative(v: Any) -> str | None:
    """Check: a number >= 0."""
    return None if _number(v) and v >= 0 else "must be >= 0"


def between(low: float, high: float) -> Check:
    """Check: a number in [``low``, ``high``]."""

    def check(v: Any) -> str | None:
        return None if _number(v) and low <= v <= high else f"must be between {low} and {high}"

    return check


def half_open(low: float, high: float) -> Check:
    """Check: a number in [``low``, ``high``)."""

    def check(v: Any) -> str | None:
        return None if _number(v) and low <= v < high else f"must be in [{low}, {high})"

    return check


#: Check: a number in [0, 1].
fraction = between(0, 1)


def non_empty(v: Any) -> str | None:
    """Check: a non-empty string or sequence."""
    return None if len(v) else "must not be empty"


def at_least(low: int, hint: str = "") -> Check:
    """Check: a number >= ``low`` (``hint`` is appended to the problem, e.g. a default's meaning)."""

    def check(v: Any) -> str | None:
        return None if _number(v) and v >= low else f"must be at least {low}{hint}"

    return check


def one_of(choices: Iterable[str] | Callable[[], Iterable[str]]) -> Check:
    """Check: one of ``choices`` (a callable is asked each time, e.g. a registry's names)."""

    def check(v: Any) -> str | None:
        names = list(choices() if callable(choices) else choices)
        return None if v in names else "must be one of " + ", ".join(repr(n) for n in names)

    return check
