"""Turning user inputs (files, folders, CSV manifests) into a list of slides to process.

This module owns the slide-id policy (:func:`check_slide_id`): a slide id names files and
folders (``OUT/<slide_id>.zarr``, ``OUT/qc/<slide_id>.png``, heatmaps, exports), so it is
a plain file stem: letters, digits, ``_``, ``.`` and ``-``, starting with a letter or digit,
without a ``.zarr`` suffix. Ids derived from file names are sanitised into that form; an
explicit id from a manifest that is not of that form is refused, naming the manifest row.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, InputNotFoundError
from .slide import SLIDE_EXTENSIONS


logger = logging.getLogger(__name__)

_ID_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
#: What a slide id looks like (see the module docstring).
SLIDE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")
_STORE_SUFFIX = ".zarr"


def sanitise_slide_id(name: str) -> str:
    """Turn any text into a valid slide id, like a file stem (``"TCGA 01.zarr"`` → ``"TCGA_01"``)."""
    name = _ID_SAFE.sub("_", name)
    while name.lower().endswith(_STORE_SUFFIX):
        name = name[: -len(_STORE_SUFFIX)]
    name = name.strip("._-")[:200].rstrip("._-")
    return name or "slide"


def is_slide_id(slide_id: str) -> bool:
    """Whether ``slide_id`` follows the slide-id policy (safe as a file and folder name)."""
    return (
        isinstance(slide_id, str)
        and SLIDE_ID_PATTERN.fullmatch(slide_id) is not None
        and not slide_id.lower().endswith(_STORE_SUFFIX)
    )


def check_slide_id(slide_id: str, where: str) -> str:
    """Return ``slide_id`` if it follows the slide-id policy, else raise naming ``where``.

    Raises:
        ConfigError: The id is empty, holds a path separator, ``..``, starts with a dot, is
            absolute, ends in ``.zarr``, or has other characters than letters, digits, ``_.-``.
    """
    if is_slide_id(slide_id):
        return slide_id
    raise ConfigError(
        f"{where}: slide_id {slide_id!r} is not a safe name (letters, digits, '_', '.', '-'; no '/', "
        f"no leading dot, no .zarr suffix); use e.g. {sanitise_slide_id(str(slide_id))!r}"
    )


@dataclass(frozen=True)
class SlideSpec:
    """One slide to process.

    Attributes:
        path: The slide file.
        slide_id: Unique identifier; names the store ``<slide_id>.zarr``.
        slide_mpp: Level-0 resolution override in µm/px (from ``--slide-mpp`` or a manifest), or None.
    """

    path: Path
    slide_id: str
    slide_mpp: float | None = None


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
    return sanitise_slide_id(name)


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
            if p.is_symlink():
                try:
                    p.resolve(strict=True)
                except (OSError, RuntimeError) as exc:  # a loop or a dangling link
                    logger.warning("%s: skipping a symlink that leads nowhere (%s)", p, exc)
                    continue
            series = _dicom_series_key(p)
            if series is not None:
                if series in seen_dicom:
                    continue
                seen_dicom.add(series)
            found.append(p)
    return found


@dataclass(frozen=True)
class _Entry:
    path: Path
    slide_id: str | None
    slide_mpp: float | None
    rel: Path  # path relative to the input it came from; names colliding stems
    where: str  # the input (``m.csv:3`` for a manifest row), to name in errors


def _read_manifest(path: Path) -> list[_Entry]:
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if "path" not in fields:
                raise ConfigError(f"{path}: manifest needs a 'path' column (optional: slide_id, slide_mpp)")
            rows = []
            for raw in reader:
                lineno = reader.line_num
                if None in raw:
                    raise ConfigError(
                        f"{path}:{lineno}: row has {len(fields) + len(raw[None])} fields but the header has "
                        f"{len(fields)}; quote values that contain commas"
                    )
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
                if not row.get("path"):
                    raise ConfigError(f"{path}:{lineno}: empty 'path'")
                slide = Path(row["path"])
                if not slide.is_absolute():
                    slide = path.parent / slide
                slide_mpp = None
                # ``mpp`` is the column's name before 0.2; both mean the level-0 µm/px.
                column = "slide_mpp" if row.get("slide_mpp") else "mpp"
                if row.get(column):
                    try:  # a number here; its range is checked once, when the slide is opened
                        slide_mpp = float(row[column])
                    except ValueError as exc:
                        raise ConfigError(f"{path}:{lineno}: {column} {row[column]!r} is not a number") from exc
                sid = row.get("slide_id") or None
                if sid is not None:
                    check_slide_id(sid, f"{path}:{lineno}")
                rel = Path(row["path"])
                rel = Path(*rel.parts[-2:]) if rel.is_absolute() else rel
                rows.append(_Entry(slide, sid, slide_mpp, rel, f"{path}:{lineno}"))
            return rows
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: manifest is not a text CSV file") from exc
    except csv.Error as exc:
        raise ConfigError(f"{path}: malformed CSV ({exc})") from exc


def _path_id(rel: Path) -> str:
    """A slide id from a relative path: its folders and stem joined by ``-`` (``a/b/x.svs`` → ``a-b-x``)."""
    parts = [p for p in rel.parts[:-1] if p not in ("", ".", "..", "/")] + [slide_stem(rel)]
    return sanitise_slide_id("-".join(sanitise_slide_id(p) for p in parts))


def resolved_path(path: Path) -> Path:
    """``path`` resolved (symlinks followed), or made absolute where it cannot be resolved."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _unique_entries(entries: Sequence[_Entry]) -> list[_Entry]:
    """One entry per slide file, in path order; a file named under two explicit ids is an error."""
    unique: dict[Path, _Entry] = {}
    for e in entries:
        key = resolved_path(e.path)
        first = unique.get(key)
        if first is None:
            unique[key] = e
        elif e.slide_id and first.slide_id and e.slide_id != first.slide_id:
            raise ConfigError(
                f"{first.where} and {e.where} both name {e.path} (as {first.slide_id!r} and {e.slide_id!r}); "
                "list each slide file once"
            )
        elif e.slide_id and not first.slide_id:
            unique[key] = e  # the explicit id wins over a folder listing
    return sorted(unique.values(), key=lambda e: str(e.path))


