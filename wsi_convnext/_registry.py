"""The one registry type: every extension point of the library is a :class:`Registry`.

Slide readers, encoder families, stems, MIL aggregators, tile transforms, cohort stages,
cluster kinds, export formats and tissue methods are each one ``Registry``, so they share
one rule for names: registering a *different* object under a taken name raises
:class:`~wsi_convnext.errors.ConfigError` unless ``replace=True``; registering the same
object again is a no-op. Front ends (the CLI's choices and help, ``param()`` checks) list
:meth:`Registry.names` when they run, never a snapshot taken at import time.

A registry whose built-in entries live in a module that imports torch names that module as
its ``loader`` and ``declares`` the built-in names, so that listing names (``--help``) stays
instant; looking an entry up imports the loader, which must register every declared name.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from .errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one extension point, in registration order (a read-only mapping).

    Args:
        kind: What an entry is, for messages (``"aggregator"``, ``"slide backend"``).
        loader: Module that registers the built-in entries when imported (lazy registries).
        declares: The built-in names ``loader`` registers, listed without importing it.
        error: The error raised for an unknown name (a :class:`ConfigError` subclass).
    """

    def __init__(self, kind: str, *, loader: str | None = None, declares: Sequence[str] = (),
                 error: type[Exception] = ConfigError) -> None:  # fmt: skip
        self.kind = kind
        self.error = error
        self._loader = loader
        self._declared = tuple(declares)
        self._items: dict[str, T] = {}

    # --- registration ----------------------------------------------------------------------

    def register(self, name: str, obj: T, *, replace: bool = False, before: str | None = None) -> T:
        """Add ``obj`` under ``name`` (at the end, or just before the entry ``before``); returns ``obj``.

        Raises:
            ConfigError: ``name`` is empty, or taken by another object and ``replace`` is false;
                ``before`` is not registered.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._declared:
            self._load()  # a built-in's name: the built-in comes first
        old = self._items.get(name)
        if old is not None and old is not obj and old != obj and not replace:
            raise ConfigError(
                f"a {self.kind} named {name!r} is already registered ({_describe(old)}); "
                "pick another name or register with replace=True"
            )
        if before is None or name in self._items:
            self._items[name] = obj
            return obj
        self.lookup(before)
        items = list(self._items.items())
        at = [n for n, _ in items].index(before)
        self._items = dict([*items[:at], (name, obj), *items[at:]])
        return obj

    def decorator(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """``@registry.decorator(name)``: register the decorated object under ``name``."""
        return lambda obj: self.register(name, obj, replace=replace)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error if absent)."""
        self._items.pop(name, None)

    # --- lookup ----------------------------------------------------------------------------

    def _load(self) -> None:
        if self._loader is None or all(n in self._items for n in self._declared):
            return
        if self._loader not in sys.modules:  # else imported, or being imported (registering them now)
            importlib.import_module(self._loader)
            missing = [n for n in self._declared if n not in self._items]
            if missing:  # pragma: no cover - a built-in declared but not registered
                raise ConfigError(f"{self._loader} did not register the declared {self.kind}(s) {missing}")

    def names(self) -> tuple[str, ...]:
        """Every name, in registration order (declared built-ins first; imports nothing)."""
        return tuple(dict.fromkeys([*self._declared, *self._items]))

    def lookup(self, name: str) -> T:
        """The entry ``name`` (``registry[name]`` is the same).

        Raises:
            ConfigError: No such entry (or the registry's ``error`` type); the message lists the names.
        """
        if name not in self._items:
            self._load()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def __getitem__(self, name: str) -> T:
        return self.lookup(name)

    def get(self, name: str, default: Any = None) -> Any:
        """The entry ``name``, or ``default``."""
        return self.lookup(name) if name in self else default

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._declared

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"<{self.kind} registry: {', '.join(self.names())}>"

    # --- tests and plug-ins that register temporarily ---------------------------------------

    def snapshot(self) -> dict[str, T]:
        """A copy of the entries, for :meth:`restore`."""
        return dict(self._items)

    def restore(self, items: Mapping[str, T]) -> None:
        """Put back the entries of an earlier :meth:`snapshot`."""
        self._items = dict(items)


def _describe(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{getattr(obj, '__module__', '?')}.{name}"
