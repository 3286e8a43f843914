"""The run manifest ``OUT/manifest.csv``: one row per slide and stage, readable while a run goes.

Columns (:data:`MANIFEST_FIELDS`): ``slide_id, path, stage, status, error_type, error,
tiles, slide_mpp, seconds, worker, finished, qc``. ``status`` is one of :data:`STATUSES`:
``running`` (submitted, not finished: after a crash it marks interrupted work), ``done``,
``skipped`` (already finished by an earlier run) or ``failed`` (``error_type`` is the
exception class, ``error`` its one-line message). ``slide_mpp`` is the slide's level-0 µm/px,
``seconds`` the stage's wall time, ``worker`` ``host/worker-name``, ``finished`` an ISO 8601
UTC timestamp, ``qc`` the slide's QC picture (written for failed slides too, when the slide opened).

Rows are appended as they come, so ``tail -f`` or a spreadsheet sees progress; when a
slide/stage gets a new row, the last row wins. The file is compacted (rewritten atomically
through a temporary file and :func:`os.replace`, one row per slide and stage) when opened,
every so often while growing, and when closed. Several processes may share one manifest
(two ``tile`` runs on one ``--out``): every append and rewrite happens under the file's
:func:`~wsi_convnext._io.path_lock`, and a rewrite first merges the rows other processes
wrote (per slide and stage, the row that finished last wins), so no row is ever lost. Sharded runs (job arrays) each write their own
``manifest-shard-I-of-N.csv``; :func:`read_manifests` merges them.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_text, csv_text, csv_unescape, path_lock
from ..errors import one_line
from ..outcome import MAX_ERROR as OUTCOME_MAX_ERROR

if TYPE_CHECKING:
    from ..tiling.tiler import TileResult

logger = logging.getLogger(__name__)

__all__ = [
    "recorded_slide_ids",
    "MANIFEST_FIELDS",
    "MANIFEST_NAME",
    "STATUSES",
    "ManifestRow",
    "RunManifest",
    "manifest_name",
    "read_manifest",
    "read_manifests",
    "tile_manifest_row",
]

MANIFEST_NAME = "manifest.csv"
MANIFEST_FIELDS: tuple[str, ...] = (
    "slide_id",
    "path",
    "stage",
    "status",
    "error_type",
    "error",
    "tiles",
    "slide_mpp",
    "seconds",
    "worker",
    "finished",
    "qc",
)
STATUSES: tuple[str, ...] = ("running", "done", "skipped", "failed")
#: Longest error message kept in a manifest cell, in characters.
MAX_ERROR = OUTCOME_MAX_ERROR


def manifest_name(shard: tuple[int, int] | None = None) -> str:
    """File name of the manifest of a whole run (``manifest.csv``) or of shard ``(i, n)``."""
    if shard is None:
        return MANIFEST_NAME
    i, n = shard
    return f"manifest-shard-{i}-of-{n}.csv"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ManifestRow:
    """One slide × stage outcome. Empty strings/None mean "not applicable"."""

    slide_id: str
    stage: str
    status: str
    path: str = ""
    error_type: str = ""
    error: str = ""
    tiles: int | None = None
    slide_mpp: float | None = None
    seconds: float | None = None
    worker: str = ""
    finished: str = ""
    qc: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"manifest status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    @property
    def key(self) -> tuple[str, str]:
        return (self.slide_id, self.stage)

    def to_csv(self) -> list[str]:
        """The cells of this row, in :data:`MANIFEST_FIELDS` order."""
        out: list[str] = []
        for name in MANIFEST_FIELDS:
            value = getattr(self, name)
            if value is None:
                out.append("")
            elif name == "seconds":
                out.append(f"{value:.3f}")
            elif name == "slide_mpp":
                out.append(f"{value:.6g}")
            else:
                out.append(str(value))
        return out

    @classmethod
    def from_csv(cls, raw: Mapping[str, str | None]) -> ManifestRow:
        raw = {k: csv_unescape(v) if isinstance(v, str) else v for k, v in raw.items()}

        def num(name: str, kind: type) -> Any:
            v = (raw.get(name) or "").strip()
            return kind(float(v)) if v and kind is int else (kind(v) if v else None)

        return cls(
            slide_id=raw["slide_id"] or "",
            stage=raw["stage"] or "",
            status=(raw.get("status") or "").strip(),
            path=raw.get("path") or "",
            error_type=raw.get("error_type") or "",
            error=raw.get("error") or "",
            tiles=num("tiles", int),
            slide_mpp=num("slide_mpp", float) if raw.get("slide_mpp") else num("mpp", float),  # "mpp" before 0.2
            seconds=num("seconds", float),
            worker=raw.get("worker") or "",
            finished=raw.get("finished") or "",
            qc=raw.get("qc") or "",
        )


def tile_manifest_row(result: TileResult) -> ManifestRow:
    """The ``tile`` stage row of a :class:`~wsi_convnext.tiling.tiler.TileResult` (the ``tile`` command's manifest)."""
    return ManifestRow(
        slide_id=result.slide_id, stage="tile", status=result.status, path=str(result.path or ""),
        error_type=result.error_type or "", error=result.error or "",
        tiles=result.n_tiles if result.status != "failed" else None, slide_mpp=result.slide_mpp,
        seconds=result.seconds, qc=str(result.qc_path) if result.qc_path else "",
    )  # fmt: skip


def _parse(path: Path) -> tuple[dict[tuple[str, str], ManifestRow], int, bool]:
    """Rows by key (last wins), number of data lines, and whether the file needs a rewrite."""
    rows: dict[tuple[str, str], ManifestRow] = {}
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except FileNotFoundError:
        return rows, 0, False
    if not text:
        return rows, 0, True
    dirty = not text.endswith("\n")
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != MANIFEST_FIELDS:
        dirty = True
        if "slide_id" not in (reader.fieldnames or ()):
            logger.warning("%s: not a wsi-convnext manifest (no slide_id column); starting a new one", path)
            return rows, 0, True
    lines = 0
    for raw in reader:
        lines += 1
        try:
            row = ManifestRow.from_csv(raw)
        except (KeyError, ValueError, TypeError):
            # A line cut short by a crash mid-write; the stage is redone anyway.
            dirty = True
            continue
        rows[row.key] = row
    return rows, lines, dirty


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestRow]:
    """Rows of one manifest file, one per slide and stage (the last written wins).

    A missing file gives an empty list; a truncated last line (a crash mid-write) is ignored.
    """
    rows, _, _ = _parse(Path(path))
    return list(rows.values())