def discover_slides(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    slide_mpp: float | None = None,
    recorded: Mapping[str, Path] | None = None,
) -> list[SlideSpec]:
    """Expand files, folders (searched recursively) and CSV manifests into slides.

    Slide paths are made absolute. Slide ids are file stems. Ids never move: a slide file
    that already has an id in the output folder (``recorded``, from
    :func:`~wsi_convnext.outputs.manifest.recorded_slide_ids`) keeps it, and every recorded id
    stays taken.
    Slides whose stems collide (with each other or with a taken id) get an id from their
    path relative to the input folder (``a/x.svs`` and ``b/x.svs`` become ``a-x`` and
    ``b-x``), or that id plus a hash of the path when it is taken too; a warning names the
    colliding files. An explicit ``slide_id`` from a manifest is checked against the
    slide-id policy (:func:`check_slide_id`) and must be unique; a file listed twice under
    two explicit ids is an error naming both rows (listed twice otherwise, it is one slide).

    Args:
        inputs: Slide files, folders or ``.csv`` manifests (columns ``path``, optional ``slide_id``, ``slide_mpp``; ``mpp`` is read as ``slide_mpp``).
        slide_mpp: Level-0 µm/px override for slides without one from a manifest (checked when
            the slide is opened, see :func:`~wsi_convnext.slide.open_slide`).
        recorded: ``slide_id -> source file`` already given by the output folder (None: a fresh folder).

    Raises:
        InputNotFoundError: A path does not exist, or nothing slide-like was found.
        ConfigError: A malformed manifest, an unsafe or duplicate slide id.
    """
    entries: list[_Entry] = []
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
            entries += [_Entry(f, None, None, f.relative_to(p), str(p)) for f in files]
        elif p.suffix.lower() == ".csv":
            rows = _read_manifest(p)
            if not rows:
                raise InputNotFoundError(f"{p}: manifest lists no slides")
            entries += rows
        else:
            entries.append(_Entry(p, None, None, Path(p.parent.name, p.name) if p.parent.name else Path(p.name), str(p)))
    ordered = _unique_entries(entries)

    explicit: dict[str, Path] = {}
    for e in ordered:
        if e.slide_id is None:
            continue
        if e.slide_id in explicit:
            raise ConfigError(f"duplicate slide_id in manifest: {e.slide_id} ({explicit[e.slide_id]} and {e.path})")
        explicit[e.slide_id] = e.path

    recorded = dict(recorded or {})
    kept: dict[Path, str] = {}  # a file that already has an id keeps it
    for sid, source in sorted(recorded.items()):
        kept.setdefault(source, sid)
    ids: dict[Path, str] = {}
    for e in ordered:
        if e.slide_id is None and resolved_path(e.path) in kept and kept[resolved_path(e.path)] not in explicit:
            ids[e.path] = kept[resolved_path(e.path)]
    taken = set(explicit) | set(recorded)
    by_stem: dict[str, list[_Entry]] = {}
    for e in ordered:
        if e.slide_id is None and e.path not in ids:
            by_stem.setdefault(slide_stem(e.path), []).append(e)
    for stem, group in by_stem.items():
        if len(group) == 1 and stem not in taken:
            ids[group[0].path] = stem
            continue
        logger.warning(
            "slide id %r is shared by %s; naming them by their relative paths (%s)",
            stem, " and ".join([str(e.path) for e in group] + ([str(recorded[stem])] if stem in recorded else [])),
            ", ".join(_path_id(e.rel) for e in group),
        )  # fmt: skip
        for e in group:
            ids[e.path] = _path_id(e.rel)
    # A path-derived id can still collide (``a-b/x`` vs ``a/b-x``, or an id recorded for
    # another file): add a hash of the path.
    owners: dict[str, Path] = {**recorded, **explicit}
    specs: list[SlideSpec] = []
    for e in ordered:
        sid = e.slide_id or ids[e.path]
        mine = e.slide_id is not None or kept.get(resolved_path(e.path)) == sid
        if not mine and sid in owners:
            other = owners[sid]
            sid = f"{sid}-{hashlib.sha1(str(e.rel).encode()).hexdigest()[:8]}"
            logger.warning("slide id collision: %s and %s; the latter is named %r", other, e.path, sid)
            if sid in owners:
                raise ConfigError(f"slide id collision: {owners[sid]} and {e.path} both map to {sid!r}; list them in a manifest with explicit slide_id")
        owners[sid] = e.path
        # Absolute, so that the run manifest names the file whatever the working folder of a later run.
        path = e.path.absolute()
        specs.append(SlideSpec(path=path, slide_id=sid, slide_mpp=e.slide_mpp if e.slide_mpp is not None else slide_mpp))
    return specs
