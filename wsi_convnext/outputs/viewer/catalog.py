"""What a viewer of PATH may show: the slides, their stores and their run outcome.

The catalog is built once, when the viewer starts, from PATH alone: a run or tile output
folder (its ``*.zarr`` stores, ``manifest.csv`` and ``predictions.csv``), one store, one
slide file, or a folder of slide files. Requests name a slide by its id and nothing else,
so the files a viewer can read are exactly the stores under PATH and the slide files those
stores (or the run's manifest) were made from; no request can name a path.

:class:`SlideView` opens one slide's store and slide lazily and answers what the web app
asks: the Deep Zoom source, the overlays (tile grid, tissue outline, every per-tile score
column) and stored tile images. Nothing in a store is executed: only JSON attributes and
numeric or image arrays are read.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InputNotFoundError, StoreError, WsiConvnextError, one_line
from .deepzoom import DeepZoom, SlideSource, ThumbnailSource, TileCache

logger = logging.getLogger(__name__)

__all__ = ["Catalog", "SlideView", "ViewerSlide", "build_catalog"]

_generation = itertools.count()
#: A request for a slide without a store re-reads PATH at most this often, seconds.
_REFRESH_SECONDS = 2.0


@dataclass
class ViewerSlide:
    """One slide in the list.

    Attributes:
        slide_id: The slide id (the only name requests use).
        store: Its store folder under PATH, or None (failed before tiling, or a bare slide).
        slide_path: The slide file as recorded (store ``source.path`` or manifest ``path``); may be missing.
        status: ``done``, ``failed``, ``running`` or ``skipped`` (from the manifest; ``done`` for a store without one).
        error: ``"<stage>: <ErrorType>: <message>"`` of a failed stage.
        tiles: Tile count, when known.
        prediction: ``{"label", "probabilities"}`` from the run's predictions, or None.
    """

    slide_id: str
    store: Path | None = None
    slide_path: Path | None = None
    status: str = "done"
    error: str = ""
    tiles: int | None = None
    prediction: dict[str, Any] | None = None

    @property
    def viewable(self) -> bool:
        """Whether there is anything to show (a store, or an existing slide file)."""
        return self.store is not None or (self.slide_path is not None and self.slide_path.is_file())

    def summary(self) -> dict[str, Any]:
        """JSON-ready row of the slide list."""
        return {
            "slide_id": self.slide_id, "status": self.status, "error": self.error, "tiles": self.tiles,
            "prediction": self.prediction, "viewable": self.viewable, "has_store": self.store is not None,
        }  # fmt: skip


def _store_entry(sid: str, store: Path) -> ViewerSlide:
    """A catalog entry from the store's group attributes alone (cheap; the store is opened on view)."""
    import json

    try:
        attrs = json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        attrs = {}
    source = attrs.get("source") or {}
    path = Path(source["path"]) if isinstance(source.get("path"), str) and source["path"] else None
    tiles = attrs.get("n_tiles") if isinstance(attrs.get("n_tiles"), int) else None
    return ViewerSlide(sid, store=store, slide_path=path, tiles=tiles)


def _from_folder(root: Path) -> dict[str, ViewerSlide]:
    from ...inputs import discover_slides
    from ...store import STORE_SUFFIX, is_store_dir
    from ..manifest import read_manifests
    from ..report import run_predictions, summarise

    slides: dict[str, ViewerSlide] = {}
    for child in sorted(root.iterdir()):
        if child.name.endswith(STORE_SUFFIX) and not child.name.startswith(".") and is_store_dir(child):
            sid = child.name.removesuffix(STORE_SUFFIX)
            slides[sid] = _store_entry(sid, child)
    for s in summarise(read_manifests(root)):
        v = slides.setdefault(s.slide_id, ViewerSlide(s.slide_id))
        v.status, v.error = s.status, s.error
        v.tiles = s.tiles if s.tiles is not None else v.tiles
        if v.slide_path is None and s.path:
            v.slide_path = Path(s.path)
    try:
        predictions = run_predictions(root)
    except (WsiConvnextError, OSError) as exc:  # a malformed predictions CSV must not hide the slides
        logger.warning("%s: predictions not shown: %s", root, one_line(exc, 300))
        predictions = {}
    for sid, pred in predictions.items():
        if sid in slides:
            slides[sid].prediction = {"label": pred.get("label", ""), "probabilities": pred.get("probabilities") or {}}
    if not slides:
        try:
            specs = discover_slides([root])
        except InputNotFoundError:
            specs = []
        slides = {s.slide_id: ViewerSlide(s.slide_id, slide_path=s.path) for s in specs}
    return slides


