"""Exception hierarchy.

Every error raised on purpose by wsi-convnext derives from :class:`WsiConvnextError`
and also from the matching built-in exception, so callers can catch either
``WsiConvnextError`` or e.g. ``FileNotFoundError``. Messages are one line, name the
offending file or option, and say what to do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path


class WsiConvnextError(Exception):
    """Base class of all wsi-convnext errors."""


class InputNotFoundError(WsiConvnextError, FileNotFoundError):
    """A slide, store, folder, manifest or weights file does not exist or holds nothing usable."""


class SlideOpenError(WsiConvnextError, OSError):
    """No backend can open a file as a slide (unsupported format, truncated or corrupt header)."""


class SlideReadError(WsiConvnextError, OSError):
    """A slide opened but reading pixels failed (corrupt tile data, decode error)."""


class MppError(WsiConvnextError, ValueError):
    """The slide's resolution (µm/px) is missing, absurd, anisotropic or incompatible with the target."""


class NoTissueError(WsiConvnextError, ValueError):
    """Tissue detection found no tile with enough tissue."""


class StoreError(WsiConvnextError, ValueError):
    """A zarr store is foreign, incomplete, or of an unsupported schema version."""


class StoreExistsError(WsiConvnextError, FileExistsError):
    """A finished store or feature set exists with different parameters; pass ``overwrite``."""


class StoreDamagedError(StoreError):
    """A finished store's arrays are missing chunks or fail their checksums; re-tile / re-embed."""


class StoreReplacedError(StoreError):
    """A store was replaced by another run (``tile --overwrite``) while this run read it; re-run."""


class BusyError(WsiConvnextError, BlockingIOError):
    """Another live process is writing the same output (it holds the output's lock)."""


class UnsafePathError(WsiConvnextError, ValueError):
    """A name (slide id, file stem) would make an output path leave its output folder."""


class OutputWriteError(WsiConvnextError, OSError):
    """An output could not be written (full disk, permissions); nothing half-written is left."""


class ConfigError(WsiConvnextError, ValueError):
    """A configuration value or option is invalid."""


class EncoderError(WsiConvnextError, ValueError):
    """An encoder cannot be built (unknown model, unsupported stem, impossible stem conversion)."""


class WeightsError(WsiConvnextError, ValueError):
    """A weights file cannot be loaded or does not fit the model."""


class DeviceError(WsiConvnextError, RuntimeError):
    """The requested compute device is not available."""


class DistributedError(WsiConvnextError, RuntimeError):
    """A distributed run lost a rank or cannot start (torchrun/srun environment, timeout)."""


class LabelsError(WsiConvnextError, ValueError):
    """A labels file is malformed or inconsistent with the stores."""


class CorruptTileError(WsiConvnextError, OSError):
    """A tile image (file or stored tile) cannot be read or decoded."""


USAGE_ERRORS: tuple[type[WsiConvnextError], ...] = (
    ConfigError, InputNotFoundError, DeviceError, EncoderError, WeightsError, LabelsError, UnsafePathError,
)
"""Errors that mean "called it wrong" (CLI exit code 2) rather than "a slide or step failed" (1)."""


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """An exception's (or a text's) message squeezed onto one line, cut at ``limit`` characters."""
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


#: ``on_failure(store path, one-line message)``: how cohort commands record a failed store and go on.
OnFailure = Callable[[Path, str], None]


def fail_or_raise(
    path: str | os.PathLike[str], exc: BaseException, on_failure: OnFailure | None, logger: logging.Logger
) -> None:
    """The one "record and go on" policy: report ``exc`` for ``path`` through ``on_failure``, or raise it without one.

    Call it inside the ``except`` block that caught ``exc``.
    """
    if on_failure is None:
        raise exc
    logger.info("%s: left out: %s", path, one_line(exc))  # the caller reports it (the CLI: one `error:` line)
    logger.debug("%s failed", path, exc_info=exc)
    on_failure(Path(path), one_line(exc))


def listing(items: Iterable[object], n: int = 5) -> str:
    """The first ``n`` items for a message, comma-separated, with ``(+K more)`` for the rest."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")
