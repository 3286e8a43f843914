"""Values from TOML files and command lines → typed parameter fields (next to :mod:`.params`).

:func:`coerce` converts a raw value (TOML, a ``key=value`` string, a flag) to a field's
annotated type (``int``, ``float``, ``bool``, ``str``, ``Path``, ``Literal``, lists, tuples,
optionals); :func:`assign` sets a dotted key (``tile.mpp``) on a tree of ``param()``
dataclasses, converting and checking the value once, and naming the key in a one-line
:class:`~wsi_convnext.errors.ConfigError` (with a did-you-mean hint for unknown keys).
The run config (:mod:`wsi_convnext.config`) and ``TissueParams.from_assignments`` use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from .errors import ConfigError

__all__ = ["Mismatch", "assign", "coerce", "describe", "parse_bool", "suggest"]

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_bool(value: Any) -> bool:
    """``true``/``false`` (also yes/no, on/off, 1/0, any case) or a bool → bool.

    Raises:
        Mismatch: Anything else.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # also numpy.bool_
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise Mismatch(describe(bool))


def describe(tp: Any) -> str:
    """What a value of type ``tp`` looks like, for messages (``an integer``, ``true or false``)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return "a pair of numbers low,high (e.g. 190,235)" if args == [float, float] else "a list"
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {str: "strings", Path: "paths", int: "integers", float: "numbers"}
        return f"a list of {plural.get(item, describe(item))}"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "a path",
    }.get(tp, getattr(tp, "__name__", str(tp)))


class Mismatch(Exception):
    """A value does not fit a type (the message says what was expected, e.g. ``an integer``)."""


def coerce(tp: Any, value: Any) -> Any:
    """Convert a TOML/override value to the type ``tp``.

    Raises:
        Mismatch: The value does not fit ``tp``.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return coerce(args[0], value)
        for a in args:
            try:
                return coerce(a, value)
            except Mismatch:
                continue
        raise Mismatch(describe(tp))
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise Mismatch(describe(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]
        try:
            return [coerce(item, v) for v in items]
        except Mismatch:
            raise Mismatch(describe(tp)) from None
    if origin in (dict, Mapping):
        if isinstance(value, Mapping):
            return dict(value)
        raise Mismatch("a table")
    if origin is tuple:
        args = typing.get_args(tp)
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or (Ellipsis not in args and len(items) != len(args)):
            raise Mismatch(describe(tp))
        kinds = [args[0]] * len(items) if Ellipsis in args else list(args)
        return tuple(coerce(k, v.strip() if isinstance(v, str) else v) for k, v in zip(kinds, items))
    if tp is bool:
        return parse_bool(value)
    if tp in (int, float):
        if isinstance(value, bool):
            raise Mismatch(describe(tp))
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value.strip())
            except ValueError:
                pass
        raise Mismatch(describe(tp))
    if tp is str:
        if isinstance(value, str):
            return value
        raise Mismatch(describe(tp))
    if tp is Path:
        if isinstance(value, (str, os.PathLike)) and str(value):
            return Path(os.path.expanduser(str(value)))
        raise Mismatch(describe(tp))
    raise Mismatch(describe(tp))  # pragma: no cover - a type this loader does not know


def suggest(key: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss of ``key`` among ``known``, else the known keys."""
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else f" (known keys: {', '.join(sorted(known))})"


def assign(obj: Any, dotted: str, value: Any, source: str) -> None:
    """Set ``dotted`` (e.g. ``tile.mpp``) on the tree of ``param()`` dataclasses ``obj`` from a raw value.

    The value is converted to the field's type (or by the field's ``parse`` metadata) and
    checked by its ``param()`` check, once. ``None`` keeps the current value.

    Raises:
        ConfigError: ``{source}: ...``, one line naming ``dotted``: an unknown key, a value of
            the wrong type, or a value the field's check rejects.
    """
    parts = dotted.split(".")
    target = obj
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(target):
            break
        hints = typing.get_type_hints(type(target))
        fields = {f.name: f for f in dataclasses.fields(target)}
        if part not in fields:
            # A tree may hold sections that are not fields (the run config's cluster kinds).
            section = getattr(target, "extension_section", lambda _: None)(part)
            if section is None:
                known = [*fields, *getattr(target, "extension_names", tuple)()]
                raise ConfigError(f"{source}: unknown key '{dotted}'{suggest(part, [k for k in known if not k.startswith('_')])}")
            if depth == len(parts) - 1:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{source}: '{dotted}' must be a table ([{dotted}]), got {value!r}")
                for k, v in value.items():
                    assign(obj, f"{dotted}.{k}", v, source)
                return
            target = section
            continue
        f = fields[part]
        tp = hints[part]
        rest = parts[depth + 1 :]
        if dataclasses.is_dataclass(tp):
            if not rest:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{source}: '{dotted}' must be a table ([{dotted}]), got {value!r}")
                for k, v in value.items():
                    assign(obj, f"{dotted}.{k}", v, source)
                return
            target = getattr(target, part)
            continue
        if typing.get_origin(tp) is dict:
            current = dict(getattr(target, part))
            if rest:
                current[".".join(rest)] = value
            elif isinstance(value, Mapping):
                current.update(value)
            else:
                raise ConfigError(f"{source}: '{dotted}' must be a table, got {value!r}")
            setattr(target, part, {k: v for k, v in current.items() if v is not None})
            return
        if rest:
            raise ConfigError(f"{source}: '{'.'.join(parts[: depth + 1])}' is not a table; unknown key '{dotted}'")
        if value is None:  # absent/None keeps the default
            return
        parse = f.metadata.get("parse")
        try:
            coerced = parse(value) if parse is not None else coerce(tp, value)
        except Mismatch as exc:
            raise ConfigError(f"{source}: '{dotted}' must be {exc}, got {value!r}") from None
        except ValueError as exc:  # a parse function's "must be ..."
            raise ConfigError(f"{source}: '{dotted}' {exc}, got {value!r}") from None
        check = f.metadata.get("check")
        if check is not None and coerced is not None:
            items = coerced if isinstance(coerced, list) else [coerced]
            for item in items:
                problem = check(item)
                if problem:
                    raise ConfigError(f"{source}: '{dotted}' {problem}, got {value!r}")
        setattr(target, part, coerced)
        return


