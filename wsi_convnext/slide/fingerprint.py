"""Slide fingerprints: the content hash a store records to notice that its slide file changed.

Two modes (:data:`FINGERPRINT_MODES`, ``--fingerprint``): ``quick`` hashes the file size, the
first and last MiB and the companion files' names and sizes; ``full`` also hashes every byte.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from .._io import file_sha256
from ..errors import ConfigError, InputNotFoundError

__all__ = ["FINGERPRINT_MODES", "slide_fingerprint"]

#: Slide fingerprint modes (``--fingerprint``): ``quick`` hashes the size and the first and
#: last MiB (misses a same-size edit in the middle of the file); ``full`` hashes every byte.
FINGERPRINT_MODES = ("quick", "full")


def slide_fingerprint(path: str | os.PathLike[str], mode: str = "quick", *, chunk_bytes: int = 1 << 20) -> str:
    """Content fingerprint of a slide file for change detection (hex sha256) in ``mode``.

    ``quick`` hashes the file size, the first and the last ``chunk_bytes`` (1 MiB) of the file
    and, for multi-file formats, the names and sizes of the companion files (the MIRAX data
    folder of a ``.mrxs``; the sibling ``.dcm`` files of a DICOM series). It is deliberately
    *not* a full-file hash: hashing a multi-gigabyte slide takes tens of seconds, while headers,
    directories and tile tables sit at the start or the end of the file and any rewrite
    (re-scan, conversion, truncation) changes the size or those regions. A change that only
    touches tile bytes in the middle of the file, keeping the size, goes unnoticed. ``full``
    adds the sha256 of every byte: it notices any edit, at the cost of reading the whole slide
    once more.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        ConfigError: ``mode`` is not one of :data:`FINGERPRINT_MODES`.
    """
    if mode not in FINGERPRINT_MODES:
        raise ConfigError(f"unknown fingerprint mode {mode!r}; choose one of {', '.join(FINGERPRINT_MODES)}")
    quick = _quick_fingerprint(path, chunk_bytes)
    if mode == "quick":
        return quick
    return hashlib.sha256(f"wsi-convnext-fingerprint-full-v1\0{quick}\0{file_sha256(path)}".encode()).hexdigest()


def _quick_fingerprint(path: str | os.PathLike[str], chunk_bytes: int) -> str:
    """The ``quick`` fingerprint (hex sha256), see :func:`slide_fingerprint`."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: slide file not found")
    h = hashlib.sha256(b"wsi-convnext-fingerprint-v1\0")
    size = p.stat().st_size
    h.update(str(size).encode() + b"\0")
    with p.open("rb") as fh:
        h.update(fh.read(chunk_bytes))
        if size > chunk_bytes:
            fh.seek(max(chunk_bytes, size - chunk_bytes))
            h.update(fh.read(chunk_bytes))
    for name, fsize in _companion_files(p):
        h.update(f"\0{name}\0{fsize}".encode())
    return h.hexdigest()


def _companion_files(p: Path) -> Iterator[tuple[str, int]]:
    suffix = p.suffix.lower()
    if suffix == ".mrxs":
        data_dir = p.with_suffix("")
        if data_dir.is_dir():
            for f in sorted(data_dir.iterdir()):
                if f.is_file():
                    yield f"{data_dir.name}/{f.name}", f.stat().st_size
    elif suffix == ".dcm":
        for f in sorted(p.parent.glob("*")):
            if f != p and f.suffix.lower() == ".dcm" and f.is_file():
                yield f.name, f.stat().st_size