@dataclass
class Catalog:
    """The slides a viewer serves, by id, and their opened views (cached).

    Attributes:
        root: PATH as given, resolved.
        slides: Slide id → :class:`ViewerSlide`, in list order.
        has_run: Whether PATH is an output folder with a manifest (the run report can be shown).
    """

    root: Path
    slides: dict[str, ViewerSlide]
    has_run: bool = False
    cache: TileCache = field(default_factory=TileCache)
    _views: dict[str, SlideView] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _refreshed: float = field(default_factory=time.monotonic, repr=False)

    def view(self, slide_id: str) -> SlideView:
        """The opened view of ``slide_id`` (opened once, then reused; reopened when its store appears).

        Raises:
            KeyError: No such slide in the catalog, or nothing to show for it.
        """
        entry = self.slides.get(slide_id)
        if entry is None or entry.store is None:  # it may have appeared since the list was read
            self.refresh(max_age=_REFRESH_SECONDS)
            entry = self.slides.get(slide_id)
        if entry is None or not entry.viewable:
            raise KeyError(slide_id)
        with self._lock:
            view = self._views.get(slide_id)
            if view is not None and (view.entry.store, view.entry.slide_path) != (entry.store, entry.slide_path):
                view.close()  # a store appeared (or moved) since it was opened
                view = None
            if view is None:
                view = self._views[slide_id] = SlideView(entry, self.cache)
            view.entry = entry
            return view

    def refresh(self, *, max_age: float = 0.0) -> None:
        """Re-read PATH's slide list, statuses and predictions (a run may still be writing it).

        Views already opened stay open; a slide that appeared since is listed and viewable.

        Args:
            max_age: Skip when the list was read less than this many seconds ago.
        """
        now = time.monotonic()
        if now - self._refreshed < max_age:
            return
        self._refreshed = now
        try:
            fresh = build_catalog(self.root)
        except (WsiConvnextError, OSError) as exc:
            logger.warning("%s: slide list not refreshed: %s", self.root, one_line(exc, 300))
            return
        with self._lock:
            self.slides, self.has_run = fresh.slides, fresh.has_run

    def close(self) -> None:
        """Close every opened slide."""
        with self._lock:
            for v in self._views.values():
                v.close()
            self._views.clear()


def build_catalog(path: str | os.PathLike[str]) -> Catalog:
    """The catalog of PATH: an output folder, one store, one slide file or a folder of slides.

    Raises:
        InputNotFoundError: PATH does not exist, or holds no store, manifest or slide.
    """
    from ...inputs import is_slide_file, slide_stem
    from ...store import STORE_SUFFIX, is_store_dir

    root = Path(path)
    if not root.exists():
        raise InputNotFoundError(f"{root}: no such file or folder; give a run or tile output folder, a store or a slide")
    root = root.resolve()
    if is_store_dir(root):
        sid = root.name.removesuffix(STORE_SUFFIX)
        return Catalog(root, {sid: _store_entry(sid, root)})
    if root.is_file():
        if not is_slide_file(root):
            raise InputNotFoundError(f"{root}: not a slide file, store or folder; give a run or tile output folder, a store or a slide")
        sid = slide_stem(root)
        return Catalog(root, {sid: ViewerSlide(sid, slide_path=root)})
    slides = _from_folder(root)
    if not slides:
        raise InputNotFoundError(f"{root}: holds no stores, manifest or slides; give a run or tile output folder, a store or a slide")
    has_run = any(root.glob("manifest*.csv"))
    return Catalog(root, slides, has_run=has_run)


def _num(v: float) -> float | None:
    return None if not math.isfinite(v) else round(float(v), 5)