def read_manifests(out_dir: str | os.PathLike[str]) -> list[ManifestRow]:
    """Merge ``manifest.csv`` and every ``manifest-shard-*.csv`` in ``out_dir``.

    For a slide/stage present in several files, the row that finished last wins (a
    ``running`` row, which has no ``finished`` time, loses to any finished one).
    """
    out = Path(out_dir)
    files = [out / MANIFEST_NAME] + sorted(out.glob("manifest-shard-*.csv"))
    merged: dict[tuple[str, str], ManifestRow] = {}
    for f in files:
        for row in read_manifest(f):
            old = merged.get(row.key)
            if old is None or (row.finished or "") >= (old.finished or ""):
                merged[row.key] = row
    return list(merged.values())


def _newer(mine: ManifestRow, recorded: str, theirs: ManifestRow) -> bool:
    """Whether this process's ``mine`` (recorded at ``recorded``) replaces ``theirs`` from the file.

    A finished row is dated by ``finished``, a ``running`` one by when it was recorded;
    the later one wins, ties going to this process.
    """
    return (mine.finished or recorded) >= (theirs.finished or "")


class RunManifest:
    """Appendable, crash-safe manifest of one run; safe to share between processes.

    Args:
        path: The CSV file; existing rows are loaded (a rerun keeps and updates them).

    Example:
        >>> m = RunManifest(out / "manifest.csv")                       # doctest: +SKIP
        >>> m.record(ManifestRow("s1", "tile", "done", tiles=120))       # doctest: +SKIP
        >>> m.status("s1", "tile")                                      # doctest: +SKIP
        'done'
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mine: dict[tuple[str, str], tuple[ManifestRow, str]] = {}  # rows this object recorded, and when
        self._rows: dict[tuple[str, str], ManifestRow] = {}
        self._lines = 0
        with self._lock:
            self._sync(rewrite=False)

    # --- reading ---------------------------------------------------------------------------

    def rows(self) -> list[ManifestRow]:
        """Current rows, one per slide and stage, in first-recorded order."""
        with self._lock:
            return list(self._rows.values())

    def get(self, slide_id: str, stage: str) -> ManifestRow | None:
        """The row of ``slide_id``/``stage``, or None."""
        return self._rows.get((slide_id, stage))

    def status(self, slide_id: str, stage: str) -> str | None:
        """``running``/``done``/``skipped``/``failed`` of ``slide_id``/``stage``, or None if never recorded."""
        row = self._rows.get((slide_id, stage))
        return row.status if row else None

    def __len__(self) -> int:
        return len(self._rows)

    # --- writing ---------------------------------------------------------------------------

    def record(self, row: ManifestRow | Mapping[str, Any]) -> ManifestRow:
        """Add or replace the row of ``row.slide_id``/``row.stage`` and append it to the file.

        ``finished`` defaults to now for finished statuses; ``error`` is made one line.

        Returns:
            The row as stored.
        """
        if not isinstance(row, ManifestRow):
            known = {f.name for f in fields(ManifestRow)}
            unknown = set(row) - known
            if unknown:
                raise ValueError(f"unknown manifest column(s): {', '.join(sorted(unknown))}")
            row = ManifestRow(**row)
        updates: dict[str, Any] = {}
        if row.error and ("\n" in row.error or len(row.error) > MAX_ERROR):
            updates["error"] = one_line(row.error, MAX_ERROR)
        if not row.finished and row.status != "running":
            updates["finished"] = _now()
        if updates:
            row = replace(row, **updates)
        with self._lock:
            self._rows[row.key] = row
            self._mine[row.key] = (row, _now())
            with path_lock(self.path):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                new = not self.path.exists() or self.path.stat().st_size == 0
                with open(self.path, "a", encoding="utf-8", newline="") as fh:
                    fh.write(csv_text(MANIFEST_FIELDS if new else None, [row.to_csv()]))
                self._lines += 1
            if self._lines > max(1000, 2 * len(self._rows)):
                self._sync(rewrite=True)
        return row

    def update(self, rows: Iterable[ManifestRow | Mapping[str, Any]]) -> None:
        """:meth:`record` several rows."""
        for r in rows:
            self.record(r)

    def compact(self) -> None:
        """Rewrite the file atomically with one row per slide and stage (merged with other writers)."""
        with self._lock:
            self._sync(rewrite=True)

    def close(self) -> None:
        """Merge with the file and compact it (a run with no rows still leaves its header).

        Recording again is allowed.
        """
        with self._lock:
            self._sync(rewrite=True, create=True)

    def __enter__(self) -> RunManifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals (self._lock held) -------------------------------------------------------

    def _sync(self, *, rewrite: bool, create: bool = False) -> None:
        """Under the file lock: read the file, merge this object's rows in, rewrite if needed.

        ``create`` writes a header-only file when there is nothing to merge.
        """
        if not rewrite and not self.path.exists():
            return
        with path_lock(self.path):
            disk, lines, dirty = _parse(self.path)
            merged = dict(disk)
            for key, (mine, recorded) in self._mine.items():
                theirs = disk.get(key)
                if theirs is None or _newer(mine, recorded, theirs):
                    merged[key] = mine
            changed = any(merged.get(k) != v for k, v in disk.items()) or len(merged) != len(disk)
            self._rows = merged
            self._lines = lines
            if (rewrite or dirty or lines > len(disk) or changed) and (merged or create or self.path.exists()):
                atomic_write_text(self.path, csv_text(MANIFEST_FIELDS, [r.to_csv() for r in merged.values()]))
                self._lines = len(merged)


def recorded_slide_ids(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """The ids an output folder already gives to slide files: ``slide_id -> source file``.

    The run manifests name each slide's file (absolute: :func:`~wsi_convnext.inputs.discover_slides`
    makes slide paths absolute); a store ``OUT/<slide_id>.zarr`` that no manifest row names by an
    absolute path is asked for its own record (``source.path``). A store that does not open is
    left to the tiler, which reports it. Pass the result to ``discover_slides(recorded=...)``.
    """
    from ..errors import WsiConvnextError
    from ..inputs import resolved_path
    from ..store import STORE_SUFFIX, open_store

    out = Path(out_dir)
    if not out.is_dir():
        return {}
    ids = {
        row.slide_id: resolved_path(Path(row.path))
        for row in read_manifests(out)
        if row.slide_id and row.path and Path(row.path).is_absolute()  # relative: to an unknown folder
    }
    for store_dir in sorted(out.glob(f"*{STORE_SUFFIX}")):
        if store_dir.name[: -len(STORE_SUFFIX)] in ids:
            continue  # a rerun of a large cohort opens no store here
        try:
            store = open_store(store_dir)
        except (WsiConvnextError, OSError):
            continue
        source = (store.attrs.get("source") or {}).get("path")
        if source:
            ids[store.slide_id] = Path(source)
    return ids
