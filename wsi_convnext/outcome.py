"""One result shape and one "run this, record a failure" helper for every unit of work.

A unit of work (tiling one slide, embedding one store, one cohort stage of one slide)
either returns its result or raises. Batch commands and the cohort runner must record a
failure and go on, so they all run the work through :func:`attempt` and build their
result from :class:`Outcome`'s fields (``status``, ``error_type``, ``error``,
``seconds``): the exception class name and its message squeezed onto one line.

``status`` is ``done``, ``skipped`` (the output already existed) or ``failed``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import WsiConvnextError, one_line

__all__ = ["MAX_ERROR", "STATUSES", "Attempt", "Outcome", "attempt", "failure_fields"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The statuses of a finished unit of work.
STATUSES: tuple[str, ...] = ("done", "skipped", "failed")
#: Longest error message kept, in characters (a manifest cell, a report line).
MAX_ERROR = 500


def failure_fields(exc: BaseException, seconds: float = 0.0) -> dict[str, Any]:
    """The :class:`Outcome` fields of a unit of work that raised ``exc`` (or never returned)."""
    return {
        "status": "failed",
        "error_type": type(exc).__name__,
        "error": one_line(str(exc) or repr(exc), MAX_ERROR),
        "seconds": float(seconds),
    }


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """Base of result types: how one unit of work ended.

    Keyword-only fields, so subclasses put their own (positional) fields first.

    Attributes:
        status: ``done``, ``skipped`` or ``failed``.
        error_type: Exception class name when failed, else ``""``.
        error: One-line error message when failed, else ``""``.
        seconds: Wall time of the work, in seconds.
    """

    status: str = "done"
    error_type: str = ""
    error: str = ""
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass(frozen=True)
class Attempt(Generic[T]):
    """What :func:`attempt` returns: the value, or the failure's :class:`Outcome` fields."""

    value: T | None
    seconds: float
    failure: dict[str, Any] | None = None
    exception: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None


def attempt(fn: Callable[..., T], *args: Any, what: str, **kwargs: Any) -> Attempt[T]:
    """Run ``fn(*args, **kwargs)``; an exception becomes a recorded failure, never a crash.

    Expected errors (:class:`~wsi_convnext.errors.WsiConvnextError`) are logged at debug
    level, anything else as a warning with its traceback. ``KeyboardInterrupt`` and
    ``SystemExit`` propagate.

    Args:
        fn: The work.
        what: Names the work in log messages, e.g. ``"tile of slide-1"``.

    Returns:
        ``Attempt(value, seconds)``, or ``Attempt(None, seconds, failure_fields(exc), exc)``.
    """
    t0 = time.perf_counter()
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - failure isolation: record and go on
        seconds = time.perf_counter() - t0
        if isinstance(exc, WsiConvnextError):
            logger.debug("%s failed", what, exc_info=True)
        else:
            logger.warning("%s failed unexpectedly", what, exc_info=True)
        return Attempt(None, seconds, failure_fields(exc, seconds), exc)
    return Attempt(value, time.perf_counter() - t0)
