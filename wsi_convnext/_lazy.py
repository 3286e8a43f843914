"""Lazy package exports: names resolved from their submodule on first access (keeps imports light)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(package: str, by_module: Mapping[str, Iterable[str]]) -> tuple[Callable[[str], Any], list[str]]:
    """A module ``__getattr__`` and ``__all__`` for names that live in submodules of ``package``.

    Args:
        package: The package (``__name__``).
        by_module: Submodule name (relative to ``package``) → the names it exports.

    Returns:
        ``(__getattr__, __all__)``: ``__getattr__`` imports ``package.<submodule>`` when one of
        its names is first used; ``__all__`` is the sorted names.
    """
    where = {name: module for module, names in by_module.items() for name in names}

    def __getattr__(name: str) -> Any:
        mod = where.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{mod}", package), name)

    return __getattr__, sorted(where)