class SlideView:
    """One slide's store and pixels, opened on first use.

    Attributes:
        entry: The catalog entry.
        message: Why the view is degraded (slide file missing or unreadable, store damaged), or "".
    """

    def __init__(self, entry: ViewerSlide, cache: TileCache) -> None:
        from ...slide import open_slide
        from ...store import open_store

        self.entry = entry
        self.message = ""
        self.store = None
        self.reader = None
        if entry.store is not None:
            try:
                self.store = open_store(entry.store)
            except WsiConvnextError as exc:
                self.message = f"store unreadable: {one_line(exc, 300)}"
        path = entry.slide_path
        if path is not None and path.is_file():
            try:
                self.reader = open_slide(path)
            except WsiConvnextError as exc:
                self.message = f"slide cannot be opened: {one_line(exc, 300)}"
        elif path is not None:
            self.message = f"slide file {path} is missing (moved?); showing the stored thumbnail, tiles and overlays"
        if self.reader is not None:
            source: Any = SlideSource(self.reader)
        elif self.store is not None:
            a = self.store.attrs
            dims = (a.get("source") or {}).get("dimensions")
            ds = float(a["thumbnail_downsample"])
            thumb = self.store.thumbnail
            if not dims:
                dims = [round(thumb.shape[1] * ds), round(thumb.shape[0] * ds)]
            source = ThumbnailSource(thumb, ds, (int(dims[0]), int(dims[1])))
            if not self.message:
                self.message = "no slide file recorded; showing the stored thumbnail"
        else:
            raise StoreError(f"{entry.slide_id}: {self.message or 'nothing to show'}")
        # A reopened view (its store appeared) never sees the tiles cached for the old one.
        self.deepzoom = DeepZoom(source, cache, f"{entry.slide_id}#{next(_generation)}")

    def info(self) -> dict[str, Any]:
        """What the page needs to set up the view (sizes in level-0 px, mpp in µm/px)."""
        w, h = self.deepzoom.grid.width, self.deepzoom.grid.height
        mpp = None
        if self.store is not None:
            mpp = self.store.slide_mpp
        elif self.reader is not None and self.reader.mpp_x:
            mpp = float(self.reader.mpp_x)
        out: dict[str, Any] = {
            **self.entry.summary(), "width": w, "height": h, "slide_mpp": mpp, "message": self.message,
            "source": "slide" if self.reader is not None else "thumbnail",
        }  # fmt: skip
        if self.store is not None:
            out.update(
                tiles=len(self.store), target_mpp=self.store.mpp, tile_size=self.store.tile_size,
                extent0=self.store.extent0, score_arrays=self.store.score_keys,
            )  # fmt: skip
            if out["prediction"] is None:
                out["prediction"] = self._stored_prediction()
        return out

    def _stored_prediction(self) -> dict[str, Any] | None:
        """The slide prediction ``predict`` recorded with its tile scores (no predictions CSV at hand)."""
        for name in self.store.score_keys if self.store is not None else []:
            try:
                attrs = self.store.score_attrs(name)
            except StoreError:
                continue
            if isinstance(attrs.get("predicted_class"), str) and isinstance(attrs.get("probabilities"), dict):
                probs = {str(k): float(v) for k, v in attrs["probabilities"].items() if isinstance(v, (int, float))}
                return {"label": attrs["predicted_class"], "probabilities": probs, "model": str(attrs.get("model", name))}
        return None

    def overlays(self) -> dict[str, Any]:
        """Tile grid, tissue outline and per-tile score columns, in level-0 px.

        ``scores`` maps each column name (``<array>`` or ``<array>_<column>``, as the exports
        name them) to ``{"values", "min", "max", "kind"}`` (``kind``: the array's ``score``
        attribute, e.g. ``attention``); unreadable arrays are left out and named in ``problems``.
        """
        import numpy as np

        from ..exports import SlideExport, score_columns
        from ..exports.geojson import mask_polygons

        if self.store is None:
            return {"coords": [], "extent0": 0, "tissue_fraction": [], "outline": [], "scores": {}, "problems": []}
        st = self.store
        problems: list[str] = []
        arrays: dict[str, Any] = {}
        attrs: dict[str, dict[str, Any]] = {}
        for name in st.score_keys:
            try:
                arrays[name], attrs[name] = st.scores(name), st.score_attrs(name)
            except StoreError as exc:
                problems.append(one_line(exc, 300))
        item = SlideExport(st.slide_id, None, st.coords, {}, {}, scores=arrays, score_attrs=attrs)
        scores = {}
        for col, values in score_columns(item).items():
            finite = values[np.isfinite(values)]
            array = max((n for n in arrays if col == n or col.startswith(f"{n}_")), key=len)
            scores[col] = {
                "kind": str(attrs[array].get("score", "")),
                "values": [_num(v) for v in values.tolist()],
                "min": _num(float(finite.min())) if finite.size else None,
                "max": _num(float(finite.max())) if finite.size else None,
            }
        return {
            "coords": st.coords.tolist(), "extent0": st.extent0,
            "tissue_fraction": [_num(v) for v in st.tissue_fraction.tolist()],
            "outline": mask_polygons(st.tissue_mask, float(st.attrs["mask_downsample"])),
            "scores": scores, "problems": problems,
        }  # fmt: skip

    def stored_tile(self, index: int) -> tuple[bytes, str]:
        """Encoded bytes and MIME type of stored tile ``index`` (at the store's µm/px).

        Raises:
            KeyError: No store, or no such tile.
        """
        if self.store is None or not 0 <= index < len(self.store):
            raise KeyError(index)
        data = bytes(self.store.tile_bytes(slice(index, index + 1))[0])
        return data, "image/png" if self.store.attrs["tile_encoding"] == "png" else "image/jpeg"

    def close(self) -> None:
        """Close the slide file."""
        if self.reader is not None:
            self.reader.close()
