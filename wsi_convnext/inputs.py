"""Turning user inputs (files, folders, CSV manifests) into a list of slides to process."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, InputNotFoundError
from .slide import SLIDE_EXTENSIONS


_ID_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class SlideSpec:
    """One slide to process.

    Attributes:
        path: The slide file.
        slide_id: Unique identifier; names the store ``<slide_id>.zarr``.
        mpp: Level-0 resolution override in µm/px (from ``--slide-mpp`` or a manifest), or None.
    """

    path: Path
    slide_id: str
    mpp: float | None = None


def is_slide_file(path: Path) -> bool:
    """Whether ``path`` has a known slide extension."""
    name = path.name.lower()
    return any(name.endswith(ext) for ext in SLIDE_EXTENSIONS)


def slide_stem(path: Path) -> str:
    """File name without its slide extension (``a.ome.tiff`` → ``a``), made safe for a folder name."""
    name = path.name
    lower = name.lower()
    for ext in sorted(SLIDE_EXTENSIONS | {".ome.tif", ".ome.tiff"}, key=len, reverse=True):
        if lower.endswith(ext):
            name = name[: -len(ext)]
            break
    else:
        name = path.stem
    return _ID_SAFE.sub("_", name).strip("._") or "slide"


def _dicom_series_key(path: Path) -> Path | None:
    # A DICOM WSI is a folder of .dcm files, one per level; it is one slide.
    return path.parent if path.suffix.lower() == ".dcm" else None


def _walk(folder: Path) -> list[Path]:
    found: list[Path] = []
    seen_dicom: set[Path] = set()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            if not is_slide_file(p):
                continue
            series = _dicom_series_key(p)
            if series is not None:
                if series in seen_dicom:
                    continue
                seen_dicom.add(series)
            found.append(p)
    return found


def _read_manifest(path: Path) -> list[tuple[Path, str | None, float | None]]:
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if "path" not in fields:
                raise ConfigError(f"{path}: manifest needs a 'path' column (optional: slide_id, mpp)")
            rows = []
            for lineno, raw in enumerate(reader, start=2):
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
                if not row.get("path"):
                    raise ConfigError(f"{path}:{lineno}: empty 'path'")
                slide = Path(row["path"])
                if not slide.is_absolute():
                    slide = path.parent / slide
                mpp = None
                if row.get("mpp"):
                    try:
                        mpp = float(row["mpp"])
                    except ValueError as exc:
                        raise ConfigError(f"{path}:{lineno}: mpp {row['mpp']!r} is not a number") from exc
                    if not mpp > 0:
                        raise ConfigError(f"{path}:{lineno}: mpp must be positive, got {mpp}")
                rows.append((slide, row.get("slide_id") or None, mpp))
            return rows
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: manifest is not a text CSV file") from exc


def discover_slides(inputs: Sequence[str | os.PathLike[str]], *, slide_mpp: float | None = None) -> list[SlideSpec]:
    """Expand files, folders (searched recursively) and CSV manifests into slides.

    Slide ids are file stems. Colliding stems are made unique deterministically: slides
    are sorted by path and every slide after the first of a stem gets ``-2``, ``-3``, ...
    An explicit ``slide_id`` from a manifest is kept as given and must be unique.

    Args:
        inputs: Slide files, folders or ``.csv`` manifests (columns ``path``, optional ``slide_id``, ``mpp``).
        slide_mpp: Resolution override (µm/px) for slides without one from a manifest.

    Raises:
        InputNotFoundError: A path does not exist, or nothing slide-like was found.
        ConfigError: A malformed manifest or duplicate explicit slide ids.
    """
    entries: list[tuple[Path, str | None, float | None]] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise InputNotFoundError(f"{p}: no such file or folder")
        if p.is_dir():
            files = _walk(p)
            if not files:
                raise InputNotFoundError(
                    f"{p}: no slides found (looked for {', '.join(sorted(SLIDE_EXTENSIONS))})"
                )
            entries += [(f, None, None) for f in files]
        elif p.suffix.lower() == ".csv":
            rows = _read_manifest(p)
            if not rows:
                raise InputNotFoundError(f"{p}: manifest lists no slides")
            entries += rows
        else:
            entries.append((p, None, None))

    # De-duplicate the same file given twice; keep the first mention.
    unique: dict[Path, tuple[Path, str | None, float | None]] = {}
    for path, sid, mpp in entries:
        unique.setdefault(path.resolve(), (path, sid, mpp))
    ordered = sorted(unique.values(), key=lambda e: str(e[0]))

    explicit = [sid for _, sid, _ in ordered if sid]
    dupes = sorted({s for s in explicit if explicit.count(s) > 1})
    if dupes:
        raise ConfigError(f"duplicate slide_id in manifest: {', '.join(dupes)}")
    taken: set[str] = set(explicit)
    specs: list[SlideSpec] = []
    for path, sid, mpp in ordered:
        if sid is None:
            base = slide_stem(path)
            sid, k = base, 2
            while sid in taken:
                sid, k = f"{base}-{k}", k + 1
            taken.add(sid)
        specs.append(SlideSpec(path=path, slide_id=sid, mpp=mpp if mpp is not None else slide_mpp))
    return specs
